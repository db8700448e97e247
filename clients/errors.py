"""stockward's refusals as Python exceptions that name the reason.

The server puts a google.rpc.Status with a google.rpc.ErrorInfo (domain stockward.v1,
an UPPER_SNAKE reason and metadata["field"]) and, when it wants the caller to wait, a
google.rpc.RetryInfo into every error. Callers branch on the exception class (the
status code) and on `reason`, never on message text.
"""

import grpc
from google.rpc import error_details_pb2, status_pb2

# The trailing-metadata key under which gRPC carries the serialized google.rpc.Status.
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class StockwardError(Exception):
    """A call stockward refused or could not answer."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        field: str = "",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{code.name} {reason or '-'}: {message}")
        self.code = code
        self.message = message
        # ErrorInfo.reason, e.g. "REQUEST_ID_REUSED"; empty when the error did not
        # come from stockward itself (a transport failure, a deadline).
        self.reason = reason
        # The request field at fault, e.g. "lines[0].quantity", when one is.
        self.field = field
        # How long the server asks the caller to wait before trying again.
        self.retry_after_s = retry_after_s


class InvalidArgumentError(StockwardError):
    """The request is malformed; retrying it unchanged cannot help."""


class NotFoundError(StockwardError):
    """The reservation (or control) named does not exist."""


class FailedPreconditionError(StockwardError):
    """The request is well formed but not allowed in the current state."""


class ResourceExhaustedError(StockwardError):
    """The server's queues are full or the channel is throttled; see retry_after_s."""


class UnavailableError(StockwardError):
    """The server cannot answer now (recovering, unreachable); safe to retry with the
    same request id."""


class DeadlineExceededError(StockwardError):
    """The call ran out of time. The command may or may not have been applied: retry
    it with the same request id to find out."""


_CLASSES: dict[grpc.StatusCode, type[StockwardError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def error_from_status(status: status_pb2.Status) -> StockwardError:
    """The exception for a google.rpc.Status, as ExecuteBatch returns per command."""
    code = _BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    reason, field, retry_after_s = "", "", None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, field = info.reason, info.metadata.get("field", "")
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
    kind = _CLASSES.get(code, StockwardError)
    return kind(
        code, status.message, reason=reason, field=field, retry_after_s=retry_after_s
    )


def error_from_rpc(error: grpc.aio.AioRpcError) -> StockwardError:
    """The exception for a failed call, decoded from its rich status when it has
    one, else from the bare status code (a transport failure or a deadline)."""
    for key, value in error.trailing_metadata() or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            return error_from_status(status_pb2.Status.FromString(value))
    kind = _CLASSES.get(error.code(), StockwardError)
    return kind(error.code(), error.details() or "")
