"""Every field of every RPC, sent wrong: the right status code, and an ErrorInfo whose
reason and field say what was wrong. A refused call stores nothing."""

from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from server.clock import US_PER_S, FakeClock
from stockward.v1 import admin_pb2, inventory_pb2, types_pb2
from tests.api.client import (
    Refusal,
    availability,
    line,
    list_all,
    refusal,
    refused,
    reservation,
    reserve,
    reserve_request,
    set_on_hand,
    taken,
)
from tests.conftest import Running, ServerFactory, stop_server

# Stands for the id of the live reservation each test makes before the bad call.
HELD = "<held>"
WEEK_S = 7 * 24 * 3600

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def too_long(length_max: int) -> str:
    return "x" * (length_max + 1)


def bad_reserve(
    *lines: inventory_pb2.ReserveLine, **fields: Any
) -> inventory_pb2.ReserveRequest:
    values: dict[str, Any] = {"request_id": "bad", "channel": "web", **fields}
    chosen = lines or (line("MUG", 1, location="DC"),)
    return inventory_pb2.ReserveRequest(lines=chosen, **values)


def bad_line(**fields: Any) -> inventory_pb2.ReserveRequest:
    values: dict[str, Any] = {"sku": "MUG", "quantity": 1, "location": "DC", **fields}
    return bad_reserve(inventory_pb2.ReserveLine(**values))


def bad_change(kind: type[Message], **fields: Any) -> Message:
    """Confirm, Release, Fulfill or Extend of the live reservation unless told."""
    values: dict[str, Any] = {"request_id": "bad", "reservation_id": HELD, **fields}
    if kind is inventory_pb2.ExtendRequest:
        values.setdefault("ttl_seconds", 600)
    return kind(**values)


def bad_adjust(**fields: Any) -> Message:
    adjustment: dict[str, Any] = {
        "sku": "MUG",
        "location": "DC",
        "delta": 1,
        "reason": admin_pb2.ADJUSTMENT_REASON_RECEIPT,
    }
    adjustment.update(fields.pop("adjustment", {}))
    values: dict[str, Any] = {
        "source": "wms",
        "source_event_id": "bad",
        "adjustments": [admin_pb2.StockAdjustment(**adjustment)],
        **fields,
    }
    return admin_pb2.AdjustStockRequest(**values)


def bad_count(**fields: Any) -> Message:
    values: dict[str, Any] = {
        "source": "erp",
        "source_event_id": "bad",
        "counts": [admin_pb2.OnHandCount(sku="MUG", location="DC", on_hand=10)],
        **fields,
    }
    return admin_pb2.SetOnHandRequest(**values)


def case(request: Message, code: grpc.StatusCode, reason: str, field: str) -> Any:
    kind = type(request).__name__.removesuffix("Request")
    return pytest.param(request, (code, reason, field), id=f"{kind}-{reason}-{field}")


MANY_LINES = [line("MUG", 1, location=f"L{index}") for index in range(101)]
MANY_LOCATIONS = tuple(f"L{index}" for index in range(33))
MANY_TAKEN = [taken("MUG", "DC", 1) for _ in range(101)]
RELEASE = inventory_pb2.ReleaseRequest
FULFILL = inventory_pb2.FulfillRequest
CONFIRM = inventory_pb2.ConfirmRequest
EXTEND = inventory_pb2.ExtendRequest

