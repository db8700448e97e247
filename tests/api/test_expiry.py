"""Pending holds run out on the fake clock; confirmed holds never do; both survive a
restart. The sweep is called directly instead of waiting for the expiry loop's tick."""

import grpc
import pytest
from google.protobuf import timestamp_pb2

from server.clock import US_PER_S, FakeClock
from stockward.v1 import inventory_pb2, types_pb2
from tests.api.client import (
    availability,
    confirm,
    line,
    refusal,
    refused,
    reservation,
    reserve,
    reserve_request,
    set_on_hand,
)
from tests.conftest import Running, ServerFactory, stop_server

PENDING = types_pb2.RESERVATION_STATE_PENDING
CONFIRMED = types_pb2.RESERVATION_STATE_CONFIRMED
EXPIRED = types_pb2.RESERVATION_STATE_EXPIRED
# The expiry loop sleeps on the fake clock too. Ticking once a day keeps it asleep
# while a test advances by minutes, so only the test's own sweeps expire holds and
# each sweep has finished its writes when the test looks.
QUIET_TICK_S = 24 * 3600.0


async def hold_for(server: Running, ttl_s: int) -> str:
    await set_on_hand(server, "count-1", ("MUG", "DC", 10))
    held = await reserve(
        server, reserve_request("r1", line("MUG", 4, location="DC"), ttl_s=ttl_s)
    )
    assert held.outcome == inventory_pb2.RESERVE_OUTCOME_RESERVED
    return held.reservation_id


def at_us(stamp: timestamp_pb2.Timestamp) -> int:
    return stamp.ToMicroseconds()


