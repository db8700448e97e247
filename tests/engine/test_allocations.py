"""Focused tests of channel allocations in the engine: ceilings, ring fences, how holds,
releases, expiries and fulfilments move a pool, and recovery of pools from a checkpoint
plus records replayed in any interleaving of shards.

Each test builds its state on a fresh engine with three shards and a fake clock (see
conftest.py). Randomized tests print their seed; replay one with
STOCKWARD_TEST_SEED=<seed>.
"""

import dataclasses
import json
import os
import random
import secrets
from collections.abc import Callable

import pytest

from server.clock import FakeClock
from server.engine.commands import (
    AllocationLevel,
    Command,
    Confirm,
    Fulfill,
    LineQuantity,
    OnHandCount,
    PolicyResult,
    Release,
    ReservationResult,
    Reserve,
    ReserveLine,
    ReserveOutcome,
    ReserveResult,
    SetChannelAllocation,
    SetOnHand,
    ShortReason,
)
from server.engine.engine import Decision, Engine, Replay
from server.engine.errors import ErrorKind
from server.engine.model import ReservationState
from tests.engine.support import (
    APP,
    L1,
    L2,
    LIMITS,
    MARKET,
    MERCHANDISER,
    WEB,
    A,
    B,
    Checkpoint,
    Journal,
    Pool,
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
    stored,
)

US_PER_S = 1_000_000


def settle(engine: Engine, command: Command) -> ReservationState:
    result = durable(engine, command)
    assert isinstance(result, ReservationResult)
    return result.reservation.state


def pools_of(engine: Engine, sku: str, channel: str) -> list[tuple[str, str, str]]:
    """The keys of every pool of the channel's allocations of `sku`, in any scope."""
    return [at for at in engine.policies.pools if at[:2] == (sku, channel)]


# Ceilings and ring fences ---------------------------------------------------------------


def test_ceiling_allocation_limits_its_channel_and_no_other(engine: Engine) -> None:
    stock(engine, (A, L1, 20))
    allocate(engine, (A, WEB, 5, False))

    over = reserve_for(engine, WEB, A, 6)
    within = reserve_for(engine, WEB, A, 5)
    others = reserve_for(engine, MARKET, A, 15)

    assert over.outcome is ReserveOutcome.REJECTED
    assert over.lines[0].short_reason is ShortReason.CHANNEL_ALLOCATION_EXHAUSTED
    assert over.lines[0].quantity_available == 5
    assert within.outcome is ReserveOutcome.RESERVED
    assert others.outcome is ReserveOutcome.RESERVED
    assert pool(engine, A, WEB) == (5, 0)
    assert engine.positions_of(A)[L1].held == 20


def test_exclusive_allocation_keeps_its_remaining_units_from_other_channels(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 20))
    allocate(engine, (A, WEB, 8, True))

    fenced = reserve_for(engine, MARKET, A, 13)
    unfenced = reserve_for(engine, MARKET, A, 12)
    own = reserve_for(engine, WEB, A, 8)

    assert fenced.outcome is ReserveOutcome.REJECTED
    assert fenced.lines[0].short_reason is ShortReason.INSUFFICIENT_STOCK
    assert fenced.lines[0].quantity_available == 12
    assert unfenced.outcome is ReserveOutcome.RESERVED
    assert own.outcome is ReserveOutcome.RESERVED
    assert pool(engine, A, WEB) == (8, 0)
    assert engine.positions_of(A)[L1].held == 20


def test_fence_shrinks_as_the_exclusive_channel_holds_its_pool(engine: Engine) -> None:
    stock(engine, (A, L1, 10))
    allocate(engine, (A, WEB, 6, True))
    held_for(engine, WEB, A, 4)

    short = reserve_for(engine, MARKET, A, 5, allow_partial=True)

    # 6 free, 2 of them still fenced for web: the marketplace gets 4 at most.
    assert short.outcome is ReserveOutcome.PARTIALLY_RESERVED
    assert short.lines[0].quantity_held == 4
    assert short.lines[0].short_reason is ShortReason.INSUFFICIENT_STOCK
    assert reserve_for(engine, MARKET, A, 1).outcome is ReserveOutcome.REJECTED
    assert reserve_for(engine, WEB, A, 2).outcome is ReserveOutcome.RESERVED
    assert pool(engine, A, WEB) == (6, 0)