CASES = [
    # Reserve: the request.
    case(bad_reserve(request_id=""), INVALID, "FIELD_REQUIRED", "request_id"),
    case(
        bad_reserve(request_id=too_long(128)), INVALID, "FIELD_TOO_LONG", "request_id"
    ),
    case(bad_reserve(request_id="a b"), INVALID, "FIELD_MALFORMED", "request_id"),
    case(bad_reserve(channel=""), INVALID, "FIELD_REQUIRED", "channel"),
    case(bad_reserve(channel=too_long(64)), INVALID, "FIELD_TOO_LONG", "channel"),
    case(bad_reserve(channel="wéb"), INVALID, "FIELD_MALFORMED", "channel"),
    case(bad_reserve(order_ref=too_long(128)), INVALID, "FIELD_TOO_LONG", "order_ref"),
    case(bad_reserve(ttl_seconds=-1), INVALID, "TTL_OUT_OF_RANGE", "ttl_seconds"),
    case(
        bad_reserve(ttl_seconds=WEEK_S + 1), INVALID, "TTL_OUT_OF_RANGE", "ttl_seconds"
    ),
    case(
        inventory_pb2.ReserveRequest(request_id="bad", channel="web"),
        INVALID,
        "FIELD_REQUIRED",
        "lines",
    ),
    case(bad_reserve(*MANY_LINES), INVALID, "TOO_MANY_ITEMS", "lines"),
    # Reserve: a line.
    case(bad_line(sku=""), INVALID, "FIELD_REQUIRED", "lines[0].sku"),
    case(bad_line(sku=too_long(64)), INVALID, "FIELD_TOO_LONG", "lines[0].sku"),
    case(bad_line(sku="MUG 1"), INVALID, "FIELD_MALFORMED", "lines[0].sku"),
    case(
        bad_reserve(line("MUG", 1, location="DC"), line("MUG\t2", 1, location="DC")),
        INVALID,
        "FIELD_MALFORMED",
        "lines[1].sku",
    ),
    case(bad_line(quantity=0), INVALID, "QUANTITY_OUT_OF_RANGE", "lines[0].quantity"),
    case(bad_line(quantity=-3), INVALID, "QUANTITY_OUT_OF_RANGE", "lines[0].quantity"),
    case(
        bad_line(quantity=1_000_001),
        INVALID,
        "QUANTITY_OUT_OF_RANGE",
        "lines[0].quantity",
    ),
    case(
        bad_line(locations=["DC"]), INVALID, "LOCATION_AMBIGUOUS", "lines[0].location"
    ),
    case(
        bad_line(location=""),
        PRECONDITION,
        "CHANNEL_HAS_NO_SOURCING",
        "lines[0].location",
    ),
    case(
        bad_line(location=too_long(64)), INVALID, "FIELD_TOO_LONG", "lines[0].location"
    ),
    case(
        bad_line(location="", locations=["DC", "ST", "DC"]),
        INVALID,
        "DUPLICATE_LOCATION",
        "lines[0].locations",
    ),
    case(
        bad_line(location="", locations=MANY_LOCATIONS),
        INVALID,
        "TOO_MANY_ITEMS",
        "lines[0].locations",
    ),
    case(
        bad_line(location="", locations=["DC", ""]),
        INVALID,
        "FIELD_REQUIRED",
        "lines[0].locations[1]",
    ),
    case(
        bad_line(allow_split=True),
        INVALID,
        "SPLIT_NEEDS_LOCATIONS",
        "lines[0].allow_split",
    ),
    # Confirm.
    case(bad_change(CONFIRM, request_id=""), INVALID, "FIELD_REQUIRED", "request_id"),
    case(
        bad_change(CONFIRM, request_id=too_long(128)),
        INVALID,
        "FIELD_TOO_LONG",
        "request_id",
    ),
    case(
        bad_change(CONFIRM, reservation_id=""),
        INVALID,
        "FIELD_REQUIRED",
        "reservation_id",
    ),
    case(
        bad_change(CONFIRM, reservation_id=too_long(64)),
        INVALID,
        "FIELD_TOO_LONG",
        "reservation_id",
    ),
    case(
        bad_change(CONFIRM, reservation_id="r 1"),
        INVALID,
        "FIELD_MALFORMED",
        "reservation_id",
    ),
    case(
        bad_change(CONFIRM, reservation_id="r-unknown"),
        NOT_FOUND,
        "RESERVATION_NOT_FOUND",
        "reservation_id",
    ),
    # Release.
    case(
        bad_change(RELEASE, request_id="a b"), INVALID, "FIELD_MALFORMED", "request_id"
    ),
    case(
        bad_change(RELEASE, reservation_id=""),
        INVALID,
        "FIELD_REQUIRED",
        "reservation_id",
    ),
    case(
        bad_change(RELEASE, reservation_id="r-unknown"),
        NOT_FOUND,
        "RESERVATION_NOT_FOUND",
        "reservation_id",
    ),
    case(
        bad_change(RELEASE, lines=[taken("", "DC", 1)]),
        INVALID,
        "FIELD_REQUIRED",
        "lines[0].sku",
    ),
    case(
        bad_change(RELEASE, lines=[taken("MUG", "", 1)]),
        INVALID,
        "FIELD_REQUIRED",
        "lines[0].location",
    ),
    case(
        bad_change(RELEASE, lines=[taken("MUG", "DC", 1), taken("MUG", "DC", 0)]),
        INVALID,
        "QUANTITY_OUT_OF_RANGE",
        "lines[1].quantity",
    ),
    case(
        bad_change(RELEASE, lines=[taken("MUG", "DC", -1)]),
        INVALID,
        "QUANTITY_OUT_OF_RANGE",
        "lines[0].quantity",
    ),
    case(bad_change(RELEASE, lines=MANY_TAKEN), INVALID, "TOO_MANY_ITEMS", "lines"),
    case(
        bad_change(RELEASE, lines=[taken("MUG", "STORE", 1)]),
        INVALID,
        "LINE_NOT_IN_RESERVATION",
        "lines[0]",
    ),
    case(
        bad_change(RELEASE, lines=[taken("MUG", "DC", 4)]),
        PRECONDITION,
        "QUANTITY_EXCEEDS_HELD",
        "lines[0].quantity",
    ),
    # Fulfill.
    case(bad_change(FULFILL, request_id=""), INVALID, "FIELD_REQUIRED", "request_id"),
    case(
        bad_change(FULFILL, reservation_id=too_long(64)),
        INVALID,
        "FIELD_TOO_LONG",
        "reservation_id",
    ),
    case(
        bad_change(FULFILL, lines=[taken(too_long(64), "DC", 1)]),
        INVALID,
        "FIELD_TOO_LONG",
        "lines[0].sku",
    ),
    case(
        bad_change(FULFILL, lines=[taken("MUG", "D C", 1)]),
        INVALID,
        "FIELD_MALFORMED",
        "lines[0].location",
    ),
    case(
        bad_change(FULFILL, lines=[taken("MUG", "DC", 1_000_001)]),
        INVALID,
        "QUANTITY_OUT_OF_RANGE",
        "lines[0].quantity",
    ),
    case(bad_change(FULFILL, lines=MANY_TAKEN), INVALID, "TOO_MANY_ITEMS", "lines"),
    case(
        bad_change(FULFILL),
        PRECONDITION,
        "RESERVATION_PENDING",
        "reservation_id",
    ),
    # Extend.
    case(bad_change(EXTEND, request_id=""), INVALID, "FIELD_REQUIRED", "request_id"),
    case(
        bad_change(EXTEND, reservation_id="r\x00"),
        INVALID,
        "FIELD_MALFORMED",
        "reservation_id",
    ),
    case(bad_change(EXTEND, ttl_seconds=0), INVALID, "TTL_OUT_OF_RANGE", "ttl_seconds"),
    case(
        bad_change(EXTEND, ttl_seconds=-60), INVALID, "TTL_OUT_OF_RANGE", "ttl_seconds"
    ),
    case(
        bad_change(EXTEND, ttl_seconds=WEEK_S + 1),
        INVALID,
        "TTL_OUT_OF_RANGE",
        "ttl_seconds",
    ),
    case(
        bad_change(EXTEND, reservation_id="r-unknown"),
        NOT_FOUND,
        "RESERVATION_NOT_FOUND",
        "reservation_id",
    ),
    # GetReservation.
    case(
        inventory_pb2.GetReservationRequest(),
        INVALID,
        "FIELD_REQUIRED",
        "reservation_id",
    ),
    case(
        inventory_pb2.GetReservationRequest(reservation_id=too_long(64)),
        INVALID,
        "FIELD_TOO_LONG",
        "reservation_id",
    ),
    # GetAvailability.
    case(inventory_pb2.GetAvailabilityRequest(), INVALID, "FIELD_REQUIRED", "skus"),
    case(
        inventory_pb2.GetAvailabilityRequest(skus=["MUG"] * 1001),
        INVALID,
        "TOO_MANY_ITEMS",
        "skus",
    ),
    case(
        inventory_pb2.GetAvailabilityRequest(skus=["MUG", ""]),
        INVALID,
        "FIELD_REQUIRED",
        "skus[1]",
    ),
    case(
        inventory_pb2.GetAvailabilityRequest(skus=["MUG"], locations=MANY_LOCATIONS),
        INVALID,
        "TOO_MANY_ITEMS",
        "locations",
    ),
    case(
        inventory_pb2.GetAvailabilityRequest(skus=["MUG"], locations=["D C"]),
        INVALID,
        "FIELD_MALFORMED",
        "locations[0]",
    ),
    case(
        inventory_pb2.GetAvailabilityRequest(skus=["MUG"], channel=too_long(64)),
        INVALID,
        "FIELD_TOO_LONG",
        "channel",
    ),
    # ListReservations.
    case(
        inventory_pb2.ListReservationsRequest(page_size=-1),
        INVALID,
        "PAGE_SIZE_OUT_OF_RANGE",
        "page_size",
    ),
    case(
        inventory_pb2.ListReservationsRequest(page_size=1001),
        INVALID,
        "PAGE_SIZE_OUT_OF_RANGE",
        "page_size",
    ),
    case(
        inventory_pb2.ListReservationsRequest(page_token="not-a-token"),
        INVALID,
        "PAGE_TOKEN_INVALID",
        "page_token",
    ),
    case(
        inventory_pb2.ListReservationsRequest(page_token="%%%"),
        INVALID,
        "PAGE_TOKEN_INVALID",
        "page_token",
    ),
    case(
        inventory_pb2.ListReservationsRequest(
            state=types_pb2.ReservationState.ValueType(99)
        ),
        INVALID,
        "STATE_UNKNOWN",
        "state",
    ),
    case(
        inventory_pb2.ListReservationsRequest(channel="a b"),
        INVALID,
        "FIELD_MALFORMED",
        "channel",
    ),
    # AdjustStock.
    case(bad_adjust(source=""), INVALID, "FIELD_REQUIRED", "source"),
    case(bad_adjust(source=too_long(64)), INVALID, "FIELD_TOO_LONG", "source"),
    case(bad_adjust(source_event_id=""), INVALID, "FIELD_REQUIRED", "source_event_id"),
    case(
        bad_adjust(source_event_id=too_long(128)),
        INVALID,
        "FIELD_TOO_LONG",
        "source_event_id",
    ),
    case(bad_adjust(adjustments=[]), INVALID, "FIELD_REQUIRED", "adjustments"),
    case(
        bad_adjust(adjustments=[admin_pb2.StockAdjustment()] * 1001),
        INVALID,
        "TOO_MANY_ITEMS",
        "adjustments",
    ),
    case(
        bad_adjust(adjustment={"sku": ""}),
        INVALID,
        "FIELD_REQUIRED",
        "adjustments[0].sku",
    ),
    case(
        bad_adjust(adjustment={"location": "D C"}),
        INVALID,
        "FIELD_MALFORMED",
        "adjustments[0].location",
    ),
    case(
        bad_adjust(adjustment={"delta": 0}),
        INVALID,
        "DELTA_OUT_OF_RANGE",
        "adjustments[0].delta",
    ),
    case(
        bad_adjust(adjustment={"delta": 10**12 + 1}),
        INVALID,
        "DELTA_OUT_OF_RANGE",
        "adjustments[0].delta",
    ),
    case(
        bad_adjust(adjustment={"reason": admin_pb2.ADJUSTMENT_REASON_UNSPECIFIED}),
        INVALID,
        "FIELD_REQUIRED",
        "adjustments[0].reason",
    ),
    case(
        bad_adjust(adjustment={"delta": -11}),
        PRECONDITION,
        "ON_HAND_WOULD_GO_NEGATIVE",
        "adjustments[0].delta",
    ),
    # SetOnHand.
    case(bad_count(source=""), INVALID, "FIELD_REQUIRED", "source"),
    case(
        bad_count(source_event_id="a b"), INVALID, "FIELD_MALFORMED", "source_event_id"
    ),
    case(bad_count(counts=[]), INVALID, "FIELD_REQUIRED", "counts"),
    case(
        bad_count(counts=[admin_pb2.OnHandCount(sku="MUG", location="DC", on_hand=-1)]),
        INVALID,
        "ON_HAND_OUT_OF_RANGE",
        "counts[0].on_hand",
    ),
    case(
        bad_count(
            counts=[admin_pb2.OnHandCount(sku="MUG", location="DC", on_hand=10**12 + 1)]
        ),
        INVALID,
        "ON_HAND_OUT_OF_RANGE",
        "counts[0].on_hand",
    ),
    case(
        bad_count(counts=[admin_pb2.OnHandCount(sku="MUG", on_hand=1)]),
        INVALID,
        "FIELD_REQUIRED",
        "counts[0].location",
    ),
    case(
        bad_count(
            counts=[
                admin_pb2.OnHandCount(sku="MUG", location="DC", on_hand=1),
                admin_pb2.OnHandCount(sku="MUG", location="ST", on_hand=1),
                admin_pb2.OnHandCount(sku="MUG", location="DC", on_hand=2),
            ]
        ),
        INVALID,
        "DUPLICATE_POSITION",
        "counts[2]",
    ),
    # ExecuteBatch: the call itself; a bad command inside is in test_batch.py.
    case(inventory_pb2.ExecuteBatchRequest(), INVALID, "FIELD_REQUIRED", "commands"),
    case(
        inventory_pb2.ExecuteBatchRequest(
            commands=[inventory_pb2.Command(reserve=bad_reserve())] * 1001
        ),
        INVALID,
        "TOO_MANY_ITEMS",
        "commands",
    ),
]


