"""How Reserve decides: all or nothing across lines unless partial holds are allowed,
locations in preference order, splitting, and why a line came up short."""

from stockward.v1 import inventory_pb2
from tests.api.client import (
    availability,
    availability_at,
    held_by_line,
    line,
    list_all,
    reservation,
    reserve,
    reserve_request,
    set_on_hand,
)
from tests.conftest import ServerFactory

RESERVED = inventory_pb2.RESERVE_OUTCOME_RESERVED
PARTIALLY_RESERVED = inventory_pb2.RESERVE_OUTCOME_PARTIALLY_RESERVED
REJECTED = inventory_pb2.RESERVE_OUTCOME_REJECTED
INSUFFICIENT_STOCK = inventory_pb2.SHORT_REASON_INSUFFICIENT_STOCK
OTHER_LINE_SHORT = inventory_pb2.SHORT_REASON_OTHER_LINE_SHORT
UNKNOWN_SKU = inventory_pb2.SHORT_REASON_UNKNOWN_SKU
UNKNOWN_LOCATION = inventory_pb2.SHORT_REASON_UNKNOWN_LOCATION
NOT_SHORT = inventory_pb2.SHORT_REASON_UNSPECIFIED


def held_at(result: inventory_pb2.ReserveLineResult) -> list[tuple[str, int]]:
    return [(item.location, item.quantity) for item in result.held_at]


async def test_one_short_line_rejects_the_whole_request_and_holds_nothing(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("SHOE", "DC", 10), ("SOCK", "DC", 1))

    response = await reserve(
        server,
        reserve_request(
            "r1", line("SHOE", 3, location="DC"), line("SOCK", 2, location="DC")
        ),
    )

    assert response.outcome == REJECTED
    assert response.reservation_id == ""
    assert not response.HasField("expires_at")
    shoe, sock = response.lines
    assert (shoe.short_reason, shoe.quantity_held, held_at(shoe)) == (
        OTHER_LINE_SHORT,
        0,
        [],
    )
    assert (sock.short_reason, sock.quantity_held, sock.quantity_available) == (
        INSUFFICIENT_STOCK,
        0,
        1,
    )
    assert await availability(server, "SHOE") == (10, 0, 10)
    assert await availability(server, "SOCK") == (1, 0, 1)
    assert await list_all(server, page_size=100) == [[]]


async def test_the_line_that_would_have_fitted_reports_what_was_available(
    start_server: ServerFactory,
) -> None:
    # The contract: "When short: the quantity that was available to sell at the
    # locations considered". The SHOE line is short (nothing held) and DC had 10.
    server = await start_server()
    await set_on_hand(server, "count-1", ("SHOE", "DC", 10), ("SOCK", "DC", 1))

    response = await reserve(
        server,
        reserve_request(
            "r1", line("SHOE", 3, location="DC"), line("SOCK", 2, location="DC")
        ),
    )

    shoe = response.lines[0]
    assert shoe.short_reason == OTHER_LINE_SHORT
    assert shoe.quantity_available == 10


async def test_allow_partial_holds_what_fits(start_server: ServerFactory) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("SHOE", "DC", 10), ("SOCK", "DC", 1))

    response = await reserve(
        server,
        reserve_request(
            "r1",
            line("SHOE", 3, location="DC"),
            line("SOCK", 2, location="DC"),
            line("GHOST", 1, location="DC"),
            allow_partial=True,
        ),
    )

    assert response.outcome == PARTIALLY_RESERVED
    shoe, sock, ghost = response.lines
    assert (shoe.short_reason, shoe.quantity_held) == (NOT_SHORT, 3)
    assert (sock.short_reason, sock.quantity_held, sock.quantity_available) == (
        INSUFFICIENT_STOCK,
        1,
        1,
    )
    assert (ghost.short_reason, ghost.quantity_held) == (UNKNOWN_SKU, 0)
    held = await reservation(server, response.reservation_id)
    assert held_by_line(held) == {("SHOE", "DC"): 3, ("SOCK", "DC"): 1}
    assert await availability(server, "SHOE") == (10, 3, 7)
    assert await availability(server, "SOCK") == (1, 1, 0)


async def test_allow_partial_with_nothing_to_hold_is_rejected(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("SOCK", "DC", 0))

    response = await reserve(
        server,
        reserve_request("r1", line("SOCK", 2, location="DC"), allow_partial=True),
    )

    assert response.outcome == REJECTED
    assert response.reservation_id == ""
    assert response.lines[0].short_reason == INSUFFICIENT_STOCK
    assert await list_all(server, page_size=100) == [[]]


async def test_lines_of_one_request_compete_for_the_same_units(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 5))

    rejected = await reserve(
        server,
        reserve_request(
            "r1", line("MUG", 3, location="DC"), line("MUG", 3, location="DC")
        ),
    )
    partial = await reserve(
        server,
        reserve_request(
            "r2",
            line("MUG", 3, location="DC"),
            line("MUG", 3, location="DC"),
            allow_partial=True,
        ),
    )

    assert rejected.outcome == REJECTED
    assert rejected.lines[1].quantity_available == 2
    assert partial.outcome == PARTIALLY_RESERVED
    assert [item.quantity_held for item in partial.lines] == [3, 2]
    held = await reservation(server, partial.reservation_id)
    assert held_by_line(held) == {("MUG", "DC"): 5}
    assert await availability(server, "MUG") == (5, 5, 0)


