"""A small reference model of the reservation semantics, for the randomized tests.

Design note. The model is meant to be read in one sitting and believed. It keeps plain
dictionaries and stores no derived numbers: the units held at a position are summed from
the active reservations whenever they are asked for, so they cannot drift. It knows
nothing of shards, write-ahead records or withheld gains, because the tests mark every
engine decision durable before the next command, and from then on a gain is simply
visible. It shares with the engine only the command and result values and the enums that
both speak; every rule here was written from the contract, not from the engine's code.

The model is one class put together from one module per family of rules: its state and
the figures derived from it (what a channel may hold, what allocations leave, which
holds are at risk) in model_state.py, policy changes and throttles in model_policies.py,
new holds in model_reserving.py, and here the commands' entry point with idempotency,
stock, and the life of a reservation after it is made. The values the tests compare
are in model_views.py.

Throttle buckets are not durable; the model never restarts, so the recovery test checks
on the engine alone that a restart fills them.

A move is judged by the channel's view of the target position and other channels' ring
fences there, as a new hold there would be. The channel's own allocation limits it only
when the target lies in another of its scopes than the source (or the source in none):
within one scope the pool lends as many units as before.

Allocations are scoped: each gives a channel a pool at the locations of one group, or at
every location (group ""). The model asks, for each location, which scope covers it; the
scopes of one sku never partly overlap, so at most one does, and the model checks that
rather than trusting it. A pool's remaining units are summed from the channel's holds in
its scope whenever they are asked for.

The channel registry is a set of names with who set each. While it is empty every
channel is accepted; otherwise a Reserve or a policy naming another channel is refused.

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
from collections.abc import Callable

from server.engine.commands import (
    AdjustmentReason,
    AdjustStock,
    Command,
    Confirm,
    Extend,
    Fulfill,
    LineQuantity,
    Move,
    PolicyCommand,
    PositionSnapshot,
    Release,
    Reserve,
    SetOnHand,
    StockResult,
)
from server.engine.errors import ErrorKind
from server.engine.model import ReservationState
from tests.engine.model_policies import PolicyRules
from tests.engine.model_reserving import ReserveRules
from tests.engine.model_state import (
    ACTIVE,
    FENCE,
    OWN,
    ModelLine,
    ModelReservation,
)
from tests.engine.model_views import (
    US_PER_S,
    Answered,
    At,
    Outcome,
    Refused,
    ReservationView,
)


class ReferenceModel(ReserveRules, PolicyRules):
    """Decides every command the engine does, for comparison with it."""

    # Commands ----------------------------------------------------------------------------

    def decide(self, command: Command, *, now_us: int) -> Outcome:
        if isinstance(command, AdjustStock | SetOnHand):
            key = ("stock", command.source, command.source_event_id)
            keyless: Command = dataclasses.replace(command, source_event_id="")
            return self._once(key, keyless, lambda: self._stock(command, now_us))
        if isinstance(command, Reserve):
            key = ("order", command.channel, command.request_id)
            keyless = dataclasses.replace(command, request_id="")
            return self._once(
                key, keyless, lambda: self._reserve_within_throttle(command, now_us)
            )
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

    def _reserve_within_throttle(self, command: Reserve, now_us: int) -> Outcome:
        # A channel the registry does not know is refused before the throttle is asked:
        # it pays no token. A throttled channel pays a token for every request decided
        # afresh, even one then refused or rejected.
        if not self.is_registered(command.channel):
            return Refused(ErrorKind.FAILED_PRECONDITION, "CHANNEL_UNKNOWN")
        throttled = self._take_token(command.channel, now_us)
        if throttled is not None:
            return throttled
        return self._reserve(command, now_us)

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
        if reservation.state not in ACTIVE:
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
        room = self._room_at_target(reservation.channel, command, now_us)
        if room < command.quantity:
            return Refused(
                ErrorKind.FAILED_PRECONDITION, "INSUFFICIENT_STOCK_AT_TARGET"
            )

        source.reserved -= command.quantity
        source.held -= command.quantity
        target = reservation.lines.setdefault(
            target_at, ModelLine(command.sku, command.to_location, 0, 0)
        )
        target.reserved += command.quantity
        target.held += command.quantity
        if source.reserved == 0:
            del reservation.lines[source_at]
        reservation.updated_us = now_us
        return Answered(self.view(reservation_id), replayed=False)

    def _room_at_target(self, channel: str, command: Move, now_us: int) -> int:
        """What the target offers the moved units: the channel's view of it, within
        what other channels' ring fences in its scope leave free. The units at the
        source count as held while the move is decided (the engine's documented
        choice: they come free once the move is durable), so even a move within one
        fenced scope needs that room. The channel's own pool covering the target
        limits the move too, unless the same pool covers the source: a move within
        one of its scopes leaves the pool's use as it was."""
        sku, target = command.sku, command.to_location
        views = self.channel_views(channel, now_us=now_us)
        if (sku, target) not in views:
            return 0
        room = views[(sku, target)].available_to_sell

        allowance = self.allowance(channel, now_us=now_us)
        scope = self.scope_at(sku, target)
        for unfenced in allowance.limits(sku, scope, (FENCE,)):
            room = min(room, max(0, unfenced))
        own = self.own_scope_at(sku, channel, target)
        if own is not None and own != self.own_scope_at(
            sku, channel, command.from_location
        ):
            room = min(room, *allowance.limits(sku, own, (OWN,)))
        return room

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
                # Shipping uses up the pool of the channel's allocation whose scope
                # covers the line, for good; releasing only stops holding it.
                channel = reservation.channel
                group = self.own_scope_at(line.sku, channel, line.location)
                if group is not None:
                    self.policies.pools[(line.sku, channel, group)] -= quantity
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


def _amounts(
    reservation: ModelReservation, wanted: tuple[LineQuantity, ...]
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
