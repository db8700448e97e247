"""Checkpoints: the engine's state as of one seq per shard, so recovery replays little.

The ledger takes the rows while no write is in flight (see Engine.checkpoint_rows); this
module only stores them. A checkpoint counts once its row says complete, and older
checkpoints are dropped in the same transaction.

Records the newest checkpoint covers stay until retention (retention.py) deletes them.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import asyncpg

from server.wal import codec

log = logging.getLogger(__name__)

# Rows encoded between two turns of the event loop: a few milliseconds of work.
_ROWS_PER_TURN = 2_000
Row = TypeVar("Row")


async def store_checkpoint(
    conn: asyncpg.Connection,
    *,
    positions: list[tuple[str, str, int, int]],
    reservations: list[dict[str, Any]],
    shard_seqs: list[int],
    policies: dict[str, Any],
    created_us: int,
    request_horizon_us: int,
) -> int:
    """Store a checkpoint and drop what it makes unnecessary: older checkpoints and
    answers past their retention (the engine forgets those too)."""
    started = time.perf_counter()
    async with conn.transaction():
        checkpoint_id: int = await conn.fetchval(
            "INSERT INTO checkpoints (created_us, shard_seqs, policies) "
            "VALUES ($1, $2, $3) RETURNING id",
            created_us,
            shard_seqs,
            codec.encode(policies),
        )
        await conn.copy_records_to_table(
            "checkpoint_positions",
            records=_yielding(positions, lambda row: (checkpoint_id, *row)),
            columns=("checkpoint_id", "sku", "location", "on_hand", "held"),
        )
        await conn.copy_records_to_table(
            "checkpoint_reservations",
            records=_yielding(
                reservations, lambda body: (checkpoint_id, codec.encode(body))
            ),
            columns=("checkpoint_id", "body"),
        )
        await conn.execute(
            "UPDATE checkpoints SET complete = true WHERE id = $1", checkpoint_id
        )
        await conn.execute("DELETE FROM checkpoints WHERE id < $1", checkpoint_id)
        await conn.execute(
            "DELETE FROM request_log WHERE created_us < $1", request_horizon_us
        )
    log.info(
        "checkpoint stored: id=%d positions=%d reservations=%d ms=%.0f",
        checkpoint_id,
        len(positions),
        len(reservations),
        (time.perf_counter() - started) * 1000,
    )
    return checkpoint_id


async def _yielding(
    rows: Sequence[Row], to_record: Callable[[Row], tuple[Any, ...]]
) -> AsyncIterator[tuple[Any, ...]]:
    """Records for COPY, giving the event loop a turn every few thousand: encoding
    a million rows in one go would hold every request up for a second or more."""
    for start in range(0, len(rows), _ROWS_PER_TURN):
        for row in rows[start : start + _ROWS_PER_TURN]:
            yield to_record(row)
        await asyncio.sleep(0)
