"""Focused tests of the reservation engine, one behaviour each.

Each test builds the state it needs on a fresh engine with three shards and a fake
clock (see conftest.py), and marks decisions durable unless durability is the point.
"""

import json
from typing import Any

import pytest

from server.clock import FakeClock
from server.engine.commands import (
    Adjustment,
    AdjustmentReason,
    AdjustStock,
    Confirm,
    Extend,
    Fulfill,
    LineQuantity,
    OnHandCount,
    Release,
    ReservationResult,
    Reserve,
    ReserveLine,
    ReserveOutcome,
    ReserveResult,
    SetOnHand,
    ShortReason,
    StockResult,
)
from server.engine.engine import Decision, Engine, Replay
from server.engine.errors import (
    FailedPrecondition,
    InvalidArgument,
    InvariantBroken,
    NotFound,
)
from server.engine.model import ReservationState
from tests.engine.support import (
    L1,
    L2,
    L3,
    LIMITS,
    RETENTION_S,
    US_PER_S,
    A,
    B,
    change,
    decided,
    durable,
    hold,
    key,
    new_engine,
    numbers,
    position,
    refusal,
    reserve,
    reserve_command,
    stock,
)

# Reserve -------------------------------------------------------------------------------


def test_reserve_is_all_or_nothing_across_lines(engine: Engine) -> None:
    stock(engine, (A, L1, 5), (B, L1, 1))

    result = reserve(
        engine, ReserveLine(A, 3, location=L1), ReserveLine(B, 2, location=L1)
    )

    assert result.outcome is ReserveOutcome.REJECTED
    assert result.reservation_id == ""
    assert [line.quantity_held for line in result.lines] == [0, 0]
    assert result.lines[0].short_reason is ShortReason.OTHER_LINE_SHORT
    assert result.lines[1].short_reason is ShortReason.INSUFFICIENT_STOCK
    assert result.lines[1].quantity_available == 1
    assert numbers(engine, A, L1) == (5, 0, 5)
    assert engine.stats().reservations == 0


def test_allow_partial_holds_the_lines_that_fit_and_says_which_are_short(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 5), (B, L1, 1))

    result = reserve(
        engine,
        ReserveLine(A, 3, location=L1),
        ReserveLine(B, 2, location=L1),
        allow_partial=True,
    )

    assert result.outcome is ReserveOutcome.PARTIALLY_RESERVED
    assert [line.held_at for line in result.lines] == [((L1, 3),), ((L1, 1),)]
    assert result.lines[0].short_reason is None
    assert result.lines[1].short_reason is ShortReason.INSUFFICIENT_STOCK
    assert numbers(engine, B, L1) == (1, 1, 0)


def test_preference_list_takes_first_location_that_covers_the_line(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 2), (A, L2, 5), (A, L3, 9))

    result = reserve(engine, ReserveLine(A, 4, locations=(L1, L2, L3)))

    assert result.lines[0].held_at == ((L2, 4),)
    assert numbers(engine, A, L2) == (5, 4, 1)
    assert numbers(engine, A, L3) == (9, 0, 9)


def test_preference_list_without_split_never_splits_a_line(engine: Engine) -> None:
    stock(engine, (A, L1, 3), (A, L2, 3))

    result = reserve(engine, ReserveLine(A, 5, locations=(L1, L2)))

    assert result.outcome is ReserveOutcome.REJECTED
    assert result.lines[0].short_reason is ShortReason.INSUFFICIENT_STOCK
    assert result.lines[0].quantity_available == 3


def test_split_takes_locations_in_preference_order(engine: Engine) -> None:
    stock(engine, (A, L1, 2), (A, L2, 0), (A, L3, 4))

    result = reserve(
        engine, ReserveLine(A, 5, locations=(L3, L2, L1), allow_split=True)
    )

    assert result.outcome is ReserveOutcome.RESERVED
    assert result.lines[0].held_at == ((L3, 4), (L1, 1))
    reservation = engine.get_reservation(result.reservation_id)
    assert [(line.location, line.quantity_held) for line in reservation.lines] == [
        (L3, 4),
        (L1, 1),
    ]


def test_split_still_prefers_one_location_that_covers_the_line(engine: Engine) -> None:
    stock(engine, (A, L1, 3), (A, L2, 6))

    result = reserve(engine, ReserveLine(A, 5, locations=(L1, L2), allow_split=True))

    assert result.lines[0].held_at == ((L2, 5),)


