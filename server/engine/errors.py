"""The engine's failures, kept apart by kind.

Expected business outcomes (not enough stock) are not errors: they are values in results.
What is here are caller mistakes and illegal moves, each with a machine-readable reason
and, for bad input, the field at fault, plus the invariant check that stops the process.
"""

import enum


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"


class EngineError(Exception):
    """A request the engine refuses, with an UPPER_SNAKE reason for ErrorInfo."""

    kind = ErrorKind.FAILED_PRECONDITION

    def __init__(
        self, reason: str, message: str, *, field: str = "", retry_after_s: float = 0.0
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field
        # When set, the caller may retry after this long (google.rpc.RetryInfo).
        self.retry_after_s = retry_after_s


class InvalidArgument(EngineError):
    kind = ErrorKind.INVALID_ARGUMENT


class NotFound(EngineError):
    kind = ErrorKind.NOT_FOUND


class FailedPrecondition(EngineError):
    kind = ErrorKind.FAILED_PRECONDITION


class Overloaded(EngineError):
    kind = ErrorKind.RESOURCE_EXHAUSTED


class Unavailable(EngineError):
    kind = ErrorKind.UNAVAILABLE


class InvariantBroken(AssertionError):
    """State the engine promised can never exist. Never caught: the process must stop."""


def ensure(condition: bool, message: str) -> None:
    """Check an invariant; unlike `assert`, still runs under `python -O`."""
    if not condition:
        raise InvariantBroken(message)
