"""Reserve: where each line is held, under stock, policies and allocations."""

import dataclasses
from collections.abc import Collection

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

# A budget shared by the offers of one scope: (sku, "own" or "fence", group). "own" is
# what the channel's allocation there has left, "fence" what other channels' ring
# fences there leave it.
_Budget = tuple[str, str, str]
_KINDS = ("own", "fence")


@dataclasses.dataclass(frozen=True, slots=True)
class _Offer:
    position: Position
    free: int
    budgets: tuple[_Budget, ...]

    def units(self, left: dict[_Budget, int], kinds: tuple[str, ...] = _KINDS) -> int:
        """What this position can give within the budgets left, counting only the
        budget kinds named (to tell which limit bit)."""
        units = self.free
        for budget in self.budgets:
            if budget[1] in kinds:
                units = min(units, left[budget])
        return max(0, units)


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
        planned_budgets: dict[_Budget, int] = {}
        plans = [
            self._plan_line(line, planned, planned_budgets, command.channel)
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
        planned_budgets: dict[_Budget, int],
        channel: str,
    ) -> _LinePlan:
        """Choose where one line is held; `planned` and `planned_budgets` track what
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

        positions = [by_location[x] for x in line.candidates if x in by_location]
        offers, budgets = self._offers(positions, channel, planned, planned_budgets)
        # What the line could have had under its own rules, reported when it is short
        # or when another line's shortage rejected it.
        available = _reach(line, offers, budgets)
        takes = _choose(line, offers, budgets)
        for offer, quantity in takes:
            planned[id(offer.position)] = planned.get(id(offer.position), 0) + quantity
            for budget in offer.budgets:
                planned_budgets[budget] = planned_budgets.get(budget, 0) + quantity
        held = [(offer.position, quantity) for offer, quantity in takes]
        if sum(quantity for _, quantity in held) == line.quantity:
            return _LinePlan(held, None, available)

        return _LinePlan(held, _short_reason(line, offers, budgets), available)

    def _offers(
        self,
        positions: list[Position],
        channel: str,
        planned: dict[int, int],
        planned_budgets: dict[_Budget, int],
    ) -> tuple[list[_Offer], dict[_Budget, int]]:
        """What each position offers the channel, and the budgets of the scopes they
        share: its own allocation's remaining units and what others' fences leave."""
        now_us = self._clock.now_us()
        offers: list[_Offer] = []
        budgets: dict[_Budget, int] = {}
        for position in positions:
            sku, location = position.sku, position.location
            free = self.policies.available(position, channel, now_us)
            free -= planned.get(id(position), 0)
            shared: list[_Budget] = []
            own = self.policies.allocation_at(sku, channel, location)
            if own is not None:
                budget = (sku, "own", own)
                if budget not in budgets:
                    budgets[budget] = self.allocation_remaining(sku, channel, own)
                shared.append(budget)
            fence = self.policies.fence_at(sku, channel, location)
            if fence is not None:
                budget = (sku, "fence", fence)
                if budget not in budgets:
                    budgets[budget] = self.unfenced_units(sku, channel, fence)
                shared.append(budget)
            offers.append(_Offer(position, max(0, free), tuple(shared)))
        for budget in budgets:
            budgets[budget] -= planned_budgets.get(budget, 0)
        return offers, budgets

    def channel_reach(
        self, sku: str, channel: str, locations: Collection[str] = ()
    ) -> int:
        """The most a channel could hold of a sku now, across the given locations
        (all when none are given): what stock, its allocations and others' ring
        fences allow together."""
        positions = [
            position
            for location, position in sorted(self.positions_of(sku).items())
            if not locations or location in locations
        ]
        offers, budgets = self._offers(positions, channel, {}, {})
        return _reach(None, offers, budgets)

    def allocation_left(self, sku: str, channel: str) -> int | None:
        """Units the channel's allocations of a sku have left, summed over their
        scopes; None when it has none."""
        scopes = [g for c, g in self.policies.allocations.get(sku, ()) if c == channel]
        if not scopes:
            return None
        return sum(self.allocation_remaining(sku, channel, g) for g in scopes)

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
                self.add_channel_held(
                    command.channel, position.sku, position.location, quantity
                )

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


def _reach(
    line: ReserveLine | None,
    offers: list[_Offer],
    budgets: dict[_Budget, int],
    kinds: tuple[str, ...] = _KINDS,
) -> int:
    """The most a line could be given: the best single location, or with a split
    (or no line: a channel's whole view) everything the offers give in turn."""
    if line is not None and not line.allow_split:
        return max((offer.units(budgets, kinds) for offer in offers), default=0)
    left = dict(budgets)
    total = 0
    for offer in offers:
        units = offer.units(left, kinds)
        total += units
        for budget in offer.budgets:
            left[budget] -= units
    return total


def _short_reason(
    line: ReserveLine, offers: list[_Offer], budgets: dict[_Budget, int]
) -> ShortReason:
    """The channel's own allocation is named when it alone keeps the line short, and
    at least as much as other channels' ring fences do; otherwise stock is short."""
    stock = _reach(line, offers, budgets, ())
    own = _reach(line, offers, budgets, ("own",))
    fenced = _reach(line, offers, budgets, ("fence",))
    if own < min(stock, line.quantity) and own <= fenced:
        return ShortReason.CHANNEL_ALLOCATION_EXHAUSTED
    return ShortReason.INSUFFICIENT_STOCK


def _choose(
    line: ReserveLine, offers: list[_Offer], budgets: dict[_Budget, int]
) -> list[tuple[_Offer, int]]:
    """The first location that covers the line wins; else split, or the best single
    location for a partial hold (dropped later if all-or-nothing)."""
    for offer in offers:
        if offer.units(budgets) >= line.quantity:
            return [(offer, line.quantity)]
    if line.allow_split:
        left = dict(budgets)
        takes: list[tuple[_Offer, int]] = []
        wanted = line.quantity
        for offer in offers:
            units = min(offer.units(left), wanted)
            if units > 0:
                takes.append((offer, units))
                wanted -= units
                for budget in offer.budgets:
                    left[budget] -= units
        return takes
    best = max(offers, key=lambda offer: offer.units(budgets), default=None)
    if best is None or best.units(budgets) == 0:
        return []
    return [(best, best.units(budgets))]
