"""The bridge end to end: a real server, Postgres, Redis and the ERP simulator."""

import asyncio
import hashlib
import json
import pathlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from erp_bridge.bridge import Bridge, application_name
from erp_bridge.simulator import ErpSimulator, Faults, SimulatorConfig
from erp_bridge.store import DeadLetterStatus
from stockward.v1 import inventory_pb2
from tests.conftest import DATABASE_URL, Running, ServerFactory
from tests.erp.bridge_support import (
    LOCATIONS,
    bridge_config,
    effects_recorded,
    erp_positions,
    progress,
    stock,
    stockward_positions,
    traffic,
    wait_caught_up,
)
from tests.erp.conftest import SHARDS

BridgeFactory = Callable[..., Awaitable[Bridge]]


@pytest.fixture
async def simulator() -> AsyncIterator[ErpSimulator]:
    erp = ErpSimulator(
        SimulatorConfig(
            requests_per_s=200, lines_per_s=20_000, faults=Faults(latency_ms=2)
        )
    )
    await erp.start()
    yield erp
    await erp.stop()


@pytest.fixture
async def start_bridge(
    schema: str, simulator: ErpSimulator
) -> AsyncIterator[BridgeFactory]:
    """Bridges in this process; a task of theirs that fails fails the test."""
    bridges: list[Bridge] = []
    failures: list[BaseException] = []

    async def start(**overrides: object) -> Bridge:
        config = bridge_config(schema, simulator, **overrides)
        bridge = Bridge(config, seed=1, on_fatal=failures.append)
        await bridge.start()
        bridges.append(bridge)
        return bridge

    yield start
    for bridge in bridges:
        await bridge.stop()
    assert not failures, f"bridge tasks failed: {failures}"


@pytest.fixture
async def server(start_server: ServerFactory) -> Running:
    return await start_server()


def seeded() -> random.Random:
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    return random.Random(seed)


async def test_positions_feed_brings_the_erp_to_stockwards_positions(
    server: Running, start_bridge: BridgeFactory, simulator: ErpSimulator, schema: str
) -> None:
    skus = [f"SKU-{i}" for i in range(6)]
    await stock(server, skus, 20)
    await start_bridge(feed="positions", lines_per_request=7)

    await traffic(server, seeded(), skus, 300)
    await wait_caught_up(schema)

    assert erp_positions(simulator) == stockward_positions(server)
    assert simulator.books.lines_applied < simulator.stats.requests * 7 + 1


async def test_ledger_feed_books_every_effect_once_with_its_reservation(
    server: Running, start_bridge: BridgeFactory, simulator: ErpSimulator, schema: str
) -> None:
    skus = ["A", "B"]
    await stock(server, skus, 50)
    bridge = await start_bridge(feed="ledger", lines_per_request=5)

    await traffic(server, seeded(), skus, 120)
    await wait_caught_up(schema)

    assert erp_positions(simulator) == stockward_positions(server)
    effects = await effects_recorded(schema)
    assert simulator.books.lines_applied == effects
    assert bridge.counters.lines_out == bridge.counters.lines_in == effects


async def test_erp_failures_and_answers_lost_after_booking_neither_lose_nor_double(
    server: Running, start_bridge: BridgeFactory, simulator: ErpSimulator, schema: str
) -> None:
    simulator.faults = Faults(error_rate=0.3, applied_then_error_rate=0.3, latency_ms=1)
    skus = [f"SKU-{i}" for i in range(4)]
    await stock(server, skus, 30)
    bridge = await start_bridge(
        feed="positions", lines_per_request=3, breaker_failures=50
    )

    await traffic(server, seeded(), skus, 200)
    await wait_caught_up(schema)

    assert erp_positions(simulator) == stockward_positions(server)
    assert simulator.stats.failed > 0
    assert bridge.counters.duplicates > 0
    assert bridge.counters.retries >= simulator.stats.failed


async def test_dead_letters_do_not_block_the_rest_and_a_retry_books_them(
    server: Running, start_bridge: BridgeFactory, simulator: ErpSimulator, schema: str
) -> None:
    closed = LOCATIONS[1]
    simulator.books.closed_locations = frozenset({closed})
    await stock(server, ["A", "B"], 10)
    bridge = await start_bridge(feed="ledger", lines_per_request=50)
    await traffic(server, seeded(), ["A", "B"], 60)
    await wait_caught_up(schema)

    dead = await bridge.store.list_dead_letters(
        statuses=[DeadLetterStatus.DEAD],
        after_id=0,
        limit=1_000,
    )
    assert dead and {letter.line.location for letter in dead} == {closed}
    assert {letter.reason for letter in dead} == {"PERIOD_CLOSED"}
    open_side = {
        at: v for at, v in stockward_positions(server).items() if at[1] != closed
    }
    assert {at: v for at, v in erp_positions(simulator).items() if at[1] != closed} == (
        open_side
    )

    simulator.books.closed_locations = frozenset()
    await bridge.store.retry_dead_letters([letter.id for letter in dead])
    await _wait_for(lambda: _all_resolved(bridge))

    assert erp_positions(simulator) == stockward_positions(server)


async def _cursors_made(schema: str) -> bool:
    return len((await progress(schema)).acked) == SHARDS


async def _all_resolved(bridge: Bridge) -> bool:
    counts = await bridge.store.count_dead_letters()
    return sum(counts.values()) > 0 and all(
        counts[status] == 0
        for status in (DeadLetterStatus.DEAD, DeadLetterStatus.RETRYING)
    )


