"""A small reference model of the reservation semantics, for the randomized tests.

Design note. The model is meant to be read in one sitting and believed. It keeps plain
dictionaries and stores no derived numbers: the units held at a position are summed from
the active reservations whenever they are asked for, so they cannot drift. It knows
nothing of shards, write-ahead records or withheld gains, because the tests mark every
engine decision durable before the next command, and from then on a gain is simply
visible. It shares with the engine only the command and result values and the enums that
both speak; every rule here was written from the contract, not from the engine's code.

Policies are plain tables here too: safety stock per (sku, location), buffers per
(channel, sku), groups by name and sourcing by channel, each entry with who set it. What
a channel may hold at a position is computed on demand from those tables and the holds.

Where the contract leaves a choice open, the model states the engine's documented choice
next to the rule, so that a disagreement points at one sentence.
"""

import dataclasses
import itertools
from collections.abc import Callable

from server.engine.commands import (
    AdjustStock,
    Command,
    Confirm,
    Extend,
    Fulfill,
    LineQuantity,
    LineResult,
    PolicyResult,
    PositionSnapshot,
    Release,
    Reserve,
    ReserveLine,
    ReserveOutcome,
    ReserveResult,
    SetChannelBuffer,
    SetChannelSourcing,
    SetLocationGroup,
    SetOnHand,
    SetSafetyStock,
    ShortReason,
    StockResult,
)
from server.engine.errors import ErrorKind
from server.engine.model import ReservationState

US_PER_S = 1_000_000

# (sku, location): one position.
At = tuple[str, str]

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
class PoliciesView:
    # (sku, location) -> units; sku "" is the location's default.
    safety_stock: dict[At, tuple[int, SetBy]]
    # (channel, sku) -> units; sku "" is the channel's default.
    buffers: dict[tuple[str, str], tuple[int, SetBy]]
    groups: dict[str, tuple[tuple[str, ...], SetBy]]
    # channel -> (group, allow_split)
    sourcing: dict[str, tuple[tuple[str, bool], SetBy]]


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


@dataclasses.dataclass(slots=True)
class _Plan:
    """Where one reserve line would be held: (location, quantity) pairs in order."""

    takes: list[tuple[str, int]]
    short_reason: ShortReason | None
    available: int


