"""Caller mistakes: every bad field is refused with InvalidArgument naming its path in
the contract's terms (`lines[1].quantity`), and changes nothing."""

from typing import Any

import pytest

from server.engine.commands import (
    Adjustment,
    AdjustmentReason,
    AdjustStock,
    Command,
    Confirm,
    Extend,
    Fulfill,
    LineQuantity,
    OnHandCount,
    Release,
    Reserve,
    ReserveLine,
    SetOnHand,
)
from server.engine.engine import Engine
from server.engine.errors import InvalidArgument
from tests.engine.support import L1, L2, LIMITS, A, numbers, refusal, stock


def _line(**fields: Any) -> ReserveLine:
    values: dict[str, Any] = {"sku": A, "quantity": 1, "location": L1}
    values.update(fields)
    return ReserveLine(**values)


def _reserve(*lines: ReserveLine, **fields: Any) -> Reserve:
    values: dict[str, Any] = {
        "request_id": "req-v",
        "channel": "web",
        "lines": lines or (_line(),),
    }
    values.update(fields)
    return Reserve(**values)


def _adjust(*adjustments: Adjustment, **fields: Any) -> AdjustStock:
    receipt = Adjustment(A, L1, 1, AdjustmentReason.RECEIPT)
    values: dict[str, Any] = {
        "source": "erp",
        "source_event_id": "event-v",
        "adjustments": adjustments or (receipt,),
    }
    values.update(fields)
    return AdjustStock(**values)


def _count(*counts: OnHandCount, **fields: Any) -> SetOnHand:
    values: dict[str, Any] = {
        "source": "erp",
        "source_event_id": "count-v",
        "counts": counts or (OnHandCount(A, L1, 1),),
    }
    values.update(fields)
    return SetOnHand(**values)


_LONG = "x" * 200
_HELD = LineQuantity(A, L1, 1)