async def _wait_for(condition: Callable[[], Awaitable[bool]]) -> None:
    for _ in range(600):
        if await condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met within 30 s")


async def test_lost_database_sessions_are_resumed_without_loss_or_repeat(
    server: Running, start_bridge: BridgeFactory, simulator: ErpSimulator, schema: str
) -> None:
    skus = [f"SKU-{i}" for i in range(4)]
    await stock(server, skus, 30)
    bridge = await start_bridge(feed="ledger", lines_per_request=3)
    rng = seeded()
    load = asyncio.create_task(traffic(server, rng, skus, 200))

    # What a Postgres restart does to the bridge: every session of it ends, and with
    # them the stream locks; the server's sessions are left alone.
    killed = 0
    while not load.done():
        await asyncio.sleep(rng.uniform(0.05, 0.3))
        killed += await _terminate_sessions(application_name(bridge.config))
    await load
    await wait_caught_up(schema)

    assert killed > 0
    assert erp_positions(simulator) == stockward_positions(server)
    assert simulator.books.lines_applied == await effects_recorded(schema)


async def _terminate_sessions(name: str) -> int:
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        ended: int = await conn.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
            "FROM pg_stat_activity WHERE application_name = $1",
            name,
        )
    finally:
        await conn.close()
    return ended


async def test_a_flash_sale_nets_to_a_line_per_position(
    server: Running, start_bridge: BridgeFactory, simulator: ErpSimulator, schema: str
) -> None:
    await stock(server, ["HOT"], 100)
    for order in range(40):
        await server.inventory.Reserve(
            inventory_pb2.ReserveRequest(
                request_id=f"sale-{order}",
                channel="web",
                lines=[
                    inventory_pb2.ReserveLine(sku="HOT", quantity=1, location="DC-1")
                ],
            )
        )

    bridge = await start_bridge(feed="positions", lines_per_request=100)
    await wait_caught_up(schema)

    assert simulator.books.positions[("HOT", "DC-1")].held == 40
    assert bridge.counters.lines_in == 42
    assert bridge.counters.lines_out <= 3
    assert bridge.counters.netting_ratio >= 14


async def test_a_new_bridge_told_to_start_at_the_end_sends_only_what_follows(
    server: Running, start_bridge: BridgeFactory, simulator: ErpSimulator, schema: str
) -> None:
    await stock(server, ["OLD"], 10)

    await start_bridge(feed="ledger", start_from="end")
    await _wait_for(lambda: _cursors_made(schema))
    await stock(server, ["NEW"], 5)
    await wait_caught_up(schema)

    assert {sku for sku, _ in simulator.books.positions} == {"NEW"}


async def test_file_drop_batches_add_up_to_stockwards_positions(
    server: Running, start_bridge: BridgeFactory, schema: str, tmp_path: pathlib.Path
) -> None:
    skus = ["A", "B", "C"]
    await stock(server, skus, 20)
    drop = tmp_path / "drop"
    await start_bridge(
        feed="ledger", adapter="file", drop_dir=str(drop), lines_per_request=10
    )

    await traffic(server, seeded(), skus, 80)
    await wait_caught_up(schema)

    totals: dict[tuple[str, str], list[int]] = {}
    manifests = sorted(drop.glob("*.manifest.json"))
    assert len(manifests) == len(list(drop.glob("*.jsonl"))) > 1
    for manifest in manifests:
        described = json.loads(manifest.read_text())
        body = (drop / f"{described['batch_id']}.jsonl").read_bytes()
        assert hashlib.sha256(body).hexdigest() == described["sha256"]
        for text in body.decode().splitlines():
            line = json.loads(text)
            at = totals.setdefault((line["sku"], line["location"]), [0, 0])
            at[0] += line["on_hand_delta"]
            at[1] += line["held_delta"]
    dropped = {at: (v[0], v[1]) for at, v in totals.items() if v != [0, 0]}
    assert dropped == stockward_positions(server)


async def test_a_line_the_erp_refuses_as_invalid_is_dead_lettered_and_the_rest_booked(
    server: Running, start_bridge: BridgeFactory, schema: str
) -> None:
    erp = ErpSimulator(
        SimulatorConfig(
            requests_per_s=200,
            lines_per_s=20_000,
            sku_pattern="[A-Z0-9-]+",
            faults=Faults(latency_ms=1),
        )
    )
    await erp.start()
    try:
        skus = ["GOOD-1", "GOOD-2", "bad-1"]
        await stock(server, skus, 20)
        failures: list[BaseException] = []
        bridge = Bridge(
            bridge_config(schema, erp, feed="ledger", lines_per_request=6),
            on_fatal=failures.append,
        )
        await bridge.start()
        try:
            await traffic(server, seeded(), skus, 60)
            await wait_caught_up(schema)
            dead = await bridge.store.list_dead_letters(
                statuses=[DeadLetterStatus.DEAD], after_id=0, limit=1_000
            )
        finally:
            await bridge.stop()
    finally:
        await erp.stop()

    assert dead and {d.line.sku for d in dead} == {"bad-1"}
    assert {d.reason for d in dead} == {"INVALID_LINE"}
    good = {at: v for at, v in stockward_positions(server).items() if at[0] != "bad-1"}
    assert erp_positions(erp) == good
    assert erp.stats.invalid >= len(dead)
    assert not failures, failures
