"""Turning a stretch of a shard's stream into one ERP batch: where it ends, and its
lines, netted per position or passed through.

Everything here is a pure function of the records and the configuration, so the same
stretch always yields the same batch: the id names the stretch, and a resend after a
crash carries exactly the content the ERP may already hold under that id.
"""

import dataclasses
from collections.abc import Sequence

from erp_bridge.adapters import ErpBatch, ErpLine, Feed
from erp_bridge.reader import StreamRecord
from server.engine.errors import ensure
from server.wal.feed import (
    REDUCED_MARK,
    FeedLine,
    StreamPosition,
    batch_id,
    line_id,
    stream_name,
)

# The kind of a netted line: it sums the effects of several commitments.
NET_KIND = "net"


@dataclasses.dataclass(frozen=True, slots=True)
class Stretch:
    """The lines from `start` (exclusive) to `end`, and the oldest commit among them."""

    start: StreamPosition
    end: StreamPosition
    lines: tuple[FeedLine, ...]
    oldest_committed_us: int


def take(
    records: Sequence[StreamRecord], start: StreamPosition, *, lines_max: int
) -> Stretch | None:
    """The longest stretch after `start` of at most lines_max lines.

    Records without lines are taken along for free, so the cursor passes policy
    changes too. A record with more lines than fit is split; the next stretch starts
    inside it. None when there is nothing after `start`.
    """
    ensure(lines_max > 0, "a batch needs room for a line")
    lines: list[FeedLine] = []
    end = start
    oldest_us = 0
    for record in records:
        first = start.line if record.seq == start.seq + 1 else 0
        room = lines_max - len(lines)
        if room == 0 and len(record.lines) > first:
            break
        oldest_us = oldest_us or record.committed_us
        chunk = record.lines[first : first + room]
        lines.extend(chunk)
        if first + len(chunk) < len(record.lines):
            end = StreamPosition(record.seq - 1, first + len(chunk))
            break
        end = StreamPosition(record.seq, 0)

    if end == start:
        return None
    ensure(start < end, f"stretch runs backwards: {start} -> {end}")
    return Stretch(start, end, tuple(lines), oldest_us)


def build(*, name: str, shard: int, feed: Feed, stretch: Stretch) -> ErpBatch:
    """The batch for a stretch; positions feed batches may have fewer lines (or none)."""
    id_ = batch_id(name, shard, stretch.start, stretch.end)
    for line in stretch.lines:
        ensure(
            line.shard == shard, f"line of shard {line.shard} in a shard {shard} batch"
        )
    if feed is Feed.LEDGER:
        lines = tuple(_passed_through(name, line) for line in stretch.lines)
    else:
        lines = _netted(id_, stretch.lines)
    return ErpBatch(
        batch_id=id_, stream=stream_name(name, shard), feed=feed, lines=lines
    )


def _passed_through(name: str, line: FeedLine) -> ErpLine:
    return ErpLine(
        line_id=line_id(name, line),
        sku=line.sku,
        location=line.location,
        on_hand_delta=line.on_hand_delta,
        held_delta=line.held_delta,
        reservation_id=line.reservation_id,
        channel=line.channel,
        kind=line.kind,
    )


def _netted(batch_id_: str, lines: Sequence[FeedLine]) -> tuple[ErpLine, ...]:
    """One line per (sku, location) with the summed deltas, in sorted order; positions
    whose changes cancel out are left out."""
    sums: dict[tuple[str, str], list[int]] = {}
    for line in lines:
        deltas = sums.setdefault((line.sku, line.location), [0, 0])
        deltas[0] += line.on_hand_delta
        deltas[1] += line.held_delta

    netted: list[ErpLine] = []
    for (sku, location), (on_hand_delta, held_delta) in sorted(sums.items()):
        if on_hand_delta == 0 and held_delta == 0:
            continue
        netted.append(
            ErpLine(
                line_id=f"{batch_id_}.{len(netted)}",
                sku=sku,
                location=location,
                on_hand_delta=on_hand_delta,
                held_delta=held_delta,
                reservation_id="",
                channel="",
                kind=NET_KIND,
            )
        )
    return tuple(netted)


def without_line(batch: ErpBatch, index: int) -> ErpBatch:
    """The batch less one line the ERP refused as invalid, under an id of its own
    (`<id>.x1`, `<id>.x2`, ...): an ERP that remembers even refused batch ids must not
    see other content under the first one. The ERP refuses the same lines in the same
    order after a restart, so the ids stay deterministic."""
    ensure(0 <= index < len(batch.lines), f"line {index} of {len(batch.lines)}")
    lines = batch.lines[:index] + batch.lines[index + 1 :]
    base, _, removed = batch.batch_id.partition(REDUCED_MARK)
    count = int(removed) + 1 if removed else 1
    return dataclasses.replace(
        batch, batch_id=f"{base}{REDUCED_MARK}{count}", lines=lines
    )


def stretch_to(
    records: Sequence[StreamRecord], start: StreamPosition, end: StreamPosition
) -> Stretch:
    """The stretch from `start` to a planned `end`, rebuilt after a restart exactly as
    it was planned, whatever lines_max says now."""
    ensure(start < end, f"planned stretch {start} -> {end} covers nothing")
    lines: list[FeedLine] = []
    oldest_us = 0
    for record in records:
        first = start.line if record.seq == start.seq + 1 else 0
        oldest_us = oldest_us or record.committed_us
        if record.seq == end.seq + 1:
            ensure(end.line <= len(record.lines), f"{end} past record {record.seq}")
            lines.extend(record.lines[first : end.line])
            break
        ensure(record.seq <= end.seq, f"record {record.seq} after the plan's {end}")
        lines.extend(record.lines[first:])
    return Stretch(start, end, tuple(lines), oldest_us)
