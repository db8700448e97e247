"""The ERP over HTTP: one batch per POST, every answer turned into an adapter outcome.

Design note. The adapter sends `{"batch_id", "stream", "feed", "lines": [...]}` to
`{url}/v1/batches`, the contract the ERP simulator also speaks, and believes a 200
only after checking it against the batch it sent: the same batch id, a count of
applied lines that adds up, and rejections that name lines of this batch. An answer
that fails those checks may still mean the ERP booked the batch, so it is reported
as Transient: the ERP dedupes by batch id, which makes the resend harmless.

Statuses map to outcomes in one place (`_outcome`). Those that say the request's own
content is unacceptable (400, 413, 422) and those that say we are not let in (401,
403) refuse the batch; 409 is a conflict and 429 a throttle. Every other status,
5xx but also 3xx, 404 and 405, is Transient. Those say nothing about the batch: they
come from a wrong URL or a proxy in the middle of a deployment, and refusing would
dead-letter good lines for a fault in the configuration, while a Transient keeps the
batch in order, and the bridge's backoff and circuit breaker show the status until
someone fixes the endpoint.

A field mapping renames our keys for ERPs that name them otherwise, in the body sent
and in the answer read back (the batch id, and the line ids of rejections, which are
the ids we sent). The keys of the error envelope, `{"error": {"code", "message",
"field"}}`, are not renamed; an ERP with another envelope still gets its statuses
translated, only the culprit line of a 400 is then unknown.

Known shortcomings: proxies are not taken from the environment (trust_env is off, so
that no variable silently reroutes stock data), so an ERP behind a forward proxy
cannot be reached yet; and HTTP/1.1 only, as aiohttp speaks no HTTP/2.
"""

import asyncio
import dataclasses
import email.utils
import logging
import re
from collections.abc import Mapping

import aiohttp
import orjson
import yarl

from erp_bridge.adapters import (
    Acknowledgement,
    BatchConflict,
    BatchRefused,
    ErpBatch,
    ErpLine,
    LineRejection,
    Throttled,
    Transient,
)
from server.clock import US_PER_S, Clock, SystemClock

logger = logging.getLogger(__name__)

# The bridge sends one batch per stream at a time and an ERP typically admits a
# handful of requests at once (the bridge's own default is 4); 8 leaves room for a
# probe beside them while keeping a bug from opening hundreds of sockets to the ERP.
CONNECTIONS_MAX = 8
# A TCP and TLS handshake on a working network takes well under a second; beyond 5 s
# the ERP is not reachable, whatever budget the send has left.
CONNECT_TIMEOUT_S = 5.0
# Backstop for a request made without a budget, which send() never does.
REQUEST_TIMEOUT_S_MAX = 120.0
# Idle connections are dropped before the 15 s after which many servers and proxies
# close them, so that a batch is rarely written into a socket the peer is closing.
KEEPALIVE_TIMEOUT_S = 10.0
# An answer carries at most one rejection per line, each well under 1 KiB; 4 MiB
# covers a few thousand lines, far above the batch sizes ERPs accept.
ANSWER_BYTES_MAX = 4 * 1024 * 1024
# Reads of the answer body, small enough to stop soon after the size limit.
READ_CHUNK_BYTES = 64 * 1024
# A 429 with no usable Retry-After: wait about as long as a one-second rate window.
RETRY_AFTER_DEFAULT_S = 1.0
# A Retry-After far in the future is more likely a misconfigured ERP than a plan;
# five minutes bounds how long one answer can hold the feed still.
RETRY_AFTER_MAX_S = 300.0
# Delta-seconds with more digits than this exceed the cap anyway; parsing stops there.
RETRY_AFTER_DIGITS_MAX = 9
# How much of an unexpected body goes into an error message.
EXCERPT_CHARS_MAX = 200

# Our names for the keys of the contract, by the object they appear in; a field
# mapping may rename any of them.
BATCH_KEYS = ("batch_id", "stream", "feed", "lines")
LINE_KEYS = (
    "line_id",
    "sku",
    "location",
    "on_hand_delta",
    "held_delta",
    "reservation_id",
    "channel",
    "kind",
)
ANSWER_KEYS = ("batch_id", "status", "applied_lines", "rejected")
REJECTION_KEYS = ("line_id", "reason", "message")
ANSWER_STATUSES = {"applied": False, "duplicate": True}

