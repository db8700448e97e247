"""Focused tests of channel allocations scoped to a location group: where a scoped
ceiling or ring fence applies, how holds, moves and fulfilments draw on the pool
that covers their location, which scope changes are refused, and recovery of scoped
pools from a checkpoint plus records replayed in any interleaving of shards.

Most tests use two regions of one sku, north (L1, L2) and south (L3, L4), with the
same stock at each location, and a group west (L2, L3) that overlaps both. Each test
builds its state on a fresh engine with three shards and a fake clock (see
conftest.py).
"""

import json
import random

import pytest

from server.clock import FakeClock
from server.engine.commands import (
    AllocationLevel,
    Confirm,
    Fulfill,
    LineQuantity,
    Move,
    OnHandCount,
    Release,
    Reserve,
    ReserveLine,
    ReserveOutcome,
    ReserveResult,
    SetChannelSourcing,
    SetLocationGroup,
    SetOnHand,
    ShortReason,
)
from server.engine.engine import Engine
from server.engine.errors import ErrorKind
from tests.engine.support import (
    APP,
    L1,
    L2,
    L3,
    L4,
    MARKET,
    MERCHANDISER,
    WEB,
    A,
    Checkpoint,
    Journal,
    Level,
    allocate,
    allocation,
    allocation_state,
    decided,
    durable,
    fulfil,
    held_for,
    interleaved,
    key,
    new_engine,
    pool,
    recovered,
    refusal,
    reserve_for,
    skus_on_distinct_shards,
    stock,
)

NORTH, SOUTH = "north", "south"
# Shares L2 with north and L3 with south: no allocation of a sku scoped to north or
# south may be scoped to it as well.
WEST = "west"
# Every location, as a channel's sourcing default.
ALL = "all"
EVERYWHERE = (L1, L2, L3, L4)


def set_group(engine: Engine, name: str, *locations: str) -> None:
    durable(engine, SetLocationGroup(MERCHANDISER, key("group-"), name, locations))


def regions(engine: Engine, units: int) -> None:
    """North (L1, L2), south (L3, L4) and west (L2, L3), with `units` of A at each
    location."""
    set_group(engine, NORTH, L1, L2)
    set_group(engine, SOUTH, L3, L4)
    set_group(engine, WEST, L2, L3)
    stock(engine, *((A, location, units) for location in EVERYWHERE))


def move(reservation_id: str, quantity: int, *, source: str, target: str) -> Move:
    return Move(key("move-"), reservation_id, A, source, target, quantity)


def web_held(engine: Engine) -> dict[str, int]:
    """Units web holds of A, by location."""
    return {
        at[2]: units for at, units in engine.channel_held.items() if at[:2] == (WEB, A)
    }


def policies_json(engine: Engine) -> str:
    return json.dumps(engine.policies.to_json(), sort_keys=True)


# Ceilings -------------------------------------------------------------------------------


def test_ceiling_scoped_to_a_group_limits_holds_there_and_not_elsewhere(
    engine: Engine,
) -> None:
    regions(engine, 10)
    allocate(engine, (A, WEB, 3, False, NORTH))

    south = reserve_for(engine, WEB, A, 10, locations=(L3,))
    assert pool(engine, A, WEB, NORTH) == (3, 3)
    over = reserve_for(engine, WEB, A, 4, locations=(L1,))
    within = reserve_for(engine, WEB, A, 3, locations=(L1,))
    after = reserve_for(engine, WEB, A, 1, locations=(L2,))

    assert south.outcome is ReserveOutcome.RESERVED
    assert over.outcome is ReserveOutcome.REJECTED
    assert over.lines[0].short_reason is ShortReason.CHANNEL_ALLOCATION_EXHAUSTED
    assert over.lines[0].quantity_available == 3
    assert within.outcome is ReserveOutcome.RESERVED
    assert after.lines[0].short_reason is ShortReason.CHANNEL_ALLOCATION_EXHAUSTED
    assert pool(engine, A, WEB, NORTH) == (3, 0)
    assert web_held(engine) == {L1: 3, L3: 10}


