"""The reference model's state, and every figure derived from it on demand.

Design note. The state is plain dictionaries: on-hand per position, the reservations
with their lines, the policy tables, the answered requests and the throttles' buckets.
No derived number is stored: held units, what a channel may hold, what an allocation
has left in its scope, what allocations let a channel take, which channels policies
name and which holds are at risk are computed from those tables and the clock whenever
they are asked for, so they cannot drift. The rules that change the state live
beside it, one family per module: policy changes in model_policies.py, new holds in
model_reserving.py, and stock and the life of a reservation in reference_model.py.
"""

import dataclasses
import itertools
from collections.abc import Iterator

from server.engine.commands import Command
from server.engine.model import ReservationState
from server.engine.policy import ControlKind
from tests.engine.model_views import (
    US_PER_S,
    AllocationKey,
    At,
    AtRiskView,
    ChannelView,
    ControlView,
    LineView,
    ModelResult,
    PoliciesView,
    PositionView,
    ReservationView,
)

# The states in which a reservation holds units.
ACTIVE = (ReservationState.PENDING, ReservationState.CONFIRMED)


@dataclasses.dataclass(slots=True)
class ModelLine:
    sku: str
    location: str
    reserved: int
    held: int
    fulfilled: int = 0
    released: int = 0


@dataclasses.dataclass(slots=True)
class ModelReservation:
    channel: str
    order_ref: str
    state: ReservationState
    lines: dict[At, ModelLine]
    created_us: int
    updated_us: int
    expires_us: int

    @property
    def held(self) -> int:
        return sum(line.held for line in self.lines.values())


# The kinds of limit an allocation sets in its scope: a channel's own pool, which it
# may not hold beyond, and other channels' ring fences, which it must leave free.
OWN = "own"
FENCE = "fence"
BOTH = (OWN, FENCE)


@dataclasses.dataclass(slots=True)
class Allowance:
    """What allocations let one channel take, beyond each position's free units, per
    (sku, group) scope: what its own pool there has left, and the free units there
    that other channels' ring fences leave it. A scope missing from a table has no
    limit of that kind. A request takes from both as it plans its lines."""

    own: dict[tuple[str, str], int]
    unfenced: dict[tuple[str, str], int]

    def limits(self, sku: str, group: str | None, kinds: tuple[str, ...]) -> list[int]:
        """The limits of the kinds named on the scope `group` (None: no scope)."""
        if group is None:
            return []
        tables = {OWN: self.own, FENCE: self.unfenced}
        key = (sku, group)
        return [tables[kind][key] for kind in kinds if key in tables[kind]]

    def take(self, sku: str, group: str | None, units: int) -> None:
        if group is None:
            return
        for table in (self.own, self.unfenced):
            if (sku, group) in table:
                table[(sku, group)] -= units