def test_every_exclusive_allocation_of_other_channels_is_fenced(engine: Engine) -> None:
    stock(engine, (A, L1, 20))
    allocate(engine, (A, WEB, 5, True), (A, APP, 4, True), (A, MARKET, 30, False))

    market = reserve_for(engine, MARKET, A, 20, allow_partial=True)
    web = reserve_for(engine, WEB, A, 6, allow_partial=True)
    app = reserve_for(engine, APP, A, 4)

    assert market.lines[0].quantity_held == 11
    assert market.lines[0].short_reason is ShortReason.INSUFFICIENT_STOCK
    assert web.lines[0].quantity_held == 5
    # Web's own pool and app's fence stop web at 5 alike; the reason named for that
    # is pinned in the test below.
    assert app.outcome is ReserveOutcome.RESERVED
    assert [pool(engine, A, c) for c in (WEB, APP, MARKET)] == [
        (5, 0),
        (4, 0),
        (30, 19),
    ]


def test_own_pool_is_named_when_a_fence_limits_the_line_as_much(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 20))
    allocate(engine, (A, WEB, 5, True), (A, APP, 4, True), (A, MARKET, 30, False))
    reserve_for(engine, MARKET, A, 11)

    web = reserve_for(engine, WEB, A, 6, allow_partial=True)

    # 9 free, 4 fenced for app: the fence and web's pool both allow 5.
    assert web.lines[0].quantity_held == 5
    assert web.lines[0].short_reason is ShortReason.CHANNEL_ALLOCATION_EXHAUSTED


def test_ceiling_allocation_does_not_fence_its_units(engine: Engine) -> None:
    stock(engine, (A, L1, 10))
    allocate(engine, (A, WEB, 8, False))

    market = reserve_for(engine, MARKET, A, 10)
    web = reserve_for(engine, WEB, A, 1)

    assert market.outcome is ReserveOutcome.RESERVED
    assert web.outcome is ReserveOutcome.REJECTED
    # Stock, not the pool, is what web is short of.
    assert web.lines[0].short_reason is ShortReason.INSUFFICIENT_STOCK
    assert pool(engine, A, WEB) == (8, 8)


def test_allocation_spans_every_location_of_the_sku(engine: Engine) -> None:
    stock(engine, (A, L1, 3), (A, L2, 4))
    allocate(engine, (A, WEB, 5, False))

    first = reserve_for(engine, WEB, A, 6, locations=(L1, L2), allow_partial=True)

    assert first.outcome is ReserveOutcome.PARTIALLY_RESERVED
    assert first.lines[0].held_at == ((L1, 3), (L2, 2))
    assert first.lines[0].short_reason is ShortReason.CHANNEL_ALLOCATION_EXHAUSTED
    assert reserve_for(engine, WEB, A, 1, locations=(L2,)).outcome is (
        ReserveOutcome.REJECTED
    )
    assert pool(engine, A, WEB) == (5, 0)


def test_lines_of_one_request_draw_on_the_same_pool(engine: Engine) -> None:
    stock(engine, (A, L1, 10), (A, L2, 10))
    allocate(engine, (A, WEB, 5, False))
    command = Reserve(
        request_id=key(),
        channel=WEB,
        lines=(ReserveLine(A, 3, location=L1), ReserveLine(A, 3, location=L2)),
    )

    result = durable(engine, command)

    assert isinstance(result, ReserveResult)
    assert result.outcome is ReserveOutcome.REJECTED
    assert [line.short_reason for line in result.lines] == [
        ShortReason.OTHER_LINE_SHORT,
        ShortReason.CHANNEL_ALLOCATION_EXHAUSTED,
    ]
    assert result.lines[1].quantity_available == 2
    assert pool(engine, A, WEB) == (5, 5)
    assert engine.positions_of(A)[L1].held == 0


