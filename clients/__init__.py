"""stockward's client library for channel backends: typed async calls with
idempotency keys, deadlines, safe retries and auto-batching, plus a blocking
wrapper (`SyncStockwardClient`) for backends without an event loop."""

from clients.batching import Batching, BatchStats
from clients.client import StockwardClient, line, quantity, raise_for
from clients.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    StockwardError,
    UnavailableError,
)
from clients.retry import RetryPolicy
from clients.sync import SyncStockwardClient

__all__ = [
    "BatchStats",
    "Batching",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "StockwardClient",
    "StockwardError",
    "SyncStockwardClient",
    "UnavailableError",
    "line",
    "quantity",
    "raise_for",
]
