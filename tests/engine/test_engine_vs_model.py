"""Randomized tests: the engine against the reference model, and a recovered engine
against the engine it was recovered from.

Design note. One random command sequence drives the engine and the model side by side.
Commands are generated in the engine's reservation ids and translated for the model,
which names its reservations itself; the map between the two is learnt when a Reserve
is answered. Every engine decision is marked durable at once, which is what lets the
model ignore withheld gains. After every step the test compares the answer (or the
refusal's kind and reason), every position, what each channel may hold at every
position, the policies in force with who set them, the reservations, and the engine's
own invariants.

The recovery test records what a ledger would have written (write-ahead records and
request rows), rebuilds a second engine from a checkpoint taken part-way plus the later
records, checks that it shows the same state and replays the same answers, and then
keeps deciding on both engines to show they stay in step.

Every test prints its seed. To replay a failure, run with STOCKWARD_SEED set to the
seed printed in the failure message.
"""

import dataclasses
import itertools
import json
import os
import random
from collections.abc import Iterator
from typing import Any

import pytest

from server.clock import FakeClock
from server.engine.commands import (
    Adjustment,
    AdjustmentReason,
    AdjustStock,
    BufferLevel,
    Command,
    Confirm,
    Extend,
    Fulfill,
    LineQuantity,
    OnHandCount,
    PolicyCommand,
    PolicyResult,
    Release,
    ReservationResult,
    Reserve,
    ReserveLine,
    ReserveResult,
    Result,
    SafetyLevel,
    SetChannelBuffer,
    SetChannelSourcing,
    SetLocationGroup,
    SetOnHand,
    SetSafetyStock,
    StockResult,
)
from server.engine.engine import Decision, Engine, Replay, RequestRow, WalRecord
from server.engine.errors import EngineError, InvariantBroken
from server.engine.limits import Limits
from server.engine.model import ACTIVE_STATES, Reservation
from tests.engine.reference_model import (
    Answered,
    At,
    ChannelView,
    LineView,
    ModelResult,
    Outcome,
    PoliciesView,
    PositionView,
    ReferenceModel,
    Refused,
    ReservationView,
    SetBy,
)
from tests.engine.support import IdSource

LIMITS = Limits()

SHARD_COUNTS = (1, 7)
# Enough sequences to reach the rare paths (a retry of a refused request, a release of
# a hold that is due but not swept yet) on most runs, while the file stays well under
# 30 s.
SEQUENCES_PER_SHARD_COUNT = 150
STEPS_PER_SEQUENCE = 200
RECOVERY_SEQUENCES_PER_SHARD_COUNT = 40
RECOVERY_STEPS_BEFORE = 150
RECOVERY_STEPS_AFTER = 60

# A small catalogue, so that lines compete for the same positions. The unknown sku and
# location are never stocked.
SKUS = ("sku-a", "sku-b", "sku-c", "sku-d")
LOCATIONS = ("loc-1", "loc-2", "loc-3")
POSITIONS = tuple((sku, location) for sku in SKUS for location in LOCATIONS)
UNKNOWN_SKU = "sku-unstocked"
UNKNOWN_LOCATION = "loc-unstocked"
CHANNELS = ("web", "app")
# What GetAvailability can be asked for: no channel's view, or one channel's.
VIEWS = ("", *CHANNELS)
SOURCES = ("erp", "pos")
ACTORS = ("ops", "planner")
# Two groups, so that a channel can source from one while the other is removed; the
# unknown group is never defined.
GROUPS = ("near", "far")
UNKNOWN_GROUP = "group-undefined"
# Policy levels stay small next to the counts (0 to 20), so that they bite without
# leaving nothing to sell.
POLICY_UNITS_MAX = 6
# How often a generated policy level, group or sourcing is a removal.
REMOVAL_SHARE = 0.3
# How often a reserve line names no location and relies on its channel's group: often
# when the channel has one, now and then when it has none (CHANNEL_HAS_NO_SOURCING).
SOURCED_LINE_SHARE = 0.4
UNSOURCED_LINE_SHARE = 0.03
# How often a sourcing change names a group that does not exist (GROUP_UNKNOWN) or
# removes the channel's default.
UNKNOWN_GROUP_SHARE = 0.1
SOURCING_REMOVAL_SHARE = 0.2
# Far more holds than a sequence makes, so one sweep takes every due hold.
EXPIRIES_PER_SWEEP_MAX = 10_000
# Clock steps, seconds: many smaller than the shortest hold, some past the default TTL.
ADVANCES_S = (0.5, 1, 7, 30, 90, 300, 1000)