def test_allocation_of_one_sku_leaves_other_skus_alone(engine: Engine) -> None:
    stock(engine, (A, L1, 10), (B, L1, 10))
    allocate(engine, (A, WEB, 2, True))

    assert reserve_for(engine, WEB, B, 10).outcome is ReserveOutcome.RESERVED
    assert reserve_for(engine, MARKET, A, 8).outcome is ReserveOutcome.RESERVED
    assert reserve_for(engine, MARKET, A, 1).outcome is ReserveOutcome.REJECTED
    assert pools_of(engine, B, WEB) == []


# Holds, releases, expiries and fulfilments -----------------------------------------------


def test_release_gives_back_to_the_pool_only_once_durable(engine: Engine) -> None:
    stock(engine, (A, L1, 10))
    allocate(engine, (A, WEB, 6, True))
    reservation_id = held_for(engine, WEB, A, 4)

    release = decided(engine, Release(key(), reservation_id))

    assert pool(engine, A, WEB) == (6, 2)
    # Until the release is durable web may not hold its units again, and the rest of
    # the stock is no freer for anyone else.
    assert reserve_for(engine, WEB, A, 3).outcome is ReserveOutcome.REJECTED
    assert reserve_for(engine, MARKET, A, 5).outcome is ReserveOutcome.REJECTED
    engine.mark_durable(release)
    assert pool(engine, A, WEB) == (6, 6)
    assert reserve_for(engine, MARKET, A, 5).outcome is ReserveOutcome.REJECTED
    assert reserve_for(engine, MARKET, A, 4).outcome is ReserveOutcome.RESERVED


def test_partial_release_gives_back_only_what_it_releases(engine: Engine) -> None:
    stock(engine, (A, L1, 10))
    allocate(engine, (A, WEB, 6, False))
    reservation_id = held_for(engine, WEB, A, 5)

    state = settle(engine, Release(key(), reservation_id, (LineQuantity(A, L1, 2),)))

    assert state is ReservationState.PENDING
    assert pool(engine, A, WEB) == (6, 3)


def test_expiry_gives_back_to_the_pool_once_durable(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 10))
    allocate(engine, (A, WEB, 5, True))
    expiring = reserve_for(engine, WEB, A, 3, ttl_s=60)
    held_for(engine, WEB, A, 1)

    clock.advance(59)
    assert engine.expire_due(count_max=10) == []
    clock.advance(1)
    (expiry,) = engine.expire_due(count_max=10)

    assert engine.reservations[expiring.reservation_id].state is (
        ReservationState.EXPIRED
    )
    assert pool(engine, A, WEB) == (5, 1)
    engine.mark_durable(expiry)
    assert pool(engine, A, WEB) == (5, 4)


def test_fulfilment_consumes_the_pool_for_good(engine: Engine) -> None:
    stock(engine, (A, L1, 20))
    allocate(engine, (A, WEB, 10, True))
    reservation_id = held_for(engine, WEB, A, 4)

    assert fulfil(engine, reservation_id, 3) is ReservationState.CONFIRMED
    assert pool(engine, A, WEB) == (7, 6)
    assert settle(engine, Release(key(), reservation_id)) is (
        ReservationState.FULFILLED
    )

    assert pool(engine, A, WEB) == (7, 7)
    assert engine.positions_of(A)[L1].on_hand == 17
    # The fence is what is left of the pool: 17 on hand, 7 fenced.
    assert reserve_for(engine, MARKET, A, 11).outcome is ReserveOutcome.REJECTED
    assert reserve_for(engine, MARKET, A, 10).outcome is ReserveOutcome.RESERVED


def test_fulfilment_by_a_channel_without_allocation_leaves_pools_alone(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 20))
    allocate(engine, (A, WEB, 10, True))
    reservation_id = held_for(engine, MARKET, A, 4)

    fulfil(engine, reservation_id)

    assert pool(engine, A, WEB) == (10, 10)
    assert pools_of(engine, A, MARKET) == []


# Changing and removing ------------------------------------------------------------------


