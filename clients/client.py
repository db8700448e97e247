"""The async client channel backends use to call stockward.

Every write is one logical operation with one idempotency key (request_id,
change_id or source_event_id), generated here unless the caller brings its own (a
backend that persists its key survives its own restarts, too). Retries reuse it, so
an operation whose first answer was lost is applied once. Every call runs under a
deadline, a budget for the whole operation: retries and backoff spend from it rather
than starting a fresh timeout each.

With `batching` set, reserve, confirm, release, fulfil, extend and move go through
ExecuteBatch (see batching.py) and answer exactly as the single calls would.
"""

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Self, TypeVar

import grpc
from google.protobuf.message import Message

from clients.batching import Batcher, Batching, BatchStats
from clients.errors import error_from_rpc, error_from_status
from clients.retry import RetryPolicy
from stockward.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    inventory_pb2,
    inventory_pb2_grpc,
    types_pb2,
)

log = logging.getLogger(__name__)

Response = TypeVar("Response")
Request = TypeVar("Request", bound=Message)

# One logical operation's budget unless the caller gives one: long enough for a
# retry across a server restart on a LAN, short enough to fail an order page fast.
DEADLINE_DEFAULT_S = 5.0


# gRPC's default reconnect backoff starts at 1 s and grows to 120 s: after a server
# restart (about a second here) a client would sit idle long after it is back, and
# the retry budget above would run out first. stockward runs beside its callers,
# so reconnecting every 100 ms to 2 s costs nothing. (The minimum backoff is left
# alone: gRPC also uses it as the time a connection attempt may take.)
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def new_request_id() -> str:
    return uuid.uuid4().hex


def line(
    sku: str,
    quantity: int,
    *,
    location: str = "",
    locations: Iterable[str] = (),
    allow_split: bool = False,
) -> inventory_pb2.ReserveLine:
    """One line of a reservation: at a location, in a preference order, or (with
    neither) from the channel's default location group."""
    return inventory_pb2.ReserveLine(
        sku=sku,
        quantity=quantity,
        location=location,
        locations=list(locations),
        allow_split=allow_split,
    )


def quantity(sku: str, location: str, units: int) -> types_pb2.LineQuantity:
    """Part of a hold, for a partial release or fulfilment."""
    return types_pb2.LineQuantity(sku=sku, location=location, quantity=units)


