"""The channel registry over gRPC: an empty registry accepts every channel name; once
it names any, Reserves (single or in a batch) from other channels and policy changes
naming them are refused, a channel a policy in force names cannot be taken out, and
reservations made before a channel was taken out can still be finished. Also bad
input, idempotency on (actor, change_id), and the registry after a restart, a
checkpoint and a SIGKILL of the server process.

Every refusal is checked to have changed nothing: GetPolicies and every channel's
GetAvailability read the same before and after.
"""

import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from server.clock import US_PER_S, FakeClock
from stockward.v1 import admin_pb2, inventory_pb2, types_pb2
from tests.api.allocations_support import (
    ChannelStubs,
    Stubs,
    count,
    level,
    policies,
    set_group,
    sku_views,
)
from tests.api.client import (
    availability,
    line,
    list_all,
    refusal,
    refused,
    reserve_request,
    status_refusal,
    taken,
)
from tests.conftest import Running, ServerFactory, stop_server
from tests.reliability.server_process import CHANNEL_OPTIONS, ServerProcess
from tests.wal.durable import connect, stop_as_if_crashed

ACTOR = "ops"
SKU = "MUG"
DC = "DC"
WEB, MARKET, APP = "web", "marketplace", "app"
RESERVED = inventory_pb2.RESERVE_OUTCOME_RESERVED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
HOUR_S = 3600
# Keeps the expiry loop asleep while a test advances the fake clock by hours.
QUIET_TICK_S = 24.0 * HOUR_S
# Every channel whose view the unchanged-state checks compare; "" is no channel.
VIEWERS = ("", WEB, MARKET, APP)

State = tuple[admin_pb2.GetPoliciesResponse, list[list[inventory_pb2.SkuAvailability]]]


# Requests and reads -------------------------------------------------------------------


def channels_request(
    change_id: str, *entries: tuple[str, bool], actor: str = ACTOR
) -> admin_pb2.SetChannelsRequest:
    """Entries as (channel, registered)."""
    return admin_pb2.SetChannelsRequest(
        actor=actor,
        change_id=change_id,
        channels=[
            admin_pb2.ChannelEntry(channel=channel, registered=registered)
            for channel, registered in entries
        ],
    )


async def set_channels(
    server: Stubs, change_id: str, *entries: tuple[str, bool], actor: str = ACTOR
) -> bool:
    """Change the registry; returns whether the answer was a replay."""
    response: admin_pb2.SetChannelsResponse = await server.admin.SetChannels(
        channels_request(change_id, *entries, actor=actor)
    )
    return bool(response.replayed)


async def register(server: Stubs, change_id: str, *channels: str) -> None:
    assert not await set_channels(server, change_id, *((c, True) for c in channels))


async def registry(server: Stubs) -> list[str]:
    return [entry.channel for entry in (await policies(server)).channels]


async def state_of(server: Stubs) -> State:
    return await policies(server), await sku_views(server, [SKU], VIEWERS)


async def reserve_from(
    server: Stubs, request_id: str, channel: str, quantity: int = 1
) -> inventory_pb2.ReserveResponse:
    response: inventory_pb2.ReserveResponse = await server.inventory.Reserve(
        reserve_request(request_id, line(SKU, quantity, location=DC), channel=channel)
    )
    return response


def attributed(entry: admin_pb2.ChannelEntry) -> tuple[str, str, int]:
    value = entry.attribution
    return value.actor, value.change_id, value.changed_at.ToMicroseconds()


async def stocked(start_server: ServerFactory) -> Running:
    """A server with 20 of MUG at DC and a location group "near" (DC)."""
    server = await start_server(expiry_tick_s=QUIET_TICK_S)
    await count(server, "count-1", (SKU, DC, 20))
    await set_group(server, "group-near", "near", DC)
    return server


# Policies that name a channel ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Namer:
    """A kind of policy that names a channel: how to put one in force for a channel
    (with change id <kind>-<channel>), how to take it away again (un<kind>-<channel>),
    and the field a refusal names. Both take the channel and the server's now."""

    kind: str
    field: str
    name: Callable[[Stubs, str, int], Awaitable[Any]]
    unname: Callable[[Stubs, str, int], Awaitable[Any]]


