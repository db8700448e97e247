"""Recovery: rebuild exactly the acknowledged state from Postgres.

Design note. An answer that reports a change is sent only after the change's record
committed, so the committed records are the acknowledged state, plus at most some
records whose answers were lost in a crash (those callers retry with the same request
id and get the stored answer). Recovery loads the newest complete checkpoint, replays
each shard's records after it in seq order, loads the request log inside the retention
window, and checks the same invariants as before every write.

The cases, each covered by tests/wal/test_recovery.py:

| case                                         | recovered state                       |
|----------------------------------------------|---------------------------------------|
| empty database                               | empty engine, seqs start at 1         |
| records, no checkpoint                       | replay of every record                |
| checkpoint, no later records                 | the checkpoint                        |
| checkpoint plus later records                | checkpoint, then the later records    |
| incomplete checkpoint (crash while storing)  | ignored; previous checkpoint or none  |
| crash between COMMIT and the answer          | the record is there; retry replays it |
| crash before COMMIT                          | nothing of it; retry decides anew     |
| records that disagree with reservations      | refuse to start (InvariantBroken)     |
| a gap in a shard's seqs                      | refuse to start (InvariantBroken)     |
"""

import logging
import time

import asyncpg

from server.clock import Clock
from server.engine.engine import US_PER_S, Engine
from server.engine.limits import Limits
from server.wal import codec
from server.wal.schema import WRITE_FENCE_LOCK, WRITE_FENCE_UNLOCK

log = logging.getLogger(__name__)

# Rows fetched per round trip while streaming; bounds memory, keeps round trips few.
_PREFETCH_ROWS = 10_000


async def recover(
    conn: asyncpg.Connection,
    *,
    shard_count: int,
    clock: Clock,
    limits: Limits,
    idempotency_retention_s: int,
) -> Engine:
    started = time.perf_counter()
    engine = Engine(
        shard_count=shard_count,
        clock=clock,
        limits=limits,
        idempotency_retention_s=idempotency_retention_s,
    )
    # Take the fence before the snapshot: a repeatable-read snapshot starts with its
    # first statement, and must not start before a late commit has landed.
    await conn.execute(WRITE_FENCE_LOCK)
    try:
        replayed = await _load(
            conn, engine, shard_count, clock, idempotency_retention_s
        )
    finally:
        await conn.execute(WRITE_FENCE_UNLOCK)
    engine.finish_recovery()
    stats = engine.stats()
    log.info(
        "recovered: reservations=%d active=%d positions=%d replayed=%d requests=%d ms=%.0f",
        stats.reservations,
        stats.active_reservations,
        stats.positions,
        replayed,
        stats.remembered_requests,
        (time.perf_counter() - started) * 1000,
    )
    return engine


async def _load(
    conn: asyncpg.Connection,
    engine: Engine,
    shard_count: int,
    clock: Clock,
    idempotency_retention_s: int,
) -> int:
    """Checkpoint, records and request log, all from one snapshot; returns how many
    records were replayed."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        seqs = await _load_checkpoint(conn, engine, shard_count)
        replayed = 0
        for shard, after_seq in enumerate(seqs):
            cursor = conn.cursor(
                "SELECT seq, body FROM wal_records WHERE shard = $1 AND seq > $2 "
                "ORDER BY seq",
                shard,
                after_seq,
                prefetch=_PREFETCH_ROWS,
            )
            async for row in cursor:
                engine.replay_record(shard, row["seq"], codec.decode(row["body"]))
                replayed += 1
        horizon_us = clock.now_us() - idempotency_retention_s * US_PER_S
        requests = conn.cursor(
            "SELECT scope, request_id, fingerprint, result, created_us FROM request_log "
            "WHERE created_us >= $1 ORDER BY created_us",
            horizon_us,
            prefetch=_PREFETCH_ROWS,
        )
        async for row in requests:
            engine.restore_request(
                scope=row["scope"],
                request_id=row["request_id"],
                fingerprint_=row["fingerprint"],
                result=row["result"],
                created_us=row["created_us"],
            )
    return replayed


async def _load_checkpoint(
    conn: asyncpg.Connection, engine: Engine, shard_count: int
) -> list[int]:
    checkpoint = await conn.fetchrow(
        "SELECT id, shard_seqs, policies FROM checkpoints WHERE complete "
        "ORDER BY id DESC LIMIT 1"
    )
    if checkpoint is None:
        return [0] * shard_count
    positions = conn.cursor(
        "SELECT sku, location, on_hand, held FROM checkpoint_positions "
        "WHERE checkpoint_id = $1",
        checkpoint["id"],
        prefetch=_PREFETCH_ROWS,
    )
    async for row in positions:
        engine.restore_position(
            row["sku"], row["location"], row["on_hand"], row["held"]
        )
    reservations = conn.cursor(
        "SELECT body FROM checkpoint_reservations WHERE checkpoint_id = $1",
        checkpoint["id"],
        prefetch=_PREFETCH_ROWS,
    )
    async for row in reservations:
        engine.restore_reservation(codec.decode(row["body"]))
    engine.restore_policies(codec.decode(checkpoint["policies"]))
    seqs: list[int] = list(checkpoint["shard_seqs"])
    for shard, seq in enumerate(seqs):
        engine.restore_seq(shard, seq)
    return seqs
