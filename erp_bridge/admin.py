"""BridgeAdminService: a bridge process's status and its dead letters, over gRPC.

Every request is checked here, in full, before the store is touched: a refused request
changes nothing. Retries and discards must name an actor and a reason, and both are
logged at info with the ids that moved, because giving up a line the ERP refused (or
sending it again) changes the ERP's books and someone must answer for it.

Caller mistakes become INVALID_ARGUMENT and a failing Postgres becomes UNAVAILABLE,
each with a google.rpc.ErrorInfo whose reason a script can branch on. Anything else is
a bug and reaches gRPC as UNKNOWN, logged by grpc with its traceback.
"""

import asyncio
import base64
import binascii
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from erp_bridge.adapters import ErpLine, Feed
from erp_bridge.status import BreakerState, BridgeStatus, StreamState, StreamStatus
from erp_bridge.store import DEAD_LETTERS_PAGE_MAX, BridgeStore, DeadLetter
from erp_bridge.store import DeadLetterStatus as Status
from server.engine.errors import ensure
from server.wal.schema import DATABASE_ERRORS
from stockward.v1 import bridge_pb2, bridge_pb2_grpc

log = logging.getLogger(__name__)

# ErrorInfo.domain: the bridge answers for itself, apart from the server's
# "stockward.v1", so a reason is never mistaken for one of the server's.
ERROR_DOMAIN = "erp-bridge.stockward"

# A page an operator reads at a glance; a script asks for up to the store's maximum.
# Known shortcoming: nothing bounds the length of the ERP's messages, so a page of
# 1,000 letters whose messages average above about 4 KB exceeds a default gRPC
# client's 4 MB receive limit, and the client fails with RESOURCE_EXHAUSTED; smaller
# pages get through.
PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = DEAD_LETTERS_PAGE_MAX
# One retry or discard changes at most as many letters as one page shows, so an
# operator can list exactly what a single call is about to move.
IDS_MAX = DEAD_LETTERS_PAGE_MAX
# Long enough for an e-mail address or a service account name, short enough to keep
# the audit line readable.
ACTOR_CHARS_MAX = 64
# A sentence or two, or a ticket reference; a full incident report belongs elsewhere.
REASON_CHARS_MAX = 500
# The status snapshot reads the dead letter counts from Postgres; the store gives one
# statement this long, so a slower snapshot means the database is in trouble.
STATUS_TIMEOUT_S = 5.0
# Admin traffic is a few operators and a metrics scraper. Each RPC may hold a pool
# connection the streams need, so a client stuck in a loop is turned away early
# (RESOURCE_EXHAUSTED) instead of starving delivery.
ADMIN_CONCURRENT_RPCS_MAX = 8

# Listed when the request names no status: the letters an operator still has to act on.
OPEN_STATUSES = (Status.DEAD, Status.RETRYING)

_STATUSES = {
    Status.DEAD: bridge_pb2.DEAD_LETTER_STATUS_DEAD,
    Status.RETRYING: bridge_pb2.DEAD_LETTER_STATUS_RETRYING,
    Status.RESOLVED: bridge_pb2.DEAD_LETTER_STATUS_RESOLVED,
    Status.DISCARDED: bridge_pb2.DEAD_LETTER_STATUS_DISCARDED,
}
_STATUSES_BY_WIRE: dict[int, Status] = {w: s for s, w in _STATUSES.items()}
_STREAM_STATES = {
    StreamState.STANDBY: bridge_pb2.BRIDGE_STREAM_STATE_STANDBY,
    StreamState.IDLE: bridge_pb2.BRIDGE_STREAM_STATE_IDLE,
    StreamState.SENDING: bridge_pb2.BRIDGE_STREAM_STATE_SENDING,
    StreamState.WAITING: bridge_pb2.BRIDGE_STREAM_STATE_WAITING,
    StreamState.REFUSED: bridge_pb2.BRIDGE_STREAM_STATE_REFUSED,
}
_BREAKER_STATES = {
    BreakerState.CLOSED: bridge_pb2.BRIDGE_BREAKER_STATE_CLOSED,
    BreakerState.OPEN: bridge_pb2.BRIDGE_BREAKER_STATE_OPEN,
    BreakerState.HALF_OPEN: bridge_pb2.BRIDGE_BREAKER_STATE_HALF_OPEN,
}
# Keyed by the feed's text, which is how BridgeStatus carries it.
_FEEDS = {
    Feed.POSITIONS.value: bridge_pb2.BRIDGE_FEED_POSITIONS,
    Feed.LEDGER.value: bridge_pb2.BRIDGE_FEED_LEDGER,
}
# A state added to the bridge without a wire value would fail every status call.
ensure(set(_STATUSES) == set(Status), "a dead letter status has no wire value")
ensure(set(_STREAM_STATES) == set(StreamState), "a stream state has no wire value")
ensure(set(_BREAKER_STATES) == set(BreakerState), "a breaker state has no wire value")
ensure(set(_FEEDS) == {f.value for f in Feed}, "a feed has no wire value")

StatusProvider: TypeAlias = Callable[[], Awaitable[BridgeStatus]]
Request = TypeVar("Request")
Response = TypeVar("Response")
# grpc ships no type stubs, so its context is Any to mypy either way.
Context: TypeAlias = Any
Handler: TypeAlias = Callable[[Any, Request, Context], Awaitable[Response]]


class Refused(Exception):
    """A request the caller got wrong: INVALID_ARGUMENT with an UPPER_SNAKE reason."""

    def __init__(self, reason: str, message: str, *, field: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field


def _error_status(
    code: int, reason: str, message: str, *, field: str = ""
) -> status_pb2.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)
    if field:
        info.metadata["field"] = field
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(code=code, message=message, details=[detail])


def answered(handler: Handler[Request, Response]) -> Handler[Request, Response]:
    """Turn refusals and database failures into statuses with an ErrorInfo."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Request, context: Context) -> Response:
        log.debug("admin rpc: rpc=%s", handler.__name__)
        try:
            return await handler(self, request, context)
        except Refused as error:
            log.debug("admin rpc refused: rpc=%s reason=%s", handler.__name__, error)
            status = _error_status(
                code_pb2.INVALID_ARGUMENT,
                error.reason,
                error.message,
                field=error.field,
            )
        except DATABASE_ERRORS as error:
            log.warning("admin rpc failed: rpc=%s error=%r", handler.__name__, error)
            status = _error_status(
                code_pb2.UNAVAILABLE,
                "DATABASE_UNAVAILABLE",
                f"the bridge's database did not answer: {type(error).__name__}",
            )
        await context.abort_with_status(rpc_status.to_status(status))
        raise AssertionError("abort_with_status() returns only by raising")

    return wrapper


class BridgeAdminServicer(bridge_pb2_grpc.BridgeAdminServiceServicer):
    def __init__(self, store: BridgeStore, status: StatusProvider) -> None:
        self._store = store
        self._status = status

    @answered
    async def GetBridgeStatus(
        self, request: bridge_pb2.GetBridgeStatusRequest, context: Context
    ) -> bridge_pb2.GetBridgeStatusResponse:
        async with asyncio.timeout(STATUS_TIMEOUT_S):
            status = await self._status()
        return status_response(status)

    @answered
    async def ListDeadLetters(
        self, request: bridge_pb2.ListDeadLettersRequest, context: Context
    ) -> bridge_pb2.ListDeadLettersResponse:
        statuses = checked_statuses(request.statuses)
        page_size = checked_page_size(request.page_size)
        after_id = decode_page_token(request.page_token, statuses)

        letters = await self._store.list_dead_letters(
            statuses=statuses, after_id=after_id, limit=page_size
        )

        token = ""
        if len(letters) == page_size:
            token = encode_page_token(letters[-1].id, statuses)
        return bridge_pb2.ListDeadLettersResponse(
            dead_letters=[dead_letter_message(x) for x in letters],
            next_page_token=token,
        )

    @answered
    async def RetryDeadLetters(
        self, request: bridge_pb2.RetryDeadLettersRequest, context: Context
    ) -> bridge_pb2.RetryDeadLettersResponse:
        ids = checked_ids(request.ids)
        check_audit(actor=request.actor, reason=request.reason)

        moved = await self._audited(
            "retried", self._store.retry_dead_letters, ids, request
        )
        return bridge_pb2.RetryDeadLettersResponse(
            retried_ids=moved, not_dead_ids=sorted(set(ids) - set(moved))
        )

    @answered
    async def DiscardDeadLetters(
        self, request: bridge_pb2.DiscardDeadLettersRequest, context: Context
    ) -> bridge_pb2.DiscardDeadLettersResponse:
        ids = checked_ids(request.ids)
        check_audit(actor=request.actor, reason=request.reason)

        moved = await self._audited(
            "discarded", self._store.discard_dead_letters, ids, request
        )
        return bridge_pb2.DiscardDeadLettersResponse(
            discarded_ids=moved, not_dead_ids=sorted(set(ids) - set(moved))
        )

    async def _audited(
        self,
        verb: str,
        move: Callable[[Sequence[int]], Awaitable[list[int]]],
        ids: list[int],
        request: Any,
    ) -> list[int]:
        """Move the letters and leave an audit line either way. A database failure can
        hide a move that happened (the answer to the UPDATE lost on its way back), so
        a failed attempt is logged with its actor too."""
        try:
            moved = await move(ids)
        except DATABASE_ERRORS as error:
            log.warning(
                "dead letters not %s, outcome unknown: actor=%r ids=%s reason=%r "
                "error=%r",
                verb,
                request.actor,
                _id_list(ids),
                request.reason,
                error,
            )
            raise

        not_moved = sorted(set(ids) - set(moved))
        log.info(
            "dead letters %s: actor=%r ids=%s reason=%r not_dead=%s",
            verb,
            request.actor,
            _id_list(moved),
            request.reason,
            _id_list(not_moved),
        )
        return moved


async def serve_admin(
    servicer: BridgeAdminServicer, listen: str
) -> tuple[grpc.aio.Server, int]:
    """Start serving the admin service on `listen` ("host:port"; port 0 picks a free
    one). Returns the started server, for the caller to stop, and the bound port."""
    server = grpc.aio.server(
        maximum_concurrent_rpcs=ADMIN_CONCURRENT_RPCS_MAX,
        # Two bridges on one port would split operators' calls between them.
        options=[("grpc.so_reuseport", 0)],
    )
    bridge_pb2_grpc.add_BridgeAdminServiceServicer_to_server(servicer, server)
    service_name = bridge_pb2.DESCRIPTOR.services_by_name["BridgeAdminService"]
    reflection.enable_server_reflection(
        (service_name.full_name, reflection.SERVICE_NAME), server
    )
    port: int = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")

    await server.start()
    log.info("admin listening: address=%s port=%d", listen, port)
    return server, port


# Request checks. Each raises Refused naming the field and what was expected.


def checked_statuses(wire: Sequence[int]) -> tuple[Status, ...]:
    if not wire:
        return OPEN_STATUSES
    statuses: set[Status] = set()
    for value in wire:
        status = _STATUSES_BY_WIRE.get(value)
        if status is None:
            raise Refused(
                "STATUS_INVALID",
                f"statuses holds {value}; expected DEAD, RETRYING, RESOLVED or "
                "DISCARDED, or no status for DEAD and RETRYING",
                field="statuses",
            )
        statuses.add(status)
    return tuple(s for s in Status if s in statuses)


def checked_page_size(page_size: int) -> int:
    if page_size == 0:
        return PAGE_SIZE_DEFAULT
    if not 0 < page_size <= PAGE_SIZE_MAX:
        raise Refused(
            "PAGE_SIZE_OUT_OF_RANGE",
            f"page_size is {page_size}; expected 1 to {PAGE_SIZE_MAX}, or 0 for "
            f"{PAGE_SIZE_DEFAULT}",
            field="page_size",
        )
    return page_size


def checked_ids(ids: Sequence[int]) -> list[int]:
    """The distinct ids, ascending."""
    if not ids:
        raise Refused("IDS_EMPTY", "ids is empty; name 1 or more", field="ids")
    if len(ids) > IDS_MAX:
        raise Refused(
            "IDS_TOO_MANY",
            f"ids holds {len(ids)}; at most {IDS_MAX} per call",
            field="ids",
        )
    bad = [i for i in ids if i <= 0]
    if bad:
        raise Refused(
            "ID_INVALID",
            f"ids must be positive; got {_id_list(bad[:5])}",
            field="ids",
        )
    return sorted(set(ids))


def check_audit(*, actor: str, reason: str) -> None:
    _check_text("actor", actor, chars_max=ACTOR_CHARS_MAX, code="ACTOR_INVALID")
    _check_text("reason", reason, chars_max=REASON_CHARS_MAX, code="REASON_INVALID")


def _check_text(field: str, text: str, *, chars_max: int, code: str) -> None:
    # Printable only: the text goes into a log line, where a newline could forge
    # another entry.
    if not text.strip() or len(text) > chars_max or not text.isprintable():
        raise Refused(
            code,
            f"{field} must be 1 to {chars_max} printable characters, not blank; "
            f"got {len(text)} characters",
            field=field,
        )


# Page tokens: the id after which the next page starts, and the statuses listed, so
# that a token is not reused with another filter (it would silently skip letters).
# Base64 keeps them opaque; callers must not build them.


def encode_page_token(after_id: int, statuses: Sequence[Status]) -> str:
    text = f"{after_id}/{','.join(s.value for s in statuses)}"
    return base64.urlsafe_b64encode(text.encode()).decode()


def decode_page_token(token: str, statuses: Sequence[Status]) -> int:
    """The id to list after; 0 for the first page."""
    if not token:
        return 0
    try:
        after, _, listed = base64.urlsafe_b64decode(token).decode().partition("/")
        after_id = int(after)
    except (ValueError, binascii.Error, UnicodeDecodeError) as error:
        raise Refused(
            "PAGE_TOKEN_INVALID",
            "page_token was not issued by this service",
            field="page_token",
        ) from error

    if after_id <= 0 or listed != ",".join(s.value for s in statuses):
        raise Refused(
            "PAGE_TOKEN_INVALID",
            "page_token belongs to another listing; pass the same statuses as for "
            "the page that returned it",
            field="page_token",
        )
    return after_id


# Conversions to the wire.


def status_response(status: BridgeStatus) -> bridge_pb2.GetBridgeStatusResponse:
    counters = status.counters
    counts = status.dead_letters
    return bridge_pb2.GetBridgeStatusResponse(
        name=status.name,
        feed=_FEEDS.get(status.feed, bridge_pb2.BRIDGE_FEED_UNSPECIFIED),
        endpoint=status.endpoint,
        breaker=_BREAKER_STATES[status.breaker],
        streams=[_stream_message(s) for s in sorted(status.streams, key=_shard)],
        counters=bridge_pb2.BridgeCounters(
            batches=counters.batches,
            lines_in=counters.lines_in,
            lines_out=counters.lines_out,
            batches_empty=counters.batches_empty,
            requests=counters.requests,
            throttled=counters.throttled,
            retries=counters.retries,
            duplicates=counters.duplicates,
            lines_dead_lettered=counters.lines_dead_lettered,
            lines_refused_invalid=counters.lines_refused_invalid,
            netting_ratio=counters.netting_ratio,
        ),
        dead_letters=bridge_pb2.DeadLetterCounts(
            dead=counts.get(Status.DEAD.value, 0),
            retrying=counts.get(Status.RETRYING.value, 0),
            resolved=counts.get(Status.RESOLVED.value, 0),
            discarded=counts.get(Status.DISCARDED.value, 0),
        ),
        divergences=status.divergences,
        delivery_lag_p50_seconds=status.delivery_lag_p50_s,
        delivery_lag_p99_seconds=status.delivery_lag_p99_s,
        batches_per_second=status.batches_per_s,
        lines_per_second=status.lines_per_s,
    )


def _shard(stream: StreamStatus) -> int:
    return stream.shard


def _stream_message(stream: StreamStatus) -> bridge_pb2.BridgeStream:
    return bridge_pb2.BridgeStream(
        shard=stream.shard,
        state=_STREAM_STATES[stream.state],
        acked_seq=stream.acked_seq,
        acked_line=stream.acked_line,
        acked_batch_id=stream.acked_batch_id,
        head_seq=stream.head_seq,
        lag_records=stream.lag_records,
        lag_seconds=stream.lag_s,
        last_error=stream.last_error,
    )


def dead_letter_message(letter: DeadLetter) -> bridge_pb2.DeadLetter:
    message = bridge_pb2.DeadLetter(
        id=letter.id,
        shard=letter.shard,
        batch_id=letter.batch_id,
        line=_line_message(letter.line),
        reason=letter.reason,
        message=letter.message,
        attempts=letter.attempts,
        status=_STATUSES[letter.status],
        retry_batch_id=letter.retry_batch_id or "",
    )
    message.first_failed_at.FromMicroseconds(letter.first_failed_us)
    message.last_failed_at.FromMicroseconds(letter.last_failed_us)
    return message


def _line_message(line: ErpLine) -> bridge_pb2.ErpLine:
    return bridge_pb2.ErpLine(
        line_id=line.line_id,
        sku=line.sku,
        location=line.location,
        on_hand_delta=line.on_hand_delta,
        held_delta=line.held_delta,
        reservation_id=line.reservation_id,
        channel=line.channel,
        kind=line.kind,
    )


def _id_list(ids: Sequence[int]) -> str:
    return ",".join(str(i) for i in ids) or "-"