def buffer_of(
    channel: str, units: int, change_id: str
) -> admin_pb2.SetChannelBufferRequest:
    return admin_pb2.SetChannelBufferRequest(
        actor=ACTOR,
        change_id=change_id,
        buffers=[admin_pb2.ChannelBuffer(channel=channel, quantity=units)],
    )


def allocation_of(
    channel: str, units: int, change_id: str
) -> admin_pb2.SetChannelAllocationRequest:
    return admin_pb2.SetChannelAllocationRequest(
        actor=ACTOR, change_id=change_id, allocations=[level(SKU, channel, units)]
    )


def sourcing_of(
    channel: str, group: str, change_id: str
) -> admin_pb2.SetChannelSourcingRequest:
    return admin_pb2.SetChannelSourcingRequest(
        actor=ACTOR,
        change_id=change_id,
        sourcing=admin_pb2.ChannelSourcing(channel=channel, location_group=group),
    )


def preorders_of(
    channel: str, allowed: bool, change_id: str
) -> admin_pb2.SetChannelPreordersRequest:
    return admin_pb2.SetChannelPreordersRequest(
        actor=ACTOR, change_id=change_id, channel=channel, allowed=allowed
    )


def control_of(
    kind: admin_pb2.ControlKind.ValueType, channel: str, now_us: int, change_id: str
) -> admin_pb2.SetContinuityControlRequest:
    """A control on `channel` for an hour from `now_us`."""
    is_throttle = kind == admin_pb2.CONTROL_KIND_THROTTLE_CHANNEL
    control = admin_pb2.ContinuityControl(
        kind=kind,
        channel=channel,
        reservations_per_second=50 if is_throttle else 0,
        reason="listing feed broken",
    )
    control.until.FromMicroseconds(now_us + HOUR_S * US_PER_S)
    return admin_pb2.SetContinuityControlRequest(
        actor=ACTOR, change_id=change_id, control=control
    )


def control_namer(kind: admin_pb2.ControlKind.ValueType, name: str) -> Namer:
    def lift(channel: str) -> admin_pb2.LiftContinuityControlRequest:
        # Control ids are "<actor>:<change_id>" of the change that set them.
        return admin_pb2.LiftContinuityControlRequest(
            actor=ACTOR,
            change_id=f"un{name}-{channel}",
            control_id=f"{ACTOR}:{name}-{channel}",
        )

    return Namer(
        name,
        "control.channel",
        lambda s, c, now_us: s.admin.SetContinuityControl(
            control_of(kind, c, now_us, f"{name}-{c}")
        ),
        lambda s, c, _: s.admin.LiftContinuityControl(lift(c)),
    )


NAMERS = [
    Namer(
        "buffer",
        "buffers[0].channel",
        lambda s, c, _: s.admin.SetChannelBuffer(buffer_of(c, 2, f"buffer-{c}")),
        lambda s, c, _: s.admin.SetChannelBuffer(buffer_of(c, 0, f"unbuffer-{c}")),
    ),
    Namer(
        "allocation",
        "allocations[0].channel",
        lambda s, c, _: s.admin.SetChannelAllocation(
            allocation_of(c, 5, f"allocation-{c}")
        ),
        lambda s, c, _: s.admin.SetChannelAllocation(
            allocation_of(c, 0, f"unallocation-{c}")
        ),
    ),
    Namer(
        "sourcing",
        "sourcing.channel",
        lambda s, c, _: s.admin.SetChannelSourcing(
            sourcing_of(c, "near", f"sourcing-{c}")
        ),
        lambda s, c, _: s.admin.SetChannelSourcing(
            sourcing_of(c, "", f"unsourcing-{c}")
        ),
    ),
    Namer(
        "preorders",
        "channel",
        lambda s, c, _: s.admin.SetChannelPreorders(
            preorders_of(c, True, f"preorders-{c}")
        ),
        lambda s, c, _: s.admin.SetChannelPreorders(
            preorders_of(c, False, f"unpreorders-{c}")
        ),
    ),
    control_namer(admin_pb2.CONTROL_KIND_SUPPRESS_CHANNEL, "suppress"),
    control_namer(admin_pb2.CONTROL_KIND_THROTTLE_CHANNEL, "throttle"),
]
BUFFER, ALLOCATION, SUPPRESS = NAMERS[0], NAMERS[1], NAMERS[4]
BY_KIND = [pytest.param(namer, id=namer.kind) for namer in NAMERS]