def test_lines_for_one_sku_share_its_stock_and_merge_into_one_line(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 5))

    short = reserve(
        engine, ReserveLine(A, 3, location=L1), ReserveLine(A, 3, location=L1)
    )
    assert short.outcome is ReserveOutcome.REJECTED
    assert short.lines[1].quantity_available == 2

    held = reserve(
        engine, ReserveLine(A, 3, location=L1), ReserveLine(A, 2, location=L1)
    )
    reservation = engine.get_reservation(held.reservation_id)
    assert [(line.sku, line.quantity_held) for line in reservation.lines] == [(A, 5)]
    assert numbers(engine, A, L1) == (5, 5, 0)


def test_unknown_sku_and_unknown_location_are_told_apart(engine: Engine) -> None:
    stock(engine, (A, L1, 5))

    result = reserve(
        engine,
        ReserveLine(B, 1, location=L1),
        ReserveLine(A, 1, location="loc-nowhere"),
        ReserveLine(A, 1, locations=("loc-nowhere", L1)),
        allow_partial=True,
    )

    reasons = [line.short_reason for line in result.lines]
    assert reasons == [ShortReason.UNKNOWN_SKU, ShortReason.UNKNOWN_LOCATION, None]


def test_hold_counts_against_available_to_sell_before_durable(engine: Engine) -> None:
    stock(engine, (A, L1, 5))

    first = decided(engine, reserve_command(ReserveLine(A, 3, location=L1)))
    assert numbers(engine, A, L1) == (5, 3, 2)
    second = reserve(engine, ReserveLine(A, 3, location=L1))

    assert second.outcome is ReserveOutcome.REJECTED
    assert second.lines[0].quantity_available == 2
    engine.mark_durable(first)
    assert numbers(engine, A, L1) == (5, 3, 2)


# Release, fulfil, confirm, extend, expire ----------------------------------------------


def test_release_gain_is_withheld_until_durable(engine: Engine) -> None:
    stock(engine, (A, L1, 5))
    reservation_id = hold(engine, A, L1, 5)

    release = decided(engine, Release(key(), reservation_id))
    assert numbers(engine, A, L1) == (5, 0, 0)
    meanwhile = reserve(engine, ReserveLine(A, 1, location=L1))
    assert meanwhile.outcome is ReserveOutcome.REJECTED

    engine.mark_durable(release)
    assert numbers(engine, A, L1) == (5, 0, 5)


def test_receipt_is_withheld_until_durable_but_answered_as_it_will_stand(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 1))

    receipt = AdjustStock(
        "erp", key("event-"), (Adjustment(A, L1, 4, AdjustmentReason.RECEIPT),)
    )
    decision = decided(engine, receipt)

    assert numbers(engine, A, L1) == (5, 0, 1)
    assert isinstance(decision.result, StockResult)
    assert decision.result.positions[0].available_to_sell == 5
    engine.mark_durable(decision)
    assert numbers(engine, A, L1) == (5, 0, 5)


def test_expiry_gain_is_withheld_until_durable(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 5))
    hold(engine, A, L1, 5, ttl_s=60)
    clock.advance(60)

    [expiry] = engine.expire_due(count_max=10)

    assert isinstance(expiry.result, ReservationResult)
    assert expiry.result.reservation.state is ReservationState.EXPIRED
    assert numbers(engine, A, L1) == (5, 0, 0)
    engine.mark_durable(expiry)
    assert numbers(engine, A, L1) == (5, 0, 5)


def test_fulfil_requires_confirmation(engine: Engine) -> None:
    stock(engine, (A, L1, 5))
    reservation_id = hold(engine, A, L1, 2)

    error = refusal(engine, Fulfill(key(), reservation_id))
    assert isinstance(error, FailedPrecondition)
    assert error.reason == "RESERVATION_PENDING"

    change(engine, Confirm(key(), reservation_id))
    assert change(engine, Fulfill(key(), reservation_id)) is ReservationState.FULFILLED
    assert numbers(engine, A, L1) == (3, 0, 3)


