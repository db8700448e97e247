"""Available-to-sell policies: safety stock, channel buffers, location groups and the
locations a channel sources from by default.

Design note. Policies are plain state beside the positions. A change is validated and
decided like any command, written as a "policy" record and applied here by `apply`,
both when it is decided and when recovery replays it, so the two paths cannot differ.
Every policy record goes to shard 0's stream: changes to the same setting must replay
in the order they were made, and policy changes are rare enough that one stream is no
bottleneck.

What a channel may hold at a position:
    on-hand - held - withheld - safety stock - the channel's buffer, never below zero.
Safety stock protects units for stores and mistakes in counts; it applies to every
channel. The buffer is held back from one channel at every position it draws from, for
channels whose listings lag behind stockward.

Channel allocations. An allocation gives a channel a pool of units of one sku, at the
locations of one location group or at every location (group ""): its scope. The
channel's holds in the scope draw on it, releases and expiries give back (once
durable), fulfilment consumes it for good; holds outside the scope do not touch it. A
ceiling allocation only limits the channel; an exclusive one also ring-fences its
remaining units: every other channel must leave at least that many units of the sku
free within the scope. The pool is kept as a sum of deltas (setting an allocation
records the change from the pool it found), so records of different shards replay in
any order to the same pool.

The scopes of one sku's allocations are identical or disjoint, never partly
overlapping, and a group that scopes an allocation cannot change its set of
locations. That keeps every check local: at a location, a channel has at most one
allocation of its own, and the ring fences it must respect all share one scope, so
"free units in that scope, less the fences" is exact. Partly overlapping fences would
need a flow computation to decide, for little gain.

Continuity controls are time-boxed: each is in force from when it was set until its
`until_us`, by the clock, so it ends on its own without a record. Suppressing a channel
makes it see zero and its lines come up CHANNEL_SUPPRESSED; throttling limits its
reservations per second; raising safety stock adds units or a percentage of on-hand
to the safety stock of a sku, a location or everything.

Inbound supply. Expected receipts per (sku, location), with an ETA, set by the ERP or
an operator. Channels allowed to take pre-orders may hold against them: for those
channels a position offers on-hand plus inbound, less everything held. Holds are not
split into "from stock" and "from inbound": on-hand covers holds first, so a receipt
goes to the waiting pre-orders before any other channel sees it, with no conversion
step. A receipt booked with AdjustStock (reason RECEIPT) takes its units off the
inbound it fulfils. Like pools, inbound units are kept as a sum of deltas so that
records of different shards replay in any order to the same figure.

The channel registry. While it is empty every channel name is accepted, so a new
installation works before anyone registers its channels. Once it names any channel,
reserves from other channels and policies naming them are refused (a mistyped name
would otherwise escape the channel's allocation, buffer and suppression), and a
channel stays registered while a policy in force names it.

Known shortcoming: controls are scanned linearly on each availability check,
fine for the handful an incident brings, not for thousands.
"""

import dataclasses
import enum
import math
from typing import Any

from server.engine.model import Position


@dataclasses.dataclass(frozen=True, slots=True)
class Attribution:
    """Who set a policy, when, and under which change id."""

    actor: str
    change_id: str
    at_us: int


@dataclasses.dataclass(frozen=True, slots=True)
class Sourcing:
    """Where a channel's lines without a location are held: a location group in
    priority order, optionally split across its locations."""

    group: str
    allow_split: bool


class ControlKind(enum.Enum):
    SUPPRESS = "suppress"
    THROTTLE = "throttle"
    RAISE_SAFETY = "raise_safety"


@dataclasses.dataclass(frozen=True, slots=True)
class Control:
    control_id: str
    kind: ControlKind
    # SUPPRESS and THROTTLE: the channel.
    channel: str
    # SUPPRESS and RAISE_SAFETY: one sku, or "" for all.
    sku: str
    # RAISE_SAFETY: one location, or "" for all.
    location: str
    # RAISE_SAFETY: added units, and added percent of on-hand (rounded up).
    units: int
    percent: int
    # THROTTLE: reservations per second.
    rate_per_s: int
    until_us: int
    reason: str
    attribution: Attribution
    # Lifted early. Kept until its time box ends so that its id cannot be reused to
    # set it again in the meantime.
    lifted: bool = False

    def is_active(self, now_us: int) -> bool:
        return not self.lifted and self.attribution.at_us <= now_us < self.until_us

    def covers(self, *, channel: str = "", sku: str = "", location: str = "") -> bool:
        """Whether this control's target includes the given channel, sku and
        location (blank targets match all)."""
        return (
            (not self.channel or self.channel == channel)
            and (not self.sku or self.sku == sku)
            and (not self.location or self.location == location)
        )

    def to_json(self) -> list[Any]:
        return [
            self.control_id,
            self.kind.value,
            self.channel,
            self.sku,
            self.location,
            self.units,
            self.percent,
            self.rate_per_s,
            self.until_us,
            self.reason,
            *_attr(self.attribution),
            self.lifted,
        ]

    @classmethod
    def from_json(cls, fields: list[Any]) -> "Control":
        control_id, kind, channel, sku, location, units, percent, rate, until = fields[
            :9
        ]
        reason = fields[9]
        return cls(
            control_id,
            ControlKind(kind),
            channel,
            sku,
            location,
            units,
            percent,
            rate,
            until,
            reason,
            Attribution(*fields[10:13]),
            lifted=bool(fields[13]) if len(fields) > 13 else False,
        )


