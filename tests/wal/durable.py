"""Direct SQL on a test's schema: arrange crash situations, read what is durable.

`durable_state` reads positions and reservations straight from the tables, without the
server's code: the newest complete checkpoint, then each shard's records after the seq
it covers. Tests compare what the server shows against it.
"""

import asyncio
import collections
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.engine.shard import shard_of
from stockward.v1 import inventory_pb2
from tests.conftest import DATABASE_URL, Running, stop_server

# (sku, location): one position.
At = tuple[str, str]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Health changes are awaited on the Watch stream; recovery retries back off up to 5 s.
HEALTH_WAIT_S = 20.0
# A request reaches Postgres within milliseconds; this bounds the wait for it there.
BLOCKED_WAIT_S = 10.0
BLOCKED_POLL_S = 0.02


@contextlib.asynccontextmanager
async def connect(schema: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the test's own whose unqualified names are the test's schema."""
    conn = await asyncpg.connect(DATABASE_URL, server_settings={"search_path": schema})
    try:
        yield conn
    finally:
        await conn.close()


@dataclasses.dataclass(frozen=True, slots=True)
class DurableState:
    positions: dict[At, tuple[int, int]]  # (on_hand, held)
    reservations: dict[str, dict[str, Any]]  # as the records store them


async def durable_state(conn: asyncpg.Connection) -> DurableState:
    on_hand: dict[At, int] = collections.defaultdict(int)
    held: dict[At, int] = collections.defaultdict(int)
    reservations: dict[str, dict[str, Any]] = {}
    checkpoint = await conn.fetchrow(
        "SELECT id, shard_seqs FROM checkpoints WHERE complete ORDER BY id DESC LIMIT 1"
    )
    covered: list[int] = []
    if checkpoint is not None:
        covered = list(checkpoint["shard_seqs"])
        for row in await conn.fetch(
            "SELECT sku, location, on_hand, held FROM checkpoint_positions "
            "WHERE checkpoint_id = $1",
            checkpoint["id"],
        ):
            on_hand[(row["sku"], row["location"])] += row["on_hand"]
            held[(row["sku"], row["location"])] += row["held"]
        for row in await conn.fetch(
            "SELECT body FROM checkpoint_reservations WHERE checkpoint_id = $1",
            checkpoint["id"],
        ):
            body = json.loads(row["body"])
            reservations[body["id"]] = body

    for row in await conn.fetch(
        "SELECT shard, seq, body FROM wal_records ORDER BY shard, seq"
    ):
        if row["shard"] < len(covered) and row["seq"] <= covered[row["shard"]]:
            continue
        body = json.loads(row["body"])
        for sku, location, on_hand_delta, held_delta in body["fx"]:
            on_hand[(sku, location)] += on_hand_delta
            held[(sku, location)] += held_delta
        if "rsv" in body:
            reservations[body["rsv"]["id"]] = body["rsv"]
    positions = {at: (on_hand[at], held[at]) for at in on_hand}
    return DurableState(positions, reservations)


async def shown_positions(
    server: Running, skus: list[str]
) -> dict[At, tuple[int, int]]:
    """What the server shows: (on_hand, held) per position of the given skus."""
    answer = await server.inventory.GetAvailability(
        inventory_pb2.GetAvailabilityRequest(skus=skus)
    )
    return {
        (item.sku, place.location): (
            place.availability.on_hand,
            place.availability.held,
        )
        for item in answer.skus
        for place in item.locations
    }


# Crashes --------------------------------------------------------------------------------

_REFUSE_CHECKPOINTS = """
CREATE FUNCTION test_refuse_checkpoint() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the test crashed this server before its shutdown checkpoint';
END $$;
CREATE TRIGGER test_refuse_checkpoint BEFORE INSERT ON checkpoints
    FOR EACH ROW EXECUTE FUNCTION test_refuse_checkpoint();
"""
_ALLOW_CHECKPOINTS = """
DROP TRIGGER test_refuse_checkpoint ON checkpoints;
DROP FUNCTION test_refuse_checkpoint();
"""


async def stop_as_if_crashed(server: Running, conn: asyncpg.Connection) -> None:
    """Stop an idle server leaving Postgres as a crash would: without the checkpoint
    a clean shutdown stores. The server's attempt fails on a trigger, which it ignores
    as it would any database error at that point."""
    await conn.execute(_REFUSE_CHECKPOINTS)
    try:
        await stop_server(server)
    finally:
        await conn.execute(_ALLOW_CHECKPOINTS)


# Blocking and failing commits -----------------------------------------------------------


async def wait_until_blocked(conn: asyncpg.Connection, *, application_name: str) -> int:
    """The pid of a backend of that application waiting for a lock; polled because
    Postgres offers no event for it."""
    async with asyncio.timeout(BLOCKED_WAIT_S):
        while True:
            pid: int | None = await conn.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1 "
                "AND wait_event_type = 'Lock' LIMIT 1",
                application_name,
            )
            if pid is not None:
                return pid
            await asyncio.sleep(BLOCKED_POLL_S)


async def wait_until_any_blocked(conn: asyncpg.Connection, *, blocker_pid: int) -> None:
    """Until some backend waits for a lock that `blocker_pid` holds."""
    async with asyncio.timeout(BLOCKED_WAIT_S):
        while True:
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE $1 = ANY(pg_blocking_pids(pid))",
                blocker_pid,
            )
            if waiting:
                return
            await asyncio.sleep(BLOCKED_POLL_S)


async def next_seq(conn: asyncpg.Connection, shard: int) -> int:
    last: int = await conn.fetchval(
        "SELECT coalesce(max(seq), 0) FROM wal_records WHERE shard = $1", shard
    )
    return last + 1


def sku_on_shard(shard: int, *, shard_count: int, prefix: str = "SKU-") -> str:
    """The first sku name with that prefix that hashes to the shard."""
    for n in range(1_000):
        sku = f"{prefix}{n}"
        if shard_of(sku, shard_count) == shard:
            return sku
    raise AssertionError(f"no sku among 1,000 hashes to shard {shard}")


# Health ---------------------------------------------------------------------------------


class HealthWatch:
    """The server's health as a stream of changes, read one change at a time."""

    def __init__(self, server: Running) -> None:
        stub = health_pb2_grpc.HealthStub(server.channel)
        self._call = stub.Watch(health_pb2.HealthCheckRequest(service=""))

    async def next_status(self) -> int:
        async with asyncio.timeout(HEALTH_WAIT_S):
            answer = await self._call.read()
        return int(answer.status)

    def close(self) -> None:
        self._call.cancel()