def test_ceiling_scoped_to_a_group_leaves_other_channels_alone(engine: Engine) -> None:
    regions(engine, 10)
    allocate(engine, (A, WEB, 3, False, NORTH))

    market = reserve_for(engine, MARKET, A, 20, locations=(L1, L2))

    assert market.outcome is ReserveOutcome.RESERVED
    assert pool(engine, A, WEB, NORTH) == (3, 3)


def test_channel_with_pools_in_two_groups_draws_on_each_at_its_own_locations(
    engine: Engine,
) -> None:
    regions(engine, 10)
    allocate(engine, (A, WEB, 2, False, NORTH), (A, WEB, 3, False, SOUTH))
    assert engine.allocation_left(A, WEB) == 5
    assert engine.channel_reach(A, WEB) == 5

    line = reserve_for(engine, WEB, A, 10, locations=EVERYWHERE, allow_partial=True)

    assert line.lines[0].held_at == ((L1, 2), (L3, 3))
    assert line.lines[0].short_reason is ShortReason.CHANNEL_ALLOCATION_EXHAUSTED
    assert line.lines[0].quantity_available == 5
    assert [pool(engine, A, WEB, g) for g in (NORTH, SOUTH)] == [(2, 0), (3, 0)]
    assert engine.allocation_left(A, WEB) == 0
    assert engine.allocation_left(A, MARKET) is None


def test_channel_reach_counts_locations_outside_its_scopes_in_full(
    engine: Engine,
) -> None:
    regions(engine, 10)
    allocate(engine, (A, WEB, 3, False, NORTH))
    held_for(engine, WEB, A, 1, location=L2)

    # North: what web's pool has left. South: every unit, as no pool limits web there.
    assert engine.channel_reach(A, WEB) == 2 + 20
    assert engine.allocation_left(A, WEB) == 2


# Ring fences ----------------------------------------------------------------------------


def test_exclusive_pool_scoped_to_a_group_fences_only_that_groups_locations(
    engine: Engine,
) -> None:
    regions(engine, 5)
    allocate(engine, (A, WEB, 6, True, NORTH))

    south = reserve_for(engine, MARKET, A, 10, locations=(L3, L4))
    north = reserve_for(engine, MARKET, A, 5, locations=(L1, L2), allow_partial=True)
    own = reserve_for(engine, WEB, A, 6, locations=(L1, L2))

    assert south.outcome is ReserveOutcome.RESERVED
    # 10 free in the north, 6 of them fenced for web.
    assert north.lines[0].quantity_held == 4
    assert north.lines[0].short_reason is ShortReason.INSUFFICIENT_STOCK
    assert north.lines[0].quantity_available == 4
    assert own.outcome is ReserveOutcome.RESERVED
    assert pool(engine, A, WEB, NORTH) == (6, 0)


def test_exclusive_pools_of_two_channels_in_disjoint_groups_fence_each_their_own(
    engine: Engine,
) -> None:
    regions(engine, 5)
    allocate(engine, (A, WEB, 4, True, NORTH), (A, MARKET, 4, True, SOUTH))

    app = reserve_for(engine, APP, A, 14, locations=EVERYWHERE, allow_partial=True)

    assert app.lines[0].held_at == ((L1, 5), (L2, 1), (L3, 5), (L4, 1))
    assert app.lines[0].quantity_available == 12
    # What is left in each group is the other channel's fence there, and a channel
    # with no pool in a group is no freer than any other channel.
    assert reserve_for(engine, WEB, A, 1, locations=(L4,)).outcome is (
        ReserveOutcome.REJECTED
    )
    assert reserve_for(engine, MARKET, A, 1, locations=(L2,)).outcome is (
        ReserveOutcome.REJECTED
    )
    assert reserve_for(engine, WEB, A, 4, locations=(L1, L2)).outcome is (
        ReserveOutcome.RESERVED
    )
    assert reserve_for(engine, MARKET, A, 4, locations=(L3, L4)).outcome is (
        ReserveOutcome.RESERVED
    )
    assert [pool(engine, A, WEB, NORTH), pool(engine, A, MARKET, SOUTH)] == [
        (4, 0),
        (4, 0),
    ]


