"""MoveReservation and ListAtRiskReservations over gRPC.

Move: held units of one sku change location atomically, count at the target at once
and free the source; a target short of stock (after safety stock, the channel's buffer
and other holds), more than is held, or a finished reservation is refused without
change; retries replay; moves survive a restart and work inside ExecuteBatch.

At risk: when a sale, a damage report or a count takes on-hand below held plus safety
stock, the newest holds at that position carry the shortfall, unit by unit; nothing
is released, and restoring stock clears the list.

Every server runs on the shared fake clock with its expiry loop ticking once a day, so
that no hold expires behind a test's back. Reservation ids are random, so tests that
rely on which hold is newer advance the clock between holds.
"""

from collections.abc import Awaitable, Callable

import grpc
import pytest

from server.clock import FakeClock
from stockward.v1 import admin_pb2, inventory_pb2, types_pb2
from tests.api.client import (
    availability_at,
    confirm,
    held_by_line,
    line,
    refusal,
    refused,
    reservation,
    reserve,
    reserve_request,
    set_on_hand,
    status_refusal,
    taken,
)
from tests.conftest import Running, ServerFactory, stop_server

RESERVED = inventory_pb2.RESERVE_OUTCOME_RESERVED
PENDING = types_pb2.RESERVATION_STATE_PENDING
CONFIRMED = types_pb2.RESERVATION_STATE_CONFIRMED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

ACTOR = "ops"
WEB, MARKET = "web", "marketplace"
QUIET_TICK_S = 24 * 3600.0
# Holds made a second apart, so that "newest" is unambiguous.
HOLD_GAP_S = 1.0

# A step that puts the server in the state a test needs.
Preparation = Callable[[Running], Awaitable[None]]
# The at-risk list as the tests compare it, in no particular order:
# reservation id -> (sku, location) -> units uncovered.
AtRisk = dict[str, dict[tuple[str, str], int]]


# Requests and reads ----------------------------------------------------------------------


def move_request(
    request_id: str,
    reservation_id: str,
    quantity: int,
    *,
    sku: str = "MUG",
    source: str = "DC",
    target: str = "STORE",
) -> inventory_pb2.MoveReservationRequest:
    return inventory_pb2.MoveReservationRequest(
        request_id=request_id,
        reservation_id=reservation_id,
        sku=sku,
        from_location=source,
        to_location=target,
        quantity=quantity,
    )


async def move(
    server: Running, request: inventory_pb2.MoveReservationRequest
) -> inventory_pb2.MoveReservationResponse:
    response: inventory_pb2.MoveReservationResponse = (
        await server.inventory.MoveReservation(request)
    )
    return response


async def hold(
    server: Running,
    request_id: str,
    quantity: int,
    *,
    sku: str = "MUG",
    location: str = "DC",
    channel: str = WEB,
) -> str:
    """A hold that must succeed; returns its id."""
    response = await reserve(
        server,
        reserve_request(
            request_id, line(sku, quantity, location=location), channel=channel
        ),
    )
    assert response.outcome == RESERVED, response
    return response.reservation_id


def lines_of(value: types_pb2.Reservation) -> list[tuple[str, str, int, int]]:
    """(sku, location, reserved, held) per line."""
    return [
        (x.sku, x.location, x.quantity_reserved, x.quantity_held) for x in value.lines
    ]


async def adjust(
    server: Running,
    event_id: str,
    delta: int,
    reason: admin_pb2.AdjustmentReason.ValueType,
    *,
    sku: str = "MUG",
    location: str = "DC",
) -> None:
    await server.admin.AdjustStock(
        admin_pb2.AdjustStockRequest(
            source="pos-12",
            source_event_id=event_id,
            adjustments=[
                admin_pb2.StockAdjustment(
                    sku=sku, location=location, delta=delta, reason=reason
                )
            ],
        )
    )


async def at_risk(server: Running, channel: str = "") -> AtRisk:
    response: admin_pb2.ListAtRiskReservationsResponse = (
        await server.admin.ListAtRiskReservations(
            admin_pb2.ListAtRiskReservationsRequest(channel=channel)
        )
    )
    listed: AtRisk = {}
    for item in response.reservations:
        reservation_id = item.reservation.reservation_id
        assert reservation_id not in listed, f"{reservation_id} listed twice"
        lines = {(x.sku, x.location): x.quantity_uncovered for x in item.lines}
        assert len(lines) == len(item.lines), f"{reservation_id}: a line twice"
        listed[reservation_id] = lines
    return listed