async def start_with_a_hold(start_server: ServerFactory) -> tuple[Running, str]:
    """A server with 10 MUG at DC, 3 of them held by one pending reservation."""
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 10))
    held = await reserve(server, reserve_request("good", line("MUG", 3, location="DC")))
    return server, held.reservation_id


async def send(server: Running, request: Message, held_id: str) -> object:
    """Call the RPC that takes this request type, with HELD filled in."""
    message = type(request)()
    message.CopyFrom(request)
    if (
        isinstance(message, CONFIRM | RELEASE | FULFILL | EXTEND)
        and message.reservation_id == HELD
    ):
        message.reservation_id = held_id
    is_admin = isinstance(
        message, admin_pb2.AdjustStockRequest | admin_pb2.SetOnHandRequest
    )
    stub = server.admin if is_admin else server.inventory
    method = getattr(stub, type(message).__name__.removesuffix("Request"))
    response: object = await method(message)
    return response


async def state_of(server: Running, held_id: str) -> object:
    """Everything a refused call must leave as it was."""
    held = await reservation(server, held_id)
    return (
        await availability(server, "MUG"),
        await list_all(server, page_size=100),
        held.state,
        list(held.lines),
        held.expires_at,
    )


@pytest.mark.parametrize(("request_", "expected"), CASES)
async def test_bad_input_is_refused_naming_the_field_and_changes_nothing(
    start_server: ServerFactory, request_: Message, expected: Refusal
) -> None:
    server, held_id = await start_with_a_hold(start_server)
    before = await state_of(server, held_id)

    error = await refused(send(server, request_, held_id))

    assert refusal(error) == expected
    assert await state_of(server, held_id) == before