async def test_first_location_in_preference_order_that_covers_the_line_wins(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(
        server,
        "count-1",
        ("SHOE", "STORE", 5),
        ("SHOE", "SHOP", 2),
        ("SHOE", "DC", 100),
    )
    order = ("SHOP", "STORE", "DC")

    small = await reserve(
        server, reserve_request("r1", line("SHOE", 4, locations=order))
    )
    large = await reserve(
        server, reserve_request("r2", line("SHOE", 6, locations=order))
    )

    assert held_at(small.lines[0]) == [("STORE", 4)]
    assert held_at(large.lines[0]) == [("DC", 6)]
    assert await availability_at(server, "SHOE") == {
        "DC": (100, 6, 94),
        "SHOP": (2, 0, 2),
        "STORE": (5, 4, 1),
    }


async def test_allow_split_prefers_one_location_then_splits_in_preference_order(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(
        server, "count-1", ("SHOE", "STORE", 5), ("SHOE", "SHOP", 3), ("SHOE", "DC", 4)
    )
    order = ("SHOP", "STORE", "DC")

    whole = await reserve(
        server,
        reserve_request("r1", line("SHOE", 4, locations=order, allow_split=True)),
    )
    split = await reserve(
        server,
        reserve_request("r2", line("SHOE", 7, locations=order, allow_split=True)),
    )

    assert held_at(whole.lines[0]) == [("STORE", 4)]
    assert split.outcome == RESERVED
    assert held_at(split.lines[0]) == [("SHOP", 3), ("STORE", 1), ("DC", 3)]
    held = await reservation(server, split.reservation_id)
    assert held_by_line(held) == {
        ("SHOE", "SHOP"): 3,
        ("SHOE", "STORE"): 1,
        ("SHOE", "DC"): 3,
    }
    assert await availability(server, "SHOE") == (12, 11, 1)


async def test_split_that_cannot_cover_the_line_reports_the_sum_available(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("SHOE", "STORE", 5), ("SHOE", "SHOP", 3))

    response = await reserve(
        server,
        reserve_request(
            "r1", line("SHOE", 10, locations=("SHOP", "STORE"), allow_split=True)
        ),
    )

    assert response.outcome == REJECTED
    assert response.lines[0].short_reason == INSUFFICIENT_STOCK
    assert response.lines[0].quantity_available == 8
    assert await availability(server, "SHOE") == (8, 0, 8)


async def test_without_split_a_line_no_single_location_covers_is_short(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("SHOE", "STORE", 5), ("SHOE", "SHOP", 3))
    order = ("SHOP", "STORE")

    rejected = await reserve(
        server, reserve_request("r1", line("SHOE", 7, locations=order))
    )
    partial = await reserve(
        server,
        reserve_request("r2", line("SHOE", 7, locations=order), allow_partial=True),
    )

    assert rejected.outcome == REJECTED
    assert rejected.lines[0].short_reason == INSUFFICIENT_STOCK
    assert rejected.lines[0].quantity_available == 5
    assert partial.outcome == PARTIALLY_RESERVED
    assert held_at(partial.lines[0]) == [("STORE", 5)]
    assert await availability_at(server, "SHOE") == {
        "SHOP": (3, 0, 3),
        "STORE": (5, 5, 0),
    }


async def test_unknown_sku_and_unknown_location_are_reported_as_such(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("SHOE", "DC", 10), ("SOCK", "STORE", 4))

    response = await reserve(
        server,
        reserve_request(
            "r1",
            line("GHOST", 1, location="DC"),
            line("SHOE", 1, locations=("MOON", "MARS")),
            line("SHOE", 1, location="STORE"),
            allow_partial=True,
        ),
    )

    ghost, moon, store = response.lines
    assert (ghost.short_reason, ghost.quantity_available) == (UNKNOWN_SKU, 0)
    assert (moon.short_reason, moon.quantity_available) == (UNKNOWN_LOCATION, 0)
    # STORE is a known location that has never stocked SHOE.
    assert (store.short_reason, store.quantity_available) == (INSUFFICIENT_STOCK, 0)
    assert response.outcome == REJECTED
    assert await availability(server, "SHOE") == (10, 0, 10)


async def test_get_availability_says_which_skus_are_known(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("SHOE", "DC", 10), ("SHOE", "STORE", 4))

    response = await server.inventory.GetAvailability(
        inventory_pb2.GetAvailabilityRequest(
            skus=["SHOE", "GHOST"], locations=["STORE"]
        )
    )

    shoe, ghost = response.skus
    assert (shoe.known, shoe.total.on_hand) == (True, 4)
    assert [item.location for item in shoe.locations] == ["STORE"]
    assert (ghost.known, ghost.total.on_hand, list(ghost.locations)) == (False, 0, [])
