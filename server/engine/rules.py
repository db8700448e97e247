"""Policy decisions: changes to policies and controls, throttling, the channel view
of availability, and holds at risk."""

import itertools
from typing import Any

from server.engine.commands import (
    LiftControl,
    PolicyCommand,
    PolicyResult,
    SetChannelAllocation,
    SetChannelBuffer,
    SetChannelPreorders,
    SetChannels,
    SetChannelSourcing,
    SetControl,
    SetInboundSupply,
    SetLocationGroup,
    SetSafetyStock,
)
from server.engine.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Overloaded,
)
from server.engine.model import (
    Position,
    Reservation,
)
from server.engine.policy import Attribution, Control, ControlKind
from server.engine.state import US_PER_S, Decision, EngineState, WalRecord


class Ruling(EngineState):
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
        for channel, field in _channels_of(command):
            self._check_channel(channel, field=field)
        if isinstance(command, SetChannels):
            return self._channels_change(command)
        if isinstance(command, SetSafetyStock):
            levels = [[x.sku, x.location, x.units] for x in command.levels]
            return {"kind": "safety_stock", "levels": levels}
        if isinstance(command, SetChannelBuffer):
            buffers = [[x.channel, x.sku, x.units] for x in command.buffers]
            return {"kind": "buffer", "buffers": buffers}
        if isinstance(command, SetChannelAllocation):
            self._check_scopes(command)
            levels = []
            for x in command.allocations:
                # From the durable pool, as SetOnHand does from durable on-hand.
                delta = x.units - self.policies.durable_pool(
                    (x.sku, x.channel, x.group)
                )
                levels.append([x.sku, x.channel, x.group, x.units, x.exclusive, delta])
            return {"kind": "allocation", "allocations": levels}
        if isinstance(command, SetLocationGroup):
            self._check_group_change(command)
            return {
                "kind": "group",
                "name": command.name,
                "locations": list(command.locations),
            }
        if isinstance(command, SetControl):
            return self._control_change(command)
        if isinstance(command, SetInboundSupply):
            supplies = []
            for supply in command.supplies:
                # From the durable figure, as SetOnHand does from durable on-hand.
                key = (supply.sku, supply.location)
                durable = self.policies.inbound.get(key, 0) - (
                    self.policies.inbound_pending.get(key, 0)
                )
                supplies.append(
                    [
                        supply.sku,
                        supply.location,
                        supply.units,
                        supply.eta_us,
                        supply.units - durable,
                    ]
                )
            return {"kind": "inbound", "supplies": supplies}
        if isinstance(command, SetChannelPreorders):
            return {
                "kind": "preorders",
                "channel": command.channel,
                "allowed": command.allowed,
            }
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

    def _channels_change(self, command: SetChannels) -> dict[str, Any]:
        """A non-empty registry must include every channel a policy names, and a
        named channel cannot be taken out even by emptying (reopening) it."""
        registry = set(self.policies.channels)
        removed: set[str] = set()
        for entry in command.channels:
            if entry.registered:
                registry.add(entry.channel)
            else:
                registry.discard(entry.channel)
                removed.add(entry.channel)
        named = self.policies.channels_named(self._clock.now_us())
        missing = sorted(named - registry if registry else named & removed)
        if missing:
            raise FailedPrecondition(
                "CHANNEL_IN_USE",
                f"policies in force name channel {missing[0]} "
                f"({len(missing)} unregistered in all); the registry must "
                "include every channel a policy names",
                field="channels",
            )
        entries = [[x.channel, x.registered] for x in command.channels]
        return {"kind": "channels", "channels": entries}

    def _check_scopes(self, command: SetChannelAllocation) -> None:
        """Allocation scopes of one sku, after the change, must be one group or share
        no location (see the design note in policy.py)."""
        for index, level in enumerate(command.allocations):
            if level.group and level.group not in self.policies.groups:
                raise FailedPrecondition(
                    "GROUP_UNKNOWN",
                    f"no location group {level.group}",
                    field=f"allocations[{index}].location_group",
                )
        for sku in sorted({level.sku for level in command.allocations}):
            scopes = set(self.policies.allocations.get(sku, ()))
            for level in command.allocations:
                if level.sku == sku and level.units:
                    scopes.add((level.channel, level.group))
                elif level.sku == sku:
                    scopes.discard((level.channel, level.group))
            groups = sorted({group for _, group in scopes})
            for first, second in itertools.combinations(groups, 2):
                if self._scopes_meet(first, second):
                    raise FailedPrecondition(
                        "ALLOCATION_SCOPES_OVERLAP",
                        f"allocations of {sku} scoped to {_scope_name(first)} and "
                        f"{_scope_name(second)} would overlap; one sku's allocations "
                        "must share one scope or have no location in common",
                        field="allocations",
                    )

    def _scopes_meet(self, first: str, second: str) -> bool:
        if not first or not second:
            return True
        locations = set(self.policies.groups[first][0])
        return not locations.isdisjoint(self.policies.groups[second][0])

    def _check_group_change(self, command: SetLocationGroup) -> None:
        if not command.locations and command.name in self.policies.groups_in_use():
            raise FailedPrecondition(
                "GROUP_IN_USE",
                f"location group {command.name} is a channel's sourcing default",
                field="group.name",
            )
        scoped = self.policies.allocations_scoped_by(command.name)
        current = self.policies.groups.get(command.name)
        if scoped and set(command.locations) != set(current[0] if current else ()):
            sku, channel = scoped[0]
            raise FailedPrecondition(
                "GROUP_IN_USE",
                f"location group {command.name} scopes {channel}'s allocation of "
                f"{sku} ({len(scoped)} allocation(s) in all); its locations can be "
                "reordered but not changed until those allocations are removed",
                field="group.locations",
            )

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
        if control_id in self.policies.controls:
            # The request log forgets after its retention; a control outlives that.
            raise FailedPrecondition(
                "CONTROL_ID_TAKEN",
                f"control {control_id} exists until its time box ends; use a new "
                "change_id",
                field="change_id",
            )
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
        # One bucket per throttle: a new throttle starts with a full second's worth.
        tokens, last_us = self._buckets.get(throttle.control_id, (float(rate), now_us))
        tokens = min(float(rate), tokens + (now_us - last_us) * rate / US_PER_S)
        if tokens < 1.0:
            self._buckets[throttle.control_id] = (tokens, now_us)
            raise Overloaded(
                "CHANNEL_THROTTLED",
                f"channel {channel} is throttled to {rate} reservations per second "
                f"({throttle.reason})",
                field="channel",
                retry_after_s=(1.0 - tokens) / rate,
            )
        self._buckets[throttle.control_id] = (tokens - 1.0, now_us)

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
            # Pre-order holds covered by expected receipts are not at risk.
            cover = position.on_hand + self.policies.inbound_units(
                position.sku, position.location
            )
            short = position.held + safety - cover
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


def _channels_of(command: PolicyCommand) -> list[tuple[str, str]]:
    """The channels a policy change names, with their fields."""
    if isinstance(command, SetChannelBuffer):
        return [
            (x.channel, f"buffers[{i}].channel") for i, x in enumerate(command.buffers)
        ]
    if isinstance(command, SetChannelAllocation):
        return [
            (x.channel, f"allocations[{i}].channel")
            for i, x in enumerate(command.allocations)
        ]
    if isinstance(command, SetChannelSourcing):
        return [(command.channel, "sourcing.channel")]
    if isinstance(command, SetChannelPreorders):
        return [(command.channel, "channel")]
    if isinstance(command, SetControl) and command.kind is not ControlKind.RAISE_SAFETY:
        return [(command.channel, "control.channel")]
    return []


def _scope_name(group: str) -> str:
    return f"group {group}" if group else "every location"
