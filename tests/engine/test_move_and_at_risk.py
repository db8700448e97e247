"""Focused tests of moving held units between locations, and of the holds that on-hand
no longer covers, in the engine.

Each test builds its state on a fresh engine with three shards and a fake clock (see
conftest.py). Reservation ids come from a counter, so at one instant the later hold
has the larger id; the tests still advance the clock between holds whose age matters.
The model comparison at the end prints its seed; replay it with STOCKWARD_SEED=<seed>.
"""

import dataclasses
import json
import os
import random
from collections.abc import Callable

import pytest

from server.clock import FakeClock
from server.engine.commands import (
    Adjustment,
    AdjustmentReason,
    AdjustStock,
    AllocationLevel,
    BufferLevel,
    Confirm,
    Fulfill,
    LineQuantity,
    Move,
    OnHandCount,
    Release,
    ReservationResult,
    Reserve,
    ReserveLine,
    ReserveOutcome,
    ReserveResult,
    SafetyLevel,
    SetChannelAllocation,
    SetChannelBuffer,
    SetControl,
    SetOnHand,
    SetSafetyStock,
)
from server.engine.engine import Engine, Replay
from server.engine.errors import ErrorKind
from server.engine.model import Reservation, ReservationState
from server.engine.policy import ControlKind
from tests.engine.support import (
    L1,
    L2,
    L3,
    US_PER_S,
    A,
    B,
    change,
    decided,
    durable,
    hold,
    key,
    new_engine,
    numbers,
    refusal,
    stock,
)

WEB, MARKET = "web", "marketplace"
ACTOR = "ops"
HOUR_S = 3600

# A step that puts the engine in the state a test needs.
Preparation = Callable[[Engine, FakeClock], None]
Finish = Callable[[Engine, FakeClock, str], None]


def move(
    reservation_id: str,
    quantity: int,
    *,
    sku: str = A,
    source: str = L1,
    target: str = L2,
    request_id: str = "",
) -> Move:
    return Move(
        request_id=request_id or key("move-"),
        reservation_id=reservation_id,
        sku=sku,
        from_location=source,
        to_location=target,
        quantity=quantity,
    )


def moved(engine: Engine, command: Move) -> Reservation:
    result = durable(engine, command)
    assert isinstance(result, ReservationResult)
    return result.reservation


def lines_of(reservation: Reservation) -> list[tuple[str, str, int, int]]:
    """(sku, location, reserved, held) per line, in order."""
    return [
        (x.sku, x.location, x.quantity_reserved, x.quantity_held)
        for x in reservation.lines
    ]


def snapshot(engine: Engine) -> str:
    """Everything a refused command must leave as it was."""
    positions, reservations, seqs, policies = engine.checkpoint_rows()
    return json.dumps([sorted(positions), reservations, seqs, policies])


def hold_for(engine: Engine, channel: str, *lines: ReserveLine) -> str:
    result = durable(engine, Reserve(request_id=key(), channel=channel, lines=lines))
    assert isinstance(result, ReserveResult)
    assert result.outcome is ReserveOutcome.RESERVED
    return result.reservation_id


def adjust(engine: Engine, sku: str, location: str, delta: int) -> None:
    reason = AdjustmentReason.POS_SALE if delta < 0 else AdjustmentReason.RECEIPT
    adjustment = Adjustment(sku, location, delta, reason)
    durable(engine, AdjustStock("pos-1", key("sale-"), (adjustment,)))


def at_risk(engine: Engine, channel: str = "") -> dict[str, dict[tuple[str, str], int]]:
    """Reservation id -> (sku, location) -> units uncovered, in no particular order."""
    listed: dict[str, dict[tuple[str, str], int]] = {}
    for reservation, lines in engine.at_risk(channel=channel):
        assert reservation.reservation_id not in listed
        listed[reservation.reservation_id] = {(s, loc): n for s, loc, n in lines}
        assert len(listed[reservation.reservation_id]) == len(lines)
    return listed


# Move ------------------------------------------------------------------------------------


def test_move_holds_at_the_target_at_once_and_frees_the_source_once_durable(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 10), (A, L2, 10))
    reservation_id = hold(engine, A, L1, 4)

    decision = decided(engine, move(reservation_id, 3))

    assert numbers(engine, A, L2) == (10, 3, 7)
    # Until the move is durable its source units stay withheld, like a release.
    assert numbers(engine, A, L1) == (10, 1, 6)
    engine.mark_durable(decision)
    assert numbers(engine, A, L1) == (10, 1, 9)
    assert isinstance(decision.result, ReservationResult)
    assert lines_of(decision.result.reservation) == [(A, L1, 1, 1), (A, L2, 3, 3)]
    assert decision.result.reservation.state is ReservationState.PENDING