def test_partial_fulfilment_keeps_the_reservation_open_until_nothing_is_held(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 5))
    reservation_id = hold(engine, A, L1, 4)
    change(engine, Confirm(key(), reservation_id))

    part = Fulfill(key(), reservation_id, (LineQuantity(A, L1, 1),))
    assert change(engine, part) is ReservationState.CONFIRMED
    assert numbers(engine, A, L1) == (4, 3, 1)

    # Shipped in part and released for the rest is still a fulfilled order.
    assert change(engine, Release(key(), reservation_id)) is ReservationState.FULFILLED
    assert numbers(engine, A, L1) == (4, 0, 4)


def test_partial_release_keeps_a_pending_hold_pending(engine: Engine) -> None:
    stock(engine, (A, L1, 5))
    reservation_id = hold(engine, A, L1, 4)

    part = Release(key(), reservation_id, (LineQuantity(A, L1, 3),))
    assert change(engine, part) is ReservationState.PENDING
    assert numbers(engine, A, L1) == (5, 1, 4)

    assert change(engine, Release(key(), reservation_id)) is ReservationState.RELEASED


def test_release_of_more_than_held_or_of_a_line_not_held_is_refused(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 5), (B, L1, 5))
    reservation_id = hold(engine, A, L1, 2)

    twice = (LineQuantity(A, L1, 1), LineQuantity(A, L1, 2))
    too_much = refusal(engine, Release(key(), reservation_id, twice))
    elsewhere = refusal(
        engine, Release(key(), reservation_id, (LineQuantity(B, L1, 1),))
    )

    assert (too_much.reason, too_much.field) == (
        "QUANTITY_EXCEEDS_HELD",
        "lines[1].quantity",
    )
    assert isinstance(elsewhere, InvalidArgument)
    assert (elsewhere.reason, elsewhere.field) == (
        "LINE_NOT_IN_RESERVATION",
        "lines[0]",
    )
    assert numbers(engine, A, L1) == (5, 2, 3)


def test_confirming_an_expired_hold_is_refused(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 5))
    reservation_id = hold(engine, A, L1, 2, ttl_s=60)
    clock.advance(60)

    before_sweep = refusal(engine, Confirm(key(), reservation_id))
    for decision in engine.expire_due(count_max=10):
        engine.mark_durable(decision)
    after_sweep = refusal(engine, Confirm(key(), reservation_id))

    assert isinstance(before_sweep, FailedPrecondition)
    assert before_sweep.reason == "RESERVATION_EXPIRED"
    assert after_sweep.reason == "RESERVATION_EXPIRED"
    assert numbers(engine, A, L1) == (5, 0, 5)


def test_release_of_a_due_hold_before_the_sweep_gives_the_stock_back(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 5))
    reservation_id = hold(engine, A, L1, 2, ttl_s=60)
    clock.advance(61)

    assert change(engine, Release(key(), reservation_id)) is ReservationState.RELEASED
    assert engine.expire_due(count_max=10) == []
    assert numbers(engine, A, L1) == (5, 0, 5)


def test_confirmed_reservation_never_expires(engine: Engine, clock: FakeClock) -> None:
    stock(engine, (A, L1, 5))
    reservation_id = hold(engine, A, L1, 2, ttl_s=60)
    change(engine, Confirm(key(), reservation_id))
    clock.advance(LIMITS.ttl_max_s)

    assert engine.expire_due(count_max=10) == []
    assert engine.get_reservation(reservation_id).state is ReservationState.CONFIRMED


def test_expiry_sweep_takes_at_most_count_max_holds_earliest_first(
    clock: FakeClock,
) -> None:
    engine = new_engine(clock, shard_count=1)
    stock(engine, (A, L1, 9))
    late = hold(engine, A, L1, 1, ttl_s=30)
    early = hold(engine, A, L1, 1, ttl_s=10)
    middle = hold(engine, A, L1, 1, ttl_s=20)
    clock.advance(30)

    first = engine.expire_due(count_max=2)
    rest = engine.expire_due(count_max=2)

    assert [expired_id(d) for d in first] == [early, middle]
    assert [expired_id(d) for d in rest] == [late]


def expired_id(decision: Decision) -> str:
    assert isinstance(decision.result, ReservationResult)
    return decision.result.reservation.reservation_id


def test_default_ttl_applies_when_none_is_asked_for(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 5))

    result = reserve(engine, ReserveLine(A, 1, location=L1))

    assert result.expires_us == clock.now_us() + LIMITS.ttl_default_s * US_PER_S


