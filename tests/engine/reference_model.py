"""A small reference model of the reservation semantics, for the randomized tests.

Design note. The model is meant to be read in one sitting and believed. It keeps plain
dictionaries and stores no derived numbers: the units held at a position are summed from
the active reservations whenever they are asked for, so they cannot drift. It knows
nothing of shards, write-ahead records or withheld gains, because the tests mark every
engine decision durable before the next command, and from then on a gain is simply
visible. It shares with the engine only the command and result values and the enums that
both speak; every rule here was written from the contract, not from the engine's code.

Policies are plain tables here too: safety stock per (sku, location), buffers per
(channel, sku), groups by name, sourcing by channel, allocations and their pools per
(sku, channel), and continuity controls by id, each entry with who set it. What a
channel may hold at a position, and how much of a sku it may still take in total, are
computed on demand from those tables, the holds and the time.

Controls are never removed when their time box ends: whether one is in force is asked of
the clock each time. A throttle's token bucket belongs to the control, starts full when
it is set, and counts millionths of a token in integers, so that no rounding hides an
off-by-one. Buckets are not durable; the model never restarts, so the recovery test
checks on the engine alone that a restart fills them.

A move is judged by the channel's view of the target position, as a new hold there
would be, but not by allocations: the channel holds as many units of the sku as before.

Inbound supply is a table of expected units per position with an ETA, and pre-orders a
set of channels. A channel in that set sees a position's inbound units as if they were
on hand; no other view does, neither the view without a channel nor the free units that
ring fences count, and fulfilment still ships only what is on hand. A positive receipt
takes its units off the position's inbound, never below zero; the entry stays, at zero,
until it is set again or removed. The model sets the figure asked for, because every
decision is durable before the next one.

Where the contract leaves a choice open, the model states the engine's documented choice
next to the rule, so that a disagreement points at one sentence.
"""

import dataclasses
import itertools
from collections.abc import Callable, Iterator

from server.engine.commands import (
    AdjustmentReason,
    AdjustStock,
    Command,
    Confirm,
    Extend,
    Fulfill,
    LiftControl,
    LineQuantity,
    LineResult,
    Move,
    PolicyCommand,
    PolicyResult,
    PositionSnapshot,
    Release,
    Reserve,
    ReserveLine,
    ReserveOutcome,
    ReserveResult,
    SetChannelAllocation,
    SetChannelBuffer,
    SetChannelPreorders,
    SetChannelSourcing,
    SetControl,
    SetInboundSupply,
    SetLocationGroup,
    SetOnHand,
    SetSafetyStock,
    ShortReason,
    StockResult,
)
from server.engine.errors import ErrorKind
from server.engine.model import ReservationState
from server.engine.policy import ControlKind

US_PER_S = 1_000_000

# (sku, location): one position.
At = tuple[str, str]
# (sku, channel): one allocation.
Pair = tuple[str, str]

_ACTIVE = (ReservationState.PENDING, ReservationState.CONFIRMED)


# Views: what the tests compare -----------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class LineView:
    sku: str
    location: str
    quantity_reserved: int
    quantity_held: int
    quantity_fulfilled: int
    quantity_released: int


@dataclasses.dataclass(frozen=True, slots=True)
class ReservationView:
    channel: str
    order_ref: str
    state: ReservationState
    lines: tuple[LineView, ...]
    created_us: int
    updated_us: int
    # Zero unless the reservation is a pending hold.
    expires_us: int


@dataclasses.dataclass(frozen=True, slots=True)
class PositionView:
    on_hand: int
    held: int
    available_to_sell: int


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelView:
    """One position as a channel sees it ("" for no channel)."""

    safety_stock: int
    buffer: int
    available_to_sell: int


@dataclasses.dataclass(frozen=True, slots=True)
class SetBy:
    """Who made a policy setting, under which change id, and when."""

    actor: str
    change_id: str
    at_us: int


@dataclasses.dataclass(frozen=True, slots=True)
class ControlView:
    """A continuity control; only the fields its kind uses are set."""

    kind: ControlKind
    channel: str
    sku: str
    location: str
    units: int
    percent: int
    rate_per_s: int
    until_us: int
    reason: str
    set_by: SetBy

    def is_active(self, now_us: int) -> bool:
        return self.set_by.at_us <= now_us < self.until_us