class ReferenceModel:
    def __init__(self, *, on_hand_max: int, ttl_default_s: int) -> None:
        self.on_hand: dict[At, int] = {}
        self.reservations: dict[str, _Reservation] = {}
        self._on_hand_max = on_hand_max
        self._ttl_default_s = ttl_default_s
        self._ids = itertools.count(1)
        # Answered requests by key: the command with its key blanked, and the answer.
        self._answers: dict[tuple[str, str, str], tuple[Command, ModelResult]] = {}
        self.policies = PoliciesView({}, {}, {}, {})

    # Reads -------------------------------------------------------------------------------

    def held(self) -> dict[At, int]:
        held: dict[At, int] = {}
        for reservation in self.reservations.values():
            if reservation.state in _ACTIVE:
                for at, line in reservation.lines.items():
                    held[at] = held.get(at, 0) + line.held
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

    def safety_stock(self, at: At) -> int:
        """A sku's own level, else the location's default, else none."""
        location = at[1]
        for key in (at, ("", location)):
            if key in self.policies.safety_stock:
                return self.policies.safety_stock[key][0]
        return 0

    def buffer(self, channel: str, sku: str) -> int:
        """A channel's buffer for the sku, else its default; no channel, no buffer."""
        for key in ((channel, sku), (channel, "")):
            if key in self.policies.buffers:
                return self.policies.buffers[key][0]
        return 0

    def channel_views(self, channel: str) -> dict[At, ChannelView]:
        held = self.held()
        views: dict[At, ChannelView] = {}
        for at, on_hand in self.on_hand.items():
            safety = self.safety_stock(at)
            buffer = self.buffer(channel, at[0])
            left = on_hand - held.get(at, 0) - safety - buffer
            views[at] = ChannelView(safety, buffer, max(0, left))
        return views

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
            return self._once(key, keyless, lambda: self._stock(command))
        if isinstance(command, Reserve):
            key = ("order", command.channel, command.request_id)
            keyless = dataclasses.replace(command, request_id="")
            return self._once(key, keyless, lambda: self._reserve(command, now_us))
        if isinstance(
            command,
            SetSafetyStock | SetChannelBuffer | SetLocationGroup | SetChannelSourcing,
        ):
            key = ("policy", command.actor, command.change_id)
            keyless = dataclasses.replace(command, change_id="")
            return self._once(key, keyless, lambda: self._policy(command, now_us))

        assert isinstance(command, Confirm | Release | Fulfill | Extend)
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

    def _stock(self, command: AdjustStock | SetOnHand) -> Outcome:
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
        positions = self.positions()
        # The answer shows what may be sold at each position without a channel's view:
        # net of safety stock, with no buffer.
        views = self.channel_views("")
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

    # Reserve -----------------------------------------------------------------------------

    def _reserve(self, command: Reserve, now_us: int) -> Outcome:
        sourced = self._sourced(command)
        if isinstance(sourced, Refused):
            return sourced
        views = self.channel_views(command.channel)
        free = {at: view.available_to_sell for at, view in views.items()}
        plans: list[_Plan] = []
        for line in sourced:
            plan = self._plan(line, free)
            for location, quantity in plan.takes:
                free[(line.sku, location)] -= quantity
            plans.append(plan)

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

    def _plan(self, line: ReserveLine, free: dict[At, int]) -> _Plan:
        candidates = (line.location,) if line.location else line.locations
        if not any(sku == line.sku for sku, _ in self.on_hand):
            return _Plan([], ShortReason.UNKNOWN_SKU, 0)
        known_locations = {location for _, location in self.on_hand}
        if not any(location in known_locations for location in candidates):
            return _Plan([], ShortReason.UNKNOWN_LOCATION, 0)

        offers = [
            (location, free[(line.sku, location)])
            for location in candidates
            if (line.sku, location) in free
        ]
        # What the line could have had under its own rules: everything at its
        # locations when it may split, else the best single location.
        counts = [count for _, count in offers]
        could_have = sum(counts) if line.allow_split else max(counts, default=0)
        # The first location in preference order that covers the whole line wins, even
        # when splitting is allowed: one shipment beats two.
        for location, count in offers:
            if count >= line.quantity:
                return _Plan([(location, line.quantity)], None, could_have)

        if line.allow_split:
            takes: list[tuple[str, int]] = []
            wanted = line.quantity
            for location, count in offers:
                if count > 0 and wanted > 0:
                    takes.append((location, min(count, wanted)))
                    wanted -= min(count, wanted)
            if wanted == 0:
                return _Plan(takes, None, could_have)
            return _Plan(takes, ShortReason.INSUFFICIENT_STOCK, line.quantity - wanted)

        # Not covered anywhere and no split: a partial hold takes the location with the
        # most, the earliest preferred one on a tie.
        best_location, best_count = "", 0
        for location, count in offers:
            if count > best_count:
                best_location, best_count = location, count
        takes = [(best_location, best_count)] if best_count > 0 else []
        return _Plan(takes, ShortReason.INSUFFICIENT_STOCK, best_count)

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

    def _policy(
        self,
        command: SetSafetyStock
        | SetChannelBuffer
        | SetLocationGroup
        | SetChannelSourcing,
        now_us: int,
    ) -> Outcome:
        """Zero units, an empty group and an empty sourcing group each remove the
        setting; a group a channel sources from cannot be removed, and a channel cannot
        source from a group that does not exist."""
        by = SetBy(command.actor, command.change_id, now_us)
        tables = self.policies
        if isinstance(command, SetSafetyStock):
            for level in command.levels:
                _put(tables.safety_stock, (level.sku, level.location), level.units, by)
        elif isinstance(command, SetChannelBuffer):
            for item in command.buffers:
                _put(tables.buffers, (item.channel, item.sku), item.units, by)
        elif isinstance(command, SetLocationGroup):
            in_use = {group for (group, _), _ in tables.sourcing.values()}
            if not command.locations and command.name in in_use:
                return Refused(ErrorKind.FAILED_PRECONDITION, "GROUP_IN_USE")
            if command.locations:
                tables.groups[command.name] = (command.locations, by)
            else:
                tables.groups.pop(command.name, None)
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

    # Changes to one reservation ----------------------------------------------------------

    def _change(
        self, command: Confirm | Release | Fulfill | Extend, now_us: int
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
