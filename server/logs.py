"""Logging set-up, and the request context that the gRPC edge puts on every log line.

The edge sets `request_context` to (rpc name, request) once per RPC; the filter turns
it into `rpc=Reserve channel=web request_id=...` only for records that are emitted, so
the many RPCs that log nothing pay for no formatting.
"""

import contextvars
import logging
import sys

request_context: contextvars.ContextVar[tuple[str, object] | None] = (
    contextvars.ContextVar("request_context", default=None)
)

# The ids a request may carry, in the order they are shown.
_ID_FIELDS = (
    "channel",
    "request_id",
    "reservation_id",
    "source",
    "source_event_id",
    "actor",
    "change_id",
)


def describe(rpc: str, request: object) -> str:
    parts = [f"rpc={rpc}"]
    for name in _ID_FIELDS:
        value = getattr(request, name, "")
        if value:
            parts.append(f"{name}={value}")
    return " ".join(parts)


class RequestContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        context = request_context.get()
        record.context = f" [{describe(*context)}]" if context else ""
        return True


def configure(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s")
    )
    logging.basicConfig(level=level, handlers=[handler])


def console(name: str) -> logging.Logger:
    """A logger for what a command-line tool says to the person at the terminal:
    info goes bare to stdout (tables, JSON, a banner), warnings and errors bare to
    stderr, and nothing reaches the process's other handlers."""
    logger = logging.getLogger(name)
    if logger.handlers:
        return logger
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger
