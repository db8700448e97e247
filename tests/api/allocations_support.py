"""Shorthands for the channel allocation API tests, and the shoppers of their crash test.

The shorthands set allocations, read pools back from GetPolicies and a channel's view
from GetAvailability, and move holds along. They take anything with `inventory` and
`admin` stubs: the in-process server of conftest.py, or stubs on a channel to a server
subprocess.

Design note (shoppers). Each shopper runs one story at a time for a reservation of its
own (reserve, then keep, release or fulfil) and sends every call again with the same id
until it gets a definite answer, waiting at the gate while the server is down. So every
story ends acknowledged, and `Acknowledged` knows exactly what each pool must be: the units
last set, less the units fulfilled since, of which the units still held are lent out.
Allocations are changed only while no shopper runs, so no fulfilment races a change.
"""

import asyncio
import collections
import dataclasses
import random
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from stockward.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    inventory_pb2,
    inventory_pb2_grpc,
    types_pb2,
)
from tests.api.client import taken
from tests.reliability.load import Gate
from tests.reliability.rpc import UNKNOWN_OUTCOME_CODES

ACTOR = "merchandiser"
WEB, MARKET, APP = "web", "marketplace", "app"
DC, STORE = "DC", "STORE"

RESERVED = inventory_pb2.RESERVE_OUTCOME_RESERVED
PARTIALLY_RESERVED = inventory_pb2.RESERVE_OUTCOME_PARTIALLY_RESERVED
REJECTED = inventory_pb2.RESERVE_OUTCOME_REJECTED
EXHAUSTED = inventory_pb2.SHORT_REASON_CHANNEL_ALLOCATION_EXHAUSTED
INSUFFICIENT = inventory_pb2.SHORT_REASON_INSUFFICIENT_STOCK

# (sku, channel): one allocation.
Key = tuple[str, str]
# An allocation as GetPolicies shows it: (quantity, remaining, exclusive).
PoolView = tuple[int, int, bool]
# A channel's view of a sku in GetAvailability:
# (total available_to_sell, has_allocation, allocation_remaining).
ChannelView = tuple[int, bool, int]


class Stubs(Protocol):
    @property
    def inventory(self) -> Any: ...

    @property
    def admin(self) -> Any: ...


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelStubs:
    """Stubs on a channel of the test's own (to a server subprocess)."""

    inventory: Any
    admin: Any

    @classmethod
    def of(cls, channel: grpc.aio.Channel) -> "ChannelStubs":
        return cls(
            inventory=inventory_pb2_grpc.InventoryServiceStub(channel),
            admin=admin_pb2_grpc.StockAdminServiceStub(channel),
        )


async def count(server: Stubs, event_id: str, *counts: tuple[str, str, int]) -> None:
    """Count (sku, location, on_hand) positions, as the ERP would."""
    await server.admin.SetOnHand(
        admin_pb2.SetOnHandRequest(
            source="erp",
            source_event_id=event_id,
            counts=[
                admin_pb2.OnHandCount(sku=sku, location=location, on_hand=on_hand)
                for sku, location, on_hand in counts
            ],
        )
    )


def level(
    sku: str, channel: str, quantity: int, *, exclusive: bool = False
) -> admin_pb2.ChannelAllocation:
    return admin_pb2.ChannelAllocation(
        sku=sku, channel=channel, quantity=quantity, exclusive=exclusive
    )


def allocation_request(
    change_id: str, *levels: admin_pb2.ChannelAllocation, actor: str = ACTOR
) -> admin_pb2.SetChannelAllocationRequest:
    return admin_pb2.SetChannelAllocationRequest(
        actor=actor, change_id=change_id, allocations=levels
    )


async def allocate(
    server: Stubs, change_id: str, *levels: admin_pb2.ChannelAllocation
) -> bool:
    """Set allocations; returns whether the answer was a replay."""
    response: admin_pb2.SetChannelAllocationResponse = (
        await server.admin.SetChannelAllocation(allocation_request(change_id, *levels))
    )
    return bool(response.replayed)


async def policies(server: Stubs) -> admin_pb2.GetPoliciesResponse:
    response: admin_pb2.GetPoliciesResponse = await server.admin.GetPolicies(
        admin_pb2.GetPoliciesRequest()
    )
    return response