def test_fence_of_a_group_shrinks_only_with_holds_in_that_group(
    engine: Engine,
) -> None:
    regions(engine, 5)
    allocate(engine, (A, WEB, 6, True, NORTH), (A, WEB, 3, False, SOUTH))
    held_for(engine, WEB, A, 3, location=L3)
    held_for(engine, WEB, A, 2, location=L1)

    market = reserve_for(engine, MARKET, A, 8, locations=(L1, L2), allow_partial=True)

    # 8 free in the north, of which web's pool there still fences 4.
    assert market.lines[0].quantity_held == 4
    assert [pool(engine, A, WEB, g) for g in (NORTH, SOUTH)] == [(6, 4), (3, 0)]


# Lines without a location, and lines of one request ----------------------------------


def test_sourced_line_splits_across_scopes_within_each_scopes_budget(
    engine: Engine,
) -> None:
    regions(engine, 10)
    set_group(engine, ALL, *EVERYWHERE)
    durable(engine, SetChannelSourcing(MERCHANDISER, key("src-"), WEB, ALL, True))
    allocate(engine, (A, WEB, 3, False, NORTH), (A, MARKET, 18, True, SOUTH))

    first = durable(engine, Reserve(key(), WEB, (ReserveLine(A, 5),)))
    second = durable(engine, Reserve(key(), WEB, (ReserveLine(A, 1),)))

    assert isinstance(first, ReserveResult)
    assert isinstance(second, ReserveResult)
    # North: web's own 3. South: 20 free, 18 fenced for the marketplace.
    assert first.outcome is ReserveOutcome.RESERVED
    assert first.lines[0].held_at == ((L1, 3), (L3, 2))
    assert second.outcome is ReserveOutcome.REJECTED
    assert second.lines[0].quantity_available == 0
    assert pool(engine, A, WEB, NORTH) == (3, 0)
    assert pool(engine, A, MARKET, SOUTH) == (18, 18)


def test_lines_of_one_request_draw_on_the_same_scoped_pool(engine: Engine) -> None:
    regions(engine, 10)
    allocate(engine, (A, WEB, 5, False, NORTH))
    lines = (ReserveLine(A, 3, location=L1), ReserveLine(A, 3, location=L2))

    result = durable(engine, Reserve(key(), WEB, lines))

    assert isinstance(result, ReserveResult)
    assert result.outcome is ReserveOutcome.REJECTED
    assert [line.short_reason for line in result.lines] == [
        ShortReason.OTHER_LINE_SHORT,
        ShortReason.CHANNEL_ALLOCATION_EXHAUSTED,
    ]
    assert result.lines[1].quantity_available == 2
    assert pool(engine, A, WEB, NORTH) == (5, 5)
    assert web_held(engine) == {}


def test_lines_of_one_request_in_different_scopes_draw_on_different_budgets(
    engine: Engine,
) -> None:
    regions(engine, 10)
    allocate(engine, (A, WEB, 5, False, NORTH))
    lines = (ReserveLine(A, 3, location=L1), ReserveLine(A, 8, location=L3))

    result = durable(engine, Reserve(key(), WEB, lines))

    assert isinstance(result, ReserveResult)
    assert result.outcome is ReserveOutcome.RESERVED
    assert pool(engine, A, WEB, NORTH) == (5, 2)


def test_lines_of_one_request_share_what_a_scoped_fence_leaves(engine: Engine) -> None:
    regions(engine, 5)
    allocate(engine, (A, MARKET, 6, True, NORTH))
    lines = (ReserveLine(A, 3, location=L1), ReserveLine(A, 3, location=L2))

    result = durable(engine, Reserve(key(), WEB, lines, allow_partial=True))

    assert isinstance(result, ReserveResult)
    assert [line.quantity_held for line in result.lines] == [3, 1]
    assert result.lines[1].short_reason is ShortReason.INSUFFICIENT_STOCK
    assert result.lines[1].quantity_available == 1


# Fulfilment, release and expiry ---------------------------------------------------------


