"""Focused tests of continuity controls in the engine: suppressing a channel,
throttling it and raising safety stock; their time boxes, lifting, refusals,
idempotency, records and checkpoints.

Each test builds its state on a fresh engine with three shards and a fake clock (see
conftest.py) and marks every decision durable unless durability is the point.
"""

import json
from collections.abc import Callable
from typing import Any

import pytest

from server.clock import FakeClock
from server.engine.commands import (
    Command,
    LiftControl,
    PolicyResult,
    Reserve,
    ReserveLine,
    ReserveOutcome,
    ReserveResult,
    SafetyLevel,
    SetControl,
    SetSafetyStock,
    ShortReason,
)
from server.engine.engine import Decision, Engine, Replay
from server.engine.errors import EngineError, ErrorKind
from server.engine.policy import ControlKind
from tests.engine.support import (
    L1,
    L2,
    LIMITS,
    RETENTION_S,
    US_PER_S,
    A,
    B,
    decided,
    durable,
    key,
    new_engine,
    refusal,
    stock,
)

WEB, MARKET = "web", "marketplace"
ACTOR = "ops"
HOUR_S = 3600
DAY_S = 24 * HOUR_S


def control(
    clock: FakeClock,
    kind: ControlKind | None,
    *,
    channel: str = "",
    sku: str = "",
    location: str = "",
    units: int = 0,
    percent: int = 0,
    rate_per_s: int = 0,
    lasting_s: int = HOUR_S,
    reason: str = "incident 42",
    change_id: str = "",
    actor: str = ACTOR,
) -> SetControl:
    """A control whose time box ends `lasting_s` from the clock's now."""
    return SetControl(
        actor=actor,
        change_id=change_id or key("ctl-"),
        kind=kind,
        channel=channel,
        sku=sku,
        location=location,
        units=units,
        percent=percent,
        rate_per_s=rate_per_s,
        until_us=clock.now_us() + lasting_s * US_PER_S,
        reason=reason,
    )


def suppress(clock: FakeClock, channel: str, sku: str = "", **kw: Any) -> SetControl:
    return control(clock, ControlKind.SUPPRESS, channel=channel, sku=sku, **kw)


def throttle(clock: FakeClock, channel: str, rate_per_s: int, **kw: Any) -> SetControl:
    return control(
        clock, ControlKind.THROTTLE, channel=channel, rate_per_s=rate_per_s, **kw
    )


def raise_safety(clock: FakeClock, **kw: Any) -> SetControl:
    return control(clock, ControlKind.RAISE_SAFETY, **kw)


def set_control(engine: Engine, command: SetControl) -> str:
    """Set a control that must be accepted; returns its id."""
    result = durable(engine, command)
    assert result == PolicyResult(control_id=f"{command.actor}:{command.change_id}")
    assert isinstance(result, PolicyResult)
    return result.control_id


def lift(engine: Engine, control_id: str) -> None:
    result = durable(engine, LiftControl(ACTOR, key("lift-"), control_id))
    assert result == PolicyResult()


def reserve_for(
    engine: Engine, channel: str, *lines: ReserveLine, allow_partial: bool = False
) -> ReserveResult:
    result = durable(
        engine,
        Reserve(
            request_id=key(), channel=channel, lines=lines, allow_partial=allow_partial
        ),
    )
    assert isinstance(result, ReserveResult)
    return result


def one(sku: str, quantity: int = 1, location: str = L1) -> ReserveLine:
    return ReserveLine(sku, quantity, location=location)


def available(engine: Engine, sku: str, location: str, channel: str = "") -> int:
    ((_, _, _, units),) = engine.availability(sku, [location], channel)
    return units


def safety_at(engine: Engine, sku: str, location: str) -> int:
    ((_, units, _, _),) = engine.availability(sku, [location], "")
    return units


def active_ids(engine: Engine, clock: FakeClock) -> list[str]:
    return sorted(c.control_id for c in engine.policies.active_controls(clock.now_us()))


# Suppress ------------------------------------------------------------------------------


def test_suppressed_sku_comes_up_suppressed_for_that_channel_only(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 10), (B, L1, 10))
    set_control(engine, suppress(clock, WEB, A))

    web_a = reserve_for(engine, WEB, one(A))
    web_b = reserve_for(engine, WEB, one(B))
    market_a = reserve_for(engine, MARKET, one(A))

    assert web_a.outcome is ReserveOutcome.REJECTED
    assert web_a.lines[0].short_reason is ShortReason.CHANNEL_SUPPRESSED
    assert web_a.lines[0].quantity_available == 0
    assert web_b.outcome is ReserveOutcome.RESERVED
    assert market_a.outcome is ReserveOutcome.RESERVED
    assert [available(engine, A, L1, c) for c in (WEB, MARKET, "")] == [0, 9, 9]
    assert available(engine, B, L1, WEB) == 9


