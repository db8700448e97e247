"""The reservation engine: decides every command synchronously, in memory.

Design note. `decide` checks a command, looks up its idempotency key, changes state and
returns a Decision: the answer, the write-ahead record and request-log row that must be
durable before the answer is sent, and the availability gains that must wait for that.
The caller (the ledger) writes those and calls `mark_durable` or, when the write failed,
throws this engine away and recovers a new one from Postgres. Because deciding never
awaits, a multi-line reservation across shards is atomic without locks.

Holds count against available-to-sell from the moment they are decided; gains (release,
expiry, receipts) are withheld until durable. So a write that fails can leave stock
under-promised for a moment, never promised twice.
"""

import base64
import binascii
import dataclasses
import secrets
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from server.clock import Clock
from server.engine.commands import (
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
    ReservationCommand,
    ReservationResult,
    Reserve,
    ReserveLine,
    ReserveOutcome,
    ReserveResult,
    Result,
    SetChannelAllocation,
    SetChannelBuffer,
    SetControl,
    SetLocationGroup,
    SetOnHand,
    SetSafetyStock,
    ShortReason,
    StockCommand,
    StockResult,
    check_count,
    check_id,
    fingerprint,
    result_from_json,
    validate_policy_command,
    validate_reservation_command,
    validate_reserve,
    validate_stock_command,
)
from server.engine.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Overloaded,
    ensure,
)
from server.engine.limits import Limits
from server.engine.model import (
    Position,
    Reservation,
    ReservationLine,
    ReservationState,
)
from server.engine.policy import Attribution, Control, ControlKind, Policies
from server.engine.shard import Shard, shard_of

US_PER_S = 1_000_000


@dataclasses.dataclass(frozen=True, slots=True)
class WalRecord:
    """One commitment, as the write-ahead table stores it.

    `body["fx"]` lists [sku, location, on_hand_delta, held_delta] per position touched;
    `body["rsv"]`, when present, is the reservation as it stands after the record.
    """

    shard: int
    seq: int
    kind: str
    reservation_id: str
    body: dict[str, Any]
    recorded_us: int


@dataclasses.dataclass(frozen=True, slots=True)
class RequestRow:
    """An answered request, kept so that a retry gets the same answer."""

    scope: str
    request_id: str
    fingerprint: str
    result: dict[str, Any]
    created_us: int


