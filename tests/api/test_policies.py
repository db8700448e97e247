"""Available-to-sell policies over gRPC: safety stock, channel buffers, location groups
and channel sourcing. What each does to availability and to Reserve, how each is
removed, how bad input is refused without changing anything, idempotency on (actor,
change_id), attribution, and survival across a restart, a SIGKILL and racing channels.

The concurrency test draws its request mix from a seed it prints; replay it with
STOCKWARD_SEED=<seed>.
"""

import asyncio
import os
import random
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from server.clock import FakeClock
from stockward.v1 import admin_pb2, admin_pb2_grpc, inventory_pb2, inventory_pb2_grpc
from tests.api.client import (
    availability_at,
    line,
    list_all,
    refusal,
    refused,
    reserve,
    reserve_request,
    set_on_hand,
)
from tests.conftest import Running, ServerFactory, stop_server
from tests.reliability.server_process import CHANNEL_OPTIONS, ServerProcess

RESERVED = inventory_pb2.RESERVE_OUTCOME_RESERVED
REJECTED = inventory_pb2.RESERVE_OUTCOME_REJECTED
INSUFFICIENT_STOCK = inventory_pb2.SHORT_REASON_INSUFFICIENT_STOCK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

ACTOR = "ops"
WEB, MARKET = "web", "marketplace"
# Every call to a server in another process gets this long; start-up is waited for
# separately (ServerProcess.wait_serving).
RPC_TIMEOUT_S = 10.0

PolicyRequest = (
    admin_pb2.SetSafetyStockRequest
    | admin_pb2.SetChannelBufferRequest
    | admin_pb2.SetLocationGroupRequest
    | admin_pb2.SetChannelSourcingRequest
)
# One location's view as GetAvailability shows it to a channel:
# (on_hand, held, safety_stock, buffer, available_to_sell).
View = tuple[int, int, int, int, int]


# Requests and reads ----------------------------------------------------------------------


def safety_request(
    change_id: str, *levels: tuple[str, str, int], actor: str = ACTOR
) -> admin_pb2.SetSafetyStockRequest:
    """Levels as (sku, location, quantity); sku "" is the location's default."""
    return admin_pb2.SetSafetyStockRequest(
        actor=actor,
        change_id=change_id,
        levels=[
            admin_pb2.SafetyStock(sku=sku, location=location, quantity=quantity)
            for sku, location, quantity in levels
        ],
    )


def buffer_request(
    change_id: str, *buffers: tuple[str, str, int], actor: str = ACTOR
) -> admin_pb2.SetChannelBufferRequest:
    """Buffers as (channel, sku, quantity); sku "" is the channel's default."""
    return admin_pb2.SetChannelBufferRequest(
        actor=actor,
        change_id=change_id,
        buffers=[
            admin_pb2.ChannelBuffer(channel=channel, sku=sku, quantity=quantity)
            for channel, sku, quantity in buffers
        ],
    )


def group_request(
    change_id: str, name: str, *locations: str, actor: str = ACTOR
) -> admin_pb2.SetLocationGroupRequest:
    return admin_pb2.SetLocationGroupRequest(
        actor=actor,
        change_id=change_id,
        group=admin_pb2.LocationGroup(name=name, locations=locations),
    )


def sourcing_request(
    change_id: str,
    channel: str,
    group: str,
    *,
    allow_split: bool = False,
    actor: str = ACTOR,
) -> admin_pb2.SetChannelSourcingRequest:
    return admin_pb2.SetChannelSourcingRequest(
        actor=actor,
        change_id=change_id,
        sourcing=admin_pb2.ChannelSourcing(
            channel=channel, location_group=group, allow_split=allow_split
        ),
    )


async def set_policy(
    admin: admin_pb2_grpc.StockAdminServiceStub, request: PolicyRequest
) -> bool:
    """Send one policy change; returns whether it was answered as a replay."""
    response: (
        admin_pb2.SetSafetyStockResponse
        | admin_pb2.SetChannelBufferResponse
        | admin_pb2.SetLocationGroupResponse
        | admin_pb2.SetChannelSourcingResponse
    )
    if isinstance(request, admin_pb2.SetSafetyStockRequest):
        response = await admin.SetSafetyStock(request, timeout=RPC_TIMEOUT_S)
    elif isinstance(request, admin_pb2.SetChannelBufferRequest):
        response = await admin.SetChannelBuffer(request, timeout=RPC_TIMEOUT_S)
    elif isinstance(request, admin_pb2.SetLocationGroupRequest):
        response = await admin.SetLocationGroup(request, timeout=RPC_TIMEOUT_S)
    else:
        response = await admin.SetChannelSourcing(request, timeout=RPC_TIMEOUT_S)
    return bool(response.replayed)


