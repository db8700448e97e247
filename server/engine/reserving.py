"""Reserve: where each line is held, under stock, policies and allocations."""

import dataclasses

from server.engine.commands import (
    LineResult,
    Reserve,
    ReserveLine,
    ReserveOutcome,
    ReserveResult,
    ShortReason,
)
from server.engine.errors import (
    FailedPrecondition,
    ensure,
)
from server.engine.model import (
    Position,
    Reservation,
    ReservationLine,
    ReservationState,
)
from server.engine.shard import shard_of
from server.engine.state import US_PER_S, Decision, EngineState


@dataclasses.dataclass(slots=True)
class _LinePlan:
    takes: list[tuple[Position, int]]
    short_reason: ShortReason | None
    quantity_available: int

    @property
    def quantity(self) -> int:
        return sum(quantity for _, quantity in self.takes)


class Reserving(EngineState):
    def _reserve(self, command: Reserve, key: tuple[str, str]) -> Decision:
        now_us = self._clock.now_us()
        lines = [
            self._sourced(line, index, command.channel)
            for index, line in enumerate(command.lines)
        ]
        planned: dict[int, int] = {}
        planned_sku: dict[str, int] = {}
        plans = [
            self._plan_line(line, planned, planned_sku, command.channel)
            for line in lines
        ]

        is_short = any(plan.short_reason is not None for plan in plans)
        if is_short and not command.allow_partial:
            plans = [self._reject_plan(plan) for plan in plans]
        if not any(plan.takes for plan in plans):
            result = ReserveResult(
                reservation_id="",
                outcome=ReserveOutcome.REJECTED,
                lines=self._line_results(command.lines, plans),
                expires_us=0,
            )
            return self._answer(
                key,
                command,
                result,
                shard=shard_of(command.lines[0].sku, len(self.shards)),
            )

        ttl_s = command.ttl_s or self.limits.ttl_default_s
        reservation = self._hold(command, plans, now_us=now_us, ttl_s=ttl_s)
        result = ReserveResult(
            reservation_id=reservation.reservation_id,
            outcome=(
                ReserveOutcome.PARTIALLY_RESERVED
                if is_short
                else ReserveOutcome.RESERVED
            ),
            lines=self._line_results(command.lines, plans),
            expires_us=reservation.expires_us,
        )
        fx = [
            [line.sku, line.location, 0, line.quantity_held]
            for line in reservation.lines
        ]
        record = self._record(reservation, "reserve", fx, now_us)
        return self._decision(key, command, result, record=record, gains=[])

    def _sourced(self, line: ReserveLine, index: int, channel: str) -> ReserveLine:
        """A line without a location draws from its channel's default group."""
        if line.candidates:
            return line
        sourcing = self.policies.sourcing_of(channel)
        if sourcing is None:
            raise FailedPrecondition(
                "CHANNEL_HAS_NO_SOURCING",
                f"lines[{index}] names no location and channel {channel} has no "
                "default location group",
                field=f"lines[{index}].location",
            )
        default, locations = sourcing
        return dataclasses.replace(
            line, locations=locations, allow_split=default.allow_split
        )

    def _plan_line(
        self,
        line: ReserveLine,
        planned: dict[int, int],
        planned_sku: dict[str, int],
        channel: str,
    ) -> _LinePlan:
        """Choose where one line is held; `planned` and `planned_sku` track what
        earlier lines of the same request took."""
        shard = self.shards[shard_of(line.sku, len(self.shards))]
        by_location = shard.positions.get(line.sku)
        if not by_location:
            return _LinePlan([], ShortReason.UNKNOWN_SKU, 0)
        if not any(location in self.locations for location in line.candidates):
            return _LinePlan([], ShortReason.UNKNOWN_LOCATION, 0)
        now_us = self._clock.now_us()
        if self.policies.is_suppressed(channel, line.sku, now_us):
            return _LinePlan([], ShortReason.CHANNEL_SUPPRESSED, 0)

        offers: list[tuple[Position, int]] = []
        for location in line.candidates:
            position = by_location.get(location)
            if position is not None:
                free = self.policies.available(position, channel, now_us)
                free -= planned.get(id(position), 0)
                offers.append((position, max(0, free)))
        # What the line could have had under its own rules, reported when it is short
        # or when another line's shortage rejected it.
        if line.allow_split:
            available = sum(free for _, free in offers)
        else:
            available = max((free for _, free in offers), default=0)
        cap, is_allocation_cap = self._cap(line.sku, channel, planned_sku)
        if cap < line.quantity:
            offers = [(position, min(free, cap)) for position, free in offers]

        takes = self._choose(line, offers, min(line.quantity, cap))
        for position, quantity in takes:
            planned[id(position)] = planned.get(id(position), 0) + quantity
        taken = sum(quantity for _, quantity in takes)
        planned_sku[line.sku] = planned_sku.get(line.sku, 0) + taken
        if taken == line.quantity:
            return _LinePlan(takes, None, min(available, cap))
        reason = ShortReason.INSUFFICIENT_STOCK
        if is_allocation_cap and cap < min(available, line.quantity):
            reason = ShortReason.CHANNEL_ALLOCATION_EXHAUSTED
        return _LinePlan(takes, reason, min(available, cap))

    def _cap(
        self, sku: str, channel: str, planned_sku: dict[str, int]
    ) -> tuple[int, bool]:
        """The most `channel` may still hold of `sku` in total, and whether its own
        allocation (rather than another's ring fence) sets that limit."""
        cap = self.limits.on_hand_max
        by_channel = self.policies.allocations.get(sku)
        if not by_channel:
            return cap, False
        planned = planned_sku.get(sku, 0)
        is_allocation_cap = False
        if channel in by_channel:
            cap = self.allocation_remaining(sku, channel) - planned
            is_allocation_cap = True
        unfenced = self.unfenced_units(sku, channel) - planned
        if unfenced < cap:
            cap, is_allocation_cap = unfenced, False
        return max(0, cap), is_allocation_cap

    def channel_cap(self, sku: str, channel: str) -> tuple[int, bool]:
        """The most a channel could hold of a sku now, across locations, and whether
        it has an allocation of it."""
        cap, _ = self._cap(sku, channel, {})
        return cap, self.policies.allocation_of(sku, channel) is not None

    @staticmethod
    def _choose(
        line: ReserveLine, offers: list[tuple[Position, int]], wanted_max: int
    ) -> list[tuple[Position, int]]:
        """The first location that covers the line wins; else split, or the best
        single location for a partial hold (dropped later if all-or-nothing)."""
        for position, free in offers:
            if free >= line.quantity:
                return [(position, line.quantity)]
        if line.allow_split:
            takes: list[tuple[Position, int]] = []
            wanted = wanted_max
            for position, free in offers:
                if free > 0 and wanted > 0:
                    takes.append((position, min(free, wanted)))
                    wanted -= min(free, wanted)
            return takes
        best = max(offers, key=lambda offer: offer[1], default=None)
        return [best] if best is not None and best[1] > 0 else []

    @staticmethod
    def _reject_plan(plan: _LinePlan) -> _LinePlan:
        if plan.short_reason is None:
            return _LinePlan([], ShortReason.OTHER_LINE_SHORT, plan.quantity_available)
        return _LinePlan([], plan.short_reason, plan.quantity_available)

    @staticmethod
    def _line_results(
        lines: tuple[ReserveLine, ...], plans: list[_LinePlan]
    ) -> tuple[LineResult, ...]:
        return tuple(
            LineResult(
                line_index=index,
                sku=line.sku,
                quantity_requested=line.quantity,
                quantity_held=plan.quantity,
                held_at=tuple((p.location, quantity) for p, quantity in plan.takes),
                short_reason=plan.short_reason,
                quantity_available=plan.quantity_available,
            )
            for index, (line, plan) in enumerate(zip(lines, plans, strict=True))
        )

    def _hold(
        self, command: Reserve, plans: list[_LinePlan], *, now_us: int, ttl_s: int
    ) -> Reservation:
        merged: dict[tuple[str, str], int] = {}
        for plan in plans:
            for position, quantity in plan.takes:
                at = (position.sku, position.location)
                merged[at] = merged.get(at, 0) + quantity
                position.held += quantity
                position.check()
                key = (command.channel, position.sku)
                self.channel_held[key] = self.channel_held.get(key, 0) + quantity

        first_sku = next(iter(merged))[0]
        reservation = Reservation(
            reservation_id=self._unused_id(),
            channel=command.channel,
            order_ref=command.order_ref,
            state=ReservationState.PENDING,
            lines=[
                ReservationLine(sku, location, quantity, quantity)
                for (sku, location), quantity in merged.items()
            ],
            created_us=now_us,
            updated_us=now_us,
            expires_us=now_us + ttl_s * US_PER_S,
            home_shard=shard_of(first_sku, len(self.shards)),
        )
        reservation.check()
        self.reservations[reservation.reservation_id] = reservation
        home = self.shards[reservation.home_shard]
        home.schedule_expiry(reservation.expires_us, reservation.reservation_id)
        return reservation

    def _unused_id(self) -> str:
        reservation_id = self._new_id()
        ensure(
            reservation_id not in self.reservations, "reservation id generated twice"
        )
        return reservation_id