def hold_in_both_regions(
    engine: Engine, *, north: int, south: int, ttl_s: int = 0
) -> str:
    """One web reservation of `north` units at L1 and `south` at L3."""
    lines = (ReserveLine(A, north, location=L1), ReserveLine(A, south, location=L3))
    result = durable(engine, Reserve(key(), WEB, lines, ttl_s=ttl_s))
    assert isinstance(result, ReserveResult)
    assert result.outcome is ReserveOutcome.RESERVED
    return result.reservation_id


def test_fulfilment_consumes_the_pool_whose_scope_covers_the_line(
    engine: Engine,
) -> None:
    regions(engine, 10)
    allocate(engine, (A, WEB, 5, False, NORTH), (A, WEB, 5, False, SOUTH))
    reservation_id = hold_in_both_regions(engine, north=2, south=3)

    fulfil(engine, reservation_id, 3, location=L3)

    assert [pool(engine, A, WEB, g) for g in (NORTH, SOUTH)] == [(5, 3), (2, 2)]
    fulfil(engine, reservation_id, 2, location=L1)
    assert [pool(engine, A, WEB, g) for g in (NORTH, SOUTH)] == [(3, 3), (2, 2)]


def test_fulfilment_outside_every_scope_consumes_no_pool(engine: Engine) -> None:
    regions(engine, 10)
    allocate(engine, (A, WEB, 5, False, NORTH))
    reservation_id = hold_in_both_regions(engine, north=2, south=3)

    fulfil(engine, reservation_id, 3, location=L3)

    assert pool(engine, A, WEB, NORTH) == (5, 3)
    assert sorted(engine.policies.pools) == [(A, WEB, NORTH)]


def test_release_gives_back_to_the_scoped_pool_only_once_durable(
    engine: Engine,
) -> None:
    regions(engine, 10)
    allocate(engine, (A, WEB, 6, False, NORTH))
    reservation_id = hold_in_both_regions(engine, north=4, south=3)

    release = decided(engine, Release(key(), reservation_id))

    assert pool(engine, A, WEB, NORTH) == (6, 2)
    assert reserve_for(engine, WEB, A, 3, locations=(L2,)).outcome is (
        ReserveOutcome.REJECTED
    )
    engine.mark_durable(release)
    assert pool(engine, A, WEB, NORTH) == (6, 6)


def test_expiry_gives_back_to_the_scoped_pool_only_once_durable(
    engine: Engine, clock: FakeClock
) -> None:
    regions(engine, 10)
    allocate(engine, (A, WEB, 5, True, NORTH), (A, WEB, 4, True, SOUTH))
    reservation_id = hold_in_both_regions(engine, north=3, south=2, ttl_s=60)
    held_for(engine, WEB, A, 1, location=L2)

    clock.advance(60)
    (expiry,) = engine.expire_due(count_max=10)

    assert engine.reservations[reservation_id].quantity_held == 0
    assert [pool(engine, A, WEB, g) for g in (NORTH, SOUTH)] == [(5, 1), (4, 2)]
    engine.mark_durable(expiry)
    assert [pool(engine, A, WEB, g) for g in (NORTH, SOUTH)] == [(5, 4), (4, 4)]


# Moves ----------------------------------------------------------------------------------


def test_move_within_one_scope_needs_no_room_in_the_pool(engine: Engine) -> None:
    regions(engine, 10)
    allocate(engine, (A, WEB, 4, True, NORTH))
    reservation_id = held_for(engine, WEB, A, 4, location=L1)

    decision = decided(engine, move(reservation_id, 4, source=L1, target=L2))

    assert pool(engine, A, WEB, NORTH) == (4, 0)
    engine.mark_durable(decision)
    assert pool(engine, A, WEB, NORTH) == (4, 0)
    assert web_held(engine) == {L2: 4}


