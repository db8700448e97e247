"""The reference model's rules for new holds: where each line of a Reserve is held,
what the answer says about the lines it could not hold in full, and the most a channel
could hold of a sku now.

Lines are planned in order, each seeing what the earlier ones took, against what the
channel may hold at each position and what allocations leave it in each scope: its own
pool there, and the free units other channels' ring fences there leave. Every location
of one scope shares those limits, and a location outside every scope has none. A line
that names no location is held from its channel's location group. Where the contract
leaves a choice open, the rule states the engine's documented choice beside it.
"""

import dataclasses

from server.engine.commands import (
    LineResult,
    Reserve,
    ReserveLine,
    ReserveOutcome,
    ReserveResult,
    ShortReason,
)
from server.engine.errors import ErrorKind
from server.engine.model import ReservationState
from tests.engine.model_state import (
    BOTH,
    FENCE,
    OWN,
    Allowance,
    ModelLine,
    ModelReservation,
    ModelState,
)
from tests.engine.model_views import (
    US_PER_S,
    Answered,
    At,
    Outcome,
    Pair,
    ReachView,
    Refused,
)


@dataclasses.dataclass(slots=True)
class _Plan:
    """Where one reserve line would be held: (location, quantity) pairs in order."""

    takes: list[tuple[str, int]]
    short_reason: ShortReason | None
    available: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Places:
    """The locations a line may be held at, in preference order, with the free units
    each offers, the scope each lies in, and what allocations allow per scope."""

    sku: str
    free: list[tuple[str, int]]
    scopes: dict[str, str | None]
    allowance: Allowance

    def room(
        self,
        location: str,
        free: int,
        kinds: tuple[str, ...],
        used: dict[str | None, int],
    ) -> int:
        """What one location can give within the limits of the kinds named, `used`
        being what the line has taken in each scope already."""
        group = self.scopes[location]
        units = free
        for limit in self.allowance.limits(self.sku, group, kinds):
            units = min(units, limit - used.get(group, 0))
        return max(0, units)

    def reach(self, *, is_split: bool, kinds: tuple[str, ...]) -> int:
        """The most a line could have within the limits of the kinds named: the best
        single location, or with a split, each scope's free units up to its limits."""
        if not is_split:
            rooms = [self.room(x, free, kinds, {}) for x, free in self.free]
            return max(rooms, default=0)
        by_scope: dict[str | None, int] = {}
        for location, free in self.free:
            group = self.scopes[location]
            by_scope[group] = by_scope.get(group, 0) + free
        total = 0
        for group, free in by_scope.items():
            limits = self.allowance.limits(self.sku, group, kinds)
            total += max(0, min([free, *limits]))
        return total

    def choose(self, line: ReserveLine) -> list[tuple[str, int]]:
        """Where the line is held: (location, quantity) pairs in order."""
        # The first location in preference order that covers the whole line wins, even
        # when splitting is allowed: one shipment beats two.
        for location, free in self.free:
            if self.room(location, free, BOTH, {}) >= line.quantity:
                return [(location, line.quantity)]

        if line.allow_split:
            return self._split(line.quantity)

        # Not covered anywhere and no split: a partial hold takes the location with
        # the most, the earliest preferred one on a tie.
        best_location, best_count = "", 0
        for location, free in self.free:
            count = self.room(location, free, BOTH, {})
            if count > best_count:
                best_location, best_count = location, count
        return [(best_location, best_count)] if best_count > 0 else []

    def _split(self, wanted: int) -> list[tuple[str, int]]:
        """Take what each location gives in preference order until the line is
        covered; what one location takes, the others of its scope no longer have."""
        takes: list[tuple[str, int]] = []
        used: dict[str | None, int] = {}
        for location, free in self.free:
            count = min(self.room(location, free, BOTH, used), wanted)
            if count > 0:
                takes.append((location, count))
                wanted -= count
                group = self.scopes[location]
                used[group] = used.get(group, 0) + count
        return takes


