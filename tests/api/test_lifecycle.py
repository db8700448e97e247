"""A reservation's life over gRPC: hold, confirm, fulfil, release, list and look up."""

import grpc
import pytest

from server.clock import FakeClock
from stockward.v1 import admin_pb2, inventory_pb2, types_pb2
from tests.api.client import (
    availability,
    confirm,
    line,
    list_all,
    refusal,
    refused,
    reservation,
    reserve,
    reserve_request,
    set_on_hand,
    taken,
)
from tests.conftest import Running, ServerFactory, stop_server

PENDING = types_pb2.RESERVATION_STATE_PENDING
CONFIRMED = types_pb2.RESERVATION_STATE_CONFIRMED
RELEASED = types_pb2.RESERVATION_STATE_RELEASED
FULFILLED = types_pb2.RESERVATION_STATE_FULFILLED


async def hold(server: Running, request_id: str, *, channel: str = "web") -> str:
    """Reserve one unit of MUG at DC and return the reservation id."""
    response = await reserve(
        server,
        reserve_request(request_id, line("MUG", 1, location="DC"), channel=channel),
    )
    assert response.outcome == inventory_pb2.RESERVE_OUTCOME_RESERVED
    return response.reservation_id


async def test_fulfilling_a_confirmed_hold_in_two_parts_lowers_on_hand_and_finishes_it(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("SHOE", "DC", 10))

    held = await reserve(server, reserve_request("r1", line("SHOE", 6, location="DC")))
    assert held.outcome == inventory_pb2.RESERVE_OUTCOME_RESERVED
    assert await availability(server, "SHOE") == (10, 6, 4)

    confirmed = await confirm(server, held.reservation_id)
    assert confirmed.state == CONFIRMED
    assert not confirmed.HasField("expires_at")

    first = await server.inventory.Fulfill(
        inventory_pb2.FulfillRequest(
            request_id="ship-1",
            reservation_id=held.reservation_id,
            lines=[taken("SHOE", "DC", 2)],
        )
    )
    assert first.reservation.state == CONFIRMED
    assert first.reservation.lines[0].quantity_held == 4
    assert first.reservation.lines[0].quantity_fulfilled == 2
    assert await availability(server, "SHOE") == (8, 4, 4)

    rest = await server.inventory.Fulfill(
        inventory_pb2.FulfillRequest(
            request_id="ship-2", reservation_id=held.reservation_id
        )
    )
    assert rest.reservation.state == FULFILLED
    assert rest.reservation.lines[0].quantity_held == 0
    assert rest.reservation.lines[0].quantity_fulfilled == 6
    assert await availability(server, "SHOE") == (4, 0, 4)
    assert (await reservation(server, held.reservation_id)).state == FULFILLED


async def test_releasing_a_pending_hold_in_two_parts_restores_availability(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("SHOE", "DC", 10), ("SOCK", "DC", 5))
    held = await reserve(
        server,
        reserve_request(
            "r1", line("SHOE", 3, location="DC"), line("SOCK", 2, location="DC")
        ),
    )
    assert held.outcome == inventory_pb2.RESERVE_OUTCOME_RESERVED

    part = await server.inventory.Release(
        inventory_pb2.ReleaseRequest(
            request_id="give-1",
            reservation_id=held.reservation_id,
            lines=[taken("SHOE", "DC", 1)],
        )
    )
    assert part.reservation.state == PENDING
    assert await availability(server, "SHOE") == (10, 2, 8)
    assert await availability(server, "SOCK") == (5, 2, 3)

    rest = await server.inventory.Release(
        inventory_pb2.ReleaseRequest(
            request_id="give-2", reservation_id=held.reservation_id
        )
    )
    assert rest.reservation.state == RELEASED
    released = {item.sku: item.quantity_released for item in rest.reservation.lines}
    assert released == {"SHOE": 3, "SOCK": 2}
    assert await availability(server, "SHOE") == (10, 0, 10)
    assert await availability(server, "SOCK") == (5, 0, 5)


async def test_releasing_part_of_a_confirmed_hold_and_fulfilling_the_rest_is_fulfilled(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("SHOE", "DC", 10))
    held = await reserve(server, reserve_request("r1", line("SHOE", 4, location="DC")))
    await confirm(server, held.reservation_id)

    await server.inventory.Release(
        inventory_pb2.ReleaseRequest(
            request_id="give-1",
            reservation_id=held.reservation_id,
            lines=[taken("SHOE", "DC", 1)],
        )
    )
    done = await server.inventory.Fulfill(
        inventory_pb2.FulfillRequest(
            request_id="ship-1", reservation_id=held.reservation_id
        )
    )

    assert done.reservation.state == FULFILLED
    assert done.reservation.lines[0].quantity_released == 1
    assert done.reservation.lines[0].quantity_fulfilled == 3
    assert await availability(server, "SHOE") == (7, 0, 7)