async def get_policies(
    admin: admin_pb2_grpc.StockAdminServiceStub,
) -> admin_pb2.GetPoliciesResponse:
    response: admin_pb2.GetPoliciesResponse = await admin.GetPolicies(
        admin_pb2.GetPoliciesRequest(), timeout=RPC_TIMEOUT_S
    )
    return response


def _view(value: inventory_pb2.Availability) -> View:
    return (
        value.on_hand,
        value.held,
        value.safety_stock,
        value.buffer,
        value.available_to_sell,
    )


async def channel_view(
    inventory: inventory_pb2_grpc.InventoryServiceStub, sku: str, channel: str
) -> tuple[dict[str, View], View]:
    """A sku as `channel` ("" for none) sees it: per location, and the total."""
    response: inventory_pb2.GetAvailabilityResponse = await inventory.GetAvailability(
        inventory_pb2.GetAvailabilityRequest(skus=[sku], channel=channel),
        timeout=RPC_TIMEOUT_S,
    )
    item = response.skus[0]
    locations = {x.location: _view(x.availability) for x in item.locations}
    return locations, _view(item.total)


def held_at(result: inventory_pb2.ReserveLineResult) -> list[tuple[str, int]]:
    return [(item.location, item.quantity) for item in result.held_at]


def safety_levels(
    policies: admin_pb2.GetPoliciesResponse,
) -> list[tuple[str, str, int]]:
    return [(x.sku, x.location, x.quantity) for x in policies.safety_stock]


def buffer_levels(
    policies: admin_pb2.GetPoliciesResponse,
) -> list[tuple[str, str, int]]:
    return [(x.channel, x.sku, x.quantity) for x in policies.buffers]


def attributed(value: admin_pb2.PolicyAttribution) -> tuple[str, str, int]:
    return value.actor, value.change_id, value.changed_at.ToMicroseconds()


# Safety stock ----------------------------------------------------------------------------


async def test_safety_stock_at_a_position_is_kept_back_from_every_channel(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 10), ("CUP", "DC", 10))

    await set_policy(server.admin, safety_request("chg-1", ("MUG", "DC", 3)))

    assert await availability_at(server, "MUG") == {"DC": (10, 0, 7)}
    assert await availability_at(server, "CUP") == {"DC": (10, 0, 10)}
    short = await reserve(
        server, reserve_request("r1", line("MUG", 8, location="DC"), channel=MARKET)
    )
    assert short.outcome == REJECTED
    assert (short.lines[0].short_reason, short.lines[0].quantity_available) == (
        INSUFFICIENT_STOCK,
        7,
    )
    fits = await reserve(server, reserve_request("r2", line("MUG", 7, location="DC")))
    assert fits.outcome == RESERVED
    assert await availability_at(server, "MUG") == {"DC": (10, 7, 0)}
    last = await reserve(server, reserve_request("r3", line("MUG", 1, location="DC")))
    assert (last.outcome, last.lines[0].quantity_available) == (REJECTED, 0)


async def test_location_default_safety_stock_covers_skus_without_their_own_level(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(
        server,
        "count-1",
        ("MUG", "STORE", 10),
        ("CUP", "STORE", 10),
        ("CUP", "DC", 10),
    )

    await set_policy(
        server.admin, safety_request("chg-1", ("", "STORE", 2), ("MUG", "STORE", 5))
    )

    assert await availability_at(server, "MUG") == {"STORE": (10, 0, 5)}
    assert await availability_at(server, "CUP") == {
        "DC": (10, 0, 10),
        "STORE": (10, 0, 8),
    }
    short = await reserve(
        server, reserve_request("r1", line("CUP", 9, location="STORE"))
    )
    assert (short.outcome, short.lines[0].quantity_available) == (REJECTED, 8)


async def test_stock_answers_show_available_to_sell_net_of_safety_stock(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_policy(server.admin, safety_request("chg-1", ("", "DC", 4)))

    counted = await set_on_hand(server, "count-1", ("MUG", "DC", 3), ("CUP", "DC", 9))

    assert [(p.sku, p.available_to_sell) for p in counted.positions] == [
        ("MUG", 0),
        ("CUP", 5),
    ]


# Channel buffers -------------------------------------------------------------------------


async def test_channel_buffer_hides_units_from_that_channel_only(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 10), ("CUP", "DC", 10))

    await set_policy(
        server.admin, buffer_request("chg-1", (MARKET, "", 4), (MARKET, "MUG", 1))
    )

    market_mug, _ = await channel_view(server.inventory, "MUG", MARKET)
    market_cup, _ = await channel_view(server.inventory, "CUP", MARKET)
    web_cup, _ = await channel_view(server.inventory, "CUP", WEB)
    assert market_mug == {"DC": (10, 0, 0, 1, 9)}
    assert market_cup == {"DC": (10, 0, 0, 4, 6)}
    assert web_cup == {"DC": (10, 0, 0, 0, 10)}

    short = await reserve(
        server, reserve_request("m1", line("CUP", 7, location="DC"), channel=MARKET)
    )
    assert (short.outcome, short.lines[0].quantity_available) == (REJECTED, 6)
    fits = await reserve(
        server, reserve_request("w1", line("CUP", 7, location="DC"), channel=WEB)
    )
    assert fits.outcome == RESERVED
    market_cup, _ = await channel_view(server.inventory, "CUP", MARKET)
    web_cup, _ = await channel_view(server.inventory, "CUP", WEB)
    assert market_cup == {"DC": (10, 7, 0, 4, 0)}
    assert web_cup == {"DC": (10, 7, 0, 0, 3)}


async def test_channel_view_of_availability_breaks_down_safety_stock_and_buffer(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 10), ("MUG", "STORE", 3))
    await set_policy(server.admin, safety_request("chg-1", ("MUG", "DC", 2)))
    await set_policy(server.admin, buffer_request("chg-2", (MARKET, "", 3)))
    await reserve(server, reserve_request("w1", line("MUG", 1, location="DC")))

    market, market_total = await channel_view(server.inventory, "MUG", MARKET)
    plain, plain_total = await channel_view(server.inventory, "MUG", "")

    assert market == {"DC": (10, 1, 2, 3, 4), "STORE": (3, 0, 0, 3, 0)}
    assert market_total == (13, 1, 2, 6, 4)
    assert plain == {"DC": (10, 1, 2, 0, 7), "STORE": (3, 0, 0, 0, 3)}
    assert plain_total == (13, 1, 2, 0, 10)