def test_suppressing_every_sku_leaves_other_channels_their_stock(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 10), (B, L2, 10))
    set_control(engine, suppress(clock, WEB))

    web = reserve_for(engine, WEB, one(A), one(B, location=L2), allow_partial=True)
    market = reserve_for(engine, MARKET, one(A, 10), one(B, 10, location=L2))

    assert web.outcome is ReserveOutcome.REJECTED
    assert [x.short_reason for x in web.lines] == [ShortReason.CHANNEL_SUPPRESSED] * 2
    assert market.outcome is ReserveOutcome.RESERVED
    assert engine.policies.is_suppressed(WEB, "any-sku", clock.now_us())
    assert not engine.policies.is_suppressed(MARKET, A, clock.now_us())


def test_suppressed_line_sinks_an_all_or_nothing_reserve_but_not_a_partial_one(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 10), (B, L1, 10))
    set_control(engine, suppress(clock, WEB, B))

    whole = reserve_for(engine, WEB, one(A, 2), one(B, 2))
    partial = reserve_for(engine, WEB, one(A, 2), one(B, 2), allow_partial=True)

    assert whole.outcome is ReserveOutcome.REJECTED
    assert [x.short_reason for x in whole.lines] == [
        ShortReason.OTHER_LINE_SHORT,
        ShortReason.CHANNEL_SUPPRESSED,
    ]
    assert partial.outcome is ReserveOutcome.PARTIALLY_RESERVED
    assert [x.quantity_held for x in partial.lines] == [2, 0]
    assert engine.positions_of(A)[L1].held == 2
    assert engine.positions_of(B)[L1].held == 0


def test_suppression_hides_nothing_already_held(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 10))
    held = reserve_for(engine, WEB, one(A, 4))

    set_control(engine, suppress(clock, WEB, A))

    assert engine.reservations[held.reservation_id].quantity_held == 4
    assert engine.positions_of(A)[L1].held == 4
    assert available(engine, A, L1, MARKET) == 6


# Throttle ------------------------------------------------------------------------------


def test_throttle_admits_its_rate_then_refuses_with_the_wait_for_one_token(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 100))
    set_control(engine, throttle(clock, WEB, 4))

    admitted = [reserve_for(engine, WEB, one(A)) for _ in range(4)]
    error = refusal(engine, Reserve(key(), WEB, (one(A),)))

    assert [r.outcome for r in admitted] == [ReserveOutcome.RESERVED] * 4
    assert (error.kind, error.reason, error.field) == (
        ErrorKind.RESOURCE_EXHAUSTED,
        "CHANNEL_THROTTLED",
        "channel",
    )
    assert error.retry_after_s == pytest.approx(0.25, abs=1e-9)
    assert engine.positions_of(A)[L1].held == 4


def test_throttle_refills_with_the_clock_up_to_one_seconds_worth(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 100))
    set_control(engine, throttle(clock, WEB, 4))
    for _ in range(4):
        reserve_for(engine, WEB, one(A))

    clock.advance(0.1)
    early = refusal(engine, Reserve(key(), WEB, (one(A),)))
    clock.advance(0.15)
    after_one_token = reserve_for(engine, WEB, one(A))
    clock.advance(10)
    burst = [reserve_for(engine, WEB, one(A)) for _ in range(4)]
    beyond = refusal(engine, Reserve(key(), WEB, (one(A),)))

    # 0.1 s at 4 per second is 0.4 of a token: 0.6 more is 0.15 s away.
    assert early.retry_after_s == pytest.approx(0.15, abs=1e-9)
    assert after_one_token.outcome is ReserveOutcome.RESERVED
    assert all(r.outcome is ReserveOutcome.RESERVED for r in burst)
    assert beyond.reason == "CHANNEL_THROTTLED"
    assert engine.positions_of(A)[L1].held == 9


