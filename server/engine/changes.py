"""Changes to held stock and on-hand: confirm, extend, move, release, fulfil, expire,
and stock adjustments and counts."""

import dataclasses
from typing import Any

from server.engine.commands import (
    AdjustmentReason,
    AdjustStock,
    Confirm,
    Divergence,
    Extend,
    Fulfill,
    LineQuantity,
    Move,
    PositionSnapshot,
    ReconcileOnHand,
    Release,
    ReservationCommand,
    ReservationResult,
    SetOnHand,
    StockCommand,
    StockResult,
)
from server.engine.errors import (
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
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

# The record kind of a correction from an ERP snapshot. The ERP feed must never send
# these back (they would move the ERP by the same amount twice); it knows them by this
# name, which server/wal/feed.py spells RECONCILE_KIND (checked where both are seen).
CORRECTION_KIND = "reconcile"


class Changing(EngineState):
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
        available = 0
        if target is not None:
            available = self._move_room(command, target, reservation.channel, now_us)
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
        channel_gains = self._move_channel_held(command, reservation.channel)
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
        decision = self._decision(key, command, result, record=record, gains=gains)
        decision.channel_gains = channel_gains
        return decision

    def _move_room(
        self, command: Move, target: Position, channel: str, now_us: int
    ) -> int:
        """What the target can take for the move. Its units are new holds there:
        the channel's allocation covering the target and other channels' ring fences
        apply as to any hold, except that a move within one allocation's scope leaves
        the pool's use unchanged. The source's units come free only once durable."""
        sku, policies = command.sku, self.policies
        room = policies.available(target, channel, now_us)
        fence = policies.fence_at(sku, channel, command.to_location)
        room = min(room, max(0, self.unfenced_units(sku, channel, fence)))
        own = policies.allocation_at(sku, channel, command.to_location)
        if own is not None and own != policies.allocation_at(
            sku, channel, command.from_location
        ):
            room = min(room, self.allocation_remaining(sku, channel, own))
        return room

    def _move_channel_held(
        self, command: Move, channel: str
    ) -> list[tuple[tuple[str, str, str], int]]:
        """Shift the channel's held units; a pool left behind gets them back once
        the move is durable, like a release."""
        sku, quantity = command.sku, command.quantity
        self.add_channel_held(channel, sku, command.from_location, -quantity)
        self.add_channel_held(channel, sku, command.to_location, quantity)
        own_from = self.policies.allocation_at(sku, channel, command.from_location)
        own_to = self.policies.allocation_at(sku, channel, command.to_location)
        channel_gains: list[tuple[tuple[str, str, str], int]] = []
        if own_from is not None and own_from != own_to:
            key = (channel, sku, command.from_location)
            self._withhold_for_channel(key, quantity, channel_gains)
        return channel_gains

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
        channel_gains: list[tuple[tuple[str, str, str], int]] = []
        pool_fx: list[list[Any]] = []
        on_hand_pending: list[tuple[Position, int]] = []
        for line, quantity in amounts:
            position = self._position(line.sku, line.location)
            line.quantity_held -= quantity
            position.held -= quantity
            channel = reservation.channel
            self.add_channel_held(channel, line.sku, line.location, -quantity)
            channel_key = (channel, line.sku, line.location)
            if is_fulfil:
                line.quantity_fulfilled += quantity
                position.on_hand -= quantity
                position.on_hand_pending -= quantity
                on_hand_pending.append((position, -quantity))
                fx.append([line.sku, line.location, -quantity, -quantity])
                pool_fx.extend(self._consume_pool(line, channel, quantity))
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
        decision.pool_pending = [((sku, ch, g), delta) for sku, ch, g, delta in pool_fx]
        return decision

    def _consume_pool(
        self, line: ReservationLine, channel: str, quantity: int
    ) -> list[list[Any]]:
        """Fulfilment uses up allocated units for good, from the pool whose scope
        covers the line's location; recorded as a pool delta."""
        group = self.policies.allocation_at(line.sku, channel, line.location)
        if group is None:
            return []
        key = (line.sku, channel, group)
        self.policies.add_to_pool(key, -quantity)
        pending = self.policies.pool_pending
        pending[key] = pending.get(key, 0) - quantity
        return [[line.sku, channel, group, -quantity]]

    def _withhold_for_channel(
        self,
        key: tuple[str, str, str],
        quantity: int,
        channel_gains: list[tuple[tuple[str, str, str], int]],
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
        channel_gains: list[tuple[tuple[str, str, str], int]] = []
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
            channel = reservation.channel
            self.add_channel_held(channel, line.sku, line.location, -quantity)
            channel_key = (channel, line.sku, line.location)
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
        inbound_pending: list[tuple[tuple[str, str], int]] = []
        if isinstance(command, AdjustStock):
            body["reasons"] = [a.reason.value for a in command.adjustments if a.reason]
            inbound_fx = self._receive_inbound(command)
            if inbound_fx:
                body["inbound"] = inbound_fx
                inbound_pending = [((sku, loc), d) for sku, loc, d in inbound_fx]
        kind = "adjust" if isinstance(command, AdjustStock) else "set_on_hand"
        record = self._stock_record(home, kind, body, now_us)
        result = StockResult(tuple(self._snapshot(p, pending=gains) for p in touched))
        decision = self._decision(key, command, result, record=record, gains=gains)
        decision.on_hand_pending = on_hand_pending
        decision.inbound_pending = inbound_pending
        return decision

    def _reconcile(self, command: ReconcileOnHand, key: tuple[str, str]) -> Decision:
        """Answer an ERP snapshot with its findings and, if asked, move each diverging
        on-hand by minus its difference. The move is a delta from the cut the findings
        were taken at: what was decided since then reaches the ERP through its feed."""
        if not command.findings:
            # The stored answer it was compared for was forgotten (past retention)
            # between the server's look-up and this decision; comparing again fixes it.
            raise Unavailable(
                "SNAPSHOT_NOT_COMPARED", "the snapshot must be compared again; retry"
            )
        on_hand = [f for f in command.findings if not f.channel]
        ensure(
            [(f.sku, f.location) for f in on_hand]
            == [(c.sku, c.location) for c in command.counts],
            "an ERP snapshot's findings do not match its counts",
        )
        deltas = {(f.sku, f.location): -f.difference for f in on_hand if f.difference}
        if not command.apply_correction or not deltas:
            result = StockResult(
                tuple(self._count_snapshot(c.sku, c.location) for c in command.counts),
                divergences=command.findings,
            )
            return self._answer(key, command, result, shard=0)

        self._check_correction(deltas, command)
        findings = tuple(
            dataclasses.replace(f, corrected=(not f.channel and f.difference != 0))
            for f in command.findings
        )
        return self._correct(deltas, command, key, findings)

    def _check_correction(
        self, deltas: dict[tuple[str, str], int], command: ReconcileOnHand
    ) -> None:
        index = {(c.sku, c.location): i for i, c in enumerate(command.counts)}
        for at, delta in deltas.items():
            after = self._on_hand(*at) + delta
            field = f"counts[{index[at]}].on_hand"
            if after < 0:
                raise FailedPrecondition(
                    "ON_HAND_WOULD_GO_NEGATIVE",
                    f"the correction of {delta} would take on-hand of {at[0]} at "
                    f"{at[1]} to {after}",
                    field=field,
                )
            if after > self.limits.on_hand_max:
                raise FailedPrecondition(
                    "ON_HAND_TOO_LARGE",
                    f"the correction of {delta} would take on-hand of {at[0]} at "
                    f"{at[1]} to {after}; at most {self.limits.on_hand_max}",
                    field=field,
                )

    def _correct(
        self,
        deltas: dict[tuple[str, str], int],
        command: ReconcileOnHand,
        key: tuple[str, str],
        findings: tuple[Divergence, ...],
    ) -> Decision:
        now_us = self._clock.now_us()
        fx: list[list[Any]] = []
        gains: list[tuple[Position, int]] = []
        on_hand_pending: list[tuple[Position, int]] = []
        for (sku, location), delta in deltas.items():
            position = self.shards[shard_of(sku, len(self.shards))].position_or_new(
                sku, location
            )
            self.locations.add(location)
            position.on_hand += delta
            position.on_hand_pending += delta
            on_hand_pending.append((position, delta))
            if delta > 0:
                position.withheld += delta
                gains.append((position, delta))
            position.check()
            fx.append([sku, location, delta, 0])

        home = shard_of(next(iter(deltas))[0], len(self.shards))
        body: dict[str, Any] = {"fx": fx, "src": command.source}
        record = self._stock_record(home, CORRECTION_KIND, body, now_us)
        snapshots = tuple(
            self._count_snapshot(c.sku, c.location, pending=gains)
            for c in command.counts
        )
        result = StockResult(snapshots, divergences=findings)
        decision = self._decision(key, command, result, record=record, gains=gains)
        decision.on_hand_pending = on_hand_pending
        return decision

    def _count_snapshot(
        self,
        sku: str,
        location: str,
        *,
        pending: list[tuple[Position, int]] | None = None,
    ) -> PositionSnapshot:
        position = self.shards[shard_of(sku, len(self.shards))].position(sku, location)
        if position is None:
            return PositionSnapshot(sku, location, 0, 0, 0)
        return self._snapshot(position, pending=pending or [])

    def durable_on_hand(self, sku: str, location: str) -> int:
        return self._durable_on_hand(sku, location)

    def on_hand(self, sku: str, location: str) -> int:
        """On-hand as decided, with changes whose writes are in flight."""
        return self._on_hand(sku, location)

    def _receive_inbound(self, command: AdjustStock) -> list[list[Any]]:
        """Receipts take their units off the inbound supply they fulfil, recorded as
        deltas like the receipts themselves."""
        received: dict[tuple[str, str], int] = {}
        for item in command.adjustments:
            if item.reason is AdjustmentReason.RECEIPT and item.delta > 0:
                at = (item.sku, item.location)
                received[at] = received.get(at, 0) + item.delta
        inbound_fx: list[list[Any]] = []
        pending = self.policies.inbound_pending
        for (sku, location), units in received.items():
            taken = min(units, self.policies.inbound_units(sku, location))
            if taken:
                self.policies.add_inbound(sku, location, -taken)
                pending[(sku, location)] = pending.get((sku, location), 0) - taken
                inbound_fx.append([sku, location, -taken])
        return inbound_fx

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
