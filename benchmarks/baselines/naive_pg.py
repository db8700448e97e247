"""The way most shops do it: one Postgres transaction per reservation.

Design note. Stock lives in a table of its own, one row per (sku, location) with
on_hand and held. A Reserve takes a pooled connection and, in one transaction, runs
a conditional UPDATE per position (held goes up only where on_hand - held still
covers the quantity), inserts the reservation's rows and commits. Row locks make
concurrent holds on one position wait for each other, and the condition is evaluated
again on the row as the earlier transaction left it, so nothing is oversold. When a
position does not cover its quantity, the transaction reads what every position has
and rolls back: all lines or none, answered REJECTED. Positions are updated in sorted
order so that two multi-line holds never wait on each other in a circle.

Commits are durable (synchronous_commit as the server has it, normally on): each
reservation is one fsync of the WAL, shared only with transactions that happen to
commit at the same moment. That, and four round trips per reservation (BEGIN, UPDATE,
INSERT, COMMIT), is what stockward's group commit is measured against. ExecuteBatch
runs each reserve in its own transaction, concurrently over the pool, because that is
what the naive way does with a batch.

Expected: one client in a closed loop pays a gRPC call (~0.5 ms, see noop.py), four
loopback round trips (~0.1 ms each) and a WAL flush (~0.3 ms on a virtual SSD,
milliseconds on a slow disk): about 1.2 ms, so 500 to 1,000 Reserves per second.
Many clients share flushes and the pool's ten connections, and hot rows serialise:
no more than a few thousand per second on a small machine.

Known shortcomings: see benchmarks/baselines/common.py for what no baseline does. The
schema is not locked to one process; two baselines on one schema share its stock.

Run: python -m benchmarks.baselines.naive_pg --listen 127.0.0.1:50062
    --database-url postgresql://postgres@127.0.0.1:5432/test --schema bench_pg
    [--pool-size 10] [--drop-on-exit]
Clean up after a run: drop_schema(database_url, schema), or --drop-on-exit.
"""

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence

import asyncpg

from benchmarks.baselines import common
from benchmarks.baselines.common import Context, Line, Position
from server.api.errors import status_of
from server.config import DEFAULT_DATABASE_URL
from server.engine.errors import EngineError, Unavailable
from stockward.v1 import inventory_pb2

log = logging.getLogger(__name__)

SCHEMA_DEFAULT = "bench_naive_pg"
# Ten: what web frameworks and connection pools commonly ship as their default, so
# this is the shop that did not tune it. Throughput grows with connections only while
# Postgres can share WAL flushes between them and has cores to spare; past a couple
# of connections per core they mostly queue on each other's row locks.
POOL_SIZE_DEFAULT = 10
# A reservation takes milliseconds; one that takes five seconds means Postgres has
# stalled, and the caller is better off with UNAVAILABLE than with a longer wait. One
# budget covers the whole call: waiting for a connection and every statement.
DATABASE_BUDGET_S = 5.0
# Connecting includes authentication, and the pool opens all its connections at once.
CONNECT_TIMEOUT_S = 10.0
# In-flight calls have ended by the time the pool closes; this is a backstop.
POOL_CLOSE_WAIT_S = 5.0

# What a call to Postgres can fail with: server errors, a broken or closed
# connection, the socket, or our own budget running out.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)

DDL = """
CREATE TABLE IF NOT EXISTS stock (
    sku text NOT NULL,
    location text NOT NULL,
    on_hand bigint NOT NULL CHECK (on_hand >= 0),
    held bigint NOT NULL DEFAULT 0 CHECK (held >= 0),
    PRIMARY KEY (sku, location)
);
CREATE TABLE IF NOT EXISTS reservations (
    id bigserial NOT NULL,
    line integer NOT NULL,
    sku text NOT NULL,
    location text NOT NULL,
    quantity bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, line)
);
"""
# A reservation is its rows in `reservations`, one per line, sharing one id.

_HOLD = """
UPDATE stock SET held = held + $3
WHERE sku = $1 AND location = $2 AND on_hand - held >= $3
RETURNING on_hand - held
"""

