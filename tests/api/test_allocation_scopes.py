"""Channel allocations scoped to a location group, through the real gRPC server on
Postgres: ceilings and ring fences that count only at the group's locations, a channel
with pools in two groups, fulfilment and moves between scopes, lines sourced from a
group, channels racing for a fenced group's last units, the refusals that keep scopes
identical or disjoint, and pools after a restart and a SIGKILL.

The stock most tests start from: BOOT at EAST-1 (10), EAST-2 (6), WEST-1 (8) and
OUTLET (5). Group "east" is EAST-1 then EAST-2, "west" is WEST-1; OUTLET is in no
group. Pools are read back per scope as (quantity, remaining, exclusive). The race
prints its seed; replay it with STOCKWARD_SEED=<seed>.
"""

import asyncio
import collections
import os
import random

import grpc
import pytest

from server.clock import FakeClock
from stockward.v1 import admin_pb2, inventory_pb2, types_pb2
from tests.api.allocations_support import (
    ACTOR,
    APP,
    EXHAUSTED,
    INSUFFICIENT,
    MARKET,
    PARTIALLY_RESERVED,
    REJECTED,
    RESERVED,
    WEB,
    ChannelStubs,
    Stubs,
    allocate,
    allocation_request,
    channel_view,
    count,
    fulfil,
    policies,
    release,
    scoped_level,
    scoped_pools,
    set_group,
    sku_views,
)
from tests.api.client import (
    availability_at,
    line,
    refusal,
    refused,
    reservation,
    reserve,
    reserve_request,
    taken,
)
from tests.conftest import Running, ServerFactory, stop_server
from tests.reliability.server_process import CHANNEL_OPTIONS, ServerProcess
from tests.wal.durable import connect, stop_as_if_crashed

SKU = "BOOT"
OTHER = "SCARF"
EAST_1, EAST_2, WEST_1, OUTLET = "EAST-1", "EAST-2", "WEST-1", "OUTLET"
EAST, WEST = "east", "west"
# Shares EAST-2 with east and WEST-1 with west: never a scope beside either of them.
COAST = "coast"
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
OTHER_LINE_SHORT = inventory_pb2.SHORT_REASON_OTHER_LINE_SHORT
# The expiry loop sleeps on the fake clock; ticking once a day keeps it asleep while a
# test advances by minutes, so only the test's own sweep expires holds.
QUIET_TICK_S = 24 * 3600.0
# Every channel whose view the unchanged-state checks compare; "" is no channel.
VIEWERS = ("", WEB, MARKET, APP)

# GetPolicies and every channel's GetAvailability of both skus: what a refused change
# must leave exactly as it was.
State = tuple[admin_pb2.GetPoliciesResponse, list[list[inventory_pb2.SkuAvailability]]]


async def stocked(start_server: ServerFactory, **overrides: object) -> Running:
    """A server with the stock and the groups of the module docstring."""
    server = await start_server(**overrides)
    await stock_and_group(server)
    return server


async def stock_and_group(server: Stubs) -> None:
    await count(
        server,
        "count-1",
        (SKU, EAST_1, 10),
        (SKU, EAST_2, 6),
        (SKU, WEST_1, 8),
        (SKU, OUTLET, 5),
    )
    await set_group(server, "group-east", EAST, EAST_1, EAST_2)
    await set_group(server, "group-west", WEST, WEST_1)


async def reserve_at(
    server: Stubs,
    request_id: str,
    channel: str,
    quantity: int,
    *locations: str,
    sku: str = SKU,
    allow_partial: bool = False,
) -> inventory_pb2.ReserveResponse:
    """One line split across `locations` in order."""
    request = reserve_request(
        request_id,
        line(sku, quantity, locations=locations, allow_split=True),
        channel=channel,
        allow_partial=allow_partial,
    )
    response: inventory_pb2.ReserveResponse = await server.inventory.Reserve(request)
    return response


async def state_of(server: Stubs) -> State:
    return await policies(server), await sku_views(server, [SKU, OTHER], VIEWERS)


def held_at(result: inventory_pb2.ReserveLineResult) -> list[tuple[str, int]]:
    return [(item.location, item.quantity) for item in result.held_at]


def short(response: inventory_pb2.ReserveResponse) -> tuple[int, int, int]:
    """(outcome, short_reason, quantity_available) of a one-line answer."""
    result = response.lines[0]
    return response.outcome, result.short_reason, result.quantity_available


def lines_of(value: types_pb2.Reservation) -> dict[str, int]:
    """Units held per location of a one-sku reservation; lines held empty left out."""
    return {x.location: x.quantity_held for x in value.lines if x.quantity_held}