def test_throttle_limits_its_own_channel_only(engine: Engine, clock: FakeClock) -> None:
    stock(engine, (A, L1, 100))
    set_control(engine, throttle(clock, WEB, 1))
    reserve_for(engine, WEB, one(A))

    others = [reserve_for(engine, MARKET, one(A)) for _ in range(5)]

    assert all(r.outcome is ReserveOutcome.RESERVED for r in others)
    assert refusal(engine, Reserve(key(), WEB, (one(A),))).reason == (
        "CHANNEL_THROTTLED"
    )


def test_throttle_replays_earlier_answers_and_forgets_refused_requests(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 100))
    set_control(engine, throttle(clock, WEB, 2))
    first = Reserve(key(), WEB, (one(A),))
    answered = durable(engine, first)
    durable(engine, Reserve(key(), WEB, (one(A),)))
    refused_once = Reserve(key(), WEB, (one(A),))
    refusal(engine, refused_once)

    replays = [engine.decide(first) for _ in range(3)]
    clock.advance(0.5)
    retried = durable(engine, refused_once)

    assert isinstance(answered, ReserveResult)
    assert isinstance(retried, ReserveResult)
    for replay in replays:
        assert isinstance(replay, Replay)
        assert isinstance(replay.result, ReserveResult)
        assert replay.result.replayed
        assert replay.result.reservation_id == answered.reservation_id
    assert retried.outcome is ReserveOutcome.RESERVED
    assert not retried.replayed
    assert engine.positions_of(A)[L1].held == 3


def test_new_throttle_starts_with_a_full_second_whatever_an_earlier_one_left(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 200))
    slow = set_control(engine, throttle(clock, WEB, 1))
    reserve_for(engine, WEB, one(A))
    lift(engine, slow)
    set_control(engine, throttle(clock, WEB, 100))

    # A channel throttled for the first time gets one second's worth at once; one
    # whose earlier, stricter throttle was just lifted must get no less.
    throttled = 0
    for _ in range(100):
        try:
            durable(engine, Reserve(key(), WEB, (one(A),)))
        except EngineError as error:
            assert error.reason == "CHANNEL_THROTTLED"
            throttled += 1

    assert throttled == 0
    assert engine.positions_of(A)[L1].held == 101


# Raise safety stock --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "raised"),
    [
        pytest.param({"sku": A}, {(A, L1), (A, L2)}, id="one-sku"),
        pytest.param({"location": L1}, {(A, L1), (B, L1)}, id="one-location"),
        pytest.param({"sku": A, "location": L1}, {(A, L1)}, id="one-position"),
        pytest.param({}, {(A, L1), (A, L2), (B, L1), (B, L2)}, id="everything"),
    ],
)
def test_raised_safety_stock_covers_exactly_its_target(
    engine: Engine,
    clock: FakeClock,
    target: dict[str, str],
    raised: set[tuple[str, str]],
) -> None:
    positions = [(sku, location) for sku in (A, B) for location in (L1, L2)]
    stock(engine, *((sku, location, 10) for sku, location in positions))

    set_control(engine, raise_safety(clock, units=3, **target))

    for sku, location in positions:
        expected = 3 if (sku, location) in raised else 0
        assert safety_at(engine, sku, location) == expected, (sku, location)
        assert available(engine, sku, location, WEB) == 10 - expected


def test_raised_safety_by_percent_of_on_hand_rounds_up_and_adds_to_units(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 7), (A, L2, 40))
    durable(engine, SetSafetyStock(ACTOR, key("chg-"), (SafetyLevel(A, L2, 2),)))

    set_control(engine, raise_safety(clock, sku=A, units=1, percent=10))

    # 10% of 7 is 0.7, kept back as a whole unit; L2 keeps its own 2 on top.
    assert [safety_at(engine, A, L1), safety_at(engine, A, L2)] == [2, 7]
    result = reserve_for(engine, WEB, one(A, 6))
    assert result.outcome is ReserveOutcome.REJECTED
    assert result.lines[0].quantity_available == 5


def test_full_percent_raise_leaves_nothing_to_sell(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 13))
    set_control(engine, raise_safety(clock, location=L1, percent=100))

    assert safety_at(engine, A, L1) == 13
    assert available(engine, A, L1, WEB) == 0


# Time boxes and lifting ----------------------------------------------------------------


