"""Continuity controls over gRPC: suppressing a channel, throttling it and raising
safety stock. What each does to what channels can reserve and see, how each ends on
its own at `until` or when lifted, how controls in force are listed, how bad input is
refused without changing anything, idempotency on (actor, change_id), and survival
across a restart and a SIGKILL of the server process.

Every in-process server runs on the shared fake clock with its expiry loop ticking
once a day, so that holds do not expire behind a test's back while it advances the
clock by an hour to end a time box.
"""

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from server.clock import US_PER_S, FakeClock
from stockward.v1 import admin_pb2, admin_pb2_grpc, inventory_pb2, inventory_pb2_grpc
from tests.api.client import (
    line,
    refusal,
    refused,
    reserve,
    reserve_request,
    set_on_hand,
    status_refusal,
)
from tests.conftest import Running, ServerFactory, stop_server
from tests.reliability.server_process import CHANNEL_OPTIONS, ServerProcess

RESERVED = inventory_pb2.RESERVE_OUTCOME_RESERVED
PARTIAL = inventory_pb2.RESERVE_OUTCOME_PARTIALLY_RESERVED
REJECTED = inventory_pb2.RESERVE_OUTCOME_REJECTED
SUPPRESSED = inventory_pb2.SHORT_REASON_CHANNEL_SUPPRESSED
INSUFFICIENT_STOCK = inventory_pb2.SHORT_REASON_INSUFFICIENT_STOCK
SUPPRESS = admin_pb2.CONTROL_KIND_SUPPRESS_CHANNEL
THROTTLE = admin_pb2.CONTROL_KIND_THROTTLE_CHANNEL
RAISE_SAFETY = admin_pb2.CONTROL_KIND_RAISE_SAFETY_STOCK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

ACTOR = "ops"
WEB, MARKET = "web", "marketplace"
HOUR_S = 3600
DAY_S = 24 * HOUR_S
# Keeps the expiry loop asleep while tests advance the fake clock by hours.
QUIET_TICK_S = float(DAY_S)
# Every call to a server in another process gets this long.
RPC_TIMEOUT_S = 10.0

# One sku as a channel sees it over every location:
# (on_hand, held, safety_stock, available_to_sell, suppressed).
View = tuple[int, int, int, int, bool]


# Requests and reads ----------------------------------------------------------------------


def control_request(
    until_us: int,
    kind: admin_pb2.ControlKind.ValueType,
    *,
    change_id: str,
    channel: str = "",
    sku: str = "",
    location: str = "",
    units: int = 0,
    percent: int = 0,
    rate_per_s: int = 0,
    reason: str = "carrier strike",
    actor: str = ACTOR,
) -> admin_pb2.SetContinuityControlRequest:
    request = admin_pb2.SetContinuityControlRequest(
        actor=actor,
        change_id=change_id,
        control=admin_pb2.ContinuityControl(
            kind=kind,
            channel=channel,
            sku=sku,
            location=location,
            safety_units=units,
            safety_percent=percent,
            reservations_per_second=rate_per_s,
            reason=reason,
        ),
    )
    if until_us:
        request.control.until.FromMicroseconds(until_us)
    return request


def lasting(clock: FakeClock, duration_s: float) -> int:
    """The instant `duration_s` from the fake clock's now, as until_us."""
    return clock.now_us() + int(duration_s * US_PER_S)


async def set_control(
    admin: admin_pb2_grpc.StockAdminServiceStub,
    request: admin_pb2.SetContinuityControlRequest,
) -> admin_pb2.SetContinuityControlResponse:
    response: admin_pb2.SetContinuityControlResponse = await admin.SetContinuityControl(
        request, timeout=RPC_TIMEOUT_S
    )
    return response


async def lift(
    admin: admin_pb2_grpc.StockAdminServiceStub, change_id: str, control_id: str
) -> bool:
    """Lift a control; returns whether the answer was a replay."""
    response: admin_pb2.LiftContinuityControlResponse = (
        await admin.LiftContinuityControl(
            admin_pb2.LiftContinuityControlRequest(
                actor=ACTOR, change_id=change_id, control_id=control_id
            ),
            timeout=RPC_TIMEOUT_S,
        )
    )
    return bool(response.replayed)


async def controls_in_force(
    admin: admin_pb2_grpc.StockAdminServiceStub,
) -> list[admin_pb2.ContinuityControl]:
    response: admin_pb2.GetPoliciesResponse = await admin.GetPolicies(
        admin_pb2.GetPoliciesRequest(), timeout=RPC_TIMEOUT_S
    )
    return sorted(response.controls, key=lambda c: c.control_id)