async def start_stocked(start_server: ServerFactory) -> Running:
    """MUG: 10 at DC, 10 at STORE."""
    server = await start_server(expiry_tick_s=QUIET_TICK_S)
    await set_on_hand(server, "count-1", ("MUG", "DC", 10), ("MUG", "STORE", 10))
    return server


# Move ------------------------------------------------------------------------------------


async def test_move_holds_at_the_target_and_frees_the_source(
    start_server: ServerFactory,
) -> None:
    server = await start_stocked(start_server)
    reservation_id = await hold(server, "r1", 4)

    moved = await move(server, move_request("m1", reservation_id, 3))

    assert not moved.replayed
    assert lines_of(moved.reservation) == [
        ("MUG", "DC", 1, 1),
        ("MUG", "STORE", 3, 3),
    ]
    assert moved.reservation.state == PENDING
    assert await availability_at(server, "MUG") == {
        "DC": (10, 1, 9),
        "STORE": (10, 3, 7),
    }
    assert held_by_line(await reservation(server, reservation_id)) == {
        ("MUG", "DC"): 1,
        ("MUG", "STORE"): 3,
    }
    # The freed units at DC are promptly available to another channel.
    other = await reserve(
        server, reserve_request("o1", line("MUG", 9, location="DC"), channel=MARKET)
    )
    assert other.outcome == RESERVED


async def test_moving_a_whole_line_drops_it_and_keeps_the_hold_pending_as_it_was(
    start_server: ServerFactory,
) -> None:
    server = await start_stocked(start_server)
    reservation_id = await hold(server, "r1", 4)
    before = await reservation(server, reservation_id)

    moved = await move(server, move_request("m1", reservation_id, 4))

    assert lines_of(moved.reservation) == [("MUG", "STORE", 4, 4)]
    assert moved.reservation.expires_at == before.expires_at
    assert await availability_at(server, "MUG") == {
        "DC": (10, 0, 10),
        "STORE": (10, 4, 6),
    }


async def test_confirmed_hold_moved_to_a_store_is_fulfilled_there(
    start_server: ServerFactory,
) -> None:
    server = await start_stocked(start_server)
    reservation_id = await hold(server, "r1", 2)
    await confirm(server, reservation_id)

    moved = await move(server, move_request("m1", reservation_id, 2))
    fulfilled: inventory_pb2.FulfillResponse = await server.inventory.Fulfill(
        inventory_pb2.FulfillRequest(request_id="f1", reservation_id=reservation_id)
    )

    assert moved.reservation.state == CONFIRMED
    assert fulfilled.reservation.state == types_pb2.RESERVATION_STATE_FULFILLED
    assert await availability_at(server, "MUG") == {
        "DC": (10, 0, 10),
        "STORE": (8, 0, 8),
    }


async def short_by_safety_stock(server: Running) -> None:
    await server.admin.SetSafetyStock(
        admin_pb2.SetSafetyStockRequest(
            actor=ACTOR,
            change_id="chg-1",
            levels=[admin_pb2.SafetyStock(sku="MUG", location="STORE", quantity=7)],
        )
    )


async def short_by_channel_buffer(server: Running) -> None:
    await server.admin.SetChannelBuffer(
        admin_pb2.SetChannelBufferRequest(
            actor=ACTOR,
            change_id="chg-1",
            buffers=[admin_pb2.ChannelBuffer(channel=WEB, sku="MUG", quantity=7)],
        )
    )


async def short_by_other_holds(server: Running) -> None:
    await hold(server, "other", 7, location="STORE", channel=MARKET)


