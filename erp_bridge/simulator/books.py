"""The simulated ERP's own books: stock per position, and what it has already booked.

Design note. An ERP that is fed "exactly once" must itself make replays harmless, and
this one does so at two levels, as real ones do. A batch id is an idempotency key: the
same id with the same content returns the first answer, with a different content it is
a conflict. Below that, each line id is booked at most once for the life of the books,
so a line resent under a new batch id is refused rather than counted twice.

Everything here is synchronous and free of HTTP, so a batch is decided and booked
without an await in between and two concurrent requests cannot both book it.

Known shortcoming: every batch id and line id ever booked is remembered for the life of
the process, so memory grows with the volume fed (about 200 bytes per line); a
simulator lives for one test or one benchmark run, which keeps that to megabytes.
"""

import dataclasses
import enum
import logging

from erp_bridge.simulator.contract import Batch, Line

logger = logging.getLogger(__name__)


class Reason(enum.StrEnum):
    """Why a line was not booked; the rest of its batch still is."""

    LINE_ALREADY_APPLIED = "LINE_ALREADY_APPLIED"
    UNKNOWN_ITEM = "UNKNOWN_ITEM"
    PERIOD_CLOSED = "PERIOD_CLOSED"


class Seen(enum.Enum):
    """How a batch id relates to what the books already hold."""

    NEW = "new"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


@dataclasses.dataclass(frozen=True)
class Rejection:
    line_id: str
    reason: Reason
    message: str


@dataclasses.dataclass(frozen=True)
class BatchResult:
    batch_id: str
    applied_lines: int
    rejected: tuple[Rejection, ...]

    def to_json(self, *, status: str) -> dict[str, object]:
        return {
            "batch_id": self.batch_id,
            "status": status,
            "applied_lines": self.applied_lines,
            "rejected": [
                {"line_id": r.line_id, "reason": r.reason.value, "message": r.message}
                for r in self.rejected
            ],
        }


@dataclasses.dataclass
class Position:
    on_hand: int = 0
    held: int = 0


class Books:
    def __init__(self) -> None:
        # Empty means every sku is known: tests that do not care about the item master
        # need not load one.
        self.known_skus: frozenset[str] = frozenset()
        self.closed_locations: frozenset[str] = frozenset()
        self.positions: dict[tuple[str, str], Position] = {}
        self.last_batch_id = ""
        # The last batch booked on each stream, for reconciliation to read back.
        self.last_batch_ids: dict[str, str] = {}
        self.batches_applied = 0
        self.lines_applied = 0
        self._batches: dict[str, tuple[str, BatchResult]] = {}
        self._applied_line_ids: set[str] = set()

    def look_up(self, batch: Batch) -> tuple[Seen, BatchResult | None]:
        """Whether this batch id was booked before, and the answer it got then."""
        known = self._batches.get(batch.batch_id)
        if known is None:
            return Seen.NEW, None
        content_hash, result = known
        if content_hash != batch.content_hash():
            return Seen.CONFLICT, None
        return Seen.DUPLICATE, result

    def apply(self, batch: Batch) -> BatchResult:
        """Book every line that may be booked; refuse the others with a reason."""
        assert batch.batch_id not in self._batches, "a batch id is booked once"

        rejected = []
        for line in batch.lines:
            rejection = self._refuse(line)
            if rejection is not None:
                rejected.append(rejection)
                continue
            position = self.positions.setdefault((line.sku, line.location), Position())
            position.on_hand += line.on_hand_delta
            position.held += line.held_delta
            self._applied_line_ids.add(line.line_id)

        result = BatchResult(
            batch_id=batch.batch_id,
            applied_lines=len(batch.lines) - len(rejected),
            rejected=tuple(rejected),
        )
        self._batches[batch.batch_id] = (batch.content_hash(), result)
        self.last_batch_id = batch.batch_id
        if batch.stream:
            self.last_batch_ids[batch.stream] = batch.batch_id
        self.batches_applied += 1
        self.lines_applied += result.applied_lines
        logger.debug(
            "batch booked: batch_id=%s applied=%d rejected=%d",
            batch.batch_id,
            result.applied_lines,
            len(rejected),
        )
        return result

    def count_on_hand(self, counts: list[tuple[str, str, int]]) -> None:
        """Overwrite on-hand with a stock count; held stays as booked."""
        for sku, location, on_hand in counts:
            self.positions.setdefault((sku, location), Position()).on_hand = on_hand

    def ledger_json(self) -> dict[str, object]:
        """Positions and per-stream progress as of one instant.

        Built without an await, so on the event loop no batch can be booked between
        reading the positions and reading `last_batch_ids`: the two always agree.
        """
        return {
            "positions": [
                {"sku": sku, "location": location, "on_hand": p.on_hand, "held": p.held}
                for (sku, location), p in sorted(self.positions.items())
            ],
            "last_batch_id": self.last_batch_id,
            "last_batch_ids": dict(sorted(self.last_batch_ids.items())),
            "batches_applied": self.batches_applied,
            "lines_applied": self.lines_applied,
        }

    def _refuse(self, line: Line) -> Rejection | None:
        if line.line_id in self._applied_line_ids:
            return Rejection(
                line.line_id,
                Reason.LINE_ALREADY_APPLIED,
                "this line id was booked by an earlier batch",
            )
        if self.known_skus and line.sku not in self.known_skus:
            return Rejection(
                line.line_id,
                Reason.UNKNOWN_ITEM,
                f"sku {line.sku} is not in the item master",
            )
        if line.location in self.closed_locations:
            return Rejection(
                line.line_id,
                Reason.PERIOD_CLOSED,
                f"the period of location {line.location} is closed",
            )
        return None