def test_new_pool_replaces_what_was_left_of_the_old_one(engine: Engine) -> None:
    stock(engine, (A, L1, 30))
    allocate(engine, (A, WEB, 10, False))
    fulfil(engine, held_for(engine, WEB, A, 4))
    held_for(engine, WEB, A, 3)

    allocate(engine, (A, WEB, 12, True))

    assert pool(engine, A, WEB) == (12, 9)
    exclusive, attribution = engine.policies.allocations[A][(WEB, "")]
    assert exclusive
    assert attribution.actor == MERCHANDISER


def test_pool_set_below_what_the_channel_holds_leaves_nothing_to_hold(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 20))
    allocate(engine, (A, WEB, 10, True))
    reservation_id = held_for(engine, WEB, A, 6)

    allocate(engine, (A, WEB, 4, True))

    assert pool(engine, A, WEB) == (4, 0)
    short = reserve_for(engine, WEB, A, 1)
    assert short.lines[0].short_reason is ShortReason.CHANNEL_ALLOCATION_EXHAUSTED
    # Nothing is left to fence: the marketplace may take all the rest.
    assert reserve_for(engine, MARKET, A, 14).outcome is ReserveOutcome.RESERVED
    settle(engine, Release(key(), reservation_id))
    assert pool(engine, A, WEB) == (4, 4)


def test_removing_an_allocation_lifts_its_ceiling_and_its_fence(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 20))
    allocate(engine, (A, WEB, 5, True), (A, APP, 3, False))
    held_for(engine, WEB, A, 2)

    allocate(engine, (A, WEB, 0, False))

    assert A in engine.policies.allocations
    assert WEB not in {channel for channel, _ in engine.policies.allocations[A]}
    assert pool(engine, A, WEB) == (0, 0)
    assert reserve_for(engine, MARKET, A, 18).outcome is ReserveOutcome.RESERVED
    allocate(engine, (A, APP, 0, False))
    assert A not in engine.policies.allocations


def test_channel_without_allocation_after_removal_is_not_capped(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 20))
    allocate(engine, (A, WEB, 2, False))
    allocate(engine, (A, WEB, 0, False))

    assert reserve_for(engine, WEB, A, 20).outcome is ReserveOutcome.RESERVED


def test_exclusive_pool_turned_into_a_ceiling_stops_fencing(engine: Engine) -> None:
    stock(engine, (A, L1, 10))
    allocate(engine, (A, WEB, 6, True))
    assert reserve_for(engine, MARKET, A, 5).outcome is ReserveOutcome.REJECTED

    allocate(engine, (A, WEB, 6, False))

    assert reserve_for(engine, MARKET, A, 10).outcome is ReserveOutcome.RESERVED
    assert pool(engine, A, WEB) == (6, 6)


# Refusals and idempotency ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "field"),
    [
        (allocation((A, WEB, -1, False)), "allocations[0].quantity"),
        (
            allocation((A, WEB, LIMITS.on_hand_max + 1, False)),
            "allocations[0].quantity",
        ),
        (allocation((A, WEB, 1, False), (A, WEB, 2, True)), "allocations[1]"),
        (allocation(("", WEB, 1, False)), "allocations[0].sku"),
        (allocation((A, "", 1, False)), "allocations[0].channel"),
        (allocation(), "allocations"),
        (
            SetChannelAllocation("", "chg", (AllocationLevel(A, WEB, 1, False),)),
            "actor",
        ),
        (
            SetChannelAllocation(
                MERCHANDISER, "", (AllocationLevel(A, WEB, 1, False),)
            ),
            "change_id",
        ),
    ],
)
def test_bad_allocation_is_refused_naming_the_field_and_changes_nothing(
    engine: Engine, command: SetChannelAllocation, field: str
) -> None:
    allocate(engine, (A, WEB, 7, True))
    before = json.dumps(engine.policies.to_json())
    seq_before = engine.shards[0].next_seq

    error = refusal(engine, command)

    assert error.kind is ErrorKind.INVALID_ARGUMENT
    assert error.field == field
    assert json.dumps(engine.policies.to_json()) == before
    assert engine.shards[0].next_seq == seq_before


def test_retried_change_is_answered_again_without_applying_it_twice(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 20))
    command = allocation((A, WEB, 10, True), change_id="chg-1")
    durable(engine, command)
    fulfil(engine, held_for(engine, WEB, A, 4))

    retry = engine.decide(command)

    assert isinstance(retry, Replay)
    assert retry.result == PolicyResult(replayed=True)
    assert pool(engine, A, WEB) == (6, 6)