def test_moving_a_whole_line_drops_it_and_merges_into_a_line_at_the_target(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 10), (A, L2, 10), (B, L1, 10))
    reservation_id = hold_for(
        engine,
        WEB,
        ReserveLine(A, 2, location=L1),
        ReserveLine(A, 5, location=L2),
        ReserveLine(B, 1, location=L1),
    )

    reservation = moved(engine, move(reservation_id, 2))

    assert lines_of(reservation) == [(A, L2, 7, 7), (B, L1, 1, 1)]
    assert numbers(engine, A, L1) == (10, 0, 10)
    assert numbers(engine, A, L2) == (10, 7, 3)
    web_held = {at: n for at, n in engine.channel_held.items() if at[:2] == (WEB, A)}
    assert web_held == {(WEB, A, L2): 7}


def test_moved_pending_hold_keeps_its_expiry_and_expires_at_the_target(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 10), (A, L2, 10))
    reservation_id = hold(engine, A, L1, 4, ttl_s=60)
    expires_us = engine.reservations[reservation_id].expires_us
    clock.advance(30)

    reservation = moved(engine, move(reservation_id, 4))
    assert reservation.expires_us == expires_us

    clock.advance(30)
    for decision in engine.expire_due(count_max=10):
        engine.mark_durable(decision)
    assert engine.reservations[reservation_id].state is ReservationState.EXPIRED
    assert [numbers(engine, A, L1), numbers(engine, A, L2)] == [(10, 0, 10)] * 2


def test_confirmed_reservation_can_be_moved_and_fulfilled_at_the_target(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 10), (A, L2, 10))
    reservation_id = hold(engine, A, L1, 4)
    change(engine, Confirm(key(), reservation_id))

    moved(engine, move(reservation_id, 4))
    state = change(engine, Fulfill(key(), reservation_id))

    assert state is ReservationState.FULFILLED
    assert numbers(engine, A, L1) == (10, 0, 10)
    assert numbers(engine, A, L2) == (6, 0, 6)


def target_short_by_safety(engine: Engine, clock: FakeClock) -> None:
    durable(engine, SetSafetyStock(ACTOR, key("chg-"), (SafetyLevel(A, L2, 3),)))


def target_short_by_buffer(engine: Engine, clock: FakeClock) -> None:
    durable(engine, SetChannelBuffer(ACTOR, key("chg-"), (BufferLevel("web", A, 3),)))


def target_short_by_other_holds(engine: Engine, clock: FakeClock) -> None:
    hold_for(engine, MARKET, ReserveLine(A, 3, location=L2))


def target_short_by_suppression(engine: Engine, clock: FakeClock) -> None:
    until_us = clock.now_us() + HOUR_S * US_PER_S
    command = SetControl(
        ACTOR, key("ctl-"), ControlKind.SUPPRESS, "web", A, "", 0, 0, 0, until_us, "x"
    )
    durable(engine, command)


@pytest.mark.parametrize(
    ("make_short", "available"),
    [
        pytest.param(target_short_by_safety, 3, id="safety-stock"),
        pytest.param(target_short_by_buffer, 3, id="channel-buffer"),
        pytest.param(target_short_by_other_holds, 3, id="other-holds"),
        pytest.param(target_short_by_suppression, 0, id="suppressed"),
    ],
)
def test_move_beyond_what_the_target_may_hold_is_refused_without_change(
    engine: Engine, clock: FakeClock, make_short: Preparation, available: int
) -> None:
    stock(engine, (A, L1, 10), (A, L2, 6))
    reservation_id = hold(engine, A, L1, 4)
    make_short(engine, clock)
    before = snapshot(engine)

    error = refusal(engine, move(reservation_id, 4))

    assert (error.kind, error.reason, error.field) == (
        ErrorKind.FAILED_PRECONDITION,
        "INSUFFICIENT_STOCK_AT_TARGET",
        "to_location",
    )
    assert f"can hold {available} " in error.message
    assert snapshot(engine) == before
    if available:
        assert lines_of(moved(engine, move(reservation_id, available)))[-1] == (
            A,
            L2,
            available,
            available,
        )