# Relative weights of what a step does.
STEP_WEIGHTS = {
    "set_on_hand": 6,
    "adjust": 6,
    "reserve": 22,
    "confirm": 10,
    "release": 6,
    "release_part": 6,
    "fulfil": 8,
    "fulfil_part": 6,
    "extend": 5,
    "tick": 10,
    "retry": 7,
    "reuse_key": 3,
    "unknown_reservation": 2,
    "safety_stock": 3,
    "buffer": 3,
    "group": 3,
    "sourcing": 3,
}
POLICY_STEPS = ("safety_stock", "buffer", "group", "sourcing")


# Seeds ---------------------------------------------------------------------------------


@pytest.fixture
def seed() -> int:
    """The run's seed: STOCKWARD_SEED if set, else a fresh one. Printed either way."""
    text = os.environ.get("STOCKWARD_SEED")
    value = int(text) if text else random.SystemRandom().randrange(2**32)
    print(f"STOCKWARD_SEED={value}")
    return value


def sequence_seeds(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.getrandbits(64) for _ in range(count)]


# Plumbing ------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Journal:
    """What a ledger would have made durable, in decision order."""

    records: list[WalRecord] = dataclasses.field(default_factory=list)
    requests: list[tuple[Command, RequestRow]] = dataclasses.field(default_factory=list)

    def add(self, command: Command | None, decision: Decision) -> None:
        if decision.record is not None:
            self.records.append(decision.record)
        if decision.request is not None:
            assert command is not None
            self.requests.append((command, decision.request))


@dataclasses.dataclass(frozen=True, slots=True)
class EngineAnswer:
    """What one engine did with a command, comparable between two engines."""

    refused: Refused | None = None
    result: Result | None = None
    replayed: bool = False
    record: WalRecord | None = None
    request: RequestRow | None = None


def engine_view(reservation: Reservation) -> ReservationView:
    return ReservationView(
        channel=reservation.channel,
        order_ref=reservation.order_ref,
        state=reservation.state,
        lines=tuple(
            LineView(
                line.sku,
                line.location,
                line.quantity_reserved,
                line.quantity_held,
                line.quantity_fulfilled,
                line.quantity_released,
            )
            for line in reservation.lines
        ),
        created_us=reservation.created_us,
        updated_us=reservation.updated_us,
        expires_us=reservation.expires_us,
    )


def engine_positions(engine: Engine) -> dict[At, PositionView]:
    return {
        (p.sku, p.location): PositionView(p.on_hand, p.held, p.available_to_sell)
        for p in engine.iter_positions()
    }


def engine_channel_views(engine: Engine, channel: str) -> dict[At, ChannelView]:
    """Every stocked position as `channel` sees it, through the engine's read."""
    views: dict[At, ChannelView] = {}
    for sku in SKUS:
        for position, safety, buffer, units in engine.availability(sku, [], channel):
            views[(sku, position.location)] = ChannelView(safety, buffer, units)
    return views


def engine_policies(engine: Engine) -> PoliciesView:
    policies = engine.policies
    return PoliciesView(
        safety_stock={
            at: (units, SetBy(a.actor, a.change_id, a.at_us))
            for at, (units, a) in policies.safety_stock.items()
        },
        buffers={
            at: (units, SetBy(a.actor, a.change_id, a.at_us))
            for at, (units, a) in policies.buffers.items()
        },
        groups={
            name: (locations, SetBy(a.actor, a.change_id, a.at_us))
            for name, (locations, a) in policies.groups.items()
        },
        sourcing={
            channel: ((s.group, s.allow_split), SetBy(a.actor, a.change_id, a.at_us))
            for channel, (s, a) in policies.sourcing.items()
        },
    )