def test_move_into_another_scope_draws_on_its_pool_and_gives_back_once_durable(
    engine: Engine,
) -> None:
    regions(engine, 10)
    allocate(engine, (A, WEB, 4, False, NORTH), (A, WEB, 5, False, SOUTH))
    reservation_id = held_for(engine, WEB, A, 3, location=L1)

    decision = decided(engine, move(reservation_id, 3, source=L1, target=L3))

    assert pool(engine, A, WEB, SOUTH) == (5, 2)
    # The units left behind come back to the north only once the move is durable.
    assert pool(engine, A, WEB, NORTH) == (4, 1)
    engine.mark_durable(decision)
    assert pool(engine, A, WEB, NORTH) == (4, 4)
    assert web_held(engine) == {L3: 3}


def test_move_out_of_every_scope_gives_back_to_the_source_pool_once_durable(
    engine: Engine,
) -> None:
    regions(engine, 10)
    allocate(engine, (A, WEB, 4, False, NORTH))
    reservation_id = held_for(engine, WEB, A, 4, location=L2)

    decision = decided(engine, move(reservation_id, 4, source=L2, target=L3))

    assert pool(engine, A, WEB, NORTH) == (4, 0)
    engine.mark_durable(decision)
    assert pool(engine, A, WEB, NORTH) == (4, 4)


def test_move_into_a_scope_whose_pool_has_no_room_is_refused_without_change(
    engine: Engine,
) -> None:
    regions(engine, 10)
    allocate(engine, (A, WEB, 4, False, NORTH), (A, WEB, 2, False, SOUTH))
    reservation_id = held_for(engine, WEB, A, 3, location=L1)
    before = engine.checkpoint_rows()

    error = refusal(engine, move(reservation_id, 3, source=L1, target=L4))

    assert (error.kind, error.reason, error.field) == (
        ErrorKind.FAILED_PRECONDITION,
        "INSUFFICIENT_STOCK_AT_TARGET",
        "to_location",
    )
    assert "can hold 2 " in error.message
    assert engine.checkpoint_rows() == before
    assert [pool(engine, A, WEB, g) for g in (NORTH, SOUTH)] == [(4, 1), (2, 2)]
    durable(engine, move(reservation_id, 2, source=L1, target=L4))
    assert [pool(engine, A, WEB, g) for g in (NORTH, SOUTH)] == [(4, 3), (2, 0)]


def test_move_into_a_group_another_channel_fences_leaves_the_fence_free(
    engine: Engine,
) -> None:
    regions(engine, 5)
    allocate(engine, (A, MARKET, 8, True, SOUTH))
    reservation_id = held_for(engine, WEB, A, 3, location=L1)
    before = engine.checkpoint_rows()

    error = refusal(engine, move(reservation_id, 3, source=L1, target=L3))

    # 10 free in the south, 8 of them fenced for the marketplace.
    assert error.reason == "INSUFFICIENT_STOCK_AT_TARGET"
    assert "can hold 2 " in error.message
    assert engine.checkpoint_rows() == before
    durable(engine, move(reservation_id, 2, source=L1, target=L3))
    assert web_held(engine) == {L1: 1, L3: 2}
    assert pool(engine, A, MARKET, SOUTH) == (8, 8)


# Changes to scopes and groups -----------------------------------------------------------

OVERLAPS = "ALLOCATION_SCOPES_OVERLAP"