INVALID: list[tuple[str, Command, str, str]] = [
    ("request_id empty", _reserve(request_id=""), "request_id", "FIELD_REQUIRED"),
    ("request_id spaces", _reserve(request_id="a b"), "request_id", "FIELD_MALFORMED"),
    ("request_id long", _reserve(request_id=_LONG), "request_id", "FIELD_TOO_LONG"),
    ("channel empty", _reserve(channel=""), "channel", "FIELD_REQUIRED"),
    ("order_ref", _reserve(order_ref="caf\u00e9"), "order_ref", "FIELD_MALFORMED"),
    ("ttl negative", _reserve(ttl_s=-1), "ttl_seconds", "TTL_OUT_OF_RANGE"),
    (
        "ttl too long",
        _reserve(ttl_s=LIMITS.ttl_max_s + 1),
        "ttl_seconds",
        "TTL_OUT_OF_RANGE",
    ),
    ("no lines", Reserve("req-v", "web", ()), "lines", "FIELD_REQUIRED"),
    (
        "too many lines",
        _reserve(*[_line()] * (LIMITS.lines_per_reservation_max + 1)),
        "lines",
        "TOO_MANY_ITEMS",
    ),
    ("sku", _reserve(_line(), _line(sku="")), "lines[1].sku", "FIELD_REQUIRED"),
    (
        "quantity zero",
        _reserve(_line(), _line(quantity=0)),
        "lines[1].quantity",
        "QUANTITY_OUT_OF_RANGE",
    ),
    (
        "quantity huge",
        _reserve(_line(quantity=LIMITS.quantity_max + 1)),
        "lines[0].quantity",
        "QUANTITY_OUT_OF_RANGE",
    ),
    (
        "both locations",
        _reserve(_line(locations=(L2,))),
        "lines[0].location",
        "LOCATION_AMBIGUOUS",
    ),
    (
        "split one location",
        _reserve(_line(allow_split=True)),
        "lines[0].allow_split",
        "SPLIT_NEEDS_LOCATIONS",
    ),
    (
        "too many locations",
        _reserve(_line(location="", locations=tuple(f"l{i}" for i in range(33)))),
        "lines[0].locations",
        "TOO_MANY_ITEMS",
    ),
    (
        "location malformed",
        _reserve(_line(location="loc 1")),
        "lines[0].location",
        "FIELD_MALFORMED",
    ),
    (
        "preference malformed",
        _reserve(_line(location="", locations=(L1, "loc 2"))),
        "lines[0].locations[1]",
        "FIELD_MALFORMED",
    ),
    (
        "preference twice",
        _reserve(_line(location="", locations=(L1, L2, L1))),
        "lines[0].locations",
        "DUPLICATE_LOCATION",
    ),
    ("confirm no id", Confirm("req-v", ""), "reservation_id", "FIELD_REQUIRED"),
    ("confirm long id", Confirm("req-v", _LONG), "reservation_id", "FIELD_TOO_LONG"),
    ("confirm request_id", Confirm("", "rsv-1"), "request_id", "FIELD_REQUIRED"),
    ("extend zero", Extend("req-v", "rsv-1", 0), "ttl_seconds", "TTL_OUT_OF_RANGE"),
    (
        "release quantity",
        Release("req-v", "rsv-1", (_HELD, LineQuantity(A, L1, 0))),
        "lines[1].quantity",
        "QUANTITY_OUT_OF_RANGE",
    ),
    (
        "release location",
        Release("req-v", "rsv-1", (LineQuantity(A, "", 1),)),
        "lines[0].location",
        "FIELD_REQUIRED",
    ),
    (
        "fulfil sku",
        Fulfill("req-v", "rsv-1", (LineQuantity("", L1, 1),)),
        "lines[0].sku",
        "FIELD_REQUIRED",
    ),
    (
        "fulfil too many lines",
        Fulfill("req-v", "rsv-1", (_HELD,) * (LIMITS.lines_per_reservation_max + 1)),
        "lines",
        "TOO_MANY_ITEMS",
    ),
    ("adjust source", _adjust(source=""), "source", "FIELD_REQUIRED"),
    ("adjust event", _adjust(source_event_id=""), "source_event_id", "FIELD_REQUIRED"),
    ("adjust none", _adjust(adjustments=()), "adjustments", "FIELD_REQUIRED"),
    (
        "adjust sku",
        _adjust(Adjustment("", L1, 1, AdjustmentReason.RECEIPT)),
        "adjustments[0].sku",
        "FIELD_REQUIRED",
    ),
    (
        "adjust location",
        _adjust(Adjustment(A, _LONG, 1, AdjustmentReason.RECEIPT)),
        "adjustments[0].location",
        "FIELD_TOO_LONG",
    ),
    (
        "adjust zero",
        _adjust(Adjustment(A, L1, 0, AdjustmentReason.RECEIPT)),
        "adjustments[0].delta",
        "DELTA_OUT_OF_RANGE",
    ),
    (
        "adjust huge",
        _adjust(Adjustment(A, L1, -LIMITS.on_hand_max - 1, AdjustmentReason.DAMAGE)),
        "adjustments[0].delta",
        "DELTA_OUT_OF_RANGE",
    ),
    (
        "adjust reason",
        _adjust(
            Adjustment(A, L1, 1, AdjustmentReason.RECEIPT), Adjustment(A, L1, 1, None)
        ),
        "adjustments[1].reason",
        "FIELD_REQUIRED",
    ),
    ("count none", _count(counts=()), "counts", "FIELD_REQUIRED"),
    (
        "count negative",
        _count(OnHandCount(A, L1, -1)),
        "counts[0].on_hand",
        "ON_HAND_OUT_OF_RANGE",
    ),
    (
        "count twice",
        _count(OnHandCount(A, L1, 1), OnHandCount(A, L1, 2)),
        "counts[1]",
        "DUPLICATE_POSITION",
    ),
    (
        "count sku",
        _count(OnHandCount("sku a", L1, 1)),
        "counts[0].sku",
        "FIELD_MALFORMED",
    ),
]


@pytest.mark.parametrize(
    ("command", "field", "reason"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid_field_is_refused_naming_its_path(
    engine: Engine, command: Command, field: str, reason: str
) -> None:
    stock(engine, (A, L1, 5))

    error = refusal(engine, command)

    assert isinstance(error, InvalidArgument)
    assert (error.field, error.reason) == (field, reason)
    assert numbers(engine, A, L1) == (5, 0, 5)


def test_get_reservation_refuses_a_malformed_id(engine: Engine) -> None:
    with pytest.raises(InvalidArgument) as caught:
        engine.get_reservation("rsv 1")

    assert caught.value.field == "reservation_id"