@pytest.mark.parametrize("kind", list(ControlKind), ids=lambda k: k.value)
def test_control_is_in_force_until_the_clock_reaches_its_until(
    engine: Engine, clock: FakeClock, kind: ControlKind
) -> None:
    stock(engine, (A, L1, 100))
    command = control(clock, kind, channel=WEB, sku=A, units=5, percent=1, rate_per_s=1)
    control_id = set_control(engine, command)

    def constrained() -> bool:
        if kind is ControlKind.SUPPRESS:
            return available(engine, A, L1, WEB) == 0
        if kind is ControlKind.THROTTLE:
            return engine.policies.throttle_of(WEB, clock.now_us()) is not None
        return safety_at(engine, A, L1) == 6

    clock.advance(HOUR_S - 1)
    assert constrained()
    assert active_ids(engine, clock) == [control_id]

    clock.advance(1)
    assert clock.now_us() == command.until_us
    assert not constrained()
    assert active_ids(engine, clock) == []
    assert available(engine, A, L1, WEB) == 100


def test_throttle_ends_with_its_time_box(engine: Engine, clock: FakeClock) -> None:
    stock(engine, (A, L1, 100))
    set_control(engine, throttle(clock, WEB, 1, lasting_s=60))
    reserve_for(engine, WEB, one(A))
    assert refusal(engine, Reserve(key(), WEB, (one(A),))).reason == (
        "CHANNEL_THROTTLED"
    )

    clock.advance(60)
    burst = [reserve_for(engine, WEB, one(A)) for _ in range(5)]

    assert all(r.outcome is ReserveOutcome.RESERVED for r in burst)


def test_lifted_control_stops_at_once_and_cannot_be_lifted_again(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 10))
    control_id = set_control(engine, suppress(clock, WEB, A))
    assert available(engine, A, L1, WEB) == 0

    lift(engine, control_id)
    again = refusal(engine, LiftControl(ACTOR, key("lift-"), control_id))

    assert available(engine, A, L1, WEB) == 10
    assert reserve_for(engine, WEB, one(A)).outcome is ReserveOutcome.RESERVED
    assert (again.kind, again.reason, again.field) == (
        ErrorKind.NOT_FOUND,
        "CONTROL_NOT_FOUND",
        "control_id",
    )


def test_control_that_ended_on_its_own_cannot_be_lifted(
    engine: Engine, clock: FakeClock
) -> None:
    control_id = set_control(engine, suppress(clock, WEB, lasting_s=60))
    clock.advance(60)

    error = refusal(engine, LiftControl(ACTOR, key("lift-"), control_id))

    assert (error.kind, error.reason) == (ErrorKind.NOT_FOUND, "CONTROL_NOT_FOUND")


def test_time_box_may_last_exactly_the_longest_allowed(
    engine: Engine, clock: FakeClock
) -> None:
    longest_s = LIMITS.control_duration_max_s
    control_id = set_control(engine, suppress(clock, WEB, lasting_s=longest_s))

    clock.advance(longest_s - 1)
    assert active_ids(engine, clock) == [control_id]
    clock.advance(1)
    assert active_ids(engine, clock) == []


def test_same_kind_and_target_overlaps_only_while_in_force(
    engine: Engine, clock: FakeClock
) -> None:
    first = set_control(engine, suppress(clock, WEB, A))
    # Another sku, another channel, another kind: not the same target.
    set_control(engine, suppress(clock, WEB, B))
    set_control(engine, suppress(clock, MARKET, A))
    set_control(engine, raise_safety(clock, sku=A, units=1))

    error = refusal(engine, suppress(clock, WEB, A))
    assert (error.kind, error.reason, error.field) == (
        ErrorKind.FAILED_PRECONDITION,
        "CONTROL_OVERLAPS",
        "control",
    )
    assert len(active_ids(engine, clock)) == 4

    lift(engine, first)
    replacement = set_control(engine, suppress(clock, WEB, A))
    assert replacement in active_ids(engine, clock)


def test_two_throttles_of_one_channel_overlap_whatever_their_rate(
    engine: Engine, clock: FakeClock
) -> None:
    set_control(engine, throttle(clock, WEB, 5))

    error = refusal(engine, throttle(clock, WEB, 50, sku=A))

    assert error.reason == "CONTROL_OVERLAPS"
    throttled = engine.policies.throttle_of(WEB, clock.now_us())
    assert throttled is not None
    assert throttled.rate_per_s == 5


# Caller mistakes -----------------------------------------------------------------------

# Each case builds its command from the test's clock, as time boxes start from now.
Build = Callable[[FakeClock], Command]
Refused = tuple[ErrorKind, str, str]
INVALID = ErrorKind.INVALID_ARGUMENT
TOO_LONG_S = LIMITS.control_duration_max_s + 1