async def test_releasing_more_than_is_held_is_refused_and_changes_nothing(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("SHOE", "DC", 10))
    held = await reserve(server, reserve_request("r1", line("SHOE", 3, location="DC")))

    error = await refused(
        server.inventory.Release(
            inventory_pb2.ReleaseRequest(
                request_id="give-1",
                reservation_id=held.reservation_id,
                lines=[taken("SHOE", "DC", 2), taken("SHOE", "DC", 2)],
            )
        )
    )

    assert refusal(error) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "QUANTITY_EXCEEDS_HELD",
        "lines[1].quantity",
    )
    assert await availability(server, "SHOE") == (10, 3, 7)
    assert (await reservation(server, held.reservation_id)).state == PENDING


async def test_get_reservation_of_an_unknown_id_is_not_found(
    start_server: ServerFactory,
) -> None:
    server = await start_server()

    error = await refused(
        server.inventory.GetReservation(
            inventory_pb2.GetReservationRequest(reservation_id="r-never-made")
        )
    )

    assert refusal(error) == (
        grpc.StatusCode.NOT_FOUND,
        "RESERVATION_NOT_FOUND",
        "reservation_id",
    )


async def test_confirming_a_released_hold_fails_precondition(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 5))
    reservation_id = await hold(server, "r1")
    await server.inventory.Release(
        inventory_pb2.ReleaseRequest(request_id="give-1", reservation_id=reservation_id)
    )

    error = await refused(confirm(server, reservation_id))

    assert refusal(error) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "RESERVATION_RELEASED",
        "reservation_id",
    )
    assert (await reservation(server, reservation_id)).state == RELEASED
    assert await availability(server, "MUG") == (5, 0, 5)


async def test_fulfilling_a_pending_hold_fails_precondition(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 5))
    reservation_id = await hold(server, "r1")

    error = await refused(
        server.inventory.Fulfill(
            inventory_pb2.FulfillRequest(
                request_id="ship-1", reservation_id=reservation_id
            )
        )
    )

    assert refusal(error) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "RESERVATION_PENDING",
        "reservation_id",
    )
    assert await availability(server, "MUG") == (5, 1, 4)


async def test_list_reservations_filters_by_channel_state_and_created_before(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 50))
    web_pending = await hold(server, "r1", channel="web")
    clock.advance(1)
    pos_confirmed = await hold(server, "r2", channel="pos")
    await confirm(server, pos_confirmed)
    clock.advance(1)
    cutoff_us = clock.now_us()
    web_released = await hold(server, "r3", channel="web")
    await server.inventory.Release(
        inventory_pb2.ReleaseRequest(request_id="give-3", reservation_id=web_released)
    )
    clock.advance(1)
    web_confirmed = await hold(server, "r4", channel="web")
    await confirm(server, web_confirmed)

    by_web = await list_all(server, page_size=100, channel="web")
    assert by_web == [[web_pending, web_released, web_confirmed]]

    by_confirmed = await list_all(server, page_size=100, state=CONFIRMED)
    assert by_confirmed == [[pos_confirmed, web_confirmed]]

    before_cutoff = await list_all(server, page_size=100, created_before_us=cutoff_us)
    assert before_cutoff == [[web_pending, pos_confirmed]]

    web_and_pending = await list_all(
        server, page_size=100, channel="web", state=PENDING
    )
    assert web_and_pending == [[web_pending]]

    nobody = await list_all(server, page_size=100, channel="kiosk")
    assert nobody == [[]]


@pytest.mark.parametrize("page_size", [1, 4, 5, 23, 1000])
async def test_list_reservations_pages_cover_every_reservation_exactly_once(
    start_server: ServerFactory, clock: FakeClock, page_size: int
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 100))
    made = []
    for index in range(20):
        made.append(await hold(server, f"r{index}"))
        # Three holds per instant, so that pages also break between holds that share
        # their creation time.
        if index % 3 == 2:
            clock.advance(1)

    pages = await list_all(server, page_size=page_size)

    listed = [reservation_id for page in pages for reservation_id in page]
    assert sorted(listed) == sorted(made)
    assert len(set(listed)) == len(listed)
    assert all(len(page) == page_size for page in pages[:-1])
    assert len(pages) == max(1, -(-len(made) // page_size))


async def test_list_reservations_created_before_the_epoch_lists_nothing(
    start_server: ServerFactory,
) -> None:
    # created_before is set (HasField) to 1970-01-01T00:00:00Z; every reservation was
    # created after it, so none matches.
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 5))
    await hold(server, "r1")
    request = inventory_pb2.ListReservationsRequest()
    request.created_before.FromMicroseconds(0)

    response = await server.inventory.ListReservations(request)

    assert list(response.reservations) == []