# An open registry ---------------------------------------------------------------------


async def test_an_empty_registry_accepts_every_channel_name(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await stocked(start_server)

    made = await reserve_from(server, "kiosk-1", "kiosk-7")
    for namer in NAMERS:
        await namer.name(server, "kiosk-7", clock.now_us())

    assert made.outcome == RESERVED
    assert await registry(server) == []
    shown = await policies(server)
    assert [x.channel for x in shown.buffers] == ["kiosk-7"]
    assert [x.channel for x in shown.controls] == ["kiosk-7", "kiosk-7"]


# Reserves from unregistered channels --------------------------------------------------


async def test_once_channels_are_registered_reserves_from_others_are_refused(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await stocked(start_server)
    clock.advance(60)
    await register(server, "reg-1", WEB, MARKET)
    before = await state_of(server)

    error = await refused(reserve_from(server, "app-1", APP))

    assert refusal(error) == (PRECONDITION, "CHANNEL_UNKNOWN", "channel")
    assert await state_of(server) == before
    assert await list_all(server, page_size=100) == [[]]
    assert (await reserve_from(server, "web-1", WEB)).outcome == RESERVED
    registered_at = (ACTOR, "reg-1", clock.now_us())
    assert [(x.channel, x.registered, attributed(x)) for x in before[0].channels] == [
        (MARKET, True, registered_at),
        (WEB, True, registered_at),
    ]


async def test_a_refused_reserve_is_not_remembered_and_succeeds_once_registered(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await register(server, "reg-1", WEB)
    before = await state_of(server)
    await refused(reserve_from(server, "app-1", APP))
    assert await state_of(server) == before

    await register(server, "reg-2", APP)
    made = await reserve_from(server, "app-1", APP)

    assert (made.outcome, made.replayed) == (RESERVED, False)


def batch_reserve(
    request_id: str, channel: str, quantity: int
) -> inventory_pb2.Command:
    return inventory_pb2.Command(
        reserve=reserve_request(
            request_id, line(SKU, quantity, location=DC), channel=channel
        )
    )


async def test_a_batch_refuses_reserves_of_unregistered_channels_and_runs_the_rest(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await register(server, "reg-1", WEB, MARKET)
    earlier = await reserve_from(server, "web-0", WEB, 4)

    response = await server.inventory.ExecuteBatch(
        inventory_pb2.ExecuteBatchRequest(
            commands=[
                batch_reserve("web-1", WEB, 2),
                batch_reserve("app-1", APP, 3),
                batch_reserve("market-1", MARKET, 5),
                inventory_pb2.Command(
                    confirm=inventory_pb2.ConfirmRequest(
                        request_id="confirm-0", reservation_id=earlier.reservation_id
                    )
                ),
                batch_reserve("app-2", APP, 1),
            ]
        )
    )

    kinds = [result.WhichOneof("result") for result in response.results]
    assert kinds == ["reserve", "error", "reserve", "confirm", "error"]
    web, app, market, confirmed, app_again = response.results
    assert [web.reserve.outcome, market.reserve.outcome] == [RESERVED, RESERVED]
    assert confirmed.confirm.reservation.state == types_pb2.RESERVATION_STATE_CONFIRMED
    for result in (app, app_again):
        assert status_refusal(result.error) == (
            PRECONDITION,
            "CHANNEL_UNKNOWN",
            "channel",
        )
    assert await availability(server, SKU) == (20, 11, 9)
    assert await list_all(server, page_size=100, channel=APP) == [[]]


# Policies naming unregistered channels ------------------------------------------------


@pytest.mark.parametrize("namer", BY_KIND)
async def test_a_policy_naming_an_unregistered_channel_is_refused_and_changes_nothing(
    start_server: ServerFactory, clock: FakeClock, namer: Namer
) -> None:
    server = await stocked(start_server)
    await register(server, "reg-1", WEB, MARKET)
    before = await state_of(server)

    error = await refused(namer.name(server, APP, clock.now_us()))

    assert refusal(error) == (PRECONDITION, "CHANNEL_UNKNOWN", namer.field)
    assert await state_of(server) == before
    # The refused change did not use up its change id: once app is registered the
    # same change is made, not answered as a replay.
    await register(server, "reg-2", APP)
    answer = await namer.name(server, APP, clock.now_us())
    assert not answer.replayed


async def test_policies_naming_no_channel_are_accepted_whatever_the_registry(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await stocked(start_server)
    await register(server, "reg-1", WEB)
    control = admin_pb2.ContinuityControl(
        kind=admin_pb2.CONTROL_KIND_RAISE_SAFETY_STOCK, safety_units=3, reason="audit"
    )
    control.until.FromMicroseconds(clock.now_us() + HOUR_S * US_PER_S)

    await server.admin.SetContinuityControl(
        admin_pb2.SetContinuityControlRequest(
            actor=ACTOR, change_id="raise-1", control=control
        )
    )
    await server.admin.SetSafetyStock(
        admin_pb2.SetSafetyStockRequest(
            actor=ACTOR,
            change_id="safety-1",
            levels=[admin_pb2.SafetyStock(sku=SKU, location=DC, quantity=2)],
        )
    )

    assert await availability(server, SKU) == (20, 0, 15)


# Taking channels out ------------------------------------------------------------------


@pytest.mark.parametrize("namer", BY_KIND)
async def test_a_channel_named_by_a_policy_in_force_stays_registered_until_it_goes(
    start_server: ServerFactory, clock: FakeClock, namer: Namer
) -> None:
    server = await stocked(start_server)
    await register(server, "reg-1", WEB, MARKET)
    await namer.name(server, MARKET, clock.now_us())
    before = await state_of(server)

    error = await refused(set_channels(server, "unreg-1", (MARKET, False)))

    assert refusal(error) == (PRECONDITION, "CHANNEL_IN_USE", "channels")
    assert await state_of(server) == before
    await namer.unname(server, MARKET, clock.now_us())
    assert not await set_channels(server, "unreg-1", (MARKET, False))
    assert await registry(server) == [WEB]
    gone = await refused(reserve_from(server, "market-1", MARKET))
    assert refusal(gone) == (PRECONDITION, "CHANNEL_UNKNOWN", "channel")


async def test_a_control_that_has_ended_no_longer_keeps_its_channel_registered(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await stocked(start_server)
    await register(server, "reg-1", WEB, MARKET)
    await SUPPRESS.name(server, MARKET, clock.now_us())
    before = await state_of(server)

    early = await refused(set_channels(server, "unreg-1", (MARKET, False)))
    assert await state_of(server) == before
    clock.advance(HOUR_S + 1)
    assert not await set_channels(server, "unreg-2", (MARKET, False))

    assert refusal(early) == (PRECONDITION, "CHANNEL_IN_USE", "channels")
    assert await registry(server) == [WEB]


async def test_registering_a_first_channel_while_policies_name_others_is_refused(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await stocked(start_server)
    await BUFFER.name(server, MARKET, clock.now_us())
    await ALLOCATION.name(server, APP, clock.now_us())
    before = await state_of(server)

    only_web = await refused(set_channels(server, "reg-1", (WEB, True)))
    without_app = await refused(
        set_channels(server, "reg-2", (WEB, True), (MARKET, True))
    )

    assert refusal(only_web) == (PRECONDITION, "CHANNEL_IN_USE", "channels")
    assert refusal(without_app) == (PRECONDITION, "CHANNEL_IN_USE", "channels")
    assert await state_of(server) == before
    await register(server, "reg-3", WEB, MARKET, APP)
    assert await registry(server) == [APP, MARKET, WEB]


async def test_unregistering_the_last_channel_while_a_policy_names_it_is_refused(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    """The contract: a channel that a policy in force names cannot be taken out, with
    no exception for the registry's last channel."""
    server = await stocked(start_server)
    await register(server, "reg-1", WEB)
    await BUFFER.name(server, WEB, clock.now_us())
    before = await state_of(server)

    error = await refused(set_channels(server, "unreg-1", (WEB, False)))

    assert refusal(error) == (PRECONDITION, "CHANNEL_IN_USE", "channels")
    assert await state_of(server) == before


# Reservations of a channel taken out --------------------------------------------------


async def test_reservations_of_an_unregistered_channel_can_still_be_finished(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await register(server, "reg-1", WEB, APP)
    first = await reserve_from(server, "app-1", APP, 2)
    second = await reserve_from(server, "app-2", APP, 3)
    third = await reserve_from(server, "app-3", APP, 4)

    assert not await set_channels(server, "unreg-1", (APP, False))
    inventory = server.inventory
    confirmed = await inventory.Confirm(
        inventory_pb2.ConfirmRequest(
            request_id="c-1", reservation_id=first.reservation_id
        )
    )
    released = await inventory.Release(
        inventory_pb2.ReleaseRequest(
            request_id="r-2",
            reservation_id=second.reservation_id,
            lines=[taken(SKU, DC, 1)],
        )
    )
    await inventory.Confirm(
        inventory_pb2.ConfirmRequest(
            request_id="c-3", reservation_id=third.reservation_id
        )
    )
    fulfilled = await inventory.Fulfill(
        inventory_pb2.FulfillRequest(
            request_id="f-3", reservation_id=third.reservation_id
        )
    )

    assert confirmed.reservation.state == types_pb2.RESERVATION_STATE_CONFIRMED
    assert released.reservation.lines[0].quantity_held == 2
    assert fulfilled.reservation.state == types_pb2.RESERVATION_STATE_FULFILLED
    assert await availability(server, SKU) == (16, 4, 12)
    # A retry of a Reserve answered before the channel was taken out gets that answer.
    again = await reserve_from(server, "app-1", APP, 2)
    assert (again.replayed, again.reservation_id) == (True, first.reservation_id)
    before = await state_of(server)
    new = await refused(reserve_from(server, "app-4", APP))
    assert refusal(new) == (PRECONDITION, "CHANNEL_UNKNOWN", "channel")
    assert await state_of(server) == before


# Bad input and idempotency ------------------------------------------------------------


BAD_REQUESTS = [
    pytest.param(
        channels_request("bad", (APP, True), (APP, False)),
        (INVALID, "DUPLICATE_CHANNEL", "channels[1].channel"),
        id="duplicate",
    ),
    pytest.param(
        channels_request("bad"), (INVALID, "FIELD_REQUIRED", "channels"), id="empty"
    ),
    pytest.param(
        channels_request("bad", (APP, True), ("", True)),
        (INVALID, "FIELD_REQUIRED", "channels[1].channel"),
        id="blank-channel",
    ),
    pytest.param(
        channels_request("bad", ("a pp", True)),
        (INVALID, "FIELD_MALFORMED", "channels[0].channel"),
        id="malformed-channel",
    ),
    pytest.param(
        channels_request("bad", (APP, True), actor=""),
        (INVALID, "FIELD_REQUIRED", "actor"),
        id="no-actor",
    ),
    pytest.param(
        channels_request("", (APP, True)),
        (INVALID, "FIELD_REQUIRED", "change_id"),
        id="no-change-id",
    ),
    pytest.param(
        channels_request("reg-1", (WEB, True), (APP, True)),
        (INVALID, "REQUEST_ID_REUSED", "change_id"),
        id="change-id-reused",
    ),
]


@pytest.mark.parametrize(("request_", "expected"), BAD_REQUESTS)
async def test_a_bad_registry_change_is_refused_naming_the_field_and_changes_nothing(
    start_server: ServerFactory,
    request_: admin_pb2.SetChannelsRequest,
    expected: tuple[grpc.StatusCode, str, str],
) -> None:
    server = await stocked(start_server)
    await register(server, "reg-1", WEB)
    before = await state_of(server)

    error = await refused(server.admin.SetChannels(request_))

    assert refusal(error) == expected
    assert await state_of(server) == before


async def test_a_registry_change_retried_is_replayed_and_never_applied_again(
    start_server: ServerFactory,
) -> None:
    server = await start_server()

    assert not await set_channels(server, "reg-1", (WEB, True), (MARKET, True))
    assert not await set_channels(server, "unreg-1", (MARKET, False))
    assert await set_channels(server, "reg-1", (WEB, True), (MARKET, True))

    assert await registry(server) == [WEB]
    # The same change id from another actor is another change.
    assert not await set_channels(server, "unreg-1", (WEB, False), actor="planner")
    assert await registry(server) == []
    assert await set_channels(server, "unreg-1", (MARKET, False))
    assert await registry(server) == []


# Restarts -----------------------------------------------------------------------------


async def registry_in_use(server: Stubs, now_us: int) -> None:
    """Three channels registered, one taken out again, and policies naming two."""
    await register(server, "reg-1", WEB, MARKET, APP)
    await BUFFER.name(server, MARKET, now_us)
    await SUPPRESS.name(server, WEB, now_us)
    assert not await set_channels(server, "unreg-1", (APP, False))


async def check_registry_in_force(server: Stubs, expected: list[str]) -> None:
    """After `registry_in_use`: the registry, its refusals and its replays."""
    assert await registry(server) == expected
    before = await state_of(server)

    app = await refused(reserve_from(server, "app-9", APP))
    in_use = await refused(set_channels(server, "unreg-9", (MARKET, False)))

    assert refusal(app) == (PRECONDITION, "CHANNEL_UNKNOWN", "channel")
    assert refusal(in_use) == (PRECONDITION, "CHANNEL_IN_USE", "channels")
    assert await state_of(server) == before
    assert await set_channels(server, "unreg-1", (APP, False))


async def test_the_registry_survives_restarts_from_records_and_from_a_checkpoint(
    start_server: ServerFactory, clock: FakeClock, schema: str
) -> None:
    server = await stocked(start_server)
    await registry_in_use(server, clock.now_us())
    await server.app.ledger.checkpoint()
    await register(server, "reg-2", "kiosk")
    before = await state_of(server)

    async with connect(schema) as conn:
        await stop_as_if_crashed(server, conn)
    server = await start_server(expiry_tick_s=QUIET_TICK_S)
    assert await state_of(server) == before
    await stop_server(server)
    server = await start_server(expiry_tick_s=QUIET_TICK_S)

    assert await state_of(server) == before
    await check_registry_in_force(server, ["kiosk", MARKET, WEB])


async def test_the_registry_survives_a_sigkill_of_the_server_process(
    server_process: ServerProcess,
) -> None:
    await server_process.wait_serving()
    async with grpc.aio.insecure_channel(
        server_process.address, options=CHANNEL_OPTIONS
    ) as channel:
        stubs = ChannelStubs.of(channel)
        await count(stubs, "count-1", (SKU, DC, 20))
        # The subprocess runs on the real clock, which the control's time box follows.
        await registry_in_use(stubs, time.time_ns() // 1_000)
        before = await policies(stubs)

    # SIGKILL: no drain and no checkpoint, so recovery replays the registry's records.
    server_process.kill()
    assert await server_process.wait_exit() == -9
    await server_process.start()
    await server_process.wait_serving()

    async with grpc.aio.insecure_channel(
        server_process.address, options=CHANNEL_OPTIONS
    ) as channel:
        stubs = ChannelStubs.of(channel)
        assert await policies(stubs) == before, server_process.log_tail()
        await check_registry_in_force(stubs, [MARKET, WEB])
