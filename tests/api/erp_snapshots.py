"""Shorthands for ERP snapshot tests: what the feed has sent, as the ERP would see it,
and SetOnHand requests that compare a count instead of applying it.

The ERP's own view is rebuilt here from wal_records with feed.lines_of, the same
translation the bridge uses; the bridge tables are written directly, as the bridge
itself is a separate process.
"""

import dataclasses
from collections.abc import Sequence

import asyncpg

from server.engine.shard import shard_of
from server.wal import codec
from server.wal.feed import FeedLine, StreamPosition, batch_id, lines_of
from stockward.v1 import admin_pb2
from tests.conftest import Running

BRIDGE = "erp"
SHARDS = 3


@dataclasses.dataclass(frozen=True, slots=True)
class Count:
    sku: str
    location: str
    on_hand: int
    # channel -> held
    held: tuple[tuple[str, int], ...] = ()


async def stream(conn: asyncpg.Connection, shard: int) -> list[FeedLine]:
    """Every line of a shard's stream, in order, as the bridge sends them."""
    rows = await conn.fetch(
        "SELECT seq, kind, reservation_id, body FROM wal_records WHERE shard = $1 "
        "ORDER BY seq",
        shard,
    )
    lines: list[FeedLine] = []
    for row in rows:
        lines.extend(
            lines_of(
                shard=shard,
                seq=row["seq"],
                kind=row["kind"],
                reservation_id=row["reservation_id"],
                body=codec.decode(row["body"]),
            )
        )
    return lines


async def last_seqs(conn: asyncpg.Connection) -> list[int]:
    rows = await conn.fetch(
        "SELECT shard, max(seq) AS seq FROM wal_records GROUP BY shard"
    )
    seqs = [0] * SHARDS
    for row in rows:
        seqs[row["shard"]] = row["seq"]
    return seqs


def seen(line: FeedLine, watermark: StreamPosition) -> bool:
    """Whether a line is at or before a watermark (see feed.StreamPosition)."""
    if line.seq <= watermark.seq:
        return True
    return line.seq == watermark.seq + 1 and line.index < watermark.line


def applied_ids(watermarks: Sequence[StreamPosition]) -> list[str]:
    """The ids of batches ending at each watermark, as the ERP reports them; a shard
    at (0, 0) has applied nothing and gets no id."""
    return [
        batch_id(BRIDGE, shard, StreamPosition(0), watermark)
        for shard, watermark in enumerate(watermarks)
        if watermark > StreamPosition(0)
    ]


def erp_view(
    lines_by_shard: Sequence[Sequence[FeedLine]],
    watermarks: Sequence[StreamPosition],
    *,
    sku: str,
    location: str,
    channel: str = "",
) -> tuple[int, int]:
    """(on_hand, held of channel) as the ERP books them: every line up to each
    shard's watermark, starting from nothing."""
    on_hand = held = 0
    for shard, lines in enumerate(lines_by_shard):
        for line in lines:
            if (line.sku, line.location) != (sku, location):
                continue
            if not seen(line, watermarks[shard]):
                continue
            on_hand += line.on_hand_delta
            if line.channel == channel:
                held += line.held_delta
    return on_hand, held


def snapshot_request(
    event_id: str,
    counts: Sequence[Count],
    batch_ids: Sequence[str] = (),
    *,
    apply_correction: bool = False,
) -> admin_pb2.SetOnHandRequest:
    return admin_pb2.SetOnHandRequest(
        source="erp",
        source_event_id=event_id,
        counts=[
            admin_pb2.OnHandCount(
                sku=count.sku,
                location=count.location,
                on_hand=count.on_hand,
                held_by_channel=[
                    admin_pb2.ChannelHeld(channel=channel, held=held)
                    for channel, held in count.held
                ],
            )
            for count in counts
        ],
        erp_applied_batch_ids=batch_ids,
        erp_snapshot=True,
        apply_correction=apply_correction,
    )


async def compare(
    server: Running,
    event_id: str,
    counts: Sequence[Count],
    batch_ids: Sequence[str] = (),
    *,
    apply_correction: bool = False,
) -> admin_pb2.SetOnHandResponse:
    response: admin_pb2.SetOnHandResponse = await server.admin.SetOnHand(
        snapshot_request(event_id, counts, batch_ids, apply_correction=apply_correction)
    )
    return response


def differences(
    response: admin_pb2.SetOnHandResponse,
) -> dict[tuple[str, str, str], int]:
    """(sku, location, channel) -> difference, for every figure compared."""
    return {
        (item.sku, item.location, item.channel): item.difference
        for item in response.divergences
    }


async def report(conn: asyncpg.Connection) -> dict[tuple[str, str, str], int]:
    """The stored divergence report: (sku, location, channel) -> difference."""
    rows = await conn.fetch(
        "SELECT sku, location, channel, difference FROM erp_divergence"
    )
    return {(r["sku"], r["location"], r["channel"]): r["difference"] for r in rows}


async def add_dead_letter(
    conn: asyncpg.Connection,
    *,
    line: FeedLine,
    end: StreamPosition,
    status: str,
) -> None:
    """A line the ERP refused in the batch ending at `end`, as the bridge stores it."""
    await conn.execute(
        "INSERT INTO bridge_dead_letters (name, shard, batch_id, end_seq, end_line, "
        "line_id, line, reason, message, status) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, 'SKU_BLOCKED', 'blocked', $8)",
        BRIDGE,
        line.shard,
        batch_id(BRIDGE, line.shard, StreamPosition(0), end),
        end.seq,
        end.line,
        f"{BRIDGE}.s{line.shard}.{line.seq}.{line.index}",
        codec.encode(
            {
                "line_id": f"{BRIDGE}.s{line.shard}.{line.seq}.{line.index}",
                "sku": line.sku,
                "location": line.location,
                "on_hand_delta": line.on_hand_delta,
                "held_delta": line.held_delta,
                "reservation_id": line.reservation_id,
                "channel": line.channel,
                "kind": line.kind,
            }
        ),
        status,
    )


def home_shard(sku: str) -> int:
    return shard_of(sku, SHARDS)
