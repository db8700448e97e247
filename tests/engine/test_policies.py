"""Focused tests of available-to-sell policies in the engine: safety stock, channel
buffers, location groups and channel sourcing; their refusals, idempotency, records and
checkpoints.

Each test builds its state on a fresh engine with three shards and a fake clock (see
conftest.py) and marks every decision durable.
"""

import json
from typing import Any

import pytest

from server.clock import FakeClock
from server.engine.commands import (
    BufferLevel,
    Command,
    OnHandCount,
    PolicyResult,
    Reserve,
    ReserveLine,
    ReserveOutcome,
    ReserveResult,
    SafetyLevel,
    SetChannelBuffer,
    SetChannelSourcing,
    SetLocationGroup,
    SetOnHand,
    SetSafetyStock,
    ShortReason,
    StockResult,
)
from server.engine.engine import Decision, Engine, Replay
from server.engine.errors import ErrorKind
from server.engine.policy import Attribution
from tests.engine.support import (
    L1,
    L2,
    L3,
    LIMITS,
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


def safety(*levels: tuple[str, str, int], change_id: str = "") -> SetSafetyStock:
    """Levels as (sku, location, units); sku "" is the location's default."""
    return SetSafetyStock(
        ACTOR, change_id or key("chg-"), tuple(SafetyLevel(*x) for x in levels)
    )


def buffers(*levels: tuple[str, str, int], change_id: str = "") -> SetChannelBuffer:
    """Buffers as (channel, sku, units); sku "" is the channel's default."""
    return SetChannelBuffer(
        ACTOR, change_id or key("chg-"), tuple(BufferLevel(*x) for x in levels)
    )


def group(name: str, *locations: str, change_id: str = "") -> SetLocationGroup:
    return SetLocationGroup(ACTOR, change_id or key("chg-"), name, locations)


def sourcing(
    channel: str, group_name: str, *, allow_split: bool = False, change_id: str = ""
) -> SetChannelSourcing:
    return SetChannelSourcing(
        ACTOR, change_id or key("chg-"), channel, group_name, allow_split
    )


def apply(engine: Engine, command: Command) -> None:
    result = durable(engine, command)
    assert result == PolicyResult(replayed=False)


def reserve_for(
    engine: Engine, channel: str, *lines: ReserveLine, allow_partial: bool = False
) -> ReserveResult:
    command = Reserve(
        request_id=key(), channel=channel, lines=lines, allow_partial=allow_partial
    )
    result = durable(engine, command)
    assert isinstance(result, ReserveResult)
    return result


def available(engine: Engine, sku: str, location: str, channel: str = "") -> int:
    """Available to sell at one position, as `channel` sees it."""
    ((_, _, _, units),) = engine.availability(sku, [location], channel)
    return units


# Safety stock ----------------------------------------------------------------------------


def test_safety_stock_is_kept_back_from_every_channel(engine: Engine) -> None:
    stock(engine, (A, L1, 10))
    apply(engine, safety((A, L1, 3)))

    short = reserve_for(engine, WEB, ReserveLine(A, 8, location=L1))
    fits = reserve_for(engine, MARKET, ReserveLine(A, 7, location=L1))

    assert short.outcome is ReserveOutcome.REJECTED
    assert short.lines[0].short_reason is ShortReason.INSUFFICIENT_STOCK
    assert short.lines[0].quantity_available == 7
    assert fits.outcome is ReserveOutcome.RESERVED
    assert [available(engine, A, L1, c) for c in ("", WEB, MARKET)] == [0, 0, 0]
    assert engine.positions_of(A)[L1].held == 7


def test_sku_level_overrides_the_location_default_and_zero_falls_back_to_it(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 10), (B, L1, 10), (A, L2, 10))

    apply(engine, safety(("", L1, 4), (A, L1, 1)))
    assert [available(engine, A, L1), available(engine, B, L1)] == [9, 6]
    assert available(engine, A, L2) == 10

    apply(engine, safety((A, L1, 0)))
    assert available(engine, A, L1) == 6
    assert (A, L1) not in engine.policies.safety_stock


def test_safety_stock_above_free_stock_leaves_nothing_rather_than_a_negative(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 3))
    apply(engine, safety((A, L1, 5)))

    result = reserve_for(engine, WEB, ReserveLine(A, 1, location=L1))

    assert available(engine, A, L1) == 0
    assert result.outcome is ReserveOutcome.REJECTED
    assert result.lines[0].quantity_available == 0


