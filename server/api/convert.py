"""Protos to engine commands and engine results to protos, field by field.

Nothing is validated here: the engine checks every command and names the field at
fault in the contract's own terms, so there is one place where input is judged.
"""

from collections.abc import Callable, Iterable
from typing import TypeVar

from google.protobuf import timestamp_pb2

from server.engine import commands as cmd
from server.engine.model import Reservation, ReservationState
from server.engine.policy import Attribution, Control, ControlKind, Policies
from stockward.v1 import admin_pb2, inventory_pb2, types_pb2

_STATE_TO_PROTO = {
    ReservationState.PENDING: types_pb2.RESERVATION_STATE_PENDING,
    ReservationState.CONFIRMED: types_pb2.RESERVATION_STATE_CONFIRMED,
    ReservationState.FULFILLED: types_pb2.RESERVATION_STATE_FULFILLED,
    ReservationState.RELEASED: types_pb2.RESERVATION_STATE_RELEASED,
    ReservationState.EXPIRED: types_pb2.RESERVATION_STATE_EXPIRED,
}
STATE_FROM_PROTO = {proto: state for state, proto in _STATE_TO_PROTO.items()}

_OUTCOME_TO_PROTO = {
    cmd.ReserveOutcome.RESERVED: inventory_pb2.RESERVE_OUTCOME_RESERVED,
    cmd.ReserveOutcome.PARTIALLY_RESERVED: inventory_pb2.RESERVE_OUTCOME_PARTIALLY_RESERVED,
    cmd.ReserveOutcome.REJECTED: inventory_pb2.RESERVE_OUTCOME_REJECTED,
}

_SHORT_TO_PROTO = {
    cmd.ShortReason.INSUFFICIENT_STOCK: inventory_pb2.SHORT_REASON_INSUFFICIENT_STOCK,
    cmd.ShortReason.UNKNOWN_SKU: inventory_pb2.SHORT_REASON_UNKNOWN_SKU,
    cmd.ShortReason.UNKNOWN_LOCATION: inventory_pb2.SHORT_REASON_UNKNOWN_LOCATION,
    cmd.ShortReason.OTHER_LINE_SHORT: inventory_pb2.SHORT_REASON_OTHER_LINE_SHORT,
    cmd.ShortReason.CHANNEL_ALLOCATION_EXHAUSTED: (
        inventory_pb2.SHORT_REASON_CHANNEL_ALLOCATION_EXHAUSTED
    ),
    cmd.ShortReason.CHANNEL_SUPPRESSED: inventory_pb2.SHORT_REASON_CHANNEL_SUPPRESSED,
}

_CONTROL_KINDS = {
    ControlKind.SUPPRESS: admin_pb2.CONTROL_KIND_SUPPRESS_CHANNEL,
    ControlKind.THROTTLE: admin_pb2.CONTROL_KIND_THROTTLE_CHANNEL,
    ControlKind.RAISE_SAFETY: admin_pb2.CONTROL_KIND_RAISE_SAFETY_STOCK,
}
_CONTROL_KINDS_FROM_PROTO = {proto: kind for kind, proto in _CONTROL_KINDS.items()}

_REASON_FROM_PROTO = {
    admin_pb2.ADJUSTMENT_REASON_RECEIPT: cmd.AdjustmentReason.RECEIPT,
    admin_pb2.ADJUSTMENT_REASON_POS_SALE: cmd.AdjustmentReason.POS_SALE,
    admin_pb2.ADJUSTMENT_REASON_COUNT_CORRECTION: cmd.AdjustmentReason.COUNT_CORRECTION,
    admin_pb2.ADJUSTMENT_REASON_DAMAGE: cmd.AdjustmentReason.DAMAGE,
    admin_pb2.ADJUSTMENT_REASON_RETURN_TO_STOCK: cmd.AdjustmentReason.RETURN_TO_STOCK,
    admin_pb2.ADJUSTMENT_REASON_TRANSFER: cmd.AdjustmentReason.TRANSFER,
}