def test_extend_moves_the_expiry_and_the_old_time_passes_harmlessly(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 5))
    reservation_id = hold(engine, A, L1, 2, ttl_s=60)
    clock.advance(30)

    change(engine, Extend(key(), reservation_id, 120))
    clock.advance(60)
    assert engine.expire_due(count_max=10) == []
    clock.advance(60)

    [expiry] = engine.expire_due(count_max=10)
    assert expired_id(expiry) == reservation_id


def test_extend_that_would_not_push_the_expiry_later_is_refused(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 5))
    reservation_id = hold(engine, A, L1, 2, ttl_s=300)

    error = refusal(engine, Extend(key(), reservation_id, 300))

    assert (error.reason, error.field) == ("EXTEND_WOULD_SHORTEN", "ttl_seconds")


def test_extend_of_a_confirmed_reservation_is_refused(engine: Engine) -> None:
    stock(engine, (A, L1, 5))
    reservation_id = hold(engine, A, L1, 2)
    change(engine, Confirm(key(), reservation_id))

    error = refusal(engine, Extend(key(), reservation_id, 600))

    assert error.reason == "RESERVATION_CONFIRMED"


def test_confirming_twice_answers_without_a_new_record(engine: Engine) -> None:
    stock(engine, (A, L1, 5))
    reservation_id = hold(engine, A, L1, 2)
    change(engine, Confirm(key(), reservation_id))

    again = decided(engine, Confirm(key(), reservation_id))

    assert again.record is None
    assert isinstance(again.result, ReservationResult)
    assert again.result.reservation.state is ReservationState.CONFIRMED


def test_unknown_reservation_is_not_found(engine: Engine) -> None:
    error = refusal(engine, Confirm(key(), "rsv-nowhere"))

    assert isinstance(error, NotFound)
    assert (error.reason, error.field) == ("RESERVATION_NOT_FOUND", "reservation_id")
    with pytest.raises(NotFound):
        engine.get_reservation("rsv-nowhere")


# Idempotency ---------------------------------------------------------------------------


def test_retry_replays_the_first_answer_without_deciding_again(engine: Engine) -> None:
    stock(engine, (A, L1, 5))
    command = reserve_command(ReserveLine(A, 3, location=L1))
    first = durable(engine, command)

    retry = engine.decide(command)

    assert isinstance(retry, Replay)
    assert retry.durable
    assert retry.result.replayed
    assert isinstance(retry.result, ReserveResult)
    assert isinstance(first, ReserveResult)
    assert retry.result.reservation_id == first.reservation_id
    assert numbers(engine, A, L1) == (5, 3, 2)


def test_retry_before_the_first_answer_is_durable_is_told_to_wait(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 5))
    command = reserve_command(ReserveLine(A, 3, location=L1))
    first = decided(engine, command)

    early = engine.decide(command)
    engine.mark_durable(first)
    late = engine.decide(command)

    assert isinstance(early, Replay)
    assert not early.durable
    assert isinstance(late, Replay)
    assert late.durable


def test_request_id_reuse_with_different_content_is_refused(engine: Engine) -> None:
    stock(engine, (A, L1, 5))
    command = reserve_command(ReserveLine(A, 3, location=L1))
    durable(engine, command)
    count = SetOnHand("erp", key("count-"), (OnHandCount(A, L1, 5),))
    durable(engine, count)

    other_order = Reserve(command.request_id, "web", (ReserveLine(A, 2, location=L1),))
    other_count = SetOnHand("erp", count.source_event_id, (OnHandCount(A, L1, 6),))
    order_error = refusal(engine, other_order)
    count_error = refusal(engine, other_count)

    assert isinstance(order_error, InvalidArgument)
    assert (order_error.reason, order_error.field) == (
        "REQUEST_ID_REUSED",
        "request_id",
    )
    assert (count_error.reason, count_error.field) == (
        "REQUEST_ID_REUSED",
        "source_event_id",
    )


def test_same_request_id_in_another_channel_is_another_request(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 5))
    web = reserve_command(ReserveLine(A, 1, location=L1))
    app = Reserve(web.request_id, "app", (ReserveLine(A, 2, location=L1),))
    durable(engine, web)

    assert isinstance(engine.decide(app), Decision)


