"""What every baseline shares: flags, serving, health, shutdown, request checks and
the answers built from them.

Design note. A baseline is a Baseline object (open its store, register its RPCs,
close) handed to main(), which owns the process: it serves gRPC on uvloop, says
SERVING on the standard health service once the store is open, and on SIGTERM or
SIGINT says NOT_SERVING, lets in-flight RPCs finish, closes the store and returns, so
the process exits 0. The stateful baselines check requests with stockward's own
checks (server/engine/commands.py) and limits, so they refuse what stockward refuses
and pay the same for checking; the noop baseline checks nothing. Failures reach the
caller as a status with a google.rpc.ErrorInfo in domain "stockward.v1", as
stockward's do.

What a baseline does not do, whatever its store: no idempotent replay (a retried
request_id reserves again), no expiry (expires_at stays unset), no sourcing (a line
must name one `location`), no partial holds, and no distinction between an unknown
sku and one that is out of stock (both are SHORT_REASON_INSUFFICIENT_STOCK).
"""

import argparse
import asyncio
import dataclasses
import functools
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeAlias, TypeVar

import grpc
import uvloop
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server.api.errors import ERROR_DOMAIN, abort, status_of
from server.engine.commands import check_count, check_id
from server.engine.errors import EngineError, InvalidArgument
from server.engine.limits import Limits
from stockward.v1 import admin_pb2, inventory_pb2

log = logging.getLogger(__name__)

# stockward's limits, so that no system gets a request another would refuse.
LIMITS = Limits()

# A port of its own per baseline, clear of stockward's default 50051.
LISTEN_DEFAULT = "127.0.0.1:50061"
# stockward's own default (server/config.py): every system sheds load at the same
# depth, so none looks faster by queueing more requests than the others would.
MAX_CONCURRENT_RPCS = 2_000
# A baseline's RPCs are milliseconds long; five seconds lets the last ones finish
# without holding up the benchmark run that stops it.
SHUTDOWN_GRACE_S = 5.0

INVENTORY_SERVICE = inventory_pb2.DESCRIPTOR.services_by_name["InventoryService"]
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["StockAdminService"]
SERVICE_NAMES = (INVENTORY_SERVICE.full_name, ADMIN_SERVICE.full_name)

# (sku, location): one stock position.
Position: TypeAlias = tuple[str, str]

Request = TypeVar("Request")
Response = TypeVar("Response")
# grpc ships no type stubs, so its context is Any to mypy either way.
Context: TypeAlias = Any
Handler: TypeAlias = Callable[[Any, Request, Context], Awaitable[Response]]


class Baseline(Protocol):
    async def open(self) -> None:
        """Connect to the store and prepare it; the process serves only after this."""

    def add_services(self, server: grpc.aio.Server) -> None:
        """Register the RPCs it runs, with add_rpcs()."""

    async def close(self) -> None:
        """Release the store, also after a failed open(); drop what the baseline made
        there if asked to."""


@dataclasses.dataclass(frozen=True, slots=True)
class Line:
    """One checked line of a Reserve."""

    index: int
    sku: str
    location: str
    quantity: int


# Serving -------------------------------------------------------------------------------


def argument_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the flags every baseline takes; each adds its own store's."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--listen",
        default=LISTEN_DEFAULT,
        help=f"host:port to serve gRPC on (default {LISTEN_DEFAULT})",
    )
    return parser