_AVAILABLE = """
SELECT sku, location, on_hand - held
FROM stock
WHERE (sku, location) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""

_RECORD = """
INSERT INTO reservations (id, line, sku, location, quantity)
SELECT r.id, l.line, l.sku, l.location, l.quantity
FROM (SELECT nextval('reservations_id_seq') AS id) AS r,
    unnest($1::int[], $2::text[], $3::text[], $4::bigint[])
        AS l (line, sku, location, quantity)
RETURNING id
"""

_SET_ON_HAND = """
INSERT INTO stock (sku, location, on_hand)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])
ON CONFLICT (sku, location) DO UPDATE SET on_hand = excluded.on_hand
RETURNING sku, location, on_hand, held
"""


@dataclasses.dataclass(frozen=True)
class NaivePgConfig:
    # host:port to serve gRPC on.
    listen: str
    # The Postgres to keep stock in.
    database_url: str
    # The schema holding this baseline's tables; created if missing.
    schema: str
    # Connections in the pool, all opened at start (see POOL_SIZE_DEFAULT).
    pool_size: int
    # Drop the schema, tables and all, when the process stops.
    drop_on_exit: bool


class _Short(Exception):
    """A position lacked stock: raised inside the transaction so that it rolls back,
    and caught right outside it, where it becomes a REJECTED answer."""

    def __init__(self, available: Mapping[Position, int]) -> None:
        super().__init__("a position lacks stock")
        self.available = available


def _quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


class NaivePgStore:
    def __init__(self, config: NaivePgConfig) -> None:
        self._config = config
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "open() first"
        return self._pool

    async def open(self) -> None:
        schema = self._config.schema
        conn = await asyncpg.connect(
            self._config.database_url, timeout=CONNECT_TIMEOUT_S
        )
        try:
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_quoted(schema)}")
            await conn.execute(f"SET search_path TO {_quoted(schema)}")
            await conn.execute(DDL)
            positions = await conn.fetchval("SELECT count(*) FROM stock")
            synchronous_commit = await conn.fetchval("SHOW synchronous_commit")
        finally:
            await conn.close()
        if positions:
            log.warning(
                "schema not empty: schema=%s positions=%d (earlier holds still count)",
                schema,
                positions,
            )

        self._pool = await asyncpg.create_pool(
            self._config.database_url,
            min_size=self._config.pool_size,
            max_size=self._config.pool_size,
            timeout=CONNECT_TIMEOUT_S,
            command_timeout=DATABASE_BUDGET_S,
            server_settings={"search_path": _quoted(schema)},
        )
        log.info(
            "naive_pg ready: schema=%s pool_size=%d synchronous_commit=%s",
            schema,
            self._config.pool_size,
            synchronous_commit,
        )

    async def close(self) -> None:
        if self._pool is not None:
            try:
                async with asyncio.timeout(POOL_CLOSE_WAIT_S):
                    await self._pool.close()
            except TimeoutError:
                log.warning(
                    "pool close slow: wait_s=%.1f terminating", POOL_CLOSE_WAIT_S
                )
                self._pool.terminate()
        if self._config.drop_on_exit:
            await drop_schema(self._config.database_url, self._config.schema)

    async def reserve(self, lines: Sequence[Line]) -> inventory_pb2.ReserveResponse:
        want = common.wanted(lines)
        try:
            async with (
                _database_call("reserve"),
                self.pool.acquire() as conn,
                conn.transaction(),
            ):
                await _hold_each(conn, want)
                reservation = await conn.fetchval(
                    _RECORD,
                    [line.index for line in lines],
                    [line.sku for line in lines],
                    [line.location for line in lines],
                    [line.quantity for line in lines],
                )
        except _Short as short:
            return common.rejected(lines, short.available)
        return common.reserved(lines, f"pg-{reservation}")

    async def set_on_hand(
        self, counts: Mapping[Position, int]
    ) -> list[tuple[str, str, int, int]]:
        async with _database_call("set_on_hand"), self.pool.acquire() as conn:
            rows = await conn.fetch(
                _SET_ON_HAND,
                [sku for sku, _ in counts],
                [location for _, location in counts],
                list(counts.values()),
            )
        return sorted((row[0], row[1], row[2], row[3]) for row in rows)


async def _hold_each(conn: asyncpg.Connection, want: Mapping[Position, int]) -> None:
    """Hold every position's quantity, in order, or raise _Short at the first that
    lacks it."""
    held: list[Position] = []
    for (sku, location), quantity in want.items():
        if await conn.fetchval(_HOLD, sku, location, quantity) is None:
            raise _Short(await _available_before(conn, want, held))
        held.append((sku, location))


async def _available_before(
    conn: asyncpg.Connection, want: Mapping[Position, int], held: Sequence[Position]
) -> dict[Position, int]:
    """What each position had before this transaction: as read now, less what this
    transaction has already held there."""
    rows = await conn.fetch(
        _AVAILABLE, [sku for sku, _ in want], [location for _, location in want]
    )
    available = {(row[0], row[1]): row[2] for row in rows}
    for position in held:
        available[position] += want[position]
    return available


@contextlib.asynccontextmanager
async def _database_call(what: str) -> AsyncIterator[None]:
    """One budget for a whole call; every Postgres failure becomes UNAVAILABLE here."""
    try:
        async with asyncio.timeout(DATABASE_BUDGET_S):
            yield
    except DATABASE_ERRORS as error:
        log.warning("postgres call failed: call=%s error=%r", what, error)
        sqlstate = getattr(error, "sqlstate", None) or "none"
        raise Unavailable(
            "DATABASE_UNAVAILABLE",
            f"postgres failed: {type(error).__name__} sqlstate={sqlstate}",
        ) from error


async def drop_schema(database_url: str, schema: str) -> None:
    """Remove the baseline's schema and everything in it; for the benchmark runner."""
    conn = await asyncpg.connect(database_url, timeout=CONNECT_TIMEOUT_S)
    try:
        await conn.execute(
            f"DROP SCHEMA IF EXISTS {_quoted(schema)} CASCADE",
            timeout=DATABASE_BUDGET_S,
        )
    finally:
        await conn.close()
    log.info("schema dropped: schema=%s", schema)


