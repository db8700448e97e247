"""Retention of write-ahead records: which ones may go, deleted a chunk at a time.

Design note. A record of a shard may be deleted only when all of these hold:

1. the newest complete checkpoint covers it (seq <= its seq for the shard), because
   recovery loads that checkpoint and replays every record after it;
2. Postgres committed it longer ago than the retention, so that an operator can still
   read what happened and an ERP that was down can still be reconciled;
3. every ERP bridge has had it acknowledged (seq <= the lowest acked_seq among the
   shard's bridge_cursors rows), because a bridge reads the records it still has to
   send from this table.

With no bridge_cursors row for a shard, rule 3 allows everything: a server that feeds
no ERP keeps records only as long as rules 1 and 2 ask. A bridge started for the first
time after records were deleted starts from what is left; it cannot be fed what is gone.

Deletion takes the oldest records first and stops at the first one too young, so what
remains of a shard is always one unbroken run of seqs: reconciliation tells that records
it needs were deleted by looking at the first one alone.
"""

import asyncio
import logging

import asyncpg

log = logging.getLogger(__name__)

# Rows deleted per statement: one statement stays near a hundred milliseconds and its
# locks short, so the writers' inserts into the same table never wait long.
_CHUNK_ROWS = 10_000

# What rules 1 and 3 allow: the newest complete checkpoint's seq for the shard (NULL
# without one: then nothing may go) and the lowest seq a bridge acknowledged (NULL
# without a bridge: then rule 3 sets no limit).
_BOUNDS = """
SELECT
    (SELECT shard_seqs[$1 + 1] FROM checkpoints WHERE complete ORDER BY id DESC LIMIT 1)
        AS checkpoint_seq,
    (SELECT min(acked_seq) FROM bridge_cursors WHERE shard = $1) AS acked_seq
"""

# The oldest records up to the bound, cut off at the first one committed too recently,
# so that a shard keeps an unbroken run of seqs even if Postgres's clock stepped back.
_DELETE_CHUNK = """
WITH head AS (
    SELECT seq, committed_at < now() - make_interval(secs => $3) AS is_old
    FROM wal_records
    WHERE shard = $1 AND seq <= $2
    ORDER BY seq
    LIMIT $4
), prefix AS (
    SELECT seq FROM (
        SELECT seq, bool_and(is_old) OVER (ORDER BY seq) AS all_old FROM head
    ) AS run
    WHERE all_old
)
DELETE FROM wal_records
WHERE shard = $1 AND seq IN (SELECT seq FROM prefix)
"""


async def prune_shard(
    conn: asyncpg.Connection,
    *,
    shard: int,
    retention_s: int,
    records_max: int,
    timeout_s: float,
) -> int:
    """Delete up to records_max of a shard's records that all three rules allow;
    returns how many went. Each chunk is its own transaction with its own bound, so a
    checkpoint or a bridge moving on meanwhile only lets later chunks go further.

    committed_at is Postgres's time, so the age is measured on Postgres's clock too,
    not on the server's injected one.
    """
    deleted = 0
    while deleted < records_max:
        chunk_rows = min(_CHUNK_ROWS, records_max - deleted)
        async with asyncio.timeout(timeout_s), conn.transaction():
            bounds = await conn.fetchrow(_BOUNDS, shard)
            if bounds["checkpoint_seq"] is None:
                return deleted
            bound = bounds["checkpoint_seq"]
            if bounds["acked_seq"] is not None:
                bound = min(bound, bounds["acked_seq"])
            status = await conn.execute(
                _DELETE_CHUNK, shard, bound, float(retention_s), chunk_rows
            )
        count = int(status.split()[-1])
        deleted += count
        if count < chunk_rows:
            break
    return deleted