class ModelState:
    """The state and its reads; the families of rules subclass it to decide."""

    def __init__(
        self, *, on_hand_max: int, ttl_default_s: int, control_duration_max_s: int
    ) -> None:
        self.on_hand: dict[At, int] = {}
        self.reservations: dict[str, ModelReservation] = {}
        self._on_hand_max = on_hand_max
        self._ttl_default_s = ttl_default_s
        self._control_duration_max_us = control_duration_max_s * US_PER_S
        self._ids = itertools.count(1)
        # Answered requests by key: the command with its key blanked, and the answer.
        self._answers: dict[tuple[str, str, str], tuple[Command, ModelResult]] = {}
        self.policies = PoliciesView({}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {})
        # Throttle control id -> (millionths of a token in its bucket, when counted).
        self._tokens: dict[str, tuple[int, int]] = {}

    # Reads -------------------------------------------------------------------------------

    def _active(self) -> Iterator[ModelReservation]:
        return (r for r in self.reservations.values() if r.state in ACTIVE)

    def held(self) -> dict[At, int]:
        held: dict[At, int] = {}
        for reservation in self._active():
            for at, line in reservation.lines.items():
                held[at] = held.get(at, 0) + line.held
        return held

    def held_by_channel(self) -> dict[tuple[str, str, str], int]:
        """Units each channel holds, per (sku, channel, location)."""
        held: dict[tuple[str, str, str], int] = {}
        for reservation in self._active():
            for line in reservation.lines.values():
                key = (line.sku, reservation.channel, line.location)
                held[key] = held.get(key, 0) + line.held
        return held

    def positions(self) -> dict[At, PositionView]:
        held = self.held()
        return {
            at: PositionView(
                on_hand=on_hand,
                held=held.get(at, 0),
                available_to_sell=max(0, on_hand - held.get(at, 0)),
            )
            for at, on_hand in self.on_hand.items()
        }

    def controls_in_force(self, kind: ControlKind, now_us: int) -> list[ControlView]:
        return [
            control
            for control in self.policies.controls.values()
            if control.kind is kind and control.is_active(now_us)
        ]

    def _safety_stock(self, at: At, raises: list[ControlView]) -> int:
        """A sku's own level, else the location's default, else none; plus, for every
        raise in force over the position, its units and its percent of on-hand
        rounded up."""
        sku, location = at
        units = 0
        for key in (at, ("", location)):
            if key in self.policies.safety_stock:
                units = self.policies.safety_stock[key][0]
                break
        on_hand = self.on_hand.get(at, 0)
        for raised in raises:
            if raised.sku in ("", sku) and raised.location in ("", location):
                units += raised.units + _percent_rounded_up(on_hand, raised.percent)
        return units

    def is_suppressed(self, channel: str, sku: str, *, now_us: int) -> bool:
        suppressions = self.controls_in_force(ControlKind.SUPPRESS, now_us)
        return _is_suppressed(channel, sku, suppressions)

    def buffer(self, channel: str, sku: str) -> int:
        """A channel's buffer for the sku, else its default; no channel, no buffer."""
        for key in ((channel, sku), (channel, "")):
            if key in self.policies.buffers:
                return self.policies.buffers[key][0]
        return 0

    def channel_views(self, channel: str, *, now_us: int) -> dict[At, ChannelView]:
        """What `channel` ("" for none) may hold at each position; a suppressed channel
        sees nothing, but still sees the safety stock and buffer in force. A channel
        allowed pre-orders also counts the units inbound to the position."""
        held = self.held()
        raises = self.controls_in_force(ControlKind.RAISE_SAFETY, now_us)
        suppressions = self.controls_in_force(ControlKind.SUPPRESS, now_us)
        takes_preorders = bool(channel) and channel in self.policies.preorder_channels
        views: dict[At, ChannelView] = {}
        for at, on_hand in self.on_hand.items():
            safety = self._safety_stock(at, raises)
            buffer = self.buffer(channel, at[0])
            left = on_hand - held.get(at, 0) - safety - buffer
            if takes_preorders:
                left += self.policies.inbound.get(at, 0)
            if _is_suppressed(channel, at[0], suppressions):
                left = 0
            views[at] = ChannelView(safety, buffer, max(0, left))
        return views

    # Allocations and the channel registry ------------------------------------------------

    def in_scope(self, group: str, location: str) -> bool:
        """Whether an allocation scoped to `group` covers `location`."""
        return not group or location in self.policies.groups[group][0]

    def scope_at(self, sku: str, location: str) -> str | None:
        """The scope of the sku's allocations that cover `location`, whichever channel
        they give to; None when none does. Scopes of one sku are one group or share no
        location, so all that cover a location share one scope."""
        groups = {
            group
            for sku_, _, group in self.policies.allocations
            if sku_ == sku and self.in_scope(group, location)
        }
        assert len(groups) <= 1, f"scopes of {sku} overlap at {location}: {groups}"
        return groups.pop() if groups else None

    def own_scope_at(self, sku: str, channel: str, location: str) -> str | None:
        """The scope of the channel's own allocation covering `location`, if any."""
        group = self.scope_at(sku, location)
        if group is None or (sku, channel, group) not in self.policies.allocations:
            return None
        return group

    def remaining(self) -> dict[AllocationKey, int]:
        """Units of each allocation's pool its channel may still hold: the pool less
        what the channel holds within the scope, never below zero."""
        held = self.held_by_channel()
        remaining: dict[AllocationKey, int] = {}
        for key in self.policies.allocations:
            sku, channel, group = key
            lent = sum(
                units
                for (sku_, channel_, location), units in held.items()
                if (sku_, channel_) == (sku, channel) and self.in_scope(group, location)
            )
            remaining[key] = max(0, self.policies.pools[key] - lent)
        return remaining

    def allowance(self, channel: str, *, now_us: int) -> Allowance:
        """What allocations let `channel` take now. Its own pool in a scope: the units
        remaining. The exclusive pools of other channels in a scope: only the free units
        there (before any buffer) beyond what those pools have remaining; pools with
        nothing remaining fence nothing."""
        own: dict[tuple[str, str], int] = {}
        fenced: dict[tuple[str, str], int] = {}
        for (sku, other, group), units in self.remaining().items():
            if other == channel:
                own[(sku, group)] = units
            elif self.policies.allocations[(sku, other, group)][0] and units:
                fenced[(sku, group)] = fenced.get((sku, group), 0) + units
        unfenced: dict[tuple[str, str], int] = {}
        if fenced:
            views = self.channel_views("", now_us=now_us)
            for (sku, group), units in fenced.items():
                free = sum(
                    view.available_to_sell
                    for (sku_, location), view in views.items()
                    if sku_ == sku and self.in_scope(group, location)
                )
                unfenced[(sku, group)] = free - units
        return Allowance(own, unfenced)

    def is_registered(self, channel: str) -> bool:
        """An empty registry accepts every channel name."""
        return not self.policies.channels or channel in self.policies.channels

    def channels_named(self, now_us: int) -> set[str]:
        """The channels that policies in force name: buffers, sourcing defaults,
        pre-orders, allocations and the controls in force that name a channel."""
        tables = self.policies
        named = {channel for channel, _ in tables.buffers}
        named.update(tables.sourcing, tables.preorder_channels)
        named.update(channel for _, channel, _ in tables.allocations)
        named.update(
            control.channel
            for control in tables.controls.values()
            if control.channel and control.is_active(now_us)
        )
        return named

    def view(self, reservation_id: str) -> ReservationView:
        reservation = self.reservations[reservation_id]
        return ReservationView(
            channel=reservation.channel,
            order_ref=reservation.order_ref,
            state=reservation.state,
            lines=tuple(
                LineView(
                    line.sku,
                    line.location,
                    line.reserved,
                    line.held,
                    line.fulfilled,
                    line.released,
                )
                for line in reservation.lines.values()
            ),
            created_us=reservation.created_us,
            updated_us=reservation.updated_us,
            expires_us=reservation.expires_us,
        )

    def is_due(self, reservation_id: str, *, now_us: int) -> bool:
        reservation = self.reservations[reservation_id]
        return (
            reservation.state is ReservationState.PENDING
            and reservation.expires_us <= now_us
        )

    def due(self, *, now_us: int) -> list[str]:
        return [rid for rid in self.reservations if self.is_due(rid, now_us=now_us)]

    # Holds at risk ------------------------------------------------------------------------

    def at_risk(self, channel: str, *, now_us: int) -> list[AtRiskView]:
        """Reservations holding units that their positions no longer cover, oldest
        first; "" lists every channel's. Which holds are uncovered is settled over all
        channels' holds, and only then is the listing narrowed to `channel`."""
        uncovered = self._uncovered(now_us)
        listed = [
            rid for rid in uncovered if channel in ("", self.reservations[rid].channel)
        ]
        return [
            AtRiskView(rid, self.view(rid), tuple(sorted(uncovered[rid])))
            for rid in sorted(listed, key=self._age)
        ]

    def _uncovered(self, now_us: int) -> dict[str, list[tuple[str, str, int]]]:
        """The units of each reservation's holds that nothing covers, per position.

        At a position, on-hand less safety stock covers holds oldest first, so the
        newest holds are the ones left uncovered. Units inbound to the position count
        as cover for every hold there, pre-order or not: a receipt goes to the waiting
        holds before anything else (the engine's documented choice).
        """
        raises = self.controls_in_force(ControlKind.RAISE_SAFETY, now_us)
        holders = self.holders()
        uncovered: dict[str, list[tuple[str, str, int]]] = {}
        for at, on_hand in self.on_hand.items():
            cover = on_hand + self.policies.inbound.get(at, 0)
            cover -= self._safety_stock(at, raises)
            for rid in holders.get(at, []):
                held = self.reservations[rid].lines[at].held
                covered = min(held, max(0, cover))
                cover -= covered
                if covered < held:
                    uncovered.setdefault(rid, []).append((*at, held - covered))
        return uncovered

    def holders(self) -> dict[At, list[str]]:
        """The reservations holding units at each position, oldest first."""
        active = [rid for rid, r in self.reservations.items() if r.state in ACTIVE]
        holders: dict[At, list[str]] = {}
        for rid in sorted(active, key=self._age):
            for at, line in self.reservations[rid].lines.items():
                if line.held:
                    holders.setdefault(at, []).append(rid)
        return holders

    def _age(self, reservation_id: str) -> tuple[int, str]:
        """Reservations made at the same instant go by id. The model's ids, like those
        the tests give the engine, sort in the order they were made, so the engine's
        order and the model's agree."""
        return self.reservations[reservation_id].created_us, reservation_id


def _is_suppressed(channel: str, sku: str, suppressions: list[ControlView]) -> bool:
    """A suppression names its channel, and one sku or every sku ("")."""
    return any(
        control.channel == channel and control.sku in ("", sku)
        for control in suppressions
    )


def _percent_rounded_up(units: int, percent: int) -> int:
    return -(-units * percent // 100)
