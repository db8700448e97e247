"""The baselines the benchmark measures stockward against, and the Postgres ceiling.

Each baseline runs as a child process on loopback, as the benchmark runs it, and is
stopped by pid with SIGTERM, which must end it with exit status 0. A baseline that
oversold, or held part of an all-or-nothing request, would make its figures
meaningless, so the stateful ones (Postgres, Redis) are raced and checked against
their stores. Each test gets its own Postgres schema or Redis key prefix and leaves
nothing behind.
"""

import asyncio
import collections
import dataclasses
import os
import pathlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import grpc
import pytest
import redis.asyncio as redis

from benchmarks import pg_ceiling
from benchmarks.baselines import naive_pg, redis_lua
from benchmarks.services import Service, python_module
from server.wal.schema import ensure_schema
from stockward.v1 import admin_pb2, admin_pb2_grpc, inventory_pb2, inventory_pb2_grpc
from tests.api.client import refusal, refused, status_refusal
from tests.conftest import DATABASE_URL

REDIS_URL = os.environ.get("STOCKWARD_REDIS_URL", redis_lua.REDIS_URL_DEFAULT)

# Four buyers per unit, all at once: enough that a check-then-act race would oversell.
RACE_UNITS = 50
RACE_BUYERS = 200
# A baseline answers in milliseconds; these only stop a hung test.
CALL_TIMEOUT_S = 10.0
RACE_WAIT_S = 20.0
# A ceiling run big enough to cross several commits, small enough for a test.
CEILING_ROWS = 2_000
CEILING_BATCH_ROWS = 500

RESERVED = inventory_pb2.RESERVE_OUTCOME_RESERVED
REJECTED = inventory_pb2.RESERVE_OUTCOME_REJECTED
INSUFFICIENT = inventory_pb2.SHORT_REASON_INSUFFICIENT_STOCK
OTHER_LINE_SHORT = inventory_pb2.SHORT_REASON_OTHER_LINE_SHORT


@dataclasses.dataclass
class Running:
    process: Service
    channel: grpc.aio.Channel
    inventory: inventory_pb2_grpc.InventoryServiceStub
    admin: admin_pb2_grpc.StockAdminServiceStub


BaselineFactory = Callable[..., Awaitable[Running]]


async def stop(running: Running) -> None:
    """SIGTERM by pid; the baseline must drain and exit 0."""
    await running.channel.close()
    status = await running.process.stop()
    assert status == 0, f"exit status {status}:\n{running.process.log_tail()}"


@pytest.fixture
async def start_baseline(tmp_path: pathlib.Path) -> AsyncIterator[BaselineFactory]:
    """Start baselines as child processes; any still running are stopped at the end."""
    started: list[Running] = []

    async def start(name: str, *args: str) -> Running:
        argv = python_module(f"benchmarks.baselines.{name}", "--listen", "{address}")
        process = Service(name, [*argv, *args], tmp_path / f"{name}.log")
        await process.start()
        channel = grpc.aio.insecure_channel(process.address)
        running = Running(
            process=process,
            channel=channel,
            inventory=inventory_pb2_grpc.InventoryServiceStub(channel),
            admin=admin_pb2_grpc.StockAdminServiceStub(channel),
        )
        started.append(running)
        return running

    yield start
    for running in started:
        if running.process.is_running:
            await stop(running)


@dataclasses.dataclass
class Stateful:
    """A stateful baseline, running, with a look into its store."""

    name: str
    running: Running
    schema: str
    key_prefix: str

    async def held(self, sku: str, location: str) -> int:
        if self.name == "naive_pg":
            conn = await asyncpg.connect(DATABASE_URL)
            try:
                value = await conn.fetchval(
                    f'SELECT held FROM "{self.schema}".stock '
                    "WHERE sku = $1 AND location = $2",
                    sku,
                    location,
                )
            finally:
                await conn.close()
            return int(value)
        client = redis.Redis.from_url(REDIS_URL)
        try:
            value = await client.hget(f"{self.key_prefix}:{sku}:{location}", "held")
        finally:
            await client.aclose()
        assert value is not None, f"no stock hash for {sku}@{location}"
        return int(value)

    async def leftovers(self) -> int:
        """Tables of its schema, or keys under its prefix, that still exist."""
        if self.name == "naive_pg":
            return await tables_in(self.schema)
        return await keys_under(self.key_prefix)


