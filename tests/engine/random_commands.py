"""Random commands for the engine-vs-model sequences, drawn with the model's state in
view so that they reach the interesting cases: holds competing for a position, policies
that bite, controls that overlap, receipts beyond what was expected, counts that leave
fewer units than are held.

Commands name the engine's reservation ids; the comparison translates them for the
model. Every draw comes from the sequence's one random generator, in a fixed order, so
that a seed replays the same sequence.

Inbound supply is set, replaced and removed at positions that are stocked and now and
then at ones that are not; receipts are aimed at positions with supply often enough
that they use some of it up, all of it, and more than was expected.

Location groups are drawn mostly from a few regions, some of which share no location,
so that one sku's allocations can be scoped to two groups; the other draws overlap,
and so do groups and the scope of every location, so that overlapping scopes are asked
for and refused. A group that scopes an allocation is now and then reordered, changed
or removed. The channel registry is filled and emptied again, sometimes with just the
channels that policies name and a channel no request uses, which shuts out the other
channel: its reserves and policies are then refused until it is registered again.
"""

import dataclasses
import itertools
import random

from server.clock import FakeClock
from server.engine.commands import (
    Adjustment,
    AdjustmentReason,
    AdjustStock,
    AllocationLevel,
    BufferLevel,
    ChannelEntry,
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
    ReconcileOnHand,
    Release,
    Reserve,
    ReserveLine,
    SafetyLevel,
    SetChannelAllocation,
    SetChannelBuffer,
    SetChannelPreorders,
    SetChannels,
    SetChannelSourcing,
    SetControl,
    SetInboundSupply,
    SetLocationGroup,
    SetOnHand,
    SetSafetyStock,
)
from server.engine.model import ACTIVE_STATES
from server.engine.policy import ControlKind
from tests.engine.catalogue import (
    ACTORS,
    CHANNELS,
    GROUPS,
    LIMITS,
    LOCATIONS,
    PAIRS,
    POSITIONS,
    SKUS,
    SOURCES,
    UNKNOWN_GROUP,
    UNKNOWN_LOCATION,
    UNKNOWN_SKU,
)
from tests.engine.model_views import US_PER_S, ControlView, ReservationView
from tests.engine.reference_model import ReferenceModel

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
# Allocation pools may span every location of a sku, so they run larger than the levels
# above: up to about what one sku has on hand, so that pools and fences both bite.
ALLOCATION_UNITS_MAX = 15
EXCLUSIVE_SHARE = 0.5
# How often an allocation is scoped to a group that was never defined (GROUP_UNKNOWN),
# to every location, or to a scope the sku's allocations already have (which never
# overlaps them); the rest take any group defined, which may overlap (refused).
UNKNOWN_SCOPE_SHARE = 0.03
EVERY_LOCATION_SCOPE_SHARE = 0.1
KNOWN_SCOPE_SHARE = 0.35
# Groups: mostly one of these regions (the first two, and the last two, share no
# location), else any one to three locations, the unstocked one among them.
REGIONS = (
    (LOCATIONS[0],),
    (LOCATIONS[1], LOCATIONS[2]),
    (LOCATIONS[0], LOCATIONS[1]),
    (LOCATIONS[2],),
)
REGION_SHARE = 0.7
# Groups are removed less often than other settings, so that allocations find some.
GROUP_REMOVAL_SHARE = 0.15
# How often a group change aims at a group that scopes an allocation, when one does,
# and then how often it reorders the group's locations (accepted) or removes the group
# (refused); the rest set locations of a region or at random, refused unless they are
# the same set.
SCOPING_GROUP_SHARE = 0.35
SCOPING_GROUP_REORDER_SHARE = 0.4
SCOPING_GROUP_REMOVAL_SHARE = 0.3
# The channel registry: a channel no request or policy names, registered so that the
# registry can be closed to one of the channels the sequences use.
IDLE_CHANNEL = "kiosk"
REGISTRY_CHANNELS = (*CHANNELS, IDLE_CHANNEL)
# How often a registry change tries to empty it (every name accepted again; refused
# while policies name a registered channel), closes it to the channels policies name
# and the idle one, or registers every channel the sequences use; the rest register
# or take out one to three channels at random.
REGISTRY_EMPTY_SHARE = 0.15
REGISTRY_CLOSE_SHARE = 0.25
REGISTRY_OPEN_SHARE = 0.35
REGISTERED_SHARE = 0.6
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
# How often a move aims at a location under another of the channel's pools than its
# source (or under none), when there is one.
ACROSS_SCOPES_SHARE = 0.5
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
# A shortfall leaves a held position with fewer units on hand than it holds: as often
# by a count as by a damage report.
SHORTFALL_COUNT_SHARE = 0.5

# Relative weights of what a step does.
STEP_WEIGHTS = {
    "set_on_hand": 6,
    "adjust": 6,
    "shortfall": 4,
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
    "group": 4,
    "sourcing": 3,
    "allocation": 4,
    "control": 4,
    "lift": 2,
    "retune": 2,
    "inbound": 4,
    "preorders": 2,
    "channels": 3,
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
    "channels",
)


