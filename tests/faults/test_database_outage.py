"""Postgres going away for real (a cut TCP proxy): health, answers and recovery."""

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from stockward.v1 import admin_pb2, inventory_pb2
from tests.conftest import DATABASE_URL, Running, ServerFactory
from tests.faults.proxy import CuttableProxy

# Health changes are awaited on the Watch stream, never polled; this bounds the wait.
_HEALTH_WAIT_S = 20.0


@pytest.fixture
async def proxy() -> AsyncIterator[CuttableProxy]:
    target = urlsplit(DATABASE_URL)
    proxy = CuttableProxy(
        target_host=target.hostname or "127.0.0.1", target_port=target.port or 5432
    )
    await proxy.start()
    yield proxy
    await proxy.close()


def _through(proxy: CuttableProxy) -> str:
    parts = urlsplit(DATABASE_URL)
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0] + "@" if len(netloc) == 2 else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{proxy.port}"))


async def _wait_for_health(server: Running, wanted: int) -> None:
    stub = health_pb2_grpc.HealthStub(server.channel)
    call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
    try:
        async with asyncio.timeout(_HEALTH_WAIT_S):
            async for update in call:
                if update.status == wanted:
                    return
    finally:
        call.cancel()


def _reserve(request_id: str) -> inventory_pb2.ReserveRequest:
    return inventory_pb2.ReserveRequest(
        request_id=request_id,
        channel="web",
        lines=[inventory_pb2.ReserveLine(sku="SKU-1", quantity=2, location="DC")],
    )


async def _held(server: Running) -> int:
    answer = await server.inventory.GetAvailability(
        inventory_pb2.GetAvailabilityRequest(skus=["SKU-1"])
    )
    return int(answer.skus[0].total.held)


async def test_outage_turns_health_off_answers_unavailable_and_recovers(
    start_server: ServerFactory, proxy: CuttableProxy
) -> None:
    server = await start_server(database_url=_through(proxy))
    await server.admin.SetOnHand(
        admin_pb2.SetOnHandRequest(
            source="erp",
            source_event_id="count-1",
            counts=[admin_pb2.OnHandCount(sku="SKU-1", location="DC", on_hand=10)],
        )
    )
    await server.inventory.Reserve(_reserve("before"))

    proxy.cut()
    await _wait_for_health(server, health_pb2.HealthCheckResponse.NOT_SERVING)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await server.inventory.Reserve(_reserve("during"))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    status = rpc_status.from_call(refused.value)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason in {"WRITE_FAILED", "NOT_SERVING"}

    proxy.restore()
    await _wait_for_health(server, health_pb2.HealthCheckResponse.SERVING)
    retried = await server.inventory.Reserve(_reserve("during"))
    assert retried.outcome == inventory_pb2.RESERVE_OUTCOME_RESERVED
    again = await server.inventory.Reserve(_reserve("during"))
    assert again.replayed and again.reservation_id == retried.reservation_id
    # One hold from before the outage, one from the retried request: never two.
    assert await _held(server) == 4
