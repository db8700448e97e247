"""InventoryService and StockAdminService over the ledger."""

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

from server.api import convert
from server.api.errors import abort, internal_status, status_of
from server.clock import Clock
from server.engine import commands as cmd
from server.engine.commands import check_count, check_id
from server.engine.errors import EngineError, InvalidArgument, InvariantBroken
from server.ledger import Ledger
from server.logs import request_context
from server.reconciliation import Reconciler
from stockward.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    inventory_pb2,
    inventory_pb2_grpc,
)

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")
# grpc ships no type stubs, so its context is Any to mypy either way.
Context: TypeAlias = Any
Handler = Callable[[Any, Request, Context], Awaitable[Response]]


def guarded(handler: Handler[Request, Response]) -> Handler[Request, Response]:
    """Map engine errors to statuses; stop the process on a broken invariant."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Request, context: Context) -> Response:
        request_context.set((handler.__name__, request))
        try:
            return await handler(self, request, context)
        except EngineError as error:
            log.debug("rpc refused: rpc=%s reason=%s", handler.__name__, error.reason)
            await abort(context, status_of(error))
        except InvariantBroken as error:
            log.critical("invariant broken: rpc=%s error=%s", handler.__name__, error)
            self.on_invariant_broken(error)
            await abort(context, internal_status("INVARIANT_BROKEN", str(error)))
        raise AssertionError("abort() returns only by raising")

    return wrapper


def _add(total: inventory_pb2.Availability, part: inventory_pb2.Availability) -> None:
    total.on_hand += part.on_hand
    total.held += part.held
    total.available_to_sell += part.available_to_sell
    total.safety_stock += part.safety_stock
    total.buffer += part.buffer
    total.inbound += part.inbound


class InventoryService(inventory_pb2_grpc.InventoryServiceServicer):
    def __init__(
        self,
        *,
        ledger: Ledger,
        clock: Clock,
        on_invariant_broken: Callable[[BaseException], None],
    ) -> None:
        self._ledger = ledger
        self._clock = clock
        self.on_invariant_broken = on_invariant_broken

    @guarded
    async def Reserve(
        self, request: inventory_pb2.ReserveRequest, context: Context
    ) -> inventory_pb2.ReserveResponse:
        result = await self._ledger.execute(convert.reserve(request))
        assert isinstance(result, cmd.ReserveResult)
        return convert.reserve_response(result)

    @guarded
    async def Confirm(
        self, request: inventory_pb2.ConfirmRequest, context: Context
    ) -> inventory_pb2.ConfirmResponse:
        result = await self._ledger.execute(convert.confirm(request))
        return convert.reservation_response(result, inventory_pb2.ConfirmResponse)

    @guarded
    async def Release(
        self, request: inventory_pb2.ReleaseRequest, context: Context
    ) -> inventory_pb2.ReleaseResponse:
        result = await self._ledger.execute(convert.release(request))
        return convert.reservation_response(result, inventory_pb2.ReleaseResponse)

    @guarded
    async def Fulfill(
        self, request: inventory_pb2.FulfillRequest, context: Context
    ) -> inventory_pb2.FulfillResponse:
        result = await self._ledger.execute(convert.fulfill(request))
        return convert.reservation_response(result, inventory_pb2.FulfillResponse)

    @guarded
    async def Extend(
        self, request: inventory_pb2.ExtendRequest, context: Context
    ) -> inventory_pb2.ExtendResponse:
        result = await self._ledger.execute(convert.extend(request))
        return convert.reservation_response(result, inventory_pb2.ExtendResponse)

    @guarded
    async def MoveReservation(
        self, request: inventory_pb2.MoveReservationRequest, context: Context
    ) -> inventory_pb2.MoveReservationResponse:
        result = await self._ledger.execute(convert.move(request))
        return convert.reservation_response(
            result, inventory_pb2.MoveReservationResponse
        )

    @guarded
    async def GetReservation(
        self, request: inventory_pb2.GetReservationRequest, context: Context
    ) -> inventory_pb2.GetReservationResponse:
        reservation = self._ledger.reader().get_reservation(request.reservation_id)
        return inventory_pb2.GetReservationResponse(
            reservation=convert.reservation(reservation)
        )

    @guarded
    async def ListReservations(
        self, request: inventory_pb2.ListReservationsRequest, context: Context
    ) -> inventory_pb2.ListReservationsResponse:
        engine = self._ledger.reader()
        check_id(
            request.channel,
            field="channel",
            length_max=engine.limits.channel_length_max,
            required=False,
        )
        state = None
        if request.state:
            state = convert.STATE_FROM_PROTO.get(request.state)
            if state is None:
                raise InvalidArgument(
                    "STATE_UNKNOWN",
                    f"state {request.state} is not known",
                    field="state",
                )
        created_before_us = None
        if request.HasField("created_before"):
            created_before_us = request.created_before.ToMicroseconds()
        page, token = engine.list_reservations(
            channel=request.channel,
            state=state,
            created_before_us=created_before_us,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return inventory_pb2.ListReservationsResponse(
            reservations=[convert.reservation(r) for r in page], next_page_token=token
        )

    @guarded
    async def GetAvailability(
        self, request: inventory_pb2.GetAvailabilityRequest, context: Context
    ) -> inventory_pb2.GetAvailabilityResponse:
        engine = self._ledger.reader()
        engine.check_availability_query(list(request.skus), list(request.locations))
        check_id(
            request.channel,
            field="channel",
            length_max=engine.limits.channel_length_max,
            required=False,
        )
        items = []
        for sku in request.skus:
            rows = engine.availability(sku, list(request.locations), request.channel)
            total = inventory_pb2.Availability()
            locations = []
            for position, safety, buffer, available in rows:
                view = inventory_pb2.Availability(
                    on_hand=position.on_hand,
                    held=position.held,
                    available_to_sell=available,
                    safety_stock=safety,
                    buffer=buffer,
                    inbound=engine.policies.inbound_units(sku, position.location),
                )
                locations.append(
                    inventory_pb2.LocationAvailability(
                        location=position.location, availability=view
                    )
                )
                _add(total, view)
            reach = engine.channel_reach(sku, request.channel, set(request.locations))
            total.available_to_sell = min(total.available_to_sell, reach)
            allocation_left = engine.allocation_left(sku, request.channel)
            items.append(
                inventory_pb2.SkuAvailability(
                    sku=sku,
                    known=bool(engine.positions_of(sku)),
                    total=total,
                    locations=locations,
                    has_allocation=allocation_left is not None,
                    allocation_remaining=allocation_left or 0,
                    suppressed=engine.policies.is_suppressed(
                        request.channel, sku, self._clock.now_us()
                    ),
                )
            )
        return inventory_pb2.GetAvailabilityResponse(
            skus=items, as_of=convert.timestamp(self._clock.now_us())
        )

    @guarded
    async def ExecuteBatch(
        self, request: inventory_pb2.ExecuteBatchRequest, context: Context
    ) -> inventory_pb2.ExecuteBatchResponse:
        limits = self._ledger.engine.limits
        check_count(
            len(request.commands),
            field="commands",
            count_max=limits.commands_per_batch_max,
        )
        kinds = [item.WhichOneof("command") for item in request.commands]
        commands = [
            _batch_command(item, index) for index, item in enumerate(request.commands)
        ]
        runnable = [c for c in commands if not isinstance(c, EngineError)]
        outcomes = iter(await self._ledger.execute_batch(runnable))
        results = []
        for kind, command in zip(kinds, commands, strict=True):
            outcome = command if isinstance(command, EngineError) else next(outcomes)
            results.append(_batch_result(kind, outcome))
        return inventory_pb2.ExecuteBatchResponse(results=results)


def _check_plain_count(request: admin_pb2.SetOnHandRequest) -> None:
    """Fields that only mean something for an ERP snapshot are refused on a plain
    count rather than ignored: the caller expected a comparison."""
    if request.apply_correction:
        raise InvalidArgument(
            "NOT_AN_ERP_SNAPSHOT",
            "apply_correction needs an ERP snapshot (erp_snapshot or "
            "erp_applied_batch_ids)",
            field="apply_correction",
        )
    for index, count in enumerate(request.counts):
        if count.held_by_channel:
            raise InvalidArgument(
                "NOT_AN_ERP_SNAPSHOT",
                "held_by_channel is compared only in an ERP snapshot (erp_snapshot or "
                "erp_applied_batch_ids)",
                field=f"counts[{index}].held_by_channel",
            )


def _batch_command(
    item: inventory_pb2.Command, index: int
) -> cmd.Command | EngineError:
    kind = item.WhichOneof("command")
    if kind == "reserve":
        return convert.reserve(item.reserve)
    if kind == "confirm":
        return convert.confirm(item.confirm)
    if kind == "release":
        return convert.release(item.release)
    if kind == "fulfill":
        return convert.fulfill(item.fulfill)
    if kind == "extend":
        return convert.extend(item.extend)
    if kind == "move":
        return convert.move(item.move)
    return InvalidArgument(
        "FIELD_REQUIRED",
        f"commands[{index}] sets no command",
        field=f"commands[{index}].command",
    )


_RESERVATION_RESPONSES: dict[
    str,
    type[inventory_pb2.ConfirmResponse]
    | type[inventory_pb2.ReleaseResponse]
    | type[inventory_pb2.FulfillResponse]
    | type[inventory_pb2.ExtendResponse]
    | type[inventory_pb2.MoveReservationResponse],
] = {
    "confirm": inventory_pb2.ConfirmResponse,
    "release": inventory_pb2.ReleaseResponse,
    "fulfill": inventory_pb2.FulfillResponse,
    "extend": inventory_pb2.ExtendResponse,
    "move": inventory_pb2.MoveReservationResponse,
}


def _batch_result(
    kind: str | None, outcome: cmd.Result | EngineError
) -> inventory_pb2.CommandResult:
    if isinstance(outcome, EngineError):
        return inventory_pb2.CommandResult(error=status_of(outcome))
    if isinstance(outcome, cmd.ReserveResult):
        return inventory_pb2.CommandResult(reserve=convert.reserve_response(outcome))
    assert kind in _RESERVATION_RESPONSES
    response = convert.reservation_response(outcome, _RESERVATION_RESPONSES[kind])
    result = inventory_pb2.CommandResult()
    getattr(result, kind).CopyFrom(response)
    return result


class StockAdminService(admin_pb2_grpc.StockAdminServiceServicer):
    def __init__(
        self,
        *,
        ledger: Ledger,
        reconciler: Reconciler,
        clock: Clock,
        on_invariant_broken: Callable[[BaseException], None],
    ) -> None:
        self._ledger = ledger
        self._reconciler = reconciler
        self._clock = clock
        self.on_invariant_broken = on_invariant_broken

    async def _stock(self, command: cmd.StockCommand) -> cmd.StockResult:
        result = await self._ledger.execute(command)
        assert isinstance(result, cmd.StockResult)
        return result

    @guarded
    async def AdjustStock(
        self, request: admin_pb2.AdjustStockRequest, context: Context
    ) -> admin_pb2.AdjustStockResponse:
        result = await self._stock(convert.adjust_stock(request))
        return admin_pb2.AdjustStockResponse(
            positions=convert.positions(result), replayed=result.replayed
        )

    @guarded
    async def SetOnHand(
        self, request: admin_pb2.SetOnHandRequest, context: Context
    ) -> admin_pb2.SetOnHandResponse:
        if convert.is_erp_snapshot(request):
            result = await self._reconciler.reconcile(
                convert.reconcile_on_hand(request)
            )
        else:
            _check_plain_count(request)
            result = await self._stock(convert.set_on_hand(request))
        return admin_pb2.SetOnHandResponse(
            positions=convert.positions(result),
            replayed=result.replayed,
            divergences=[
                convert.divergence(
                    item,
                    source=request.source,
                    source_event_id=request.source_event_id,
                )
                for item in result.divergences
            ],
        )

    @guarded
    async def ListDivergence(
        self, request: admin_pb2.ListDivergenceRequest, context: Context
    ) -> admin_pb2.ListDivergenceResponse:
        rows, token = await self._reconciler.list_divergences(
            sku=request.sku, page_size=request.page_size, page_token=request.page_token
        )
        return admin_pb2.ListDivergenceResponse(
            divergences=[
                convert.divergence(
                    row.divergence,
                    source=row.source,
                    source_event_id=row.source_event_id,
                )
                for row in rows
            ],
            next_page_token=token,
        )

    async def _policy(self, command: cmd.PolicyCommand) -> bool:
        result = await self._ledger.execute(command)
        return result.replayed

    @guarded
    async def SetSafetyStock(
        self, request: admin_pb2.SetSafetyStockRequest, context: Context
    ) -> admin_pb2.SetSafetyStockResponse:
        replayed = await self._policy(convert.set_safety_stock(request))
        return admin_pb2.SetSafetyStockResponse(replayed=replayed)

    @guarded
    async def SetChannelBuffer(
        self, request: admin_pb2.SetChannelBufferRequest, context: Context
    ) -> admin_pb2.SetChannelBufferResponse:
        replayed = await self._policy(convert.set_channel_buffer(request))
        return admin_pb2.SetChannelBufferResponse(replayed=replayed)

    @guarded
    async def SetLocationGroup(
        self, request: admin_pb2.SetLocationGroupRequest, context: Context
    ) -> admin_pb2.SetLocationGroupResponse:
        replayed = await self._policy(convert.set_location_group(request))
        return admin_pb2.SetLocationGroupResponse(replayed=replayed)

    @guarded
    async def SetChannelSourcing(
        self, request: admin_pb2.SetChannelSourcingRequest, context: Context
    ) -> admin_pb2.SetChannelSourcingResponse:
        replayed = await self._policy(convert.set_channel_sourcing(request))
        return admin_pb2.SetChannelSourcingResponse(replayed=replayed)

    @guarded
    async def SetChannelAllocation(
        self, request: admin_pb2.SetChannelAllocationRequest, context: Context
    ) -> admin_pb2.SetChannelAllocationResponse:
        replayed = await self._policy(convert.set_channel_allocation(request))
        return admin_pb2.SetChannelAllocationResponse(replayed=replayed)

    @guarded
    async def SetContinuityControl(
        self, request: admin_pb2.SetContinuityControlRequest, context: Context
    ) -> admin_pb2.SetContinuityControlResponse:
        result = await self._ledger.execute(convert.set_control(request))
        assert isinstance(result, cmd.PolicyResult)
        return admin_pb2.SetContinuityControlResponse(
            control_id=result.control_id, replayed=result.replayed
        )

    @guarded
    async def LiftContinuityControl(
        self, request: admin_pb2.LiftContinuityControlRequest, context: Context
    ) -> admin_pb2.LiftContinuityControlResponse:
        replayed = await self._policy(convert.lift_control(request))
        return admin_pb2.LiftContinuityControlResponse(replayed=replayed)

    @guarded
    async def SetInboundSupply(
        self, request: admin_pb2.SetInboundSupplyRequest, context: Context
    ) -> admin_pb2.SetInboundSupplyResponse:
        replayed = await self._policy(convert.set_inbound_supply(request))
        return admin_pb2.SetInboundSupplyResponse(replayed=replayed)

    @guarded
    async def SetChannels(
        self, request: admin_pb2.SetChannelsRequest, context: Context
    ) -> admin_pb2.SetChannelsResponse:
        replayed = await self._policy(convert.set_channels(request))
        return admin_pb2.SetChannelsResponse(replayed=replayed)

    @guarded
    async def SetChannelPreorders(
        self, request: admin_pb2.SetChannelPreordersRequest, context: Context
    ) -> admin_pb2.SetChannelPreordersResponse:
        replayed = await self._policy(convert.set_channel_preorders(request))
        return admin_pb2.SetChannelPreordersResponse(replayed=replayed)

    @guarded
    async def ListAtRiskReservations(
        self, request: admin_pb2.ListAtRiskReservationsRequest, context: Context
    ) -> admin_pb2.ListAtRiskReservationsResponse:
        engine = self._ledger.reader()
        check_id(
            request.channel,
            field="channel",
            length_max=engine.limits.channel_length_max,
            required=False,
        )
        return admin_pb2.ListAtRiskReservationsResponse(
            reservations=[
                admin_pb2.AtRiskReservation(
                    reservation=convert.reservation(reservation),
                    lines=[
                        admin_pb2.AtRiskLine(
                            sku=sku, location=location, quantity_uncovered=units
                        )
                        for sku, location, units in lines
                    ],
                )
                for reservation, lines in engine.at_risk(channel=request.channel)
            ]
        )

    @guarded
    async def GetPolicies(
        self, request: admin_pb2.GetPoliciesRequest, context: Context
    ) -> admin_pb2.GetPoliciesResponse:
        engine = self._ledger.reader()
        return convert.policies(
            engine.policies, engine.allocation_remaining, self._clock.now_us()
        )