async def test_after_every_bad_call_the_server_answers_and_stored_nothing(
    start_server: ServerFactory,
) -> None:
    server, held_id = await start_with_a_hold(start_server)
    before = await state_of(server, held_id)

    for param in CASES:
        request, expected = param.values
        error = await refused(send(server, request, held_id))
        assert refusal(error) == expected, param.id

    assert await state_of(server, held_id) == before
    await stop_server(server)
    server = await start_server()
    assert await state_of(server, held_id) == before
    # No refused call left its idempotency key behind.
    fresh = await reserve(server, reserve_request("bad", line("MUG", 1, location="DC")))
    assert fresh.outcome == inventory_pb2.RESERVE_OUTCOME_RESERVED
    assert not fresh.replayed
    counted = await set_on_hand(server, "bad", ("MUG", "DC", 12))
    assert not counted.replayed
    assert await availability(server, "MUG") == (12, 4, 8)


async def test_values_at_every_limit_are_accepted(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server, held_id = await start_with_a_hold(start_server)
    sku = "S" * 64
    await set_on_hand(server, "e" * 128, (sku, "L" * 64, 10**12))
    locations = ("L" * 64, *(f"L{index}" for index in range(31)))
    widest = reserve_request(
        "r" * 128,
        *(line(sku, 1_000_000, locations=locations) for _ in range(100)),
        channel="c" * 64,
        order_ref="o" * 128,
        ttl_s=WEEK_S,
    )

    made = await reserve(server, widest)
    extended = await server.inventory.Extend(
        inventory_pb2.ExtendRequest(
            request_id="x" * 128, reservation_id=held_id, ttl_seconds=WEEK_S
        )
    )
    many = await server.inventory.GetAvailability(
        inventory_pb2.GetAvailabilityRequest(skus=["MUG"] * 1000, locations=locations)
    )
    page = await server.inventory.ListReservations(
        inventory_pb2.ListReservationsRequest(page_size=1000, channel="c" * 64)
    )

    assert made.outcome == inventory_pb2.RESERVE_OUTCOME_RESERVED
    assert made.expires_at.ToMicroseconds() == clock.now_us() + WEEK_S * US_PER_S
    assert extended.reservation.expires_at == made.expires_at
    assert len(many.skus) == 1000
    assert [item.reservation_id for item in page.reservations] == [made.reservation_id]
