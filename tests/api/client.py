"""Shorthands the API tests share: stocking positions, building requests, reading
availability and reservations, and reading refusals.

Everything here goes through the real gRPC stubs; nothing reaches into the server.
"""

from collections.abc import Awaitable

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from stockward.v1 import admin_pb2, inventory_pb2, types_pb2
from tests.conftest import Running

CHANNEL = "web"
ERROR_DOMAIN = "stockward.v1"
# What `refusal` reports in place of a reason when the status carries no ErrorInfo of
# ours, so that the comparison in the test fails and shows why.
NO_ERROR_INFO = "<no stockward.v1 ErrorInfo>"

# A refused call as the tests compare it: gRPC code, ErrorInfo reason, metadata field.
Refusal = tuple[grpc.StatusCode, str, str]


def line(
    sku: str,
    quantity: int,
    *,
    location: str = "",
    locations: tuple[str, ...] = (),
    allow_split: bool = False,
) -> inventory_pb2.ReserveLine:
    return inventory_pb2.ReserveLine(
        sku=sku,
        quantity=quantity,
        location=location,
        locations=locations,
        allow_split=allow_split,
    )


def reserve_request(
    request_id: str,
    *lines: inventory_pb2.ReserveLine,
    channel: str = CHANNEL,
    ttl_s: int = 0,
    allow_partial: bool = False,
    order_ref: str = "",
) -> inventory_pb2.ReserveRequest:
    return inventory_pb2.ReserveRequest(
        request_id=request_id,
        channel=channel,
        order_ref=order_ref,
        lines=lines,
        ttl_seconds=ttl_s,
        allow_partial=allow_partial,
    )


def taken(sku: str, location: str, quantity: int) -> types_pb2.LineQuantity:
    """Part of a hold, for Release and Fulfill."""
    return types_pb2.LineQuantity(sku=sku, location=location, quantity=quantity)


async def set_on_hand(
    server: Running, event_id: str, *counts: tuple[str, str, int]
) -> admin_pb2.SetOnHandResponse:
    """Count (sku, location, on_hand) positions, as the ERP would."""
    response: admin_pb2.SetOnHandResponse = await server.admin.SetOnHand(
        admin_pb2.SetOnHandRequest(
            source="erp",
            source_event_id=event_id,
            counts=[
                admin_pb2.OnHandCount(sku=sku, location=location, on_hand=on_hand)
                for sku, location, on_hand in counts
            ],
        )
    )
    return response


async def reserve(
    server: Running, request: inventory_pb2.ReserveRequest
) -> inventory_pb2.ReserveResponse:
    response: inventory_pb2.ReserveResponse = await server.inventory.Reserve(request)
    return response


async def confirm(
    server: Running, reservation_id: str, *, request_id: str = ""
) -> types_pb2.Reservation:
    response: inventory_pb2.ConfirmResponse = await server.inventory.Confirm(
        inventory_pb2.ConfirmRequest(
            request_id=request_id or "confirm-" + reservation_id,
            reservation_id=reservation_id,
        )
    )
    return response.reservation


async def availability(server: Running, sku: str) -> tuple[int, int, int]:
    """(on_hand, held, available_to_sell) of a sku over every location."""
    response: inventory_pb2.GetAvailabilityResponse = (
        await server.inventory.GetAvailability(
            inventory_pb2.GetAvailabilityRequest(skus=[sku])
        )
    )
    total = response.skus[0].total
    return total.on_hand, total.held, total.available_to_sell


async def availability_at(server: Running, sku: str) -> dict[str, tuple[int, int, int]]:
    """(on_hand, held, available_to_sell) of a sku per location."""
    response: inventory_pb2.GetAvailabilityResponse = (
        await server.inventory.GetAvailability(
            inventory_pb2.GetAvailabilityRequest(skus=[sku])
        )
    )
    return {
        item.location: (
            item.availability.on_hand,
            item.availability.held,
            item.availability.available_to_sell,
        )
        for item in response.skus[0].locations
    }


async def reservation(server: Running, reservation_id: str) -> types_pb2.Reservation:
    response: inventory_pb2.GetReservationResponse = (
        await server.inventory.GetReservation(
            inventory_pb2.GetReservationRequest(reservation_id=reservation_id)
        )
    )
    return response.reservation


def held_by_line(value: types_pb2.Reservation) -> dict[tuple[str, str], int]:
    return {(item.sku, item.location): item.quantity_held for item in value.lines}


async def list_all(
    server: Running,
    *,
    page_size: int,
    channel: str = "",
    state: types_pb2.ReservationState.ValueType = (
        types_pb2.RESERVATION_STATE_UNSPECIFIED
    ),
    created_before_us: int = 0,
) -> list[list[str]]:
    """Every page of ListReservations with the same filters, as reservation ids."""
    request = inventory_pb2.ListReservationsRequest(
        channel=channel, state=state, page_size=page_size
    )
    if created_before_us:
        request.created_before.FromMicroseconds(created_before_us)
    pages: list[list[str]] = []
    # Bounds the walk so that a server handing out a token forever fails the test
    # instead of hanging it; no test lists more than a few hundred reservations.
    for _ in range(1_000):
        response: inventory_pb2.ListReservationsResponse = (
            await server.inventory.ListReservations(request)
        )
        pages.append([item.reservation_id for item in response.reservations])
        if not response.next_page_token:
            return pages
        request.page_token = response.next_page_token
    raise AssertionError("ListReservations kept handing out page tokens")


async def refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    """The error a call ends with; a call that succeeds raises AssertionError."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the call succeeded; it should have been refused")


def refusal(error: grpc.aio.AioRpcError) -> Refusal:
    status = rpc_status.from_call(error)
    if status is None:
        return error.code(), NO_ERROR_INFO, ""
    _, reason, field = status_refusal(status)
    return error.code(), reason, field


def status_refusal(status: status_pb2.Status) -> Refusal:
    """The same reading for a google.rpc.Status carried in a response."""
    code = next(item for item in grpc.StatusCode if item.value[0] == status.code)
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
            infos.append(info)
    if len(infos) != 1:
        return code, NO_ERROR_INFO, ""
    return code, infos[0].reason, infos[0].metadata.get("field", "")
