"""Shorthands for the bridge's end-to-end tests: traffic through the real server, the
positions on both sides, and waiting until the ERP has caught up."""

import asyncio
import dataclasses
import random
import secrets

import asyncpg
import grpc
import orjson

from erp_bridge.config import BridgeConfig
from erp_bridge.simulator import ErpSimulator
from server.wal.feed import lines_of
from stockward.v1 import admin_pb2, inventory_pb2, types_pb2
from tests.conftest import DATABASE_URL, Running

LOCATIONS = ("DC-1", "STORE-2")
# Longer than any catch-up of the small workloads here takes on a loaded CI machine.
CATCH_UP_TIMEOUT_S = 60.0
_POLL_S = 0.05

Positions = dict[tuple[str, str], tuple[int, int]]


def bridge_config(
    schema: str, simulator: ErpSimulator, **overrides: object
) -> BridgeConfig:
    """A bridge on the test's schema and simulator, with its own quota in Redis."""
    settings: dict[str, object] = {
        "database_url": DATABASE_URL,
        "database_schema": schema,
        "erp_url": simulator.url,
        "quota_key": "test-quota-" + secrets.token_hex(6),
        "requests_per_s": simulator.config.requests_per_s,
        "lines_per_request": simulator.config.lines_per_request,
        "lines_per_s": simulator.config.lines_per_s,
        "concurrent_requests_max": simulator.config.concurrent_max,
        "batch_window_s": 0.05,
        "poll_interval_s": 0.02,
        "backoff_first_s": 0.02,
        "backoff_max_s": 0.2,
        "breaker_open_s": 0.2,
        "request_timeout_s": 2.0,
        "admin_listen": "",
        "metrics_listen": "",
    }
    settings.update(overrides)
    return BridgeConfig(**settings)  # type: ignore[arg-type]


async def stock(server: Running, skus: list[str], units: int) -> None:
    await server.admin.AdjustStock(
        admin_pb2.AdjustStockRequest(
            source="wms",
            source_event_id="stock-" + secrets.token_hex(4),
            adjustments=[
                admin_pb2.StockAdjustment(
                    sku=sku,
                    location=location,
                    delta=units,
                    reason=admin_pb2.ADJUSTMENT_REASON_RECEIPT,
                )
                for sku in skus
                for location in LOCATIONS
            ],
        )
    )


async def traffic(
    server: Running, rng: random.Random, skus: list[str], steps: int
) -> int:
    """Random holds, releases, fulfilments and receipts; returns the calls that
    changed something."""
    held: list[str] = []
    changed = 0
    for step in range(steps):
        roll = rng.random()
        try:
            if roll < 0.5 or not held:
                response = await server.inventory.Reserve(
                    inventory_pb2.ReserveRequest(
                        request_id=f"t-{step}-{rng.random()}",
                        channel=rng.choice(("web", "app")),
                        lines=[
                            inventory_pb2.ReserveLine(
                                sku=rng.choice(skus),
                                quantity=rng.randint(1, 3),
                                location=rng.choice(LOCATIONS),
                            )
                        ],
                    )
                )
                # Out of stock is an answer (REJECTED with no id), not an error.
                if response.reservation_id:
                    held.append(response.reservation_id)
            elif roll < 0.7:
                await server.inventory.Release(
                    inventory_pb2.ReleaseRequest(
                        request_id=f"r-{step}", reservation_id=held.pop()
                    )
                )
            elif roll < 0.9:
                await server.inventory.Fulfill(
                    inventory_pb2.FulfillRequest(
                        request_id=f"f-{step}",
                        reservation_id=held.pop(rng.randrange(len(held))),
                    )
                )
            else:
                await stock(server, [rng.choice(skus)], rng.randint(1, 4))
            changed += 1
        except grpc.aio.AioRpcError as error:
            # Running out of stock is an expected answer of a random workload.
            assert error.code() is grpc.StatusCode.FAILED_PRECONDITION, error
    return changed


def stockward_positions(server: Running) -> Positions:
    positions = {}
    for position in server.app.ledger.engine.iter_positions():
        if position.on_hand or position.held:
            positions[(position.sku, position.location)] = (
                position.on_hand,
                position.held,
            )
    return positions


def erp_positions(simulator: ErpSimulator) -> Positions:
    return {
        at: (p.on_hand, p.held)
        for at, p in simulator.books.positions.items()
        if p.on_hand or p.held
    }


@dataclasses.dataclass(frozen=True)
class Progress:
    head: dict[int, int]
    acked: dict[int, int]
    planned: int


async def progress(schema: str, name: str = "erp") -> Progress:
    conn = await asyncpg.connect(DATABASE_URL, server_settings={"search_path": schema})
    try:
        heads = await conn.fetch(
            "SELECT shard, max(seq) AS head FROM wal_records GROUP BY shard"
        )
        cursors = await conn.fetch(
            "SELECT shard, acked_seq, acked_line, inflight_seq FROM bridge_cursors "
            "WHERE name = $1",
            name,
        )
    finally:
        await conn.close()
    return Progress(
        head={row["shard"]: row["head"] for row in heads},
        acked={
            row["shard"]: row["acked_seq"] for row in cursors if row["acked_line"] == 0
        },
        planned=sum(row["inflight_seq"] is not None for row in cursors),
    )


async def wait_caught_up(schema: str, name: str = "erp") -> None:
    """Until every shard's cursor has passed its last record, or fail."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CATCH_UP_TIMEOUT_S
    while True:
        state = await progress(schema, name)
        if state.planned == 0 and all(
            state.acked.get(shard, -1) >= head for shard, head in state.head.items()
        ):
            return
        assert loop.time() < deadline, f"bridge did not catch up: {state}"
        await asyncio.sleep(_POLL_S)


def quantity_line(sku: str, location: str, quantity: int) -> types_pb2.LineQuantity:
    return types_pb2.LineQuantity(sku=sku, location=location, quantity=quantity)


async def effects_recorded(schema: str) -> int:
    """Stock effects the records hold, as the ledger feed sends them."""
    conn = await asyncpg.connect(DATABASE_URL, server_settings={"search_path": schema})
    try:
        rows = await conn.fetch(
            "SELECT shard, seq, kind, reservation_id, body::text FROM wal_records"
        )
    finally:
        await conn.close()
    return sum(
        len(
            lines_of(
                shard=r["shard"],
                seq=r["seq"],
                kind=r["kind"],
                reservation_id=r["reservation_id"],
                body=orjson.loads(r["body"]),
            )
        )
        for r in rows
    )