def check_invariants(engine: Engine, where: str) -> None:
    """What must hold between any two commands once every decision is durable."""
    held_by_lines: dict[At, int] = {}
    for reservation in engine.reservations.values():
        for line in reservation.lines:
            assert line.quantity_held >= 0, f"{where}: {reservation}"
            accounted = (
                line.quantity_held + line.quantity_fulfilled + line.quantity_released
            )
            assert accounted == line.quantity_reserved, f"{where}: {reservation}"
            if reservation.is_active:
                at = (line.sku, line.location)
                held_by_lines[at] = held_by_lines.get(at, 0) + line.quantity_held
        assert reservation.is_active == (reservation.quantity_held > 0), where

    for position in engine.iter_positions():
        at = (position.sku, position.location)
        assert position.held >= 0, f"{where}: {position}"
        assert position.on_hand >= 0, f"{where}: {position}"
        assert position.withheld == 0, f"{where}: {position} after every write"
        assert position.held == held_by_lines.pop(at, 0), f"{where}: {position}"
    assert not held_by_lines, f"{where}: lines hold unknown positions {held_by_lines}"


def json_round_trip(value: Any) -> Any:
    """What comes back from a jsonb column."""
    return json.loads(json.dumps(value))


def _expiries(decisions: list[Decision]) -> list[tuple[str, str]]:
    """Expiry decisions without their sequence numbers, which follow sweep order."""
    return [
        (d.result.reservation.reservation_id, json.dumps(d.result.to_json()))
        for d in decisions
        if isinstance(d.result, ReservationResult)
    ]


def interleave(records: list[WalRecord], rng: random.Random) -> Iterator[WalRecord]:
    """The records in a random order that keeps each shard's own order: recovery reads
    the shards' streams independently."""
    streams: dict[int, list[WalRecord]] = {}
    for record in records:
        streams.setdefault(record.shard, []).append(record)
    for stream in streams.values():
        stream.reverse()
    while streams:
        shard = rng.choice(sorted(streams))
        yield streams[shard].pop()
        if not streams[shard]:
            del streams[shard]


# The comparison ------------------------------------------------------------------------