@dataclasses.dataclass(slots=True)
class Decision:
    result: Result
    shard: int
    record: WalRecord | None
    request: RequestRow | None
    # Availability gains to make visible once durable.
    gains: list[tuple[Position, int]]
    # Allocation gains, per (channel, sku), likewise.
    channel_gains: list[tuple[tuple[str, str], int]] = dataclasses.field(
        default_factory=list
    )
    # On-hand and pool changes that stop being pending once durable.
    on_hand_pending: list[tuple[Position, int]] = dataclasses.field(
        default_factory=list
    )
    pool_pending: list[tuple[tuple[str, str], int]] = dataclasses.field(
        default_factory=list
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Replay:
    """The command was seen before. While its first answer is not durable yet the
    caller must wait for it (`durable` False) before answering."""

    result: Result
    durable: bool
    key: tuple[str, str]


@dataclasses.dataclass(slots=True)
class _Remembered:
    fingerprint: str
    result: Result
    created_us: int
    durable: bool


@dataclasses.dataclass(slots=True)
class _LinePlan:
    takes: list[tuple[Position, int]]
    short_reason: ShortReason | None
    quantity_available: int

    @property
    def quantity(self) -> int:
        return sum(quantity for _, quantity in self.takes)


@dataclasses.dataclass(frozen=True, slots=True)
class EngineStats:
    reservations: int
    active_reservations: int
    positions: int
    remembered_requests: int
    undurable_requests: int


def new_reservation_id() -> str:
    return "r" + secrets.token_hex(12)


class Engine:
    def __init__(
        self,
        *,
        shard_count: int,
        clock: Clock,
        limits: Limits | None = None,
        idempotency_retention_s: int = 24 * 3600,
        new_id: Callable[[], str] = new_reservation_id,
    ) -> None:
        assert shard_count > 0
        self.limits = limits or Limits()
        self.shards = [Shard(index) for index in range(shard_count)]
        self.reservations: dict[str, Reservation] = {}
        self.locations: set[str] = set()
        self._clock = clock
        self._retention_us = idempotency_retention_s * US_PER_S
        self._new_id = new_id
        self._remembered: dict[tuple[str, str], _Remembered] = {}
        # Finished reservations in the order they finished, for pruning after retention.
        self._finished: deque[tuple[int, str]] = deque()
        self._undurable = 0
        # Recovery bookkeeping: held per position as the records said, to compare with
        # what the recovered reservations hold.
        self._replayed_held: dict[tuple[str, str], int] = {}
        self.policies = Policies()
        # Units each channel holds per sku, and releases of them not yet durable:
        # what an allocation's pool has lent out.
        self.channel_held: dict[tuple[str, str], int] = {}
        self.channel_withheld: dict[tuple[str, str], int] = {}
        # Throttled channels' token buckets: channel -> (tokens, when counted).
        self._buckets: dict[str, tuple[float, int]] = {}

    # Commands ---------------------------------------------------------------------------

    def decide(self, command: Command) -> Decision | Replay:
        """Check and apply one command. Raises EngineError for refused commands."""
        if isinstance(command, Reserve):
            validate_reserve(command, self.limits)
            key = ("ch:" + command.channel, command.request_id)
            replay = self._replay(key, command)
            if replay is not None:
                return replay
            self._check_throttle(command.channel)
            return self._reserve(command, key)
        if isinstance(command, StockCommand):
            validate_stock_command(command, self.limits)
            key = ("src:" + command.source, command.source_event_id)
            return self._replay(key, command) or self._stock(command, key)
        if isinstance(command, PolicyCommand):
            validate_policy_command(command, self.limits)
            key = ("pol:" + command.actor, command.change_id)
            return self._replay(key, command) or self._policy(command, key)
        validate_reservation_command(command, self.limits)
        reservation = self._reservation(command.reservation_id)
        key = ("ch:" + reservation.channel, command.request_id)
        return self._replay(key, command) or self._change(command, reservation, key)

    def mark_durable(self, decision: Decision) -> None:
        """The decision's writes are committed: release its gains, trust its answer."""
        for position, gain in decision.gains:
            position.withheld -= gain
            position.check()
        for key, gain in decision.channel_gains:
            self.channel_withheld[key] -= gain
            ensure(self.channel_withheld[key] >= 0, f"negative withheld for {key}")
        for position, delta in decision.on_hand_pending:
            position.on_hand_pending -= delta
        for pool_key, delta in decision.pool_pending:
            self.policies.pool_pending[pool_key] -= delta
        if decision.request is not None:
            request = decision.request
            remembered = self._remembered[(request.scope, request.request_id)]
            ensure(not remembered.durable, "a request was made durable twice")
            remembered.durable = True
            self._undurable -= 1

    def expire_due(self, *, count_max: int) -> list[Decision]:
        """Expire pending holds whose time has come, at most count_max of them."""
        now_us = self._clock.now_us()
        decisions: list[Decision] = []
        for shard in self.shards:
            while len(decisions) < count_max:
                reservation_id = shard.pop_due(now_us)
                if reservation_id is None:
                    break
                reservation = self.reservations.get(reservation_id)
                if reservation is None or not self._is_due(reservation, now_us):
                    continue
                decisions.append(self._expire(reservation, now_us))
        return decisions

    def _is_due(self, reservation: Reservation, now_us: int) -> bool:
        return (
            reservation.state is ReservationState.PENDING
            and 0 < reservation.expires_us <= now_us
        )

    # Reserve ----------------------------------------------------------------------------

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
        fence = sum(
            self.allocation_remaining(sku, other)
            for other, (exclusive, _) in by_channel.items()
            if exclusive and other != channel
        )
        if fence:
            unfenced = self._free_units(sku) - planned - fence
            if unfenced < cap:
                cap, is_allocation_cap = unfenced, False
        return max(0, cap), is_allocation_cap

    def channel_cap(self, sku: str, channel: str) -> tuple[int, bool]:
        """The most a channel could hold of a sku now, across locations, and whether
        it has an allocation of it."""
        cap, _ = self._cap(sku, channel, {})
        return cap, self.policies.allocation_of(sku, channel) is not None

    def allocation_remaining(self, sku: str, channel: str) -> int:
        """Units of the channel's pool it may still hold (never below zero)."""
        key = (channel, sku)
        lent = self.channel_held.get(key, 0) + self.channel_withheld.get(key, 0)
        return max(0, self.policies.pools.get((sku, channel), 0) - lent)

    def _free_units(self, sku: str) -> int:
        """Units of a sku free to promise anywhere, before channel buffers."""
        now_us = self._clock.now_us()
        return sum(
            self.policies.available(p, "", now_us)
            for p in self.positions_of(sku).values()
        )

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

    # Confirm, release, fulfil, extend, expire --------------------------------------------

    def _reservation(self, reservation_id: str) -> Reservation:
        reservation = self.reservations.get(reservation_id)
        if reservation is None:
            raise NotFound(
                "RESERVATION_NOT_FOUND",
                f"no reservation {reservation_id}",
                field="reservation_id",
            )
        return reservation

    def _change(
        self,
        command: ReservationCommand,
        reservation: Reservation,
        key: tuple[str, str],
    ) -> Decision:
        now_us = self._clock.now_us()
        if self._is_due(reservation, now_us) and not isinstance(command, Release):
            raise FailedPrecondition(
                "RESERVATION_EXPIRED",
                f"reservation {reservation.reservation_id} expired",
                field="reservation_id",
            )
        if isinstance(command, Confirm):
            return self._confirm(command, reservation, key, now_us)
        if isinstance(command, Extend):
            return self._extend(command, reservation, key, now_us)
        if isinstance(command, Move):
            return self._move(command, reservation, key, now_us)
        return self._give_back(command, reservation, key, now_us)

    def _move(
        self, command: Move, reservation: Reservation, key: tuple[str, str], now_us: int
    ) -> Decision:
        """Held units change location atomically; the source's units count as freed
        once durable, like a release."""
        if not reservation.is_active:
            raise FailedPrecondition(
                f"RESERVATION_{reservation.state.name}",
                f"reservation {reservation.reservation_id} is {reservation.state.value}",
                field="reservation_id",
            )
        source = next(
            (
                line
                for line in reservation.lines
                if (line.sku, line.location) == (command.sku, command.from_location)
            ),
            None,
        )
        if source is None or source.quantity_held < command.quantity:
            raise FailedPrecondition(
                "QUANTITY_EXCEEDS_HELD",
                f"{command.quantity} of {command.sku} at {command.from_location} asked "
                f"for; {source.quantity_held if source else 0} held",
                field="quantity",
            )
        target = self.shards[shard_of(command.sku, len(self.shards))].position(
            command.sku, command.to_location
        )
        available = (
            self.policies.available(target, reservation.channel, now_us)
            if target
            else 0
        )
        if target is None or available < command.quantity:
            raise FailedPrecondition(
                "INSUFFICIENT_STOCK_AT_TARGET",
                f"{command.to_location} can hold {available} of {command.sku}; "
                f"{command.quantity} asked for",
                field="to_location",
            )

        origin = self._position(command.sku, command.from_location)
        source.quantity_reserved -= command.quantity
        source.quantity_held -= command.quantity
        origin.held -= command.quantity
        origin.withheld += command.quantity
        target.held += command.quantity
        origin.check()
        target.check()
        self._add_to_line(
            reservation, command.sku, command.to_location, command.quantity
        )
        if source.quantity_reserved == 0:
            reservation.lines.remove(source)
        reservation.move_to(reservation.state, now_us=now_us)

        fx = [
            [command.sku, command.from_location, 0, -command.quantity],
            [command.sku, command.to_location, 0, command.quantity],
        ]
        record = self._record(reservation, "move", fx, now_us)
        result = ReservationResult(reservation.copy())
        gains = [(origin, command.quantity)]
        return self._decision(key, command, result, record=record, gains=gains)

    @staticmethod
    def _add_to_line(
        reservation: Reservation, sku: str, location: str, quantity: int
    ) -> None:
        for line in reservation.lines:
            if (line.sku, line.location) == (sku, location):
                line.quantity_reserved += quantity
                line.quantity_held += quantity
                return
        reservation.lines.append(ReservationLine(sku, location, quantity, quantity))

    def _confirm(
        self,
        command: Confirm,
        reservation: Reservation,
        key: tuple[str, str],
        now_us: int,
    ) -> Decision:
        if reservation.state is ReservationState.CONFIRMED:
            # Confirming twice is harmless; answer with the reservation as it stands.
            result = ReservationResult(reservation.copy())
            return self._answer(key, command, result, shard=reservation.home_shard)
        reservation.move_to(ReservationState.CONFIRMED, now_us=now_us)
        record = self._record(reservation, "confirm", [], now_us)
        result = ReservationResult(reservation.copy())
        return self._decision(key, command, result, record=record, gains=[])

    def _extend(
        self,
        command: Extend,
        reservation: Reservation,
        key: tuple[str, str],
        now_us: int,
    ) -> Decision:
        if reservation.state is not ReservationState.PENDING:
            raise FailedPrecondition(
                f"RESERVATION_{reservation.state.name}",
                f"only a pending hold can be extended; {reservation.reservation_id} "
                f"is {reservation.state.value}",
                field="reservation_id",
            )
        expires_us = now_us + command.ttl_s * US_PER_S
        if expires_us <= reservation.expires_us:
            raise FailedPrecondition(
                "EXTEND_WOULD_SHORTEN",
                f"ttl_seconds={command.ttl_s} would not push the hold past its "
                "current expiry",
                field="ttl_seconds",
            )
        reservation.expires_us = expires_us
        reservation.move_to(ReservationState.PENDING, now_us=now_us)
        home = self.shards[reservation.home_shard]
        home.schedule_expiry(expires_us, reservation.reservation_id)
        record = self._record(reservation, "extend", [], now_us)
        result = ReservationResult(reservation.copy())
        return self._decision(key, command, result, record=record, gains=[])

    def _give_back(
        self,
        command: Release | Fulfill,
        reservation: Reservation,
        key: tuple[str, str],
        now_us: int,
    ) -> Decision:
        is_fulfil = isinstance(command, Fulfill)
        if not reservation.is_active or (
            is_fulfil and reservation.state is not ReservationState.CONFIRMED
        ):
            raise FailedPrecondition(
                f"RESERVATION_{reservation.state.name}",
                f"reservation {reservation.reservation_id} is "
                f"{reservation.state.value}; it cannot be "
                f"{'fulfilled (confirm it first)' if is_fulfil else 'released'}",
                field="reservation_id",
            )
        amounts = self._amounts(command.lines, reservation)
        if is_fulfil:
            self._check_can_ship(amounts)

        fx: list[list[Any]] = []
        gains: list[tuple[Position, int]] = []
        channel_gains: list[tuple[tuple[str, str], int]] = []
        pool_fx: list[list[Any]] = []
        on_hand_pending: list[tuple[Position, int]] = []
        for line, quantity in amounts:
            position = self._position(line.sku, line.location)
            line.quantity_held -= quantity
            position.held -= quantity
            channel_key = (reservation.channel, line.sku)
            self.channel_held[channel_key] -= quantity
            if is_fulfil:
                line.quantity_fulfilled += quantity
                position.on_hand -= quantity
                position.on_hand_pending -= quantity
                on_hand_pending.append((position, -quantity))
                fx.append([line.sku, line.location, -quantity, -quantity])
                pool_fx.extend(
                    self._consume_pool(line.sku, reservation.channel, quantity)
                )
            else:
                line.quantity_released += quantity
                position.withheld += quantity
                gains.append((position, quantity))
                self._withhold_for_channel(channel_key, quantity, channel_gains)
                fx.append([line.sku, line.location, 0, -quantity])
            position.check()

        self._settle(reservation, now_us)
        record = self._record(
            reservation, "fulfill" if is_fulfil else "release", fx, now_us
        )
        if pool_fx:
            record.body["pools"] = pool_fx
        result = ReservationResult(reservation.copy())
        decision = self._decision(key, command, result, record=record, gains=gains)
        decision.channel_gains = channel_gains
        decision.on_hand_pending = on_hand_pending
        decision.pool_pending = [((sku, ch), delta) for sku, ch, delta in pool_fx]
        return decision

    def _consume_pool(self, sku: str, channel: str, quantity: int) -> list[list[Any]]:
        """Fulfilment uses up allocated units for good; recorded as a pool delta."""
        if self.policies.allocation_of(sku, channel) is None:
            return []
        self.policies.add_to_pool(sku, channel, -quantity)
        pending = self.policies.pool_pending
        pending[(sku, channel)] = pending.get((sku, channel), 0) - quantity
        return [[sku, channel, -quantity]]

    def _withhold_for_channel(
        self,
        key: tuple[str, str],
        quantity: int,
        channel_gains: list[tuple[tuple[str, str], int]],
    ) -> None:
        """Units given back to a channel's allocation count once durable."""
        self.channel_withheld[key] = self.channel_withheld.get(key, 0) + quantity
        channel_gains.append((key, quantity))

    def _amounts(
        self, wanted: tuple[LineQuantity, ...], reservation: Reservation
    ) -> list[tuple[ReservationLine, int]]:
        """Map requested quantities onto the reservation's lines; empty means all."""
        if not wanted:
            return [
                (line, line.quantity_held)
                for line in reservation.lines
                if line.quantity_held
            ]
        by_position = {(line.sku, line.location): line for line in reservation.lines}
        totals: dict[tuple[str, str], int] = {}
        for index, item in enumerate(wanted):
            at = (item.sku, item.location)
            if at not in by_position:
                raise InvalidArgument(
                    "LINE_NOT_IN_RESERVATION",
                    f"reservation {reservation.reservation_id} holds nothing of "
                    f"{item.sku} at {item.location}",
                    field=f"lines[{index}]",
                )
            totals[at] = totals.get(at, 0) + item.quantity
            if totals[at] > by_position[at].quantity_held:
                raise FailedPrecondition(
                    "QUANTITY_EXCEEDS_HELD",
                    f"{totals[at]} of {item.sku} at {item.location} asked for; "
                    f"{by_position[at].quantity_held} held",
                    field=f"lines[{index}].quantity",
                )
        return [(by_position[at], quantity) for at, quantity in totals.items()]

    def _check_can_ship(self, amounts: list[tuple[ReservationLine, int]]) -> None:
        """A count or damage report can leave on-hand below what is held; shipping more
        than on-hand then needs a stock correction first, not a negative count."""
        for line, quantity in amounts:
            on_hand = self._position(line.sku, line.location).on_hand
            if quantity > on_hand:
                raise FailedPrecondition(
                    "ON_HAND_SHORT",
                    f"fulfilling {quantity} of {line.sku} at {line.location} but only "
                    f"{on_hand} on hand; correct the stock count first",
                    field="lines",
                )

    def _settle(self, reservation: Reservation, now_us: int) -> None:
        """After a release or fulfilment: finished once nothing is held."""
        if reservation.quantity_held > 0:
            reservation.move_to(reservation.state, now_us=now_us)
            return
        fulfilled = any(line.quantity_fulfilled for line in reservation.lines)
        final = ReservationState.FULFILLED if fulfilled else ReservationState.RELEASED
        reservation.move_to(final, now_us=now_us)
        self._finished.append((now_us, reservation.reservation_id))

    def _expire(self, reservation: Reservation, now_us: int) -> Decision:
        fx: list[list[Any]] = []
        gains: list[tuple[Position, int]] = []
        channel_gains: list[tuple[tuple[str, str], int]] = []
        for line in reservation.lines:
            quantity = line.quantity_held
            if quantity == 0:
                continue
            position = self._position(line.sku, line.location)
            line.quantity_held = 0
            line.quantity_released += quantity
            position.held -= quantity
            position.withheld += quantity
            position.check()
            gains.append((position, quantity))
            channel_key = (reservation.channel, line.sku)
            self.channel_held[channel_key] -= quantity
            self._withhold_for_channel(channel_key, quantity, channel_gains)
            fx.append([line.sku, line.location, 0, -quantity])
        reservation.move_to(ReservationState.EXPIRED, now_us=now_us)
        self._finished.append((now_us, reservation.reservation_id))
        record = self._record(reservation, "expire", fx, now_us)
        return Decision(
            result=ReservationResult(reservation.copy()),
            shard=record.shard,
            record=record,
            request=None,
            gains=gains,
            channel_gains=channel_gains,
        )

    def _position(self, sku: str, location: str) -> Position:
        position = self.shards[shard_of(sku, len(self.shards))].position(sku, location)
        ensure(position is not None, f"a reservation holds unknown {sku}@{location}")
        assert position is not None
        return position

    # Stock ------------------------------------------------------------------------------

    def _stock(self, command: StockCommand, key: tuple[str, str]) -> Decision:
        now_us = self._clock.now_us()
        deltas = self._stock_deltas(command)

        fx: list[list[Any]] = []
        gains: list[tuple[Position, int]] = []
        touched: list[Position] = []
        on_hand_pending: list[tuple[Position, int]] = []
        for (sku, location), delta in deltas.items():
            shard = self.shards[shard_of(sku, len(self.shards))]
            position = shard.position_or_new(sku, location)
            self.locations.add(location)
            position.on_hand += delta
            position.on_hand_pending += delta
            on_hand_pending.append((position, delta))
            if delta > 0:
                position.withheld += delta
                gains.append((position, delta))
            position.check()
            touched.append(position)
            # Zero deltas are recorded too: they make the position known after replay.
            fx.append([sku, location, delta, 0])

        home = shard_of(next(iter(deltas))[0], len(self.shards))
        body: dict[str, Any] = {"fx": fx, "src": command.source}
        if isinstance(command, AdjustStock):
            body["reasons"] = [a.reason.value for a in command.adjustments if a.reason]
        kind = "adjust" if isinstance(command, AdjustStock) else "set_on_hand"
        record = self._stock_record(home, kind, body, now_us)
        result = StockResult(tuple(self._snapshot(p, pending=gains) for p in touched))
        decision = self._decision(key, command, result, record=record, gains=gains)
        decision.on_hand_pending = on_hand_pending
        return decision

    def _stock_deltas(self, command: StockCommand) -> dict[tuple[str, str], int]:
        """Net on-hand change per position; refuses the whole command if any position
        would leave [0, on_hand_max]."""
        deltas: dict[tuple[str, str], int] = {}
        if isinstance(command, SetOnHand):
            for count in command.counts:
                at = (count.sku, count.location)
                deltas[at] = count.on_hand - self._durable_on_hand(*at)
            return deltas
        last_index: dict[tuple[str, str], int] = {}
        for index, adjustment in enumerate(command.adjustments):
            at = (adjustment.sku, adjustment.location)
            deltas[at] = deltas.get(at, 0) + adjustment.delta
            last_index[at] = index
        # Only the net change per position counts: [-10, +15] at 0 is a +5.
        for at, delta in deltas.items():
            after = self._on_hand(*at) + delta
            field = f"adjustments[{last_index[at]}].delta"
            if after < 0:
                raise FailedPrecondition(
                    "ON_HAND_WOULD_GO_NEGATIVE",
                    f"on-hand of {at[0]} at {at[1]} would become {after}",
                    field=field,
                )
            if after > self.limits.on_hand_max:
                raise FailedPrecondition(
                    "ON_HAND_TOO_LARGE",
                    f"on-hand of {at[0]} at {at[1]} would become {after}; "
                    f"at most {self.limits.on_hand_max}",
                    field=field,
                )
        return deltas

    def _on_hand(self, sku: str, location: str) -> int:
        position = self.shards[shard_of(sku, len(self.shards))].position(sku, location)
        return position.on_hand if position else 0

    def _durable_on_hand(self, sku: str, location: str) -> int:
        """On-hand as Postgres has it: without changes whose writes are in flight."""
        position = self.shards[shard_of(sku, len(self.shards))].position(sku, location)
        return position.on_hand - position.on_hand_pending if position else 0

    def _snapshot(
        self, position: Position, *, pending: list[tuple[Position, int]]
    ) -> PositionSnapshot:
        """The position as it will stand once this command's writes are durable."""
        gain = sum(quantity for p, quantity in pending if p is position)
        free = position.on_hand - position.held - position.withheld + gain
        free -= self.policies.safety(position, self._clock.now_us())
        return PositionSnapshot(
            sku=position.sku,
            location=position.location,
            on_hand=position.on_hand,
            held=position.held,
            available_to_sell=max(0, free),
        )

    # Policies ---------------------------------------------------------------------------

    def _policy(self, command: PolicyCommand, key: tuple[str, str]) -> Decision:
        now_us = self._clock.now_us()
        change = self._policy_change(command)

        attribution = Attribution(command.actor, command.change_id, now_us)
        self.policies.apply(change, attribution)
        # Shard 0 carries every policy record, so they replay in the order made.
        shard = self.shards[0]
        body = {
            "policy": change,
            "actor": command.actor,
            "change_id": command.change_id,
            "at_us": now_us,
        }
        record = WalRecord(0, shard.take_seq(), "policy", "", body, now_us)
        control_id = change["control"][0] if change["kind"] == "control" else ""
        result = PolicyResult(control_id=control_id)
        return self._decision(key, command, result, record=record, gains=[])

    def _policy_change(self, command: PolicyCommand) -> dict[str, Any]:
        """The change as recorded, after checks against the policies in force."""
        if isinstance(command, SetSafetyStock):
            levels = [[x.sku, x.location, x.units] for x in command.levels]
            return {"kind": "safety_stock", "levels": levels}
        if isinstance(command, SetChannelBuffer):
            buffers = [[x.channel, x.sku, x.units] for x in command.buffers]
            return {"kind": "buffer", "buffers": buffers}
        if isinstance(command, SetChannelAllocation):
            levels = []
            for x in command.allocations:
                # From the durable pool, as SetOnHand does from durable on-hand.
                key = (x.sku, x.channel)
                durable = self.policies.pools.get(key, 0) - (
                    self.policies.pool_pending.get(key, 0)
                )
                pool_delta = x.units - durable
                levels.append([x.sku, x.channel, x.units, x.exclusive, pool_delta])
            return {"kind": "allocation", "allocations": levels}
        if isinstance(command, SetLocationGroup):
            if not command.locations and command.name in self.policies.groups_in_use():
                raise FailedPrecondition(
                    "GROUP_IN_USE",
                    f"location group {command.name} is a channel's sourcing default",
                    field="group.name",
                )
            return {
                "kind": "group",
                "name": command.name,
                "locations": list(command.locations),
            }
        if isinstance(command, SetControl):
            return self._control_change(command)
        if isinstance(command, LiftControl):
            control = self.policies.controls.get(command.control_id)
            if control is None or not control.is_active(self._clock.now_us()):
                raise NotFound(
                    "CONTROL_NOT_FOUND",
                    f"no continuity control {command.control_id} in force",
                    field="control_id",
                )
            return {"kind": "lift", "control_id": command.control_id}
        if command.group and command.group not in self.policies.groups:
            raise FailedPrecondition(
                "GROUP_UNKNOWN",
                f"no location group {command.group}",
                field="sourcing.location_group",
            )
        return {
            "kind": "sourcing",
            "channel": command.channel,
            "group": command.group,
            "allow_split": command.allow_split,
        }

    def _control_change(self, command: SetControl) -> dict[str, Any]:
        now_us = self._clock.now_us()
        if command.until_us <= now_us:
            raise InvalidArgument(
                "TIME_BOX_IN_PAST",
                "control.until must be in the future",
                field="control.until",
            )
        if command.until_us - now_us > self.limits.control_duration_max_s * US_PER_S:
            raise InvalidArgument(
                "TIME_BOX_TOO_LONG",
                f"a control may last at most {self.limits.control_duration_max_s} s",
                field="control.until",
            )
        assert command.kind is not None
        control_id = f"{command.actor}:{command.change_id}"
        control = Control(
            control_id=control_id,
            kind=command.kind,
            channel=command.channel
            if command.kind is not ControlKind.RAISE_SAFETY
            else "",
            sku=command.sku if command.kind is not ControlKind.THROTTLE else "",
            location=command.location
            if command.kind is ControlKind.RAISE_SAFETY
            else "",
            units=command.units,
            percent=command.percent,
            rate_per_s=command.rate_per_s,
            until_us=command.until_us,
            reason=command.reason,
            attribution=Attribution(command.actor, command.change_id, now_us),
        )
        for other in self.policies.active_controls(now_us):
            if other.kind is control.kind and (
                other.channel,
                other.sku,
                other.location,
            ) == (control.channel, control.sku, control.location):
                raise FailedPrecondition(
                    "CONTROL_OVERLAPS",
                    f"control {other.control_id} already covers the same target until "
                    "its time box ends; lift it first",
                    field="control",
                )
        return {"kind": "control", "control": control.to_json()[:10]}

    def _check_throttle(self, channel: str) -> None:
        """A throttled channel gets a token bucket of one second's worth of
        reservations. Not durable: a restart refills it."""
        now_us = self._clock.now_us()
        throttle = self.policies.throttle_of(channel, now_us)
        if throttle is None:
            return
        rate = throttle.rate_per_s
        tokens, last_us = self._buckets.get(channel, (float(rate), now_us))
        tokens = min(float(rate), tokens + (now_us - last_us) * rate / US_PER_S)
        if tokens < 1.0:
            self._buckets[channel] = (tokens, now_us)
            raise Overloaded(
                "CHANNEL_THROTTLED",
                f"channel {channel} is throttled to {rate} reservations per second "
                f"({throttle.reason})",
                field="channel",
                retry_after_s=(1.0 - tokens) / rate,
            )
        self._buckets[channel] = (tokens - 1.0, now_us)

    def availability(
        self, sku: str, locations: list[str], channel: str
    ) -> list[tuple[Position, int, int, int]]:
        """(position, safety stock, buffer, available to the channel) per location."""
        wanted = set(locations)
        now_us = self._clock.now_us()
        rows = []
        for location, position in sorted(self.positions_of(sku).items()):
            if wanted and location not in wanted:
                continue
            rows.append(
                (
                    position,
                    self.policies.safety(position, now_us),
                    self.policies.buffer(channel, sku),
                    self.policies.available(position, channel, now_us),
                )
            )
        return rows

    # Idempotency and records ------------------------------------------------------------

    def _replay(self, key: tuple[str, str], command: Command) -> Replay | None:
        remembered = self._remembered.get(key)
        if remembered is None:
            return None
        if remembered.fingerprint != fingerprint(command):
            field = "request_id"
            if isinstance(command, StockCommand):
                field = "source_event_id"
            elif isinstance(command, PolicyCommand):
                field = "change_id"
            raise InvalidArgument(
                "REQUEST_ID_REUSED",
                f"{field} {key[1]!r} was already used for a different request",
                field=field,
            )
        replayed = dataclasses.replace(remembered.result, replayed=True)
        return Replay(result=replayed, durable=remembered.durable, key=key)

    def _answer(
        self, key: tuple[str, str], command: Command, result: Result, *, shard: int
    ) -> Decision:
        """A decision that changes nothing but must still be remembered durably."""
        decision = self._decision(key, command, result, record=None, gains=[])
        decision.shard = shard
        return decision

    def _decision(
        self,
        key: tuple[str, str],
        command: Command,
        result: Result,
        *,
        record: WalRecord | None,
        gains: list[tuple[Position, int]],
    ) -> Decision:
        now_us = self._clock.now_us()
        print_ = fingerprint(command)
        self._remembered[key] = _Remembered(print_, result, now_us, durable=False)
        self._undurable += 1
        request = RequestRow(key[0], key[1], print_, result.to_json(), now_us)
        shard = record.shard if record else 0
        return Decision(result, shard, record, request, gains)

    def _record(
        self, reservation: Reservation, kind: str, fx: list[list[Any]], now_us: int
    ) -> WalRecord:
        shard = self.shards[reservation.home_shard]
        return WalRecord(
            shard=shard.index,
            seq=shard.take_seq(),
            kind=kind,
            reservation_id=reservation.reservation_id,
            body={"fx": fx, "rsv": reservation.to_json()},
            recorded_us=now_us,
        )

    def _stock_record(
        self, home: int, kind: str, body: dict[str, Any], now_us: int
    ) -> WalRecord:
        shard = self.shards[home]
        return WalRecord(home, shard.take_seq(), kind, "", body, now_us)

    # Reads ------------------------------------------------------------------------------

    def get_reservation(self, reservation_id: str) -> Reservation:
        check_id(
            reservation_id,
            field="reservation_id",
            length_max=self.limits.reservation_id_length_max,
        )
        return self._reservation(reservation_id).copy()

    def positions_of(self, sku: str) -> dict[str, Position]:
        shard = self.shards[shard_of(sku, len(self.shards))]
        return shard.positions.get(sku, {})

    def check_availability_query(self, skus: list[str], locations: list[str]) -> None:
        check_count(
            len(skus),
            field="skus",
            count_max=self.limits.skus_per_availability_query_max,
        )
        for index, sku in enumerate(skus):
            check_id(sku, field=f"skus[{index}]", length_max=self.limits.sku_length_max)
        if len(locations) > self.limits.locations_per_line_max:
            check_count(
                len(locations),
                field="locations",
                count_max=self.limits.locations_per_line_max,
            )
        for index, location in enumerate(locations):
            check_id(
                location,
                field=f"locations[{index}]",
                length_max=self.limits.location_length_max,
            )

    def list_reservations(
        self,
        *,
        channel: str,
        state: ReservationState | None,
        created_before_us: int | None,
        page_size: int,
        page_token: str,
    ) -> tuple[list[Reservation], str]:
        """One page, ordered by (created_us, reservation_id).

        Known shortcoming: filters and sorts every reservation in memory on each call,
        O(n log n) per page; fine for operators' pages, not for a hot path.
        """
        size = self._page_size(page_size)
        after = _decode_page_token(page_token)
        matches = sorted(
            (r.created_us, r.reservation_id)
            for r in self.reservations.values()
            if (not channel or r.channel == channel)
            and (state is None or r.state is state)
            and (created_before_us is None or r.created_us < created_before_us)
            and (after is None or (r.created_us, r.reservation_id) > after)
        )
        page = [self.reservations[rid].copy() for _, rid in matches[:size]]
        token = _encode_page_token(matches[size - 1]) if len(matches) > size else ""
        return page, token

    def at_risk(
        self, *, channel: str
    ) -> list[tuple[Reservation, list[tuple[str, str, int]]]]:
        """Holds that on-hand can no longer cover, newest first at each position.

        Where on-hand has fallen below held + safety stock (a POS sale, a count, a
        damage report), the shortfall is laid on the newest holds at that position:
        those are the ones to re-source or cancel. Nothing is dropped. Returns each
        such reservation with its uncovered (sku, location, units).

        Known shortcoming: computed on each call by scanning the active reservations,
        O(active holds); meant for operators, not for a hot path.
        """
        now_us = self._clock.now_us()
        shortfalls: dict[tuple[str, str], int] = {}
        for position in self.iter_positions():
            safety = self.policies.safety(position, now_us)
            short = position.held + safety - position.on_hand
            if short > 0 and position.held > 0:
                shortfalls[(position.sku, position.location)] = min(
                    short, position.held
                )
        if not shortfalls:
            return []

        holders: dict[tuple[str, str], list[tuple[int, str, int]]] = {}
        for reservation in self.reservations.values():
            if not reservation.is_active:
                continue
            for line in reservation.lines:
                at = (line.sku, line.location)
                if at in shortfalls and line.quantity_held:
                    entry = (
                        reservation.created_us,
                        reservation.reservation_id,
                        line.quantity_held,
                    )
                    holders.setdefault(at, []).append(entry)

        uncovered: dict[str, list[tuple[str, str, int]]] = {}
        for at, shortfall in shortfalls.items():
            left = shortfall
            for _, reservation_id, held in sorted(holders.get(at, []), reverse=True):
                if left <= 0:
                    break
                units = min(held, left)
                uncovered.setdefault(reservation_id, []).append((*at, units))
                left -= units
        found = [
            (self.reservations[rid].copy(), lines) for rid, lines in uncovered.items()
        ]
        found = [item for item in found if not channel or item[0].channel == channel]
        found.sort(key=lambda item: (item[0].created_us, item[0].reservation_id))
        return found

    def _page_size(self, page_size: int) -> int:
        if page_size == 0:
            return self.limits.page_size_default
        if not 0 < page_size <= self.limits.page_size_max:
            raise InvalidArgument(
                "PAGE_SIZE_OUT_OF_RANGE",
                f"page_size is {page_size}; it must be from 1 to "
                f"{self.limits.page_size_max}",
                field="page_size",
            )
        return page_size

    def stats(self) -> EngineStats:
        active = sum(1 for r in self.reservations.values() if r.is_active)
        positions = sum(
            len(s) for shard in self.shards for s in shard.positions.values()
        )
        return EngineStats(
            reservations=len(self.reservations),
            active_reservations=active,
            positions=positions,
            remembered_requests=len(self._remembered),
            undurable_requests=self._undurable,
        )

    def iter_positions(self) -> Iterator[Position]:
        for shard in self.shards:
            for by_location in shard.positions.values():
                yield from by_location.values()

    # Retention --------------------------------------------------------------------------

    def prune(self) -> int:
        """Forget answered requests and finished reservations past retention."""
        horizon_us = self._clock.now_us() - self._retention_us
        forgotten = 0
        while self._remembered:
            key, remembered = next(iter(self._remembered.items()))
            if remembered.created_us > horizon_us or not remembered.durable:
                break
            del self._remembered[key]
            forgotten += 1
        forgotten += self.policies.prune_controls(self._clock.now_us())
        while self._finished and self._finished[0][0] <= horizon_us:
            _, reservation_id = self._finished.popleft()
            reservation = self.reservations.get(reservation_id)
            if reservation is not None and not reservation.is_active:
                del self.reservations[reservation_id]
                forgotten += 1
        return forgotten

    # Checkpoint and recovery -------------------------------------------------------------

    def checkpoint_rows(
        self,
    ) -> tuple[
        list[tuple[str, str, int, int]], list[dict[str, Any]], list[int], dict[str, Any]
    ]:
        """State to checkpoint: positions, reservations, the last seq per shard and
        the policies.

        Only meaningful when nothing is in flight: every decided record durable, so no
        gain is withheld and the sequences cover exactly the state shown.
        """
        ensure(self._undurable == 0, "checkpoint taken with writes in flight")
        positions = []
        for position in self.iter_positions():
            ensure(position.withheld == 0, "checkpoint taken with gains withheld")
            positions.append(
                (position.sku, position.location, position.on_hand, position.held)
            )
        ensure(
            not any(self.channel_withheld.values())
            and not any(self.policies.pool_pending.values())
            and not any(p.on_hand_pending for p in self.iter_positions()),
            "checkpoint taken with changes in flight",
        )
        reservations = [r.to_json() for r in self.reservations.values()]
        seqs = [shard.next_seq - 1 for shard in self.shards]
        return positions, reservations, seqs, self.policies.to_json()

    def restore_position(
        self, sku: str, location: str, on_hand: int, held: int
    ) -> None:
        shard = self.shards[shard_of(sku, len(self.shards))]
        position = shard.position_or_new(sku, location)
        position.on_hand = on_hand
        self._replayed_held[(sku, location)] = held
        self.locations.add(location)

    def restore_reservation(self, body: dict[str, Any]) -> None:
        reservation = Reservation.from_json(body)
        self.reservations[reservation.reservation_id] = reservation

    def restore_policies(self, body: dict[str, Any]) -> None:
        self.policies = Policies.from_json(body)

    def restore_seq(self, shard: int, last_seq: int) -> None:
        self.shards[shard].next_seq = last_seq + 1

    def replay_record(self, shard: int, seq: int, body: dict[str, Any]) -> None:
        """Apply one committed record on top of the checkpoint, in shard order."""
        ensure(
            seq == self.shards[shard].next_seq,
            f"shard {shard} replays seq {seq}, expected {self.shards[shard].next_seq}",
        )
        self.shards[shard].next_seq = seq + 1
        for sku, location, on_hand_delta, held_delta in body.get("fx", ()):
            position = self.shards[shard_of(sku, len(self.shards))].position_or_new(
                sku, location
            )
            position.on_hand += on_hand_delta
            at = (sku, location)
            self._replayed_held[at] = self._replayed_held.get(at, 0) + held_delta
            self.locations.add(location)
        if "rsv" in body:
            self.restore_reservation(body["rsv"])
        for sku, channel, delta in body.get("pools", ()):
            self.policies.add_to_pool(sku, channel, delta)
        if "policy" in body:
            attribution = Attribution(body["actor"], body["change_id"], body["at_us"])
            self.policies.apply(body["policy"], attribution)

    def restore_request(
        self,
        *,
        scope: str,
        request_id: str,
        fingerprint_: str,
        result: dict[str, Any],
        created_us: int,
    ) -> None:
        self._remembered[(scope, request_id)] = _Remembered(
            fingerprint_, result_from_json(result, replayed=False), created_us, True
        )

    def finish_recovery(self) -> None:
        """Derive held from the reservations, check it against the records, and rebuild
        the expiry schedule; the same invariants as before every write."""
        derived: dict[tuple[str, str], int] = {}
        ordered = sorted(self.reservations.values(), key=lambda r: r.updated_us)
        for reservation in ordered:
            reservation.check()
            if reservation.is_active:
                for line in reservation.lines:
                    at = (line.sku, line.location)
                    derived[at] = derived.get(at, 0) + line.quantity_held
                    key = (reservation.channel, line.sku)
                    self.channel_held[key] = (
                        self.channel_held.get(key, 0) + line.quantity_held
                    )
            else:
                self._finished.append(
                    (reservation.updated_us, reservation.reservation_id)
                )
            if reservation.state is ReservationState.PENDING:
                home = self.shards[reservation.home_shard]
                home.schedule_expiry(reservation.expires_us, reservation.reservation_id)

        for position in self.iter_positions():
            at = (position.sku, position.location)
            position.held = derived.pop(at, 0)
            position.withheld = 0
            position.check()
            ensure(
                position.held == self._replayed_held.get(at, 0),
                f"recovered held {position.held} at {at} disagrees with the records' "
                f"{self._replayed_held.get(at, 0)}",
            )
        ensure(not derived, f"reservations hold unknown positions: {sorted(derived)}")
        self._replayed_held.clear()


def _encode_page_token(after: tuple[int, str]) -> str:
    return base64.urlsafe_b64encode(f"{after[0]}:{after[1]}".encode()).decode()


def _decode_page_token(token: str) -> tuple[int, str] | None:
    if not token:
        return None
    try:
        created, _, reservation_id = (
            base64.urlsafe_b64decode(token).decode().partition(":")
        )
        return int(created), reservation_id
    except (ValueError, binascii.Error, UnicodeDecodeError) as error:
        raise InvalidArgument(
            "PAGE_TOKEN_INVALID",
            "page_token was not issued by this server",
            field="page_token",
        ) from error