def test_change_id_reused_for_other_allocations_is_refused(engine: Engine) -> None:
    durable(engine, allocation((A, WEB, 10, True), change_id="chg-1"))

    error = refusal(engine, allocation((A, WEB, 11, True), change_id="chg-1"))

    assert error.kind is ErrorKind.INVALID_ARGUMENT
    assert error.reason == "REQUEST_ID_REUSED"
    assert pool(engine, A, WEB) == (10, 10)


def test_same_change_id_from_another_actor_is_a_new_change(engine: Engine) -> None:
    durable(engine, allocation((A, WEB, 10, True), change_id="chg-1"))
    other = SetChannelAllocation(
        "planner", "chg-1", (AllocationLevel(A, WEB, 3, True),)
    )

    decision = engine.decide(other)

    assert isinstance(decision, Decision)
    assert pool(engine, A, WEB) == (3, 3)


# Recovery -------------------------------------------------------------------------------


def test_recovery_from_checkpoint_and_interleaved_records_gives_the_same_pools(
    clock: FakeClock,
) -> None:
    engine = new_engine(clock)
    journal = Journal(engine)
    skus = skus_on_distinct_shards(len(engine.shards))
    journal.durable(
        SetOnHand("erp", key(), tuple(OnHandCount(s, L1, 50) for s in skus))
    )
    journal.durable(allocation(*((s, WEB, 20, True) for s in skus)))
    holds = [
        journal.reserve(Reserve(key(), WEB, (ReserveLine(s, 6, location=L1),)))
        for s in skus
    ]
    checkpoint, covered = journal.checkpoint()
    for hold in holds:
        journal.durable(Confirm(key(), hold.reservation_id))
        journal.durable(
            Fulfill(
                key(), hold.reservation_id, (LineQuantity(hold.lines[0].sku, L1, 4),)
            )
        )
    journal.durable(allocation((skus[1], WEB, 9, False), (skus[2], MARKET, 5, True)))
    journal.durable(Release(key(), holds[0].reservation_id))
    journal.durable(Reserve(key(), MARKET, (ReserveLine(skus[2], 2, location=L1),)))
    expected = allocation_state(engine)
    later = journal.records[covered:]
    assert {record.shard for record in later} == {0, 1, 2}

    rng = random.Random(7)
    orders = [
        later,
        sorted(later, key=lambda record: (-record.shard, record.seq)),
        *(interleaved(later, rng) for _ in range(5)),
    ]
    for records in orders:
        assert allocation_state(recovered(clock, checkpoint, records)) == expected
    assert allocation_state(recovered(clock, None, journal.records)) == expected
    assert expected == {
        (skus[0], WEB, ""): (16, 16, True),
        (skus[1], WEB, ""): (9, 7, False),
        (skus[2], WEB, ""): (16, 14, True),
        (skus[2], MARKET, ""): (5, 3, True),
    }


def release_line(journal: Journal, reservation_id: str, line: LineQuantity) -> None:
    journal.durable(Release(key(), reservation_id, (line,)))


def fulfil_line(journal: Journal, reservation_id: str, line: LineQuantity) -> None:
    journal.durable(Confirm(key(), reservation_id))
    journal.durable(Fulfill(key(), reservation_id, (line,)))


@pytest.mark.parametrize(
    ("finish_line", "expected"),
    [
        pytest.param(release_line, (8, 5), id="released"),
        pytest.param(fulfil_line, (6, 3), id="fulfilled"),
    ],
)
def test_recovery_keeps_what_a_channel_holds_beside_a_line_that_holds_nothing(
    clock: FakeClock,
    finish_line: Callable[[Journal, str, LineQuantity], None],
    expected: Pool,
) -> None:
    engine = new_engine(clock)
    journal = Journal(engine)
    counts = (OnHandCount(A, L1, 10), OnHandCount(A, L2, 10))
    journal.durable(SetOnHand("erp", key(), counts))
    journal.durable(allocation((A, WEB, 8, False)))
    lines = (ReserveLine(A, 2, location=L1), ReserveLine(A, 3, location=L2))
    hold = journal.reserve(Reserve(key(), WEB, lines))
    finish_line(journal, hold.reservation_id, LineQuantity(A, L1, 2))
    assert engine.reservations[hold.reservation_id].is_active

    after = recovered(clock, None, journal.records)

    assert after.channel_held == engine.channel_held == {(WEB, A, L2): 3}
    assert pool(after, A, WEB) == pool(engine, A, WEB) == expected