def test_stock_answer_shows_available_to_sell_net_of_safety_stock(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 10))
    apply(engine, safety((A, L1, 4)))

    result = durable(engine, SetOnHand("erp", key("count-"), (OnHandCount(A, L1, 6),)))

    assert isinstance(result, StockResult)
    assert result.positions[0].available_to_sell == 2


# Channel buffers -------------------------------------------------------------------------


def test_channel_buffer_applies_to_its_channel_only_with_a_sku_override(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 10), (B, L1, 10))

    apply(engine, buffers((MARKET, "", 4), (MARKET, A, 1)))

    assert [available(engine, A, L1, MARKET), available(engine, B, L1, MARKET)] == [
        9,
        6,
    ]
    assert [available(engine, A, L1, WEB), available(engine, B, L1, WEB)] == [10, 10]
    assert available(engine, B, L1) == 10


def test_buffered_channel_cannot_hold_into_its_buffer(engine: Engine) -> None:
    stock(engine, (A, L1, 10))
    apply(engine, buffers((MARKET, A, 3)))

    short = reserve_for(engine, MARKET, ReserveLine(A, 8, location=L1))
    fits = reserve_for(engine, WEB, ReserveLine(A, 8, location=L1))

    assert short.outcome is ReserveOutcome.REJECTED
    assert short.lines[0].quantity_available == 7
    assert fits.outcome is ReserveOutcome.RESERVED
    assert [available(engine, A, L1, WEB), available(engine, A, L1, MARKET)] == [2, 0]


def test_availability_reports_safety_stock_buffer_and_what_is_left_per_channel(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 10), (A, L2, 1))
    apply(engine, safety((A, L1, 2)))
    apply(engine, buffers((MARKET, "", 3)))

    market = [
        (p.location, s, b, u) for p, s, b, u in engine.availability(A, [], MARKET)
    ]
    plain = [(p.location, s, b, u) for p, s, b, u in engine.availability(A, [], "")]

    assert market == [(L1, 2, 3, 5), (L2, 0, 3, 0)]
    assert plain == [(L1, 2, 0, 8), (L2, 0, 0, 1)]


# Location groups and sourcing ---------------------------------------------------------


def test_line_without_location_draws_from_the_channel_group_in_order(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 5), (A, L2, 5), (A, L3, 1))
    apply(engine, group("ship", L3, L1, L2))
    apply(engine, sourcing(WEB, "ship"))

    two = reserve_for(engine, WEB, ReserveLine(A, 2))
    one = reserve_for(engine, WEB, ReserveLine(A, 1))
    too_many = reserve_for(engine, WEB, ReserveLine(A, 6))

    assert two.lines[0].held_at == ((L1, 2),)
    assert one.lines[0].held_at == ((L3, 1),)
    assert too_many.outcome is ReserveOutcome.REJECTED
    assert too_many.lines[0].quantity_available == 5


def test_channel_sourcing_with_split_splits_a_line_across_the_group(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 5), (A, L2, 5), (A, L3, 1))
    apply(engine, group("ship", L3, L1, L2))
    apply(engine, sourcing(WEB, "ship", allow_split=True))

    result = reserve_for(engine, WEB, ReserveLine(A, 8))

    assert result.lines[0].held_at == ((L3, 1), (L1, 5), (L2, 2))


def test_line_with_a_location_ignores_the_channel_group(engine: Engine) -> None:
    stock(engine, (A, L1, 50), (A, L2, 1))
    apply(engine, group("ship", L1, L2))
    apply(engine, sourcing(WEB, "ship", allow_split=True))

    result = reserve_for(engine, WEB, ReserveLine(A, 2, location=L2))

    assert result.outcome is ReserveOutcome.REJECTED
    assert result.lines[0].quantity_available == 1
    assert engine.positions_of(A)[L1].held == 0


def test_sourced_line_respects_the_channel_buffer_at_every_group_location(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 4), (A, L2, 4))
    apply(engine, group("ship", L1, L2))
    apply(engine, sourcing(MARKET, "ship", allow_split=True))
    apply(engine, buffers((MARKET, "", 3)))

    result = reserve_for(engine, MARKET, ReserveLine(A, 3))

    assert result.outcome is ReserveOutcome.REJECTED
    assert result.lines[0].quantity_available == 2


