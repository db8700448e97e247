"""Concurrent clients for crash tests: seeded random commands, every answer recorded.

Design note. Each client owns the reservations it created and sends one command at a
time, so the last answer it got for a reservation is that reservation's acknowledged
state. Every request has its own id. A call that fails with an unknown outcome waits
at the gate (closed while the server is down) and is sent again with the same id, a
bounded number of times; an answer to a retry counts as acknowledged. When no attempt
gets an answer the command is recorded as lost and its reservation is left alone.
"""

import asyncio
import dataclasses
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from stockward.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    inventory_pb2,
    inventory_pb2_grpc,
    types_pb2,
)
from tests.reliability.acknowledgements import (
    ACTIVE_STATES,
    CONFIRMED,
    PENDING,
    Acknowledgements,
    At,
    Change,
    Tracked,
)
from tests.reliability.rpc import (
    UNKNOWN_OUTCOME_CODES,
    UNKNOWN_OUTCOME_STATUS_CODES,
    reason_of,
    reason_of_status,
)

# One attempt: a commit takes milliseconds; wait_for_ready covers a restart's gap.
RPC_TIMEOUT_S = 5.0
# Attempts per command before its outcome is recorded as lost; each waits at the gate
# first, so a server that is down does not use them up.
ATTEMPTS_MAX = 8
# Callers that give up after one failed attempt, as some real ones do. Their commands
# stay unknown, so every run exercises what the audit allows for lost answers.
GIVE_UP_SHARE = 0.2
# The longest a client waits for the server to come back before giving up a command.
GATE_WAIT_S = 40.0
# Holds that expire while the test runs, and holds that outlive it.
SHORT_TTL_S = (2, 4)
SHORT_EXTEND_S = 8
LONG_TTL_S = 600
LONG_EXTEND_S = 900

Answer = TypeVar("Answer")

# What a client does next, with weights: mostly reservation traffic, some stock.
_STEPS = (
    ("reserve", 30),
    ("confirm", 15),
    ("release", 10),
    ("fulfill", 12),
    ("extend", 8),
    ("batch", 8),
    ("adjust", 7),
)

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclasses.dataclass(frozen=True, slots=True)
class Catalogue:
    skus: tuple[str, ...]
    locations: tuple[str, ...]

    @property
    def positions(self) -> list[At]:
        return [(sku, location) for sku in self.skus for location in self.locations]


class Gate:
    """Open while the server is up. Closed before a kill, opened once SERVING again.

    `epoch` counts closings, so a caller can tell whether the server stayed up for the
    whole of a call.
    """

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self.epoch = 0

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    def close(self) -> None:
        self._open.clear()
        self.epoch += 1

    def open(self) -> None:
        self._open.set()

    async def wait_open(self) -> None:
        async with asyncio.timeout(GATE_WAIT_S):
            await self._open.wait()


@dataclasses.dataclass(slots=True)
class _BatchItem:
    command: inventory_pb2.Command
    reservation_id: str = ""
    change: Change | None = None
    is_short: bool = False