@pytest.mark.parametrize(("units", "expected"), [(10, (10, 6)), (2, (2, 0))])
def test_recovery_keeps_an_acknowledged_pool_whose_shard_committed_before_a_fulfilment(
    clock: FakeClock, units: int, expected: Pool
) -> None:
    """Each shard's writer commits on its own. A fulfilment decided on its sku's
    shard, then a new pool on shard 0: when shard 0's commit lands and the
    fulfilment's does not (its write failed, or the process died), the acknowledged
    state is the new pool with the hold still in it, whatever order they were
    decided in."""
    engine = new_engine(clock)
    journal = Journal(engine)
    # A sku whose records go to shard 1, while policy records go to shard 0.
    sku = skus_on_distinct_shards(len(engine.shards))[1]
    journal.durable(SetOnHand("erp", key(), (OnHandCount(sku, L1, 20),)))
    journal.durable(allocation((sku, WEB, 10, True)))
    hold = journal.reserve(Reserve(key(), WEB, (ReserveLine(sku, 4, location=L1),)))
    journal.durable(Confirm(key(), hold.reservation_id))
    checkpoint, _ = journal.checkpoint()

    fulfilment = decided(engine, Fulfill(key(), hold.reservation_id))
    change = decided(engine, allocation((sku, WEB, units, True)))
    engine.mark_durable(change)
    assert fulfilment.record is not None and fulfilment.record.shard != 0
    assert change.record is not None and change.record.shard == 0

    after = recovered(clock, checkpoint, [stored(change.record)])

    assert after.reservations[hold.reservation_id].quantity_held == 4
    assert pool(after, sku, WEB) == expected, (
        f"recovered pool (units, remaining) {pool(after, sku, WEB)}; acknowledged: "
        f"set to {units} with 4 still held, the fulfilment never written"
    )


@pytest.mark.parametrize("is_fulfilment_durable_first", [True, False])
def test_pool_set_while_a_fulfilment_is_in_flight_recovers_as_it_was_shown(
    clock: FakeClock, is_fulfilment_durable_first: bool
) -> None:
    """Both writes commit, in either order: recovery must give the pool the live
    engine showed, and that pool must be one the two changes allow in some order."""
    engine = new_engine(clock)
    journal = Journal(engine)
    sku = skus_on_distinct_shards(len(engine.shards))[2]
    journal.durable(SetOnHand("erp", key(), (OnHandCount(sku, L1, 20),)))
    journal.durable(allocation((sku, WEB, 10, True)))
    hold = journal.reserve(Reserve(key(), WEB, (ReserveLine(sku, 4, location=L1),)))
    journal.durable(Confirm(key(), hold.reservation_id))

    fulfilment = decided(engine, Fulfill(key(), hold.reservation_id))
    change = decided(engine, allocation((sku, WEB, 7, True)))
    first, second = (
        (fulfilment, change)
        if is_fulfilment_durable_first
        else (
            change,
            fulfilment,
        )
    )
    for decision in (first, second):
        engine.mark_durable(decision)
        assert decision.record is not None
        journal.records.append(stored(decision.record))

    shown = pool(engine, sku, WEB)
    assert shown in {(7, 7), (3, 3)}
    assert pool(recovered(clock, None, journal.records), sku, WEB) == shown


# Engine against a reference model -------------------------------------------------------

CHANNELS = (WEB, MARKET, APP)
STEPS_PER_RUN = 400
RUNS = 3
SHORT_TTL_S = 60
# Weighted steps of a random run: mostly reservation traffic, some policy changes.
STEPS = (
    ("allocate", 10),
    ("reserve", 40),
    ("confirm", 10),
    ("release", 12),
    ("fulfil", 12),
    ("expire", 8),
    ("restock", 8),
)