async def view(
    inventory: inventory_pb2_grpc.InventoryServiceStub, sku: str, channel: str
) -> View:
    response: inventory_pb2.GetAvailabilityResponse = await inventory.GetAvailability(
        inventory_pb2.GetAvailabilityRequest(skus=[sku], channel=channel),
        timeout=RPC_TIMEOUT_S,
    )
    item = response.skus[0]
    total = item.total
    return (
        total.on_hand,
        total.held,
        total.safety_stock,
        total.available_to_sell,
        item.suppressed,
    )


async def safety_by_location(server: Running, sku: str) -> dict[str, tuple[int, int]]:
    """(safety_stock, available_to_sell) per location, without a channel."""
    response: inventory_pb2.GetAvailabilityResponse = (
        await server.inventory.GetAvailability(
            inventory_pb2.GetAvailabilityRequest(skus=[sku])
        )
    )
    return {
        x.location: (x.availability.safety_stock, x.availability.available_to_sell)
        for x in response.skus[0].locations
    }


def retry_delay_ns(details: list[Any]) -> int | None:
    """The google.rpc.RetryInfo delay among status details, if there is one."""
    for detail in details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return int(info.retry_delay.ToNanoseconds())
    return None


def call_retry_delay_ns(error: grpc.aio.AioRpcError) -> int | None:
    status = rpc_status.from_call(error)
    assert status is not None, "the refusal carries no google.rpc.Status"
    return retry_delay_ns(list(status.details))


async def reserve_one(
    server: Running, request_id: str, *, sku: str = "MUG", channel: str = WEB
) -> inventory_pb2.ReserveResponse:
    return await reserve(
        server,
        reserve_request(request_id, line(sku, 1, location="DC"), channel=channel),
    )


async def start_stocked(start_server: ServerFactory) -> Running:
    """A server with MUG and CUP at DC and STORE, 10 each."""
    server = await start_server(expiry_tick_s=QUIET_TICK_S)
    await set_on_hand(
        server,
        "count-1",
        ("MUG", "DC", 10),
        ("MUG", "STORE", 10),
        ("CUP", "DC", 10),
        ("CUP", "STORE", 10),
    )
    return server


# Suppress ------------------------------------------------------------------------------


