"""Logging set-up, and the request context that the gRPC edge puts on every log line.

The edge sets `request_context` once per RPC; the filter appends it to each record made
while that RPC runs, so deeper code never threads ids through its arguments.
"""

import contextvars
import logging

request_context: contextvars.ContextVar[str] = contextvars.ContextVar(
    "request_context", default=""
)


class RequestContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        context = request_context.get()
        record.context = f" [{context}]" if context else ""
        return True


def configure(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s")
    )
    logging.basicConfig(level=level, handlers=[handler])