def test_line_without_location_needs_channel_sourcing_and_is_not_remembered(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 5))
    command = Reserve(
        request_id=key(),
        channel=WEB,
        lines=(ReserveLine(A, 1, location=L1), ReserveLine(A, 1)),
    )

    error = refusal(engine, command)
    assert (error.kind, error.reason, error.field) == (
        ErrorKind.FAILED_PRECONDITION,
        "CHANNEL_HAS_NO_SOURCING",
        "lines[1].location",
    )
    assert engine.positions_of(A)[L1].held == 0

    apply(engine, group("ship", L1))
    apply(engine, sourcing(WEB, "ship"))
    result = durable(engine, command)
    assert isinstance(result, ReserveResult)
    assert [line.held_at for line in result.lines] == [((L1, 1),), ((L1, 1),)]


def test_sourcing_from_an_unknown_group_is_refused_and_changes_nothing(
    engine: Engine,
) -> None:
    command = sourcing(WEB, "ship", change_id="chg-src")

    error = refusal(engine, command)

    assert (error.kind, error.reason) == (
        ErrorKind.FAILED_PRECONDITION,
        "GROUP_UNKNOWN",
    )
    assert engine.policies.sourcing == {}
    # A refusal is not an answer: once the group exists the same change is decided.
    apply(engine, group("ship", L1))
    assert isinstance(engine.decide(command), Decision)


def test_group_in_use_cannot_be_removed_until_no_channel_sources_from_it(
    engine: Engine,
) -> None:
    apply(engine, group("ship", L1, L2))
    apply(engine, sourcing(WEB, "ship"))

    error = refusal(engine, group("ship"))
    assert (error.kind, error.reason) == (ErrorKind.FAILED_PRECONDITION, "GROUP_IN_USE")
    assert engine.policies.groups["ship"][0] == (L1, L2)

    apply(engine, sourcing(WEB, ""))
    apply(engine, group("ship"))
    assert engine.policies.groups == {}
    assert engine.policies.sourcing == {}


def test_redefining_a_group_changes_where_its_channels_draw_from(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 5), (A, L2, 5))
    apply(engine, group("ship", L1, L2))
    apply(engine, sourcing(WEB, "ship"))

    apply(engine, group("ship", L2, L1))
    result = reserve_for(engine, WEB, ReserveLine(A, 1))

    assert result.lines[0].held_at == ((L2, 1),)


# Idempotency, records, checkpoints -------------------------------------------------------


def test_policy_retry_is_replayed_without_applying_again(engine: Engine) -> None:
    first = buffers((MARKET, "", 5), change_id="chg-1")
    apply(engine, first)
    apply(engine, buffers((MARKET, "", 2), change_id="chg-2"))

    again = engine.decide(first)

    assert isinstance(again, Replay)
    assert again.result == PolicyResult(replayed=True)
    units, attribution = engine.policies.buffers[(MARKET, "")]
    assert (units, attribution.change_id) == (2, "chg-2")


def test_policy_change_id_reused_for_different_content_is_refused(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 10))
    apply(engine, safety((A, L1, 2), change_id="chg-1"))

    error = refusal(engine, safety((A, L1, 3), change_id="chg-1"))
    other_kind = refusal(engine, buffers((WEB, "", 3), change_id="chg-1"))

    assert available(engine, A, L1) == 8
    assert (other_kind.kind, other_kind.reason) == (
        ErrorKind.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
    )
    # The policy requests have no request_id: the key they reused is change_id.
    assert (error.kind, error.reason, error.field) == (
        ErrorKind.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
        "change_id",
    )


def test_same_change_id_from_another_actor_is_another_change(engine: Engine) -> None:
    apply(engine, safety((A, L1, 2), change_id="chg-1"))

    other = SetSafetyStock("planner", "chg-1", (SafetyLevel(A, L1, 3),))
    apply(engine, other)

    units, attribution = engine.policies.safety_stock[(A, L1)]
    assert (units, attribution.actor) == (3, "planner")


def test_policy_change_is_recorded_on_shard_zero_with_its_attribution(
    engine: Engine, clock: FakeClock
) -> None:
    clock.advance(42)
    decision = decided(engine, sourcing(WEB, "", change_id="chg-9"))

    assert decision.record is not None
    assert (decision.record.shard, decision.record.kind) == (0, "policy")
    body = decision.record.body
    assert (body["actor"], body["change_id"], body["at_us"]) == (
        ACTOR,
        "chg-9",
        clock.now_us(),
    )
    assert decision.request is not None
    assert (decision.request.scope, decision.request.request_id) == ("pol:ops", "chg-9")