class Comparison:
    """One random sequence, decided by the engine and by the model."""

    def __init__(self, *, seed: int, label: str, shard_count: int) -> None:
        self.rng = random.Random(seed)
        self.label = label
        self.shard_count = shard_count
        self.clock = FakeClock()
        self.ids = IdSource()
        self.engine = Engine(shard_count=shard_count, clock=self.clock, new_id=self.ids)
        self.model = ReferenceModel(
            on_hand_max=LIMITS.on_hand_max, ttl_default_s=LIMITS.ttl_default_s
        )
        self.to_model: dict[str, str] = {}
        self.sent: list[Command] = []
        self.journal = Journal()
        # A second engine fed the same commands, once one has been recovered.
        self.shadow: Engine | None = None
        self.step_index = 0
        self.step_name = ""
        self._serial = itertools.count(1)

    def where(self) -> str:
        return (
            f"{self.label} shards={self.shard_count} step={self.step_index} "
            f"({self.step_name})"
        )

    # Steps -------------------------------------------------------------------------------

    def run(self, steps: int) -> None:
        names = list(STEP_WEIGHTS)
        weights = list(STEP_WEIGHTS.values())
        for _ in range(steps):
            self.step_index += 1
            self.step_name = self.rng.choices(names, weights)[0]
            if self.step_index == 1:
                self.step_name = "set_on_hand"
            touched = self.tick() if self.step_name == "tick" else self.send_one()
            self.compare_state(touched)

    def send_one(self) -> list[str]:
        command = self.make(self.step_name)
        self.sent.append(command)
        self.send(command)
        target = getattr(command, "reservation_id", "")
        return [target] if target in self.to_model else []

    def make(self, name: str) -> Command:
        if name == "set_on_hand":
            return self.set_on_hand()
        if name == "adjust":
            return self.adjust()
        if name == "reserve" or (name in {"retry", "reuse_key"} and not self.sent):
            return self.reserve()
        if name == "retry":
            return self.rng.choice(self.sent)
        if name == "reuse_key":
            return self.reuse_key(self.rng.choice(self.sent))
        if name == "unknown_reservation":
            return self.change(self.rng.choice(("confirm", "release", "extend")))
        if name in POLICY_STEPS:
            return self.policy_change(name, self.rng.choice(ACTORS), self.key("chg-"))
        return self.change(name)

    # Generators --------------------------------------------------------------------------

    def key(self, prefix: str) -> str:
        return f"{prefix}{next(self._serial)}"

    def set_on_hand(self) -> SetOnHand:
        # The first count stocks much of the catalogue, as a go-live import would.
        size = self.rng.randint(6, 12) if not self.sent else self.rng.randint(1, 3)
        places = self.rng.sample(POSITIONS, k=size)
        counts = tuple(
            OnHandCount(s, loc, self.rng.randint(0, 20)) for s, loc in places
        )
        return SetOnHand(self.rng.choice(SOURCES), self.key("count-"), counts)

    def adjust(self) -> AdjustStock:
        adjustments: list[Adjustment] = []
        at = self.rng.choice(POSITIONS)
        for _ in range(self.rng.randint(1, 3)):
            if self.rng.random() < 0.7:
                at = self.rng.choice(POSITIONS)
            delta = self.rng.choice((-1, 1)) * self.rng.randint(1, 10)
            reason = self.rng.choice(list(AdjustmentReason))
            adjustments.append(Adjustment(at[0], at[1], delta, reason))
        return AdjustStock(
            self.rng.choice(SOURCES), self.key("event-"), tuple(adjustments)
        )

    def reserve(self, *, channel: str = "", request_id: str = "") -> Reserve:
        channel = channel or self.rng.choice(CHANNELS)
        is_sourced = channel in self.model.policies.sourcing
        sourced_share = SOURCED_LINE_SHARE if is_sourced else UNSOURCED_LINE_SHARE
        lines: list[ReserveLine] = []
        for _ in range(self.rng.randint(1, 3)):
            sku = self.rng.choice(SKUS) if self.rng.random() < 0.95 else UNKNOWN_SKU
            if lines and self.rng.random() < 0.25:
                sku = self.rng.choice(lines).sku
            if self.rng.random() < sourced_share:
                lines.append(ReserveLine(sku, self.rng.randint(1, 12)))
            else:
                lines.append(self.reserve_line(sku))
        return Reserve(
            request_id=request_id or self.key("req-"),
            channel=channel,
            lines=tuple(lines),
            order_ref=self.rng.choice(("", "order-1", "order-2")),
            ttl_s=self.rng.choice((0, self.rng.randint(1, 300))),
            allow_partial=self.rng.random() < 0.3,
        )

    def reserve_line(self, sku: str) -> ReserveLine:
        quantity = self.rng.randint(1, 12)
        places = (
            [*LOCATIONS, UNKNOWN_LOCATION] if self.rng.random() < 0.1 else LOCATIONS
        )
        style = self.rng.choice(("single", "preference", "split"))
        if style == "single":
            return ReserveLine(sku, quantity, location=self.rng.choice(places))
        locations = tuple(self.rng.sample(places, k=self.rng.randint(1, 3)))
        return ReserveLine(
            sku, quantity, locations=locations, allow_split=style == "split"
        )

    def policy_units(self) -> int:
        if self.rng.random() < REMOVAL_SHARE:
            return 0
        return self.rng.randint(1, POLICY_UNITS_MAX)

    def policy_change(self, name: str, actor: str, change_id: str) -> PolicyCommand:
        """A valid policy change; removals, a group in use and an unknown group among
        them."""
        rng = self.rng
        if name == "safety_stock":
            places = [(sku, loc) for sku in ("", *SKUS) for loc in LOCATIONS]
            chosen = rng.sample(places, k=rng.randint(1, 3))
            levels = tuple(
                SafetyLevel(s, loc, self.policy_units()) for s, loc in chosen
            )
            return SetSafetyStock(actor, change_id, levels)
        if name == "buffer":
            keys = [(channel, sku) for channel in CHANNELS for sku in ("", *SKUS)]
            chosen = rng.sample(keys, k=rng.randint(1, 2))
            buffers = tuple(BufferLevel(c, s, self.policy_units()) for c, s in chosen)
            return SetChannelBuffer(actor, change_id, buffers)
        if name == "group":
            locations: tuple[str, ...] = ()
            if rng.random() >= REMOVAL_SHARE:
                choices = [*LOCATIONS, UNKNOWN_LOCATION]
                locations = tuple(rng.sample(choices, k=rng.randint(1, 3)))
            return SetLocationGroup(actor, change_id, rng.choice(GROUPS), locations)
        assert name == "sourcing", name
        defined = [g for g in GROUPS if g in self.model.policies.groups]
        draw = rng.random()
        if draw < UNKNOWN_GROUP_SHARE or not defined:
            group = UNKNOWN_GROUP
        elif draw < UNKNOWN_GROUP_SHARE + SOURCING_REMOVAL_SHARE:
            group = ""
        else:
            group = rng.choice(defined)
        return SetChannelSourcing(
            actor, change_id, rng.choice(CHANNELS), group, rng.random() < 0.5
        )

    def target(self) -> str:
        """A reservation to change: mostly active ones, sometimes one that is not."""
        if not self.to_model or self.step_name == "unknown_reservation":
            return self.key("ghost-")
        engine_ids = list(self.to_model)
        active = [
            rid for rid in engine_ids if self.model_view(rid).state in ACTIVE_STATES
        ]
        pool = active if active and self.rng.random() < 0.8 else engine_ids
        return self.rng.choice(pool)

    def model_view(self, engine_id: str) -> ReservationView:
        return self.model.view(self.to_model[engine_id])

    def change(self, name: str, *, request_id: str = "") -> Command:
        request_id = request_id or self.key("req-")
        reservation_id = self.target()
        if name == "confirm":
            return Confirm(request_id, reservation_id)
        if name == "extend":
            return Extend(request_id, reservation_id, self.rng.randint(1, 400))
        if name == "release":
            return Release(request_id, reservation_id)
        if name == "release_part":
            return Release(request_id, reservation_id, self.part_lines(reservation_id))
        if name == "fulfil":
            return Fulfill(request_id, reservation_id)
        assert name == "fulfil_part", name
        return Fulfill(request_id, reservation_id, self.part_lines(reservation_id))

    def part_lines(self, reservation_id: str) -> tuple[LineQuantity, ...]:
        """Some of a reservation's lines; now and then a line it does not have or more
        than it holds."""
        lines: list[LineQuantity] = []
        for _ in range(self.rng.randint(1, 2)):
            if reservation_id not in self.to_model or self.rng.random() < 0.08:
                sku, location = self.rng.choice(POSITIONS)
                lines.append(LineQuantity(sku, location, self.rng.randint(1, 3)))
                continue
            line = self.rng.choice(self.model_view(reservation_id).lines)
            beyond = 1 if self.rng.random() < 0.15 else 0
            most = max(1, line.quantity_held) + beyond
            quantity = self.rng.randint(1, most)
            lines.append(LineQuantity(line.sku, line.location, quantity))
        return tuple(lines)

    def reuse_key(self, earlier: Command) -> Command:
        """A new command under an earlier command's idempotency key."""
        if isinstance(earlier, AdjustStock | SetOnHand):
            fresh = self.adjust() if self.rng.random() < 0.5 else self.set_on_hand()
            return dataclasses.replace(
                fresh, source=earlier.source, source_event_id=earlier.source_event_id
            )
        if isinstance(earlier, PolicyCommand):
            name = self.rng.choice(POLICY_STEPS)
            return self.policy_change(name, earlier.actor, earlier.change_id)
        if self.rng.random() < 0.5:
            channel = earlier.channel if isinstance(earlier, Reserve) else ""
            return self.reserve(channel=channel, request_id=earlier.request_id)
        name = self.rng.choice(("confirm", "release", "fulfil", "extend"))
        return self.change(name, request_id=earlier.request_id)

    # Deciding ----------------------------------------------------------------------------

    def for_model(self, command: Command) -> Command:
        if isinstance(command, Confirm | Release | Fulfill | Extend):
            rid = command.reservation_id
            return dataclasses.replace(
                command, reservation_id=self.to_model.get(rid, rid)
            )
        return command

    def send(self, command: Command) -> None:
        expected = self.model.decide(
            self.for_model(command), now_us=self.clock.now_us()
        )
        answer = self.answer(self.engine, command)
        if self.shadow is not None:
            shadow_answer = self.answer(self.shadow, command)
            assert shadow_answer == answer, f"{self.where()}: recovered engine differs"

        if answer.result is not None and not answer.replayed:
            self.learn_id(answer.result, expected)
        actual = self.translate(answer)
        assert actual == expected, (
            f"{self.where()}: {command!r}\nengine: {actual!r}\nmodel:  {expected!r}"
        )

    def answer(self, engine: Engine, command: Command) -> EngineAnswer:
        try:
            got = engine.decide(command)
        except EngineError as error:
            return EngineAnswer(refused=Refused(error.kind, error.reason))
        except InvariantBroken as error:
            raise AssertionError(
                f"{self.where()}: {command!r} broke an invariant: {error}"
            ) from error
        if isinstance(got, Replay):
            assert got.durable, f"{self.where()}: replay of a durable answer"
            assert got.result.replayed, f"{self.where()}: replay not marked"
            return EngineAnswer(result=got.result, replayed=True)
        assert not got.result.replayed, f"{self.where()}: fresh answer marked replayed"
        engine.mark_durable(got)
        if engine is self.engine:
            self.journal.add(command, got)
        return EngineAnswer(result=got.result, record=got.record, request=got.request)

    def learn_id(self, result: Result, expected: Outcome) -> None:
        if not isinstance(result, ReserveResult) or not result.reservation_id:
            return
        if isinstance(expected, Answered) and isinstance(
            expected.result, ReserveResult
        ):
            assert result.reservation_id not in self.to_model, self.where()
            self.to_model[result.reservation_id] = expected.result.reservation_id

    def translate(self, answer: EngineAnswer) -> Outcome:
        """The engine's answer in the model's terms and reservation ids."""
        if answer.refused is not None:
            return answer.refused
        result = answer.result
        model_result: ModelResult
        if isinstance(result, ReserveResult):
            rid = result.reservation_id
            model_result = dataclasses.replace(
                result, reservation_id=self.to_model.get(rid, rid), replayed=False
            )
        elif isinstance(result, ReservationResult):
            model_result = engine_view(result.reservation)
        else:
            assert isinstance(result, StockResult | PolicyResult)
            model_result = dataclasses.replace(result, replayed=False)
        return Answered(model_result, replayed=answer.replayed)

    def tick(self) -> list[str]:
        """Move the clock and run one bounded expiry sweep."""
        self.clock.advance(self.rng.choice(ADVANCES_S))
        now_us = self.clock.now_us()
        count_max = self.rng.randint(1, 4)
        if self.shadow is not None:
            # Which due holds a bounded sweep takes first may differ after recovery (the
            # recovered schedule has no stale entries), so with two engines each sweep
            # takes every due hold.
            count_max = EXPIRIES_PER_SWEEP_MAX
        decisions = self.expire(self.engine, count_max)
        if self.shadow is not None:
            shadow_decisions = self.expire(self.shadow, count_max)
            assert sorted(_expiries(shadow_decisions)) == sorted(
                _expiries(decisions)
            ), f"{self.where()}: recovered engine expired differently"

        assert len(decisions) <= count_max, self.where()
        expired: list[str] = []
        for decision in decisions:
            assert isinstance(decision.result, ReservationResult), self.where()
            reservation = decision.result.reservation
            model_id = self.to_model[reservation.reservation_id]
            assert self.model.is_due(model_id, now_us=now_us), (
                f"{self.where()}: expired {reservation} before its time"
            )
            expected = self.model.expire(model_id, now_us=now_us)
            assert engine_view(reservation) == expected, self.where()
            expired.append(reservation.reservation_id)
        if len(decisions) < count_max:
            assert not self.model.due(now_us=now_us), (
                f"{self.where()}: sweep left due holds {self.model.due(now_us=now_us)}"
            )
        return expired

    def expire(self, engine: Engine, count_max: int) -> list[Decision]:
        try:
            decisions = engine.expire_due(count_max=count_max)
        except InvariantBroken as error:
            raise AssertionError(f"{self.where()}: expiry broke: {error}") from error
        for decision in decisions:
            engine.mark_durable(decision)
            if engine is self.engine:
                self.journal.add(None, decision)
        return decisions

    # Comparing state ---------------------------------------------------------------------

    def compare_state(self, touched: list[str]) -> None:
        where = self.where()
        assert engine_positions(self.engine) == self.model.positions(), where
        assert engine_policies(self.engine) == self.model.policies, where
        # One view per step, in turn, keeps the run short: each is compared every third
        # step, and all of them by `compare_all`.
        self.compare_channel_view(VIEWS[self.step_index % len(VIEWS)])
        check_invariants(self.engine, where)
        assert len(self.engine.reservations) == len(self.model.reservations), where
        # Finished reservations never change, so each step compares the active ones and
        # those the step named; `compare_all` covers the rest at the end.
        for engine_id in touched:
            self.compare_reservation(engine_id)
        for engine_id, reservation in self.engine.reservations.items():
            if reservation.is_active:
                self.compare_reservation(engine_id)

    def compare_channel_view(self, channel: str) -> None:
        got = engine_channel_views(self.engine, channel)
        assert got == self.model.channel_views(channel), f"{self.where()}: {channel!r}"

    def compare_reservation(self, engine_id: str) -> None:
        got = engine_view(self.engine.get_reservation(engine_id))
        assert got == self.model_view(engine_id), f"{self.where()}: {engine_id}"

    def compare_all(self) -> None:
        assert sorted(self.engine.reservations) == sorted(self.to_model), self.where()
        for channel in VIEWS:
            self.compare_channel_view(channel)
        for engine_id in self.to_model:
            self.compare_reservation(engine_id)


