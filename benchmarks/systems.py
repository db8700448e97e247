"""The systems a benchmark compares, behind one interface: each is a gRPC service
driven by the same client library, stocked the same way, and asked afterwards what
it holds, so that every scenario can check for oversell and undersell.
"""

import dataclasses
import logging
import pathlib
from collections.abc import Awaitable, Callable, Iterable

import asyncpg
import redis.asyncio as redis

from benchmarks.baselines.naive_pg import drop_schema as drop_naive_schema
from benchmarks.baselines.redis_lua import drop_keys
from benchmarks.services import Service, drop_schema, python_module, stockward
from clients import Batching, RetryPolicy, StockwardClient
from stockward.v1 import admin_pb2, inventory_pb2

log = logging.getLogger(__name__)

# The server takes at most this many counts per SetOnHand.
COUNTS_PER_REQUEST_MAX = 1_000
# A benchmark call may queue behind thousands of others; the default 5 s budget
# would turn a slow moment into errors rather than latency.
BENCH_DEADLINE_S = 60.0
BENCH_RETRY = RetryPolicy(attempts_max=3, backoff_initial_s=0.05, backoff_max_s=0.5)

Held = Callable[[str, str], Awaitable[int]]


@dataclasses.dataclass
class System:
    name: str
    description: str
    service: Service
    # Units held at a position, read from the system's own store; None for a system
    # that keeps no state.
    held: Held | None
    cleanup: Callable[[], Awaitable[None]]

    def client(self, batching: Batching | None = None) -> StockwardClient:
        return bench_client(self.service, batching)


def bench_client(service: Service, batching: Batching | None = None) -> StockwardClient:
    return StockwardClient(
        service.address,
        deadline_s=BENCH_DEADLINE_S,
        retry=BENCH_RETRY,
        batching=batching,
    )


async def stock(system: System, counts: Iterable[tuple[str, str, int]]) -> None:
    """Set on-hand for many positions, a request's worth at a time."""
    rows = [
        admin_pb2.OnHandCount(sku=sku, location=location, on_hand=units)
        for sku, location, units in counts
    ]
    async with system.client() as client:
        for start in range(0, len(rows), COUNTS_PER_REQUEST_MAX):
            await client.set_on_hand(
                admin_pb2.SetOnHandRequest(
                    source="bench",
                    counts=rows[start : start + COUNTS_PER_REQUEST_MAX],
                )
            )


def make_stockward(
    log_dir: pathlib.Path, *, database_url: str, schema: str, shards: int
) -> System:
    service = stockward(
        log_dir, database_url=database_url, schema=schema, shards=shards
    )

    async def held(sku: str, location: str) -> int:
        async with bench_client(service) as client:
            answer = await client.get_availability([sku], locations=[location])
        units: int = answer.skus[0].total.held
        return units

    async def cleanup() -> None:
        await drop_schema(database_url, schema)

    return System(
        "stockward",
        "this service: sharded in-memory engine, group commit to Postgres",
        service,
        held,
        cleanup,
    )


def make_naive_pg(log_dir: pathlib.Path, *, database_url: str, schema: str) -> System:
    argv = python_module(
        "benchmarks.baselines.naive_pg",
        "--listen",
        "{address}",
        "--database-url",
        database_url,
        "--schema",
        schema,
    )
    service = Service("naive-postgres", argv, log_dir / "naive_pg.log")

    async def held(sku: str, location: str) -> int:
        connection = await asyncpg.connect(database_url)
        try:
            units = await connection.fetchval(
                f'SELECT held FROM "{schema}".stock WHERE sku = $1 AND location = $2',
                sku,
                location,
            )
        finally:
            await connection.close()
        return int(units or 0)

    async def cleanup() -> None:
        await drop_naive_schema(database_url, schema)

    return System(
        "naive-postgres",
        "one transaction per reservation with a conditional UPDATE (durable)",
        service,
        held,
        cleanup,
    )


def make_redis_lua(log_dir: pathlib.Path, *, redis_url: str, prefix: str) -> System:
    argv = python_module(
        "benchmarks.baselines.redis_lua",
        "--listen",
        "{address}",
        "--redis-url",
        redis_url,
        "--key-prefix",
        prefix,
    )
    service = Service("redis-lua", argv, log_dir / "redis_lua.log")

    async def held(sku: str, location: str) -> int:
        client = redis.from_url(redis_url)
        try:
            units = await client.hget(f"{prefix}:{sku}:{location}", "held")
        finally:
            await client.aclose()
        return int(units or 0)

    async def cleanup() -> None:
        await drop_keys(redis_url, prefix)

    return System(
        "redis-lua",
        "Lua check-and-decrement in Redis (fast, not durable)",
        service,
        held,
        cleanup,
    )


def make_noop(log_dir: pathlib.Path) -> System:
    argv = python_module("benchmarks.baselines.noop", "--listen", "{address}")
    service = Service("noop-grpc", argv, log_dir / "noop.log")
    return System(
        "noop-grpc",
        "answers RESERVED without doing anything: the transport ceiling",
        service,
        None,
        _nothing,
    )


async def _nothing() -> None:
    return None


def is_reserved(answer: inventory_pb2.ReserveResponse) -> bool:
    return answer.outcome == inventory_pb2.RESERVE_OUTCOME_RESERVED