def test_refused_request_is_decided_afresh_on_retry(engine: Engine) -> None:
    stock(engine, (A, L1, 5))
    reservation_id = hold(engine, A, L1, 2)
    fulfil = Fulfill(key(), reservation_id)
    refusal(engine, fulfil)
    change(engine, Confirm(key(), reservation_id))

    assert change(engine, fulfil) is ReservationState.FULFILLED


# Stock ---------------------------------------------------------------------------------


def test_adjustment_below_zero_on_hand_is_refused_whole(engine: Engine) -> None:
    stock(engine, (A, L1, 5), (B, L1, 5))

    command = AdjustStock(
        "pos",
        key("event-"),
        (
            Adjustment(A, L1, 3, AdjustmentReason.RECEIPT),
            Adjustment(B, L1, -6, AdjustmentReason.POS_SALE),
        ),
    )
    error = refusal(engine, command)

    assert isinstance(error, FailedPrecondition)
    assert (error.reason, error.field) == (
        "ON_HAND_WOULD_GO_NEGATIVE",
        "adjustments[1].delta",
    )
    assert numbers(engine, A, L1) == (5, 0, 5)
    assert numbers(engine, B, L1) == (5, 0, 5)


def test_adjustment_above_the_on_hand_limit_is_refused(engine: Engine) -> None:
    stock(engine, (A, L1, LIMITS.on_hand_max))

    command = AdjustStock(
        "erp", key("event-"), (Adjustment(A, L1, 1, AdjustmentReason.RECEIPT),)
    )

    assert refusal(engine, command).reason == "ON_HAND_TOO_LARGE"


def test_set_on_hand_is_recorded_as_a_delta(engine: Engine) -> None:
    stock(engine, (A, L1, 7))

    decision = decided(
        engine, SetOnHand("erp", key("count-"), (OnHandCount(A, L1, 4),))
    )

    assert decision.record is not None
    assert decision.record.kind == "set_on_hand"
    assert decision.record.body["fx"] == [[A, L1, -3, 0]]


def test_adjustments_to_one_position_are_netted_in_the_record(engine: Engine) -> None:
    stock(engine, (A, L1, 7))

    command = AdjustStock(
        "erp",
        key("event-"),
        (
            Adjustment(A, L1, 5, AdjustmentReason.RECEIPT),
            Adjustment(A, L1, -2, AdjustmentReason.DAMAGE),
        ),
    )
    decision = decided(engine, command)

    assert decision.record is not None
    assert decision.record.body["fx"] == [[A, L1, 3, 0]]


@pytest.mark.parametrize(
    "shrink",
    [
        SetOnHand("erp", "count-shrink", (OnHandCount(A, L1, 2),)),
        AdjustStock(
            "erp", "event-shrink", (Adjustment(A, L1, -3, AdjustmentReason.DAMAGE),)
        ),
    ],
    ids=["count", "damage"],
)
def test_fulfilling_more_than_a_count_left_on_hand_is_refused_without_change(
    engine: Engine, shrink: SetOnHand | AdjustStock
) -> None:
    """A count or damage report may find fewer units than are held; shipping the hold
    afterwards is refused until the stock is corrected, and nothing changes."""
    stock(engine, (A, L1, 5))
    reservation_id = hold(engine, A, L1, 5)
    change(engine, Confirm(key(), reservation_id))
    durable(engine, shrink)
    assert numbers(engine, A, L1) == (2, 5, 0)

    error = refusal(engine, Fulfill(key(), reservation_id))

    assert isinstance(error, FailedPrecondition)
    assert error.reason == "ON_HAND_SHORT"
    assert numbers(engine, A, L1) == (2, 5, 0)
    reservation = engine.get_reservation(reservation_id)
    assert reservation.state is ReservationState.CONFIRMED
    assert reservation.quantity_held == 5


def test_adjustments_are_judged_by_their_net_change_per_position(
    engine: Engine,
) -> None:
    stock(engine, (A, L1, 0))

    decided(
        engine,
        AdjustStock(
            "wms",
            key("event-"),
            (
                Adjustment(A, L1, -10, AdjustmentReason.TRANSFER),
                Adjustment(A, L1, 15, AdjustmentReason.RECEIPT),
            ),
        ),
    )

    assert position(engine, A, L1).on_hand == 5


# Listing -------------------------------------------------------------------------------


