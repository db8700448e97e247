"""Retries with the same idempotency key get the first answer and change nothing more,
before and after a restart; the same key with different content is refused."""

import grpc

from stockward.v1 import admin_pb2, inventory_pb2, types_pb2
from tests.api.client import (
    availability,
    confirm,
    line,
    refusal,
    refused,
    reservation,
    reserve,
    reserve_request,
    set_on_hand,
    taken,
)
from tests.conftest import ServerFactory, stop_server

REUSED = (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED", "request_id")
EVENT_REUSED = (
    grpc.StatusCode.INVALID_ARGUMENT,
    "REQUEST_ID_REUSED",
    "source_event_id",
)


def receipt(event_id: str, delta: int) -> admin_pb2.AdjustStockRequest:
    return admin_pb2.AdjustStockRequest(
        source="wms",
        source_event_id=event_id,
        adjustments=[
            admin_pb2.StockAdjustment(
                sku="MUG",
                location="DC",
                delta=delta,
                reason=admin_pb2.ADJUSTMENT_REASON_RECEIPT,
            )
        ],
    )


async def test_reserve_retry_replays_the_answer_without_holding_twice(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 10))
    request = reserve_request("order-7", line("MUG", 4, location="DC"))

    first = await reserve(server, request)
    again = await reserve(server, request)

    assert not first.replayed
    assert again.replayed
    assert again.reservation_id == first.reservation_id
    assert again.outcome == first.outcome
    assert again.lines == first.lines
    assert again.expires_at == first.expires_at
    assert await availability(server, "MUG") == (10, 4, 6)


async def test_rejected_reserve_retry_replays_rejection_even_once_stock_arrives(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 1))
    request = reserve_request("order-7", line("MUG", 4, location="DC"))
    first = await reserve(server, request)
    await set_on_hand(server, "count-2", ("MUG", "DC", 10))

    again = await reserve(server, request)

    assert first.outcome == inventory_pb2.RESERVE_OUTCOME_REJECTED
    assert again.replayed
    assert again.outcome == inventory_pb2.RESERVE_OUTCOME_REJECTED
    assert await availability(server, "MUG") == (10, 0, 10)


async def test_reserve_retry_with_different_content_is_refused_as_reused(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 10))
    await reserve(server, reserve_request("order-7", line("MUG", 4, location="DC")))

    error = await refused(
        reserve(server, reserve_request("order-7", line("MUG", 5, location="DC")))
    )

    assert refusal(error) == REUSED
    assert await availability(server, "MUG") == (10, 4, 6)


async def test_same_request_id_in_another_channel_is_a_new_request(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 10))

    web = await reserve(
        server, reserve_request("order-7", line("MUG", 4, location="DC"), channel="web")
    )
    pos = await reserve(
        server, reserve_request("order-7", line("MUG", 4, location="DC"), channel="pos")
    )

    assert not pos.replayed
    assert pos.reservation_id != web.reservation_id
    assert await availability(server, "MUG") == (10, 8, 2)


async def test_reserve_replay_and_reuse_check_survive_a_restart(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 10))
    request = reserve_request("order-7", line("MUG", 4, location="DC"), ttl_s=600)
    first = await reserve(server, request)
    await stop_server(server)

    server = await start_server()
    again = await reserve(server, request)
    error = await refused(
        reserve(server, reserve_request("order-7", line("MUG", 1, location="DC")))
    )

    assert again.replayed
    assert again.reservation_id == first.reservation_id
    assert again.expires_at == first.expires_at
    assert refusal(error) == REUSED
    assert await availability(server, "MUG") == (10, 4, 6)


async def test_set_on_hand_retry_is_applied_once_also_after_a_restart(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    first = await set_on_hand(server, "count-1", ("MUG", "DC", 10))
    await reserve(server, reserve_request("order-7", line("MUG", 3, location="DC")))
    # A later count wins; replaying the earlier one must not undo it.
    await set_on_hand(server, "count-2", ("MUG", "DC", 20))

    again = await set_on_hand(server, "count-1", ("MUG", "DC", 10))
    assert again.replayed
    assert again.positions == first.positions
    assert await availability(server, "MUG") == (20, 3, 17)
    await stop_server(server)

    server = await start_server()
    after_restart = await set_on_hand(server, "count-1", ("MUG", "DC", 10))
    assert after_restart.replayed
    assert after_restart.positions == first.positions
    assert await availability(server, "MUG") == (20, 3, 17)

    error = await refused(set_on_hand(server, "count-1", ("MUG", "DC", 11)))
    assert refusal(error) == EVENT_REUSED


async def test_adjust_stock_retry_is_applied_once_also_after_a_restart(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    first = await server.admin.AdjustStock(receipt("delivery-1", 7))
    again = await server.admin.AdjustStock(receipt("delivery-1", 7))

    assert not first.replayed
    assert again.replayed
    assert again.positions == first.positions
    assert await availability(server, "MUG") == (7, 0, 7)
    await stop_server(server)

    server = await start_server()
    after_restart = await server.admin.AdjustStock(receipt("delivery-1", 7))
    assert after_restart.replayed
    assert await availability(server, "MUG") == (7, 0, 7)

    error = await refused(server.admin.AdjustStock(receipt("delivery-1", 8)))
    assert refusal(error) == EVENT_REUSED

    second = await server.admin.AdjustStock(receipt("delivery-2", 3))
    assert not second.replayed
    assert await availability(server, "MUG") == (10, 0, 10)


async def test_confirm_retry_replays_and_reuse_for_another_reservation_is_refused(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 10))
    one = await reserve(server, reserve_request("r1", line("MUG", 1, location="DC")))
    two = await reserve(server, reserve_request("r2", line("MUG", 1, location="DC")))
    request = inventory_pb2.ConfirmRequest(
        request_id="pay-1", reservation_id=one.reservation_id
    )

    first = await server.inventory.Confirm(request)
    again = await server.inventory.Confirm(request)
    error = await refused(confirm(server, two.reservation_id, request_id="pay-1"))

    assert not first.replayed
    assert again.replayed
    assert again.reservation == first.reservation
    assert refusal(error) == REUSED
    assert (await reservation(server, two.reservation_id)).state == (
        types_pb2.RESERVATION_STATE_PENDING
    )


async def test_release_retry_gives_back_only_once_also_after_a_restart(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 10))
    held = await reserve(server, reserve_request("r1", line("MUG", 5, location="DC")))
    request = inventory_pb2.ReleaseRequest(
        request_id="give-1",
        reservation_id=held.reservation_id,
        lines=[taken("MUG", "DC", 2)],
    )

    first = await server.inventory.Release(request)
    again = await server.inventory.Release(request)

    assert again.replayed
    assert again.reservation == first.reservation
    assert first.reservation.lines[0].quantity_held == 3
    assert await availability(server, "MUG") == (10, 3, 7)
    await stop_server(server)

    server = await start_server()
    after_restart = await server.inventory.Release(request)
    assert after_restart.replayed
    assert after_restart.reservation == first.reservation
    assert await availability(server, "MUG") == (10, 3, 7)