@dataclasses.dataclass(frozen=True, slots=True)
class PoliciesView:
    # (sku, location) -> units; sku "" is the location's default.
    safety_stock: dict[At, tuple[int, SetBy]]
    # (channel, sku) -> units; sku "" is the channel's default.
    buffers: dict[tuple[str, str], tuple[int, SetBy]]
    groups: dict[str, tuple[tuple[str, ...], SetBy]]
    # channel -> (group, allow_split)
    sourcing: dict[str, tuple[tuple[str, bool], SetBy]]
    # (sku, channel) -> whether the allocation is exclusive.
    allocations: dict[Pair, tuple[bool, SetBy]]
    # (sku, channel) -> the pool of an allocation in force: the units set, less the
    # channel's fulfilments of the sku since. It may go below zero when the pool was
    # set below what the channel already held.
    pools: dict[Pair, int]
    # control id -> control; those whose time box ended stay until `in_force` hides
    # them, lifted ones are gone.
    controls: dict[str, ControlView]
    # (sku, location) -> units still expected, for every entry in force; receipts may
    # bring it to zero without removing the entry.
    inbound: dict[At, int]
    # (sku, location) -> (eta_us, who set the entry last).
    inbound_eta: dict[At, tuple[int, SetBy]]
    # Channels that may hold against inbound supply.
    preorder_channels: dict[str, SetBy]

    def in_force(self, now_us: int) -> "PoliciesView":
        """The policies as GetPolicies shows them: controls in force only."""
        return dataclasses.replace(
            self,
            controls={
                cid: c for cid, c in self.controls.items() if c.is_active(now_us)
            },
        )


ModelResult = ReserveResult | ReservationView | StockResult | PolicyResult


@dataclasses.dataclass(frozen=True, slots=True)
class Answered:
    result: ModelResult
    replayed: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Refused:
    kind: ErrorKind
    reason: str


Outcome = Answered | Refused


# State -----------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Line:
    sku: str
    location: str
    reserved: int
    held: int
    fulfilled: int = 0
    released: int = 0


@dataclasses.dataclass(slots=True)
class _Reservation:
    channel: str
    order_ref: str
    state: ReservationState
    lines: dict[At, _Line]
    created_us: int
    updated_us: int
    expires_us: int

    @property
    def held(self) -> int:
        return sum(line.held for line in self.lines.values())


@dataclasses.dataclass(frozen=True, slots=True)
class AllocationView:
    """One (sku, channel) as GetPolicies and GetAvailability show it."""

    # Units of the pool the channel may still hold; zero without an allocation.
    remaining: int
    # The most the channel could take of the sku in one request now.
    cap: int
    has_allocation: bool


@dataclasses.dataclass(frozen=True, slots=True)
class _Cap:
    """The most a channel may still take of a sku in the request being decided."""

    units: int
    # Whether the channel's own pool sets that limit, rather than another's fence.
    is_own_pool: bool


@dataclasses.dataclass(frozen=True, slots=True)
class _Pools:
    """What allocations allow at the start of a request."""

    # (sku, channel) -> units of the pool the channel may still hold.
    remaining: dict[Pair, int]
    # sku -> units free to promise at all its positions, before any channel's buffer.
    free: dict[str, int]


@dataclasses.dataclass(slots=True)
class _Plan:
    """Where one reserve line would be held: (location, quantity) pairs in order."""

    takes: list[tuple[str, int]]
    short_reason: ShortReason | None
    available: int


