"""The reference model's policy rules: settings, allocations, inbound supply,
continuity controls and the channel registry, and the throttle a control puts on a
channel's requests.

Policies are plain tables (see PoliciesView): safety stock per (sku, location), buffers
per (channel, sku), groups by name, sourcing by channel, allocations and their pools per
(sku, channel, group), inbound supply per position, controls by id and the registered
channels, each entry with who set it. A change that names a channel the registry does
not know is refused before anything else is looked at, even when it removes a setting.

Controls are never removed when their time box ends: whether one is in force is asked
of the clock each time. A throttle's token bucket belongs to the control, starts full
when it is set, and counts millionths of a token in integers, so that no rounding hides
an off-by-one.
"""

import itertools

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
from server.engine.errors import ErrorKind
from server.engine.policy import ControlKind
from tests.engine.model_state import ModelState
from tests.engine.model_views import (
    US_PER_S,
    AllocationKey,
    Answered,
    ControlView,
    Outcome,
    Refused,
    SetBy,
)


class PolicyRules(ModelState):
    def _policy(self, command: PolicyCommand, now_us: int) -> Outcome:
        """Zero units, an empty group and an empty sourcing group each remove the
        setting; a channel cannot source from a group that does not exist."""
        by = SetBy(command.actor, command.change_id, now_us)
        tables = self.policies
        if not all(self.is_registered(channel) for channel in _channels_of(command)):
            return Refused(ErrorKind.FAILED_PRECONDITION, "CHANNEL_UNKNOWN")
        if isinstance(command, SetChannels):
            return self._register(command, by)
        if isinstance(command, SetControl):
            return self._set_control(command, by)
        if isinstance(command, LiftControl):
            return self._lift_control(command.control_id, now_us)
        if isinstance(command, SetChannelAllocation):
            return self._allocate(command, by)
        if isinstance(command, SetLocationGroup):
            return self._set_group(command, by)
        if isinstance(command, SetSafetyStock):
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

    def _set_group(self, command: SetLocationGroup, by: SetBy) -> Outcome:
        """A group a channel sources from cannot be removed. A group that scopes an
        allocation keeps its set of locations, though their order may change, so
        that no change of groups can make two scopes overlap."""
        tables = self.policies
        sourced = {group for (group, _), _ in tables.sourcing.values()}
        if not command.locations and command.name in sourced:
            return Refused(ErrorKind.FAILED_PRECONDITION, "GROUP_IN_USE")
        scoping = {group for _, _, group in tables.allocations}
        if command.name in scoping and set(command.locations) != set(
            tables.groups[command.name][0]
        ):
            return Refused(ErrorKind.FAILED_PRECONDITION, "GROUP_IN_USE")

        if command.locations:
            tables.groups[command.name] = (command.locations, by)
        else:
            tables.groups.pop(command.name, None)
        return Answered(PolicyResult(), replayed=False)

    def _allocate(self, command: SetChannelAllocation, by: SetBy) -> Outcome:
        """Setting an allocation starts its pool afresh at the units set, whatever was
        left of an earlier one; zero units removes it with its pool. A scope is a
        group that exists, or every location. After the change, any two scopes of one
        sku's allocations must be the same or share no location, every location
        being shared with the scope of every location; else nothing changes."""
        tables = self.policies
        if any(x.group and x.group not in tables.groups for x in command.allocations):
            return Refused(ErrorKind.FAILED_PRECONDITION, "GROUP_UNKNOWN")
        after = dict(tables.allocations)
        for level in command.allocations:
            key = (level.sku, level.channel, level.group)
            if level.units:
                after[key] = (level.exclusive, by)
            else:
                after.pop(key, None)
        if self._has_overlap(list(after)):
            return Refused(ErrorKind.FAILED_PRECONDITION, "ALLOCATION_SCOPES_OVERLAP")

        for level in command.allocations:
            key = (level.sku, level.channel, level.group)
            if level.units:
                tables.pools[key] = level.units
            else:
                tables.pools.pop(key, None)
        tables.allocations.clear()
        tables.allocations.update(after)
        return Answered(PolicyResult(), replayed=False)

    def _has_overlap(self, keys: list[AllocationKey]) -> bool:
        """Whether two allocations of one sku have different scopes that meet."""
        for (sku, _, first), (other_sku, _, second) in itertools.combinations(keys, 2):
            if sku != other_sku or first == second:
                continue
            if not first or not second:
                return True
            if set(self.policies.groups[first][0]) & set(
                self.policies.groups[second][0]
            ):
                return True
        return False

    def _register(self, command: SetChannels, by: SetBy) -> Outcome:
        """Register channels or take them out. Once the change is made, a registry
        that names any channel must name every channel that policies in force name;
        and emptying the registry (so accepting every name again) may not take out a
        channel they name either."""
        registry = set(self.policies.channels)
        removed: set[str] = set()
        for entry in command.channels:
            if entry.registered:
                registry.add(entry.channel)
            else:
                registry.discard(entry.channel)
                removed.add(entry.channel)
        named = self.channels_named(by.at_us)
        missing = named - registry if registry else named & removed
        if missing:
            return Refused(ErrorKind.FAILED_PRECONDITION, "CHANNEL_IN_USE")

        for entry in command.channels:
            if entry.registered:
                self.policies.channels[entry.channel] = by
            else:
                self.policies.channels.pop(entry.channel, None)
        return Answered(PolicyResult(), replayed=False)

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

    # Throttles ---------------------------------------------------------------------------

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


def _channels_of(command: PolicyCommand) -> list[str]:
    """The channels a policy change names; a raise of safety stock names none."""
    if isinstance(command, SetChannelBuffer):
        return [item.channel for item in command.buffers]
    if isinstance(command, SetChannelAllocation):
        return [level.channel for level in command.allocations]
    if isinstance(command, SetChannelSourcing | SetChannelPreorders):
        return [command.channel]
    if isinstance(command, SetControl) and command.kind is not ControlKind.RAISE_SAFETY:
        return [command.channel]
    return []


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