async def pools(server: Stubs) -> dict[Key, PoolView]:
    """Every allocation in force, as (quantity, remaining, exclusive)."""
    return {
        (item.sku, item.channel): (item.quantity, item.remaining, item.exclusive)
        for item in (await policies(server)).allocations
    }


async def channel_view(server: Stubs, sku: str, channel: str) -> ChannelView:
    response: inventory_pb2.GetAvailabilityResponse = (
        await server.inventory.GetAvailability(
            inventory_pb2.GetAvailabilityRequest(skus=[sku], channel=channel)
        )
    )
    item = response.skus[0]
    return (
        item.total.available_to_sell,
        item.has_allocation,
        item.allocation_remaining,
    )


async def location_views(server: Stubs, sku: str, channel: str) -> dict[str, int]:
    """available_to_sell per location, as `channel` sees it."""
    response: inventory_pb2.GetAvailabilityResponse = (
        await server.inventory.GetAvailability(
            inventory_pb2.GetAvailabilityRequest(skus=[sku], channel=channel)
        )
    )
    return {
        item.location: item.availability.available_to_sell
        for item in response.skus[0].locations
    }


def one_line(
    request_id: str,
    channel: str,
    sku: str,
    quantity: int,
    *,
    ttl_s: int = 0,
    allow_partial: bool = False,
) -> inventory_pb2.ReserveRequest:
    """A line of `sku` split across DC, then STORE."""
    line = inventory_pb2.ReserveLine(
        sku=sku, quantity=quantity, locations=[DC, STORE], allow_split=True
    )
    return inventory_pb2.ReserveRequest(
        request_id=request_id,
        channel=channel,
        lines=[line],
        ttl_seconds=ttl_s,
        allow_partial=allow_partial,
    )


async def reserve_one(
    server: Stubs,
    request_id: str,
    channel: str,
    sku: str,
    quantity: int,
    *,
    ttl_s: int = 0,
    allow_partial: bool = False,
) -> inventory_pb2.ReserveResponse:
    request = one_line(
        request_id, channel, sku, quantity, ttl_s=ttl_s, allow_partial=allow_partial
    )
    response: inventory_pb2.ReserveResponse = await server.inventory.Reserve(request)
    return response


async def held(
    server: Stubs, request_id: str, channel: str, sku: str, units: int
) -> str:
    """A hold that must succeed; returns its reservation id."""
    response = await reserve_one(server, request_id, channel, sku, units)
    assert response.outcome == RESERVED, response
    return str(response.reservation_id)


async def release(
    server: Stubs, reservation_id: str, *lines: types_pb2.LineQuantity
) -> types_pb2.Reservation:
    response: inventory_pb2.ReleaseResponse = await server.inventory.Release(
        inventory_pb2.ReleaseRequest(
            request_id=f"release-{reservation_id}-{len(lines)}",
            reservation_id=reservation_id,
            lines=lines,
        )
    )
    return response.reservation


async def fulfil(
    server: Stubs, reservation_id: str, *lines: types_pb2.LineQuantity
) -> types_pb2.Reservation:
    """Confirm, then fulfil the lines given (everything held when none)."""
    await server.inventory.Confirm(
        inventory_pb2.ConfirmRequest(
            request_id=f"confirm-{reservation_id}", reservation_id=reservation_id
        )
    )
    response: inventory_pb2.FulfillResponse = await server.inventory.Fulfill(
        inventory_pb2.FulfillRequest(
            request_id=f"fulfil-{reservation_id}-{len(lines)}",
            reservation_id=reservation_id,
            lines=lines,
        )
    )
    return response.reservation


def units_held(reservation: types_pb2.Reservation) -> int:
    return sum(line.quantity_held for line in reservation.lines)


def units_fulfilled(reservation: types_pb2.Reservation) -> int:
    return sum(line.quantity_fulfilled for line in reservation.lines)


# Crash test shoppers -------------------------------------------------------------------