class ReferenceModel:
    def __init__(
        self, *, on_hand_max: int, ttl_default_s: int, control_duration_max_s: int
    ) -> None:
        self.on_hand: dict[At, int] = {}
        self.reservations: dict[str, _Reservation] = {}
        self._on_hand_max = on_hand_max
        self._ttl_default_s = ttl_default_s
        self._control_duration_max_us = control_duration_max_s * US_PER_S
        self._ids = itertools.count(1)
        # Answered requests by key: the command with its key blanked, and the answer.
        self._answers: dict[tuple[str, str, str], tuple[Command, ModelResult]] = {}
        self.policies = PoliciesView({}, {}, {}, {}, {}, {}, {}, {}, {}, {})
        # Throttle control id -> (millionths of a token in its bucket, when counted).
        self._tokens: dict[str, tuple[int, int]] = {}

    # Reads -------------------------------------------------------------------------------

    def _active(self) -> Iterator[_Reservation]:
        return (r for r in self.reservations.values() if r.state in _ACTIVE)

    def held(self) -> dict[At, int]:
        held: dict[At, int] = {}
        for reservation in self._active():
            for at, line in reservation.lines.items():
                held[at] = held.get(at, 0) + line.held
        return held

    def held_by_channel(self) -> dict[Pair, int]:
        """Units each channel holds of each sku, at every location."""
        held: dict[Pair, int] = {}
        for reservation in self._active():
            for line in reservation.lines.values():
                pair = (line.sku, reservation.channel)
                held[pair] = held.get(pair, 0) + line.held
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

    def allocation_views(
        self, pairs: list[Pair], *, now_us: int
    ) -> dict[Pair, AllocationView]:
        pools = self._pools(now_us)
        return {
            (sku, channel): AllocationView(
                remaining=pools.remaining.get((sku, channel), 0),
                cap=self._cap(sku, channel, 0, pools).units,
                has_allocation=(sku, channel) in self.policies.allocations,
            )
            for sku, channel in pairs
        }

    def _pools(self, now_us: int) -> _Pools:
        lent = self.held_by_channel()
        remaining = {
            pair: max(0, pool - lent.get(pair, 0))
            for pair, pool in self.policies.pools.items()
        }
        free: dict[str, int] = {}
        # Only a fence needs the free units, and only an allocation makes a fence.
        if self.policies.allocations:
            for (sku, _), view in self.channel_views("", now_us=now_us).items():
                free[sku] = free.get(sku, 0) + view.available_to_sell
        return _Pools(remaining, free)

    def _cap(self, sku: str, channel: str, taken: int, pools: _Pools) -> _Cap:
        """Two limits on what a channel takes of a sku, `taken` being what the request
        took already. Its own allocation: no more than the pool's remaining units. The
        exclusive allocations of other channels: only while the units left free at the
        sku's positions cover what those pools have remaining. Without either, the
        largest on-hand stands for no limit. Where both limits are equal, the channel's
        own pool is named (a choice the contract leaves open)."""
        fenced = sum(
            units
            for (fenced_sku, other), units in pools.remaining.items()
            if fenced_sku == sku
            and other != channel
            and self.policies.allocations[(fenced_sku, other)][0]
        )
        cap = _Cap(self._on_hand_max, is_own_pool=False)
        if (sku, channel) in pools.remaining:
            cap = _Cap(pools.remaining[(sku, channel)] - taken, is_own_pool=True)
        unfenced = pools.free.get(sku, 0) - taken - fenced
        if fenced and unfenced < cap.units:
            cap = _Cap(unfenced, is_own_pool=False)
        return _Cap(max(0, cap.units), cap.is_own_pool)

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

    # Commands ----------------------------------------------------------------------------

    def decide(self, command: Command, *, now_us: int) -> Outcome:
        if isinstance(command, AdjustStock | SetOnHand):
            key = ("stock", command.source, command.source_event_id)
            keyless: Command = dataclasses.replace(command, source_event_id="")
            return self._once(key, keyless, lambda: self._stock(command, now_us))
        if isinstance(command, Reserve):
            key = ("order", command.channel, command.request_id)
            keyless = dataclasses.replace(command, request_id="")
            return self._once(key, keyless, lambda: self._reserve(command, now_us))
        if isinstance(command, PolicyCommand):
            key = ("policy", command.actor, command.change_id)
            keyless = dataclasses.replace(command, change_id="")
            return self._once(key, keyless, lambda: self._policy(command, now_us))

        assert isinstance(command, Confirm | Release | Fulfill | Extend | Move)
        # A change is keyed in the channel of the reservation it names, so an unknown
        # reservation is refused before its key is looked at.
        reservation = self.reservations.get(command.reservation_id)
        if reservation is None:
            return Refused(ErrorKind.NOT_FOUND, "RESERVATION_NOT_FOUND")
        key = ("order", reservation.channel, command.request_id)
        keyless = dataclasses.replace(command, request_id="")
        return self._once(key, keyless, lambda: self._change(command, now_us))

    def expire(self, reservation_id: str, *, now_us: int) -> ReservationView:
        """Expire one due hold, as the engine's sweep does."""
        assert self.is_due(reservation_id, now_us=now_us)
        reservation = self.reservations[reservation_id]
        for line in reservation.lines.values():
            line.released += line.held
            line.held = 0
        reservation.state = ReservationState.EXPIRED
        reservation.expires_us = 0
        reservation.updated_us = now_us
        return self.view(reservation_id)

    def _once(
        self,
        key: tuple[str, str, str],
        keyless: Command,
        decide: Callable[[], Outcome],
    ) -> Outcome:
        """Idempotency: a key answers once; the same content again gets that answer.

        Refusals are not answers: nothing changed, so a retry is decided afresh.
        """
        earlier = self._answers.get(key)
        if earlier is not None:
            earlier_command, earlier_result = earlier
            if earlier_command != keyless:
                return Refused(ErrorKind.INVALID_ARGUMENT, "REQUEST_ID_REUSED")
            return Answered(earlier_result, replayed=True)
        outcome = decide()
        if isinstance(outcome, Answered):
            self._answers[key] = (keyless, outcome.result)
        return outcome

    # Stock -------------------------------------------------------------------------------

    def _stock(self, command: AdjustStock | SetOnHand, now_us: int) -> Outcome:
        after: dict[At, int] = {}
        if isinstance(command, SetOnHand):
            for count in command.counts:
                after[(count.sku, count.location)] = count.on_hand
        else:
            # Only the net change per position must stay in range; a position out
            # of range refuses the whole message.
            for adjustment in command.adjustments:
                at = (adjustment.sku, adjustment.location)
                after[at] = after.get(at, self.on_hand.get(at, 0)) + adjustment.delta
            for value in after.values():
                if value < 0:
                    return Refused(
                        ErrorKind.FAILED_PRECONDITION, "ON_HAND_WOULD_GO_NEGATIVE"
                    )
                if value > self._on_hand_max:
                    return Refused(ErrorKind.FAILED_PRECONDITION, "ON_HAND_TOO_LARGE")

        self.on_hand.update(after)
        if isinstance(command, AdjustStock):
            self._receive(command)
        positions = self.positions()
        # The answer shows what may be sold at each position without a channel's view:
        # net of safety stock (raises included), with no buffer.
        views = self.channel_views("", now_us=now_us)
        snapshots = tuple(
            PositionSnapshot(
                sku=sku,
                location=location,
                on_hand=positions[(sku, location)].on_hand,
                held=positions[(sku, location)].held,
                available_to_sell=views[(sku, location)].available_to_sell,
            )
            for sku, location in after
        )
        return Answered(StockResult(snapshots), replayed=False)

    def _receive(self, command: AdjustStock) -> None:
        """Positive receipts at a position, summed over the message, take their units
        off what is inbound there; other reasons and negative receipts leave it be."""
        received: dict[At, int] = {}
        for adjustment in command.adjustments:
            if adjustment.reason is AdjustmentReason.RECEIPT and adjustment.delta > 0:
                at = (adjustment.sku, adjustment.location)
                received[at] = received.get(at, 0) + adjustment.delta
        inbound = self.policies.inbound
        for at, units in received.items():
            if at in inbound:
                inbound[at] -= min(units, inbound[at])

    # Reserve -----------------------------------------------------------------------------

    def _reserve(self, command: Reserve, now_us: int) -> Outcome:
        # A throttled channel pays a token for every request decided afresh, even one
        # then refused or rejected.
        throttled = self._take_token(command.channel, now_us)
        if throttled is not None:
            return throttled
        sourced = self._sourced(command)
        if isinstance(sourced, Refused):
            return sourced
        plans = self._plans(command.channel, sourced, now_us)

        is_short = any(plan.short_reason is not None for plan in plans)
        if is_short and not command.allow_partial:
            plans = [_drop(plan) for plan in plans]
        if not any(plan.takes for plan in plans):
            return self._reserve_answer("", ReserveOutcome.REJECTED, command, plans, 0)

        reservation_id = f"m{next(self._ids)}"
        ttl_s = command.ttl_s or self._ttl_default_s
        expires_us = now_us + ttl_s * US_PER_S
        lines: dict[At, _Line] = {}
        for line, plan in zip(command.lines, plans, strict=True):
            for location, quantity in plan.takes:
                at = (line.sku, location)
                merged = lines.setdefault(at, _Line(line.sku, location, 0, 0))
                merged.reserved += quantity
                merged.held += quantity
        self.reservations[reservation_id] = _Reservation(
            channel=command.channel,
            order_ref=command.order_ref,
            state=ReservationState.PENDING,
            lines=lines,
            created_us=now_us,
            updated_us=now_us,
            expires_us=expires_us,
        )
        outcome = (
            ReserveOutcome.PARTIALLY_RESERVED if is_short else ReserveOutcome.RESERVED
        )
        return self._reserve_answer(reservation_id, outcome, command, plans, expires_us)

    def _take_token(self, channel: str, now_us: int) -> Refused | None:
        """A throttle's bucket holds `rate` tokens and gains `rate` a second; each
        request takes one, and without a whole token the request is refused."""
        throttle = next(
            (
                (control_id, control)
                for control_id, control in self.policies.controls.items()
                if control.kind is ControlKind.THROTTLE
                and control.channel == channel
                and control.is_active(now_us)
            ),
            None,
        )
        if throttle is None:
            return None
        control_id, control = throttle
        full = control.rate_per_s * US_PER_S
        tokens, counted_us = self._tokens.get(control_id, (full, now_us))
        tokens = min(full, tokens + (now_us - counted_us) * control.rate_per_s)
        if tokens < US_PER_S:
            self._tokens[control_id] = (tokens, now_us)
            return Refused(ErrorKind.RESOURCE_EXHAUSTED, "CHANNEL_THROTTLED")
        self._tokens[control_id] = (tokens - US_PER_S, now_us)
        return None

    def _sourced(self, command: Reserve) -> list[ReserveLine] | Refused:
        """A line that names no location is held from its channel's group, with the
        channel's split rule; without a group for the channel the request is refused."""
        lines: list[ReserveLine] = []
        for line in command.lines:
            if line.location or line.locations:
                lines.append(line)
                continue
            entry = self.policies.sourcing.get(command.channel)
            if entry is None:
                return Refused(ErrorKind.FAILED_PRECONDITION, "CHANNEL_HAS_NO_SOURCING")
            (group, allow_split), _ = entry
            locations = self.policies.groups[group][0]
            lines.append(
                dataclasses.replace(line, locations=locations, allow_split=allow_split)
            )
        return lines

    def _plans(
        self, channel: str, lines: list[ReserveLine], now_us: int
    ) -> list[_Plan]:
        """Plan the lines in order; each sees what the earlier ones took."""
        views = self.channel_views(channel, now_us=now_us)
        free = {at: view.available_to_sell for at, view in views.items()}
        pools = self._pools(now_us)
        taken: dict[str, int] = {}
        plans: list[_Plan] = []
        for line in lines:
            cap = self._cap(line.sku, channel, taken.get(line.sku, 0), pools)
            is_suppressed = self.is_suppressed(channel, line.sku, now_us=now_us)
            plan = self._plan(line, free, cap, is_suppressed=is_suppressed)
            for location, quantity in plan.takes:
                free[(line.sku, location)] -= quantity
                taken[line.sku] = taken.get(line.sku, 0) + quantity
            plans.append(plan)
        return plans

    def _plan(
        self, line: ReserveLine, free: dict[At, int], cap: _Cap, *, is_suppressed: bool
    ) -> _Plan:
        candidates = (line.location,) if line.location else line.locations
        if not any(sku == line.sku for sku, _ in self.on_hand):
            return _Plan([], ShortReason.UNKNOWN_SKU, 0)
        known_locations = {location for _, location in self.on_hand}
        if not any(location in known_locations for location in candidates):
            return _Plan([], ShortReason.UNKNOWN_LOCATION, 0)
        if is_suppressed:
            return _Plan([], ShortReason.CHANNEL_SUPPRESSED, 0)

        offers = [
            (location, free[(line.sku, location)])
            for location in candidates
            if (line.sku, location) in free
        ]
        # What the line could have had under its own rules: everything at its
        # locations when it may split, else the best single location.
        counts = [count for _, count in offers]
        could_have = sum(counts) if line.allow_split else max(counts, default=0)
        # No location offers more than the channel may still take of the sku, so a
        # capped line without split takes the location with the most it may take (a
        # choice the contract leaves open).
        capped = [(location, min(count, cap.units)) for location, count in offers]
        takes = _choose(line, capped, wanted=min(line.quantity, cap.units))
        available = min(could_have, cap.units)
        if sum(quantity for _, quantity in takes) == line.quantity:
            return _Plan(takes, None, available)
        # The pool is to blame only when it allows less than both the quantity and
        # what stock would have allowed; a fence is a shortage of stock for the line.
        is_pool_short = cap.is_own_pool and cap.units < min(could_have, line.quantity)
        reason = (
            ShortReason.CHANNEL_ALLOCATION_EXHAUSTED
            if is_pool_short
            else ShortReason.INSUFFICIENT_STOCK
        )
        return _Plan(takes, reason, available)

    @staticmethod
    def _reserve_answer(
        reservation_id: str,
        outcome: ReserveOutcome,
        command: Reserve,
        plans: list[_Plan],
        expires_us: int,
    ) -> Outcome:
        lines = tuple(
            LineResult(
                line_index=index,
                sku=line.sku,
                quantity_requested=line.quantity,
                quantity_held=sum(quantity for _, quantity in plan.takes),
                held_at=tuple(plan.takes),
                short_reason=plan.short_reason,
                quantity_available=plan.available,
            )
            for index, (line, plan) in enumerate(zip(command.lines, plans, strict=True))
        )
        result = ReserveResult(
            reservation_id=reservation_id,
            outcome=outcome,
            lines=lines,
            expires_us=expires_us,
        )
        return Answered(result, replayed=False)

    # Policies ----------------------------------------------------------------------------

    def _policy(self, command: PolicyCommand, now_us: int) -> Outcome:
        """Zero units, an empty group and an empty sourcing group each remove the
        setting; a group a channel sources from cannot be removed, and a channel cannot
        source from a group that does not exist."""
        by = SetBy(command.actor, command.change_id, now_us)
        tables = self.policies
        if isinstance(command, SetControl):
            return self._set_control(command, by)
        if isinstance(command, LiftControl):
            return self._lift_control(command.control_id, now_us)
        if isinstance(command, SetChannelAllocation):
            self._allocate(command, by)
        elif isinstance(command, SetSafetyStock):
            for level in command.levels:
                _put(tables.safety_stock, (level.sku, level.location), level.units, by)
        elif isinstance(command, SetChannelBuffer):
            for item in command.buffers:
                _put(tables.buffers, (item.channel, item.sku), item.units, by)
        elif isinstance(command, SetInboundSupply):
            self._expect(command, by)
        elif isinstance(command, SetChannelPreorders):
            if command.allowed:
                tables.preorder_channels[command.channel] = by
            else:
                tables.preorder_channels.pop(command.channel, None)
        elif isinstance(command, SetLocationGroup):
            in_use = {group for (group, _), _ in tables.sourcing.values()}
            if not command.locations and command.name in in_use:
                return Refused(ErrorKind.FAILED_PRECONDITION, "GROUP_IN_USE")
            if command.locations:
                tables.groups[command.name] = (command.locations, by)
            else:
                tables.groups.pop(command.name, None)
        elif not isinstance(command, SetChannelSourcing):
            raise AssertionError(f"the model does not know {command!r}")
        elif command.group:
            if command.group not in tables.groups:
                return Refused(ErrorKind.FAILED_PRECONDITION, "GROUP_UNKNOWN")
            tables.sourcing[command.channel] = (
                (command.group, command.allow_split),
                by,
            )
        else:
            tables.sourcing.pop(command.channel, None)
        return Answered(PolicyResult(), replayed=False)

    def _allocate(self, command: SetChannelAllocation, by: SetBy) -> None:
        """Setting an allocation starts its pool afresh at the units set, whatever was
        left of an earlier one; zero units removes it with its pool."""
        for level in command.allocations:
            pair = (level.sku, level.channel)
            if level.units:
                self.policies.allocations[pair] = (level.exclusive, by)
                self.policies.pools[pair] = level.units
            else:
                self.policies.allocations.pop(pair, None)
                self.policies.pools.pop(pair, None)

    def _expect(self, command: SetInboundSupply, by: SetBy) -> None:
        """Each supply sets the units expected at its position, whatever receipts
        left of an earlier entry, with its ETA; zero units removes the entry."""
        for supply in command.supplies:
            at = (supply.sku, supply.location)
            if supply.units:
                self.policies.inbound[at] = supply.units
                self.policies.inbound_eta[at] = (supply.eta_us, by)
            else:
                self.policies.inbound.pop(at, None)
                self.policies.inbound_eta.pop(at, None)

    def _set_control(self, command: SetControl, by: SetBy) -> Outcome:
        """A control is in force from now until its until_us, which must lie ahead by
        at most the longest time box; only one control of a kind per target may be in
        force at a time. Its id is "<actor>:<change_id>". The tests fill only the
        fields a control's kind uses, so the model keeps every field as given."""
        now_us = by.at_us
        if command.until_us <= now_us:
            return Refused(ErrorKind.INVALID_ARGUMENT, "TIME_BOX_IN_PAST")
        if command.until_us - now_us > self._control_duration_max_us:
            return Refused(ErrorKind.INVALID_ARGUMENT, "TIME_BOX_TOO_LONG")
        assert command.kind is not None
        control = ControlView(
            kind=command.kind,
            channel=command.channel,
            sku=command.sku,
            location=command.location,
            units=command.units,
            percent=command.percent,
            rate_per_s=command.rate_per_s,
            until_us=command.until_us,
            reason=command.reason,
            set_by=by,
        )
        target = (control.channel, control.sku, control.location)
        for other in self.controls_in_force(control.kind, now_us):
            if (other.channel, other.sku, other.location) == target:
                return Refused(ErrorKind.FAILED_PRECONDITION, "CONTROL_OVERLAPS")
        control_id = f"{command.actor}:{command.change_id}"
        self.policies.controls[control_id] = control
        return Answered(PolicyResult(control_id=control_id), replayed=False)

    def _lift_control(self, control_id: str, now_us: int) -> Outcome:
        """Only a control in force can be lifted; it ends at once, bucket and all."""
        control = self.policies.controls.get(control_id)
        if control is None or not control.is_active(now_us):
            return Refused(ErrorKind.NOT_FOUND, "CONTROL_NOT_FOUND")
        del self.policies.controls[control_id]
        self._tokens.pop(control_id, None)
        return Answered(PolicyResult(), replayed=False)

    # Changes to one reservation ----------------------------------------------------------

    def _change(
        self, command: Confirm | Release | Fulfill | Extend | Move, now_us: int
    ) -> Outcome:
        reservation_id = command.reservation_id
        reservation = self.reservations[reservation_id]
        # A hold past its expiry is expired even before the sweep reaches it; only a
        # release may still give it back.
        if self.is_due(reservation_id, now_us=now_us) and not isinstance(
            command, Release
        ):
            return _refused_in(ReservationState.EXPIRED)

        if isinstance(command, Confirm):
            return self._confirm(reservation_id, now_us)
        if isinstance(command, Extend):
            return self._extend(reservation_id, command.ttl_s, now_us)
        if reservation.state not in _ACTIVE:
            return _refused_in(reservation.state)
        if isinstance(command, Move):
            return self._move(reservation_id, command, now_us)
        if isinstance(command, Fulfill) and (
            reservation.state is not ReservationState.CONFIRMED
        ):
            return _refused_in(reservation.state)
        return self._give_back(reservation_id, command, now_us)

    def _confirm(self, reservation_id: str, now_us: int) -> Outcome:
        reservation = self.reservations[reservation_id]
        if reservation.state is ReservationState.CONFIRMED:
            # Confirming twice changes nothing and is not an error.
            return Answered(self.view(reservation_id), replayed=False)
        if reservation.state is not ReservationState.PENDING:
            return _refused_in(reservation.state)
        reservation.state = ReservationState.CONFIRMED
        reservation.expires_us = 0
        reservation.updated_us = now_us
        return Answered(self.view(reservation_id), replayed=False)

    def _extend(self, reservation_id: str, ttl_s: int, now_us: int) -> Outcome:
        reservation = self.reservations[reservation_id]
        if reservation.state is not ReservationState.PENDING:
            return _refused_in(reservation.state)
        expires_us = now_us + ttl_s * US_PER_S
        if expires_us <= reservation.expires_us:
            return Refused(ErrorKind.FAILED_PRECONDITION, "EXTEND_WOULD_SHORTEN")
        reservation.expires_us = expires_us
        reservation.updated_us = now_us
        return Answered(self.view(reservation_id), replayed=False)

    def _move(self, reservation_id: str, command: Move, now_us: int) -> Outcome:
        """Held units of one sku change location, all or nothing. The line must hold
        them, and the target must offer them to the reservation's channel as it would
        to a new hold there. The units leave the source line as if never reserved
        there; a line left with nothing reserved disappears, and the target line is
        added after the others unless the reservation has one there already."""
        reservation = self.reservations[reservation_id]
        source_at = (command.sku, command.from_location)
        source = reservation.lines.get(source_at)
        if source is None or source.held < command.quantity:
            return Refused(ErrorKind.FAILED_PRECONDITION, "QUANTITY_EXCEEDS_HELD")
        target_at = (command.sku, command.to_location)
        views = self.channel_views(reservation.channel, now_us=now_us)
        # The units taken at the target are new: other channels' ring fences apply.
        pools = self._pools(now_us)
        fenced = sum(
            units
            for (fenced_sku, other), units in pools.remaining.items()
            if fenced_sku == command.sku
            and other != reservation.channel
            and self.policies.allocations[(fenced_sku, other)][0]
        )
        unfenced = pools.free.get(command.sku, 0) - fenced
        if (
            target_at not in views
            or views[target_at].available_to_sell < command.quantity
            or (fenced and unfenced < command.quantity)
        ):
            return Refused(
                ErrorKind.FAILED_PRECONDITION, "INSUFFICIENT_STOCK_AT_TARGET"
            )

        source.reserved -= command.quantity
        source.held -= command.quantity
        target = reservation.lines.setdefault(
            target_at, _Line(command.sku, command.to_location, 0, 0)
        )
        target.reserved += command.quantity
        target.held += command.quantity
        if source.reserved == 0:
            del reservation.lines[source_at]
        reservation.updated_us = now_us
        return Answered(self.view(reservation_id), replayed=False)

    def _give_back(
        self, reservation_id: str, command: Release | Fulfill, now_us: int
    ) -> Outcome:
        reservation = self.reservations[reservation_id]
        amounts = _amounts(reservation, command.lines)
        if isinstance(amounts, Refused):
            return amounts
        if isinstance(command, Fulfill) and any(
            quantity > self.on_hand.get(at, 0) for at, quantity in amounts.items()
        ):
            # A count can leave fewer units on hand than are held; those cannot ship.
            return Refused(ErrorKind.FAILED_PRECONDITION, "ON_HAND_SHORT")

        for at, quantity in amounts.items():
            line = reservation.lines[at]
            line.held -= quantity
            if isinstance(command, Fulfill):
                line.fulfilled += quantity
                self.on_hand[at] -= quantity
                # Shipping uses up the channel's pool for good; releasing only stops
                # holding it.
                pair = (line.sku, reservation.channel)
                if pair in self.policies.pools:
                    self.policies.pools[pair] -= quantity
            else:
                line.released += quantity
        reservation.updated_us = now_us
        if reservation.held == 0:
            # A reservation that shipped anything counts as fulfilled, even if the rest
            # of it was released.
            shipped = any(line.fulfilled for line in reservation.lines.values())
            reservation.state = (
                ReservationState.FULFILLED if shipped else ReservationState.RELEASED
            )
            reservation.expires_us = 0
        return Answered(self.view(reservation_id), replayed=False)