def timestamp(us: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMicroseconds(us)
    return stamp


# Requests -----------------------------------------------------------------------------


def reserve(request: inventory_pb2.ReserveRequest) -> cmd.Reserve:
    return cmd.Reserve(
        request_id=request.request_id,
        channel=request.channel,
        order_ref=request.order_ref,
        lines=tuple(
            cmd.ReserveLine(
                sku=line.sku,
                quantity=line.quantity,
                location=line.location,
                locations=tuple(line.locations),
                allow_split=line.allow_split,
            )
            for line in request.lines
        ),
        ttl_s=request.ttl_seconds,
        allow_partial=request.allow_partial,
    )


def confirm(request: inventory_pb2.ConfirmRequest) -> cmd.Confirm:
    return cmd.Confirm(
        request_id=request.request_id, reservation_id=request.reservation_id
    )


def _line_quantities(
    lines: Iterable[types_pb2.LineQuantity],
) -> tuple[cmd.LineQuantity, ...]:
    return tuple(
        cmd.LineQuantity(sku=line.sku, location=line.location, quantity=line.quantity)
        for line in lines
    )


def release(request: inventory_pb2.ReleaseRequest) -> cmd.Release:
    return cmd.Release(
        request_id=request.request_id,
        reservation_id=request.reservation_id,
        lines=_line_quantities(request.lines),
    )


def fulfill(request: inventory_pb2.FulfillRequest) -> cmd.Fulfill:
    return cmd.Fulfill(
        request_id=request.request_id,
        reservation_id=request.reservation_id,
        lines=_line_quantities(request.lines),
    )


def extend(request: inventory_pb2.ExtendRequest) -> cmd.Extend:
    return cmd.Extend(
        request_id=request.request_id,
        reservation_id=request.reservation_id,
        ttl_s=request.ttl_seconds,
    )


def move(request: inventory_pb2.MoveReservationRequest) -> cmd.Move:
    return cmd.Move(
        request_id=request.request_id,
        reservation_id=request.reservation_id,
        sku=request.sku,
        from_location=request.from_location,
        to_location=request.to_location,
        quantity=request.quantity,
    )


def adjust_stock(request: admin_pb2.AdjustStockRequest) -> cmd.AdjustStock:
    return cmd.AdjustStock(
        source=request.source,
        source_event_id=request.source_event_id,
        adjustments=tuple(
            cmd.Adjustment(
                sku=item.sku,
                location=item.location,
                delta=item.delta,
                reason=_REASON_FROM_PROTO.get(item.reason),
            )
            for item in request.adjustments
        ),
    )


def set_on_hand(request: admin_pb2.SetOnHandRequest) -> cmd.SetOnHand:
    return cmd.SetOnHand(
        source=request.source,
        source_event_id=request.source_event_id,
        counts=tuple(
            cmd.OnHandCount(sku=item.sku, location=item.location, on_hand=item.on_hand)
            for item in request.counts
        ),
    )


def is_erp_snapshot(request: admin_pb2.SetOnHandRequest) -> bool:
    return request.erp_snapshot or bool(request.erp_applied_batch_ids)


def reconcile_on_hand(request: admin_pb2.SetOnHandRequest) -> cmd.ReconcileOnHand:
    return cmd.ReconcileOnHand(
        source=request.source,
        source_event_id=request.source_event_id,
        counts=tuple(
            cmd.ErpCount(
                sku=item.sku,
                location=item.location,
                on_hand=item.on_hand,
                held_by_channel=tuple(
                    cmd.ChannelHeld(channel=x.channel, held=x.held)
                    for x in item.held_by_channel
                ),
            )
            for item in request.counts
        ),
        erp_applied_batch_ids=tuple(request.erp_applied_batch_ids),
        apply_correction=request.apply_correction,
    )


def divergence(
    value: cmd.Divergence, *, source: str, source_event_id: str
) -> admin_pb2.Divergence:
    return admin_pb2.Divergence(
        sku=value.sku,
        location=value.location,
        channel=value.channel,
        stockward=value.stockward,
        erp=value.erp,
        erp_unseen=value.erp_unseen,
        difference=value.difference,
        observed_at=timestamp(value.observed_us),
        source=source,
        source_event_id=source_event_id,
        corrected=value.corrected,
    )


def set_safety_stock(request: admin_pb2.SetSafetyStockRequest) -> cmd.SetSafetyStock:
    return cmd.SetSafetyStock(
        actor=request.actor,
        change_id=request.change_id,
        levels=tuple(
            cmd.SafetyLevel(sku=x.sku, location=x.location, units=x.quantity)
            for x in request.levels
        ),
    )


def set_channel_buffer(
    request: admin_pb2.SetChannelBufferRequest,
) -> cmd.SetChannelBuffer:
    return cmd.SetChannelBuffer(
        actor=request.actor,
        change_id=request.change_id,
        buffers=tuple(
            cmd.BufferLevel(channel=x.channel, sku=x.sku, units=x.quantity)
            for x in request.buffers
        ),
    )


def set_location_group(
    request: admin_pb2.SetLocationGroupRequest,
) -> cmd.SetLocationGroup:
    return cmd.SetLocationGroup(
        actor=request.actor,
        change_id=request.change_id,
        name=request.group.name,
        locations=tuple(request.group.locations),
    )


def set_channel_sourcing(
    request: admin_pb2.SetChannelSourcingRequest,
) -> cmd.SetChannelSourcing:
    return cmd.SetChannelSourcing(
        actor=request.actor,
        change_id=request.change_id,
        channel=request.sourcing.channel,
        group=request.sourcing.location_group,
        allow_split=request.sourcing.allow_split,
    )


def set_channel_allocation(
    request: admin_pb2.SetChannelAllocationRequest,
) -> cmd.SetChannelAllocation:
    return cmd.SetChannelAllocation(
        actor=request.actor,
        change_id=request.change_id,
        allocations=tuple(
            cmd.AllocationLevel(
                sku=x.sku,
                channel=x.channel,
                units=x.quantity,
                exclusive=x.exclusive,
                group=x.location_group,
            )
            for x in request.allocations
        ),
    )


def set_channels(request: admin_pb2.SetChannelsRequest) -> cmd.SetChannels:
    return cmd.SetChannels(
        actor=request.actor,
        change_id=request.change_id,
        channels=tuple(
            cmd.ChannelEntry(channel=x.channel, registered=x.registered)
            for x in request.channels
        ),
    )


def set_control(request: admin_pb2.SetContinuityControlRequest) -> cmd.SetControl:
    control = request.control
    return cmd.SetControl(
        actor=request.actor,
        change_id=request.change_id,
        kind=_CONTROL_KINDS_FROM_PROTO.get(control.kind),
        channel=control.channel,
        sku=control.sku,
        location=control.location,
        units=control.safety_units,
        percent=control.safety_percent,
        rate_per_s=control.reservations_per_second,
        until_us=control.until.ToMicroseconds() if control.HasField("until") else 0,
        reason=control.reason,
    )


def set_inbound_supply(
    request: admin_pb2.SetInboundSupplyRequest,
) -> cmd.SetInboundSupply:
    return cmd.SetInboundSupply(
        actor=request.actor,
        change_id=request.change_id,
        supplies=tuple(
            cmd.InboundSupply(
                sku=x.sku,
                location=x.location,
                units=x.quantity,
                eta_us=x.eta.ToMicroseconds() if x.HasField("eta") else 0,
            )
            for x in request.supplies
        ),
    )


def set_channel_preorders(
    request: admin_pb2.SetChannelPreordersRequest,
) -> cmd.SetChannelPreorders:
    return cmd.SetChannelPreorders(
        actor=request.actor,
        change_id=request.change_id,
        channel=request.channel,
        allowed=request.allowed,
    )


def lift_control(request: admin_pb2.LiftContinuityControlRequest) -> cmd.LiftControl:
    return cmd.LiftControl(
        actor=request.actor, change_id=request.change_id, control_id=request.control_id
    )


# Results ------------------------------------------------------------------------------


def attribution(value: Attribution) -> admin_pb2.PolicyAttribution:
    return admin_pb2.PolicyAttribution(
        actor=value.actor, change_id=value.change_id, changed_at=timestamp(value.at_us)
    )


def control(value: Control) -> admin_pb2.ContinuityControl:
    return admin_pb2.ContinuityControl(
        control_id=value.control_id,
        kind=_CONTROL_KINDS[value.kind],
        channel=value.channel,
        sku=value.sku,
        location=value.location,
        safety_units=value.units,
        safety_percent=value.percent,
        reservations_per_second=value.rate_per_s,
        until=timestamp(value.until_us),
        reason=value.reason,
        attribution=attribution(value.attribution),
    )


def policies(
    value: Policies, remaining: Callable[[str, str, str], int], now_us: int
) -> admin_pb2.GetPoliciesResponse:
    """Every policy in force; `remaining(sku, channel, group)` says what a pool has
    left."""
    return admin_pb2.GetPoliciesResponse(
        controls=[control(c) for c in value.active_controls(now_us)],
        inbound=[
            admin_pb2.InboundSupply(
                sku=sku,
                location=location,
                quantity=value.inbound_units(sku, location),
                eta=timestamp(eta_us),
                attribution=attribution(a),
            )
            for (sku, location), (eta_us, a) in sorted(value.inbound_eta.items())
        ],
        preorder_channels=[
            admin_pb2.PreorderChannel(channel=channel, attribution=attribution(a))
            for channel, a in sorted(value.preorder_channels.items())
        ],
        channels=[
            admin_pb2.ChannelEntry(
                channel=channel, registered=True, attribution=attribution(a)
            )
            for channel, a in sorted(value.channels.items())
        ],
        allocations=[
            admin_pb2.ChannelAllocation(
                sku=sku,
                channel=channel,
                # A pool lowered below what was already held can be over-consumed;
                # the sum of deltas may then dip below zero, shown as none left.
                quantity=max(0, value.pools.get((sku, channel, group), 0)),
                exclusive=exclusive,
                remaining=remaining(sku, channel, group),
                attribution=attribution(a),
                location_group=group,
            )
            for sku, by_scope in sorted(value.allocations.items())
            for (channel, group), (exclusive, a) in sorted(by_scope.items())
        ],
        safety_stock=[
            admin_pb2.SafetyStock(
                sku=sku, location=location, quantity=units, attribution=attribution(a)
            )
            for (sku, location), (units, a) in sorted(value.safety_stock.items())
        ],
        buffers=[
            admin_pb2.ChannelBuffer(
                channel=channel, sku=sku, quantity=units, attribution=attribution(a)
            )
            for (channel, sku), (units, a) in sorted(value.buffers.items())
        ],
        location_groups=[
            admin_pb2.LocationGroup(
                name=name, locations=list(locations), attribution=attribution(a)
            )
            for name, (locations, a) in sorted(value.groups.items())
        ],
        sourcing=[
            admin_pb2.ChannelSourcing(
                channel=channel,
                location_group=s.group,
                allow_split=s.allow_split,
                attribution=attribution(a),
            )
            for channel, (s, a) in sorted(value.sourcing.items())
        ],
    )


def reservation(value: Reservation) -> types_pb2.Reservation:
    message = types_pb2.Reservation(
        reservation_id=value.reservation_id,
        channel=value.channel,
        order_ref=value.order_ref,
        state=_STATE_TO_PROTO[value.state],
        lines=[
            types_pb2.ReservationLine(
                sku=line.sku,
                location=line.location,
                quantity_reserved=line.quantity_reserved,
                quantity_held=line.quantity_held,
                quantity_fulfilled=line.quantity_fulfilled,
                quantity_released=line.quantity_released,
            )
            for line in value.lines
        ],
        created_at=timestamp(value.created_us),
        updated_at=timestamp(value.updated_us),
    )
    if value.expires_us:
        message.expires_at.CopyFrom(timestamp(value.expires_us))
    return message


ReservationResponse = TypeVar(
    "ReservationResponse",
    bound=inventory_pb2.ConfirmResponse
    | inventory_pb2.ReleaseResponse
    | inventory_pb2.FulfillResponse
    | inventory_pb2.ExtendResponse
    | inventory_pb2.MoveReservationResponse,
)


def reservation_response(
    result: cmd.Result, response_type: type[ReservationResponse]
) -> ReservationResponse:
    """The answer to Confirm, Release, Fulfill or Extend: the reservation as it stands."""
    assert isinstance(result, cmd.ReservationResult)
    return response_type(
        reservation=reservation(result.reservation), replayed=result.replayed
    )


def reserve_response(result: cmd.ReserveResult) -> inventory_pb2.ReserveResponse:
    response = inventory_pb2.ReserveResponse(
        reservation_id=result.reservation_id,
        outcome=_OUTCOME_TO_PROTO[result.outcome],
        replayed=result.replayed,
        lines=[
            inventory_pb2.ReserveLineResult(
                line_index=line.line_index,
                sku=line.sku,
                quantity_requested=line.quantity_requested,
                quantity_held=line.quantity_held,
                held_at=[
                    inventory_pb2.LocationQuantity(location=location, quantity=quantity)
                    for location, quantity in line.held_at
                ],
                short_reason=(
                    _SHORT_TO_PROTO[line.short_reason]
                    if line.short_reason
                    else inventory_pb2.SHORT_REASON_UNSPECIFIED
                ),
                quantity_available=line.quantity_available,
            )
            for line in result.lines
        ],
    )
    if result.expires_us:
        response.expires_at.CopyFrom(timestamp(result.expires_us))
    return response


def positions(result: cmd.StockResult) -> list[admin_pb2.PositionSnapshot]:
    return [
        admin_pb2.PositionSnapshot(
            sku=p.sku,
            location=p.location,
            on_hand=p.on_hand,
            held=p.held,
            available_to_sell=p.available_to_sell,
        )
        for p in result.positions
    ]