@pytest.mark.parametrize(
    ("existing", "levels", "reason", "field"),
    [
        pytest.param(
            [(A, WEB, 5, False, NORTH)],
            [(A, MARKET, 5, True, "")],
            OVERLAPS,
            "allocations",
            id="every-location-over-a-group",
        ),
        pytest.param(
            [(A, WEB, 5, False, "")],
            [(A, MARKET, 5, True, SOUTH)],
            OVERLAPS,
            "allocations",
            id="group-under-every-location",
        ),
        pytest.param(
            [(A, WEB, 5, False, NORTH)],
            [(A, MARKET, 5, True, WEST)],
            OVERLAPS,
            "allocations",
            id="groups-sharing-a-location",
        ),
        pytest.param(
            [(A, WEB, 5, False, NORTH)],
            [(A, WEB, 5, False, WEST)],
            OVERLAPS,
            "allocations",
            id="one-channel-in-overlapping-groups",
        ),
        pytest.param(
            [],
            [(A, WEB, 1, False, NORTH), (A, MARKET, 1, False, "")],
            OVERLAPS,
            "allocations",
            id="within-one-request",
        ),
        pytest.param(
            [(A, WEB, 5, False, NORTH)],
            [(A, WEB, 0, False, NORTH), (A, MARKET, 2, False, "nowhere")],
            "GROUP_UNKNOWN",
            "allocations[1].location_group",
            id="unknown-group",
        ),
    ],
)
def test_scope_that_would_overlap_or_is_unknown_is_refused_and_changes_nothing(
    engine: Engine, existing: list[Level], levels: list[Level], reason: str, field: str
) -> None:
    regions(engine, 10)
    if existing:
        allocate(engine, *existing)
    before = policies_json(engine)
    seq_before = engine.shards[0].next_seq

    error = refusal(engine, allocation(*levels))

    assert (error.kind, error.reason, error.field) == (
        ErrorKind.FAILED_PRECONDITION,
        reason,
        field,
    )
    assert policies_json(engine) == before
    assert engine.shards[0].next_seq == seq_before


def test_same_scope_twice_in_one_request_is_refused_and_changes_nothing(
    engine: Engine,
) -> None:
    regions(engine, 10)
    allocate(engine, (A, WEB, 5, False, NORTH))
    before = policies_json(engine)

    error = refusal(
        engine, allocation((A, WEB, 1, False, SOUTH), (A, WEB, 2, True, SOUTH))
    )

    assert (error.kind, error.reason, error.field) == (
        ErrorKind.INVALID_ARGUMENT,
        "DUPLICATE_ALLOCATION",
        "allocations[1]",
    )
    assert policies_json(engine) == before


@pytest.mark.parametrize(
    "levels",
    [
        pytest.param(
            [(A, WEB, 5, False, NORTH), (A, MARKET, 5, True, NORTH)], id="same"
        ),
        pytest.param([(A, WEB, 5, False, NORTH), (A, WEB, 5, True, SOUTH)], id="apart"),
        pytest.param([(A, WEB, 5, False, ""), (A, MARKET, 5, True, "")], id="all"),
        pytest.param(
            [(A, WEB, 5, False, WEST), ("sku-b", WEB, 5, False, "")], id="skus"
        ),
    ],
)
def test_scopes_that_are_one_group_or_disjoint_are_accepted(
    engine: Engine, levels: list[Level]
) -> None:
    regions(engine, 10)

    allocate(engine, *levels)

    wanted = [AllocationLevel(*level) for level in levels]
    assert set(engine.policies.pools) == {(x.sku, x.channel, x.group) for x in wanted}


def test_allocation_moves_to_another_scope_in_one_request(engine: Engine) -> None:
    regions(engine, 10)
    allocate(engine, (A, WEB, 5, False, ""), (A, MARKET, 5, True, ""))

    allocate(
        engine,
        (A, WEB, 0, False, ""),
        (A, MARKET, 0, False, ""),
        (A, WEB, 4, False, NORTH),
        (A, MARKET, 3, True, SOUTH),
    )

    assert sorted(engine.policies.allocations[A]) == [(MARKET, SOUTH), (WEB, NORTH)]
    assert [pool(engine, A, WEB, g) for g in ("", NORTH)] == [(0, 0), (4, 4)]


@pytest.mark.parametrize(
    "locations",
    [pytest.param((L1, L3), id="other-locations"), pytest.param((), id="removed")],
)
def test_group_scoping_an_allocation_keeps_its_locations(
    engine: Engine, locations: tuple[str, ...]
) -> None:
    regions(engine, 10)
    allocate(engine, (A, WEB, 5, False, NORTH))
    before = policies_json(engine)

    error = refusal(
        engine, SetLocationGroup(MERCHANDISER, key("group-"), NORTH, locations)
    )

    assert (error.kind, error.reason, error.field) == (
        ErrorKind.FAILED_PRECONDITION,
        "GROUP_IN_USE",
        "group.locations",
    )
    assert policies_json(engine) == before


