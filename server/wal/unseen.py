"""What an ERP had not booked when it took a snapshot: the stock lines of each shard's
stream after the last batch it applied, and the lines it refused before that point.

Design note. The ERP applies a shard's batches in stream order, so the last batch it
applied gives a watermark, a StreamPosition: it has seen every line up to there and
none after. Lines up to the watermark that it refused (dead letters still dead or being
retried) it has not booked either. The unseen amount of a position is the sum of both,
taken from the records exactly as the bridge turns them into lines (feed.lines_of), up
to the durable seq of the server's cut. Records committed after the cut are left out,
just as the cut's figures leave them out.
"""

import dataclasses
import logging
from collections.abc import Collection, Sequence
from typing import Any

import asyncpg

from server.engine.errors import FailedPrecondition
from server.wal import codec
from server.wal.feed import RECONCILE_KIND, FeedLine, StreamPosition, lines_of

log = logging.getLogger(__name__)

# Rows fetched per round trip while reading a shard's unseen records.
_PREFETCH_ROWS = 10_000

_FIRST_RECORD = """
SELECT kind, reservation_id, body FROM wal_records WHERE shard = $1 AND seq = $2
"""
# Records after the first unseen one, up to the cut, that touch a counted position.
# Corrections from ERP snapshots are skipped here as lines_of would skip them.
_LATER_RECORDS = """
SELECT seq, kind, reservation_id, body FROM wal_records
WHERE shard = $1 AND seq > $2 AND seq <= $3 AND kind <> $4
  AND EXISTS (
    SELECT 1 FROM jsonb_array_elements(body -> 'fx') AS effect
    WHERE (effect ->> 0, effect ->> 1) IN (SELECT * FROM unnest($5::text[], $6::text[]))
  )
ORDER BY seq
"""
# Lines the ERP refused in batches it got before the watermark, and has not booked.
_REFUSED_LINES = """
SELECT line FROM bridge_dead_letters
WHERE name = $1 AND shard = $2 AND status IN ('dead', 'retrying')
  AND (end_seq, end_line) <= ($3, $4)
"""


@dataclasses.dataclass(slots=True)
class Unseen:
    # (sku, location) -> on-hand delta the ERP has not booked
    on_hand: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    # (channel, sku, location) -> held delta the ERP has not booked
    held: dict[tuple[str, str, str], int] = dataclasses.field(default_factory=dict)
    # Records read past the watermarks, and refused lines counted.
    records: int = 0
    refused_lines: int = 0

    def add(
        self,
        *,
        sku: str,
        location: str,
        channel: str,
        on_hand_delta: int,
        held_delta: int,
    ) -> None:
        at = (sku, location)
        self.on_hand[at] = self.on_hand.get(at, 0) + on_hand_delta
        if held_delta:
            key = (channel, sku, location)
            self.held[key] = self.held.get(key, 0) + held_delta


def check_watermarks(
    watermarks: Sequence[StreamPosition],
    durable_seqs: Sequence[int],
    *,
    records_max: int,
) -> int:
    """Refuse watermarks the cut cannot answer for; returns how many records lie
    between them and the cut."""
    records = 0
    for shard, (watermark, durable_seq) in enumerate(
        zip(watermarks, durable_seqs, strict=True)
    ):
        # A watermark inside record seq + 1 needs that record durable as well.
        needed_seq = watermark.seq + 1 if watermark.line else watermark.seq
        if needed_seq > durable_seq:
            raise FailedPrecondition(
                "WATERMARK_AHEAD",
                f"the ERP reports stream s{shard} applied up to {watermark.seq}."
                f"{watermark.line}, past the last durable record {durable_seq}; "
                "retry once the server has made it durable",
                field="erp_applied_batch_ids",
            )
        records += durable_seq - watermark.seq
    if records > records_max:
        raise FailedPrecondition(
            "ERP_TOO_FAR_BEHIND",
            f"the ERP has {records} records to catch up on; at most {records_max} are "
            "read to compare a snapshot. Compare once the ERP has caught up.",
            field="erp_applied_batch_ids",
        )
    return records