# Statuses that say the content of the request is unacceptable as it stands.
_REFUSED_STATUSES = (400, 413, 422)
_AUTH_STATUSES = (401, 403)


def line_fields(line: ErpLine) -> dict[str, object]:
    """One line as the ERP contract names its fields, in the contract's order."""
    return {
        "line_id": line.line_id,
        "sku": line.sku,
        "location": line.location,
        "on_hand_delta": line.on_hand_delta,
        "held_delta": line.held_delta,
        "reservation_id": line.reservation_id,
        "channel": line.channel,
        "kind": line.kind,
    }


def field_names(mapping: Mapping[str, str] | None) -> dict[str, str]:
    """Every key of the contract with the name the ERP uses for it.

    Raises ValueError for a mapping that renames an unknown key, or that would give
    two keys of one object the same name.
    """
    mapping = dict(mapping or {})
    known = {*BATCH_KEYS, *LINE_KEYS, *ANSWER_KEYS, *REJECTION_KEYS}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ValueError(f"field mapping renames unknown keys {unknown}")
    for ours, theirs in mapping.items():
        if not isinstance(theirs, str) or not theirs:
            raise ValueError(f"field mapping must give {ours} a non-empty name")

    names = {key: mapping.get(key, key) for key in sorted(known)}
    for keys in (BATCH_KEYS, LINE_KEYS, ANSWER_KEYS, REJECTION_KEYS):
        renamed = [names[key] for key in keys]
        if len(set(renamed)) != len(renamed):
            raise ValueError(f"field mapping gives two of {keys} one name: {renamed}")
    return names