async def test_suppressing_one_sku_hides_it_from_that_channel_only(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_stocked(start_server)

    await set_control(
        server.admin,
        control_request(
            lasting(clock, HOUR_S), SUPPRESS, change_id="c1", channel=WEB, sku="MUG"
        ),
    )

    web_mug = await reserve_one(server, "w1")
    web_cup = await reserve_one(server, "w2", sku="CUP")
    market_mug = await reserve_one(server, "m1", channel=MARKET)
    assert web_mug.outcome == REJECTED
    assert web_mug.reservation_id == ""
    assert (web_mug.lines[0].short_reason, web_mug.lines[0].quantity_available) == (
        SUPPRESSED,
        0,
    )
    assert (web_cup.outcome, market_mug.outcome) == (RESERVED, RESERVED)
    assert await view(server.inventory, "MUG", WEB) == (20, 1, 0, 0, True)
    assert await view(server.inventory, "CUP", WEB) == (20, 1, 0, 19, False)
    assert await view(server.inventory, "MUG", MARKET) == (20, 1, 0, 19, False)
    # Without a channel nothing is suppressed.
    assert await view(server.inventory, "MUG", "") == (20, 1, 0, 19, False)


async def test_suppressing_every_sku_hides_the_whole_catalogue_from_that_channel(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_stocked(start_server)

    await set_control(
        server.admin,
        control_request(lasting(clock, HOUR_S), SUPPRESS, change_id="c1", channel=WEB),
    )

    web = await reserve(
        server,
        reserve_request(
            "w1",
            line("MUG", 1, location="DC"),
            line("CUP", 1, location="STORE"),
            allow_partial=True,
        ),
    )
    market = await reserve(
        server,
        reserve_request(
            "m1",
            line("MUG", 10, location="DC"),
            line("CUP", 10, location="STORE"),
            channel=MARKET,
        ),
    )
    assert web.outcome == REJECTED
    assert [x.short_reason for x in web.lines] == [SUPPRESSED, SUPPRESSED]
    assert market.outcome == RESERVED
    for sku in ("MUG", "CUP", "NEVER-STOCKED"):
        assert (await view(server.inventory, sku, WEB))[3:] == (0, True)
    assert (await view(server.inventory, "MUG", MARKET))[3:] == (10, False)


async def test_suppressed_line_leaves_a_partial_reserve_its_other_lines(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_stocked(start_server)
    await set_control(
        server.admin,
        control_request(
            lasting(clock, HOUR_S), SUPPRESS, change_id="c1", channel=WEB, sku="CUP"
        ),
    )

    partial = await reserve(
        server,
        reserve_request(
            "w1",
            line("MUG", 2, location="DC"),
            line("CUP", 2, location="DC"),
            allow_partial=True,
        ),
    )

    assert partial.outcome == PARTIAL
    assert [(x.quantity_held, x.short_reason) for x in partial.lines] == [
        (2, inventory_pb2.SHORT_REASON_UNSPECIFIED),
        (0, SUPPRESSED),
    ]


# Throttle ------------------------------------------------------------------------------


async def test_throttled_channel_is_told_how_long_to_wait_until_the_bucket_refills(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_stocked(start_server)
    await set_control(
        server.admin,
        control_request(
            lasting(clock, HOUR_S), THROTTLE, change_id="c1", channel=WEB, rate_per_s=4
        ),
    )

    admitted = [await reserve_one(server, f"w{n}") for n in range(4)]
    fifth = await refused(reserve_one(server, "w4"))
    others = [
        await reserve_one(server, f"m{n}", sku="CUP", channel=MARKET) for n in range(6)
    ]
    assert [r.outcome for r in admitted + others] == [RESERVED] * 10
    assert refusal(fifth) == (EXHAUSTED, "CHANNEL_THROTTLED", "channel")
    # Four per second: one token every quarter of a second.
    assert call_retry_delay_ns(fifth) == 250_000_000

    clock.advance(0.1)
    early = await refused(reserve_one(server, "w4"))
    assert refusal(early)[1] == "CHANNEL_THROTTLED"
    assert call_retry_delay_ns(early) == 150_000_000

    clock.advance(0.15)
    assert (await reserve_one(server, "w4")).outcome == RESERVED

    # A quiet while refills one second's worth, and no more.
    clock.advance(30)
    burst = [await reserve_one(server, f"w{n}") for n in range(5, 9)]
    beyond = await refused(reserve_one(server, "w9"))
    assert [r.outcome for r in burst] == [RESERVED] * 4
    assert refusal(beyond)[1] == "CHANNEL_THROTTLED"
    assert (await view(server.inventory, "MUG", "")) == (20, 9, 0, 11, False)


async def test_throttle_answers_replays_and_leaves_refused_request_ids_unused(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_stocked(start_server)
    await set_control(
        server.admin,
        control_request(
            lasting(clock, HOUR_S), THROTTLE, change_id="c1", channel=WEB, rate_per_s=2
        ),
    )
    first = await reserve_one(server, "w1")
    await reserve_one(server, "w2")
    refused_once = await refused(reserve_one(server, "w3"))

    replays = [await reserve_one(server, "w1") for _ in range(5)]
    clock.advance(0.5)
    retried = await reserve_one(server, "w3")

    assert refusal(refused_once)[1] == "CHANNEL_THROTTLED"
    assert all(r.replayed for r in replays)
    assert {r.reservation_id for r in replays} == {first.reservation_id}
    assert (retried.outcome, retried.replayed) == (RESERVED, False)
    assert (await view(server.inventory, "MUG", ""))[1] == 3


async def test_throttle_refuses_batch_reserves_beyond_the_rate_one_by_one(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_stocked(start_server)
    await set_control(
        server.admin,
        control_request(
            lasting(clock, HOUR_S), THROTTLE, change_id="c1", channel=WEB, rate_per_s=3
        ),
    )

    response: inventory_pb2.ExecuteBatchResponse = await server.inventory.ExecuteBatch(
        inventory_pb2.ExecuteBatchRequest(
            commands=[
                inventory_pb2.Command(
                    reserve=reserve_request(f"b{n}", line("MUG", 1, location="DC"))
                )
                for n in range(5)
            ]
        )
    )

    kinds = [r.WhichOneof("result") for r in response.results]
    assert kinds == ["reserve"] * 3 + ["error"] * 2
    for result in response.results[3:]:
        assert status_refusal(result.error) == (
            EXHAUSTED,
            "CHANNEL_THROTTLED",
            "channel",
        )
        assert retry_delay_ns(list(result.error.details)) == 333_333_333
    assert (await view(server.inventory, "MUG", ""))[1] == 3


async def test_new_throttle_after_a_lifted_one_admits_a_full_second_at_once(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_stocked(start_server)
    await set_control(
        server.admin,
        control_request(
            lasting(clock, HOUR_S), THROTTLE, change_id="c1", channel=WEB, rate_per_s=1
        ),
    )
    assert (await reserve_one(server, "w0")).outcome == RESERVED
    assert not await lift(server.admin, "lift-1", "ops:c1")
    await set_control(
        server.admin,
        control_request(
            lasting(clock, HOUR_S), THROTTLE, change_id="c2", channel=WEB, rate_per_s=5
        ),
    )

    # Five a second, as a channel throttled for the first time gets them; the
    # lifted throttle's spent bucket must not carry over into the new one.
    outcomes: list[object] = []
    for n in range(1, 6):
        try:
            outcomes.append((await reserve_one(server, f"w{n}")).outcome)
        except grpc.aio.AioRpcError as error:
            outcomes.append(refusal(error)[1])

    assert outcomes == [RESERVED] * 5
    assert (await view(server.inventory, "MUG", ""))[1] == 6


# Raise safety stock --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "raised"),
    [
        pytest.param({"sku": "MUG"}, {("MUG", "DC"), ("MUG", "STORE")}, id="sku"),
        pytest.param({"location": "DC"}, {("MUG", "DC"), ("CUP", "DC")}, id="location"),
        pytest.param(
            {},
            {("MUG", "DC"), ("MUG", "STORE"), ("CUP", "DC"), ("CUP", "STORE")},
            id="everything",
        ),
    ],
)
async def test_raised_safety_stock_by_units_covers_exactly_its_target(
    start_server: ServerFactory,
    clock: FakeClock,
    target: dict[str, Any],
    raised: set[tuple[str, str]],
) -> None:
    server = await start_stocked(start_server)

    await set_control(
        server.admin,
        control_request(
            lasting(clock, HOUR_S), RAISE_SAFETY, change_id="c1", units=4, **target
        ),
    )

    for sku in ("MUG", "CUP"):
        expected = {
            location: (4, 6) if (sku, location) in raised else (0, 10)
            for location in ("DC", "STORE")
        }
        assert await safety_by_location(server, sku) == expected, sku
    for sku, location in sorted(raised):
        short = await reserve(
            server,
            reserve_request(
                f"{sku}-{location}",
                line(sku, 7, location=location),
                channel=MARKET,
            ),
        )
        assert (short.lines[0].short_reason, short.lines[0].quantity_available) == (
            INSUFFICIENT_STOCK,
            6,
        )


async def test_raised_safety_stock_by_percent_rounds_up_and_adds_to_units(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_server(expiry_tick_s=QUIET_TICK_S)
    await set_on_hand(server, "count-1", ("MUG", "DC", 7), ("MUG", "STORE", 40))

    await set_control(
        server.admin,
        control_request(
            lasting(clock, HOUR_S),
            RAISE_SAFETY,
            change_id="c1",
            sku="MUG",
            units=1,
            percent=10,
        ),
    )

    # 10% of 7 is 0.7 and keeps a whole unit back; 10% of 40 is 4.
    assert await safety_by_location(server, "MUG") == {"DC": (2, 5), "STORE": (5, 35)}
    await set_on_hand(server, "count-2", ("MUG", "STORE", 41))
    assert (await safety_by_location(server, "MUG"))["STORE"] == (6, 35)


# Time boxes and lifting ----------------------------------------------------------------

# How each kind of control shows, seen through the API: a predicate over the server.
Probe = Callable[[Running, str], Awaitable[bool]]


async def web_sees_no_mug(server: Running, request_id: str) -> bool:
    return (await view(server.inventory, "MUG", WEB))[3:] == (0, True)


async def second_web_reserve_is_throttled(server: Running, request_id: str) -> bool:
    await reserve_one(server, request_id + "-a")
    try:
        await reserve_one(server, request_id + "-b")
    except grpc.aio.AioRpcError as error:
        return refusal(error)[1] == "CHANNEL_THROTTLED"
    return False


async def mug_safety_is_raised(server: Running, request_id: str) -> bool:
    return (await view(server.inventory, "MUG", WEB))[2] == 6


KINDS: list[Any] = [
    pytest.param(
        SUPPRESS, {"channel": WEB, "sku": "MUG"}, web_sees_no_mug, id="suppress"
    ),
    pytest.param(
        THROTTLE,
        {"channel": WEB, "rate_per_s": 1},
        second_web_reserve_is_throttled,
        id="throttle",
    ),
    pytest.param(
        RAISE_SAFETY, {"sku": "MUG", "units": 3}, mug_safety_is_raised, id="raise"
    ),
]


@pytest.mark.parametrize(("kind", "target", "in_force"), KINDS)
async def test_control_ends_on_its_own_when_the_clock_reaches_until(
    start_server: ServerFactory,
    clock: FakeClock,
    kind: admin_pb2.ControlKind.ValueType,
    target: dict[str, Any],
    in_force: Probe,
) -> None:
    server = await start_stocked(start_server)
    until_us = lasting(clock, HOUR_S)
    await set_control(
        server.admin, control_request(until_us, kind, change_id="c1", **target)
    )

    clock.advance(HOUR_S - 1)
    assert await in_force(server, "before")
    assert [c.control_id for c in await controls_in_force(server.admin)] == ["ops:c1"]

    clock.advance(1)
    assert clock.now_us() == until_us
    assert not await in_force(server, "after")
    assert await controls_in_force(server.admin) == []
    lifted_late = await refused(lift(server.admin, "lift-1", "ops:c1"))
    assert refusal(lifted_late) == (NOT_FOUND, "CONTROL_NOT_FOUND", "control_id")


@pytest.mark.parametrize(("kind", "target", "in_force"), KINDS)
async def test_control_lifted_early_stops_at_once(
    start_server: ServerFactory,
    clock: FakeClock,
    kind: admin_pb2.ControlKind.ValueType,
    target: dict[str, Any],
    in_force: Probe,
) -> None:
    server = await start_stocked(start_server)
    response = await set_control(
        server.admin,
        control_request(lasting(clock, HOUR_S), kind, change_id="c1", **target),
    )
    clock.advance(60)
    assert await in_force(server, "before")

    replayed = await lift(server.admin, "lift-1", response.control_id)

    assert not replayed
    clock.advance(2)
    assert not await in_force(server, "after")
    assert await controls_in_force(server.admin) == []


async def test_controls_in_force_are_listed_with_reason_and_attribution(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_server(expiry_tick_s=QUIET_TICK_S)
    ends_us = lasting(clock, 2 * HOUR_S)
    requests = [
        control_request(
            ends_us,
            SUPPRESS,
            change_id="inc-7",
            channel=MARKET,
            location="ignored",
            reason="stale feed",
            actor="alice",
        ),
        control_request(
            ends_us,
            THROTTLE,
            change_id="inc-8",
            channel=WEB,
            rate_per_s=50,
            reason="bot traffic",
            actor="bob",
        ),
        control_request(
            ends_us,
            RAISE_SAFETY,
            change_id="inc-9",
            location="STORE",
            units=2,
            percent=25,
            reason="count drift at STORE",
            actor="carol",
        ),
        control_request(
            lasting(clock, 60), SUPPRESS, change_id="short", channel=WEB, actor="dave"
        ),
    ]
    set_at_us = []
    ids = []
    for request in requests:
        clock.advance(10)
        set_at_us.append(clock.now_us())
        ids.append((await set_control(server.admin, request)).control_id)
    clock.advance(60)

    listed = await controls_in_force(server.admin)

    assert ids == ["alice:inc-7", "bob:inc-8", "carol:inc-9", "dave:short"]
    assert [
        (
            c.control_id,
            c.kind,
            c.channel,
            c.sku,
            c.location,
            c.safety_units,
            c.safety_percent,
            c.reservations_per_second,
            c.until.ToMicroseconds(),
            c.reason,
        )
        for c in listed
    ] == [
        ("alice:inc-7", SUPPRESS, MARKET, "", "", 0, 0, 0, ends_us, "stale feed"),
        ("bob:inc-8", THROTTLE, WEB, "", "", 0, 0, 50, ends_us, "bot traffic"),
        (
            "carol:inc-9",
            RAISE_SAFETY,
            "",
            "",
            "STORE",
            2,
            25,
            0,
            ends_us,
            "count drift at STORE",
        ),
    ]
    assert [
        (
            c.attribution.actor,
            c.attribution.change_id,
            c.attribution.changed_at.ToMicroseconds(),
        )
        for c in listed
    ] == [
        ("alice", "inc-7", set_at_us[0]),
        ("bob", "inc-8", set_at_us[1]),
        ("carol", "inc-9", set_at_us[2]),
    ]


# Bad input -------------------------------------------------------------------------------

# Each case builds its request from the fake clock's now, once the test has set the
# control that the overlap case collides with.
RequestBuilder = Callable[[FakeClock], admin_pb2.SetContinuityControlRequest]


def bad(
    build: RequestBuilder, code: grpc.StatusCode, reason: str, field: str, name: str
) -> Any:
    return pytest.param(build, (code, reason, field), id=name)


BAD_CONTROLS = [
    bad(
        lambda c: control_request(
            lasting(c, HOUR_S),
            admin_pb2.CONTROL_KIND_UNSPECIFIED,
            change_id="bad",
            channel=WEB,
        ),
        INVALID,
        "FIELD_REQUIRED",
        "control.kind",
        "no-kind",
    ),
    bad(
        lambda c: control_request(
            lasting(c, HOUR_S), SUPPRESS, change_id="bad", channel=WEB, reason=""
        ),
        INVALID,
        "FIELD_REQUIRED",
        "control.reason",
        "no-reason",
    ),
    bad(
        lambda c: control_request(lasting(c, HOUR_S), SUPPRESS, change_id="bad"),
        INVALID,
        "FIELD_REQUIRED",
        "control.channel",
        "suppress-without-channel",
    ),
    bad(
        lambda c: control_request(0, SUPPRESS, change_id="bad", channel=WEB),
        INVALID,
        "TIME_BOX_IN_PAST",
        "control.until",
        "no-until",
    ),
    bad(
        lambda c: control_request(
            lasting(c, -1), SUPPRESS, change_id="bad", channel=WEB
        ),
        INVALID,
        "TIME_BOX_IN_PAST",
        "control.until",
        "until-in-the-past",
    ),
    bad(
        lambda c: control_request(
            lasting(c, 31 * DAY_S + 1), SUPPRESS, change_id="bad", channel=WEB
        ),
        INVALID,
        "TIME_BOX_TOO_LONG",
        "control.until",
        "until-too-far",
    ),
    bad(
        lambda c: control_request(
            lasting(c, HOUR_S), RAISE_SAFETY, change_id="bad", sku="MUG", percent=101
        ),
        INVALID,
        "PERCENT_OUT_OF_RANGE",
        "control.safety_percent",
        "percent-above-100",
    ),
    bad(
        lambda c: control_request(
            lasting(c, HOUR_S), RAISE_SAFETY, change_id="bad", units=-3
        ),
        INVALID,
        "UNITS_OUT_OF_RANGE",
        "control.safety_units",
        "negative-units",
    ),
    bad(
        lambda c: control_request(
            lasting(c, HOUR_S), RAISE_SAFETY, change_id="bad", sku="MUG"
        ),
        INVALID,
        "FIELD_REQUIRED",
        "control.safety_units",
        "raise-by-nothing",
    ),
    bad(
        lambda c: control_request(
            lasting(c, HOUR_S), THROTTLE, change_id="bad", channel=WEB
        ),
        INVALID,
        "RATE_OUT_OF_RANGE",
        "control.reservations_per_second",
        "rate-zero",
    ),
    bad(
        lambda c: control_request(
            lasting(c, HOUR_S), SUPPRESS, change_id="bad", channel=WEB, sku="MUG"
        ),
        PRECONDITION,
        "CONTROL_OVERLAPS",
        "control",
        "overlapping",
    ),
]


async def set_baseline_controls(server: Running, clock: FakeClock) -> None:
    """A suppression for the overlap case to collide with, and a raise to show that
    nothing else moves."""
    await set_control(
        server.admin,
        control_request(
            lasting(clock, HOUR_S), SUPPRESS, change_id="base-1", channel=WEB, sku="MUG"
        ),
    )
    await set_control(
        server.admin,
        control_request(
            lasting(clock, HOUR_S), RAISE_SAFETY, change_id="base-2", sku="CUP", units=1
        ),
    )


@pytest.mark.parametrize(("build", "expected"), BAD_CONTROLS)
async def test_bad_control_is_refused_and_changes_nothing(
    start_server: ServerFactory,
    clock: FakeClock,
    build: RequestBuilder,
    expected: tuple[grpc.StatusCode, str, str],
) -> None:
    server = await start_stocked(start_server)
    await set_baseline_controls(server, clock)
    before = await controls_in_force(server.admin)
    views_before = [await view(server.inventory, s, WEB) for s in ("MUG", "CUP")]

    error = await refused(set_control(server.admin, build(clock)))

    assert refusal(error) == expected
    assert await controls_in_force(server.admin) == before
    assert [await view(server.inventory, s, WEB) for s in ("MUG", "CUP")] == (
        views_before
    )
    # A refusal is not an answer: the change id is still free for a good request.
    fine = await set_control(
        server.admin,
        control_request(lasting(clock, 60), SUPPRESS, change_id="bad", channel=MARKET),
    )
    assert (fine.control_id, fine.replayed) == ("ops:bad", False)


@pytest.mark.parametrize(
    ("control_id", "expected"),
    [
        pytest.param(
            "ops:never-set",
            (NOT_FOUND, "CONTROL_NOT_FOUND", "control_id"),
            id="unknown",
        ),
        pytest.param("", (INVALID, "FIELD_REQUIRED", "control_id"), id="empty"),
    ],
)
async def test_lifting_a_control_that_is_not_in_force_is_refused(
    start_server: ServerFactory,
    clock: FakeClock,
    control_id: str,
    expected: tuple[grpc.StatusCode, str, str],
) -> None:
    server = await start_stocked(start_server)
    await set_baseline_controls(server, clock)
    before = await controls_in_force(server.admin)

    error = await refused(lift(server.admin, "lift-1", control_id))

    assert refusal(error) == expected
    assert await controls_in_force(server.admin) == before


# Idempotency -----------------------------------------------------------------------------


async def test_control_retry_is_replayed_with_the_same_id_and_sets_nothing_more(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_stocked(start_server)
    request = control_request(
        lasting(clock, HOUR_S), SUPPRESS, change_id="c1", channel=WEB, sku="MUG"
    )
    first = await set_control(server.admin, request)
    clock.advance(30)

    again = await set_control(server.admin, request)
    other_content = await refused(
        set_control(
            server.admin,
            control_request(
                lasting(clock, HOUR_S), SUPPRESS, change_id="c1", channel=MARKET
            ),
        )
    )
    other_actor = await set_control(
        server.admin,
        control_request(
            lasting(clock, HOUR_S),
            SUPPRESS,
            change_id="c1",
            channel=MARKET,
            actor="sre",
        ),
    )

    assert (first.control_id, first.replayed) == ("ops:c1", False)
    assert (again.control_id, again.replayed) == ("ops:c1", True)
    assert refusal(other_content) == (INVALID, "REQUEST_ID_REUSED", "change_id")
    assert (other_actor.control_id, other_actor.replayed) == ("sre:c1", False)
    listed = await controls_in_force(server.admin)
    assert [c.control_id for c in listed] == ["ops:c1", "sre:c1"]
    # The retry left the first control's attribution as it was.
    assert listed[0].attribution.changed_at.ToMicroseconds() == (
        clock.now_us() - 30 * US_PER_S
    )


async def test_retries_after_a_lift_neither_bring_the_control_back_nor_fail(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_stocked(start_server)
    request = control_request(
        lasting(clock, HOUR_S), SUPPRESS, change_id="c1", channel=WEB, sku="MUG"
    )
    await set_control(server.admin, request)
    assert not await lift(server.admin, "lift-1", "ops:c1")

    again = await set_control(server.admin, request)
    lifted_again = await lift(server.admin, "lift-1", "ops:c1")
    lifted_anew = await refused(lift(server.admin, "lift-2", "ops:c1"))

    assert (again.control_id, again.replayed) == ("ops:c1", True)
    assert lifted_again
    assert refusal(lifted_anew) == (NOT_FOUND, "CONTROL_NOT_FOUND", "control_id")
    assert await controls_in_force(server.admin) == []
    assert (await view(server.inventory, "MUG", WEB))[3:] == (20, False)


async def test_change_id_reused_after_retention_does_not_replace_a_control_in_force(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    retention_s = 60
    server = await start_server(
        expiry_tick_s=QUIET_TICK_S, idempotency_retention_s=retention_s
    )
    await set_on_hand(server, "count-1", ("MUG", "DC", 10), ("CUP", "DC", 10))
    await set_control(
        server.admin,
        control_request(
            lasting(clock, DAY_S), SUPPRESS, change_id="c1", channel=WEB, sku="MUG"
        ),
    )
    clock.advance(retention_s + 1)
    # Recovery leaves answers past retention out of the request log, not the control.
    await stop_server(server)
    server = await start_server(
        expiry_tick_s=QUIET_TICK_S, idempotency_retention_s=retention_s
    )
    (first,) = await controls_in_force(server.admin)

    # The control id is "<actor>:<change_id>", and "ops:c1" is in force: another
    # control under change id c1 must be refused, not take the first one's place.
    outcome: Any
    try:
        outcome = await set_control(
            server.admin,
            control_request(
                lasting(clock, HOUR_S), SUPPRESS, change_id="c1", channel=MARKET
            ),
        )
    except grpc.aio.AioRpcError as error:
        outcome = refusal(error)

    assert await controls_in_force(server.admin) == [first], outcome
    assert (await view(server.inventory, "MUG", WEB))[3:] == (0, True)
    assert (await view(server.inventory, "CUP", MARKET))[3:] == (10, False)
    assert isinstance(outcome, tuple)
    assert outcome[0] in {INVALID, PRECONDITION}


# Durability ------------------------------------------------------------------------------


def every_kind_of_control(
    until_us: int, short_until_us: int
) -> list[admin_pb2.SetContinuityControlRequest]:
    """One control of every kind ending at `until_us`, one ending at `short_until_us`,
    and one to be lifted (change_id "gone")."""
    return [
        control_request(until_us, SUPPRESS, change_id="s1", channel=WEB, sku="MUG"),
        control_request(
            until_us, THROTTLE, change_id="t1", channel=MARKET, rate_per_s=2
        ),
        control_request(
            until_us, RAISE_SAFETY, change_id="r1", location="DC", units=1, percent=20
        ),
        control_request(short_until_us, SUPPRESS, change_id="s2", channel="kiosk"),
        control_request(until_us, SUPPRESS, change_id="gone", channel="app"),
    ]


async def set_controls_and_lift_one(
    admin: admin_pb2_grpc.StockAdminServiceStub,
    requests: list[admin_pb2.SetContinuityControlRequest],
) -> None:
    await admin.SetOnHand(
        admin_pb2.SetOnHandRequest(
            source="erp",
            source_event_id="count-1",
            counts=[
                admin_pb2.OnHandCount(sku=sku, location=location, on_hand=10)
                for sku in ("MUG", "CUP")
                for location in ("DC", "STORE")
            ],
        ),
        timeout=RPC_TIMEOUT_S,
    )
    for request in requests:
        await set_control(admin, request)
    assert not await lift(admin, "lift-1", "ops:gone")


async def check_controls_still_decide(
    inventory: inventory_pb2_grpc.InventoryServiceStub,
) -> None:
    """Web cannot see MUG, the marketplace gets two reserves a second, DC keeps back
    1 unit and 20% of on-hand, and the lifted control stays lifted."""
    assert (await view(inventory, "MUG", WEB))[3:] == (0, True)
    assert (await view(inventory, "CUP", WEB))[2:] == (3, 17, False)
    assert (await view(inventory, "CUP", "app"))[3:] == (17, False)
    answers = []
    for n in range(3):
        try:
            response: inventory_pb2.ReserveResponse = await inventory.Reserve(
                reserve_request(
                    f"after-{n}", line("CUP", 1, location="STORE"), channel=MARKET
                ),
                timeout=RPC_TIMEOUT_S,
            )
            answers.append(response.outcome == RESERVED)
        except grpc.aio.AioRpcError as error:
            assert refusal(error)[:2] == (EXHAUSTED, "CHANNEL_THROTTLED")
            answers.append(False)
    assert answers == [True, True, False]


async def test_controls_and_their_time_boxes_survive_a_restart(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_server(expiry_tick_s=QUIET_TICK_S)
    until_us, short_until_us = lasting(clock, 2 * HOUR_S), lasting(clock, HOUR_S)
    requests = every_kind_of_control(until_us, short_until_us)
    await set_controls_and_lift_one(server.admin, requests)
    before = await controls_in_force(server.admin)
    assert [c.control_id for c in before] == ["ops:r1", "ops:s1", "ops:s2", "ops:t1"]
    await stop_server(server)

    server = await start_server(expiry_tick_s=QUIET_TICK_S)

    assert await controls_in_force(server.admin) == before
    await check_controls_still_decide(server.inventory)
    assert [(await set_control(server.admin, r)).replayed for r in requests] == [
        True
    ] * len(requests)
    assert await lift(server.admin, "lift-1", "ops:gone")
    # The time boxes run on as acknowledged: the short one ends, then the rest.
    clock.advance(HOUR_S)
    assert await controls_in_force(server.admin) == [
        c for c in before if c.control_id != "ops:s2"
    ]
    clock.advance(HOUR_S)
    assert await controls_in_force(server.admin) == []
    assert (await view(server.inventory, "MUG", WEB))[3:] == (20, False)


async def test_controls_survive_a_sigkill_of_the_server_process(
    server_process: ServerProcess,
) -> None:
    # The child runs on the real clock: time boxes far enough out not to end mid-test.
    now_us = time.time_ns() // 1_000
    requests = every_kind_of_control(
        now_us + 20 * DAY_S * US_PER_S, now_us + 10 * DAY_S * US_PER_S
    )
    await server_process.wait_serving()
    async with grpc.aio.insecure_channel(
        server_process.address, options=CHANNEL_OPTIONS
    ) as channel:
        admin = admin_pb2_grpc.StockAdminServiceStub(channel)
        await set_controls_and_lift_one(admin, requests)
        before = await controls_in_force(admin)

    # SIGKILL: no drain and no checkpoint, so recovery replays the control records.
    server_process.kill()
    await server_process.wait_exit()
    await server_process.start()
    await server_process.wait_serving()

    async with grpc.aio.insecure_channel(
        server_process.address, options=CHANNEL_OPTIONS
    ) as channel:
        admin = admin_pb2_grpc.StockAdminServiceStub(channel)
        assert await controls_in_force(admin) == before, server_process.log_tail()
        assert len(before) == 4
        await check_controls_still_decide(
            inventory_pb2_grpc.InventoryServiceStub(channel)
        )
        assert (await set_control(admin, requests[0])).replayed
        assert await lift(admin, "lift-1", "ops:gone")