async def read_unseen(
    conn: asyncpg.Connection,
    *,
    bridge: str,
    watermarks: Sequence[StreamPosition],
    durable_seqs: Sequence[int],
    positions: Collection[tuple[str, str]],
) -> Unseen:
    """Sum what the ERP has not booked at the counted positions, from one snapshot of
    Postgres (retention deleting records meanwhile cannot tear it)."""
    unseen = Unseen()
    skus = [sku for sku, _ in positions]
    locations = [location for _, location in positions]
    wanted = set(positions)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        for shard, (watermark, durable_seq) in enumerate(
            zip(watermarks, durable_seqs, strict=True)
        ):
            if durable_seq > watermark.seq:
                await _read_shard(
                    conn,
                    shard=shard,
                    watermark=watermark,
                    durable_seq=durable_seq,
                    skus=skus,
                    locations=locations,
                    unseen=unseen,
                    wanted=wanted,
                )
            if bridge:
                await _read_refused(
                    conn,
                    bridge=bridge,
                    shard=shard,
                    watermark=watermark,
                    unseen=unseen,
                    wanted=wanted,
                )
    return unseen


async def _read_shard(
    conn: asyncpg.Connection,
    *,
    shard: int,
    watermark: StreamPosition,
    durable_seq: int,
    skus: list[str],
    locations: list[str],
    unseen: Unseen,
    wanted: set[tuple[str, str]],
) -> None:
    first_seq = watermark.seq + 1
    first = await conn.fetchrow(_FIRST_RECORD, shard, first_seq)
    if first is None:
        # Retention deletes the oldest records first, so the first one missing means
        # the ERP's whole backlog can no longer be read.
        raise FailedPrecondition(
            "RECORDS_PRUNED",
            f"record {first_seq} of stream s{shard}, the first the ERP has not "
            "applied, is past retention; a full count (plain SetOnHand) is needed",
            field="erp_applied_batch_ids",
        )
    lines = _lines(shard, first_seq, first)
    if watermark.line > len(lines):
        raise FailedPrecondition(
            "WATERMARK_INVALID",
            f"record {first_seq} of stream s{shard} has {len(lines)} lines; the ERP "
            f"reports having applied {watermark.line} of them",
            field="erp_applied_batch_ids",
        )
    _add_lines(lines[watermark.line :], unseen, wanted)
    unseen.records += 1

    rows = conn.cursor(
        _LATER_RECORDS,
        shard,
        first_seq,
        durable_seq,
        RECONCILE_KIND,
        skus,
        locations,
        prefetch=_PREFETCH_ROWS,
    )
    async for row in rows:
        _add_lines(_lines(shard, row["seq"], row), unseen, wanted)
        unseen.records += 1


async def _read_refused(
    conn: asyncpg.Connection,
    *,
    bridge: str,
    shard: int,
    watermark: StreamPosition,
    unseen: Unseen,
    wanted: set[tuple[str, str]],
) -> None:
    rows = await conn.fetch(
        _REFUSED_LINES, bridge, shard, watermark.seq, watermark.line
    )
    for row in rows:
        line = codec.decode(row["line"])
        if (line["sku"], line["location"]) not in wanted:
            continue
        unseen.add(
            sku=line["sku"],
            location=line["location"],
            channel=line["channel"],
            on_hand_delta=line["on_hand_delta"],
            held_delta=line["held_delta"],
        )
        unseen.refused_lines += 1


def _lines(shard: int, seq: int, row: asyncpg.Record) -> list[FeedLine]:
    body: dict[str, Any] = codec.decode(row["body"])
    return lines_of(
        shard=shard,
        seq=seq,
        kind=row["kind"],
        reservation_id=row["reservation_id"],
        body=body,
    )


def _add_lines(
    lines: list[FeedLine], unseen: Unseen, wanted: set[tuple[str, str]]
) -> None:
    for line in lines:
        if (line.sku, line.location) in wanted:
            unseen.add(
                sku=line.sku,
                location=line.location,
                channel=line.channel,
                on_hand_delta=line.on_hand_delta,
                held_delta=line.held_delta,
            )