# One attempt: a commit takes milliseconds; wait_for_ready covers a restart's gap.
RPC_TIMEOUT_S = 5.0
# Attempts per call; each waits at the gate first, so a server that is down does not
# use them up. A call still without an answer after this many fails the test.
ATTEMPTS_MAX = 10
# Holds outlive the test, so nothing expires on the real clock under the audit.
HOLD_TTL_S = 3_600

Answer = TypeVar("Answer")


class Acknowledged:
    """What the server acknowledged, reduced to what pools depend on."""

    def __init__(self) -> None:
        # Allocations in force: units set, less units fulfilled since.
        self.pools: dict[Key, int] = {}
        self.exclusive: dict[Key, bool] = {}
        # Reservation id -> (sku, channel, units still held).
        self.holds: dict[str, tuple[str, str, int]] = {}
        self.counts: collections.Counter[str] = collections.Counter()
        self.answers = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def set(self, *levels: admin_pb2.ChannelAllocation) -> None:
        for item in levels:
            key = (item.sku, item.channel)
            if item.quantity:
                self.pools[key] = item.quantity
                self.exclusive[key] = item.exclusive
            else:
                self.pools.pop(key, None)
                self.exclusive.pop(key, None)

    def held(self, reservation_id: str, sku: str, channel: str, units: int) -> None:
        if units:
            self.holds[reservation_id] = (sku, channel, units)
        else:
            self.holds.pop(reservation_id, None)

    def fulfilled(self, sku: str, channel: str, units: int) -> None:
        if (sku, channel) in self.pools:
            self.pools[(sku, channel)] -= units

    def expected(self) -> dict[Key, PoolView]:
        lent: collections.Counter[Key] = collections.Counter()
        for sku, channel, units in self.holds.values():
            lent[(sku, channel)] += units
        return {
            key: (units, max(0, units - lent[key]), self.exclusive[key])
            for key, units in self.pools.items()
        }

    def answered(self, kind: str) -> None:
        self.counts[kind] += 1
        self.answers += 1
        waiting = []
        for count, future in self._waiters:
            if self.answers >= count:
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((count, future))
        self._waiters = waiting

    async def wait_for_answers(self, count: int) -> None:
        if self.answers >= count:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((count, future))
        await future


