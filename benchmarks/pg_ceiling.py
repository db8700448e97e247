"""How many write-ahead rows this machine's Postgres takes per second: the ceiling
under stockward's durable throughput.

Design note. stockward makes a reservation durable by COPYing its record into
wal_records, many records to a transaction, one writer per shard (server/wal/
writer.py). This measures that write with nothing else around it: a scratch table
with wal_records' columns and primary key (server/wal/schema.py), rows shaped like a
one-line Reserve's record (the same kinds of ids, a body of the same JSON shape and
size), COPY'd in transactions of `batch_rows` rows on ONE connection, so one shard
writer's ceiling. Commits are as durable as the server makes them. Each batch is
built before its clock starts: the figure is Postgres's (and the driver's), not our
JSON encoding's. The table is dropped afterwards, and the schema too if this made it.

Expected: per row, Postgres parses a binary COPY tuple, turns about 350 bytes of JSON
into jsonb, writes a heap tuple and its WAL and inserts into the primary key: about
8 us of one core, so some 125,000 rows per second; the driver's encoding overlaps
partly, and one WAL flush per 1,000 rows adds 0.1 to 2 us a row. So about 100,000
rows per second, the EXPECTED_ROWS_PER_S reported beside the measurement.

Known shortcomings: stockward also writes one request_log row per answered request in
the same transaction (an array INSERT), so its own ceiling per reservation sits
below this figure; and it runs a writer per shard, so on a machine with cores to
spare its total can exceed this single-connection figure.

Run: python -m benchmarks.pg_ceiling --rows 200000 --batch 1000
"""

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import secrets
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from server.config import DEFAULT_DATABASE_URL
from server.engine.errors import ensure

log = logging.getLogger(__name__)

# See the module docstring for how this was estimated.
EXPECTED_ROWS_PER_S = 100_000
SCHEMA_DEFAULT = "bench_ceiling"
# stockward's default shard count: rows spread over this many streams, as its records
# are, so the primary key sees the same interleaving of (shard, seq).
SHARDS = 4
# A COPY above this many rows is a bulk load, not a commit batch; stockward's own
# batches stop at 1,000 (server/config.py).
BATCH_ROWS_MAX = 100_000
# Connecting includes authentication.
CONNECT_TIMEOUT_S = 10.0
# One batch, COPY and commit: a hundred thousand rows take about a second, so thirty
# means Postgres has stalled.
BATCH_TIMEOUT_S = 30.0
# Creating and dropping the scratch table and schema.
DDL_TIMEOUT_S = 10.0

# wal_records' columns and key, as server/wal/schema.py makes them.
SCRATCH_TABLE_DDL = """
CREATE TABLE {table} (
    shard smallint NOT NULL,
    seq bigint NOT NULL,
    kind text NOT NULL,
    reservation_id text NOT NULL,
    body jsonb NOT NULL,
    recorded_us bigint NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (shard, seq)
)
"""
# committed_at is left to its default, as the writer leaves it.
_COPIED_COLUMNS = ("shard", "seq", "kind", "reservation_id", "body", "recorded_us")


@dataclasses.dataclass(frozen=True, slots=True)
class CeilingResult:
    # Rows made durable per second of time spent in COPY and commit.
    rows_per_s: float
    # Transactions committed.
    batches: int
    # Time spent in COPY and commit, summed over batches.
    elapsed_s: float


async def measure_insert_ceiling(
    database_url: str, schema: str, *, rows_total: int, batch_rows: int
) -> CeilingResult:
    """COPY rows_total write-ahead-shaped rows in transactions of batch_rows rows on
    one connection into a scratch table in `schema`, then drop the table."""
    if rows_total < 1:
        raise ValueError(f"rows_total is {rows_total}; it must be at least 1")
    if not 1 <= batch_rows <= BATCH_ROWS_MAX:
        raise ValueError(
            f"batch_rows is {batch_rows}; it must be from 1 to {BATCH_ROWS_MAX}"
        )

    table = f"ceiling_scratch_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(database_url, timeout=CONNECT_TIMEOUT_S)
    try:
        made_schema = await _create_scratch(conn, schema=schema, table=table)
        try:
            return await _copy_batches(
                conn,
                schema=schema,
                table=table,
                rows_total=rows_total,
                batch_rows=batch_rows,
            )
        finally:
            await _drop_scratch(
                conn, schema=schema, table=table, drop_schema=made_schema
            )
    finally:
        await conn.close()


