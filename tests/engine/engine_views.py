"""The engine's state read back as the reference model's views, so that the two can
be compared field by field, and the invariants the engine must keep between commands.

Every read goes through what the service offers (availability, policies, the at-risk
listing) or through state the engine exposes for its own checks; nothing here decides.
"""

from server.engine.engine import Engine
from server.engine.model import Reservation
from server.engine.policy import Attribution, Control
from tests.engine.catalogue import SKUS
from tests.engine.model_views import (
    AllocationKey,
    At,
    AtRiskView,
    ChannelView,
    ControlView,
    LineView,
    Pair,
    PoliciesView,
    PositionView,
    ReachView,
    ReservationView,
    SetBy,
)


def engine_view(reservation: Reservation) -> ReservationView:
    return ReservationView(
        channel=reservation.channel,
        order_ref=reservation.order_ref,
        state=reservation.state,
        lines=tuple(
            LineView(
                line.sku,
                line.location,
                line.quantity_reserved,
                line.quantity_held,
                line.quantity_fulfilled,
                line.quantity_released,
            )
            for line in reservation.lines
        ),
        created_us=reservation.created_us,
        updated_us=reservation.updated_us,
        expires_us=reservation.expires_us,
    )


def engine_positions(engine: Engine) -> dict[At, PositionView]:
    return {
        (p.sku, p.location): PositionView(p.on_hand, p.held, p.available_to_sell)
        for p in engine.iter_positions()
    }


def engine_channel_views(engine: Engine, channel: str) -> dict[At, ChannelView]:
    """Every stocked position as `channel` sees it, through the engine's read."""
    views: dict[At, ChannelView] = {}
    for sku in SKUS:
        for position, safety, buffer, units in engine.availability(sku, [], channel):
            views[(sku, position.location)] = ChannelView(safety, buffer, units)
    return views


def set_by(attribution: Attribution) -> SetBy:
    return SetBy(attribution.actor, attribution.change_id, attribution.at_us)


def control_view(control: Control) -> ControlView:
    return ControlView(
        kind=control.kind,
        channel=control.channel,
        sku=control.sku,
        location=control.location,
        units=control.units,
        percent=control.percent,
        rate_per_s=control.rate_per_s,
        until_us=control.until_us,
        reason=control.reason,
        set_by=set_by(control.attribution),
    )


def engine_policies(engine: Engine, *, now_us: int) -> PoliciesView:
    """The policies as GetPolicies shows them at `now_us`."""
    policies = engine.policies
    allocations = {
        (sku, channel, group): (exclusive, set_by(a))
        for sku, by_scope in policies.allocations.items()
        for (channel, group), (exclusive, a) in by_scope.items()
    }
    # The engine keeps a removed allocation's pool at zero, as a place for deltas to
    # land; a pool without an allocation must be exactly that.
    pools = {
        key: units
        for key, units in policies.pools.items()
        if key in allocations or units != 0
    }
    # Likewise a removed supply's figure stays behind at zero.
    inbound = {
        at: units
        for at, units in policies.inbound.items()
        if at in policies.inbound_eta or units != 0
    }
    return PoliciesView(
        safety_stock={
            at: (units, SetBy(a.actor, a.change_id, a.at_us))
            for at, (units, a) in policies.safety_stock.items()
        },
        buffers={
            at: (units, SetBy(a.actor, a.change_id, a.at_us))
            for at, (units, a) in policies.buffers.items()
        },
        groups={
            name: (locations, SetBy(a.actor, a.change_id, a.at_us))
            for name, (locations, a) in policies.groups.items()
        },
        sourcing={
            channel: ((s.group, s.allow_split), SetBy(a.actor, a.change_id, a.at_us))
            for channel, (s, a) in policies.sourcing.items()
        },
        allocations=allocations,
        pools=pools,
        controls={
            control.control_id: control_view(control)
            for control in policies.active_controls(now_us)
        },
        inbound=inbound,
        inbound_eta={
            at: (eta_us, set_by(a)) for at, (eta_us, a) in policies.inbound_eta.items()
        },
        preorder_channels={
            channel: set_by(a) for channel, a in policies.preorder_channels.items()
        },
        channels={channel: set_by(a) for channel, a in policies.channels.items()},
    )


def engine_reach(
    engine: Engine, pairs: list[Pair], within: tuple[str, ...]
) -> dict[Pair, ReachView]:
    """What each (sku, channel) could hold within `within` (empty: everywhere)."""
    return {
        (sku, channel): ReachView(
            reach=engine.channel_reach(sku, channel, within),
            allocation_left=engine.allocation_left(sku, channel),
        )
        for sku, channel in pairs
    }


def engine_remaining(engine: Engine) -> dict[AllocationKey, int]:
    """What the pool of each allocation in force has remaining."""
    return {
        (sku, channel, group): engine.allocation_remaining(sku, channel, group)
        for sku, by_scope in engine.policies.allocations.items()
        for channel, group in by_scope
    }


def engine_at_risk(engine: Engine, channel: str) -> list[AtRiskView]:
    """The at-risk listing in the engine's order, under the engine's ids."""
    return [
        AtRiskView(
            reservation.reservation_id,
            engine_view(reservation),
            tuple(sorted(uncovered)),
        )
        for reservation, uncovered in engine.at_risk(channel=channel)
    ]


def check_invariants(engine: Engine, where: str) -> None:
    """What must hold between any two commands once every decision is durable."""
    held_by_lines: dict[At, int] = {}
    held_by_channels: dict[tuple[str, str, str], int] = {}
    for reservation in engine.reservations.values():
        for line in reservation.lines:
            assert line.quantity_held >= 0, f"{where}: {reservation}"
            accounted = (
                line.quantity_held + line.quantity_fulfilled + line.quantity_released
            )
            assert accounted == line.quantity_reserved, f"{where}: {reservation}"
            if reservation.is_active and line.quantity_held:
                at = (line.sku, line.location)
                held_by_lines[at] = held_by_lines.get(at, 0) + line.quantity_held
                key = (reservation.channel, *at)
                held = held_by_channels.get(key, 0) + line.quantity_held
                held_by_channels[key] = held
        assert reservation.is_active == (reservation.quantity_held > 0), where
    # What each channel holds per location is what its pools lend; it is kept apart
    # from the lines, so it must agree with them.
    assert engine.channel_held == held_by_channels, where
    assert not any(engine.channel_withheld.values()), f"{where} after every write"

    for position in engine.iter_positions():
        at = (position.sku, position.location)
        assert position.held >= 0, f"{where}: {position}"
        assert position.on_hand >= 0, f"{where}: {position}"
        assert position.withheld == 0, f"{where}: {position} after every write"
        assert position.on_hand_pending == 0, f"{where}: {position} after every write"
        assert position.held == held_by_lines.pop(at, 0), f"{where}: {position}"
    assert not held_by_lines, f"{where}: lines hold unknown positions {held_by_lines}"
    assert not any(engine.policies.inbound_pending.values()), where
    for at, units in engine.policies.inbound.items():
        assert units >= 0, f"{where}: inbound {at} is {units}"