# Location groups and channel sourcing ---------------------------------------------------


async def source_web_from_group(server: Running, *, allow_split: bool) -> None:
    await set_on_hand(
        server,
        "count-1",
        ("MUG", "DC-EAST", 2),
        ("MUG", "DC-WEST", 5),
        ("MUG", "STORE-1", 9),
    )
    await set_policy(
        server.admin,
        group_request("chg-g", "ship-from", "DC-EAST", "DC-WEST", "STORE-1"),
    )
    await set_policy(
        server.admin,
        sourcing_request("chg-s", WEB, "ship-from", allow_split=allow_split),
    )


async def test_lines_without_location_draw_from_the_channel_group_in_priority_order(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await source_web_from_group(server, allow_split=False)

    three = await reserve(server, reserve_request("r1", line("MUG", 3)))
    two = await reserve(server, reserve_request("r2", line("MUG", 2)))
    four = await reserve(server, reserve_request("r3", line("MUG", 4)))
    ten = await reserve(server, reserve_request("r4", line("MUG", 10)))

    assert held_at(three.lines[0]) == [("DC-WEST", 3)]
    assert held_at(two.lines[0]) == [("DC-EAST", 2)]
    assert held_at(four.lines[0]) == [("STORE-1", 4)]
    # Without a split the line needs one location that covers it; STORE-1 has most.
    assert (ten.outcome, ten.lines[0].quantity_available) == (REJECTED, 5)
    assert await availability_at(server, "MUG") == {
        "DC-EAST": (2, 2, 0),
        "DC-WEST": (5, 3, 2),
        "STORE-1": (9, 4, 5),
    }


async def test_channel_sourcing_with_allow_split_splits_a_line_across_the_group(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await source_web_from_group(server, allow_split=True)

    split = await reserve(server, reserve_request("r1", line("MUG", 12)))
    one_place = await reserve(server, reserve_request("r2", line("MUG", 4)))

    assert split.outcome == RESERVED
    assert held_at(split.lines[0]) == [("DC-EAST", 2), ("DC-WEST", 5), ("STORE-1", 5)]
    assert held_at(one_place.lines[0]) == [("STORE-1", 4)]


async def test_a_pickup_line_with_a_location_reserves_only_at_that_store(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await source_web_from_group(server, allow_split=True)
    await set_on_hand(server, "count-2", ("MUG", "STORE-1", 1))

    too_many = await reserve(
        server, reserve_request("p1", line("MUG", 2, location="STORE-1"))
    )
    fits = await reserve(
        server, reserve_request("p2", line("MUG", 1, location="STORE-1"))
    )

    assert (too_many.outcome, too_many.lines[0].quantity_available) == (REJECTED, 1)
    assert held_at(fits.lines[0]) == [("STORE-1", 1)]
    assert await availability_at(server, "MUG") == {
        "DC-EAST": (2, 0, 2),
        "DC-WEST": (5, 0, 5),
        "STORE-1": (1, 1, 0),
    }


async def test_a_line_without_location_is_refused_for_a_channel_without_sourcing(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await source_web_from_group(server, allow_split=False)
    request = reserve_request(
        "m1", line("MUG", 1, location="DC-EAST"), line("MUG", 1), channel=MARKET
    )

    error = await refused(reserve(server, request))

    assert refusal(error) == (
        PRECONDITION,
        "CHANNEL_HAS_NO_SOURCING",
        "lines[1].location",
    )
    assert await list_all(server, page_size=100) == [[]]
    # The same lines from the channel that has a group are held.
    web = await reserve(
        server,
        reserve_request("w1", line("MUG", 2, location="DC-EAST"), line("MUG", 1)),
    )
    assert [held_at(x) for x in web.lines] == [[("DC-EAST", 2)], [("DC-WEST", 1)]]


# Removing settings -----------------------------------------------------------------------


async def test_zero_safety_stock_removes_the_level_and_the_default_applies_again(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "STORE", 10))
    await set_policy(
        server.admin, safety_request("chg-1", ("", "STORE", 2), ("MUG", "STORE", 5))
    )

    await set_policy(server.admin, safety_request("chg-2", ("MUG", "STORE", 0)))
    assert await availability_at(server, "MUG") == {"STORE": (10, 0, 8)}
    assert safety_levels(await get_policies(server.admin)) == [("", "STORE", 2)]

    await set_policy(server.admin, safety_request("chg-3", ("", "STORE", 0)))
    assert await availability_at(server, "MUG") == {"STORE": (10, 0, 10)}
    assert safety_levels(await get_policies(server.admin)) == []


async def test_zero_buffer_removes_it_and_the_channel_default_applies_again(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 10))
    await set_policy(
        server.admin, buffer_request("chg-1", (MARKET, "", 4), (MARKET, "MUG", 1))
    )

    await set_policy(server.admin, buffer_request("chg-2", (MARKET, "MUG", 0)))
    market, _ = await channel_view(server.inventory, "MUG", MARKET)
    assert market == {"DC": (10, 0, 0, 4, 6)}
    assert buffer_levels(await get_policies(server.admin)) == [(MARKET, "", 4)]

    await set_policy(server.admin, buffer_request("chg-3", (MARKET, "", 0)))
    market, _ = await channel_view(server.inventory, "MUG", MARKET)
    assert market == {"DC": (10, 0, 0, 0, 10)}
    assert buffer_levels(await get_policies(server.admin)) == []


async def test_removing_sourcing_then_its_group_leaves_no_default_to_draw_from(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await source_web_from_group(server, allow_split=False)

    await set_policy(server.admin, sourcing_request("chg-3", WEB, ""))
    error = await refused(reserve(server, reserve_request("r1", line("MUG", 1))))
    await set_policy(server.admin, group_request("chg-4", "ship-from"))

    assert refusal(error) == (
        PRECONDITION,
        "CHANNEL_HAS_NO_SOURCING",
        "lines[0].location",
    )
    policies = await get_policies(server.admin)
    assert list(policies.location_groups) == []
    assert list(policies.sourcing) == []


async def test_redefining_a_group_changes_where_its_channels_draw_from(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await source_web_from_group(server, allow_split=False)

    await set_policy(
        server.admin, group_request("chg-3", "ship-from", "STORE-1", "DC-WEST")
    )
    result = await reserve(server, reserve_request("r1", line("MUG", 2)))

    assert held_at(result.lines[0]) == [("STORE-1", 2)]
    (group,) = (await get_policies(server.admin)).location_groups
    assert (group.name, list(group.locations)) == ("ship-from", ["STORE-1", "DC-WEST"])


# Bad input ---------------------------------------------------------------------------------


def too_long(length_max: int) -> str:
    return "x" * (length_max + 1)


def case(request: Message, code: grpc.StatusCode, reason: str, field: str) -> Any:
    kind = type(request).__name__.removesuffix("Request")
    return pytest.param(request, (code, reason, field), id=f"{kind}-{reason}-{field}")


UNITS_MAX = 1_000_000_000_000
GOOD_LEVEL = ("CUP", "DC", 1)
GOOD_BUFFER = (WEB, "CUP", 1)

BAD_POLICY_CASES = [
    # Attribution and idempotency key, on every kind of change.
    case(
        safety_request("bad", GOOD_LEVEL, actor=""), INVALID, "FIELD_REQUIRED", "actor"
    ),
    case(
        buffer_request("bad", GOOD_BUFFER, actor=too_long(64)),
        INVALID,
        "FIELD_TOO_LONG",
        "actor",
    ),
    case(
        group_request("bad", "near", "DC", actor="o ps"),
        INVALID,
        "FIELD_MALFORMED",
        "actor",
    ),
    case(sourcing_request("", WEB, "ship"), INVALID, "FIELD_REQUIRED", "change_id"),
    case(
        safety_request(too_long(128), GOOD_LEVEL),
        INVALID,
        "FIELD_TOO_LONG",
        "change_id",
    ),
    case(buffer_request("b d", GOOD_BUFFER), INVALID, "FIELD_MALFORMED", "change_id"),
    # SetSafetyStock.
    case(safety_request("bad"), INVALID, "FIELD_REQUIRED", "levels"),
    case(
        safety_request("bad", *[("CUP", f"L{n}", 1) for n in range(1_001)]),
        INVALID,
        "TOO_MANY_ITEMS",
        "levels",
    ),
    case(
        safety_request("bad", GOOD_LEVEL, ("M UG", "DC", 1)),
        INVALID,
        "FIELD_MALFORMED",
        "levels[1].sku",
    ),
    case(
        safety_request("bad", (too_long(64), "DC", 1)),
        INVALID,
        "FIELD_TOO_LONG",
        "levels[0].sku",
    ),
    case(
        safety_request("bad", ("CUP", "", 1)),
        INVALID,
        "FIELD_REQUIRED",
        "levels[0].location",
    ),
    case(
        safety_request("bad", GOOD_LEVEL, ("MUG", "DC", -1)),
        INVALID,
        "UNITS_OUT_OF_RANGE",
        "levels[1].quantity",
    ),
    case(
        safety_request("bad", ("MUG", "DC", UNITS_MAX + 1)),
        INVALID,
        "UNITS_OUT_OF_RANGE",
        "levels[0].quantity",
    ),
    case(
        safety_request("bad", GOOD_LEVEL, ("CUP", "DC", 2)),
        INVALID,
        "DUPLICATE_POSITION",
        "levels[1]",
    ),
    # SetChannelBuffer.
    case(buffer_request("bad"), INVALID, "FIELD_REQUIRED", "buffers"),
    case(
        buffer_request("bad", GOOD_BUFFER, ("", "CUP", 1)),
        INVALID,
        "FIELD_REQUIRED",
        "buffers[1].channel",
    ),
    case(
        buffer_request("bad", (too_long(64), "CUP", 1)),
        INVALID,
        "FIELD_TOO_LONG",
        "buffers[0].channel",
    ),
    case(
        buffer_request("bad", (WEB, "C UP", 1)),
        INVALID,
        "FIELD_MALFORMED",
        "buffers[0].sku",
    ),
    case(
        buffer_request("bad", GOOD_BUFFER, (MARKET, "", -5)),
        INVALID,
        "UNITS_OUT_OF_RANGE",
        "buffers[1].quantity",
    ),
    case(
        buffer_request("bad", (MARKET, "", UNITS_MAX + 1)),
        INVALID,
        "UNITS_OUT_OF_RANGE",
        "buffers[0].quantity",
    ),
    case(
        buffer_request("bad", GOOD_BUFFER, (WEB, "CUP", 3)),
        INVALID,
        "DUPLICATE_BUFFER",
        "buffers[1]",
    ),
    # SetLocationGroup: the fields sit inside `group`.
    case(group_request("bad", "", "DC"), INVALID, "FIELD_REQUIRED", "group.name"),
    case(
        group_request("bad", too_long(64), "DC"),
        INVALID,
        "FIELD_TOO_LONG",
        "group.name",
    ),
    case(group_request("bad", "a b", "DC"), INVALID, "FIELD_MALFORMED", "group.name"),
    case(
        group_request("bad", "near", "DC", ""),
        INVALID,
        "FIELD_REQUIRED",
        "group.locations[1]",
    ),
    case(
        group_request("bad", "near", "DC", "STORE", "DC"),
        INVALID,
        "DUPLICATE_LOCATION",
        "group.locations",
    ),
    case(
        group_request("bad", "near", *[f"L{n}" for n in range(33)]),
        INVALID,
        "TOO_MANY_ITEMS",
        "group.locations",
    ),
    case(group_request("bad", "ship"), PRECONDITION, "GROUP_IN_USE", "group.name"),
    # SetChannelSourcing: the fields sit inside `sourcing`.
    case(
        sourcing_request("bad", "", "ship"),
        INVALID,
        "FIELD_REQUIRED",
        "sourcing.channel",
    ),
    case(
        sourcing_request("bad", "w eb", "ship"),
        INVALID,
        "FIELD_MALFORMED",
        "sourcing.channel",
    ),
    case(
        sourcing_request("bad", WEB, "s hip"),
        INVALID,
        "FIELD_MALFORMED",
        "sourcing.location_group",
    ),
    case(
        sourcing_request("bad", MARKET, "nowhere"),
        PRECONDITION,
        "GROUP_UNKNOWN",
        "sourcing.location_group",
    ),
]


@pytest.mark.parametrize(("request_", "expected"), BAD_POLICY_CASES)
async def test_bad_policy_change_is_refused_and_changes_nothing(
    start_server: ServerFactory,
    request_: PolicyRequest,
    expected: tuple[grpc.StatusCode, str, str],
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 10), ("CUP", "DC", 10))
    await set_policy(server.admin, safety_request("chg-1", ("MUG", "DC", 2)))
    await set_policy(server.admin, buffer_request("chg-2", (MARKET, "", 1)))
    await set_policy(server.admin, group_request("chg-3", "ship", "DC"))
    await set_policy(server.admin, sourcing_request("chg-4", WEB, "ship"))
    before = await get_policies(server.admin)
    views_before = await channel_view(server.inventory, "CUP", WEB)

    error = await refused(set_policy(server.admin, request_))

    assert await get_policies(server.admin) == before
    assert await channel_view(server.inventory, "CUP", WEB) == views_before
    assert refusal(error) == expected


async def test_a_refused_policy_change_leaves_its_change_id_unused(
    start_server: ServerFactory,
) -> None:
    server = await start_server()

    error = await refused(set_policy(server.admin, sourcing_request("c1", WEB, "ship")))
    await set_policy(server.admin, group_request("c0", "ship", "DC"))
    replayed = await set_policy(server.admin, sourcing_request("c1", WEB, "ship"))

    assert refusal(error)[:2] == (PRECONDITION, "GROUP_UNKNOWN")
    assert not replayed
    (sourcing,) = (await get_policies(server.admin)).sourcing
    assert (sourcing.channel, sourcing.location_group) == (WEB, "ship")


# Idempotency and attribution ----------------------------------------------------------


async def test_policy_change_retry_is_replayed_and_never_applied_again(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 10))
    first = buffer_request("chg-1", (MARKET, "", 5))

    assert not await set_policy(server.admin, first)
    assert not await set_policy(server.admin, buffer_request("chg-2", (MARKET, "", 2)))
    assert await set_policy(server.admin, first)

    (buffer,) = (await get_policies(server.admin)).buffers
    assert (buffer.quantity, buffer.attribution.change_id) == (2, "chg-2")
    market, _ = await channel_view(server.inventory, "MUG", MARKET)
    assert market == {"DC": (10, 0, 0, 2, 8)}


async def test_policy_change_id_reused_with_different_content_is_refused(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_policy(server.admin, safety_request("chg-1", ("MUG", "DC", 2)))
    before = await get_policies(server.admin)

    other_kind = await refused(
        set_policy(server.admin, buffer_request("chg-1", (WEB, "", 1)))
    )
    same_kind = await refused(
        set_policy(server.admin, safety_request("chg-1", ("MUG", "DC", 3)))
    )

    assert await get_policies(server.admin) == before
    assert refusal(other_kind)[:2] == (INVALID, "REQUEST_ID_REUSED")
    # The policy requests carry no request_id: the key they reuse is change_id.
    assert refusal(same_kind) == (INVALID, "REQUEST_ID_REUSED", "change_id")


async def test_the_same_change_id_from_another_actor_is_another_change(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_policy(server.admin, safety_request("chg-1", ("MUG", "DC", 2)))

    replayed = await set_policy(
        server.admin, safety_request("chg-1", ("MUG", "DC", 3), actor="planner")
    )

    assert not replayed
    (level,) = (await get_policies(server.admin)).safety_stock
    assert (level.quantity, level.attribution.actor) == (3, "planner")


async def test_policy_retries_after_a_restart_are_replayed_or_refused_as_before(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    safety = safety_request("chg-1", ("MUG", "DC", 2))
    group = group_request("chg-2", "ship", "DC", "STORE")
    await set_policy(server.admin, safety)
    await set_policy(server.admin, group)
    await stop_server(server)

    server = await start_server()
    replays = [await set_policy(server.admin, r) for r in (safety, group)]
    error = await refused(
        set_policy(server.admin, group_request("chg-2", "ship", "STORE"))
    )

    assert replays == [True, True]
    assert refusal(error)[:2] == (INVALID, "REQUEST_ID_REUSED")
    (group_now,) = (await get_policies(server.admin)).location_groups
    assert list(group_now.locations) == ["DC", "STORE"]


async def test_get_policies_shows_who_changed_each_setting_and_when(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_server()
    times_us = []
    changes: list[PolicyRequest] = [
        safety_request("c1", ("MUG", "DC", 2), actor="alice"),
        buffer_request("c2", (MARKET, "", 3), actor="bob"),
        group_request("c3", "ship", "DC", actor="carol"),
        sourcing_request("c4", WEB, "ship", allow_split=True, actor="dave"),
        safety_request("c5", ("", "STORE", 1), actor="erin"),
    ]
    for change in changes:
        clock.advance(60)
        times_us.append(clock.now_us())
        await set_policy(server.admin, change)
    clock.advance(60)
    # A retry answers from the log and leaves the attribution as it was.
    assert await set_policy(server.admin, changes[0])

    policies = await get_policies(server.admin)

    assert [
        (x.sku, x.location, attributed(x.attribution)) for x in policies.safety_stock
    ] == [
        ("", "STORE", ("erin", "c5", times_us[4])),
        ("MUG", "DC", ("alice", "c1", times_us[0])),
    ]
    assert [attributed(x.attribution) for x in policies.buffers] == [
        ("bob", "c2", times_us[1])
    ]
    assert [attributed(x.attribution) for x in policies.location_groups] == [
        ("carol", "c3", times_us[2])
    ]
    (sourcing,) = policies.sourcing
    assert (sourcing.channel, sourcing.location_group, sourcing.allow_split) == (
        WEB,
        "ship",
        True,
    )
    assert attributed(sourcing.attribution) == ("dave", "c4", times_us[3])


# Durability --------------------------------------------------------------------------------


# A fixed ETA (2030-01-01): the subprocess server runs on the real clock.
INBOUND_ETA_S = 1_893_456_000


async def set_every_kind_of_policy(
    admin: admin_pb2_grpc.StockAdminServiceStub,
) -> None:
    """Stock for the checks in `check_decisions_honour_policies`, then one policy of
    every kind, with a removal among them."""
    await admin.SetOnHand(
        admin_pb2.SetOnHandRequest(
            source="erp",
            source_event_id="count-1",
            counts=[
                admin_pb2.OnHandCount(sku="MUG", location="DC", on_hand=10),
                admin_pb2.OnHandCount(sku="MUG", location="STORE", on_hand=4),
            ],
        ),
        timeout=RPC_TIMEOUT_S,
    )
    await set_policy(admin, safety_request("chg-1", ("MUG", "DC", 3), ("", "STORE", 1)))
    await set_policy(admin, buffer_request("chg-2", (MARKET, "", 2), (WEB, "", 9)))
    await set_policy(admin, buffer_request("chg-3", (WEB, "", 0)))
    await set_policy(admin, group_request("chg-4", "ship", "STORE", "DC"))
    await set_policy(admin, sourcing_request("chg-5", MARKET, "ship"))
    # Inbound supply of another sku, partly received: its figure is a sum of deltas
    # from two records in different streams, which recovery must add up again.
    supply = admin_pb2.InboundSupply(sku="LAMP", location="DC", quantity=6)
    supply.eta.FromSeconds(INBOUND_ETA_S)
    await admin.SetInboundSupply(
        admin_pb2.SetInboundSupplyRequest(
            actor="erp", change_id="chg-6", supplies=[supply]
        ),
        timeout=RPC_TIMEOUT_S,
    )
    await admin.SetChannelPreorders(
        admin_pb2.SetChannelPreordersRequest(
            actor="ops", change_id="chg-7", channel=WEB, allowed=True
        ),
        timeout=RPC_TIMEOUT_S,
    )
    await admin.AdjustStock(
        admin_pb2.AdjustStockRequest(
            source="wms",
            source_event_id="receipt-1",
            adjustments=[
                admin_pb2.StockAdjustment(
                    sku="LAMP",
                    location="DC",
                    delta=2,
                    reason=admin_pb2.ADJUSTMENT_REASON_RECEIPT,
                )
            ],
        ),
        timeout=RPC_TIMEOUT_S,
    )


async def check_decisions_honour_policies(
    inventory: inventory_pb2_grpc.InventoryServiceStub,
) -> None:
    """MUG: DC 10 on hand with 3 safety stock, STORE 4 with 1; marketplace buffer 2,
    sourcing STORE then DC without split."""
    market: inventory_pb2.ReserveResponse = await inventory.Reserve(
        reserve_request("m1", line("MUG", 2), channel=MARKET), timeout=RPC_TIMEOUT_S
    )
    assert held_at(market.lines[0]) == [("DC", 2)]
    short: inventory_pb2.ReserveResponse = await inventory.Reserve(
        reserve_request("m2", line("MUG", 4), channel=MARKET), timeout=RPC_TIMEOUT_S
    )
    assert (short.outcome, short.lines[0].quantity_available) == (REJECTED, 3)
    web: inventory_pb2.ReserveResponse = await inventory.Reserve(
        reserve_request("w1", line("MUG", 6, location="DC"), channel=WEB),
        timeout=RPC_TIMEOUT_S,
    )
    # The web buffer was removed: web sees DC less safety stock and the hold above.
    assert (web.outcome, web.lines[0].quantity_available) == (REJECTED, 5)


async def test_policies_survive_a_restart(start_server: ServerFactory) -> None:
    server = await start_server()
    await set_every_kind_of_policy(server.admin)
    before = await get_policies(server.admin)
    await stop_server(server)

    server = await start_server()

    assert await get_policies(server.admin) == before
    await check_decisions_honour_policies(server.inventory)


async def test_policies_survive_a_sigkill_of_the_server_process(
    server_process: ServerProcess,
) -> None:
    await server_process.wait_serving()
    async with grpc.aio.insecure_channel(
        server_process.address, options=CHANNEL_OPTIONS
    ) as channel:
        admin = admin_pb2_grpc.StockAdminServiceStub(channel)
        await set_every_kind_of_policy(admin)
        before = await get_policies(admin)
        assert [(x.sku, x.quantity) for x in before.inbound] == [("LAMP", 4)]

    # SIGKILL: no drain and no checkpoint, so recovery replays the policy records.
    server_process.kill()
    await server_process.wait_exit()
    await server_process.start()
    await server_process.wait_serving()

    async with grpc.aio.insecure_channel(
        server_process.address, options=CHANNEL_OPTIONS
    ) as channel:
        admin = admin_pb2_grpc.StockAdminServiceStub(channel)
        assert await get_policies(admin) == before, server_process.log_tail()
        await check_decisions_honour_policies(
            inventory_pb2_grpc.InventoryServiceStub(channel)
        )
        assert await set_policy(admin, sourcing_request("chg-5", MARKET, "ship"))


# Racing channels -------------------------------------------------------------------------

RACE_ON_HAND = 100
RACE_SAFETY = 10
RACE_BUFFER = 20
# Reserves of 1 to 3 units each. The buffered channel sends most of them, so that if
# its buffer were not enforced under the race it would very likely hold beyond it; the
# other channel sends enough to press against the safety stock. Together they ask for
# about three times what may be held.
RACE_RESERVES = {MARKET: 130, WEB: 30}
RACE_VIEWS = 20


@pytest.fixture
def seed() -> int:
    """The run's seed: STOCKWARD_SEED if set, else a fresh one. Printed either way."""
    text = os.environ.get("STOCKWARD_SEED")
    value = int(text) if text else random.SystemRandom().randrange(2**32)
    print(f"STOCKWARD_SEED={value}")
    return value


async def test_racing_channels_never_hold_into_safety_stock_or_a_buffer(
    start_server: ServerFactory, seed: int
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", RACE_ON_HAND))
    await set_policy(server.admin, safety_request("chg-1", ("MUG", "DC", RACE_SAFETY)))
    await set_policy(
        server.admin, buffer_request("chg-2", (MARKET, "MUG", RACE_BUFFER))
    )
    rng = random.Random(seed)
    wanted = [
        (channel, rng.randint(1, 3))
        for channel, count in RACE_RESERVES.items()
        for _ in range(count)
    ]
    rng.shuffle(wanted)
    requests = [
        reserve_request(
            f"{channel}-{n}", line("MUG", quantity, location="DC"), channel=channel
        )
        for n, (channel, quantity) in enumerate(wanted)
    ]

    viewers = [(WEB, MARKET)[n % 2] for n in range(RACE_VIEWS)]
    responses, views = await asyncio.gather(
        asyncio.gather(*(reserve(server, r) for r in requests)),
        asyncio.gather(*(channel_view(server.inventory, "MUG", c) for c in viewers)),
    )

    may_hold = RACE_ON_HAND - RACE_SAFETY
    market_may_hold = may_hold - RACE_BUFFER
    held: dict[str, int] = {WEB: 0, MARKET: 0}
    refused_quantities: dict[str, list[int]] = {WEB: [], MARKET: []}
    for (channel, quantity), response in zip(wanted, responses, strict=True):
        result = response.lines[0]
        held[channel] += result.quantity_held
        if response.outcome == REJECTED:
            assert result.short_reason == INSUFFICIENT_STOCK
            assert result.quantity_available < quantity, f"seed={seed}"
            refused_quantities[channel].append(quantity)
        else:
            assert result.quantity_held == quantity
    assert held[MARKET] <= market_may_hold, f"seed={seed}: {held}"
    assert held[WEB] + held[MARKET] <= may_hold, f"seed={seed}: {held}"

    for viewer, (locations, _) in zip(viewers, views, strict=True):
        on_hand, seen_held, safety, buffer, available = locations["DC"]
        assert seen_held <= may_hold
        assert (safety, buffer) == (RACE_SAFETY, RACE_BUFFER if viewer == MARKET else 0)
        assert available == max(0, on_hand - seen_held - safety - buffer)

    total = held[WEB] + held[MARKET]
    web, _ = await channel_view(server.inventory, "MUG", WEB)
    market, _ = await channel_view(server.inventory, "MUG", MARKET)
    assert web == {"DC": (RACE_ON_HAND, total, RACE_SAFETY, 0, may_hold - total)}
    assert market["DC"][4] == max(0, market_may_hold - total)
    # Nothing was lost to the race: every refusal was for more than is left now.
    assert refused_quantities[MARKET], f"seed={seed}: demand never ran out"
    for channel, view in ((WEB, web), (MARKET, market)):
        if refused_quantities[channel]:
            left = view["DC"][4]
            assert left < min(refused_quantities[channel]), f"seed={seed} {channel}"