@dataclasses.dataclass(slots=True)
class ModelHold:
    channel: str
    sku: str
    quantity: int
    is_confirmed: bool
    expires_us: int


@dataclasses.dataclass(slots=True)
class AllocationModel:
    """The contract's arithmetic, kept apart from the engine's: per sku on-hand and
    held, allocations in force, and active holds."""

    on_hand: dict[str, int] = dataclasses.field(default_factory=dict)
    pools: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    exclusive: dict[tuple[str, str], bool] = dataclasses.field(default_factory=dict)
    holds: dict[str, ModelHold] = dataclasses.field(default_factory=dict)

    def held(self, sku: str, channel: str = "") -> int:
        return sum(
            h.quantity
            for h in self.holds.values()
            if h.sku == sku and (not channel or h.channel == channel)
        )

    def remaining(self, sku: str, channel: str) -> int:
        return max(0, self.pools[(sku, channel)] - self.held(sku, channel))

    def expected_reserve(
        self, channel: str, sku: str, quantity: int
    ) -> tuple[bool, ShortReason | None, int]:
        """(held, short reason, quantity available) of an all-or-nothing line."""
        free = self.on_hand[sku] - self.held(sku)
        own = None
        if (sku, channel) in self.pools:
            own = self.remaining(sku, channel)
        fence = sum(
            self.remaining(s, other)
            for (s, other), is_exclusive in self.exclusive.items()
            if s == sku and other != channel and is_exclusive
        )
        fence_room = max(0, free - fence) if fence else None
        limits = [x for x in (own, fence_room) if x is not None]
        available = min([free, *limits])
        if quantity <= available:
            return True, None, available
        # Where the own pool and a fence limit the line alike, the pool is named.
        if (
            own is not None
            and own < min(free, quantity)
            and (fence_room is None or own <= fence_room)
        ):
            return False, ShortReason.CHANNEL_ALLOCATION_EXHAUSTED, available
        return False, ShortReason.INSUFFICIENT_STOCK, available


