"""Helpers shared by the engine's focused tests: an engine on a fake clock, and short
ways to stock it, decide commands and read positions back; for the tests of channel
allocations, ways to set them and read pools back, and a journal of records to
recover a new engine from."""

import dataclasses
import itertools
import json
import random
from typing import Any

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
    ReservationResult,
    Reserve,
    ReserveLine,
    ReserveOutcome,
    ReserveResult,
    Result,
    SetChannelAllocation,
    SetOnHand,
)
from server.engine.engine import Decision, Engine, WalRecord
from server.engine.errors import EngineError
from server.engine.limits import Limits
from server.engine.model import Position, ReservationState
from server.engine.shard import shard_of

LIMITS = Limits()
US_PER_S = 1_000_000
RETENTION_S = 3600

A, B = "sku-a", "sku-b"
L1, L2, L3, L4 = "loc-1", "loc-2", "loc-3", "loc-4"

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


# Channel allocations --------------------------------------------------------------------

WEB, MARKET, APP = "web", "marketplace", "app"
# Who sets allocations in these tests; attributions name them.
MERCHANDISER = "merchandiser"

# An allocation as the tests write it: (sku, channel, units, exclusive), and last the
# location group of its scope when that is not every location.
Level = tuple[str, str, int, bool] | tuple[str, str, int, bool, str]
# A pool as the tests compare it: (units not yet fulfilled, units the channel may
# still hold).
Pool = tuple[int, int]


def allocation(*levels: Level, change_id: str = "") -> SetChannelAllocation:
    """0 units removes the allocation of that scope."""
    return SetChannelAllocation(
        MERCHANDISER,
        change_id or key("alloc-"),
        tuple(AllocationLevel(*level) for level in levels),
    )


def allocate(engine: Engine, *levels: Level) -> None:
    result = durable(engine, allocation(*levels))
    assert result == PolicyResult(replayed=False)


def reserve_for(
    engine: Engine,
    channel: str,
    sku: str,
    quantity: int,
    *,
    locations: tuple[str, ...] = (L1,),
    allow_partial: bool = False,
    ttl_s: int = 0,
) -> ReserveResult:
    """One line of `sku`, split across `locations` in order."""
    line = ReserveLine(
        sku, quantity, locations=locations, allow_split=len(locations) > 1
    )
    command = Reserve(
        request_id=key(),
        channel=channel,
        lines=(line,),
        ttl_s=ttl_s,
        allow_partial=allow_partial,
    )
    result = durable(engine, command)
    assert isinstance(result, ReserveResult)
    return result


def held_for(
    engine: Engine, channel: str, sku: str, quantity: int, *, location: str = L1
) -> str:
    """A hold at one location that must succeed; returns its id."""
    result = reserve_for(engine, channel, sku, quantity, locations=(location,))
    assert result.outcome is ReserveOutcome.RESERVED, result
    return result.reservation_id


def fulfil(
    engine: Engine, reservation_id: str, quantity: int = 0, *, location: str = L1
) -> ReservationState:
    """Confirm (if pending) and fulfil `quantity` at `location`, or everything held
    for 0."""
    if engine.reservations[reservation_id].state is ReservationState.PENDING:
        change(engine, Confirm(key(), reservation_id))
    sku = engine.reservations[reservation_id].lines[0].sku
    lines = (LineQuantity(sku, location, quantity),) if quantity else ()
    return change(engine, Fulfill(key(), reservation_id, lines))


def pool(engine: Engine, sku: str, channel: str, group: str = "") -> Pool:
    return (
        engine.policies.pools.get((sku, channel, group), 0),
        engine.allocation_remaining(sku, channel, group),
    )


def allocation_state(
    engine: Engine,
) -> dict[tuple[str, str, str], tuple[int, int, bool]]:
    """(pool, remaining, exclusive) of every allocation in force, by (sku, channel,
    group)."""
    return {
        (sku, channel, group): (*pool(engine, sku, channel, group), exclusive)
        for sku, by_scope in engine.policies.allocations.items()
        for (channel, group), (exclusive, _) in by_scope.items()
    }


def skus_on_distinct_shards(shard_count: int) -> list[str]:
    """One sku per shard, so records of a test land on every shard."""
    skus: dict[int, str] = {}
    for n in range(1_000):
        sku = f"sku-{n}"
        skus.setdefault(shard_of(sku, shard_count), sku)
        if len(skus) == shard_count:
            return [skus[shard] for shard in range(shard_count)]
    raise AssertionError("no sku for some shard among 1,000 names")


# Recovery -------------------------------------------------------------------------------

Checkpoint = tuple[
    list[tuple[str, str, int, int]], list[dict[str, Any]], list[int], dict[str, Any]
]


class Journal:
    """Decides commands on an engine and keeps their records, as Postgres would."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.records: list[WalRecord] = []

    def durable(self, command: Command) -> Result:
        decision = decided(self.engine, command)
        self.engine.mark_durable(decision)
        if decision.record is not None:
            self.records.append(stored(decision.record))
        return decision.result

    def reserve(self, command: Reserve) -> ReserveResult:
        result = self.durable(command)
        assert isinstance(result, ReserveResult)
        return result

    def expire(self) -> int:
        decisions = self.engine.expire_due(count_max=1_000)
        for decision in decisions:
            self.engine.mark_durable(decision)
            assert decision.record is not None
            self.records.append(stored(decision.record))
        return len(decisions)

    def checkpoint(self) -> tuple[Checkpoint, int]:
        """A checkpoint as stored, and how many records it covers."""
        rows = self.engine.checkpoint_rows()
        positions, reservations, seqs, policies = json.loads(json.dumps(rows))
        kept = ([tuple(p) for p in positions], reservations, seqs, policies)
        return kept, len(self.records)


def stored(record: WalRecord) -> WalRecord:
    """The record as it comes back from Postgres: JSON, not Python tuples."""
    return dataclasses.replace(record, body=json.loads(json.dumps(record.body)))


def recovered(
    clock: FakeClock, checkpoint: Checkpoint | None, records: list[WalRecord]
) -> Engine:
    """A new engine from a checkpoint and the records after it, in the order given
    (each shard's own records must stay in seq order)."""
    engine = new_engine(clock)
    if checkpoint is not None:
        positions, reservations, seqs, policies = checkpoint
        for sku, location, on_hand, held in positions:
            engine.restore_position(sku, location, on_hand, held)
        for body in reservations:
            engine.restore_reservation(body)
        engine.restore_policies(policies)
        for shard, seq in enumerate(seqs):
            engine.restore_seq(shard, seq)
    for record in records:
        engine.replay_record(record.shard, record.seq, record.body)
    engine.finish_recovery()
    return engine


def interleaved(records: list[WalRecord], rng: random.Random) -> list[WalRecord]:
    """The records merged from per-shard queues in a random order of shards."""
    queues: dict[int, list[WalRecord]] = {}
    for record in records:
        queues.setdefault(record.shard, []).append(record)
    merged: list[WalRecord] = []
    while queues:
        shard = rng.choice(sorted(queues))
        merged.append(queues[shard].pop(0))
        if not queues[shard]:
            del queues[shard]
    return merged
