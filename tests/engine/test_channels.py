"""The channel registry: open while empty, closed to unknown channels once it names
any, and never left without a channel that a policy in force names."""

import json

import pytest

from server.clock import FakeClock
from server.engine.commands import (
    AllocationLevel,
    BufferLevel,
    ChannelEntry,
    Command,
    Release,
    Reserve,
    ReserveLine,
    ReserveOutcome,
    ReserveResult,
    SetChannelAllocation,
    SetChannelBuffer,
    SetChannelPreorders,
    SetChannels,
    SetChannelSourcing,
    SetControl,
    SetLocationGroup,
)
from server.engine.engine import Engine, Replay
from server.engine.errors import ErrorKind
from server.engine.policy import ControlKind
from tests.engine.support import (
    L1,
    US_PER_S,
    A,
    decided,
    durable,
    key,
    new_engine,
    refusal,
    stock,
)

ACTOR = "ops"
WEB, MARKET, TYPO = "web", "marketplace", "Web"


def channels(*entries: tuple[str, bool], change_id: str = "") -> SetChannels:
    return SetChannels(
        ACTOR,
        change_id or key("chan-"),
        tuple(ChannelEntry(channel, registered) for channel, registered in entries),
    )


def register(engine: Engine, *names: str) -> None:
    durable(engine, channels(*((name, True) for name in names)))


def reserve_as(engine: Engine, channel: str, quantity: int = 1) -> ReserveResult:
    command = Reserve(key(), channel, (ReserveLine(A, quantity, location=L1),))
    result = durable(engine, command)
    assert isinstance(result, ReserveResult)
    return result


@pytest.fixture
def stocked(engine: Engine) -> Engine:
    stock(engine, (A, L1, 20))
    return engine


def test_empty_registry_accepts_every_channel(stocked: Engine) -> None:
    result = reserve_as(stocked, TYPO)

    assert result.outcome is ReserveOutcome.RESERVED
    assert stocked.policies.channels == {}


def test_registered_registry_refuses_reserves_from_other_channels(
    stocked: Engine,
) -> None:
    register(stocked, WEB, MARKET)
    held_before = stocked.positions_of(A)[L1].held
    remembered_before = stocked.stats().remembered_requests

    error = refusal(stocked, Reserve(key(), TYPO, (ReserveLine(A, 1, location=L1),)))

    assert (error.kind, error.reason, error.field) == (
        ErrorKind.FAILED_PRECONDITION,
        "CHANNEL_UNKNOWN",
        "channel",
    )
    assert stocked.positions_of(A)[L1].held == held_before
    assert stocked.stats().remembered_requests == remembered_before
    assert reserve_as(stocked, WEB).outcome is ReserveOutcome.RESERVED


def policies_naming(channel: str, now_us: int = 0) -> list[tuple[Command, str]]:
    until_us = now_us + 3600 * US_PER_S
    return [
        (
            SetChannelBuffer(ACTOR, key(), (BufferLevel(channel, "", 2),)),
            "buffers[0].channel",
        ),
        (
            SetChannelAllocation(
                ACTOR, key(), (AllocationLevel(A, channel, 5, exclusive=True),)
            ),
            "allocations[0].channel",
        ),
        (SetChannelSourcing(ACTOR, key(), channel, "ship", False), "sourcing.channel"),
        (SetChannelPreorders(ACTOR, key(), channel, True), "channel"),
        (
            SetControl(
                ACTOR,
                key(),
                ControlKind.SUPPRESS,
                channel=channel,
                sku="",
                location="",
                units=0,
                percent=0,
                rate_per_s=0,
                until_us=until_us,
                reason="incident",
            ),
            "control.channel",
        ),
    ]


@pytest.mark.parametrize("index", range(len(policies_naming(""))))
def test_policy_naming_an_unregistered_channel_is_refused_and_not_applied(
    stocked: Engine, clock: FakeClock, index: int
) -> None:
    durable(stocked, SetLocationGroup(ACTOR, key(), "ship", (L1,)))
    register(stocked, WEB)
    policies_before = stocked.policies.to_json()
    command, field = policies_naming(MARKET, clock.now_us())[index]

    error = refusal(stocked, command)

    assert (error.kind, error.reason, error.field) == (
        ErrorKind.FAILED_PRECONDITION,
        "CHANNEL_UNKNOWN",
        field,
    )
    assert stocked.policies.to_json() == policies_before


