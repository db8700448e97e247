"""What a write-ahead record means to the systems fed from it: its stock lines, and
the positions in a shard's stream that batches of those lines cover.

Design note. Every record of a shard turns into zero or more lines, one per stock
effect (`fx`) with a non-zero change, in the order the record lists them. A shard's
stream is the concatenation of those lines in seq order, so a place in it is a
`StreamPosition` (seq, line): every record up to `seq` is covered, plus the first
`line` lines of record seq + 1. A batch covers the lines from one position to a later
one, and its id is made of those two positions, so the same stretch of stream always
gets the same id: a resend after a crash or timeout is recognised by the ERP. The
bridge and the server's reconciliation both read records through `lines_of`, so they
can never disagree on what the ERP was sent.

Records of kind `reconcile` make stockward agree with a count the ERP itself took;
they yield no lines, since sending them back would move the ERP by the same amount a
second time.
"""

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

# Corrections that come from the ERP's own counts; never fed back to it.
RECONCILE_KIND = "reconcile"

# A bridge name is part of every batch and line id: short and plain, so that ids stay
# within the 128 characters an ERP is typically willing to store.
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,23}")

# A batch the ERP refused one line of goes again without it under `<id>.x<n>`, n the
# lines taken out; it covers the same stretch.
REDUCED_MARK = ".x"

_BATCH_ID = re.compile(
    r"(?P<name>[a-z][a-z0-9_-]{0,23})\.s(?P<shard>\d{1,4})\."
    r"(?P<seq_a>\d{1,19})\.(?P<line_a>\d{1,6})-(?P<seq_b>\d{1,19})\.(?P<line_b>\d{1,6})"
    r"(?:\.x\d{1,6})?"
)


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class StreamPosition:
    """Records up to `seq` covered, plus the first `line` lines of record seq + 1."""

    seq: int
    line: int = 0

    def __post_init__(self) -> None:
        if self.seq < 0 or self.line < 0:
            raise ValueError(f"stream positions are never negative: {self}")


@dataclasses.dataclass(frozen=True, slots=True)
class FeedLine:
    """One stock effect of one record, as the ERP is told of it."""

    shard: int
    seq: int
    # Index among the record's lines (not among its fx: zero effects are skipped).
    index: int
    kind: str
    sku: str
    location: str
    on_hand_delta: int
    held_delta: int
    reservation_id: str
    channel: str


def lines_of(
    *, shard: int, seq: int, kind: str, reservation_id: str, body: Mapping[str, Any]
) -> list[FeedLine]:
    """The lines a committed record contributes to its shard's stream."""
    if kind == RECONCILE_KIND:
        return []
    reservation = body.get("rsv")
    channel = reservation["channel"] if reservation else ""
    lines: list[FeedLine] = []
    for sku, location, on_hand_delta, held_delta in body.get("fx", ()):
        # A zero effect only makes a position known to stockward's own recovery.
        if on_hand_delta == 0 and held_delta == 0:
            continue
        lines.append(
            FeedLine(
                shard=shard,
                seq=seq,
                index=len(lines),
                kind=kind,
                sku=sku,
                location=location,
                on_hand_delta=on_hand_delta,
                held_delta=held_delta,
                reservation_id=reservation_id,
                channel=channel,
            )
        )
    return lines


def stream_name(name: str, shard: int) -> str:
    return f"{name}.s{shard}"


def line_id(name: str, line: FeedLine) -> str:
    """Stable across any batching: the ERP's per-line dedupe relies on it."""
    return f"{stream_name(name, line.shard)}.{line.seq}.{line.index}"


def batch_id(name: str, shard: int, start: StreamPosition, end: StreamPosition) -> str:
    """The id of the batch covering the lines after `start` up to `end`."""
    if not start < end:
        raise ValueError(f"a batch covers something: {start} must precede {end}")
    return f"{stream_name(name, shard)}.{start.seq}.{start.line}-{end.seq}.{end.line}"


@dataclasses.dataclass(frozen=True, slots=True)
class BatchCoverage:
    name: str
    shard: int
    start: StreamPosition
    end: StreamPosition


def parse_batch_id(value: str) -> BatchCoverage | None:
    """What a stream batch id covers; None if it is not one (a dead-letter retry)."""
    match = _BATCH_ID.fullmatch(value)
    if match is None:
        return None
    start = StreamPosition(int(match["seq_a"]), int(match["line_a"]))
    end = StreamPosition(int(match["seq_b"]), int(match["line_b"]))
    if not start < end:
        return None
    return BatchCoverage(match["name"], int(match["shard"]), start, end)