def bad(build: Build, reason: str, field: str, kind: ErrorKind = INVALID) -> Any:
    return pytest.param(build, (kind, reason, field), id=f"{reason}-{field}")


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        bad(lambda c: control(c, None), "FIELD_REQUIRED", "control.kind"),
        bad(
            lambda c: suppress(c, WEB, reason="  "), "FIELD_REQUIRED", "control.reason"
        ),
        bad(
            lambda c: suppress(c, WEB, reason="line\nbreak"),
            "FIELD_MALFORMED",
            "control.reason",
        ),
        bad(lambda c: suppress(c, ""), "FIELD_REQUIRED", "control.channel"),
        bad(lambda c: throttle(c, "", 5), "FIELD_REQUIRED", "control.channel"),
        bad(
            lambda c: throttle(c, WEB, 0),
            "RATE_OUT_OF_RANGE",
            "control.reservations_per_second",
        ),
        bad(
            lambda c: throttle(c, WEB, LIMITS.throttle_rate_max_per_s + 1),
            "RATE_OUT_OF_RANGE",
            "control.reservations_per_second",
        ),
        bad(
            lambda c: raise_safety(c, percent=101),
            "PERCENT_OUT_OF_RANGE",
            "control.safety_percent",
        ),
        bad(
            lambda c: raise_safety(c, percent=-5),
            "PERCENT_OUT_OF_RANGE",
            "control.safety_percent",
        ),
        bad(
            lambda c: raise_safety(c, units=-1),
            "UNITS_OUT_OF_RANGE",
            "control.safety_units",
        ),
        bad(
            lambda c: raise_safety(c, sku=A),
            "FIELD_REQUIRED",
            "control.safety_units",
        ),
        bad(
            lambda c: suppress(c, WEB, lasting_s=-1),
            "TIME_BOX_IN_PAST",
            "control.until",
        ),
        bad(
            lambda c: suppress(c, WEB, lasting_s=0),
            "TIME_BOX_IN_PAST",
            "control.until",
        ),
        bad(
            lambda c: suppress(c, WEB, lasting_s=TOO_LONG_S),
            "TIME_BOX_TOO_LONG",
            "control.until",
        ),
        bad(
            lambda c: LiftControl(ACTOR, "lift-x", ""),
            "FIELD_REQUIRED",
            "control_id",
        ),
        bad(
            lambda c: LiftControl(ACTOR, "lift-x", "ops:never-set"),
            "CONTROL_NOT_FOUND",
            "control_id",
            ErrorKind.NOT_FOUND,
        ),
    ],
)
def test_bad_control_input_is_refused_naming_the_field_and_changes_nothing(
    engine: Engine, clock: FakeClock, build: Build, expected: Refused
) -> None:
    stock(engine, (A, L1, 10))
    set_control(engine, raise_safety(clock, sku=A, units=2))
    before = json.dumps(engine.checkpoint_rows()[3])
    seq_before = engine.shards[0].next_seq

    error = refusal(engine, build(clock))

    assert (error.kind, error.reason, error.field) == expected
    assert json.dumps(engine.checkpoint_rows()[3]) == before
    assert engine.shards[0].next_seq == seq_before
    assert engine.stats().remembered_requests == 2
    assert available(engine, A, L1, WEB) == 8


# Idempotency, records, checkpoints -------------------------------------------------------


def test_control_retry_is_replayed_and_sets_no_second_control(
    engine: Engine, clock: FakeClock
) -> None:
    command = suppress(clock, WEB, A, change_id="ctl-1")
    control_id = set_control(engine, command)
    clock.advance(10)

    again = engine.decide(command)

    assert isinstance(again, Replay)
    assert again.result == PolicyResult(control_id="ops:ctl-1", replayed=True)
    assert control_id == "ops:ctl-1"
    assert active_ids(engine, clock) == ["ops:ctl-1"]
    assert engine.policies.controls[control_id].attribution.at_us == (
        clock.now_us() - 10 * US_PER_S
    )


def test_retry_of_a_lifted_control_does_not_bring_it_back(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 10))
    command = suppress(clock, WEB, A)
    control_id = set_control(engine, command)
    lifting = LiftControl(ACTOR, "lift-1", control_id)
    durable(engine, lifting)

    again = engine.decide(command)
    lifted_again = engine.decide(lifting)

    assert isinstance(again, Replay)
    assert isinstance(lifted_again, Replay)
    assert active_ids(engine, clock) == []
    assert available(engine, A, L1, WEB) == 10