def _list_all(engine: Engine, *, page_size: int, **filters: Any) -> list[list[str]]:
    """Every page, following page tokens, as lists of ids."""
    pages: list[list[str]] = []
    token = ""
    arguments: dict[str, Any] = {
        "channel": "",
        "state": None,
        "created_before_us": None,
    }
    arguments.update(filters)
    while True:
        page, token = engine.list_reservations(
            page_size=page_size, page_token=token, **arguments
        )
        pages.append([r.reservation_id for r in page])
        if not token:
            return pages
        assert len(pages) <= 100, "page tokens do not make progress"


def test_list_pages_through_every_match_once_in_creation_order(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 100))
    made: list[str] = []
    for index in range(7):
        made.append(hold(engine, A, L1, 1))
        # Pairs share a microsecond, so the order falls back to the id.
        if index % 2:
            clock.advance(1)

    pages = _list_all(engine, page_size=3)

    assert pages == [made[0:3], made[3:6], made[6:7]]


def test_list_filters_by_state_and_creation_time(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 100))
    first = hold(engine, A, L1, 1)
    clock.advance(1)
    cutoff_us = clock.now_us()
    second = hold(engine, A, L1, 1)
    change(engine, Confirm(key(), second))

    confirmed = _list_all(engine, page_size=10, state=ReservationState.CONFIRMED)
    older = _list_all(engine, page_size=10, created_before_us=cutoff_us)
    other_channel = _list_all(engine, page_size=10, channel="app")

    assert confirmed == [[second]]
    assert older == [[first]]
    assert other_channel == [[]]


def test_list_with_an_exact_last_page_issues_no_further_token(engine: Engine) -> None:
    stock(engine, (A, L1, 100))
    made = [hold(engine, A, L1, 1) for _ in range(4)]

    assert _list_all(engine, page_size=2) == [made[0:2], made[2:4]]


@pytest.mark.parametrize(
    ("page_size", "page_token", "field"),
    [
        (-1, "", "page_size"),
        (LIMITS.page_size_max + 1, "", "page_size"),
        (10, "not a token", "page_token"),
        (10, "\u00e9t\u00e9", "page_token"),
    ],
)
def test_list_refuses_a_bad_page_size_or_foreign_page_token(
    engine: Engine, page_size: int, page_token: str, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        engine.list_reservations(
            channel="",
            state=None,
            created_before_us=None,
            page_size=page_size,
            page_token=page_token,
        )

    assert caught.value.field == field


# Retention -----------------------------------------------------------------------------


def test_prune_forgets_finished_reservations_and_answers_after_retention(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 5))
    command = reserve_command(ReserveLine(A, 2, location=L1), ttl_s=60)
    first = durable(engine, command)
    assert isinstance(first, ReserveResult)
    change(engine, Release(key(), first.reservation_id))
    active = hold(engine, A, L1, 1)
    change(engine, Confirm(key(), active))

    clock.advance(RETENTION_S - 1)
    assert engine.prune() == 0
    clock.advance(1)
    assert engine.prune() > 0

    with pytest.raises(NotFound):
        engine.get_reservation(first.reservation_id)
    assert engine.get_reservation(active).state is ReservationState.CONFIRMED
    # The answer is forgotten too, so the old request id is a new request.
    assert isinstance(engine.decide(command), Decision)


def test_prune_keeps_answers_that_are_not_durable_yet(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 5))
    pending = decided(engine, reserve_command(ReserveLine(A, 1, location=L1)))
    clock.advance(RETENTION_S + 1)

    engine.prune()
    assert engine.stats().undurable_requests == 1
    assert engine.stats().remembered_requests == 1

    engine.mark_durable(pending)
    engine.prune()
    assert engine.stats().remembered_requests == 0


# Recovery ------------------------------------------------------------------------------