def test_move_to_a_location_that_never_stocked_the_sku_is_refused(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 10), (B, L3, 10))
    reservation_id = hold(engine, A, L1, 4)
    before = snapshot(engine)

    error = refusal(engine, move(reservation_id, 1, target=L3))

    assert error.reason == "INSUFFICIENT_STOCK_AT_TARGET"
    assert snapshot(engine) == before


@pytest.mark.parametrize(
    ("quantity", "sku", "source"),
    [
        pytest.param(5, A, L1, id="more-than-held"),
        pytest.param(1, B, L1, id="sku-not-held"),
        pytest.param(1, A, L3, id="location-not-held"),
    ],
)
def test_move_of_more_than_the_line_holds_is_refused_without_change(
    engine: Engine, quantity: int, sku: str, source: str
) -> None:
    stock(engine, (A, L1, 10), (A, L2, 10), (B, L1, 10), (A, L3, 10))
    reservation_id = hold(engine, A, L1, 4)
    before = snapshot(engine)

    error = refusal(
        engine, move(reservation_id, quantity, sku=sku, source=source, target=L2)
    )

    assert (error.kind, error.reason, error.field) == (
        ErrorKind.FAILED_PRECONDITION,
        "QUANTITY_EXCEEDS_HELD",
        "quantity",
    )
    assert snapshot(engine) == before


def test_move_after_a_partial_release_moves_only_what_is_still_held(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 10), (A, L2, 10))
    reservation_id = hold(engine, A, L1, 5)
    change(engine, Release(key(), reservation_id, (LineQuantity(A, L1, 2),)))

    refused = refusal(engine, move(reservation_id, 4))
    reservation = moved(engine, move(reservation_id, 3))

    assert refused.reason == "QUANTITY_EXCEEDS_HELD"
    line = reservation.lines[0]
    assert (line.location, line.quantity_held, line.quantity_released) == (L1, 0, 2)
    assert lines_of(reservation)[1] == (A, L2, 3, 3)
    assert [numbers(engine, A, L1), numbers(engine, A, L2)] == [(10, 0, 10), (10, 3, 7)]


def finish_released(engine: Engine, clock: FakeClock, reservation_id: str) -> None:
    change(engine, Release(key(), reservation_id))


def finish_fulfilled(engine: Engine, clock: FakeClock, reservation_id: str) -> None:
    change(engine, Confirm(key(), reservation_id))
    change(engine, Fulfill(key(), reservation_id))


def finish_expired(engine: Engine, clock: FakeClock, reservation_id: str) -> None:
    clock.advance(HOUR_S)
    for decision in engine.expire_due(count_max=10):
        engine.mark_durable(decision)


@pytest.mark.parametrize(
    ("finish", "reason"),
    [
        pytest.param(finish_released, "RESERVATION_RELEASED", id="released"),
        pytest.param(finish_fulfilled, "RESERVATION_FULFILLED", id="fulfilled"),
        pytest.param(finish_expired, "RESERVATION_EXPIRED", id="expired"),
    ],
)
def test_move_of_a_finished_reservation_is_refused_without_change(
    engine: Engine, clock: FakeClock, finish: Finish, reason: str
) -> None:
    stock(engine, (A, L1, 10), (A, L2, 10))
    reservation_id = hold(engine, A, L1, 4, ttl_s=60)
    finish(engine, clock, reservation_id)
    assert engine.reservations[reservation_id].quantity_held == 0
    before = snapshot(engine)

    error = refusal(engine, move(reservation_id, 1))

    assert (error.kind, error.reason) == (ErrorKind.FAILED_PRECONDITION, reason)
    assert snapshot(engine) == before


def test_move_of_a_due_hold_before_the_sweep_is_refused_as_expired(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 10), (A, L2, 10))
    reservation_id = hold(engine, A, L1, 4, ttl_s=60)
    clock.advance(60)

    error = refusal(engine, move(reservation_id, 1))

    assert error.reason == "RESERVATION_EXPIRED"
    assert numbers(engine, A, L2) == (10, 0, 10)


