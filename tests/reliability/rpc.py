"""How a client reads a failed call: unknown outcome or a definite answer, and why."""

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2

GRPC_DETAILS_KEY = "grpc-status-details-bin"

# A call that failed like this may or may not have changed anything: the server died,
# was restarting, or answered after the deadline. Safe to retry with the same id.
UNKNOWN_OUTCOME_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# The same, as google.rpc.Status codes inside an ExecuteBatch result.
UNKNOWN_OUTCOME_STATUS_CODES = frozenset(
    {code_pb2.UNAVAILABLE, code_pb2.RESOURCE_EXHAUSTED}
)


def status_of(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    """The rich status the server attached, if any."""
    for key, value in error.trailing_metadata() or ():
        if key == GRPC_DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    return None


def reason_of_status(status: status_pb2.Status) -> str:
    """The ErrorInfo reason, or an empty string when the status carries none."""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def reason_of(error: grpc.aio.AioRpcError) -> str:
    status = status_of(error)
    return reason_of_status(status) if status is not None else ""