async def tables_in(schema: str) -> int:
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1", schema
        )
    finally:
        await conn.close()
    return int(count)


async def schema_exists(schema: str) -> bool:
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        exists = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", schema
        )
    finally:
        await conn.close()
    return bool(exists)


async def keys_under(key_prefix: str) -> int:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return len([key async for key in client.scan_iter(match=f"{key_prefix}:*")])
    finally:
        await client.aclose()


@pytest.fixture(params=["naive_pg", "redis_lua"])
async def stateful(
    request: pytest.FixtureRequest, schema: str, start_baseline: BaselineFactory
) -> AsyncIterator[Stateful]:
    """Each stateful baseline in turn, told to drop its store when it stops; the
    teardown stops it and checks that it did."""
    name: str = request.param
    key_prefix = "t_" + secrets.token_hex(6)
    if name == "naive_pg":
        args = ("--database-url", DATABASE_URL, "--schema", schema)
    else:
        args = ("--redis-url", REDIS_URL, "--key-prefix", key_prefix)
    running = await start_baseline(name, *args, "--drop-on-exit")
    baseline = Stateful(name, running, schema, key_prefix)

    yield baseline
    if running.process.is_running:
        await stop(running)
    assert await baseline.leftovers() == 0, f"{name} left its store behind"


def reserve_request(
    *lines: tuple[str, str, int],
) -> inventory_pb2.ReserveRequest:
    return inventory_pb2.ReserveRequest(
        request_id="r-" + secrets.token_hex(6),
        channel="web",
        lines=[
            inventory_pb2.ReserveLine(sku=sku, location=location, quantity=quantity)
            for sku, location, quantity in lines
        ],
    )


async def stock(running: Running, *counts: tuple[str, str, int]) -> None:
    await running.admin.SetOnHand(
        admin_pb2.SetOnHandRequest(
            source="test",
            source_event_id=secrets.token_hex(6),
            counts=[
                admin_pb2.OnHandCount(sku=sku, location=location, on_hand=on_hand)
                for sku, location, on_hand in counts
            ],
        ),
        timeout=CALL_TIMEOUT_S,
    )


async def test_concurrent_reserves_never_oversell(
    stateful: Stateful, schema: str
) -> None:
    inventory = stateful.running.inventory
    await stock(stateful.running, ("HOT", "DC", RACE_UNITS))

    async with asyncio.timeout(RACE_WAIT_S):
        answers = await asyncio.gather(
            *(
                inventory.Reserve(reserve_request(("HOT", "DC", 1)))
                for _ in range(RACE_BUYERS)
            )
        )

    outcomes = collections.Counter(answer.outcome for answer in answers)
    assert outcomes == {RESERVED: RACE_UNITS, REJECTED: RACE_BUYERS - RACE_UNITS}
    ids = {answer.reservation_id for answer in answers if answer.outcome == RESERVED}
    assert len(ids) == RACE_UNITS
    shorts = {
        (answer.lines[0].short_reason, answer.lines[0].quantity_available)
        for answer in answers
        if answer.outcome == REJECTED
    }
    assert shorts == {(INSUFFICIENT, 0)}
    assert await stateful.held("HOT", "DC") == RACE_UNITS
    if stateful.name == "naive_pg":
        conn = await asyncpg.connect(DATABASE_URL)
        try:
            rows = await conn.fetchval(f'SELECT count(*) FROM "{schema}".reservations')
        finally:
            await conn.close()
        assert rows == RACE_UNITS