@pytest.mark.parametrize(
    ("command", "reason", "field"),
    [
        pytest.param(move("r", 0), "QUANTITY_OUT_OF_RANGE", "quantity", id="zero"),
        pytest.param(
            move("r", 1, target=L1), "SAME_LOCATION", "to_location", id="same"
        ),
        pytest.param(move("r", 1, target=""), "FIELD_REQUIRED", "to_location", id="to"),
        pytest.param(move("r", 1, sku=""), "FIELD_REQUIRED", "sku", id="sku"),
    ],
)
def test_malformed_move_is_refused_naming_the_field(
    engine: Engine, command: Move, reason: str, field: str
) -> None:
    error = refusal(engine, command)

    assert (error.kind, error.reason, error.field) == (
        ErrorKind.INVALID_ARGUMENT,
        reason,
        field,
    )


def test_move_retry_is_replayed_and_moves_nothing_more(engine: Engine) -> None:
    stock(engine, (A, L1, 10), (A, L2, 10))
    reservation_id = hold(engine, A, L1, 4)
    command = move(reservation_id, 2, request_id="move-1")
    first = moved(engine, command)

    again = engine.decide(command)
    reused = refusal(engine, move(reservation_id, 1, request_id="move-1"))

    assert isinstance(again, Replay)
    assert isinstance(again.result, ReservationResult)
    assert again.result.replayed
    assert lines_of(again.result.reservation) == lines_of(first)
    assert [numbers(engine, A, L1), numbers(engine, A, L2)] == [(10, 2, 8), (10, 2, 8)]
    assert (reused.reason, reused.field) == ("REQUEST_ID_REUSED", "request_id")


def test_move_records_replay_into_the_same_reservation_and_positions(
    engine: Engine, clock: FakeClock
) -> None:
    decisions = [
        decided(
            engine,
            SetOnHand(
                "erp", "count-1", (OnHandCount(A, L1, 10), OnHandCount(A, L2, 10))
            ),
        )
    ]
    engine.mark_durable(decisions[0])
    clock.advance(1)
    decisions.append(decided(engine, Reserve("r-1", WEB, (ReserveLine(A, 5, L1),))))
    engine.mark_durable(decisions[-1])
    result = decisions[-1].result
    assert isinstance(result, ReserveResult)
    clock.advance(1)
    decisions.append(decided(engine, move(result.reservation_id, 3)))
    engine.mark_durable(decisions[-1])
    recovered = new_engine(clock)

    for decision in decisions:
        assert decision.record is not None
        body = json.loads(json.dumps(decision.record.body))
        recovered.replay_record(decision.record.shard, decision.record.seq, body)
    recovered.finish_recovery()

    assert recovered.reservations == engine.reservations
    assert [numbers(recovered, A, L1), numbers(recovered, A, L2)] == [
        (10, 2, 8),
        (10, 3, 7),
    ]


# At risk ---------------------------------------------------------------------------------


def three_holds(engine: Engine, clock: FakeClock) -> list[str]:
    """Holds of 3, 2 and 4 units of A at L1 (9 on hand), oldest first, a second
    apart."""
    stock(engine, (A, L1, 9))
    ids = []
    for quantity in (3, 2, 4):
        ids.append(hold(engine, A, L1, quantity))
        clock.advance(1)
    return ids


def test_nothing_is_at_risk_while_on_hand_covers_every_hold(
    engine: Engine, clock: FakeClock
) -> None:
    three_holds(engine, clock)

    assert at_risk(engine) == {}


def test_shortfall_is_laid_on_the_newest_holds_first(
    engine: Engine, clock: FakeClock
) -> None:
    oldest, middle, newest = three_holds(engine, clock)

    adjust(engine, A, L1, -5)

    # 4 on hand for 9 held: 5 uncovered, 4 of them the newest hold's, 1 the middle's.
    assert at_risk(engine) == {middle: {(A, L1): 1}, newest: {(A, L1): 4}}
    assert numbers(engine, A, L1) == (4, 9, 0)
    for reservation_id, quantity in ((oldest, 3), (middle, 2), (newest, 4)):
        assert engine.reservations[reservation_id].quantity_held == quantity


def test_shortfall_beyond_everything_held_lists_every_hold_in_full(
    engine: Engine, clock: FakeClock
) -> None:
    oldest, middle, newest = three_holds(engine, clock)

    durable(engine, SetOnHand("erp", key("count-"), (OnHandCount(A, L1, 0),)))

    assert at_risk(engine) == {
        oldest: {(A, L1): 3},
        middle: {(A, L1): 2},
        newest: {(A, L1): 4},
    }


def test_safety_stock_counts_towards_the_shortfall(
    engine: Engine, clock: FakeClock
) -> None:
    _, middle, newest = three_holds(engine, clock)
    adjust(engine, A, L1, 1)
    durable(engine, SetSafetyStock(ACTOR, key("chg-"), (SafetyLevel(A, L1, 2),)))
    assert at_risk(engine) == {newest: {(A, L1): 1}}

    until_us = clock.now_us() + HOUR_S * US_PER_S
    durable(
        engine,
        SetControl(
            ACTOR, "raise", ControlKind.RAISE_SAFETY, "", A, L1, 4, 0, 0, until_us, "x"
        ),
    )

    assert at_risk(engine) == {middle: {(A, L1): 1}, newest: {(A, L1): 4}}
    clock.advance(HOUR_S)
    assert at_risk(engine) == {newest: {(A, L1): 1}}


def test_confirmed_and_pending_holds_are_both_at_risk_and_finished_ones_are_not(
    engine: Engine, clock: FakeClock
) -> None:
    oldest, middle, newest = three_holds(engine, clock)
    change(engine, Confirm(key(), newest))
    change(engine, Release(key(), middle))

    adjust(engine, A, L1, -7)

    # 2 on hand for 7 held: the confirmed newest hold first, then the oldest.
    assert at_risk(engine) == {oldest: {(A, L1): 1}, newest: {(A, L1): 4}}


def test_a_reservation_short_at_two_positions_is_listed_once_with_both_lines(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 5), (B, L2, 5), (A, L3, 5))
    older = hold(engine, A, L1, 2)
    clock.advance(1)
    newer = hold_for(
        engine,
        WEB,
        ReserveLine(A, 3, location=L1),
        ReserveLine(B, 2, location=L2),
        ReserveLine(A, 1, location=L3),
    )

    adjust(engine, A, L1, -3)
    adjust(engine, B, L2, -4)

    assert at_risk(engine) == {newer: {(A, L1): 3, (B, L2): 1}}
    assert older not in at_risk(engine)


def test_at_risk_is_filtered_by_channel_after_the_shortfall_is_laid(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 6))
    web = hold_for(engine, WEB, ReserveLine(A, 3, location=L1))
    clock.advance(1)
    market = hold_for(engine, MARKET, ReserveLine(A, 3, location=L1))

    adjust(engine, A, L1, -2)

    assert at_risk(engine, WEB) == {}
    assert at_risk(engine, MARKET) == {market: {(A, L1): 2}}
    adjust(engine, A, L1, -3)
    assert at_risk(engine, WEB) == {web: {(A, L1): 2}}
    assert at_risk(engine, MARKET) == {market: {(A, L1): 3}}


def test_restoring_stock_or_releasing_holds_clears_the_risk(
    engine: Engine, clock: FakeClock
) -> None:
    _, middle, newest = three_holds(engine, clock)
    adjust(engine, A, L1, -5)

    change(engine, Release(key(), newest))
    assert at_risk(engine) == {middle: {(A, L1): 1}}
    adjust(engine, A, L1, 1)

    assert at_risk(engine) == {}


# At risk against a reference model -------------------------------------------------------

MODEL_POSITIONS = ((A, L1), (A, L2), (B, L1))
MODEL_STEPS = 300


@pytest.fixture
def seed() -> int:
    """The run's seed: STOCKWARD_SEED if set, else a fresh one. Printed either way."""
    text = os.environ.get("STOCKWARD_SEED")
    value = int(text) if text else random.SystemRandom().randrange(2**32)
    print(f"STOCKWARD_SEED={value}")
    return value


@dataclasses.dataclass
class AtRiskModel:
    """On-hand, safety stock and active holds, and the shortfall each hold carries:
    per position, held + safety - on-hand, at most what is held, laid on the newest
    holds first."""

    on_hand: dict[tuple[str, str], int]
    safety: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    # reservation id -> (channel, position -> units), in the order they were made.
    holds: dict[str, tuple[str, dict[tuple[str, str], int]]] = dataclasses.field(
        default_factory=dict
    )

    def held(self, at: tuple[str, str]) -> int:
        return sum(lines.get(at, 0) for _, lines in self.holds.values())

    def free(self, at: tuple[str, str]) -> int:
        return self.on_hand[at] - self.held(at) - self.safety.get(at, 0)

    def at_risk(self, channel: str) -> dict[str, dict[tuple[str, str], int]]:
        uncovered: dict[str, dict[tuple[str, str], int]] = {}
        for at in MODEL_POSITIONS:
            left = min(-self.free(at), self.held(at))
            for reservation_id in reversed(self.holds):
                units = min(left, self.holds[reservation_id][1].get(at, 0))
                if units > 0:
                    uncovered.setdefault(reservation_id, {})[at] = units
                    left -= units
        return {
            rid: lines
            for rid, lines in uncovered.items()
            if not channel or self.holds[rid][0] == channel
        }