def _choose(
    line: ReserveLine, offers: list[tuple[str, int]], *, wanted: int
) -> list[tuple[str, int]]:
    """Where a line is held, given what each location offers in preference order and
    the most the line may take in all."""
    # The first location in preference order that covers the whole line wins, even
    # when splitting is allowed: one shipment beats two.
    for location, count in offers:
        if count >= line.quantity:
            return [(location, line.quantity)]

    if line.allow_split:
        takes: list[tuple[str, int]] = []
        for location, count in offers:
            if count > 0 and wanted > 0:
                takes.append((location, min(count, wanted)))
                wanted -= min(count, wanted)
        return takes

    # Not covered anywhere and no split: a partial hold takes the location with the
    # most, the earliest preferred one on a tie.
    best_location, best_count = "", 0
    for location, count in offers:
        if count > best_count:
            best_location, best_count = location, count
    return [(best_location, best_count)] if best_count > 0 else []


def _is_suppressed(channel: str, sku: str, suppressions: list[ControlView]) -> bool:
    """A suppression names its channel, and one sku or every sku ("")."""
    return any(
        control.channel == channel and control.sku in ("", sku)
        for control in suppressions
    )


def _percent_rounded_up(units: int, percent: int) -> int:
    return -(-units * percent // 100)


def _put(
    table: dict[tuple[str, str], tuple[int, SetBy]],
    key: tuple[str, str],
    units: int,
    by: SetBy,
) -> None:
    if units:
        table[key] = (units, by)
    else:
        table.pop(key, None)


def _drop(plan: _Plan) -> _Plan:
    """All or nothing: a short basket holds no line. A line that would have fitted
    says so by naming the other lines as the reason, with what it would have held."""
    if plan.short_reason is None:
        return _Plan([], ShortReason.OTHER_LINE_SHORT, plan.available)
    return _Plan([], plan.short_reason, plan.available)


def _amounts(
    reservation: _Reservation, wanted: tuple[LineQuantity, ...]
) -> dict[At, int] | Refused:
    """Units to take off each line; no lines named means everything still held."""
    if not wanted:
        return {at: line.held for at, line in reservation.lines.items() if line.held}
    amounts: dict[At, int] = {}
    for item in wanted:
        at = (item.sku, item.location)
        if at not in reservation.lines:
            return Refused(ErrorKind.INVALID_ARGUMENT, "LINE_NOT_IN_RESERVATION")
        amounts[at] = amounts.get(at, 0) + item.quantity
        if amounts[at] > reservation.lines[at].held:
            return Refused(ErrorKind.FAILED_PRECONDITION, "QUANTITY_EXCEEDS_HELD")
    return amounts


def _refused_in(state: ReservationState) -> Refused:
    return Refused(ErrorKind.FAILED_PRECONDITION, f"RESERVATION_{state.name}")