def _round_trip(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _restore(
    engine: Engine,
    positions: list[Any],
    reservations: list[dict[str, Any]],
    seqs: list[int],
    policies: dict[str, Any] | None = None,
) -> None:
    engine.restore_policies(policies or {})
    for sku, location, on_hand, held in positions:
        engine.restore_position(sku, location, on_hand, held)
    for body in reservations:
        engine.restore_reservation(body)
    for shard, last_seq in enumerate(seqs):
        engine.restore_seq(shard, last_seq)


def test_recovery_rebuilds_state_from_checkpoint_and_later_records(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 5), (B, L2, 5))
    confirmed = hold(engine, A, L1, 2)
    checkpoint = _round_trip(engine.checkpoint_rows())
    decisions = [decided(engine, Confirm(key(), confirmed))]
    decisions.append(decided(engine, reserve_command(ReserveLine(B, 3, location=L2))))
    for decision in decisions:
        engine.mark_durable(decision)

    recovered = new_engine(clock)
    _restore(recovered, *checkpoint)
    for decision in decisions:
        assert decision.record is not None
        record = decision.record
        recovered.replay_record(record.shard, record.seq, _round_trip(record.body))
    recovered.finish_recovery()

    assert numbers(recovered, A, L1) == numbers(engine, A, L1) == (5, 2, 3)
    assert numbers(recovered, B, L2) == numbers(engine, B, L2) == (5, 3, 2)
    assert recovered.get_reservation(confirmed) == engine.get_reservation(confirmed)
    clock.advance(LIMITS.ttl_default_s)
    assert len(recovered.expire_due(count_max=10)) == 1


def test_recovery_stops_when_records_disagree_about_held(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 5))
    hold(engine, A, L1, 2)
    positions, reservations, seqs, _ = _round_trip(engine.checkpoint_rows())
    positions[0][3] += 1

    recovered = new_engine(clock)
    _restore(recovered, positions, reservations, seqs)

    with pytest.raises(InvariantBroken, match="disagrees"):
        recovered.finish_recovery()


def test_recovery_stops_when_a_record_moves_held_without_a_reservation(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 5))
    checkpoint = _round_trip(engine.checkpoint_rows())
    decision = decided(engine, reserve_command(ReserveLine(A, 2, location=L1)))
    assert decision.record is not None
    body = _round_trip(decision.record.body)
    body["fx"][0][3] = 3

    recovered = new_engine(clock)
    _restore(recovered, *checkpoint)
    recovered.replay_record(decision.record.shard, decision.record.seq, body)

    with pytest.raises(InvariantBroken):
        recovered.finish_recovery()


def test_recovery_stops_on_a_gap_in_a_shard_sequence(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 5))
    checkpoint = _round_trip(engine.checkpoint_rows())
    first = decided(engine, reserve_command(ReserveLine(A, 1, location=L1)))
    second = decided(engine, reserve_command(ReserveLine(A, 1, location=L1)))
    assert first.record is not None
    assert second.record is not None

    recovered = new_engine(clock)
    _restore(recovered, *checkpoint)

    with pytest.raises(InvariantBroken, match="expected"):
        recovered.replay_record(second.record.shard, second.record.seq, {"fx": []})


def test_recovery_stops_when_a_reservation_holds_an_unknown_position(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 5))
    hold(engine, A, L1, 2)
    _, reservations, seqs, _ = _round_trip(engine.checkpoint_rows())

    recovered = new_engine(clock)
    _restore(recovered, [], reservations, seqs)

    with pytest.raises(InvariantBroken, match="unknown positions"):
        recovered.finish_recovery()


def test_checkpoint_with_writes_in_flight_is_refused(engine: Engine) -> None:
    stock(engine, (A, L1, 5))
    decided(engine, reserve_command(ReserveLine(A, 1, location=L1)))

    with pytest.raises(InvariantBroken):
        engine.checkpoint_rows()


def test_recovered_request_log_replays_the_first_answer(
    engine: Engine, clock: FakeClock
) -> None:
    stock(engine, (A, L1, 5))
    command = reserve_command(ReserveLine(A, 2, location=L1))
    decision = decided(engine, command)
    engine.mark_durable(decision)
    checkpoint = _round_trip(engine.checkpoint_rows())
    assert decision.request is not None
    row = decision.request

    recovered = new_engine(clock)
    _restore(recovered, *checkpoint)
    recovered.restore_request(
        scope=row.scope,
        request_id=row.request_id,
        fingerprint_=row.fingerprint,
        result=_round_trip(row.result),
        created_us=row.created_us,
    )
    recovered.finish_recovery()

    replay = recovered.decide(command)
    assert isinstance(replay, Replay)
    assert replay.result == engine.decide(command).result
    changed = Reserve(command.request_id, "web", (ReserveLine(A, 1, location=L1),))
    with pytest.raises(InvalidArgument):
        recovered.decide(changed)
