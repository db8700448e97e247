"""ERP adapters: the one small interface every way of reaching an ERP implements.

The bridge hands an adapter a batch and gets back an acknowledgement or one of the
failures below; everything about the wire (HTTP, files, auth, field names) stays inside
the adapter, and every foreign exception (aiohttp, OSError) is translated here into
these classes, chained with `from`. The bridge decides what to do with each: retry
with backoff, wait out a Retry-After, dead-letter a line, or stop and say why.
"""

import dataclasses
import enum
from typing import Protocol


class Feed(enum.StrEnum):
    # One netted line per (sku, location) per batch: an on-hand/reservation position
    # feed.
    POSITIONS = "positions"
    # One line per stock effect of every commitment: an order/reservation ledger feed.
    LEDGER = "ledger"


@dataclasses.dataclass(frozen=True, slots=True)
class ErpLine:
    line_id: str
    sku: str
    location: str
    on_hand_delta: int
    held_delta: int
    # Empty for netted lines and for stock changes that belong to no reservation.
    reservation_id: str
    channel: str
    # The record kind (reserve, release, fulfill, adjust, ...), or "net" when netted.
    kind: str


@dataclasses.dataclass(frozen=True, slots=True)
class ErpBatch:
    batch_id: str
    # Batches of one stream are applied in order; the ERP reports the last it applied
    # per stream, which is what reconciliation needs.
    stream: str
    feed: Feed
    lines: tuple[ErpLine, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class LineRejection:
    line_id: str
    # The ERP's reason code (UNKNOWN_ITEM, PERIOD_CLOSED, LINE_ALREADY_APPLIED, ...).
    reason: str
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class Acknowledgement:
    """The ERP has the batch: every line not rejected is applied."""

    batch_id: str
    applied_lines: int
    rejected: tuple[LineRejection, ...]
    # The ERP had this batch already (a resend); the answer is its first one.
    duplicate: bool


class ErpError(Exception):
    """Base of everything an adapter raises."""


class Throttled(ErpError):
    """The ERP said 429: nothing was applied; come back after retry_after_s."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Transient(ErpError):
    """5xx, a timeout, a broken connection or an answer that makes no sense: the batch
    may or may not have been applied; resending the same batch is safe.

    `may_still_run` says no answer came at all (a timeout, a dropped connection): the
    ERP may still be working on the request, so it still counts against the ERP's
    concurrent requests for a while."""

    def __init__(self, message: str, *, may_still_run: bool = False) -> None:
        super().__init__(message)
        self.may_still_run = may_still_run


class BatchRefused(ErpError):
    """The ERP refused the batch itself: invalid (400, 413, 422) or not allowed (401,
    403). When it named one line (`lines[3].sku`), `line_index` says which; resending
    as is cannot help. Statuses that point at the endpoint rather than the batch (404,
    a proxy's 502) are Transient instead."""

    def __init__(self, message: str, *, line_index: int | None) -> None:
        super().__init__(message)
        self.line_index = line_index


class BatchConflict(ErpError):
    """The ERP holds a different batch under this id: a bug or a changed feed
    configuration; never resolved by resending."""


class ErpAdapter(Protocol):
    # Names the endpoint in logs, metrics and the circuit breaker.
    endpoint: str

    async def send(self, batch: ErpBatch, *, timeout_s: float) -> Acknowledgement:
        """Deliver one batch, within timeout_s, or raise an ErpError."""
        ...

    async def close(self) -> None: ...
