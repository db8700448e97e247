"""Engine errors as gRPC statuses with a google.rpc.ErrorInfo, in one place."""

import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.engine.errors import EngineError, ErrorKind

log = logging.getLogger(__name__)

# ErrorInfo.domain: names the service that produced the reason.
ERROR_DOMAIN = "stockward.v1"

_CODES: dict[ErrorKind, int] = {
    ErrorKind.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: code_pb2.NOT_FOUND,
    ErrorKind.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    ErrorKind.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: code_pb2.UNAVAILABLE,
}


def status_of(error: EngineError) -> status_pb2.Status:
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN)
    if error.field:
        info.metadata["field"] = error.field
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if error.retry_after_s:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        retry_detail = any_pb2.Any()
        retry_detail.Pack(retry)
        details.append(retry_detail)
    return status_pb2.Status(
        code=_CODES[error.kind], message=error.message, details=details
    )


def internal_status(reason: str, message: str) -> status_pb2.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(code=code_pb2.INTERNAL, message=message, details=[detail])


async def abort(
    context: grpc.aio.ServicerContext[object, object], status: status_pb2.Status
) -> None:
    await context.abort_with_status(rpc_status.to_status(status))