def test_control_change_id_reused_for_another_control_is_refused(
    engine: Engine, clock: FakeClock
) -> None:
    set_control(engine, suppress(clock, WEB, A, change_id="ctl-1"))

    other = refusal(engine, suppress(clock, WEB, B, change_id="ctl-1"))
    longer = refusal(engine, suppress(clock, WEB, A, change_id="ctl-1", lasting_s=7))

    for error in (other, longer):
        assert (error.kind, error.reason, error.field) == (
            ErrorKind.INVALID_ARGUMENT,
            "REQUEST_ID_REUSED",
            "change_id",
        )
    assert active_ids(engine, clock) == ["ops:ctl-1"]


def test_same_change_id_from_another_actor_is_another_control(
    engine: Engine, clock: FakeClock
) -> None:
    set_control(engine, suppress(clock, WEB, A, change_id="ctl-1"))

    set_control(engine, suppress(clock, MARKET, A, change_id="ctl-1", actor="sre"))

    assert active_ids(engine, clock) == ["ops:ctl-1", "sre:ctl-1"]


def test_change_id_reused_after_retention_does_not_replace_a_control_in_force(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 10))
    set_control(engine, suppress(clock, WEB, A, change_id="ctl-1", lasting_s=DAY_S))
    clock.advance(RETENTION_S + 1)
    # The request log forgets the answer; the control, still in force, stays.
    engine.prune()
    assert engine.stats().remembered_requests == 0
    assert active_ids(engine, clock) == ["ops:ctl-1"]

    # Its id is "<actor>:<change_id>": a second control under the same change id
    # would have to share that id with the one in force, so it must be refused.
    refused = None
    try:
        durable(engine, suppress(clock, MARKET, B, change_id="ctl-1"))
    except EngineError as error:
        refused = error

    (in_force,) = engine.policies.active_controls(clock.now_us())
    assert (in_force.channel, in_force.sku) == (WEB, A), "replaced while in force"
    assert engine.policies.is_suppressed(WEB, A, clock.now_us())
    assert refused is not None
    assert refused.kind in {ErrorKind.INVALID_ARGUMENT, ErrorKind.FAILED_PRECONDITION}


def control_history(engine: Engine, clock: FakeClock) -> list[Decision]:
    """One control of every kind, one lifted and one ended, a second apart."""
    stock(engine, (A, L1, 10))
    # Built one at a time, as each time box starts from the clock's now.
    builders: list[Callable[[], Command]] = [
        lambda: suppress(clock, WEB, A, change_id="c1"),
        lambda: throttle(clock, MARKET, 7, change_id="c2", reason="partner outage"),
        lambda: raise_safety(clock, location=L1, units=2, percent=15, change_id="c3"),
        lambda: suppress(clock, MARKET, change_id="c4", lasting_s=2),
        lambda: LiftControl(ACTOR, "c5", "ops:c1"),
    ]
    decisions = []
    for build in builders:
        clock.advance(1)
        decision = decided(engine, build())
        engine.mark_durable(decision)
        decisions.append(decision)
    clock.advance(2)
    return decisions


def test_control_records_replay_into_the_same_controls(
    engine: Engine, clock: FakeClock
) -> None:
    decisions = control_history(engine, clock)
    recovered = new_engine(clock)

    for decision in decisions:
        assert decision.record is not None
        assert (decision.record.shard, decision.record.kind) == (0, "policy")
        body = json.loads(json.dumps(decision.record.body))
        recovered.replay_record(decision.record.shard, decision.record.seq, body)

    assert recovered.policies.controls == engine.policies.controls
    assert active_ids(recovered, clock) == ["ops:c2", "ops:c3"]
    # 2 units and 15% of 10 on hand, rounded up.
    position = engine.positions_of(A)[L1]
    assert recovered.policies.safety(position, clock.now_us()) == 2 + 2


def test_checkpointed_controls_restore_with_time_box_and_attribution(
    engine: Engine, clock: FakeClock
) -> None:
    control_history(engine, clock)
    _, _, _, policies = engine.checkpoint_rows()
    recovered = new_engine(clock)

    recovered.restore_policies(json.loads(json.dumps(policies)))

    assert recovered.policies.controls == engine.policies.controls
    throttled = recovered.policies.throttle_of(MARKET, clock.now_us())
    assert throttled is not None
    assert (throttled.rate_per_s, throttled.reason) == (7, "partner outage")
    assert throttled.attribution.change_id == "c2"
    clock.advance(HOUR_S)
    assert active_ids(recovered, clock) == []
