"""Helpers shared by the engine's focused tests: an engine on a fake clock, and short
ways to stock it, decide commands and read positions back."""

import itertools

import pytest

from server.clock import FakeClock
from server.engine.commands import (
    Command,
    OnHandCount,
    ReservationResult,
    Reserve,
    ReserveLine,
    ReserveOutcome,
    ReserveResult,
    Result,
    SetOnHand,
)
from server.engine.engine import Decision, Engine
from server.engine.errors import EngineError
from server.engine.limits import Limits
from server.engine.model import Position, ReservationState

LIMITS = Limits()
US_PER_S = 1_000_000
RETENTION_S = 3600

A, B = "sku-a", "sku-b"
L1, L2, L3 = "loc-1", "loc-2", "loc-3"

# Idempotency keys only need to be unique within one engine; a counter keeps them
# readable in failure output.
_keys = itertools.count(1)


class IdSource:
    """Deterministic reservation ids, in the order they are made, so that failures
    replay with the same ids."""

    def __init__(self, *, start: int = 1) -> None:
        self.next = start

    def __call__(self) -> str:
        value = self.next
        self.next += 1
        return f"rsv-{value:06d}"


def new_engine(clock: FakeClock, *, shard_count: int = 3) -> Engine:
    return Engine(
        shard_count=shard_count,
        clock=clock,
        idempotency_retention_s=RETENTION_S,
        new_id=IdSource(),
    )


def key(prefix: str = "req-") -> str:
    return f"{prefix}{next(_keys)}"


def decided(engine: Engine, command: Command) -> Decision:
    """Decide a command that must be fresh, without making it durable."""
    decision = engine.decide(command)
    assert isinstance(decision, Decision), decision
    return decision


def durable(engine: Engine, command: Command) -> Result:
    """Decide a command and make its writes durable, as the ledger would."""
    decision = decided(engine, command)
    engine.mark_durable(decision)
    return decision.result


def stock(engine: Engine, *counts: tuple[str, str, int]) -> None:
    command = SetOnHand("erp", key("count-"), tuple(OnHandCount(*c) for c in counts))
    durable(engine, command)


def reserve_command(
    *lines: ReserveLine, allow_partial: bool = False, ttl_s: int = 0
) -> Reserve:
    return Reserve(
        request_id=key(),
        channel="web",
        lines=lines,
        ttl_s=ttl_s,
        allow_partial=allow_partial,
    )


def reserve(
    engine: Engine, *lines: ReserveLine, allow_partial: bool = False, ttl_s: int = 0
) -> ReserveResult:
    command = reserve_command(*lines, allow_partial=allow_partial, ttl_s=ttl_s)
    result = durable(engine, command)
    assert isinstance(result, ReserveResult)
    return result


def hold(
    engine: Engine, sku: str, location: str, quantity: int, *, ttl_s: int = 0
) -> str:
    """A pending hold that must succeed; returns its id."""
    line = ReserveLine(sku, quantity, location=location)
    result = reserve(engine, line, ttl_s=ttl_s)
    assert result.outcome is ReserveOutcome.RESERVED
    return result.reservation_id


def change(engine: Engine, command: Command) -> ReservationState:
    """Apply a Confirm, Release, Fulfill or Extend; returns the state it leaves."""
    result = durable(engine, command)
    assert isinstance(result, ReservationResult)
    return result.reservation.state


def position(engine: Engine, sku: str, location: str) -> Position:
    return engine.positions_of(sku)[location]


def numbers(engine: Engine, sku: str, location: str) -> tuple[int, int, int]:
    """(on_hand, held, available_to_sell) of one position."""
    p = position(engine, sku, location)
    return p.on_hand, p.held, p.available_to_sell


def refusal(engine: Engine, command: Command) -> EngineError:
    with pytest.raises(EngineError) as caught:
        engine.decide(command)
    return caught.value