# Recovery ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Checkpoint:
    positions: list[list[Any]]
    reservations: list[dict[str, Any]]
    seqs: list[int]
    policies: dict[str, Any]
    records_before: int


def take_checkpoint(comparison: Comparison) -> Checkpoint:
    positions, reservations, seqs, policies = comparison.engine.checkpoint_rows()
    return Checkpoint(
        positions=json_round_trip(positions),
        reservations=json_round_trip(reservations),
        seqs=json_round_trip(seqs),
        policies=json_round_trip(policies),
        records_before=len(comparison.journal.records),
    )


def recover(comparison: Comparison, checkpoint: Checkpoint) -> Engine:
    """A new engine from the checkpoint, the later records and the request log."""
    engine = Engine(
        shard_count=comparison.shard_count,
        clock=comparison.clock,
        new_id=IdSource(start=comparison.ids.next),
    )
    engine.restore_policies(checkpoint.policies)
    for sku, location, on_hand, held in checkpoint.positions:
        engine.restore_position(sku, location, on_hand, held)
    for body in checkpoint.reservations:
        engine.restore_reservation(body)
    for shard, last_seq in enumerate(checkpoint.seqs):
        engine.restore_seq(shard, last_seq)

    later = comparison.journal.records[checkpoint.records_before :]
    for record in interleave(later, comparison.rng):
        engine.replay_record(record.shard, record.seq, json_round_trip(record.body))
    for _, row in comparison.journal.requests:
        engine.restore_request(
            scope=row.scope,
            request_id=row.request_id,
            fingerprint_=row.fingerprint,
            result=json_round_trip(row.result),
            created_us=row.created_us,
        )
    engine.finish_recovery()
    return engine


