"""Answers stay replayable for the retention window, then are forgotten everywhere."""

import asyncpg

from server.clock import FakeClock
from server.config import Config
from stockward.v1 import admin_pb2, inventory_pb2
from tests.conftest import DATABASE_URL, ServerFactory, stop_server

RETENTION_S = 3600


def _reserve(request_id: str) -> inventory_pb2.ReserveRequest:
    return inventory_pb2.ReserveRequest(
        request_id=request_id,
        channel="web",
        lines=[inventory_pb2.ReserveLine(sku="SKU-1", quantity=1, location="DC")],
    )


async def _request_log_size(schema: str) -> int:
    conn = await asyncpg.connect(DATABASE_URL, server_settings={"search_path": schema})
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM request_log")
        return count
    finally:
        await conn.close()


async def test_answers_replay_within_retention_and_are_forgotten_after_it(
    start_server: ServerFactory, clock: FakeClock, config: Config
) -> None:
    server = await start_server(idempotency_retention_s=RETENTION_S)
    await server.admin.SetOnHand(
        admin_pb2.SetOnHandRequest(
            source="erp",
            source_event_id="count-1",
            counts=[admin_pb2.OnHandCount(sku="SKU-1", location="DC", on_hand=10)],
        )
    )
    first = await server.inventory.Reserve(_reserve("r1"))

    clock.advance(RETENTION_S - 1)
    await stop_server(server)
    server = await start_server(idempotency_retention_s=RETENTION_S)
    assert (await server.inventory.Reserve(_reserve("r1"))).replayed

    clock.advance(2)
    server.app.ledger.engine.prune()
    await server.app.ledger.checkpoint()
    assert await _request_log_size(config.database_schema) == 0
    fresh = await server.inventory.Reserve(_reserve("r1"))
    assert not fresh.replayed
    assert fresh.reservation_id != first.reservation_id
