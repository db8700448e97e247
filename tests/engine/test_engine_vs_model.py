"""Randomized tests: the engine against the reference model, and a recovered engine
against the engine it was recovered from.

Design note. One random command sequence drives the engine and the model side by side.
Commands are generated in the engine's reservation ids and translated for the model,
which names its reservations itself; the map between the two is learnt when a Reserve
is answered. Every engine decision is marked durable at once, which is what lets the
model ignore withheld gains. After every step the test compares the answer (or the
refusal's kind and reason), every position, what each channel may hold at every
position, the policies in force with who set them (allocations with their pools,
controls in force, inbound supply with its ETAs, the channels allowed pre-orders), what
each channel's allocation has remaining and the most it could take of each sku, the
reservations, and the engine's own invariants.

Inbound supply is set, replaced and removed at positions that are stocked and now and
then at ones that are not; receipts are aimed at positions with supply often enough
that they use some of it up, all of it, and more than was expected.

The clock moves between steps as well as in sweeps, so that continuity controls start,
bite and end mid-sequence, throttle buckets refill, and holds fall due before a sweep.

The recovery test records what a ledger would have written (write-ahead records and
request rows), rebuilds a second engine from a checkpoint taken part-way plus the later
records, checks that it shows the same state (allocations, pools, controls, inbound
supply and pre-order channels included) and replays the same answers, and then keeps
deciding on both engines to show they stay in step. Throttle buckets are the one thing
not recovered: a recovered engine starts them full, which a third engine recovered for
the purpose checks; the clock then moves a second on, after which the original's
buckets are full as well.

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
    AllocationLevel,
    BufferLevel,
    Command,
    Confirm,
    Extend,
    Fulfill,
    InboundSupply,
    LiftControl,
    LineQuantity,
    Move,
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
    SetChannelAllocation,
    SetChannelBuffer,
    SetChannelPreorders,
    SetChannelSourcing,
    SetControl,
    SetInboundSupply,
    SetLocationGroup,
    SetOnHand,
    SetSafetyStock,
    StockResult,
)
from server.engine.engine import Decision, Engine, Replay, RequestRow, WalRecord
from server.engine.errors import EngineError, ErrorKind, InvariantBroken
from server.engine.limits import Limits
from server.engine.model import ACTIVE_STATES, Reservation
from server.engine.policy import Attribution, Control, ControlKind
from tests.engine.reference_model import (
    US_PER_S,
    AllocationView,
    Answered,
    At,
    ChannelView,
    ControlView,
    LineView,
    ModelResult,
    Outcome,
    Pair,
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
# a hold that is due but not swept yet, a move into a suppressed channel's view) on
# most runs, while the file stays near 25 s on a 2-core machine.
SEQUENCES_PER_SHARD_COUNT = 110
STEPS_PER_SEQUENCE = 200
RECOVERY_SEQUENCES_PER_SHARD_COUNT = 30
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
# Allocation pools span every location of a sku, so they run larger than the levels
# above: up to about what one sku has on hand, so that pools and fences both bite.
ALLOCATION_UNITS_MAX = 15
EXCLUSIVE_SHARE = 0.5
# Throttle rates are powers of two and every clock step is a multiple of 1/8 s, so each
# refill is a whole number of eighths of a token: exact in the engine's floating point
# as in the model's integers, and the two agree on every boundary.
THROTTLE_RATES_PER_S = (1, 2, 4)
# Time boxes, seconds: from shorter than a clock step to longer than most sequences.
TIME_BOXES_S = (0.5, 1, 2, 5, 30, 120, 600)
# How often a control's time box has already ended (TIME_BOX_IN_PAST), is longer than
# allowed (TIME_BOX_TOO_LONG), or exactly the longest allowed.
TIME_BOX_IN_PAST_SHARE = 0.05
TIME_BOX_TOO_LONG_SHARE = 0.05
TIME_BOX_LONGEST_SHARE = 0.03
# Raised safety stock: a few units and a percent of on-hand that is sometimes exact,
# sometimes rounded up, and sometimes all of it.
RAISE_UNITS_MAX = 3
RAISE_PERCENTS = (0, 10, 33, 50, 100)
# How often a new control takes the kind and target of one in force (CONTROL_OVERLAPS).
OVERLAP_SHARE = 0.25
# How often a lift names a control that was never set (CONTROL_NOT_FOUND), and how
# often one in force when there is one; the rest name controls set earlier, some of
# them ended, lifted or refused.
UNKNOWN_CONTROL_SHARE = 0.1
IN_FORCE_LIFT_SHARE = 0.7
# How often a move names a line the reservation lacks or more than it holds, and how
# often it targets a location that never stocked anything.
MOVE_ASTRAY_SHARE = 0.1
UNKNOWN_TARGET_SHARE = 0.05
# Inbound supply: up to about what a position has on hand, so that pre-orders can take
# as much again. Its ETAs lie up to a few weeks ahead; nothing in the engine reads them
# yet beyond showing them.
INBOUND_UNITS_MAX = 15
INBOUND_ETA_MAX_S = 21 * 24 * 3600
# How often a supply names a position that was never stocked: expected, not offered.
UNSTOCKED_INBOUND_SHARE = 0.1
# How often a pre-order change allows the channel rather than stopping it.
PREORDERS_ALLOWED_SHARE = 0.65
# How often an adjustment is a receipt aimed at a position with inbound supply, and how
# large such a receipt may be: sometimes beyond what is expected.
AIMED_RECEIPT_SHARE = 0.5
RECEIPT_UNITS_MAX = 12
# Far more holds than a sequence makes, so one sweep takes every due hold.
EXPIRIES_PER_SWEEP_MAX = 10_000
# Clock steps, seconds: many smaller than the shortest hold, some past the default TTL.
ADVANCES_S = (0.5, 1, 7, 30, 90, 300, 1000)
# Between steps the clock often moves a little: controls start and end, buckets refill.
CLOCK_STEP_SHARE = 0.4
CLOCK_STEPS_S = (0.125, 0.25, 0.5, 1, 2)
# A throttle bucket holds one second of tokens, so a second after its last request it
# is full whatever its rate.
BUCKET_REFILL_S = 1

# Relative weights of what a step does.
STEP_WEIGHTS = {
    "set_on_hand": 6,
    "adjust": 6,
    "reserve": 22,
    "burst": 3,
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
    "move": 5,
    "safety_stock": 3,
    "buffer": 3,
    "group": 3,
    "sourcing": 3,
    "allocation": 4,
    "control": 4,
    "lift": 2,
    "retune": 2,
    "inbound": 4,
    "preorders": 2,
}
POLICY_STEPS = (
    "safety_stock",
    "buffer",
    "group",
    "sourcing",
    "allocation",
    "control",
    "lift",
    "inbound",
    "preorders",
)
# A burst is several reservation requests of one channel at one instant, as a flash
# sale brings: enough to empty a throttle's bucket.
BURST_REQUESTS_MAX = 6
# Every (sku, channel) whose allocation and cap are compared after each step.
PAIRS = [(sku, channel) for sku in SKUS for channel in CHANNELS]


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


def set_by(attribution: Attribution) -> SetBy:
    return SetBy(attribution.actor, attribution.change_id, attribution.at_us)


def control_view(control: Control) -> ControlView:
    return ControlView(
        kind=control.kind,
        channel=control.channel,
        sku=control.sku,
        location=control.location,
        units=control.units,
        percent=control.percent,
        rate_per_s=control.rate_per_s,
        until_us=control.until_us,
        reason=control.reason,
        set_by=set_by(control.attribution),
    )


def engine_policies(engine: Engine, *, now_us: int) -> PoliciesView:
    """The policies as GetPolicies shows them at `now_us`."""
    policies = engine.policies
    allocations = {
        (sku, channel): (exclusive, set_by(a))
        for sku, by_channel in policies.allocations.items()
        for channel, (exclusive, a) in by_channel.items()
    }
    # The engine keeps a removed allocation's pool at zero, as a place for deltas to
    # land; a pool without an allocation must be exactly that.
    pools = {
        pair: units
        for pair, units in policies.pools.items()
        if pair in allocations or units != 0
    }
    # Likewise a removed supply's figure stays behind at zero.
    inbound = {
        at: units
        for at, units in policies.inbound.items()
        if at in policies.inbound_eta or units != 0
    }
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
        allocations=allocations,
        pools=pools,
        controls={
            control.control_id: control_view(control)
            for control in policies.active_controls(now_us)
        },
        inbound=inbound,
        inbound_eta={
            at: (eta_us, set_by(a)) for at, (eta_us, a) in policies.inbound_eta.items()
        },
        preorder_channels={
            channel: set_by(a) for channel, a in policies.preorder_channels.items()
        },
    )


def engine_allocations(engine: Engine) -> dict[Pair, AllocationView]:
    views: dict[Pair, AllocationView] = {}
    for sku, channel in PAIRS:
        cap, has_allocation = engine.channel_cap(sku, channel)
        remaining = engine.allocation_remaining(sku, channel)
        views[(sku, channel)] = AllocationView(remaining, cap, has_allocation)
    return views


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
        assert position.on_hand_pending == 0, f"{where}: {position} after every write"
        assert position.held == held_by_lines.pop(at, 0), f"{where}: {position}"
    assert not held_by_lines, f"{where}: lines hold unknown positions {held_by_lines}"
    assert not any(engine.policies.inbound_pending.values()), where
    for at, units in engine.policies.inbound.items():
        assert units >= 0, f"{where}: inbound {at} is {units}"


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
            on_hand_max=LIMITS.on_hand_max,
            ttl_default_s=LIMITS.ttl_default_s,
            control_duration_max_s=LIMITS.control_duration_max_s,
        )
        self.to_model: dict[str, str] = {}
        self.sent: list[Command] = []
        # The id of every control a SetControl asked for, set or refused.
        self.control_ids: list[str] = []
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
            elif self.rng.random() < CLOCK_STEP_SHARE:
                self.clock.advance(self.rng.choice(CLOCK_STEPS_S))
            if self.step_name == "tick":
                touched = self.tick()
            elif self.step_name == "burst":
                touched = self.burst()
            elif self.step_name == "retune":
                touched = self.retune()
            else:
                touched = self.send_one()
            self.compare_state(touched)

    def send_one(self) -> list[str]:
        command = self.make(self.step_name)
        self.sent.append(command)
        if isinstance(command, SetControl):
            self.control_ids.append(f"{command.actor}:{command.change_id}")
        self.send(command)
        target = getattr(command, "reservation_id", "")
        return [target] if target in self.to_model else []

    def burst(self) -> list[str]:
        """Several reservation requests of one channel at one instant; the reservations
        they make are active, so `compare_state` looks at them anyway."""
        channel = self.rng.choice(CHANNELS)
        for _ in range(self.rng.randint(2, BURST_REQUESTS_MAX)):
            command = self.reserve(channel=channel)
            self.sent.append(command)
            self.send(command)
        return []

    def retune(self) -> list[str]:
        """Lift a control in force and at once set another of the same kind and target,
        as an operator changes a throttle's rate: the overlap rule asks for just that.
        A new throttle must start with a full bucket of its own."""
        in_force = self.model.policies.in_force(self.clock.now_us()).controls
        if not in_force:
            return self.send_one()
        # Throttles first: their buckets are what a retune can get wrong.
        throttles = [
            cid for cid, c in in_force.items() if c.kind is ControlKind.THROTTLE
        ]
        control_id = self.rng.choice(throttles or sorted(in_force))
        actor = self.rng.choice(ACTORS)
        lift = LiftControl(actor, self.key("chg-"), control_id)
        replacement = self.control(actor, self.key("chg-"), like=in_force[control_id])
        for command in (lift, replacement):
            self.sent.append(command)
            self.send(command)
        self.control_ids.append(f"{actor}:{replacement.change_id}")
        return []

    def make(self, name: str) -> Command:
        if name == "set_on_hand":
            return self.set_on_hand()
        if name == "adjust":
            return self.adjust()
        if name == "retune":
            return self.control(self.rng.choice(ACTORS), self.key("chg-"))
        if name == "reserve" or (name in {"retry", "reuse_key"} and not self.sent):
            return self.reserve()
        if name == "retry":
            return self.rng.choice(self.sent)
        if name == "reuse_key":
            return self.reuse_key(self.rng.choice(self.sent))
        if name == "unknown_reservation":
            names = ("confirm", "release", "extend", "move")
            return self.change(self.rng.choice(names))
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
        """One to three adjustments, now and then twice at one position; receipts are
        often aimed at positions with inbound supply. Supply at a position outside the
        catalogue is never received, so the unknown sku and location stay unstocked."""
        adjustments: list[Adjustment] = []
        expected = sorted(at for at in self.model.policies.inbound if at in POSITIONS)
        at = self.rng.choice(POSITIONS)
        for _ in range(self.rng.randint(1, 3)):
            if expected and self.rng.random() < AIMED_RECEIPT_SHARE:
                at = self.rng.choice(expected)
                delta = self.rng.randint(1, RECEIPT_UNITS_MAX)
                reason = AdjustmentReason.RECEIPT
            else:
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
        """A valid policy change; removals, a group in use, an unknown group, controls
        that overlap and lifts of controls not in force among them."""
        if name == "allocation":
            return self.allocation(actor, change_id)
        if name == "control":
            return self.control(actor, change_id)
        if name == "lift":
            return LiftControl(actor, change_id, self.control_to_lift())
        if name == "inbound":
            return self.inbound(actor, change_id)
        if name == "preorders":
            allowed = self.rng.random() < PREORDERS_ALLOWED_SHARE
            return SetChannelPreorders(
                actor, change_id, self.rng.choice(CHANNELS), allowed
            )
        return self.setting_change(name, actor, change_id)

    def inbound(self, actor: str, change_id: str) -> SetInboundSupply:
        """Supplies at one to three distinct positions: new ones, replacements of
        entries receipts have used up in part, and removals, some of entries that do
        not exist. A removal carries no ETA now and then, as it needs none."""
        rng = self.rng
        places = list(POSITIONS)
        if rng.random() < UNSTOCKED_INBOUND_SHARE:
            places += [(UNKNOWN_SKU, LOCATIONS[0]), (SKUS[0], UNKNOWN_LOCATION)]
        supplies: list[InboundSupply] = []
        for sku, location in rng.sample(places, k=rng.randint(1, 3)):
            units = 0
            if rng.random() >= REMOVAL_SHARE:
                units = rng.randint(1, INBOUND_UNITS_MAX)
            eta_us = self.clock.now_us() + rng.randint(1, INBOUND_ETA_MAX_S) * US_PER_S
            if not units and rng.random() < 0.5:
                eta_us = 0
            supplies.append(InboundSupply(sku, location, units, eta_us))
        return SetInboundSupply(actor, change_id, tuple(supplies))

    def setting_change(self, name: str, actor: str, change_id: str) -> PolicyCommand:
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

    def allocation(self, actor: str, change_id: str) -> SetChannelAllocation:
        levels: list[AllocationLevel] = []
        for sku, channel in self.rng.sample(PAIRS, k=self.rng.randint(1, 2)):
            units = 0
            if self.rng.random() >= REMOVAL_SHARE:
                units = self.rng.randint(1, ALLOCATION_UNITS_MAX)
            exclusive = self.rng.random() < EXCLUSIVE_SHARE
            levels.append(AllocationLevel(sku, channel, units, exclusive))
        return SetChannelAllocation(actor, change_id, tuple(levels))

    def control(
        self, actor: str, change_id: str, *, like: ControlView | None = None
    ) -> SetControl:
        """A control of a random kind, setting only the fields its kind uses. Targets
        come from a small set, and now and then repeat one in force, so that overlaps
        come up; `like` names a control whose kind and target to take."""
        rng = self.rng
        kind = rng.choice(list(ControlKind))
        target = (
            rng.choice(CHANNELS) if kind is not ControlKind.RAISE_SAFETY else "",
            rng.choice(("", *SKUS)) if kind is not ControlKind.THROTTLE else "",
            rng.choice(("", *LOCATIONS)) if kind is ControlKind.RAISE_SAFETY else "",
        )
        in_force = self.model.policies.in_force(self.clock.now_us()).controls
        if like is None and in_force and rng.random() < OVERLAP_SHARE:
            like = in_force[rng.choice(sorted(in_force))]
        if like is not None:
            kind = like.kind
            target = (like.channel, like.sku, like.location)

        units = percent = rate_per_s = 0
        if kind is ControlKind.RAISE_SAFETY:
            percent = rng.choice(RAISE_PERCENTS)
            # A raise needs units or a percent.
            units = rng.randint(0 if percent else 1, RAISE_UNITS_MAX)
        if kind is ControlKind.THROTTLE:
            rate_per_s = rng.choice(THROTTLE_RATES_PER_S)
        channel, sku, location = target
        return SetControl(
            actor=actor,
            change_id=change_id,
            kind=kind,
            channel=channel,
            sku=sku,
            location=location,
            units=units,
            percent=percent,
            rate_per_s=rate_per_s,
            until_us=self.until_us(),
            reason=f"{kind.value} drill",
        )

    def until_us(self) -> int:
        """The end of a control's time box: mostly ahead by a little or a lot, now and
        then already past, too far ahead, or exactly as far as allowed."""
        now_us = self.clock.now_us()
        longest_us = LIMITS.control_duration_max_s * US_PER_S
        draw = self.rng.random()
        if draw < TIME_BOX_IN_PAST_SHARE:
            return now_us - self.rng.choice((0, US_PER_S))
        draw -= TIME_BOX_IN_PAST_SHARE
        if draw < TIME_BOX_TOO_LONG_SHARE:
            return now_us + longest_us + self.rng.choice((1, US_PER_S))
        draw -= TIME_BOX_TOO_LONG_SHARE
        if draw < TIME_BOX_LONGEST_SHARE:
            return now_us + longest_us
        return now_us + int(self.rng.choice(TIME_BOXES_S) * US_PER_S)

    def control_to_lift(self) -> str:
        """A control id to lift; one never set has change id 0, as ids count from 1."""
        if not self.control_ids or self.rng.random() < UNKNOWN_CONTROL_SHARE:
            return f"{self.rng.choice(ACTORS)}:chg-0"
        in_force = self.model.policies.in_force(self.clock.now_us()).controls
        if in_force and self.rng.random() < IN_FORCE_LIFT_SHARE:
            return self.rng.choice(sorted(in_force))
        return self.rng.choice(self.control_ids)

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
        if name == "move":
            return self.move(request_id, reservation_id)
        assert name == "fulfil_part", name
        return Fulfill(request_id, reservation_id, self.part_lines(reservation_id))

    def move(self, request_id: str, reservation_id: str) -> Move:
        """Some units of one line to another location; now and then a line the
        reservation lacks, more than the line holds, or a location that never stocked
        anything."""
        rng = self.rng
        if reservation_id in self.to_model and rng.random() >= MOVE_ASTRAY_SHARE:
            line = rng.choice(self.model_view(reservation_id).lines)
            sku, source = line.sku, line.location
            beyond = 1 if rng.random() < MOVE_ASTRAY_SHARE else 0
            quantity = rng.randint(1, max(1, line.quantity_held) + beyond)
        else:
            sku, source = rng.choice(POSITIONS)
            quantity = rng.randint(1, 3)
        target = rng.choice([location for location in LOCATIONS if location != source])
        if rng.random() < UNKNOWN_TARGET_SHARE:
            target = UNKNOWN_LOCATION
        return Move(request_id, reservation_id, sku, source, target, quantity)

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
        name = self.rng.choice(("confirm", "release", "fulfil", "extend", "move"))
        return self.change(name, request_id=earlier.request_id)

    # Deciding ----------------------------------------------------------------------------

    def for_model(self, command: Command) -> Command:
        if isinstance(command, Confirm | Release | Fulfill | Extend | Move):
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
        now_us = self.clock.now_us()
        assert engine_positions(self.engine) == self.model.positions(), where
        assert engine_policies(
            self.engine, now_us=now_us
        ) == self.model.policies.in_force(now_us), where
        assert engine_allocations(self.engine) == self.model.allocation_views(
            PAIRS, now_us=now_us
        ), where
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
        expected = self.model.channel_views(channel, now_us=self.clock.now_us())
        assert got == expected, f"{self.where()}: {channel!r}"

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


def recover(
    comparison: Comparison, checkpoint: Checkpoint, rng: random.Random
) -> Engine:
    """A new engine from the checkpoint, the later records (shards interleaved as `rng`
    says) and the request log."""
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
    for record in interleave(later, rng):
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
    now_us = comparison.clock.now_us()
    assert engine_policies(recovered, now_us=now_us) == engine_policies(
        original, now_us=now_us
    ), where
    # Controls whose time box ended are kept until pruned, and recovered as they were.
    assert recovered.policies.controls == original.policies.controls, where
    # Inbound figures are sums of deltas: shards replayed in any order must agree.
    assert _nonzero(recovered.policies.inbound) == _nonzero(
        original.policies.inbound
    ), where
    assert recovered.policies.inbound_eta == original.policies.inbound_eta, where
    assert (
        recovered.policies.preorder_channels == original.policies.preorder_channels
    ), where
    assert engine_allocations(recovered) == engine_allocations(original), where
    for channel in VIEWS:
        got = engine_channel_views(recovered, channel)
        assert got == engine_channel_views(original, channel), f"{where}: {channel!r}"
    assert {rid: r.to_json() for rid, r in recovered.reservations.items()} == {
        rid: r.to_json() for rid, r in original.reservations.items()
    }, where

    for command, _ in comparison.journal.requests:
        first = original.decide(command)
        again = recovered.decide(command)
        assert isinstance(first, Replay), f"{where}: {command!r}"
        assert isinstance(again, Replay), f"{where}: {command!r} not replayed"
        assert again.result == first.result, f"{where}: {command!r}"


def _nonzero(figures: dict[At, int]) -> dict[At, int]:
    return {at: units for at, units in figures.items() if units}


def check_buckets_start_full(comparison: Comparison, checkpoint: Checkpoint) -> None:
    """Throttle buckets are not durable: on an engine recovered for the purpose, each
    throttled channel may make as many requests at once as its rate, and no more."""
    where = f"{comparison.where()} after recovery"
    probe = recover(comparison, checkpoint, random.Random(comparison.step_index))
    now_us = comparison.clock.now_us()
    for throttle in comparison.model.controls_in_force(ControlKind.THROTTLE, now_us):
        line = ReserveLine(SKUS[0], 1, location=LOCATIONS[0])
        for index in range(throttle.rate_per_s + 1):
            command = Reserve(f"probe-{index}", throttle.channel, (line,))
            try:
                decision = probe.decide(command)
            except EngineError as error:
                refused = (error.kind, error.reason)
                assert refused == (ErrorKind.RESOURCE_EXHAUSTED, "CHANNEL_THROTTLED")
                assert index == throttle.rate_per_s, f"{where}: {throttle} refused"
                continue
            assert index < throttle.rate_per_s, f"{where}: {throttle} let one more by"
            assert isinstance(decision, Decision), f"{where}: {command!r}"
            probe.mark_durable(decision)


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
            recovered = recover(comparison, checkpoint, comparison.rng)
        except InvariantBroken as error:
            raise AssertionError(f"{comparison.where()}: recovery: {error}") from error
        compare_recovered(comparison, recovered)
        check_buckets_start_full(comparison, checkpoint)
        # From a second on, the original's buckets are full too and both engines must
        # decide alike.
        comparison.clock.advance(BUCKET_REFILL_S)
        comparison.shadow = recovered
        comparison.run(RECOVERY_STEPS_AFTER)
        comparison.compare_all()