async def _create_scratch(conn: asyncpg.Connection, *, schema: str, table: str) -> bool:
    """Make the scratch table; True when the schema was made for it too."""
    async with asyncio.timeout(DDL_TIMEOUT_S):
        schema_existed = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", schema
        )
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_quoted(schema)}")
        await conn.execute(SCRATCH_TABLE_DDL.format(table=_qualified(schema, table)))
        settings = await conn.fetchrow(
            "SELECT current_setting('fsync') AS fsync, "
            "current_setting('synchronous_commit') AS synchronous_commit"
        )
    log.info(
        "ceiling table made: table=%s.%s fsync=%s synchronous_commit=%s",
        schema,
        table,
        settings["fsync"],
        settings["synchronous_commit"],
    )
    return not schema_existed


async def _copy_batches(
    conn: asyncpg.Connection,
    *,
    schema: str,
    table: str,
    rows_total: int,
    batch_rows: int,
) -> CeilingResult:
    elapsed_s = 0.0
    batches = 0
    for first in range(0, rows_total, batch_rows):
        rows = _rows(first, min(batch_rows, rows_total - first))

        started = time.perf_counter()
        async with asyncio.timeout(BATCH_TIMEOUT_S), conn.transaction():
            await conn.copy_records_to_table(
                table, schema_name=schema, records=rows, columns=_COPIED_COLUMNS
            )
        elapsed_s += time.perf_counter() - started
        batches += 1

    ensure(elapsed_s > 0, "committed batches took no time")
    return CeilingResult(
        rows_per_s=rows_total / elapsed_s, batches=batches, elapsed_s=elapsed_s
    )


async def _drop_scratch(
    conn: asyncpg.Connection, *, schema: str, table: str, drop_schema: bool
) -> None:
    async with asyncio.timeout(DDL_TIMEOUT_S):
        await conn.execute(f"DROP TABLE IF EXISTS {_qualified(schema, table)}")
        if drop_schema:
            # RESTRICT: whatever someone else put there meanwhile stays, and says so.
            await conn.execute(f"DROP SCHEMA IF EXISTS {_quoted(schema)} RESTRICT")
    log.info("ceiling table dropped: table=%s.%s", schema, table)


def _rows(first: int, count: int) -> list[tuple[Any, ...]]:
    """Rows numbered first.., each like the record of a one-line Reserve."""
    now_us = time.time_ns() // 1_000
    return [_row(number, now_us) for number in range(first, first + count)]


def _row(number: int, now_us: int) -> tuple[Any, ...]:
    reservation_id = f"r{number:024x}"
    sku = f"SKU-{number % 10_000:05d}"
    body = {
        "fx": [[sku, "DC-EAST", 0, 1]],
        "rsv": {
            "id": reservation_id,
            "channel": "web",
            "order_ref": f"order-{number}",
            "state": "pending",
            "lines": [[sku, "DC-EAST", 1, 1, 0, 0]],
            "created_us": now_us,
            "updated_us": now_us,
            "expires_us": now_us + 900_000_000,
            "home_shard": number % SHARDS,
        },
    }
    shard = number % SHARDS
    seq = number // SHARDS + 1
    return (shard, seq, "reserve", reservation_id, json.dumps(body), now_us)


def _quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _qualified(schema: str, table: str) -> str:
    return f"{_quoted(schema)}.{_quoted(table)}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="COPY write-ahead-shaped rows into Postgres and report rows/s"
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("STOCKWARD_DATABASE_URL", DEFAULT_DATABASE_URL),
    )
    parser.add_argument("--schema", default=SCHEMA_DEFAULT)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1_000)
    options = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    result = asyncio.run(
        measure_insert_ceiling(
            options.database_url,
            options.schema,
            rows_total=options.rows,
            batch_rows=options.batch,
        )
    )
    print(
        f"pg insert ceiling: rows={options.rows} batch_rows={options.batch} "
        f"batches={result.batches} elapsed_s={result.elapsed_s:.2f} "
        f"rows_per_s={result.rows_per_s:,.0f} "
        f"(expected about {EXPECTED_ROWS_PER_S:,}; measured/expected "
        f"{result.rows_per_s / EXPECTED_ROWS_PER_S:.2f})"
    )


if __name__ == "__main__":
    main()