def test_group_scoping_an_allocation_may_be_reordered(engine: Engine) -> None:
    regions(engine, 10)
    allocate(engine, (A, WEB, 5, False, NORTH))
    held_for(engine, WEB, A, 2, location=L1)

    set_group(engine, NORTH, L2, L1)

    assert engine.policies.groups[NORTH][0] == (L2, L1)
    assert pool(engine, A, WEB, NORTH) == (5, 3)


def test_group_may_change_once_no_allocation_is_scoped_to_it(engine: Engine) -> None:
    regions(engine, 10)
    allocate(engine, (A, WEB, 5, False, NORTH))
    allocate(engine, (A, WEB, 0, False, NORTH))

    set_group(engine, NORTH, L1, L4)

    assert engine.policies.groups[NORTH][0] == (L1, L4)


# Recovery -------------------------------------------------------------------------------


def scoped_history(
    journal: Journal, clock: FakeClock, skus: list[str]
) -> tuple[Checkpoint, int]:
    """Scoped pools of skus on every shard and holds in both regions, a checkpoint,
    then a fulfilment, moves within and across scopes, a release, an expiry and a new
    pool. Returns the checkpoint and how many records it covers."""
    counts = tuple(OnHandCount(s, loc, 10) for s in skus for loc in EVERYWHERE)
    journal.durable(SetOnHand("erp", key(), counts))
    for name, locations in ((NORTH, (L1, L2)), (SOUTH, (L3, L4))):
        journal.durable(SetLocationGroup(MERCHANDISER, key(), name, locations))
    levels: list[Level] = []
    for sku in skus:
        levels += [(sku, WEB, 6, True, NORTH), (sku, WEB, 4, False, SOUTH)]
        levels.append((sku, MARKET, 5, True, SOUTH))
    journal.durable(allocation(*levels))
    holds = [
        journal.reserve(Reserve(key(), WEB, (ReserveLine(s, 3, location=L1),)))
        for s in skus
    ]
    for sku in skus:
        journal.reserve(Reserve(key(), MARKET, (ReserveLine(sku, 2, location=L4),)))
    journal.reserve(
        Reserve(key(), WEB, (ReserveLine(skus[0], 1, location=L3),), ttl_s=60)
    )
    checkpoint = journal.checkpoint()

    first, second, third = (hold.reservation_id for hold in holds)
    journal.durable(Confirm(key(), first))
    journal.durable(Fulfill(key(), first, (LineQuantity(skus[0], L1, 1),)))
    journal.durable(Move(key(), second, skus[1], L1, L2, 3))
    journal.durable(Move(key(), third, skus[2], L1, L3, 2))
    journal.durable(Release(key(), second))
    clock.advance(60)
    assert journal.expire() == 1
    journal.durable(allocation((skus[2], WEB, 8, False, SOUTH)))
    return checkpoint


def test_recovery_gives_the_same_scoped_pools_and_channel_holds(
    clock: FakeClock,
) -> None:
    engine = new_engine(clock)
    journal = Journal(engine)
    skus = skus_on_distinct_shards(len(engine.shards))
    checkpoint, covered = scoped_history(journal, clock, skus)
    pools, held = allocation_state(engine), dict(engine.channel_held)
    later = journal.records[covered:]

    assert pools[(skus[0], WEB, NORTH)] == (5, 3, True)
    assert pools[(skus[0], WEB, SOUTH)] == (4, 4, False)
    assert pools[(skus[2], WEB, SOUTH)] == (8, 6, False)
    assert pools[(skus[2], MARKET, SOUTH)] == (5, 3, True)
    assert {at: units for at, units in held.items() if at[1] == skus[2]} == {
        (WEB, skus[2], L1): 1,
        (WEB, skus[2], L3): 2,
        (MARKET, skus[2], L4): 2,
    }
    assert {record.shard for record in later} == {0, 1, 2}
    rng = random.Random(11)
    for records in (later, *(interleaved(later, rng) for _ in range(5))):
        after = recovered(clock, checkpoint, records)
        assert (allocation_state(after), after.channel_held) == (pools, held)
    after = recovered(clock, None, journal.records)
    assert (allocation_state(after), after.channel_held) == (pools, held)