class NaivePgInventory:
    def __init__(self, store: NaivePgStore) -> None:
        self._store = store

    @common.answering
    async def Reserve(
        self, request: inventory_pb2.ReserveRequest, context: Context
    ) -> inventory_pb2.ReserveResponse:
        return await self._store.reserve(common.reserve_lines(request))

    @common.answering
    async def ExecuteBatch(
        self, request: inventory_pb2.ExecuteBatchRequest, context: Context
    ) -> inventory_pb2.ExecuteBatchResponse:
        items = common.batch_items(request)
        # Bounded by the batch limit; the pool lets pool_size of them run at once.
        results = await asyncio.gather(*(self._result(item) for item in items))
        return inventory_pb2.ExecuteBatchResponse(results=results)

    async def _result(self, item: common.BatchItem) -> inventory_pb2.CommandResult:
        if isinstance(item, inventory_pb2.CommandResult):
            return item
        try:
            return inventory_pb2.CommandResult(reserve=await self._store.reserve(item))
        except EngineError as error:
            return inventory_pb2.CommandResult(error=status_of(error))


def parse_config(argv: Sequence[str] | None = None) -> NaivePgConfig:
    parser = common.argument_parser(
        "stockward benchmark baseline: one Postgres transaction per reservation"
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("STOCKWARD_DATABASE_URL", DEFAULT_DATABASE_URL),
    )
    parser.add_argument("--schema", default=SCHEMA_DEFAULT)
    parser.add_argument("--pool-size", type=int, default=POOL_SIZE_DEFAULT)
    parser.add_argument(
        "--drop-on-exit",
        action="store_true",
        help="drop the schema and everything in it when the process stops",
    )
    options = parser.parse_args(argv)
    if options.pool_size < 1:
        parser.error("--pool-size must be at least 1")
    return NaivePgConfig(
        listen=options.listen,
        database_url=options.database_url,
        schema=options.schema,
        pool_size=options.pool_size,
        drop_on_exit=options.drop_on_exit,
    )


def run() -> None:
    config = parse_config()
    store = NaivePgStore(config)
    inventory = NaivePgInventory(store)
    baseline = common.StoreBaseline(
        store, {"Reserve": inventory.Reserve, "ExecuteBatch": inventory.ExecuteBatch}
    )
    common.main(baseline, listen=config.listen)


if __name__ == "__main__":
    run()