def main(baseline: Baseline, *, listen: str) -> None:
    """Serve until SIGTERM or SIGINT, then return (exit status 0)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvloop.run(serve(baseline, listen=listen))


async def serve(baseline: Baseline, *, listen: str) -> None:
    # Handlers first: a SIGTERM while the store opens must still end the process
    # through the graceful path, not by the default action.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    try:
        await baseline.open()
        await _serve_until(baseline, listen=listen, stop=stop)
    finally:
        await baseline.close()
    log.info("stopped")


async def _serve_until(baseline: Baseline, *, listen: str, stop: asyncio.Event) -> None:
    server = grpc.aio.server(
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        # Refuse a port someone else listens on instead of sharing it with them.
        options=[("grpc.so_reuseport", 0)],
    )
    baseline.add_services(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")

    await server.start()
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving: address=%s port=%d", listen, port)

    await stop.wait()
    log.info("stopping: grace_s=%.1f", SHUTDOWN_GRACE_S)
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(SHUTDOWN_GRACE_S)


def add_rpcs(
    server: grpc.aio.Server,
    service: ServiceDescriptor,
    handlers: Mapping[str, Callable[[Any, Context], Awaitable[Any]]],
) -> None:
    """Serve these methods of `service`, named as in the .proto, the way generated
    code registers them (gRPC's fast path for known methods, as stockward gets).

    Methods not given get UNIMPLEMENTED from gRPC itself. The generated servicer
    classes would answer the same, but from a worker thread and with an error
    logged per call, which a benchmark that probes them does not need.
    """
    method_handlers = {}
    for name, handler in handlers.items():
        method = service.methods_by_name[name]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        method_handlers[name] = grpc.unary_unary_rpc_method_handler(
            handler,
            request_deserializer=request_class.FromString,
            response_serializer=response_class.SerializeToString,
        )
    generic = grpc.method_handlers_generic_handler(service.full_name, method_handlers)
    server.add_generic_rpc_handlers((generic,))
    server.add_registered_method_handlers(service.full_name, method_handlers)


async def _set_health(servicer: Any, status: int) -> None:
    for name in ("", *SERVICE_NAMES):
        await servicer.set(name, status)


def answering(handler: Handler[Request, Response]) -> Handler[Request, Response]:
    """Turn a refusal (EngineError) raised by a handler into its gRPC status."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Request, context: Context) -> Response:
        try:
            return await handler(self, request, context)
        except EngineError as error:
            log.debug("rpc refused: rpc=%s reason=%s", handler.__name__, error.reason)
            await abort(context, status_of(error))
        raise AssertionError("abort() returns only by raising")

    return wrapper


# Requests ------------------------------------------------------------------------------


def reserve_lines(request: inventory_pb2.ReserveRequest) -> tuple[Line, ...]:
    """The request's lines, checked as stockward checks them, or InvalidArgument.

    A baseline holds at one named location per line, all lines or none.
    """
    if request.allow_partial:
        raise _unsupported("allow_partial", "partial holds")
    check_count(
        len(request.lines), field="lines", count_max=LIMITS.lines_per_reservation_max
    )
    return tuple(_reserve_line(index, line) for index, line in enumerate(request.lines))


def _reserve_line(index: int, line: inventory_pb2.ReserveLine) -> Line:
    field = f"lines[{index}]"
    if line.locations or line.allow_split:
        raise _unsupported(f"{field}.locations", "location preference lists")
    check_id(line.sku, field=f"{field}.sku", length_max=LIMITS.sku_length_max)
    check_id(
        line.location,
        field=f"{field}.location",
        length_max=LIMITS.location_length_max,
    )
    if not 1 <= line.quantity <= LIMITS.quantity_max:
        raise InvalidArgument(
            "QUANTITY_OUT_OF_RANGE",
            f"{field}.quantity is {line.quantity}; it must be from 1 to "
            f"{LIMITS.quantity_max}",
            field=f"{field}.quantity",
        )
    return Line(index, line.sku, line.location, line.quantity)


def _unsupported(field: str, what: str) -> InvalidArgument:
    return InvalidArgument(
        "UNSUPPORTED_BY_BASELINE", f"this baseline does not do {what}", field=field
    )


def unchecked_lines(request: inventory_pb2.ReserveRequest) -> tuple[Line, ...]:
    """The lines as sent, for a baseline that checks nothing."""
    return tuple(
        Line(index, line.sku, line.location, line.quantity)
        for index, line in enumerate(request.lines)
    )


def wanted(lines: Sequence[Line]) -> dict[Position, int]:
    """Units wanted per position, summed over lines that name the same one, in
    position order. Holding in one fixed order keeps two concurrent multi-line holds
    from waiting on each other's rows (a deadlock) in a store that locks rows."""
    totals: dict[Position, int] = {}
    for line in lines:
        position = (line.sku, line.location)
        totals[position] = totals.get(position, 0) + line.quantity
    return dict(sorted(totals.items()))


def on_hand_counts(
    request: admin_pb2.SetOnHandRequest,
) -> dict[Position, int]:
    """The absolute counts, checked as stockward checks them, in position order."""
    check_count(
        len(request.counts),
        field="counts",
        count_max=LIMITS.adjustments_per_request_max,
    )
    counts: dict[Position, int] = {}
    for index, count in enumerate(request.counts):
        field = f"counts[{index}]"
        check_id(count.sku, field=f"{field}.sku", length_max=LIMITS.sku_length_max)
        check_id(
            count.location,
            field=f"{field}.location",
            length_max=LIMITS.location_length_max,
        )
        if not 0 <= count.on_hand <= LIMITS.on_hand_max:
            raise InvalidArgument(
                "ON_HAND_OUT_OF_RANGE",
                f"{field}.on_hand is {count.on_hand}; it must be from 0 to "
                f"{LIMITS.on_hand_max}",
                field=f"{field}.on_hand",
            )
        if (count.sku, count.location) in counts:
            raise InvalidArgument(
                "DUPLICATE_POSITION",
                f"{field} counts {count.sku}@{count.location} a second time",
                field=field,
            )
        counts[(count.sku, count.location)] = count.on_hand
    return dict(sorted(counts.items()))


BatchItem: TypeAlias = tuple[Line, ...] | inventory_pb2.CommandResult


def batch_items(request: inventory_pb2.ExecuteBatchRequest) -> list[BatchItem]:
    """Per command, in order: a reserve's checked lines, or the result the command
    gets without touching the store (its refusal, or UNIMPLEMENTED)."""
    check_count(
        len(request.commands),
        field="commands",
        count_max=LIMITS.commands_per_batch_max,
    )
    items: list[BatchItem] = []
    for command in request.commands:
        kind = command.WhichOneof("command")
        if kind != "reserve":
            items.append(unimplemented_result(str(kind)))
            continue
        try:
            items.append(reserve_lines(command.reserve))
        except EngineError as error:
            items.append(inventory_pb2.CommandResult(error=status_of(error)))
    return items


def unimplemented_result(kind: str) -> inventory_pb2.CommandResult:
    """A batch command of a kind (confirm, release...) no baseline runs."""
    info = error_details_pb2.ErrorInfo(
        reason="UNSUPPORTED_BY_BASELINE", domain=ERROR_DOMAIN
    )
    status = status_pb2.Status(
        code=code_pb2.UNIMPLEMENTED,
        message=f"this baseline runs reserve commands only, not {kind}",
    )
    status.details.add().Pack(info)
    return inventory_pb2.CommandResult(error=status)


# Answers -------------------------------------------------------------------------------


def reserved(
    lines: Sequence[Line], reservation_id: str
) -> inventory_pb2.ReserveResponse:
    return inventory_pb2.ReserveResponse(
        reservation_id=reservation_id,
        outcome=inventory_pb2.RESERVE_OUTCOME_RESERVED,
        lines=[
            inventory_pb2.ReserveLineResult(
                line_index=line.index,
                sku=line.sku,
                quantity_requested=line.quantity,
                quantity_held=line.quantity,
                held_at=[
                    inventory_pb2.LocationQuantity(
                        location=line.location, quantity=line.quantity
                    )
                ],
            )
            for line in lines
        ],
    )


def rejected(
    lines: Sequence[Line], available: Mapping[Position, int]
) -> inventory_pb2.ReserveResponse:
    """All or nothing came out as nothing. `available` is what each position had
    before this request (missing: never stocked, so 0). A line is short when its
    position cannot cover every line that names it; the others fitted."""
    want = wanted(lines)
    results = []
    for line in lines:
        position = (line.sku, line.location)
        has = max(0, available.get(position, 0))
        is_short = want[position] > has
        results.append(
            inventory_pb2.ReserveLineResult(
                line_index=line.index,
                sku=line.sku,
                quantity_requested=line.quantity,
                short_reason=(
                    inventory_pb2.SHORT_REASON_INSUFFICIENT_STOCK
                    if is_short
                    else inventory_pb2.SHORT_REASON_OTHER_LINE_SHORT
                ),
                quantity_available=has,
            )
        )
    return inventory_pb2.ReserveResponse(
        outcome=inventory_pb2.RESERVE_OUTCOME_REJECTED, lines=results
    )


def positions_response(
    rows: Sequence[tuple[str, str, int, int]],
) -> admin_pb2.SetOnHandResponse:
    """From (sku, location, on_hand, held) as they stand after the request."""
    return admin_pb2.SetOnHandResponse(
        positions=[
            admin_pb2.PositionSnapshot(
                sku=sku,
                location=location,
                on_hand=on_hand,
                held=held,
                available_to_sell=max(0, on_hand - held),
            )
            for sku, location, on_hand, held in rows
        ]
    )


# Baselines with a store ----------------------------------------------------------------


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def set_on_hand(
        self, counts: Mapping[Position, int]
    ) -> list[tuple[str, str, int, int]]: ...


class StoreAdmin:
    """SetOnHand, the one admin RPC a baseline serves, for any store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    @answering
    async def SetOnHand(
        self, request: admin_pb2.SetOnHandRequest, context: Context
    ) -> admin_pb2.SetOnHandResponse:
        rows = await self._store.set_on_hand(on_hand_counts(request))
        return positions_response(rows)


class StoreBaseline:
    """A baseline made of a store and the inventory RPCs that use it (by name)."""

    def __init__(
        self,
        store: Store,
        inventory: Mapping[str, Callable[[Any, Context], Awaitable[Any]]],
    ) -> None:
        self._store = store
        self._inventory = inventory

    async def open(self) -> None:
        await self._store.open()

    def add_services(self, server: grpc.aio.Server) -> None:
        add_rpcs(server, INVENTORY_SERVICE, self._inventory)
        admin = StoreAdmin(self._store)
        add_rpcs(server, ADMIN_SERVICE, {"SetOnHand": admin.SetOnHand})

    async def close(self) -> None:
        await self._store.close()