class ReserveRules(ModelState):
    def _reserve(self, command: Reserve, now_us: int) -> Outcome:
        """Hold the lines, all or (when allowed) as much as there is. The caller has
        taken the throttle's token already."""
        sourced = self._sourced(command)
        if isinstance(sourced, Refused):
            return sourced
        plans = self._plans(command.channel, sourced, now_us)

        is_short = any(plan.short_reason is not None for plan in plans)
        if is_short and not command.allow_partial:
            plans = [_drop(plan) for plan in plans]
        if not any(plan.takes for plan in plans):
            return self._reserve_answer("", ReserveOutcome.REJECTED, command, plans, 0)

        # Zero-padded, so that the model's ids sort in the order they were made.
        reservation_id = f"m{next(self._ids):06d}"
        ttl_s = command.ttl_s or self._ttl_default_s
        expires_us = now_us + ttl_s * US_PER_S
        lines: dict[At, ModelLine] = {}
        for line, plan in zip(command.lines, plans, strict=True):
            for location, quantity in plan.takes:
                at = (line.sku, location)
                merged = lines.setdefault(at, ModelLine(line.sku, location, 0, 0))
                merged.reserved += quantity
                merged.held += quantity
        self.reservations[reservation_id] = ModelReservation(
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

    def _plans(
        self, channel: str, lines: list[ReserveLine], now_us: int
    ) -> list[_Plan]:
        """Plan the lines in order; each sees what the earlier ones took."""
        views = self.channel_views(channel, now_us=now_us)
        free = {at: view.available_to_sell for at, view in views.items()}
        allowance = self.allowance(channel, now_us=now_us)
        plans: list[_Plan] = []
        for line in lines:
            is_suppressed = self.is_suppressed(channel, line.sku, now_us=now_us)
            plan = self._plan(line, free, allowance, is_suppressed=is_suppressed)
            for location, quantity in plan.takes:
                free[(line.sku, location)] -= quantity
                allowance.take(line.sku, self.scope_at(line.sku, location), quantity)
            plans.append(plan)
        return plans

    def _plan(
        self,
        line: ReserveLine,
        free: dict[At, int],
        allowance: Allowance,
        *,
        is_suppressed: bool,
    ) -> _Plan:
        candidates = (line.location,) if line.location else line.locations
        if not any(sku == line.sku for sku, _ in self.on_hand):
            return _Plan([], ShortReason.UNKNOWN_SKU, 0)
        known_locations = {location for _, location in self.on_hand}
        if not any(location in known_locations for location in candidates):
            return _Plan([], ShortReason.UNKNOWN_LOCATION, 0)
        if is_suppressed:
            return _Plan([], ShortReason.CHANNEL_SUPPRESSED, 0)

        stocked = [x for x in candidates if (line.sku, x) in free]
        places = self._places(line.sku, stocked, free, allowance)
        # What the line could have had under its own rules and the allocations.
        available = places.reach(is_split=line.allow_split, kinds=BOTH)
        takes = places.choose(line)
        if sum(quantity for _, quantity in takes) == line.quantity:
            return _Plan(takes, None, available)
        return _Plan(takes, _short_reason(line, places), available)

    def _places(
        self, sku: str, locations: list[str], free: dict[At, int], allowance: Allowance
    ) -> _Places:
        return _Places(
            sku=sku,
            free=[(location, free[(sku, location)]) for location in locations],
            scopes={location: self.scope_at(sku, location) for location in locations},
            allowance=allowance,
        )

    def reach_views(
        self, pairs: list[Pair], within: tuple[str, ...], *, now_us: int
    ) -> dict[Pair, ReachView]:
        """What each (sku, channel) could hold now in one request that may split,
        across the stocked locations in `within` (every one when it is empty)."""
        left: dict[Pair, int] = {}
        for (sku, channel, _), units in self.remaining().items():
            left[(sku, channel)] = left.get((sku, channel), 0) + units
        views: dict[Pair, ReachView] = {}
        for channel in sorted({channel for _, channel in pairs}):
            channel_views = self.channel_views(channel, now_us=now_us)
            free = {at: view.available_to_sell for at, view in channel_views.items()}
            allowance = self.allowance(channel, now_us=now_us)
            for sku, _ in (pair for pair in pairs if pair[1] == channel):
                locations = sorted(
                    location
                    for sku_, location in free
                    if sku_ == sku and (not within or location in within)
                )
                places = self._places(sku, locations, free, allowance)
                views[(sku, channel)] = ReachView(
                    reach=places.reach(is_split=True, kinds=BOTH),
                    allocation_left=left.get((sku, channel)),
                )
        return views

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


def _short_reason(line: ReserveLine, places: _Places) -> ShortReason:
    """The channel's allocation is to blame when its own pools alone would keep the
    line below both its quantity and what stock allows, and keep it there at least
    as much as other channels' ring fences alone would; else stock is short."""
    split = line.allow_split
    stock = places.reach(is_split=split, kinds=())
    own = places.reach(is_split=split, kinds=(OWN,))
    fenced = places.reach(is_split=split, kinds=(FENCE,))
    if own < min(stock, line.quantity) and own <= fenced:
        return ShortReason.CHANNEL_ALLOCATION_EXHAUSTED
    return ShortReason.INSUFFICIENT_STOCK


def _drop(plan: _Plan) -> _Plan:
    """All or nothing: a short basket holds no line. A line that would have fitted
    says so by naming the other lines as the reason, with what it would have held."""
    if plan.short_reason is None:
        return _Plan([], ShortReason.OTHER_LINE_SHORT, plan.available)
    return _Plan([], plan.short_reason, plan.available)