async def test_reserve_holds_all_lines_or_none(stateful: Stateful) -> None:
    inventory = stateful.running.inventory
    await stock(stateful.running, ("MUG", "DC", 5), ("TEE", "DC", 1))

    # MUG sorts first, so its hold is made before TEE's fails and must be undone.
    answer = await inventory.Reserve(
        reserve_request(("MUG", "DC", 3), ("TEE", "DC", 2)), timeout=CALL_TIMEOUT_S
    )

    assert answer.outcome == REJECTED
    assert not answer.reservation_id
    assert [
        (line.short_reason, line.quantity_available, line.quantity_held)
        for line in answer.lines
    ] == [(OTHER_LINE_SHORT, 5, 0), (INSUFFICIENT, 1, 0)]
    assert await stateful.held("MUG", "DC") == 0
    assert await stateful.held("TEE", "DC") == 0

    answer = await inventory.Reserve(
        reserve_request(("MUG", "DC", 3), ("TEE", "DC", 1)), timeout=CALL_TIMEOUT_S
    )
    assert answer.outcome == RESERVED
    assert [line.quantity_held for line in answer.lines] == [3, 1]
    assert await stateful.held("MUG", "DC") == 3
    assert await stateful.held("TEE", "DC") == 1


async def test_lines_naming_one_position_must_fit_together(
    stateful: Stateful,
) -> None:
    await stock(stateful.running, ("MUG", "DC", 5))

    answer = await stateful.running.inventory.Reserve(
        reserve_request(("MUG", "DC", 3), ("MUG", "DC", 3)), timeout=CALL_TIMEOUT_S
    )

    assert answer.outcome == REJECTED
    assert [line.short_reason for line in answer.lines] == [INSUFFICIENT] * 2
    assert await stateful.held("MUG", "DC") == 0


async def test_reserve_without_location_is_refused_with_error_info(
    stateful: Stateful,
) -> None:
    request = inventory_pb2.ReserveRequest(
        request_id="r-1", lines=[inventory_pb2.ReserveLine(sku="MUG", quantity=1)]
    )

    error = await refused(
        stateful.running.inventory.Reserve(request, timeout=CALL_TIMEOUT_S)
    )

    assert refusal(error) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "FIELD_REQUIRED",
        "lines[0].location",
    )


async def test_batch_answers_each_command_in_order(stateful: Stateful) -> None:
    await stock(stateful.running, ("MUG", "DC", 1), ("TEE", "DC", 1), ("CAP", "DC", 1))
    commands = [
        inventory_pb2.Command(reserve=reserve_request(("MUG", "DC", 1))),
        inventory_pb2.Command(confirm=inventory_pb2.ConfirmRequest(request_id="c-1")),
        inventory_pb2.Command(reserve=reserve_request(("TEE", "DC", 5))),
        inventory_pb2.Command(reserve=reserve_request(("CAP", "", 1))),
        inventory_pb2.Command(reserve=reserve_request(("CAP", "DC", 1))),
    ]

    response = await stateful.running.inventory.ExecuteBatch(
        inventory_pb2.ExecuteBatchRequest(commands=commands), timeout=CALL_TIMEOUT_S
    )

    results = response.results
    assert len(results) == len(commands)
    assert results[0].reserve.outcome == RESERVED
    assert status_refusal(results[1].error) == (
        grpc.StatusCode.UNIMPLEMENTED,
        "UNSUPPORTED_BY_BASELINE",
        "",
    )
    assert results[2].reserve.outcome == REJECTED
    assert status_refusal(results[3].error) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "FIELD_REQUIRED",
        "lines[0].location",
    )
    assert results[4].reserve.outcome == RESERVED
    assert await stateful.held("MUG", "DC") == 1
    assert await stateful.held("CAP", "DC") == 1


async def test_stopping_with_drop_on_exit_leaves_nothing_behind(
    stateful: Stateful,
) -> None:
    await stock(stateful.running, ("MUG", "DC", 5))
    await stateful.running.inventory.Reserve(
        reserve_request(("MUG", "DC", 1)), timeout=CALL_TIMEOUT_S
    )
    assert await stateful.leftovers() > 0

    await stop(stateful.running)

    assert await stateful.leftovers() == 0