class RandomCommands:
    """Draws the commands of one sequence. `to_model` is the comparison's map from the
    engine's reservation ids to the model's, read to aim changes at reservations."""

    def __init__(
        self,
        *,
        rng: random.Random,
        clock: FakeClock,
        model: ReferenceModel,
        to_model: dict[str, str],
    ) -> None:
        self.rng = rng
        self.clock = clock
        self.model = model
        self.to_model = to_model
        self.sent: list[Command] = []
        # The id of every control a SetControl asked for, set or refused.
        self.control_ids: list[str] = []
        self._serial = itertools.count(1)

    def make(self, name: str) -> Command:
        if name == "set_on_hand":
            return self.set_on_hand()
        if name == "adjust":
            return self.adjust()
        if name == "shortfall":
            return self.shortfall()
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
            return self.change(self.rng.choice(names), is_unknown=True)
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

    def shortfall(self) -> SetOnHand | AdjustStock:
        """A count or a damage report that leaves a held position with fewer units on
        hand than it holds, so that holds there are at risk. Positions with several
        holds come first, and what is left covers at least the oldest of them, so that
        the shortfall falls on some holds and spares others. Without a hold anywhere
        it is an ordinary adjustment."""
        holders = self.model.holders()
        if not holders:
            return self.adjust()

        shared = sorted(at for at, rids in holders.items() if len(rids) > 1)
        at = self.rng.choice(shared or sorted(holders))
        reservations = self.model.reservations
        held = [reservations[rid].lines[at].held for rid in holders[at]]
        left = self.rng.randint(held[0] if shared else 0, sum(held) - 1)
        drop = self.model.on_hand[at] - left
        source = self.rng.choice(SOURCES)
        # Pre-orders may hold more than is on hand already: then only a count will do.
        if drop <= 0 or self.rng.random() < SHORTFALL_COUNT_SHARE:
            count = OnHandCount(at[0], at[1], left)
            return SetOnHand(source, self.key("count-"), (count,))
        damage = Adjustment(at[0], at[1], -drop, AdjustmentReason.DAMAGE)
        return AdjustStock(source, self.key("event-"), (damage,))

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
        if name == "channels":
            return SetChannels(actor, change_id, self.registry_entries())
        if name == "group":
            return self.group(actor, change_id)
        return self.setting_change(name, actor, change_id)

    def registry_entries(self) -> tuple[ChannelEntry, ...]:
        """Register or take out channels: now and then every registered one (or,
        when none is, the channels the sequences use), all but the channels policies
        name (with the idle channel, so that the registry stays closed to any other),
        or every channel the sequences use."""
        rng = self.rng
        registered = sorted(self.model.policies.channels) or CHANNELS
        draw = rng.random()
        if draw < REGISTRY_EMPTY_SHARE:
            return tuple(ChannelEntry(channel, False) for channel in registered)
        draw -= REGISTRY_EMPTY_SHARE
        if draw < REGISTRY_CLOSE_SHARE:
            named = self.model.channels_named(self.clock.now_us())
            return tuple(
                ChannelEntry(channel, channel in named or channel == IDLE_CHANNEL)
                for channel in REGISTRY_CHANNELS
            )
        draw -= REGISTRY_CLOSE_SHARE
        if draw < REGISTRY_OPEN_SHARE:
            return tuple(ChannelEntry(channel, True) for channel in CHANNELS)
        chosen = rng.sample(REGISTRY_CHANNELS, k=rng.randint(1, 3))
        return tuple(
            ChannelEntry(channel, rng.random() < REGISTERED_SHARE) for channel in chosen
        )

    def group(self, actor: str, change_id: str) -> SetLocationGroup:
        """A group set to a region or to any locations, or removed; now and then a
        group that scopes an allocation reordered, changed or removed."""
        rng = self.rng
        scoping = sorted({g for _, _, g in self.model.policies.allocations if g})
        if scoping and rng.random() < SCOPING_GROUP_SHARE:
            name = rng.choice(scoping)
            locations = list(self.model.policies.groups[name][0])
            rng.shuffle(locations)
            draw = rng.random()
            if draw < SCOPING_GROUP_REORDER_SHARE:
                return SetLocationGroup(actor, change_id, name, tuple(locations))
            if draw < SCOPING_GROUP_REORDER_SHARE + SCOPING_GROUP_REMOVAL_SHARE:
                return SetLocationGroup(actor, change_id, name, ())
            return SetLocationGroup(actor, change_id, name, self.group_locations())

        name = rng.choice(GROUPS)
        if rng.random() < GROUP_REMOVAL_SHARE:
            return SetLocationGroup(actor, change_id, name, ())
        return SetLocationGroup(actor, change_id, name, self.group_locations())

    def group_locations(self) -> tuple[str, ...]:
        if self.rng.random() < REGION_SHARE:
            return self.rng.choice(REGIONS)
        choices = [*LOCATIONS, UNKNOWN_LOCATION]
        return tuple(self.rng.sample(choices, k=self.rng.randint(1, 3)))

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
        """One or two allocations; a removal names a scope the channel has, when it
        has one."""
        levels: list[AllocationLevel] = []
        for sku, channel in self.rng.sample(PAIRS, k=self.rng.randint(1, 2)):
            scopes = [
                g
                for s, c, g in self.model.policies.allocations
                if (s, c) == (sku, channel)
            ]
            units, group = 0, self.scope(sku)
            if self.rng.random() >= REMOVAL_SHARE:
                units = self.rng.randint(1, ALLOCATION_UNITS_MAX)
            elif scopes:
                group = self.rng.choice(sorted(scopes))
            exclusive = self.rng.random() < EXCLUSIVE_SHARE
            levels.append(AllocationLevel(sku, channel, units, exclusive, group))
        return SetChannelAllocation(actor, change_id, tuple(levels))

    def scope(self, sku: str) -> str:
        """A group never defined, every location, a scope the sku's allocations have,
        or any group defined (which may overlap the sku's other scopes)."""
        rng = self.rng
        known = sorted({g for s, _, g in self.model.policies.allocations if s == sku})
        defined = sorted(self.model.policies.groups)
        draw = rng.random()
        if draw < UNKNOWN_SCOPE_SHARE:
            return UNKNOWN_GROUP
        draw -= UNKNOWN_SCOPE_SHARE
        if draw < EVERY_LOCATION_SCOPE_SHARE or not defined:
            return ""
        draw -= EVERY_LOCATION_SCOPE_SHARE
        if draw < KNOWN_SCOPE_SHARE and known:
            return rng.choice(known)
        return rng.choice(defined)

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

    def target(self, *, is_unknown: bool) -> str:
        """A reservation to change: mostly active ones, sometimes one that is not, and
        one that does not exist when `is_unknown`."""
        if not self.to_model or is_unknown:
            return self.key("ghost-")
        engine_ids = list(self.to_model)
        active = [
            rid for rid in engine_ids if self.model_view(rid).state in ACTIVE_STATES
        ]
        pool = active if active and self.rng.random() < 0.8 else engine_ids
        return self.rng.choice(pool)

    def model_view(self, engine_id: str) -> ReservationView:
        return self.model.view(self.to_model[engine_id])

    def change(
        self, name: str, *, request_id: str = "", is_unknown: bool = False
    ) -> Command:
        request_id = request_id or self.key("req-")
        reservation_id = self.target(is_unknown=is_unknown)
        if (
            name == "move"
            and not is_unknown
            and self.rng.random() < ACROSS_SCOPES_SHARE
        ):
            reservation_id = self.rng.choice(self.divided() or [reservation_id])
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
        """Some units of one line to another location, often one the channel's pools
        divide from the source; now and then a line the reservation lacks, more than
        the line holds, or a location that never stocked anything."""
        rng = self.rng
        targets: list[str] = []
        if reservation_id in self.to_model and rng.random() >= MOVE_ASTRAY_SHARE:
            view = self.model_view(reservation_id)
            lines = list(view.lines)
            if rng.random() < ACROSS_SCOPES_SHARE:
                lines = [
                    x
                    for x in lines
                    if self.across_scopes(x.sku, view.channel, x.location)
                ] or lines
            line = rng.choice(lines)
            sku, source = line.sku, line.location
            beyond = 1 if rng.random() < MOVE_ASTRAY_SHARE else 0
            quantity = rng.randint(1, max(1, line.quantity_held) + beyond)
            targets = self.across_scopes(sku, view.channel, source)
        else:
            sku, source = rng.choice(POSITIONS)
            quantity = rng.randint(1, 3)
        if not targets or rng.random() >= ACROSS_SCOPES_SHARE:
            targets = [location for location in LOCATIONS if location != source]
        target = rng.choice(targets)
        if rng.random() < UNKNOWN_TARGET_SHARE:
            target = UNKNOWN_LOCATION
        return Move(request_id, reservation_id, sku, source, target, quantity)

    def divided(self) -> list[str]:
        """Active reservations holding units where one of their channel's pools
        applies and some other location lies under another pool or none."""
        found: list[str] = []
        for engine_id in self.to_model:
            view = self.model_view(engine_id)
            if view.state in ACTIVE_STATES and any(
                line.quantity_held
                and self.across_scopes(line.sku, view.channel, line.location)
                for line in view.lines
            ):
                found.append(engine_id)
        return found

    def across_scopes(self, sku: str, channel: str, source: str) -> list[str]:
        """The locations where another of the channel's pools of the sku than at
        `source` applies, or none of them does."""
        own = self.model.own_scope_at
        return [
            location
            for location in LOCATIONS
            if own(sku, channel, location) != own(sku, channel, source)
        ]

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
        if isinstance(earlier, AdjustStock | SetOnHand | ReconcileOnHand):
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