class RandomRun:
    def __init__(self, clock: FakeClock, seed: int) -> None:
        self.clock = clock
        self.rng = random.Random(seed)
        self.engine = new_engine(clock)
        self.journal = Journal(self.engine)
        self.model = AllocationModel()
        self.skus = skus_on_distinct_shards(len(self.engine.shards))
        counts = tuple(OnHandCount(s, loc, 10) for s in self.skus for loc in (L1, L2))
        self.journal.durable(SetOnHand("erp", key(), counts))
        self.model.on_hand = dict.fromkeys(self.skus, 20)

    def step(self) -> str:
        actions: dict[str, Callable[[], None]] = {
            "allocate": self.allocate,
            "reserve": self.reserve,
            "confirm": self.confirm,
            "release": self.release,
            "fulfil": self.fulfil,
            "expire": self.expire,
            "restock": self.restock,
        }
        names = [name for name, _ in STEPS]
        name = self.rng.choices(names, [weight for _, weight in STEPS])[0]
        actions[name]()
        return name

    def allocate(self) -> None:
        chosen = self.rng.sample(
            [(s, c) for s in self.skus for c in CHANNELS], self.rng.randint(1, 2)
        )
        levels = [
            (sku, channel, self.rng.choice([0, *range(1, 16)]), self.rng.random() < 0.5)
            for sku, channel in chosen
        ]
        self.journal.durable(allocation(*levels))
        for sku, channel, units, is_exclusive in levels:
            if units:
                self.model.pools[(sku, channel)] = units
                self.model.exclusive[(sku, channel)] = is_exclusive
            else:
                self.model.pools.pop((sku, channel), None)
                self.model.exclusive.pop((sku, channel), None)

    def reserve(self) -> None:
        channel, sku = self.rng.choice(CHANNELS), self.rng.choice(self.skus)
        quantity = self.rng.randint(1, 5)
        ttl_s = self.rng.choice([SHORT_TTL_S, 3 * SHORT_TTL_S])
        expected = self.model.expected_reserve(channel, sku, quantity)
        line = ReserveLine(sku, quantity, locations=(L1, L2), allow_split=True)
        result = self.journal.reserve(Reserve(key(), channel, (line,), ttl_s=ttl_s))

        is_held = result.outcome is ReserveOutcome.RESERVED
        got = (
            is_held,
            result.lines[0].short_reason,
            result.lines[0].quantity_available,
        )
        assert got == expected, f"{channel} reserving {quantity} of {sku}"
        if is_held:
            expires_us = self.clock.now_us() + ttl_s * US_PER_S
            hold = ModelHold(channel, sku, quantity, False, expires_us)
            self.model.holds[result.reservation_id] = hold

    def _pick(self, *, is_confirmed: bool | None) -> str | None:
        ids = sorted(
            rid
            for rid, hold in self.model.holds.items()
            if is_confirmed is None or hold.is_confirmed is is_confirmed
        )
        return self.rng.choice(ids) if ids else None

    def confirm(self) -> None:
        rid = self._pick(is_confirmed=False)
        if rid is not None:
            self.journal.durable(Confirm(key(), rid))
            self.model.holds[rid].is_confirmed = True

    def release(self) -> None:
        rid = self._pick(is_confirmed=None)
        if rid is not None:
            self.journal.durable(Release(key(), rid))
            del self.model.holds[rid]

    def fulfil(self) -> None:
        rid = self._pick(is_confirmed=True)
        if rid is None:
            return
        self.journal.durable(Fulfill(key(), rid))
        hold = self.model.holds.pop(rid)
        self.model.on_hand[hold.sku] -= hold.quantity
        if (hold.sku, hold.channel) in self.model.pools:
            self.model.pools[(hold.sku, hold.channel)] -= hold.quantity

    def expire(self) -> None:
        self.clock.advance(SHORT_TTL_S + 1)
        now_us = self.clock.now_us()
        due = [
            rid
            for rid, hold in self.model.holds.items()
            if not hold.is_confirmed and hold.expires_us <= now_us
        ]
        assert self.journal.expire() == len(due)
        for rid in due:
            del self.model.holds[rid]

    def restock(self) -> None:
        sku, units = self.rng.choice(self.skus), self.rng.randint(1, 6)
        on_hand = self.engine.positions_of(sku)[L2].on_hand + units
        self.journal.durable(SetOnHand("erp", key(), (OnHandCount(sku, L2, on_hand),)))
        self.model.on_hand[sku] += units

    def expected_state(self) -> dict[tuple[str, str, str], tuple[int, int, bool]]:
        """Every allocation of the random runs spans every location (group "")."""
        return {
            (*at, ""): (units, self.model.remaining(*at), self.model.exclusive[at])
            for at, units in self.model.pools.items()
        }


def run_seed() -> int:
    seed = int(os.environ.get("STOCKWARD_TEST_SEED", secrets.randbits(32)))
    print(f"STOCKWARD_TEST_SEED={seed}")
    return seed


def test_pools_follow_the_reference_model_and_recover_in_any_shard_order(
    clock: FakeClock,
) -> None:
    base_seed = run_seed()
    for run in range(RUNS):
        seed = base_seed + run
        rng = random.Random(seed)
        random_run = RandomRun(clock, seed)
        checkpoint_at = rng.randrange(STEPS_PER_RUN)
        checkpoint: Checkpoint | None = None
        covered = 0

        for index in range(STEPS_PER_RUN):
            name = random_run.step()
            state = allocation_state(random_run.engine)
            assert state == random_run.expected_state(), f"seed={seed} {index}:{name}"
            if index == checkpoint_at:
                checkpoint, covered = random_run.journal.checkpoint()

        expected = allocation_state(random_run.engine)
        later = random_run.journal.records[covered:]
        for _ in range(3):
            engine = recovered(clock, checkpoint, interleaved(later, rng))
            assert allocation_state(engine) == expected, f"seed={seed}"
            assert _lent(engine) == _lent(random_run.engine), f"seed={seed}"


def _lent(engine: Engine) -> dict[tuple[str, str, str], int]:
    return {key_: units for key_, units in engine.channel_held.items() if units}