@pytest.mark.parametrize("index", range(len(policies_naming(""))))
def test_channel_a_policy_names_cannot_leave_the_registry(
    stocked: Engine, clock: FakeClock, index: int
) -> None:
    durable(stocked, SetLocationGroup(ACTOR, key(), "ship", (L1,)))
    register(stocked, WEB, MARKET)
    command, _ = policies_naming(MARKET, clock.now_us())[index]
    durable(stocked, command)

    error = refusal(stocked, channels((MARKET, False)))

    assert (error.kind, error.reason) == (
        ErrorKind.FAILED_PRECONDITION,
        "CHANNEL_IN_USE",
    )
    assert set(stocked.policies.channels) == {WEB, MARKET}


def test_first_registration_must_include_channels_policies_already_name(
    stocked: Engine,
) -> None:
    command, _ = policies_naming(MARKET)[0]
    durable(stocked, command)

    error = refusal(stocked, channels((WEB, True)))
    register(stocked, WEB, MARKET)

    assert error.reason == "CHANNEL_IN_USE"
    assert "marketplace" in error.message
    assert set(stocked.policies.channels) == {WEB, MARKET}


def test_channel_leaves_once_its_policies_are_removed(stocked: Engine) -> None:
    register(stocked, WEB, MARKET)
    durable(stocked, SetChannelBuffer(ACTOR, key(), (BufferLevel(MARKET, "", 2),)))
    durable(stocked, SetChannelBuffer(ACTOR, key(), (BufferLevel(MARKET, "", 0),)))

    durable(stocked, channels((MARKET, False)))

    assert set(stocked.policies.channels) == {WEB}
    assert refusal(stocked, Reserve(key(), MARKET, (ReserveLine(A, 1, location=L1),)))


def test_expired_control_does_not_keep_its_channel_registered(
    stocked: Engine, clock: FakeClock
) -> None:
    register(stocked, WEB, MARKET)
    command, _ = policies_naming(MARKET, clock.now_us())[4]
    durable(stocked, command)

    clock.advance(3601)
    durable(stocked, channels((MARKET, False)))

    assert set(stocked.policies.channels) == {WEB}


def test_reservations_of_an_unregistered_channel_can_still_be_released(
    stocked: Engine,
) -> None:
    register(stocked, WEB, MARKET)
    held = reserve_as(stocked, MARKET, 3)
    durable(stocked, channels((MARKET, False)))

    durable(stocked, Release(key(), held.reservation_id, ()))

    assert stocked.positions_of(A)[L1].held == 0


def test_replayed_registration_is_answered_without_applying_again(
    stocked: Engine,
) -> None:
    first = channels((WEB, True), change_id="c-1")
    durable(stocked, first)
    durable(stocked, channels((MARKET, True)))

    again = stocked.decide(first)

    assert isinstance(again, Replay)
    assert set(stocked.policies.channels) == {WEB, MARKET}


def test_duplicate_channel_in_one_request_is_a_caller_mistake(
    stocked: Engine,
) -> None:
    error = refusal(stocked, channels((WEB, True), (WEB, False)))

    assert (error.kind, error.reason, error.field) == (
        ErrorKind.INVALID_ARGUMENT,
        "DUPLICATE_CHANNEL",
        "channels[1].channel",
    )
    assert stocked.policies.channels == {}


def test_registry_recovers_from_records_and_from_a_checkpoint(
    stocked: Engine, clock: FakeClock
) -> None:
    decisions = [decided(stocked, channels((WEB, True), (MARKET, True)))]
    decisions.append(decided(stocked, channels((MARKET, False), (TYPO, True))))
    for decision in decisions:
        stocked.mark_durable(decision)
    from_records = new_engine(clock)
    from_checkpoint = new_engine(clock)

    for decision in decisions:
        assert decision.record is not None
        body = json.loads(json.dumps(decision.record.body))
        from_records.replay_record(0, decision.record.seq, body)
    _, _, _, policies = stocked.checkpoint_rows()
    from_checkpoint.restore_policies(json.loads(json.dumps(policies)))

    assert set(stocked.policies.channels) == {WEB, TYPO}
    assert from_records.policies.channels == stocked.policies.channels
    assert from_checkpoint.policies.channels == stocked.policies.channels