def retry_after_s(value: str | None, *, now_us: int) -> float:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP-date), capped
    at RETRY_AFTER_MAX_S; RETRY_AFTER_DEFAULT_S when it is missing or unreadable."""
    if value is None:
        return RETRY_AFTER_DEFAULT_S
    value = value.strip()

    if re.fullmatch(r"[0-9]+", value):
        if len(value) > RETRY_AFTER_DIGITS_MAX:
            return RETRY_AFTER_MAX_S
        return min(float(value), RETRY_AFTER_MAX_S)

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return RETRY_AFTER_DEFAULT_S
    # An HTTP-date is always in GMT; a date without a zone was not one.
    if when.tzinfo is None:
        return RETRY_AFTER_DEFAULT_S
    wait_s = when.timestamp() - now_us / US_PER_S
    return min(max(wait_s, 0.0), RETRY_AFTER_MAX_S)


@dataclasses.dataclass
class HttpAdapterStats:
    """Requests to the ERP in flight now, the most at once so far, and the limit."""

    in_flight: int = 0
    in_flight_peak: int = 0
    in_flight_max: int = CONNECTIONS_MAX


@dataclasses.dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    retry_after: str | None
    # None when the body was larger than ANSWER_BYTES_MAX.
    body: bytes | None


class _Malformed(Exception):
    """A 200 whose body does not hold up; the message says what is wrong."""


class HttpAdapter:
    """An ErpAdapter that POSTs each batch to `{url}/v1/batches` over one session.

    `auth_header` is a (name, value) pair sent with every request, for example
    ("Authorization", "Bearer ..."); its value never appears in logs or errors.
    `field_mapping` renames contract keys, e.g. {"sku": "itemNumber"}. `clock` is
    read only to turn a Retry-After date into seconds.
    """

    def __init__(
        self,
        *,
        url: str,
        auth_header: tuple[str, str] | None = None,
        field_mapping: Mapping[str, str] | None = None,
        connections_max: int = CONNECTIONS_MAX,
        clock: Clock | None = None,
    ) -> None:
        base = yarl.URL(url)
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"the ERP url must be http(s)://host[:port][/path]: {url}")
        if base.user is not None or base.query_string or base.fragment:
            raise ValueError("the ERP url carries no credentials, query or fragment")
        if auth_header is not None and (
            not auth_header[0] or any(c in "".join(auth_header) for c in "\r\n")
        ):
            raise ValueError("an auth header needs a name, and no line breaks")
        if connections_max < 1:
            raise ValueError("connections_max must be at least 1")

        self._url = base.with_path(base.path.rstrip("/") + "/v1/batches")
        self.endpoint = str(self._url)
        self._names = field_names(field_mapping)
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        if auth_header is not None:
            self._headers[auth_header[0]] = auth_header[1]
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._connections_max = connections_max
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.stats = HttpAdapterStats(in_flight_max=connections_max)

    async def send(self, batch: ErpBatch, *, timeout_s: float) -> Acknowledgement:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        body = self._encode(batch)

        try:
            async with asyncio.timeout(timeout_s):
                answer = await self._post(body, timeout_s=timeout_s)
        except (aiohttp.ClientError, OSError) as error:
            # TimeoutError is an OSError, so the budget running out lands here too.
            raise Transient(
                f"no answer from {self.endpoint} for batch {batch.batch_id}: "
                f"{type(error).__name__} {error}".rstrip(),
                may_still_run=True,
            ) from error

        logger.debug(
            "erp answered: endpoint=%s batch_id=%s lines=%d status=%d",
            self.endpoint,
            batch.batch_id,
            len(batch.lines),
            answer.status,
        )
        return self._outcome(batch, answer)

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _encode(self, batch: ErpBatch) -> bytes:
        names = self._names
        lines = [
            {names[key]: value for key, value in line_fields(line).items()}
            for line in batch.lines
        ]
        body = {
            names["batch_id"]: batch.batch_id,
            names["stream"]: batch.stream,
            names["feed"]: batch.feed.value,
            names["lines"]: lines,
        }
        return orjson.dumps(body)

    async def _post(self, body: bytes, *, timeout_s: float) -> _Answer:
        timeout = aiohttp.ClientTimeout(
            total=timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S)
        )
        stats = self.stats
        stats.in_flight += 1
        stats.in_flight_peak = max(stats.in_flight_peak, stats.in_flight)
        try:
            # No redirects: a 3xx is reported as the status it is, and a batch with
            # its auth header is never replayed to wherever a Location points.
            async with self._http().post(
                self._url,
                data=body,
                headers=self._headers,
                timeout=timeout,
                allow_redirects=False,
            ) as response:
                return _Answer(
                    status=response.status,
                    retry_after=response.headers.get("Retry-After"),
                    body=await _read_limited(response.content),
                )
        finally:
            stats.in_flight -= 1

    def _http(self) -> aiohttp.ClientSession:
        # Created on first use, inside the event loop aiohttp needs it to live in.
        if self._closed:
            raise RuntimeError(f"the adapter for {self.endpoint} is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._connections_max,
                limit_per_host=self._connections_max,
                keepalive_timeout=KEEPALIVE_TIMEOUT_S,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=REQUEST_TIMEOUT_S_MAX, connect=CONNECT_TIMEOUT_S
                ),
                raise_for_status=False,
                trust_env=False,
            )
        return self._session

    def _outcome(self, batch: ErpBatch, answer: _Answer) -> Acknowledgement:
        """The acknowledgement a 200 holds, or the adapter error any other status is."""
        status = answer.status
        if status == 200:
            try:
                return self._acknowledgement(batch, answer.body)
            except _Malformed as problem:
                raise Transient(
                    f"garbage answer from {self.endpoint} for batch "
                    f"{batch.batch_id}: {problem}; it may have been applied"
                ) from problem

        where = f"{self.endpoint} (HTTP {status}) for batch {batch.batch_id}"
        details = _error_details(answer.body)
        if status == 429:
            wait_s = retry_after_s(answer.retry_after, now_us=self._clock.now_us())
            raise Throttled(f"throttled by {where}", retry_after_s=wait_s)
        if status == 409:
            raise BatchConflict(f"conflict at {where}: {details.text}")
        if status in _AUTH_STATUSES:
            raise BatchRefused(
                f"auth failed at {where}: check the auth header; {details.text}",
                line_index=None,
            )
        if status in _REFUSED_STATUSES:
            raise BatchRefused(
                f"refused by {where}: {details.text}",
                line_index=self._line_index(details.field, len(batch.lines)),
            )
        raise Transient(f"failure at {where}: {details.text}")

    def _acknowledgement(self, batch: ErpBatch, body: bytes | None) -> Acknowledgement:
        names = self._names
        fields = _object(_decode(body), "the answer")
        status = fields.get(names["status"])
        if not isinstance(status, str) or status not in ANSWER_STATUSES:
            raise _Malformed(f"status {status!r} is none of {sorted(ANSWER_STATUSES)}")
        batch_id = fields.get(names["batch_id"])
        if batch_id != batch.batch_id:
            raise _Malformed(f"it acknowledges batch {batch_id!r}")

        line_count = len(batch.lines)
        applied_lines = fields.get(names["applied_lines"])
        # JSON true is a Python bool, which is an int; a flag is never a count.
        if isinstance(applied_lines, bool) or not isinstance(applied_lines, int):
            raise _Malformed(f"applied_lines {applied_lines!r} is not an integer")
        rejected = self._rejections(batch, fields.get(names["rejected"]))
        if applied_lines + len(rejected) != line_count:
            raise _Malformed(
                f"{applied_lines} applied and {len(rejected)} rejected lines do not "
                f"add up to the {line_count} sent"
            )
        return Acknowledgement(
            batch_id=batch.batch_id,
            applied_lines=applied_lines,
            rejected=rejected,
            duplicate=ANSWER_STATUSES[status],
        )

    def _rejections(self, batch: ErpBatch, raw: object) -> tuple[LineRejection, ...]:
        names = self._names
        if not isinstance(raw, list):
            raise _Malformed("rejected is not a list")
        sent = {line.line_id for line in batch.lines}
        rejections: list[LineRejection] = []
        for i, entry in enumerate(raw):
            fields = _object(entry, f"rejected[{i}]")
            line_id = fields.get(names["line_id"])
            reason = fields.get(names["reason"])
            message = fields.get(names["message"])
            if not isinstance(line_id, str) or line_id not in sent:
                raise _Malformed(
                    f"rejected[{i}] names line {line_id!r}: not sent, or named twice"
                )
            sent.remove(line_id)
            if not isinstance(reason, str) or not reason:
                raise _Malformed(f"rejected[{i}] has no reason")
            if not isinstance(message, str):
                raise _Malformed(f"rejected[{i}] has no message")
            rejections.append(LineRejection(line_id, reason, message))
        return tuple(rejections)

    def _line_index(self, field: str | None, line_count: int) -> int | None:
        """Which line a culprit field such as `lines[3].sku` names, if one does."""
        if field is None:
            return None
        pattern = re.escape(self._names["lines"]) + r"\[([0-9]{1,9})\](?:[.\[].*)?"
        match = re.fullmatch(pattern, field)
        if match is None:
            return None
        index = int(match[1])
        return index if index < line_count else None


@dataclasses.dataclass(frozen=True, slots=True)
class _ErrorDetails:
    # What to show of the body: the ERP's code and message, or an excerpt.
    text: str
    # The culprit the error envelope names, if it names one.
    field: str | None


def _error_details(body: bytes | None) -> _ErrorDetails:
    """The `{"error": {"code", "message", "field"}}` of a failed request, as far as the
    body has one; an ERP is free to answer errors with HTML."""
    if body is None:
        return _ErrorDetails(f"a body over {ANSWER_BYTES_MAX} bytes", None)
    try:
        error = orjson.loads(body)["error"]
        code, message = error["code"], error["message"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        excerpt = body[:EXCERPT_CHARS_MAX].decode("utf-8", "replace")
        return _ErrorDetails(repr(excerpt), None)
    field = error.get("field")
    text = f"{code}: {message}" + (f" (field {field})" if field else "")
    return _ErrorDetails(
        text[:EXCERPT_CHARS_MAX], field if isinstance(field, str) else None
    )


def _decode(body: bytes | None) -> object:
    if body is None:
        raise _Malformed(f"the body is over {ANSWER_BYTES_MAX} bytes")
    try:
        decoded: object = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        excerpt = body[:EXCERPT_CHARS_MAX].decode("utf-8", "replace")
        raise _Malformed(f"the body is not JSON: {excerpt!r}") from error
    return decoded


def _object(value: object, what: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _Malformed(f"{what} is not a JSON object")
    return value


async def _read_limited(content: aiohttp.StreamReader) -> bytes | None:
    """The whole body, or None once it grows past ANSWER_BYTES_MAX."""
    chunks: list[bytes] = []
    size_bytes = 0
    while chunk := await content.read(READ_CHUNK_BYTES):
        size_bytes += len(chunk)
        if size_bytes > ANSWER_BYTES_MAX:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