async def test_pending_hold_expires_only_once_its_ttl_has_passed(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_server(expiry_tick_s=QUIET_TICK_S)
    reserved_us = clock.now_us()
    reservation_id = await hold_for(server, ttl_s=60)
    assert at_us((await reservation(server, reservation_id)).expires_at) == (
        reserved_us + 60 * US_PER_S
    )

    clock.advance(59)
    assert await server.app.ledger.sweep_expired() == 0
    assert (await reservation(server, reservation_id)).state == PENDING
    assert await availability(server, "MUG") == (10, 4, 6)

    clock.advance(2)
    assert await server.app.ledger.sweep_expired() == 1
    expired = await reservation(server, reservation_id)
    assert expired.state == EXPIRED
    assert not expired.HasField("expires_at")
    assert expired.lines[0].quantity_held == 0
    assert await availability(server, "MUG") == (10, 0, 10)


async def test_zero_ttl_gets_the_configured_default(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_server(ttl_default_s=30, expiry_tick_s=QUIET_TICK_S)
    reserved_us = clock.now_us()

    reservation_id = await hold_for(server, ttl_s=0)

    expires_us = at_us((await reservation(server, reservation_id)).expires_at)
    assert expires_us == reserved_us + 30 * US_PER_S


@pytest.mark.parametrize("is_swept", [False, True], ids=["before-sweep", "swept"])
async def test_confirm_after_expiry_fails_with_reservation_expired(
    start_server: ServerFactory, clock: FakeClock, is_swept: bool
) -> None:
    server = await start_server(expiry_tick_s=QUIET_TICK_S)
    reservation_id = await hold_for(server, ttl_s=60)
    clock.advance(61)
    if is_swept:
        await server.app.ledger.sweep_expired()

    error = await refused(confirm(server, reservation_id))

    assert refusal(error) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "RESERVATION_EXPIRED",
        "reservation_id",
    )
    await server.app.ledger.sweep_expired()
    assert (await reservation(server, reservation_id)).state == EXPIRED
    assert await availability(server, "MUG") == (10, 0, 10)


async def test_extend_pushes_expiry_out(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_server(expiry_tick_s=QUIET_TICK_S)
    reservation_id = await hold_for(server, ttl_s=60)
    clock.advance(50)

    extended = await server.inventory.Extend(
        inventory_pb2.ExtendRequest(
            request_id="more-time", reservation_id=reservation_id, ttl_seconds=60
        )
    )
    assert at_us(extended.reservation.expires_at) == clock.now_us() + 60 * US_PER_S

    clock.advance(15)
    await server.app.ledger.sweep_expired()
    assert (await reservation(server, reservation_id)).state == PENDING
    assert await availability(server, "MUG") == (10, 4, 6)

    clock.advance(46)
    await server.app.ledger.sweep_expired()
    assert (await reservation(server, reservation_id)).state == EXPIRED
    assert await availability(server, "MUG") == (10, 0, 10)


async def test_extend_that_would_not_push_expiry_out_is_refused(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_server(expiry_tick_s=QUIET_TICK_S)
    reservation_id = await hold_for(server, ttl_s=60)
    before = await reservation(server, reservation_id)
    clock.advance(10)

    error = await refused(
        server.inventory.Extend(
            inventory_pb2.ExtendRequest(
                request_id="less-time", reservation_id=reservation_id, ttl_seconds=50
            )
        )
    )

    assert refusal(error) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "EXTEND_WOULD_SHORTEN",
        "ttl_seconds",
    )
    assert (await reservation(server, reservation_id)).expires_at == before.expires_at


async def test_extend_of_an_expired_hold_is_refused(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_server(expiry_tick_s=QUIET_TICK_S)
    reservation_id = await hold_for(server, ttl_s=60)
    clock.advance(60)

    error = await refused(
        server.inventory.Extend(
            inventory_pb2.ExtendRequest(
                request_id="too-late", reservation_id=reservation_id, ttl_seconds=600
            )
        )
    )

    assert refusal(error) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "RESERVATION_EXPIRED",
        "reservation_id",
    )


async def test_confirmed_hold_never_expires(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_server(expiry_tick_s=QUIET_TICK_S)
    reservation_id = await hold_for(server, ttl_s=60)
    await confirm(server, reservation_id)

    clock.advance(7 * 24 * 3600)
    await server.app.ledger.sweep_expired()

    assert (await reservation(server, reservation_id)).state == CONFIRMED
    assert await availability(server, "MUG") == (10, 4, 6)


async def test_confirmed_hold_still_does_not_expire_after_a_restart(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_server(expiry_tick_s=QUIET_TICK_S)
    reservation_id = await hold_for(server, ttl_s=60)
    await confirm(server, reservation_id)
    await stop_server(server)

    clock.advance(3600)
    server = await start_server(expiry_tick_s=QUIET_TICK_S)
    await server.app.ledger.sweep_expired()

    assert (await reservation(server, reservation_id)).state == CONFIRMED
    assert await availability(server, "MUG") == (10, 4, 6)


async def test_expired_state_survives_a_restart(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_server(expiry_tick_s=QUIET_TICK_S)
    reservation_id = await hold_for(server, ttl_s=60)
    clock.advance(61)
    await server.app.ledger.sweep_expired()
    await stop_server(server)

    server = await start_server(expiry_tick_s=QUIET_TICK_S)

    assert (await reservation(server, reservation_id)).state == EXPIRED
    assert await availability(server, "MUG") == (10, 0, 10)


async def test_hold_due_while_the_server_was_down_expires_on_the_first_sweep(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_server(expiry_tick_s=QUIET_TICK_S)
    reservation_id = await hold_for(server, ttl_s=60)
    await stop_server(server)

    clock.advance(120)
    server = await start_server(expiry_tick_s=QUIET_TICK_S)
    assert (await reservation(server, reservation_id)).state == PENDING

    assert await server.app.ledger.sweep_expired() == 1
    assert (await reservation(server, reservation_id)).state == EXPIRED
    assert await availability(server, "MUG") == (10, 0, 10)


async def test_extended_expiry_survives_a_restart(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_server(expiry_tick_s=QUIET_TICK_S)
    reservation_id = await hold_for(server, ttl_s=60)
    await server.inventory.Extend(
        inventory_pb2.ExtendRequest(
            request_id="more-time", reservation_id=reservation_id, ttl_seconds=600
        )
    )
    await stop_server(server)

    clock.advance(120)
    server = await start_server(expiry_tick_s=QUIET_TICK_S)
    await server.app.ledger.sweep_expired()
    assert (await reservation(server, reservation_id)).state == PENDING

    clock.advance(600)
    await server.app.ledger.sweep_expired()
    assert (await reservation(server, reservation_id)).state == EXPIRED