async def move(
    server: Stubs,
    request_id: str,
    reservation_id: str,
    quantity: int,
    *,
    source: str,
    target: str,
) -> types_pb2.Reservation:
    response: inventory_pb2.MoveReservationResponse = (
        await server.inventory.MoveReservation(
            inventory_pb2.MoveReservationRequest(
                request_id=request_id,
                reservation_id=reservation_id,
                sku=SKU,
                from_location=source,
                to_location=target,
                quantity=quantity,
            )
        )
    )
    return response.reservation


async def source_from(server: Stubs, change_id: str, channel: str, group: str) -> None:
    """Lines of `channel` without a location are split across `group`."""
    await server.admin.SetChannelSourcing(
        admin_pb2.SetChannelSourcingRequest(
            actor=ACTOR,
            change_id=change_id,
            sourcing=admin_pb2.ChannelSourcing(
                channel=channel, location_group=group, allow_split=True
            ),
        )
    )


# Ceilings and ring fences within a scope ----------------------------------------------


async def test_scoped_ceiling_limits_the_channel_only_at_its_groups_locations(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await allocate(server, "chg-1", scoped_level(SKU, WEB, 5, group=EAST))

    over = await reserve_at(server, "web-1", WEB, 6, EAST_1, EAST_2)
    west = await reserve_at(server, "web-2", WEB, 8, WEST_1)
    outlet = await reserve_at(server, "web-3", WEB, 5, OUTLET)
    assert await scoped_pools(server) == {(SKU, WEB, EAST): (5, 5, False)}
    within = await reserve_at(server, "web-4", WEB, 5, EAST_1, EAST_2)
    more = await reserve_at(server, "web-5", WEB, 1, EAST_2)
    others = await reserve_at(server, "market-1", MARKET, 11, EAST_1, EAST_2)

    assert short(over) == (REJECTED, EXHAUSTED, 5)
    assert [west.outcome, outlet.outcome] == [RESERVED, RESERVED]
    assert held_at(within.lines[0]) == [(EAST_1, 5)]
    assert short(more) == (REJECTED, EXHAUSTED, 0)
    # A ceiling fences nothing: the marketplace takes the rest of the group.
    assert held_at(others.lines[0]) == [(EAST_1, 5), (EAST_2, 6)]
    assert await scoped_pools(server) == {(SKU, WEB, EAST): (5, 0, False)}
    assert await availability_at(server, SKU) == {
        EAST_1: (10, 10, 0),
        EAST_2: (6, 6, 0),
        WEST_1: (8, 8, 0),
        OUTLET: (5, 5, 0),
    }


async def test_scoped_exclusive_pool_is_fenced_only_at_its_groups_locations(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await allocate(
        server, "chg-1", scoped_level(SKU, WEB, 8, group=EAST, exclusive=True)
    )
    # 29 on hand; 8 of the 16 in the east are fenced for web.
    assert await channel_view(server, SKU, MARKET) == (21, False, 0)
    assert await channel_view(server, SKU, WEB) == (21, True, 8)

    fenced = await reserve_at(server, "market-1", MARKET, 9, EAST_1, EAST_2)
    west = await reserve_at(server, "market-2", MARKET, 8, WEST_1)
    outlet = await reserve_at(server, "market-3", MARKET, 5, OUTLET)
    rest = await reserve_at(server, "market-4", MARKET, 8, EAST_1, EAST_2)
    one_more = await reserve_at(server, "market-5", MARKET, 1, EAST_2)
    own = await reserve_at(server, "web-1", WEB, 8, EAST_1, EAST_2)

    assert short(fenced) == (REJECTED, INSUFFICIENT, 8)
    assert [west.outcome, outlet.outcome] == [RESERVED, RESERVED]
    assert held_at(rest.lines[0]) == [(EAST_1, 8)]
    assert short(one_more) == (REJECTED, INSUFFICIENT, 0)
    assert held_at(own.lines[0]) == [(EAST_1, 2), (EAST_2, 6)]
    assert await scoped_pools(server) == {(SKU, WEB, EAST): (8, 0, True)}
    assert await channel_view(server, SKU, MARKET) == (0, False, 0)


async def test_a_channel_with_two_scoped_pools_draws_each_hold_on_the_covering_one(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await allocate(
        server,
        "chg-1",
        scoped_level(SKU, WEB, 4, group=EAST),
        scoped_level(SKU, WEB, 3, group=WEST),
    )

    split = await reserve_at(server, "web-1", WEB, 9, EAST_1, WEST_1, OUTLET)
    east_short = await reserve_at(server, "web-2", WEB, 1, EAST_2)

    # Each group gives what its own pool has; OUTLET, in neither, the rest.
    assert held_at(split.lines[0]) == [(EAST_1, 4), (WEST_1, 3), (OUTLET, 2)]
    assert short(east_short) == (REJECTED, EXHAUSTED, 0)
    assert await scoped_pools(server) == {
        (SKU, WEB, EAST): (4, 0, False),
        (SKU, WEB, WEST): (3, 0, False),
    }
    assert await channel_view(server, SKU, WEB) == (3, True, 0)

    await release(server, split.reservation_id, taken(SKU, WEST_1, 2))

    assert await scoped_pools(server) == {
        (SKU, WEB, EAST): (4, 0, False),
        (SKU, WEB, WEST): (3, 2, False),
    }
    assert await channel_view(server, SKU, WEB) == (5, True, 2)


async def test_fulfilment_consumes_the_pool_whose_scope_covers_each_line(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await allocate(
        server,
        "chg-1",
        scoped_level(SKU, WEB, 6, group=EAST, exclusive=True),
        scoped_level(SKU, WEB, 5, group=WEST),
    )
    made = await reserve(
        server,
        reserve_request(
            "web-1",
            line(SKU, 3, location=EAST_1),
            line(SKU, 2, location=WEST_1),
            line(SKU, 1, location=OUTLET),
        ),
    )

    await fulfil(
        server,
        made.reservation_id,
        taken(SKU, EAST_1, 2),
        taken(SKU, WEST_1, 1),
        taken(SKU, OUTLET, 1),
    )
    assert await scoped_pools(server) == {
        (SKU, WEB, EAST): (4, 3, True),
        (SKU, WEB, WEST): (4, 3, False),
    }
    await release(server, made.reservation_id)
    await fulfil(
        server, (await reserve_at(server, "m-1", MARKET, 2, EAST_2)).reservation_id
    )

    # Another channel's fulfilment in the east left web's pool alone.
    assert await scoped_pools(server) == {
        (SKU, WEB, EAST): (4, 4, True),
        (SKU, WEB, WEST): (4, 4, False),
    }
    # On hand 8 + 4 + 7 + 4; 4 of the east's 12 fenced for web.
    assert await channel_view(server, SKU, MARKET) == (19, False, 0)
    assert await channel_view(server, SKU, WEB) == (12, True, 8)


async def test_lines_of_one_request_share_the_pool_of_their_scope(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await allocate(server, "chg-1", scoped_level(SKU, WEB, 5, group=EAST))
    lines = (
        line(SKU, 3, location=EAST_1),
        line(SKU, 3, location=EAST_2),
        line(SKU, 3, location=WEST_1),
    )

    whole = await reserve(server, reserve_request("web-1", *lines))
    partial = await reserve(
        server, reserve_request("web-2", *lines, allow_partial=True)
    )

    assert whole.outcome == REJECTED
    assert [x.short_reason for x in whole.lines] == [
        OTHER_LINE_SHORT,
        EXHAUSTED,
        OTHER_LINE_SHORT,
    ]
    assert whole.lines[1].quantity_available == 2
    assert partial.outcome == PARTIALLY_RESERVED
    assert [x.quantity_held for x in partial.lines] == [3, 2, 3]
    assert await scoped_pools(server) == {(SKU, WEB, EAST): (5, 0, False)}


async def test_an_expired_hold_gives_back_to_the_pool_covering_it(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await stocked(start_server, expiry_tick_s=QUIET_TICK_S)
    await allocate(
        server, "chg-1", scoped_level(SKU, WEB, 4, group=EAST, exclusive=True)
    )
    for request_id, location in (("web-1", EAST_1), ("web-2", WEST_1)):
        request = reserve_request(request_id, line(SKU, 3, location=location), ttl_s=60)
        assert (await reserve(server, request)).outcome == RESERVED
    assert await scoped_pools(server) == {(SKU, WEB, EAST): (4, 1, True)}

    clock.advance(61)
    assert await server.app.ledger.sweep_expired() == 2

    assert await scoped_pools(server) == {(SKU, WEB, EAST): (4, 4, True)}
    assert await channel_view(server, SKU, MARKET) == (25, False, 0)


# Availability at some locations -------------------------------------------------------


async def total_at(server: Stubs, channel: str, *locations: str) -> int:
    """total.available_to_sell of BOOT at `locations`, as `channel` sees it."""
    response: inventory_pb2.GetAvailabilityResponse = (
        await server.inventory.GetAvailability(
            inventory_pb2.GetAvailabilityRequest(
                skus=[SKU], locations=locations, channel=channel
            )
        )
    )
    return int(response.skus[0].total.available_to_sell)


async def test_availability_at_a_groups_locations_is_capped_by_the_pool_scoped_there(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await allocate(server, "chg-1", scoped_level(SKU, WEB, 2, group=EAST))

    shown = await total_at(server, WEB, EAST_1, EAST_2)
    over = await reserve_at(server, "web-1", WEB, 3, EAST_1, EAST_2)

    # Reserve says web can hold 2 there; availability must not promise more.
    assert short(over) == (REJECTED, EXHAUSTED, 2)
    assert shown == 2


async def test_availability_at_a_fenced_groups_locations_leaves_out_the_fence(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await allocate(
        server, "chg-1", scoped_level(SKU, APP, 8, group=WEST, exclusive=True)
    )

    shown = await total_at(server, MARKET, WEST_1)
    fenced = await reserve_at(server, "market-1", MARKET, 1, WEST_1)

    # All 8 units at WEST-1 are fenced for app: the marketplace can hold none there.
    assert short(fenced) == (REJECTED, INSUFFICIENT, 0)
    assert shown == 0


# Moves between scopes -----------------------------------------------------------------


async def test_a_move_into_another_scope_must_fit_its_pool_or_changes_nothing(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await allocate(
        server,
        "chg-1",
        scoped_level(SKU, WEB, 3, group=EAST),
        scoped_level(SKU, WEB, 2, group=WEST),
    )
    rid = (await reserve_at(server, "web-1", WEB, 3, EAST_1)).reservation_id
    await reserve_at(server, "web-2", WEB, 1, WEST_1)
    before = await state_of(server)

    error = await refused(move(server, "mv-1", rid, 2, source=EAST_1, target=WEST_1))

    assert refusal(error) == (
        PRECONDITION,
        "INSUFFICIENT_STOCK_AT_TARGET",
        "to_location",
    )
    assert await state_of(server) == before
    assert lines_of(await reservation(server, rid)) == {EAST_1: 3}
    moved = await move(server, "mv-2", rid, 1, source=EAST_1, target=WEST_1)
    assert lines_of(moved) == {EAST_1: 2, WEST_1: 1}
    assert await scoped_pools(server) == {
        (SKU, WEB, EAST): (3, 1, False),
        (SKU, WEB, WEST): (2, 0, False),
    }


async def test_moves_within_a_scope_or_out_of_every_scope_need_no_room_in_a_pool(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await allocate(server, "chg-1", scoped_level(SKU, WEB, 3, group=EAST))
    rid = (await reserve_at(server, "web-1", WEB, 3, EAST_1)).reservation_id

    # The east pool has nothing left, yet a move inside the east uses no more of it.
    within = await move(server, "mv-1", rid, 2, source=EAST_1, target=EAST_2)
    assert lines_of(within) == {EAST_1: 1, EAST_2: 2}
    assert await scoped_pools(server) == {(SKU, WEB, EAST): (3, 0, False)}
    out = await move(server, "mv-2", rid, 2, source=EAST_2, target=OUTLET)

    assert lines_of(out) == {EAST_1: 1, OUTLET: 2}
    assert await scoped_pools(server) == {(SKU, WEB, EAST): (3, 2, False)}


async def test_another_channels_move_into_a_fenced_scope_leaves_the_fence_whole(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await allocate(
        server, "chg-1", scoped_level(SKU, WEB, 8, group=EAST, exclusive=True)
    )
    await reserve_at(server, "market-1", MARKET, 4, EAST_1)
    rid = (await reserve_at(server, "market-2", MARKET, 5, OUTLET)).reservation_id
    before = await state_of(server)

    # The east has 12 free, 8 of them fenced: room for 4 of the marketplace's 5.
    error = await refused(move(server, "mv-1", rid, 5, source=OUTLET, target=EAST_2))
    assert refusal(error) == (
        PRECONDITION,
        "INSUFFICIENT_STOCK_AT_TARGET",
        "to_location",
    )
    assert await state_of(server) == before
    moved = await move(server, "mv-2", rid, 4, source=OUTLET, target=EAST_2)
    own = await reserve_at(server, "web-1", WEB, 8, EAST_1, EAST_2)

    assert lines_of(moved) == {OUTLET: 1, EAST_2: 4}
    assert held_at(own.lines[0]) == [(EAST_1, 6), (EAST_2, 2)]
    assert await scoped_pools(server) == {(SKU, WEB, EAST): (8, 0, True)}


# Lines sourced from a group -----------------------------------------------------------


async def test_lines_sourced_from_a_scoped_group_keep_to_its_pool_and_its_fence(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await source_from(server, "src-web", WEB, EAST)
    await source_from(server, "src-market", MARKET, EAST)
    await allocate(
        server, "chg-1", scoped_level(SKU, WEB, 5, group=EAST, exclusive=True)
    )

    web_over = await reserve(server, reserve_request("web-1", line(SKU, 6)))
    web_first = await reserve(server, reserve_request("web-2", line(SKU, 3)))
    market_over = await reserve(
        server, reserve_request("market-1", line(SKU, 14), channel=MARKET)
    )
    market_rest = await reserve(
        server, reserve_request("market-2", line(SKU, 11), channel=MARKET)
    )
    web_rest = await reserve(server, reserve_request("web-3", line(SKU, 2)))

    assert short(web_over) == (REJECTED, EXHAUSTED, 5)
    assert held_at(web_first.lines[0]) == [(EAST_1, 3)]
    # 13 free in the east less web's 2 still fenced.
    assert short(market_over) == (REJECTED, INSUFFICIENT, 11)
    assert held_at(market_rest.lines[0]) == [(EAST_1, 7), (EAST_2, 4)]
    assert held_at(web_rest.lines[0]) == [(EAST_2, 2)]
    assert await scoped_pools(server) == {(SKU, WEB, EAST): (5, 0, True)}
    assert await availability_at(server, SKU) == {
        EAST_1: (10, 10, 0),
        EAST_2: (6, 6, 0),
        WEST_1: (8, 0, 8),
        OUTLET: (5, 0, 5),
    }


async def test_a_sourcing_group_spanning_scopes_draws_on_a_pool_only_inside_its_scope(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await set_group(server, "group-far", "far", EAST_1, WEST_1)
    await source_from(server, "src-web", WEB, "far")
    await allocate(server, "chg-1", scoped_level(SKU, WEB, 2, group=EAST))

    over = await reserve(server, reserve_request("web-1", line(SKU, 12)))
    fits = await reserve(server, reserve_request("web-2", line(SKU, 10)))

    assert short(over) == (REJECTED, EXHAUSTED, 10)
    assert held_at(fits.lines[0]) == [(EAST_1, 2), (WEST_1, 8)]
    assert await scoped_pools(server) == {(SKU, WEB, EAST): (2, 0, False)}


# A race for a fenced group's last units -----------------------------------------------

RACE_ON_HAND = {EAST_1: 60, EAST_2: 40, WEST_1: 50}
RACE_POOL = 30
# One-unit Reserves per (channel, where). Each channel asks for the whole east on its
# own, so every unit there is fought over; the west is asked for exactly what it has,
# by web too, to show that holds outside the scope never touch the pool.
RACE_DEMAND = {
    (WEB, EAST): 120,
    (MARKET, EAST): 120,
    (APP, EAST): 120,
    (WEB, WEST): 30,
    (MARKET, WEST): 20,
}
RACE_PLACES = {EAST: (EAST_1, EAST_2), WEST: (WEST_1,)}
RACE_WATCHES = 20


@pytest.fixture
def seed() -> int:
    """The race's seed: STOCKWARD_SEED if set, else a fresh one. Printed either way."""
    text = os.environ.get("STOCKWARD_SEED")
    value = int(text) if text else random.SystemRandom().randrange(2**32)
    print(f"STOCKWARD_SEED={value}")
    return value


def race_requests(seed: int) -> list[tuple[str, str]]:
    """(channel, group) per one-unit Reserve, shuffled by the seed."""
    wanted = [key for key, reserves in RACE_DEMAND.items() for _ in range(reserves)]
    random.Random(seed).shuffle(wanted)
    return wanted


async def test_channels_racing_for_a_fenced_groups_last_units_never_take_the_fence(
    start_server: ServerFactory, seed: int
) -> None:
    server = await start_server()
    await count(
        server, "count-1", *((SKU, x, units) for x, units in RACE_ON_HAND.items())
    )
    await set_group(server, "group-east", EAST, EAST_1, EAST_2)
    await set_group(server, "group-west", WEST, WEST_1)
    await allocate(
        server, "chg-1", scoped_level(SKU, WEB, RACE_POOL, group=EAST, exclusive=True)
    )
    wanted = race_requests(seed)
    seen: list[dict[tuple[str, str, str], tuple[int, int, bool]]] = []

    async def watch() -> None:
        for _ in range(RACE_WATCHES):
            seen.append(await scoped_pools(server))

    answers, _ = await asyncio.gather(
        asyncio.gather(
            *(
                reserve_at(server, f"{channel}-{n}", channel, 1, *RACE_PLACES[group])
                for n, (channel, group) in enumerate(wanted)
            )
        ),
        watch(),
    )

    won: collections.Counter[tuple[str, str]] = collections.Counter()
    reasons: dict[str, set[int]] = {WEB: set(), MARKET: set(), APP: set()}
    held_by_location: collections.Counter[str] = collections.Counter()
    for (channel, group), answer in zip(wanted, answers, strict=True):
        if answer.outcome == RESERVED:
            won[(channel, group)] += 1
            held_by_location.update(dict(held_at(answer.lines[0])))
        else:
            assert answer.lines[0].quantity_available == 0, f"seed={seed}"
            reasons[channel].add(answer.lines[0].short_reason)
    assert won[(WEB, EAST)] == RACE_POOL, f"seed={seed}: {won}"
    assert won[(MARKET, EAST)] + won[(APP, EAST)] == 100 - RACE_POOL, f"seed={seed}"
    assert (won[(WEB, WEST)], won[(MARKET, WEST)]) == (30, 20), f"seed={seed}"
    # Only web runs out of its own pool; the others only ever run out of stock.
    assert reasons[WEB] <= {EXHAUSTED, INSUFFICIENT}, f"seed={seed}"
    assert reasons[MARKET] == reasons[APP] == {INSUFFICIENT}, f"seed={seed}"

    assert await scoped_pools(server) == {(SKU, WEB, EAST): (RACE_POOL, 0, True)}
    shown = await availability_at(server, SKU)
    assert shown == {x: (units, units, 0) for x, units in RACE_ON_HAND.items()}
    assert {x: held for x, (_, held, _) in shown.items()} == held_by_location
    for channel in (WEB, MARKET, APP):
        assert (await channel_view(server, SKU, channel))[0] == 0
    assert all(
        view[(SKU, WEB, EAST)][0] == RACE_POOL
        and 0 <= view[(SKU, WEB, EAST)][1] <= RACE_POOL
        for view in seen
    ), f"seed={seed}"


# Refusals -----------------------------------------------------------------------------


async def stocked_with_scopes(start_server: ServerFactory) -> Running:
    """Web's fenced east pool and the marketplace's west ceiling of BOOT, app's pool
    of SCARF at every location, some holds, and the overlapping group "coast"."""
    server = await stocked(start_server)
    await count(server, "count-2", (OTHER, EAST_1, 9))
    await set_group(server, "group-coast", COAST, EAST_2, WEST_1)
    await allocate(
        server,
        "chg-1",
        scoped_level(SKU, WEB, 6, group=EAST, exclusive=True),
        scoped_level(SKU, MARKET, 4, group=WEST),
        scoped_level(OTHER, APP, 3, group=""),
    )
    await reserve_at(server, "web-1", WEB, 2, EAST_1)
    await reserve_at(server, "market-1", MARKET, 1, WEST_1)
    return server


OVERLAPPING_ALLOCATIONS = [
    pytest.param(
        [scoped_level(SKU, MARKET, 2, group="")], id="every-location-beside-groups"
    ),
    pytest.param([scoped_level(SKU, WEB, 2, group="")], id="same-channel-everywhere"),
    pytest.param(
        [scoped_level(SKU, APP, 2, group=COAST)], id="group-sharing-locations"
    ),
    pytest.param(
        [scoped_level(OTHER, MARKET, 2, group=EAST)], id="group-beside-everywhere"
    ),
    pytest.param(
        [
            scoped_level("HAT", WEB, 2, group=EAST),
            scoped_level("HAT", MARKET, 2, group=COAST),
        ],
        id="two-new-in-one-request",
    ),
    pytest.param(
        [scoped_level(SKU, MARKET, 0, group=WEST), scoped_level(SKU, APP, 3, group="")],
        id="one-removed-one-still-overlapping",
    ),
]


@pytest.mark.parametrize("levels", OVERLAPPING_ALLOCATIONS)
async def test_allocations_with_overlapping_scopes_are_refused_and_change_nothing(
    start_server: ServerFactory, levels: list[admin_pb2.ChannelAllocation]
) -> None:
    server = await stocked_with_scopes(start_server)
    before = await state_of(server)

    error = await refused(
        server.admin.SetChannelAllocation(allocation_request("bad", *levels))
    )

    assert refusal(error) == (PRECONDITION, "ALLOCATION_SCOPES_OVERLAP", "allocations")
    assert await state_of(server) == before
    # The refused change did not use up its change id.
    assert not await allocate(server, "bad", scoped_level(OTHER, APP, 5, group=""))


@pytest.mark.parametrize("position", [0, 1])
async def test_an_allocation_scoped_to_an_unknown_group_is_refused_naming_it(
    start_server: ServerFactory, position: int
) -> None:
    server = await stocked_with_scopes(start_server)
    before = await state_of(server)
    levels = [scoped_level(OTHER, APP, 5, group="")]
    levels.insert(position, scoped_level("HAT", WEB, 2, group="nowhere"))

    error = await refused(
        server.admin.SetChannelAllocation(allocation_request("bad", *levels))
    )

    assert refusal(error) == (
        PRECONDITION,
        "GROUP_UNKNOWN",
        f"allocations[{position}].location_group",
    )
    assert await state_of(server) == before


async def test_allocations_sharing_one_scope_or_in_disjoint_scopes_are_accepted(
    start_server: ServerFactory,
) -> None:
    server = await stocked_with_scopes(start_server)

    await allocate(
        server,
        "chg-2",
        scoped_level(SKU, APP, 3, group=EAST, exclusive=True),
        scoped_level(SKU, WEB, 2, group=WEST),
        scoped_level("HAT", WEB, 1, group=COAST),
    )

    assert await scoped_pools(server) == {
        (SKU, WEB, EAST): (6, 4, True),
        (SKU, WEB, WEST): (2, 2, False),
        (SKU, APP, EAST): (3, 3, True),
        (SKU, MARKET, WEST): (4, 3, False),
        (OTHER, APP, ""): (3, 3, False),
        ("HAT", WEB, COAST): (1, 1, False),
    }
    # Two fences in the east: 14 free there, 4 + 3 kept back from the marketplace.
    fenced = await reserve_at(server, "market-2", MARKET, 8, EAST_1, EAST_2)
    assert short(fenced) == (REJECTED, INSUFFICIENT, 7)


async def test_scopes_can_move_in_one_change_that_removes_the_old_ones(
    start_server: ServerFactory,
) -> None:
    server = await stocked_with_scopes(start_server)

    await allocate(
        server,
        "chg-2",
        scoped_level(SKU, WEB, 0, group=EAST),
        scoped_level(SKU, MARKET, 0, group=WEST),
        scoped_level(SKU, WEB, 7, group=""),
    )

    assert await scoped_pools(server) == {
        (SKU, WEB, ""): (7, 5, False),
        (OTHER, APP, ""): (3, 3, False),
    }


CHANGED_GROUPS = [
    pytest.param(EAST, (EAST_1,), id="east-loses-a-location"),
    pytest.param(EAST, (EAST_1, EAST_2, OUTLET), id="east-gains-a-location"),
    pytest.param(EAST, (EAST_1, OUTLET), id="east-swaps-a-location"),
    pytest.param(EAST, (), id="east-removed"),
    pytest.param(WEST, (), id="west-removed"),
]


@pytest.mark.parametrize(("name", "locations"), CHANGED_GROUPS)
async def test_a_group_scoping_an_allocation_cannot_get_other_locations(
    start_server: ServerFactory, name: str, locations: tuple[str, ...]
) -> None:
    server = await stocked_with_scopes(start_server)
    before = await state_of(server)

    error = await refused(set_group(server, "bad", name, *locations))

    assert refusal(error) == (PRECONDITION, "GROUP_IN_USE", "group.locations")
    assert await state_of(server) == before
    assert not await allocate(server, "bad", scoped_level(OTHER, APP, 5, group=""))


async def test_a_scoping_group_can_be_reordered_and_others_changed_freely(
    start_server: ServerFactory,
) -> None:
    server = await stocked_with_scopes(start_server)
    pools_before = await scoped_pools(server)

    await set_group(server, "chg-2", EAST, EAST_2, EAST_1)
    await set_group(server, "chg-3", COAST, OUTLET)
    await set_group(server, "chg-4", COAST)

    groups = {
        x.name: list(x.locations) for x in (await policies(server)).location_groups
    }
    assert groups == {EAST: [EAST_2, EAST_1], WEST: [WEST_1]}
    assert await scoped_pools(server) == pools_before
    # Web's lines without a location are offered the east in its new order.
    await source_from(server, "src-web", WEB, EAST)
    fits = await reserve(server, reserve_request("web-2", line(SKU, 4)))
    assert held_at(fits.lines[0]) == [(EAST_2, 4)]


async def test_a_group_no_longer_scoping_an_allocation_can_be_changed_and_removed(
    start_server: ServerFactory,
) -> None:
    server = await stocked_with_scopes(start_server)
    await allocate(server, "chg-2", scoped_level(SKU, WEB, 0, group=EAST))

    await set_group(server, "chg-3", EAST, EAST_1, OUTLET)
    await set_group(server, "chg-4", EAST)

    groups = {x.name for x in (await policies(server)).location_groups}
    assert groups == {WEST, COAST}
    # Web's holds in the east no longer count against anything of its own.
    assert (await reserve_at(server, "web-2", WEB, 13, EAST_1, EAST_2)).outcome == (
        RESERVED
    )


async def test_change_id_reused_with_another_scope_is_refused_naming_change_id(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await allocate(server, "chg-1", scoped_level(SKU, WEB, 5, group=EAST))
    before = await state_of(server)

    error = await refused(
        server.admin.SetChannelAllocation(
            allocation_request("chg-1", scoped_level(SKU, WEB, 5, group=WEST))
        )
    )

    assert refusal(error) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
        "change_id",
    )
    assert await state_of(server) == before
    assert await allocate(server, "chg-1", scoped_level(SKU, WEB, 5, group=EAST))


# Restarts -----------------------------------------------------------------------------

FIRST_SCOPES = (
    scoped_level(SKU, WEB, 8, group=EAST, exclusive=True),
    scoped_level(SKU, WEB, 4, group=WEST),
    scoped_level(SKU, MARKET, 3, group=WEST, exclusive=True),
    scoped_level(OTHER, APP, 7, group="", exclusive=True),
)


async def scopes_in_use(server: Stubs) -> None:
    """Scoped pools with holds in and out of their scopes, a fulfilment and a part
    release."""
    await count(server, "count-2", (OTHER, EAST_1, 20))
    assert not await allocate(server, "chg-1", *FIRST_SCOPES)
    east = (await reserve_at(server, "web-1", WEB, 3, EAST_1)).reservation_id
    west = (await reserve_at(server, "web-2", WEB, 2, WEST_1)).reservation_id
    await reserve_at(server, "market-1", MARKET, 2, WEST_1)
    await reserve_at(server, "app-1", APP, 4, EAST_1, sku=OTHER)
    await fulfil(server, east, taken(SKU, EAST_1, 2))
    await release(server, west, taken(SKU, WEST_1, 1))


# After `scopes_in_use`: web's east pool 8 less 2 fulfilled, 1 held; its west pool 4
# with 1 held; the marketplace's west pool 3 with 2 held; app's pool 7 with 4 held.
POOLS_IN_USE = {
    (SKU, WEB, EAST): (6, 5, True),
    (SKU, WEB, WEST): (4, 3, False),
    (SKU, MARKET, WEST): (3, 1, True),
    (OTHER, APP, ""): (7, 3, True),
}


async def test_scoped_pools_survive_restarts_from_records_and_from_a_checkpoint(
    start_server: ServerFactory, schema: str
) -> None:
    server = await stocked(start_server)
    await allocate(server, "chg-0", scoped_level(SKU, APP, 1, group=EAST))
    await server.app.ledger.checkpoint()
    await scopes_in_use(server)
    await set_group(server, "chg-2", EAST, EAST_2, EAST_1)
    before = await state_of(server)
    assert await scoped_pools(server) == {
        **POOLS_IN_USE,
        (SKU, APP, EAST): (1, 1, False),
    }

    async with connect(schema) as conn:
        await stop_as_if_crashed(server, conn)
    server = await start_server()
    assert await state_of(server) == before
    await stop_server(server)
    server = await start_server()

    assert await state_of(server) == before
    market = await reserve_at(server, "market-2", MARKET, 10, EAST_1, EAST_2)
    # 13 free in the east, 5 of them fenced for web.
    assert short(market) == (REJECTED, INSUFFICIENT, 8)


async def test_scoped_pools_after_a_sigkill_are_as_acknowledged(
    server_process: ServerProcess,
) -> None:
    await server_process.wait_serving()
    async with grpc.aio.insecure_channel(
        server_process.address, options=CHANNEL_OPTIONS
    ) as channel:
        stubs = ChannelStubs.of(channel)
        await stock_and_group(stubs)
        await scopes_in_use(stubs)
        before = await state_of(stubs)
        assert await scoped_pools(stubs) == POOLS_IN_USE

    # SIGKILL: no drain and no checkpoint, so recovery replays every record.
    server_process.kill()
    assert await server_process.wait_exit() == -9
    await server_process.start()
    await server_process.wait_serving()

    async with grpc.aio.insecure_channel(
        server_process.address, options=CHANNEL_OPTIONS
    ) as channel:
        stubs = ChannelStubs.of(channel)
        assert await state_of(stubs) == before, server_process.log_tail()
        assert await allocate(stubs, "chg-1", *FIRST_SCOPES)
        # Web's east pool still has 5 to give and its fence still stands.
        web = await reserve_at(stubs, "web-3", WEB, 6, EAST_1, EAST_2)
        market = await reserve_at(stubs, "market-2", MARKET, 9, EAST_1, EAST_2)
        assert short(web) == (REJECTED, EXHAUSTED, 5)
        assert short(market) == (REJECTED, INSUFFICIENT, 8)