def compare_recovered(comparison: Comparison, recovered: Engine) -> None:
    where = f"{comparison.where()} after recovery"
    original = comparison.engine
    check_invariants(recovered, where)
    assert engine_positions(recovered) == engine_positions(original), where
    assert engine_policies(recovered) == engine_policies(original), where
    assert {rid: r.to_json() for rid, r in recovered.reservations.items()} == {
        rid: r.to_json() for rid, r in original.reservations.items()
    }, where

    for command, _ in comparison.journal.requests:
        first = original.decide(command)
        again = recovered.decide(command)
        assert isinstance(first, Replay), f"{where}: {command!r}"
        assert isinstance(again, Replay), f"{where}: {command!r} not replayed"
        assert again.result == first.result, f"{where}: {command!r}"


# Tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shard_count", SHARD_COUNTS)
def test_engine_decides_like_the_reference_model(seed: int, shard_count: int) -> None:
    for index, sequence_seed in enumerate(
        sequence_seeds(seed, SEQUENCES_PER_SHARD_COUNT)
    ):
        comparison = Comparison(
            seed=sequence_seed,
            label=f"STOCKWARD_SEED={seed} sequence={index}",
            shard_count=shard_count,
        )
        comparison.run(STEPS_PER_SEQUENCE)
        comparison.compare_all()


@pytest.mark.parametrize("shard_count", SHARD_COUNTS)
def test_recovered_engine_shows_the_same_state_and_answers(
    seed: int, shard_count: int
) -> None:
    seeds = sequence_seeds(seed, RECOVERY_SEQUENCES_PER_SHARD_COUNT)
    for index, sequence_seed in enumerate(seeds):
        comparison = Comparison(
            seed=sequence_seed,
            label=f"STOCKWARD_SEED={seed} sequence={index}",
            shard_count=shard_count,
        )
        checkpoint_step = comparison.rng.randint(0, RECOVERY_STEPS_BEFORE)
        comparison.run(checkpoint_step)
        checkpoint = take_checkpoint(comparison)
        comparison.run(RECOVERY_STEPS_BEFORE - checkpoint_step)

        try:
            recovered = recover(comparison, checkpoint)
        except InvariantBroken as error:
            raise AssertionError(f"{comparison.where()}: recovery: {error}") from error
        compare_recovered(comparison, recovered)
        comparison.shadow = recovered
        comparison.run(RECOVERY_STEPS_AFTER)
        comparison.compare_all()