def test_refused_policy_change_is_not_recorded(engine: Engine) -> None:
    seq_before = engine.shards[0].next_seq

    refusal(engine, sourcing(WEB, "ship"))

    assert engine.shards[0].next_seq == seq_before
    assert engine.stats().remembered_requests == 0


def policy_history(engine: Engine, clock: FakeClock) -> list[Decision]:
    """One change of every kind, some removals among them, a second apart."""
    commands: list[Command] = [
        safety(("", L1, 4), (A, L1, 1)),
        buffers((MARKET, "", 3), (MARKET, A, 1)),
        group("ship", L2, L1),
        group("stores", L3),
        sourcing(WEB, "ship", allow_split=True),
        safety((A, L1, 0)),
        buffers((MARKET, A, 0)),
        group("stores"),
    ]
    decisions = []
    for command in commands:
        clock.advance(1)
        decision = decided(engine, command)
        engine.mark_durable(decision)
        decisions.append(decision)
    return decisions


def test_policy_records_replay_into_the_same_policies(
    engine: Engine, clock: FakeClock
) -> None:
    decisions = policy_history(engine, clock)
    recovered = new_engine(clock)

    for decision in decisions:
        assert decision.record is not None
        body = json.loads(json.dumps(decision.record.body))
        recovered.replay_record(decision.record.shard, decision.record.seq, body)
    recovered.finish_recovery()

    assert recovered.policies == engine.policies


def test_checkpointed_policies_restore_with_their_attribution(
    engine: Engine, clock: FakeClock
) -> None:
    decisions = policy_history(engine, clock)
    _, _, _, policies = engine.checkpoint_rows()
    recovered = new_engine(clock)

    recovered.restore_policies(json.loads(json.dumps(policies)))

    assert recovered.policies == engine.policies
    sourced = decisions[4]
    assert sourced.request is not None
    assert recovered.policies.sourcing[WEB][1] == Attribution(
        ACTOR, sourced.request.request_id, sourced.request.created_us
    )


# Caller mistakes -----------------------------------------------------------------------

TOO_MANY_UNITS = LIMITS.on_hand_max + 1


def bad(reason: str, field: str, command: Command) -> Any:
    return pytest.param(command, reason, field, id=f"{reason}-{field}")


@pytest.mark.parametrize(
    ("command", "reason", "field"),
    [
        bad(
            "FIELD_REQUIRED", "actor", SetSafetyStock("", "c", (SafetyLevel(A, L1, 1),))
        ),
        bad("FIELD_REQUIRED", "change_id", SetChannelBuffer(ACTOR, "", ())),
        bad("FIELD_REQUIRED", "levels", SetSafetyStock(ACTOR, "c", ())),
        bad("UNITS_OUT_OF_RANGE", "levels[0].quantity", safety((A, L1, -1))),
        bad(
            "UNITS_OUT_OF_RANGE",
            "levels[1].quantity",
            safety((A, L1, 1), (A, L2, TOO_MANY_UNITS)),
        ),
        bad("DUPLICATE_POSITION", "levels[1]", safety((A, L1, 1), (A, L1, 2))),
        bad("FIELD_REQUIRED", "levels[0].location", safety((A, "", 1))),
        bad("FIELD_REQUIRED", "buffers", SetChannelBuffer(ACTOR, "c", ())),
        bad("FIELD_REQUIRED", "buffers[0].channel", buffers(("", A, 1))),
        bad("UNITS_OUT_OF_RANGE", "buffers[0].quantity", buffers((WEB, A, -2))),
        bad("DUPLICATE_BUFFER", "buffers[1]", buffers((WEB, "", 1), (WEB, "", 1))),
    ],
)
def test_bad_policy_input_is_refused_naming_the_field_and_changes_nothing(
    engine: Engine, command: Command, reason: str, field: str
) -> None:
    apply(engine, safety((A, L1, 1)))
    before = json.dumps(engine.checkpoint_rows()[3])

    error = refusal(engine, command)

    assert (error.kind, error.reason, error.field) == (
        ErrorKind.INVALID_ARGUMENT,
        reason,
        field,
    )
    assert json.dumps(engine.checkpoint_rows()[3]) == before