class StockwardClient:
    """Typed calls to InventoryService and StockAdminService.

    Use as `async with StockwardClient("host:port") as client:`; or pass a channel
    you own (the client then leaves it open on close).
    """

    def __init__(
        self,
        target: str | grpc.aio.Channel,
        *,
        deadline_s: float = DEADLINE_DEFAULT_S,
        retry: RetryPolicy | None = None,
        batching: Batching | None = None,
        new_id: Callable[[], str] = new_request_id,
        rng: random.Random | None = None,
    ) -> None:
        if isinstance(target, str):
            self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
            self._owns_channel = True
        else:
            self._channel = target
            self._owns_channel = False
        self._inventory = inventory_pb2_grpc.InventoryServiceStub(self._channel)
        self._admin = admin_pb2_grpc.StockAdminServiceStub(self._channel)
        self._deadline_s = deadline_s
        self._retry = retry or RetryPolicy()
        self._new_id = new_id
        self._rng = rng or random.Random()
        self._batcher: Batcher | None = None
        if batching is not None:
            self._batcher = Batcher(
                self._execute_batch_once, batching, self._retry, rng=self._rng
            )
        # Tries per logical operation beyond the first, for operators and tests.
        self.retries = 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()
        if self._owns_channel:
            await self._channel.close()

    @property
    def batch_stats(self) -> BatchStats | None:
        return self._batcher.stats if self._batcher is not None else None

    # Reservations -------------------------------------------------------------------

    async def reserve(
        self,
        channel: str,
        lines: Iterable[inventory_pb2.ReserveLine],
        *,
        order_ref: str = "",
        ttl_s: int = 0,
        allow_partial: bool = False,
        request_id: str = "",
        deadline_s: float | None = None,
    ) -> inventory_pb2.ReserveResponse:
        request = inventory_pb2.ReserveRequest(
            request_id=request_id or self._new_id(),
            channel=channel,
            order_ref=order_ref,
            lines=list(lines),
            ttl_seconds=ttl_s,
            allow_partial=allow_partial,
        )
        command = inventory_pb2.Command(reserve=request)
        return await self._write(
            command, "reserve", self._inventory.Reserve, request, deadline_s
        )

    async def confirm(
        self,
        reservation_id: str,
        *,
        request_id: str = "",
        deadline_s: float | None = None,
    ) -> inventory_pb2.ConfirmResponse:
        request = inventory_pb2.ConfirmRequest(
            request_id=request_id or self._new_id(), reservation_id=reservation_id
        )
        command = inventory_pb2.Command(confirm=request)
        return await self._write(
            command, "confirm", self._inventory.Confirm, request, deadline_s
        )

    async def release(
        self,
        reservation_id: str,
        lines: Iterable[types_pb2.LineQuantity] = (),
        *,
        request_id: str = "",
        deadline_s: float | None = None,
    ) -> inventory_pb2.ReleaseResponse:
        """Release all of a hold, or the given quantities of it."""
        request = inventory_pb2.ReleaseRequest(
            request_id=request_id or self._new_id(),
            reservation_id=reservation_id,
            lines=list(lines),
        )
        command = inventory_pb2.Command(release=request)
        return await self._write(
            command, "release", self._inventory.Release, request, deadline_s
        )

    async def fulfill(
        self,
        reservation_id: str,
        lines: Iterable[types_pb2.LineQuantity] = (),
        *,
        request_id: str = "",
        deadline_s: float | None = None,
    ) -> inventory_pb2.FulfillResponse:
        """Ship all of a confirmed hold, or the given quantities of it."""
        request = inventory_pb2.FulfillRequest(
            request_id=request_id or self._new_id(),
            reservation_id=reservation_id,
            lines=list(lines),
        )
        command = inventory_pb2.Command(fulfill=request)
        return await self._write(
            command, "fulfill", self._inventory.Fulfill, request, deadline_s
        )

    async def extend(
        self,
        reservation_id: str,
        ttl_s: int,
        *,
        request_id: str = "",
        deadline_s: float | None = None,
    ) -> inventory_pb2.ExtendResponse:
        request = inventory_pb2.ExtendRequest(
            request_id=request_id or self._new_id(),
            reservation_id=reservation_id,
            ttl_seconds=ttl_s,
        )
        command = inventory_pb2.Command(extend=request)
        return await self._write(
            command, "extend", self._inventory.Extend, request, deadline_s
        )

    async def move(
        self,
        reservation_id: str,
        sku: str,
        from_location: str,
        to_location: str,
        units: int,
        *,
        request_id: str = "",
        deadline_s: float | None = None,
    ) -> inventory_pb2.MoveReservationResponse:
        request = inventory_pb2.MoveReservationRequest(
            request_id=request_id or self._new_id(),
            reservation_id=reservation_id,
            sku=sku,
            from_location=from_location,
            to_location=to_location,
            quantity=units,
        )
        command = inventory_pb2.Command(move=request)
        return await self._write(
            command, "move", self._inventory.MoveReservation, request, deadline_s
        )

    async def execute_batch(
        self,
        commands: Iterable[inventory_pb2.Command],
        *,
        deadline_s: float | None = None,
    ) -> list[inventory_pb2.CommandResult]:
        """Up to 1,000 commands in one call, each with its own result (errors
        included, as `result.error`). Commands without a request id get one."""
        batch = [_with_request_id(command, self._new_id) for command in commands]
        request = inventory_pb2.ExecuteBatchRequest(commands=batch)
        response = await self._call(self._inventory.ExecuteBatch, request, deadline_s)
        return list(response.results)

    # Reads ------------------------------------------------------------------------------

    async def get_reservation(
        self, reservation_id: str, *, deadline_s: float | None = None
    ) -> types_pb2.Reservation:
        request = inventory_pb2.GetReservationRequest(reservation_id=reservation_id)
        response: inventory_pb2.GetReservationResponse = await self._call(
            self._inventory.GetReservation, request, deadline_s
        )
        return response.reservation

    async def list_reservations(
        self,
        request: inventory_pb2.ListReservationsRequest,
        *,
        deadline_s: float | None = None,
    ) -> inventory_pb2.ListReservationsResponse:
        return await self._call(self._inventory.ListReservations, request, deadline_s)

    async def get_availability(
        self,
        skus: Iterable[str],
        *,
        locations: Iterable[str] = (),
        channel: str = "",
        deadline_s: float | None = None,
    ) -> inventory_pb2.GetAvailabilityResponse:
        request = inventory_pb2.GetAvailabilityRequest(
            skus=list(skus), locations=list(locations), channel=channel
        )
        return await self._call(self._inventory.GetAvailability, request, deadline_s)

    # Stock and policies -----------------------------------------------------------------
    # Each takes its request message as it stands and fills in the idempotency key
    # when it is empty.

    async def adjust_stock(
        self, request: admin_pb2.AdjustStockRequest, *, deadline_s: float | None = None
    ) -> admin_pb2.AdjustStockResponse:
        keyed = self._keyed(request, "source_event_id")
        return await self._call(self._admin.AdjustStock, keyed, deadline_s)

    async def set_on_hand(
        self, request: admin_pb2.SetOnHandRequest, *, deadline_s: float | None = None
    ) -> admin_pb2.SetOnHandResponse:
        keyed = self._keyed(request, "source_event_id")
        return await self._call(self._admin.SetOnHand, keyed, deadline_s)

    async def set_safety_stock(
        self,
        request: admin_pb2.SetSafetyStockRequest,
        *,
        deadline_s: float | None = None,
    ) -> admin_pb2.SetSafetyStockResponse:
        keyed = self._keyed(request, "change_id")
        return await self._call(self._admin.SetSafetyStock, keyed, deadline_s)

    async def set_channel_buffer(
        self,
        request: admin_pb2.SetChannelBufferRequest,
        *,
        deadline_s: float | None = None,
    ) -> admin_pb2.SetChannelBufferResponse:
        keyed = self._keyed(request, "change_id")
        return await self._call(self._admin.SetChannelBuffer, keyed, deadline_s)

    async def set_location_group(
        self,
        request: admin_pb2.SetLocationGroupRequest,
        *,
        deadline_s: float | None = None,
    ) -> admin_pb2.SetLocationGroupResponse:
        keyed = self._keyed(request, "change_id")
        return await self._call(self._admin.SetLocationGroup, keyed, deadline_s)

    async def set_channel_sourcing(
        self,
        request: admin_pb2.SetChannelSourcingRequest,
        *,
        deadline_s: float | None = None,
    ) -> admin_pb2.SetChannelSourcingResponse:
        keyed = self._keyed(request, "change_id")
        return await self._call(self._admin.SetChannelSourcing, keyed, deadline_s)

    async def set_channel_allocation(
        self,
        request: admin_pb2.SetChannelAllocationRequest,
        *,
        deadline_s: float | None = None,
    ) -> admin_pb2.SetChannelAllocationResponse:
        keyed = self._keyed(request, "change_id")
        return await self._call(self._admin.SetChannelAllocation, keyed, deadline_s)

    async def set_continuity_control(
        self,
        request: admin_pb2.SetContinuityControlRequest,
        *,
        deadline_s: float | None = None,
    ) -> admin_pb2.SetContinuityControlResponse:
        keyed = self._keyed(request, "change_id")
        return await self._call(self._admin.SetContinuityControl, keyed, deadline_s)

    async def lift_continuity_control(
        self,
        request: admin_pb2.LiftContinuityControlRequest,
        *,
        deadline_s: float | None = None,
    ) -> admin_pb2.LiftContinuityControlResponse:
        keyed = self._keyed(request, "change_id")
        return await self._call(self._admin.LiftContinuityControl, keyed, deadline_s)

    async def set_inbound_supply(
        self,
        request: admin_pb2.SetInboundSupplyRequest,
        *,
        deadline_s: float | None = None,
    ) -> admin_pb2.SetInboundSupplyResponse:
        keyed = self._keyed(request, "change_id")
        return await self._call(self._admin.SetInboundSupply, keyed, deadline_s)

    async def set_channel_preorders(
        self,
        request: admin_pb2.SetChannelPreordersRequest,
        *,
        deadline_s: float | None = None,
    ) -> admin_pb2.SetChannelPreordersResponse:
        keyed = self._keyed(request, "change_id")
        return await self._call(self._admin.SetChannelPreorders, keyed, deadline_s)

    async def set_channels(
        self, request: admin_pb2.SetChannelsRequest, *, deadline_s: float | None = None
    ) -> admin_pb2.SetChannelsResponse:
        keyed = self._keyed(request, "change_id")
        return await self._call(self._admin.SetChannels, keyed, deadline_s)

    async def list_at_risk_reservations(
        self,
        request: admin_pb2.ListAtRiskReservationsRequest,
        *,
        deadline_s: float | None = None,
    ) -> admin_pb2.ListAtRiskReservationsResponse:
        return await self._call(self._admin.ListAtRiskReservations, request, deadline_s)

    async def get_policies(
        self, *, deadline_s: float | None = None
    ) -> admin_pb2.GetPoliciesResponse:
        request = admin_pb2.GetPoliciesRequest()
        return await self._call(self._admin.GetPolicies, request, deadline_s)

    # Calling ----------------------------------------------------------------------------

    def _keyed(self, request: Request, field: str) -> Request:
        if getattr(request, field):
            return request
        keyed = type(request)()
        keyed.CopyFrom(request)
        setattr(keyed, field, self._new_id())
        return keyed

    async def _write(
        self,
        command: inventory_pb2.Command,
        kind: str,
        single: Callable[..., Awaitable[Response]],
        request: Any,
        deadline_s: float | None,
    ) -> Response:
        """A write, alone or in a batch; the same answer either way."""
        if self._batcher is None:
            return await self._call(single, request, deadline_s)
        deadline = time.monotonic() + (
            self._deadline_s if deadline_s is None else deadline_s
        )
        result = await self._batcher.submit(command, deadline)
        answer: Response = getattr(result, kind)
        return answer

    async def _call(
        self,
        method: Callable[..., Awaitable[Response]],
        request: Any,
        deadline_s: float | None,
    ) -> Response:
        """One logical operation: tries under the retry policy, all within one
        deadline, all with the same request (and so the same idempotency key)."""
        deadline = time.monotonic() + (
            self._deadline_s if deadline_s is None else deadline_s
        )
        attempt = 1
        while True:
            timeout_s = deadline - time.monotonic()
            try:
                return await method(request, timeout=max(0.0, timeout_s))
            except grpc.aio.AioRpcError as rpc_error:
                error = error_from_rpc(rpc_error)
                delay_s = self._retry.delay_s(error, attempt, self._rng)
                if not self._retry.should_retry(error, attempt) or (
                    time.monotonic() + delay_s >= deadline
                ):
                    raise error from rpc_error
            log.debug(
                "retry: attempt=%d delay_s=%.3f error=%s", attempt, delay_s, error
            )
            self.retries += 1
            attempt += 1
            await asyncio.sleep(delay_s)

    async def _execute_batch_once(
        self, commands: list[inventory_pb2.Command], timeout_s: float
    ) -> list[inventory_pb2.CommandResult]:
        """One ExecuteBatch try for the batcher, which retries on its own."""
        request = inventory_pb2.ExecuteBatchRequest(commands=commands)
        try:
            response = await self._inventory.ExecuteBatch(
                request, timeout=max(0.0, timeout_s)
            )
        except grpc.aio.AioRpcError as rpc_error:
            raise error_from_rpc(rpc_error) from rpc_error
        return list(response.results)


def _with_request_id(
    command: inventory_pb2.Command, new_id: Callable[[], str]
) -> inventory_pb2.Command:
    kind = command.WhichOneof("command")
    if kind is None or getattr(command, kind).request_id:
        return command
    keyed = inventory_pb2.Command()
    keyed.CopyFrom(command)
    getattr(keyed, kind).request_id = new_id()
    return keyed


def raise_for(result: inventory_pb2.CommandResult) -> None:
    """Raise the error one command of an ExecuteBatch got, if it got one."""
    if result.WhichOneof("result") == "error":
        raise error_from_status(result.error)