async def test_noop_reserves_everything_and_runs_nothing_else(
    start_baseline: BaselineFactory,
) -> None:
    running = await start_baseline("noop")

    answer = await running.inventory.Reserve(
        reserve_request(("MUG", "DC", 7)), timeout=CALL_TIMEOUT_S
    )
    batch = await running.inventory.ExecuteBatch(
        inventory_pb2.ExecuteBatchRequest(
            commands=[
                inventory_pb2.Command(reserve=reserve_request(("MUG", "DC", 1))),
                inventory_pb2.Command(
                    release=inventory_pb2.ReleaseRequest(request_id="x-1")
                ),
            ]
        ),
        timeout=CALL_TIMEOUT_S,
    )
    unimplemented = await refused(
        running.inventory.GetAvailability(
            inventory_pb2.GetAvailabilityRequest(skus=["MUG"]), timeout=CALL_TIMEOUT_S
        )
    )

    assert answer.outcome == RESERVED
    assert answer.reservation_id
    assert answer.lines[0].quantity_held == 7
    assert batch.results[0].reserve.outcome == RESERVED
    assert batch.results[1].error.code == grpc.StatusCode.UNIMPLEMENTED.value[0]
    assert unimplemented.code() == grpc.StatusCode.UNIMPLEMENTED
    await stop(running)


async def test_drop_schema_removes_what_a_naive_pg_run_left(schema: str) -> None:
    config = naive_pg.NaivePgConfig(
        listen="unused",
        database_url=DATABASE_URL,
        schema=schema,
        pool_size=1,
        drop_on_exit=False,
    )
    store = naive_pg.NaivePgStore(config)
    await store.open()
    await store.close()
    assert await tables_in(schema) == 2

    await naive_pg.drop_schema(DATABASE_URL, schema)

    assert not await schema_exists(schema)


async def test_drop_keys_removes_what_a_redis_lua_run_left() -> None:
    key_prefix = "t_" + secrets.token_hex(6)
    config = redis_lua.RedisLuaConfig(
        listen="unused", redis_url=REDIS_URL, key_prefix=key_prefix, drop_on_exit=False
    )
    store = redis_lua.RedisLuaStore(config)
    await store.open()
    await store.set_on_hand({("MUG", "DC"): 5, ("TEE", "DC"): 1})
    await store.close()
    assert await keys_under(key_prefix) == 2

    dropped = await redis_lua.drop_keys(REDIS_URL, key_prefix)

    assert dropped == 2
    assert await keys_under(key_prefix) == 0


async def test_pg_ceiling_measures_a_rate_and_drops_its_table(schema: str) -> None:
    result = await pg_ceiling.measure_insert_ceiling(
        DATABASE_URL,
        schema,
        rows_total=CEILING_ROWS,
        batch_rows=CEILING_BATCH_ROWS,
    )

    assert result.rows_per_s > 0
    assert result.batches == CEILING_ROWS // CEILING_BATCH_ROWS
    assert result.elapsed_s > 0
    # The schema did not exist before, so the run took it away again as well.
    assert not await schema_exists(schema)


async def test_pg_ceiling_table_has_the_write_ahead_columns(schema: str) -> None:
    conn = await asyncpg.connect(
        DATABASE_URL, server_settings={"search_path": f'"{schema}"'}
    )
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await ensure_schema(conn, shard_count=4)
        await conn.execute(pg_ceiling.SCRATCH_TABLE_DDL.format(table="scratch"))
        shapes = [
            await _table_shape(conn, schema, table)
            for table in ("wal_records", "scratch")
        ]
    finally:
        await conn.close()

    assert shapes[0] == shapes[1]


async def _table_shape(
    conn: asyncpg.Connection, schema: str, table: str
) -> tuple[list[tuple[str, str, str, str | None]], list[str]]:
    """Columns (name, type, nullable, default) and the primary key's columns."""
    columns = await conn.fetch(
        "SELECT column_name, data_type, is_nullable, column_default "
        "FROM information_schema.columns "
        "WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
        schema,
        table,
    )
    key = await conn.fetch(
        "SELECT a.attname FROM pg_index i "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) "
        "WHERE i.indrelid = $1::regclass AND i.indisprimary ORDER BY a.attnum",
        f'"{schema}"."{table}"',
    )
    return [tuple(row) for row in columns], [row[0] for row in key]