@dataclasses.dataclass(slots=True)
class Policies:
    # (sku, location) -> units; a location's default under sku "".
    safety_stock: dict[tuple[str, str], tuple[int, Attribution]] = dataclasses.field(
        default_factory=dict
    )
    # (channel, sku) -> units; the channel's default under sku "".
    buffers: dict[tuple[str, str], tuple[int, Attribution]] = dataclasses.field(
        default_factory=dict
    )
    groups: dict[str, tuple[tuple[str, ...], Attribution]] = dataclasses.field(
        default_factory=dict
    )
    sourcing: dict[str, tuple[Sourcing, Attribution]] = dataclasses.field(
        default_factory=dict
    )
    # sku -> (channel, group) -> (exclusive, attribution) for allocations in force;
    # group "" spans every location.
    allocations: dict[str, dict[tuple[str, str], tuple[bool, Attribution]]] = (
        dataclasses.field(default_factory=dict)
    )
    # (sku, channel, group) -> units in the pool not yet fulfilled, held or free. Kept
    # for removed allocations too (at zero) so that deltas always have a place to land.
    pools: dict[tuple[str, str, str], int] = dataclasses.field(default_factory=dict)
    controls: dict[str, Control] = dataclasses.field(default_factory=dict)
    # (sku, location) -> units expected (a sum of deltas), and -> (eta_us,
    # attribution) while an entry is in force.
    inbound: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    inbound_eta: dict[tuple[str, str], tuple[int, Attribution]] = dataclasses.field(
        default_factory=dict
    )
    # Inbound changes decided but not durable (receipts), as pool_pending.
    inbound_pending: dict[tuple[str, str], int] = dataclasses.field(
        default_factory=dict
    )
    # Channels that may hold against inbound supply.
    preorder_channels: dict[str, Attribution] = dataclasses.field(default_factory=dict)
    # The channel registry; empty accepts every channel name.
    channels: dict[str, Attribution] = dataclasses.field(default_factory=dict)
    # Pool changes decided but not yet durable (fulfilments), kept out of the delta a
    # new allocation records. Not part of checkpoints: zero whenever one is taken.
    pool_pending: dict[tuple[str, str, str], int] = dataclasses.field(
        default_factory=dict
    )

    # Reading ----------------------------------------------------------------------------

    def safety(self, position: Position, now_us: int) -> int:
        """Safety stock at a position: its level (or the location's default) plus
        any raise in force."""
        level = self.safety_stock.get((position.sku, position.location))
        if level is None:
            level = self.safety_stock.get(("", position.location))
        units = level[0] if level else 0
        for control in self.controls.values():
            if (
                control.kind is ControlKind.RAISE_SAFETY
                and control.is_active(now_us)
                and control.covers(sku=position.sku, location=position.location)
            ):
                units += control.units
                units += math.ceil(max(0, position.on_hand) * control.percent / 100)
        return units

    def is_suppressed(self, channel: str, sku: str, now_us: int) -> bool:
        return bool(channel) and any(
            control.kind is ControlKind.SUPPRESS
            and control.is_active(now_us)
            and control.covers(channel=channel, sku=sku)
            for control in self.controls.values()
        )

    def throttle_of(self, channel: str, now_us: int) -> Control | None:
        for control in self.controls.values():
            if (
                control.kind is ControlKind.THROTTLE
                and control.channel == channel
                and control.is_active(now_us)
            ):
                return control
        return None

    def active_controls(self, now_us: int) -> list[Control]:
        return [c for c in self.controls.values() if c.is_active(now_us)]

    def buffer(self, channel: str, sku: str) -> int:
        if not channel:
            return 0
        level = self.buffers.get((channel, sku))
        if level is None:
            level = self.buffers.get((channel, ""))
        return level[0] if level else 0

    def available(self, position: Position, channel: str, now_us: int) -> int:
        """What `channel` ("" for no channel) may still be promised at a position."""
        if self.is_suppressed(channel, position.sku, now_us):
            return 0
        free = position.on_hand - position.held - position.withheld
        free -= self.safety(position, now_us)
        free -= self.buffer(channel, position.sku)
        if channel in self.preorder_channels:
            free += self.inbound_units(position.sku, position.location)
        return max(0, free)

    def inbound_units(self, sku: str, location: str) -> int:
        return max(0, self.inbound.get((sku, location), 0))

    def add_inbound(self, sku: str, location: str, delta: int) -> None:
        self.inbound[(sku, location)] = self.inbound.get((sku, location), 0) + delta

    def is_known(self, channel: str) -> bool:
        return not self.channels or channel in self.channels

    def channels_named(self, now_us: int) -> set[str]:
        """Channels that policies in force name: they must stay registered."""
        named = {channel for channel, _ in self.buffers}
        named.update(self.sourcing, self.preorder_channels)
        for by_scope in self.allocations.values():
            named.update(channel for channel, _ in by_scope)
        named.update(c.channel for c in self.active_controls(now_us) if c.channel)
        return named

    def sourcing_of(self, channel: str) -> tuple[Sourcing, tuple[str, ...]] | None:
        entry = self.sourcing.get(channel)
        if entry is None:
            return None
        sourcing = entry[0]
        return sourcing, self.groups[sourcing.group][0]

    # Changing ---------------------------------------------------------------------------

    def apply(self, change: dict[str, Any], attribution: Attribution) -> None:
        """Apply one recorded change. Zero levels, empty groups and empty sourcing
        groups remove the setting."""
        kind = change["kind"]
        if kind == "safety_stock":
            for sku, location, units in change["levels"]:
                _set(self.safety_stock, (sku, location), units, attribution)
        elif kind == "buffer":
            for channel, sku, units in change["buffers"]:
                _set(self.buffers, (channel, sku), units, attribution)
        elif kind == "group":
            locations = tuple(change["locations"])
            _put(self.groups, change["name"], (locations, attribution), bool(locations))
        elif kind == "allocation":
            self._apply_allocations(change["allocations"], attribution)
        elif kind == "control":
            control = Control.from_json([*change["control"], *_attr(attribution)])
            self.controls[control.control_id] = control
        elif kind == "lift":
            lifted = self.controls.get(change["control_id"])
            if lifted is not None:
                self.controls[lifted.control_id] = dataclasses.replace(
                    lifted, lifted=True
                )
        elif kind == "inbound":
            for sku, location, units, eta_us, delta in change["supplies"]:
                self.add_inbound(sku, location, delta)
                _put(self.inbound_eta, (sku, location), (eta_us, attribution), units)
        elif kind == "preorders":
            channel = change["channel"]
            _put(self.preorder_channels, channel, attribution, change["allowed"])
        elif kind == "channels":
            for channel, registered in change["channels"]:
                _put(self.channels, channel, attribution, registered)
        elif kind == "sourcing":
            sourcing = Sourcing(change["group"], change["allow_split"])
            entry = (sourcing, attribution)
            _put(self.sourcing, change["channel"], entry, bool(change["group"]))
        else:
            raise ValueError(f"unknown policy change {kind!r}")

    def _apply_allocations(
        self, levels: list[list[Any]], attribution: Attribution
    ) -> None:
        for sku, channel, group, units, exclusive, delta in levels:
            self.add_to_pool((sku, channel, group), delta)
            by_scope = self.allocations.setdefault(sku, {})
            _put(by_scope, (channel, group), (exclusive, attribution), units)
            if not by_scope:
                del self.allocations[sku]

    def in_scope(self, group: str, location: str) -> bool:
        """Whether an allocation scoped to `group` covers `location`."""
        return not group or location in self.groups[group][0]

    def allocation_at(self, sku: str, channel: str, location: str) -> str | None:
        """The group of the channel's allocation of `sku` that covers `location`, if
        any (at most one does: a channel's scopes of one sku are disjoint)."""
        for other, group in self.allocations.get(sku, ()):
            if other == channel and self.in_scope(group, location):
                return group
        return None

    def fence_at(self, sku: str, channel: str, location: str) -> str | None:
        """The scope of the other channels' exclusive allocations of `sku` that cover
        `location`, if any (those that do all share one scope)."""
        for (other, group), (exclusive, _) in self.allocations.get(sku, {}).items():
            if exclusive and other != channel and self.in_scope(group, location):
                return group
        return None

    def add_to_pool(self, key: tuple[str, str, str], delta: int) -> None:
        self.pools[key] = self.pools.get(key, 0) + delta

    def durable_pool(self, key: tuple[str, str, str]) -> int:
        return self.pools.get(key, 0) - self.pool_pending.get(key, 0)

    def groups_in_use(self) -> set[str]:
        return {sourcing.group for sourcing, _ in self.sourcing.values()}

    def allocations_scoped_by(self, group: str) -> list[tuple[str, str]]:
        """(sku, channel) of the allocations whose scope is `group`."""
        return [
            (sku, channel)
            for sku, by_scope in self.allocations.items()
            for channel, scope in by_scope
            if scope == group
        ]

    # Checkpoints ------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "safety_stock": [
                [*key, units, *_attr(a)]
                for key, (units, a) in self.safety_stock.items()
            ],
            "buffers": [
                [*key, units, *_attr(a)] for key, (units, a) in self.buffers.items()
            ],
            "groups": [
                [name, list(locations), *_attr(a)]
                for name, (locations, a) in self.groups.items()
            ],
            "sourcing": [
                [channel, s.group, s.allow_split, *_attr(a)]
                for channel, (s, a) in self.sourcing.items()
            ],
            "allocations": [
                [sku, channel, group, exclusive, *_attr(a)]
                for sku, by_scope in self.allocations.items()
                for (channel, group), (exclusive, a) in by_scope.items()
            ],
            "pools": [[*key, units] for key, units in self.pools.items()],
            "controls": [control.to_json() for control in self.controls.values()],
            "inbound": [[*key, units] for key, units in self.inbound.items()],
            "inbound_eta": [
                [*key, eta_us, *_attr(a)]
                for key, (eta_us, a) in self.inbound_eta.items()
            ],
            "preorder_channels": [
                [channel, *_attr(a)] for channel, a in self.preorder_channels.items()
            ],
            "channels": [[channel, *_attr(a)] for channel, a in self.channels.items()],
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> "Policies":
        policies = cls()
        for sku, location, units, *attr in body.get("safety_stock", []):
            policies.safety_stock[(sku, location)] = (units, Attribution(*attr))
        for channel, sku, units, *attr in body.get("buffers", []):
            policies.buffers[(channel, sku)] = (units, Attribution(*attr))
        for name, locations, *attr in body.get("groups", []):
            policies.groups[name] = (tuple(locations), Attribution(*attr))
        for channel, group, allow_split, *attr in body.get("sourcing", []):
            sourcing = Sourcing(group, allow_split)
            policies.sourcing[channel] = (sourcing, Attribution(*attr))
        for sku, channel, group, exclusive, *attr in body.get("allocations", []):
            by_scope = policies.allocations.setdefault(sku, {})
            by_scope[(channel, group)] = (exclusive, Attribution(*attr))
        for sku, channel, group, units in body.get("pools", []):
            policies.pools[(sku, channel, group)] = units
        for fields in body.get("controls", []):
            control = Control.from_json(fields)
            policies.controls[control.control_id] = control
        for sku, location, units in body.get("inbound", []):
            policies.inbound[(sku, location)] = units
        for sku, location, eta_us, *attr in body.get("inbound_eta", []):
            policies.inbound_eta[(sku, location)] = (eta_us, Attribution(*attr))
        for channel, *attr in body.get("preorder_channels", []):
            policies.preorder_channels[channel] = Attribution(*attr)
        for channel, *attr in body.get("channels", []):
            policies.channels[channel] = Attribution(*attr)
        return policies

    def prune_controls(self, now_us: int) -> int:
        """Forget controls whose time box has ended."""
        ended = [cid for cid, c in self.controls.items() if c.until_us <= now_us]
        for control_id in ended:
            del self.controls[control_id]
        return len(ended)


def _set(
    table: dict[tuple[str, str], tuple[int, Attribution]],
    key: tuple[str, str],
    units: int,
    attribution: Attribution,
) -> None:
    if units:
        table[key] = (units, attribution)
    else:
        table.pop(key, None)


def _put(table: dict[Any, Any], key: Any, value: Any, is_set: Any) -> None:
    """Set an entry, or remove it when the change clears it."""
    if is_set:
        table[key] = value
    else:
        table.pop(key, None)


def _attr(attribution: Attribution) -> list[Any]:
    return [attribution.actor, attribution.change_id, attribution.at_us]