async def test_partial_fulfilment_and_release_survive_restarts(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("SHOE", "DC", 10), ("SOCK", "ST", 10))
    held = await reserve(
        server,
        reserve_request(
            "r1", line("SHOE", 5, location="DC"), line("SOCK", 4, location="ST")
        ),
    )
    await confirm(server, held.reservation_id)
    await server.inventory.Fulfill(
        inventory_pb2.FulfillRequest(
            request_id="ship-1",
            reservation_id=held.reservation_id,
            lines=[taken("SHOE", "DC", 2)],
        )
    )
    await stop_server(server)

    server = await start_server()
    assert await availability(server, "SHOE") == (8, 3, 5)
    assert await availability(server, "SOCK") == (10, 4, 6)
    await server.inventory.Release(
        inventory_pb2.ReleaseRequest(
            request_id="give-1",
            reservation_id=held.reservation_id,
            lines=[taken("SOCK", "ST", 1)],
        )
    )
    await stop_server(server)

    server = await start_server()
    assert await availability(server, "SHOE") == (8, 3, 5)
    assert await availability(server, "SOCK") == (10, 3, 7)
    after = await reservation(server, held.reservation_id)
    assert after.state == CONFIRMED
    assert {
        (item.sku, item.quantity_fulfilled, item.quantity_released)
        for item in after.lines
    } == {
        ("SHOE", 2, 0),
        ("SOCK", 0, 1),
    }


async def confirmed_hold_of_eight(server: Running) -> str:
    await set_on_hand(server, "count-1", ("MUG", "DC", 10))
    held = await reserve(server, reserve_request("r1", line("MUG", 8, location="DC")))
    await confirm(server, held.reservation_id)
    return held.reservation_id


async def fulfil_everything(server: Running, reservation_id: str) -> object:
    return await server.inventory.Fulfill(
        inventory_pb2.FulfillRequest(
            request_id="ship-all", reservation_id=reservation_id
        )
    )


ON_HAND_SHORT = (grpc.StatusCode.FAILED_PRECONDITION, "ON_HAND_SHORT", "lines")


async def test_fulfilling_more_than_a_count_left_on_hand_is_refused(
    start_server: ServerFactory,
) -> None:
    # A stock count may find fewer units than are held (shrinkage), leaving on-hand
    # below held. Shipping the whole hold then must be refused, not drive on-hand
    # negative and break an invariant.
    server = await start_server()
    reservation_id = await confirmed_hold_of_eight(server)
    await set_on_hand(server, "count-2", ("MUG", "DC", 5))
    assert await availability(server, "MUG") == (5, 8, 0)

    error = await refused(fulfil_everything(server, reservation_id))

    assert refusal(error) == ON_HAND_SHORT
    assert server.broken == []
    assert await availability(server, "MUG") == (5, 8, 0)
    assert (await reservation(server, reservation_id)).state == CONFIRMED


async def test_fulfilling_more_than_damage_left_on_hand_is_refused(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    reservation_id = await confirmed_hold_of_eight(server)
    await server.admin.AdjustStock(
        admin_pb2.AdjustStockRequest(
            source="wms",
            source_event_id="broken-pallet",
            adjustments=[
                admin_pb2.StockAdjustment(
                    sku="MUG",
                    location="DC",
                    delta=-6,
                    reason=admin_pb2.ADJUSTMENT_REASON_DAMAGE,
                )
            ],
        )
    )
    assert await availability(server, "MUG") == (4, 8, 0)

    error = await refused(fulfil_everything(server, reservation_id))
    part = await server.inventory.Fulfill(
        inventory_pb2.FulfillRequest(
            request_id="ship-part",
            reservation_id=reservation_id,
            lines=[taken("MUG", "DC", 4)],
        )
    )

    assert refusal(error) == ON_HAND_SHORT
    assert server.broken == []
    assert part.reservation.lines[0].quantity_held == 4
    assert await availability(server, "MUG") == (0, 4, 0)


async def test_list_reservations_pages_of_a_hundred_when_page_size_is_zero(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 500))
    await server.inventory.ExecuteBatch(
        inventory_pb2.ExecuteBatchRequest(
            commands=[
                inventory_pb2.Command(
                    reserve=reserve_request(f"r{index}", line("MUG", 1, location="DC"))
                )
                for index in range(130)
            ]
        )
    )

    pages = await list_all(server, page_size=0)

    assert [len(page) for page in pages] == [100, 30]


async def test_confirming_twice_answers_with_the_confirmed_hold(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 5))
    reservation_id = await hold(server, "r1")
    first = await confirm(server, reservation_id, request_id="pay-1")

    second = await confirm(server, reservation_id, request_id="pay-2")

    assert second.state == CONFIRMED
    assert second.lines == first.lines
    assert await availability(server, "MUG") == (5, 1, 4)


async def test_releasing_a_confirmed_hold_gives_its_units_back(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 5))
    reservation_id = await hold(server, "r1")
    await confirm(server, reservation_id)

    released = await server.inventory.Release(
        inventory_pb2.ReleaseRequest(request_id="give-1", reservation_id=reservation_id)
    )

    assert released.reservation.state == RELEASED
    assert await availability(server, "MUG") == (5, 0, 5)
    error = await refused(
        server.inventory.Fulfill(
            inventory_pb2.FulfillRequest(
                request_id="ship-1", reservation_id=reservation_id
            )
        )
    )
    assert refusal(error) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "RESERVATION_RELEASED",
        "reservation_id",
    )