class Shopper:
    def __init__(
        self,
        *,
        index: int,
        seed: int,
        stubs: Stubs,
        acknowledged: Acknowledged,
        gate: Gate,
        skus: tuple[str, ...],
        channels: tuple[str, ...],
        prefix: str,
    ) -> None:
        self._rng = random.Random(seed * 1_000 + index)
        self._name = f"{prefix}{index}"
        self._stubs = stubs
        self._acknowledged = acknowledged
        self._gate = gate
        self._skus = skus
        self._channels = channels
        self._stories = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._story()

    async def _call(self, kind: str, send: Callable[[], Awaitable[Answer]]) -> Answer:
        for _ in range(ATTEMPTS_MAX):
            await self._gate.wait_open()
            try:
                answer = await send()
            except grpc.aio.AioRpcError as error:
                if error.code() not in UNKNOWN_OUTCOME_CODES:
                    raise
                self._acknowledged.counts["retries"] += 1
                continue
            self._acknowledged.answered(kind)
            return answer
        raise AssertionError(
            f"{self._name}: no answer to {kind} in {ATTEMPTS_MAX} tries"
        )

    async def _story(self) -> None:
        self._stories += 1
        story_id = f"{self._name}-{self._stories}"
        sku, channel = self._rng.choice(self._skus), self._rng.choice(self._channels)
        request = one_line(
            f"{story_id}-reserve",
            channel,
            sku,
            self._rng.randint(1, 3),
            ttl_s=HOLD_TTL_S,
        )
        answer: inventory_pb2.ReserveResponse = await self._call(
            "reserve",
            lambda: self._stubs.inventory.Reserve(
                request, timeout=RPC_TIMEOUT_S, wait_for_ready=True
            ),
        )
        if answer.outcome != RESERVED:
            return
        reservation_id = str(answer.reservation_id)
        units = answer.lines[0].quantity_held
        self._acknowledged.held(reservation_id, sku, channel, units)

        ending = self._rng.choices(["keep", "release", "fulfil", "part"], [2, 3, 4, 2])
        if ending[0] == "release":
            after = await self._release(story_id, reservation_id)
            self._acknowledged.held(reservation_id, sku, channel, units_held(after))
        elif ending[0] in {"fulfil", "part"}:
            await self._confirm(story_id, reservation_id)
            first = answer.lines[0].held_at[0]
            lines = [taken(sku, first.location, 1)] if ending[0] == "part" else []
            after = await self._fulfil(story_id, reservation_id, lines)
            self._acknowledged.fulfilled(sku, channel, units_fulfilled(after))
            self._acknowledged.held(reservation_id, sku, channel, units_held(after))
            if ending[0] == "part" and units_held(after):
                after = await self._release(story_id, reservation_id)
                self._acknowledged.held(reservation_id, sku, channel, units_held(after))

    async def _confirm(self, story_id: str, reservation_id: str) -> None:
        request = inventory_pb2.ConfirmRequest(
            request_id=f"{story_id}-confirm", reservation_id=reservation_id
        )
        await self._call(
            "confirm",
            lambda: self._stubs.inventory.Confirm(
                request, timeout=RPC_TIMEOUT_S, wait_for_ready=True
            ),
        )

    async def _release(
        self, story_id: str, reservation_id: str
    ) -> types_pb2.Reservation:
        request = inventory_pb2.ReleaseRequest(
            request_id=f"{story_id}-release", reservation_id=reservation_id
        )
        answer: inventory_pb2.ReleaseResponse = await self._call(
            "release",
            lambda: self._stubs.inventory.Release(
                request, timeout=RPC_TIMEOUT_S, wait_for_ready=True
            ),
        )
        return answer.reservation

    async def _fulfil(
        self, story_id: str, reservation_id: str, lines: list[types_pb2.LineQuantity]
    ) -> types_pb2.Reservation:
        request = inventory_pb2.FulfillRequest(
            request_id=f"{story_id}-fulfil", reservation_id=reservation_id, lines=lines
        )
        answer: inventory_pb2.FulfillResponse = await self._call(
            "fulfil",
            lambda: self._stubs.inventory.Fulfill(
                request, timeout=RPC_TIMEOUT_S, wait_for_ready=True
            ),
        )
        return answer.reservation


# Allocations per location group --------------------------------------------------------

# (sku, channel, location_group): one allocation and its scope ("" for every location).
ScopedKey = tuple[str, str, str]


def scoped_level(
    sku: str, channel: str, quantity: int, *, group: str, exclusive: bool = False
) -> admin_pb2.ChannelAllocation:
    """An allocation whose holds and fence count only at `group`'s locations."""
    return admin_pb2.ChannelAllocation(
        sku=sku,
        channel=channel,
        quantity=quantity,
        exclusive=exclusive,
        location_group=group,
    )


async def scoped_pools(server: Stubs) -> dict[ScopedKey, PoolView]:
    """Every allocation in force by its scope, as (quantity, remaining, exclusive)."""
    return {
        (item.sku, item.channel, item.location_group): (
            item.quantity,
            item.remaining,
            item.exclusive,
        )
        for item in (await policies(server)).allocations
    }


async def set_group(server: Stubs, change_id: str, name: str, *locations: str) -> bool:
    """Define a location group (no locations: remove it); returns whether replayed."""
    response: admin_pb2.SetLocationGroupResponse = await server.admin.SetLocationGroup(
        admin_pb2.SetLocationGroupRequest(
            actor=ACTOR,
            change_id=change_id,
            group=admin_pb2.LocationGroup(name=name, locations=locations),
        )
    )
    return bool(response.replayed)


async def sku_views(
    server: Stubs, skus: list[str], channels: tuple[str, ...]
) -> list[list[inventory_pb2.SkuAvailability]]:
    """GetAvailability of `skus` as each channel ("" for none) sees them, without
    as_of, so that two readings of unchanged state compare equal."""
    views = []
    for channel in channels:
        response: inventory_pb2.GetAvailabilityResponse = (
            await server.inventory.GetAvailability(
                inventory_pb2.GetAvailabilityRequest(skus=skus, channel=channel)
            )
        )
        views.append(list(response.skus))
    return views