@pytest.mark.parametrize(
    "make_target_short",
    [
        pytest.param(short_by_safety_stock, id="safety-stock"),
        pytest.param(short_by_channel_buffer, id="channel-buffer"),
        pytest.param(short_by_other_holds, id="other-holds"),
    ],
)
async def test_move_beyond_what_the_target_may_hold_is_refused_without_change(
    start_server: ServerFactory, make_target_short: Preparation
) -> None:
    server = await start_stocked(start_server)
    reservation_id = await hold(server, "r1", 4)
    await make_target_short(server)
    before = await availability_at(server, "MUG")

    error = await refused(move(server, move_request("m1", reservation_id, 4)))

    assert refusal(error) == (
        PRECONDITION,
        "INSUFFICIENT_STOCK_AT_TARGET",
        "to_location",
    )
    assert await availability_at(server, "MUG") == before
    assert lines_of(await reservation(server, reservation_id)) == [("MUG", "DC", 4, 4)]
    # What the target can still take for this channel moves.
    partly = await move(server, move_request("m2", reservation_id, 3))
    assert lines_of(partly.reservation) == [
        ("MUG", "DC", 1, 1),
        ("MUG", "STORE", 3, 3),
    ]


async def test_move_of_more_than_is_held_is_refused_without_change(
    start_server: ServerFactory,
) -> None:
    server = await start_stocked(start_server)
    reservation_id = await hold(server, "r1", 4)

    too_many = await refused(move(server, move_request("m1", reservation_id, 5)))
    not_there = await refused(
        move(server, move_request("m2", reservation_id, 1, source="STORE", target="DC"))
    )

    assert refusal(too_many) == (PRECONDITION, "QUANTITY_EXCEEDS_HELD", "quantity")
    assert refusal(not_there)[:2] == (PRECONDITION, "QUANTITY_EXCEEDS_HELD")
    assert lines_of(await reservation(server, reservation_id)) == [("MUG", "DC", 4, 4)]
    assert await availability_at(server, "MUG") == {
        "DC": (10, 4, 6),
        "STORE": (10, 0, 10),
    }


@pytest.mark.parametrize(
    ("finish", "reason"),
    [
        pytest.param("release", "RESERVATION_RELEASED", id="released"),
        pytest.param("fulfill", "RESERVATION_FULFILLED", id="fulfilled"),
    ],
)
async def test_move_of_a_finished_reservation_is_refused_without_change(
    start_server: ServerFactory, finish: str, reason: str
) -> None:
    server = await start_stocked(start_server)
    reservation_id = await hold(server, "r1", 4)
    if finish == "release":
        await server.inventory.Release(
            inventory_pb2.ReleaseRequest(request_id="x1", reservation_id=reservation_id)
        )
    else:
        await confirm(server, reservation_id)
        await server.inventory.Fulfill(
            inventory_pb2.FulfillRequest(request_id="x1", reservation_id=reservation_id)
        )
    before = await availability_at(server, "MUG")

    error = await refused(move(server, move_request("m1", reservation_id, 1)))

    assert refusal(error) == (PRECONDITION, reason, "reservation_id")
    assert await availability_at(server, "MUG") == before