def model_step(
    engine: Engine, model: AtRiskModel, rng: random.Random, label: str
) -> None:
    """One random hold, release, stock change, count or safety level, on both
    sides."""
    action = rng.choice(("hold", "hold", "release", "adjust", "count", "safety"))
    if action == "hold":
        channel = rng.choice((WEB, MARKET))
        places = rng.sample(MODEL_POSITIONS, rng.randint(1, 2))
        wanted = {at: rng.randint(1, 3) for at in places}
        lines = tuple(ReserveLine(s, n, location=loc) for (s, loc), n in wanted.items())
        result = durable(engine, Reserve(key(), channel, lines))
        assert isinstance(result, ReserveResult)
        fits = all(n <= model.free(at) for at, n in wanted.items())
        assert (result.outcome is ReserveOutcome.RESERVED) == fits, label
        if fits:
            model.holds[result.reservation_id] = (channel, wanted)
    elif action == "release" and model.holds:
        reservation_id = rng.choice(sorted(model.holds))
        change(engine, Release(key(), reservation_id))
        del model.holds[reservation_id]
    elif action == "adjust":
        at = rng.choice(MODEL_POSITIONS)
        # Kept within 0 to 15 on hand, so that holds keep coming and going at risk.
        after = min(15, max(0, model.on_hand[at] + rng.randint(-4, 4)))
        if after != model.on_hand[at]:
            adjust(engine, *at, after - model.on_hand[at])
            model.on_hand[at] = after
    elif action == "count":
        at = rng.choice(MODEL_POSITIONS)
        count = rng.randint(0, 12)
        durable(engine, SetOnHand("erp", key("count-"), (OnHandCount(*at, count),)))
        model.on_hand[at] = count
    elif action == "safety":
        at = rng.choice(MODEL_POSITIONS)
        units = rng.randint(0, 3)
        durable(engine, SetSafetyStock(ACTOR, key("chg-"), (SafetyLevel(*at, units),)))
        model.safety[at] = units


def test_at_risk_matches_a_reference_model_over_random_histories(
    engine: Engine, clock: FakeClock, seed: int
) -> None:
    rng = random.Random(seed)
    stock(engine, *((*at, 12) for at in MODEL_POSITIONS))
    model = AtRiskModel(on_hand=dict.fromkeys(MODEL_POSITIONS, 12))
    seen_at_risk = 0

    for step in range(MODEL_STEPS):
        label = f"STOCKWARD_SEED={seed} step={step}"
        # A second between steps: the newest hold is the one made last.
        clock.advance(1)
        model_step(engine, model, rng, label)

        for channel in ("", WEB, MARKET):
            assert at_risk(engine, channel) == model.at_risk(channel), label
        seen_at_risk += bool(model.at_risk(""))
        for reservation_id, (_, lines) in model.holds.items():
            held = engine.reservations[reservation_id].lines
            assert {(x.sku, x.location): x.quantity_held for x in held} == lines, label

    # The history must have put holds at risk often enough to mean something.
    assert seen_at_risk > MODEL_STEPS // 20, f"STOCKWARD_SEED={seed}"


def test_move_does_not_take_units_another_channel_has_ring_fenced(
    engine: Engine,
) -> None:
    """A count left the source over-held, so its units do not come free; the units
    taken at the target are new and must leave the marketplace's pool free."""
    stock(engine, (A, L1, 4), (A, L2, 5))
    reservation_id = hold(engine, A, L1, 4)
    durable(
        engine,
        SetChannelAllocation(
            "ops", key("alloc-"), (AllocationLevel(A, "marketplace", 5, True),)
        ),
    )
    durable(engine, SetOnHand("erp", key("count-"), (OnHandCount(A, L1, 0),)))
    before = snapshot(engine)

    error = refusal(engine, move(reservation_id, 1))

    assert error.reason == "INSUFFICIENT_STOCK_AT_TARGET"
    assert snapshot(engine) == before