class Client:
    def __init__(
        self,
        *,
        index: int,
        seed: int,
        channel: grpc.aio.Channel,
        acks: Acknowledgements,
        gate: Gate,
        stop: asyncio.Event,
        catalogue: Catalogue,
    ) -> None:
        self.index = index
        self._stop = stop
        self._rng = random.Random(seed * 1_000 + index)
        self._inventory = inventory_pb2_grpc.InventoryServiceStub(channel)
        self._admin = admin_pb2_grpc.StockAdminServiceStub(channel)
        self._acks = acks
        self._gate = gate
        self._catalogue = catalogue
        self._mine: list[str] = []
        self._sent = 0

    async def run(self, *, commands_max: int) -> None:
        for _ in range(commands_max):
            if self._stop.is_set():
                return
            await self._step()

    async def _step(self) -> None:
        kinds, weights = zip(*_STEPS, strict=True)
        kind = self._rng.choices(kinds, weights)[0]
        if kind == "batch":
            await self._batch()
        elif kind == "adjust":
            await self._adjust()
        elif kind == "reserve":
            await self._reserve()
        else:
            await self._change_one(kind)

    def _next_id(self) -> str:
        self._sent += 1
        return f"c{self.index}-{self._sent}"

    # Calls ------------------------------------------------------------------------------

    async def _call(
        self, send: Callable[[], Awaitable[Answer]]
    ) -> Answer | grpc.aio.AioRpcError | None:
        """The answer, a definite refusal, or None when the outcome stays unknown."""
        for attempt in range(self._attempts_max()):
            if not await self._may_send(attempt):
                return None
            epoch = self._gate.epoch
            try:
                return await send()
            except grpc.aio.AioRpcError as error:
                if error.code() not in UNKNOWN_OUTCOME_CODES:
                    return error
                self._failed_attempt(error.code(), epoch)
        return None

    def _attempts_max(self) -> int:
        return 1 if self._rng.random() < GIVE_UP_SHARE else ATTEMPTS_MAX

    async def _may_send(self, attempt: int) -> bool:
        """Wait for the server to be up. False when it stays down, or for a retry once
        the load is over (that command's outcome then stays unknown)."""
        if self._stop.is_set() and attempt > 0:
            return False
        try:
            await self._gate.wait_open()
        except TimeoutError:
            return False
        return True

    def _failed_attempt(self, code: grpc.StatusCode, epoch: int) -> None:
        self._acks.counts["retries"] += 1
        if (
            code == grpc.StatusCode.DEADLINE_EXCEEDED
            and self._gate.is_open
            and self._gate.epoch == epoch
        ):
            # Nobody touched the server during the call: it was SERVING and silent.
            self._acks.violation(
                f"client {self.index}: no answer within {RPC_TIMEOUT_S}s "
                "while the server was up"
            )

    def _refused(self, kind: str, code: grpc.StatusCode, reason: str) -> None:
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            self._acks.refused(kind, reason)
            return
        # Every request here is well formed and names an acknowledged reservation, so
        # any other refusal means the server lost or mixed up something it promised.
        self._acks.violation(f"client {self.index}: {kind} refused {code} {reason}")

    # Reserve ----------------------------------------------------------------------------

    def _reserve_request(self) -> tuple[inventory_pb2.ReserveRequest, bool]:
        rng = self._rng
        is_short = rng.random() < 0.35
        lines = []
        for sku in rng.sample(self._catalogue.skus, rng.randint(1, 3)):
            line = inventory_pb2.ReserveLine(sku=sku, quantity=rng.randint(1, 4))
            if rng.random() < 0.7:
                line.location = rng.choice(self._catalogue.locations)
            else:
                line.locations.extend(
                    rng.sample(
                        self._catalogue.locations, len(self._catalogue.locations)
                    )
                )
                line.allow_split = rng.random() < 0.5
            lines.append(line)
        request = inventory_pb2.ReserveRequest(
            request_id=self._next_id(),
            channel=f"ch{self.index % 4}",
            order_ref=f"order-{self.index}-{self._sent}",
            lines=lines,
            ttl_seconds=rng.randint(*SHORT_TTL_S) if is_short else LONG_TTL_S,
            allow_partial=rng.random() < 0.2,
        )
        return request, is_short

    async def _reserve(self) -> None:
        request, is_short = self._reserve_request()
        answer = await self._call(
            lambda: self._inventory.Reserve(
                request, timeout=RPC_TIMEOUT_S, wait_for_ready=True
            )
        )
        if answer is None:
            self._acks.counts["reserve lost"] += 1
            self._acks.lost_reserves.append(request)
        elif isinstance(answer, grpc.aio.AioRpcError):
            self._refused("reserve", answer.code(), reason_of(answer))
        else:
            self._record_reserve(answer, is_short=is_short)

    def _record_reserve(
        self, response: inventory_pb2.ReserveResponse, *, is_short: bool
    ) -> None:
        self._acks.reserved(response, owner=self.index, is_short=is_short)
        if response.reservation_id:
            self._mine.append(response.reservation_id)

    # Confirm, release, fulfil, extend ---------------------------------------------------

    def _eligible(self, kind: str) -> list[str]:
        states = {
            "confirm": {PENDING},
            "extend": {PENDING},
            "fulfill": {CONFIRMED},
            "release": ACTIVE_STATES,
        }[kind]
        self._mine = [rid for rid in self._mine if self._is_workable(rid)]
        return [
            rid
            for rid in self._mine
            if self._acks.reservations[rid].acked.state in states
        ]

    def _is_workable(self, reservation_id: str) -> bool:
        tracked = self._acks.reservations[reservation_id]
        return tracked.lost is None and tracked.acked.state in ACTIVE_STATES

    def _change_for(self, kind: str, tracked: Tracked) -> Change:
        if kind in {"confirm", "extend"} or self._rng.random() < 0.5:
            return Change(kind)
        held = [line for line in tracked.acked.lines if line.held > 0]
        line = self._rng.choice(held)
        quantity = self._rng.randint(1, line.held)
        return Change(kind, ((line.sku, line.location, quantity),))

    def _change_request(
        self, reservation_id: str, change: Change, tracked: Tracked
    ) -> Any:
        request_id = self._next_id()
        if change.kind == "confirm":
            return inventory_pb2.ConfirmRequest(
                request_id=request_id, reservation_id=reservation_id
            )
        if change.kind == "extend":
            return inventory_pb2.ExtendRequest(
                request_id=request_id,
                reservation_id=reservation_id,
                ttl_seconds=SHORT_EXTEND_S if tracked.is_short else LONG_EXTEND_S,
            )
        lines = [
            types_pb2.LineQuantity(sku=sku, location=location, quantity=quantity)
            for sku, location, quantity in change.lines
        ]
        message = (
            inventory_pb2.ReleaseRequest
            if change.kind == "release"
            else inventory_pb2.FulfillRequest
        )
        return message(
            request_id=request_id, reservation_id=reservation_id, lines=lines
        )

    async def _change_one(self, kind: str) -> None:
        eligible = self._eligible(kind)
        if not eligible:
            await self._reserve()
            return
        reservation_id = self._rng.choice(eligible)
        tracked = self._acks.reservations[reservation_id]
        change = self._change_for(kind, tracked)
        request = self._change_request(reservation_id, change, tracked)
        method = getattr(self._inventory, kind.capitalize())
        answer = await self._call(
            lambda: method(request, timeout=RPC_TIMEOUT_S, wait_for_ready=True)
        )
        if answer is None:
            self._acks.change_lost(reservation_id, change)
        elif isinstance(answer, grpc.aio.AioRpcError):
            self._refused(kind, answer.code(), reason_of(answer))
            if answer.code() == grpc.StatusCode.NOT_FOUND:
                # Already a violation; the audit reports it once more, leave it alone.
                self._acks.change_lost(reservation_id, change)
        else:
            self._acks.changed(reservation_id, answer.reservation, kind=kind)

    # ExecuteBatch -----------------------------------------------------------------------

    def _batch_items(self) -> list[_BatchItem]:
        items: list[_BatchItem] = []
        used: set[str] = set()
        for _ in range(self._rng.randint(2, 5)):
            kind = self._rng.choice(("reserve", "confirm", "release", "fulfill"))
            eligible = []
            if kind != "reserve":
                eligible = [rid for rid in self._eligible(kind) if rid not in used]
            if not eligible:
                request, is_short = self._reserve_request()
                command = inventory_pb2.Command(reserve=request)
                items.append(_BatchItem(command, is_short=is_short))
                continue
            reservation_id = self._rng.choice(eligible)
            used.add(reservation_id)
            tracked = self._acks.reservations[reservation_id]
            change = self._change_for(kind, tracked)
            command = inventory_pb2.Command()
            request = self._change_request(reservation_id, change, tracked)
            getattr(command, kind).CopyFrom(request)
            items.append(_BatchItem(command, reservation_id, change))
        return items

    async def _batch(self) -> None:
        pending = self._batch_items()
        for attempt in range(self._attempts_max()):
            if not await self._may_send(attempt):
                break
            request = inventory_pb2.ExecuteBatchRequest(
                commands=[item.command for item in pending]
            )
            epoch = self._gate.epoch
            try:
                response = await self._inventory.ExecuteBatch(
                    request, timeout=RPC_TIMEOUT_S, wait_for_ready=True
                )
            except grpc.aio.AioRpcError as error:
                if error.code() in UNKNOWN_OUTCOME_CODES:
                    self._failed_attempt(error.code(), epoch)
                    continue
                self._refused("batch", error.code(), reason_of(error))
                return
            pending = self._record_batch(pending, response)
            if not pending:
                return
        for item in pending:
            self._batch_item_lost(item)

    def _record_batch(
        self, items: list[_BatchItem], response: inventory_pb2.ExecuteBatchResponse
    ) -> list[_BatchItem]:
        """Record each answered command; returns those whose outcome is unknown."""
        unknown = []
        for item, result in zip(items, response.results, strict=True):
            kind = item.command.WhichOneof("command")
            assert kind is not None
            answered = result.WhichOneof("result")
            if answered == "error":
                if result.error.code in UNKNOWN_OUTCOME_STATUS_CODES:
                    unknown.append(item)
                    continue
                code = _STATUS_CODES[result.error.code]
                self._refused(kind, code, reason_of_status(result.error))
            elif answered == "reserve":
                self._record_reserve(result.reserve, is_short=item.is_short)
            else:
                reservation = getattr(result, kind).reservation
                self._acks.changed(item.reservation_id, reservation, kind=kind)
        return unknown

    def _batch_item_lost(self, item: _BatchItem) -> None:
        if item.change is None:
            self._acks.counts["reserve lost"] += 1
            self._acks.lost_reserves.append(item.command.reserve)
        else:
            self._acks.change_lost(item.reservation_id, item.change)

    # Stock ------------------------------------------------------------------------------

    async def _adjust(self) -> None:
        positions = self._rng.sample(self._catalogue.positions, self._rng.randint(1, 2))
        # Receipts only: on-hand then never drops below what is held, so the audit can
        # insist that held never exceeds on-hand.
        request = admin_pb2.AdjustStockRequest(
            source=f"wms-{self.index}",
            source_event_id=self._next_id(),
            adjustments=[
                admin_pb2.StockAdjustment(
                    sku=sku,
                    location=location,
                    delta=self._rng.randint(1, 12),
                    reason=admin_pb2.ADJUSTMENT_REASON_RECEIPT,
                )
                for sku, location in positions
            ],
        )
        answer = await self._call(
            lambda: self._admin.AdjustStock(
                request, timeout=RPC_TIMEOUT_S, wait_for_ready=True
            )
        )
        if answer is None:
            self._acks.counts["adjust lost"] += 1
            self._acks.lost_adjustments.append(request)
        elif isinstance(answer, grpc.aio.AioRpcError):
            self._refused("adjust", answer.code(), reason_of(answer))
        else:
            self._acks.adjusted_stock(request)