async def test_move_of_an_expired_hold_is_refused(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_stocked(start_server)
    response = await reserve(
        server, reserve_request("r1", line("MUG", 4, location="DC"), ttl_s=60)
    )
    clock.advance(60)

    error = await refused(move(server, move_request("m1", response.reservation_id, 1)))

    assert refusal(error) == (PRECONDITION, "RESERVATION_EXPIRED", "reservation_id")
    assert (await availability_at(server, "MUG"))["STORE"] == (10, 0, 10)


async def test_move_retry_is_replayed_and_moves_nothing_more(
    start_server: ServerFactory,
) -> None:
    server = await start_stocked(start_server)
    reservation_id = await hold(server, "r1", 4)
    request = move_request("m1", reservation_id, 2)
    first = await move(server, request)

    again = await move(server, request)
    reused = await refused(move(server, move_request("m1", reservation_id, 1)))

    assert again.replayed
    assert lines_of(again.reservation) == lines_of(first.reservation)
    assert refusal(reused) == (INVALID, "REQUEST_ID_REUSED", "request_id")
    assert await availability_at(server, "MUG") == {
        "DC": (10, 2, 8),
        "STORE": (10, 2, 8),
    }


async def test_a_move_and_its_retry_survive_a_restart(
    start_server: ServerFactory,
) -> None:
    server = await start_stocked(start_server)
    reservation_id = await hold(server, "r1", 4)
    request = move_request("m1", reservation_id, 3)
    first = await move(server, request)
    await stop_server(server)

    server = await start_server(expiry_tick_s=QUIET_TICK_S)

    assert lines_of(await reservation(server, reservation_id)) == lines_of(
        first.reservation
    )
    assert await availability_at(server, "MUG") == {
        "DC": (10, 1, 9),
        "STORE": (10, 3, 7),
    }
    again = await move(server, request)
    assert again.replayed
    assert lines_of(again.reservation) == lines_of(first.reservation)
    assert (await availability_at(server, "MUG"))["STORE"] == (10, 3, 7)


async def test_moves_in_a_batch_are_answered_one_by_one(
    start_server: ServerFactory,
) -> None:
    server = await start_stocked(start_server)
    first_id = await hold(server, "r1", 4)
    second_id = await hold(server, "r2", 5)

    response: inventory_pb2.ExecuteBatchResponse = await server.inventory.ExecuteBatch(
        inventory_pb2.ExecuteBatchRequest(
            commands=[
                inventory_pb2.Command(move=move_request("b1", first_id, 4)),
                inventory_pb2.Command(move=move_request("b2", second_id, 7)),
                inventory_pb2.Command(move=move_request("b3", second_id, 5)),
                inventory_pb2.Command(
                    move=move_request("b4", second_id, 5, target="DC")
                ),
            ]
        )
    )

    kinds = [r.WhichOneof("result") for r in response.results]
    assert kinds == ["move", "error", "move", "error"]
    moved_first, too_many, moved_second, same_place = response.results
    assert lines_of(moved_first.move.reservation) == [("MUG", "STORE", 4, 4)]
    assert status_refusal(too_many.error) == (
        PRECONDITION,
        "QUANTITY_EXCEEDS_HELD",
        "quantity",
    )
    assert lines_of(moved_second.move.reservation) == [("MUG", "STORE", 5, 5)]
    assert status_refusal(same_place.error) == (
        INVALID,
        "SAME_LOCATION",
        "to_location",
    )
    assert await availability_at(server, "MUG") == {
        "DC": (10, 0, 10),
        "STORE": (10, 9, 1),
    }


# At risk ---------------------------------------------------------------------------------


async def three_holds(server: Running, clock: FakeClock) -> list[str]:
    """Web holds 3, 2 and 4 of MUG at DC (10 on hand), oldest first, a second apart;
    and 5 at STORE, which stays covered."""
    ids = []
    for n, quantity in enumerate((3, 2, 4)):
        ids.append(await hold(server, f"r{n}", quantity))
        clock.advance(HOLD_GAP_S)
    await hold(server, "store", 5, location="STORE")
    return ids


@pytest.mark.parametrize(
    "reason",
    [
        pytest.param(admin_pb2.ADJUSTMENT_REASON_POS_SALE, id="pos-sale"),
        pytest.param(admin_pb2.ADJUSTMENT_REASON_DAMAGE, id="damage"),
    ],
)
async def test_stock_taken_below_held_puts_the_newest_holds_at_risk(
    start_server: ServerFactory,
    clock: FakeClock,
    reason: admin_pb2.AdjustmentReason.ValueType,
) -> None:
    server = await start_stocked(start_server)
    oldest, middle, newest = await three_holds(server, clock)
    assert await at_risk(server) == {}

    await adjust(server, "e1", -6, reason)

    # 4 on hand for 9 held: the newest hold's 4 units and 1 of the middle one's.
    assert await at_risk(server) == {
        middle: {("MUG", "DC"): 1},
        newest: {("MUG", "DC"): 4},
    }
    # Nothing is released: every hold still holds all it had.
    for reservation_id, quantity in ((oldest, 3), (middle, 2), (newest, 4)):
        assert held_by_line(await reservation(server, reservation_id)) == {
            ("MUG", "DC"): quantity
        }
    assert (await availability_at(server, "MUG"))["DC"] == (4, 9, 0)
    # Each entry carries the reservation as it stands.
    response: admin_pb2.ListAtRiskReservationsResponse = (
        await server.admin.ListAtRiskReservations(
            admin_pb2.ListAtRiskReservationsRequest()
        )
    )
    for item in response.reservations:
        reservation_id = item.reservation.reservation_id
        assert item.reservation == await reservation(server, reservation_id)


async def test_count_below_held_lists_every_uncovered_unit(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_stocked(start_server)
    oldest, middle, newest = await three_holds(server, clock)

    await set_on_hand(server, "count-2", ("MUG", "DC", 1))

    assert await at_risk(server) == {
        oldest: {("MUG", "DC"): 2},
        middle: {("MUG", "DC"): 2},
        newest: {("MUG", "DC"): 4},
    }


async def test_safety_stock_counts_towards_the_shortfall(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_stocked(start_server)
    _, middle, newest = await three_holds(server, clock)

    await server.admin.SetSafetyStock(
        admin_pb2.SetSafetyStockRequest(
            actor=ACTOR,
            change_id="chg-1",
            levels=[admin_pb2.SafetyStock(sku="MUG", location="DC", quantity=3)],
        )
    )

    # 10 on hand keeps 3 back for 9 held: 2 uncovered.
    assert await at_risk(server) == {newest: {("MUG", "DC"): 2}}
    await adjust(server, "e1", -3, admin_pb2.ADJUSTMENT_REASON_DAMAGE)
    assert await at_risk(server) == {
        middle: {("MUG", "DC"): 1},
        newest: {("MUG", "DC"): 4},
    }


async def test_at_risk_by_channel_shows_that_channels_share_of_the_shortfall(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_stocked(start_server)
    web_old = await hold(server, "w1", 3)
    clock.advance(HOLD_GAP_S)
    market = await hold(server, "m1", 3, channel=MARKET)
    clock.advance(HOLD_GAP_S)
    web_new = await hold(server, "w2", 2)

    await adjust(server, "e1", -7, admin_pb2.ADJUSTMENT_REASON_POS_SALE)

    # 3 on hand for 8 held: web's newest 2, then 3 of the marketplace's.
    assert await at_risk(server, WEB) == {web_new: {("MUG", "DC"): 2}}
    assert await at_risk(server, MARKET) == {market: {("MUG", "DC"): 3}}
    assert await at_risk(server, "kiosk") == {}
    assert set(await at_risk(server)) == {market, web_new}
    await adjust(server, "e2", -1, admin_pb2.ADJUSTMENT_REASON_POS_SALE)
    assert await at_risk(server, WEB) == {
        web_old: {("MUG", "DC"): 1},
        web_new: {("MUG", "DC"): 2},
    }


async def test_one_reservation_short_at_two_positions_is_listed_once(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_stocked(start_server)
    await set_on_hand(server, "count-2", ("CUP", "DC", 5))
    response = await reserve(
        server,
        reserve_request(
            "r1",
            line("MUG", 3, location="DC"),
            line("CUP", 2, location="DC"),
            line("MUG", 1, location="STORE"),
        ),
    )

    await adjust(server, "e1", -8, admin_pb2.ADJUSTMENT_REASON_POS_SALE)
    await adjust(server, "e2", -4, admin_pb2.ADJUSTMENT_REASON_DAMAGE, sku="CUP")

    assert await at_risk(server) == {
        response.reservation_id: {("MUG", "DC"): 1, ("CUP", "DC"): 1}
    }


async def test_restoring_stock_clears_the_at_risk_list(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_stocked(start_server)
    ids = await three_holds(server, clock)
    await adjust(server, "e1", -6, admin_pb2.ADJUSTMENT_REASON_POS_SALE)
    assert len(await at_risk(server)) == 2

    await adjust(server, "e2", 4, admin_pb2.ADJUSTMENT_REASON_RETURN_TO_STOCK)
    assert set(await at_risk(server)) == {ids[2]}
    await adjust(server, "e3", 1, admin_pb2.ADJUSTMENT_REASON_RECEIPT)

    assert await at_risk(server) == {}
    assert (await availability_at(server, "MUG"))["DC"] == (9, 9, 0)


async def test_releasing_or_moving_the_uncovered_units_clears_them(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_stocked(start_server)
    _, middle, newest = await three_holds(server, clock)
    await adjust(server, "e1", -6, admin_pb2.ADJUSTMENT_REASON_POS_SALE)

    await move(server, move_request("m1", newest, 4))
    assert await at_risk(server) == {middle: {("MUG", "DC"): 1}}
    await server.inventory.Release(
        inventory_pb2.ReleaseRequest(
            request_id="x1",
            reservation_id=middle,
            lines=[taken("MUG", "DC", 1)],
        )
    )

    assert await at_risk(server) == {}
