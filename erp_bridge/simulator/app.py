"""The simulated ERP as an aiohttp application: auth, rate limits, faults, booking.

Design note. A batch request passes four gates, in this order, and each has one place
below: authentication (middleware), admission against the three rate limits (nothing
is parsed beyond counting lines), the configured latency while the request counts as
in progress, and finally the decision and booking, which run without an await so that
concurrent requests never interleave inside the books. The fault dice are rolled once
per valid batch request, from a seeded generator, so a run with the same seed and the
same request order fails the same requests. Known shortcoming: when requests overlap,
their order at the dice follows the order their latencies end, so a replay is exact
only for a client that sends one request at a time.
"""

import asyncio
import collections
import dataclasses
import hmac
import json
import logging
import math
import random
import re
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from erp_bridge.simulator.books import BatchResult, Books, Seen
from erp_bridge.simulator.config import SimulatorConfig, is_loopback
from erp_bridge.simulator.contract import (
    Batch,
    InvalidInput,
    count_lines,
    parse_batch,
    parse_faults,
    parse_on_hand,
    parse_text_list,
)
from erp_bridge.simulator.window import PeakMeter, SlidingWindow
from server.clock import US_PER_S, Clock

logger = logging.getLogger(__name__)

# Worst case of one line: six texts at the 128-character limit, two integers and the
# keys come to about 1 KiB; twice that leaves room for whitespace and unknown keys.
LINE_BYTES_MAX = 2 * 1024
# Admin bodies carry up to 100 000 short entries (see contract.ADMIN_ENTRIES_MAX).
ADMIN_BODY_BYTES_MAX = 16 * 1024 * 1024
# Requests still in progress at shutdown get this long; the longest latency a test
# configures is well under it.
SHUTDOWN_TIMEOUT_S = 2.0
# Idle keep-alive connections are closed after this, as a real ERP's proxy would.
KEEPALIVE_TIMEOUT_S = 15.0
# Pending connections the socket queues: more than any test or benchmark opens at once.
BACKLOG = 128
# Batch request arrivals remembered for tests that check a client's timing (a
# Retry-After honoured): minutes of traffic at test rates, 40 bytes each.
ARRIVALS_MAX = 10_000


@dataclasses.dataclass(frozen=True)
class Arrival:
    """One batch request as it arrived, and the Retry-After it was told (0: none)."""

    arrived_us: int
    throttled: bool
    retry_after_s: int


class MonotonicClock:
    """The default clock: rates take only differences, so monotonic time will do."""

    def now_us(self) -> int:
        return time.monotonic_ns() // 1_000

    async def sleep(self, duration_s: float) -> None:
        await asyncio.sleep(duration_s)


@dataclasses.dataclass
class Stats:
    """Counters of batch requests by outcome, as GET /v1/stats reports them."""

    requests: int = 0
    applied: int = 0
    duplicates: int = 0
    conflicts: int = 0
    invalid: int = 0
    rejected_lines: int = 0
    throttled: int = 0
    failed: int = 0
    unauthorized: int = 0
    max_requests_in_progress: int = 0


class ErpSimulator:
    """One simulated ERP; serve it with start() or mount app() in a test server."""

    def __init__(self, config: SimulatorConfig, *, clock: Clock | None = None) -> None:
        self.config = config
        self.faults = config.faults
        self.books = Books()
        self.stats = Stats()
        self._clock: Clock = clock if clock is not None else MonotonicClock()
        self._rng = random.Random(config.seed)
        self._requests_admitted = SlidingWindow()
        self._lines_admitted = SlidingWindow()
        # Arrivals, throttled ones included, so a peak above the limit exposes a client
        # that sends too fast.
        self._requests_arriving = PeakMeter()
        self._lines_arriving = PeakMeter()
        # Start time of each batch request in progress, to tell a throttled caller
        # when the oldest one should finish.
        self._in_progress: dict[int, int] = {}
        self._next_request = 0
        self.arrivals: collections.deque[Arrival] = collections.deque(
            maxlen=ARRIVALS_MAX
        )
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def max_requests_in_any_second(self) -> int:
        """Most batch requests that arrived in any one-second window, throttled ones
        included: above the limit means the client sent too fast."""
        return self._requests_arriving.peak

    def app(self) -> web.Application:
        client_max_size = max(
            self.config.lines_per_request * LINE_BYTES_MAX, ADMIN_BODY_BYTES_MAX
        )
        app = web.Application(
            middlewares=[self._authenticate], client_max_size=client_max_size
        )
        app.router.add_post("/v1/batches", self._post_batch)
        app.router.add_get("/v1/ledger", self._get_ledger)
        app.router.add_get("/v1/stats", self._get_stats)
        app.router.add_put("/v1/admin/items", self._put_items)
        app.router.add_put("/v1/admin/closed-locations", self._put_closed_locations)
        app.router.add_put("/v1/admin/faults", self._put_faults)
        app.router.add_put("/v1/admin/on-hand", self._put_on_hand)
        return app

    async def start(
        self, host: str | None = None, port: int | None = None
    ) -> web.AppRunner:
        """Serve on loopback; `self.port` then holds the port, useful after port 0."""
        assert self._runner is None, "a simulator is started once"
        host = self.config.host if host is None else host
        port = self.config.port if port is None else port
        if not is_loopback(host):
            raise ValueError(f"the simulator serves loopback only, got host {host}")

        runner = web.AppRunner(
            self.app(),
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            keepalive_timeout=KEEPALIVE_TIMEOUT_S,
        )
        await runner.setup()
        await web.TCPSite(runner, host, port, backlog=BACKLOG).start()
        self._runner = runner
        self.port = runner.addresses[0][1]
        logger.info("erp simulator listening: host=%s port=%d", host, self.port)
        return runner

    async def stop(self) -> None:
        if self._runner is None:
            return
        await self._runner.cleanup()
        self._runner = None
        logger.info("erp simulator stopped: port=%d", self.port)

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @web.middleware
    async def _authenticate(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        if not self.config.token:
            return await handler(request)
        expected = f"Bearer {self.config.token}".encode()
        presented = request.headers.get("Authorization", "").encode()
        # Constant-time, so that the simulator does not teach a bad habit.
        if not hmac.compare_digest(presented, expected):
            self.stats.unauthorized += 1
            return _error(401, "UNAUTHORIZED", "a valid bearer token is required")
        return await handler(request)

    async def _post_batch(self, request: web.Request) -> web.Response:
        self.stats.requests += 1
        body = await _read_json(request)
        lines = count_lines(body)
        now_us = self._clock.now_us()
        self._requests_arriving.record(now_us, 1)
        self._lines_arriving.record(now_us, lines)

        throttled = self._throttle(now_us, lines)
        if throttled is not None:
            self.stats.throttled += 1
            retry_after_s = int(throttled.headers["Retry-After"])
            self.arrivals.append(Arrival(now_us, True, retry_after_s))
            return throttled
        self.arrivals.append(Arrival(now_us, False, 0))

        self._requests_admitted.add(now_us, 1)
        self._lines_admitted.add(now_us, lines)
        request_number = self._next_request
        self._next_request += 1
        self._in_progress[request_number] = now_us
        self.stats.max_requests_in_progress = max(
            self.stats.max_requests_in_progress, len(self._in_progress)
        )
        try:
            return await self._answer(body)
        finally:
            del self._in_progress[request_number]

    def _throttle(self, now_us: int, lines: int) -> web.Response | None:
        """A 429 naming the limit that frees up last, or None to admit the request."""
        config = self.config
        free_at_us: dict[str, int] = {}
        if len(self._in_progress) >= config.concurrent_max:
            # The oldest request in progress should end when its latency is over.
            oldest_us = min(self._in_progress.values())
            free_at_us["concurrent_max"] = oldest_us + self.faults.latency_ms * 1_000
        requests_free_us = self._requests_admitted.free_at_us(
            now_us, amount=1, limit=config.requests_per_s
        )
        if requests_free_us > now_us:
            free_at_us["requests_per_s"] = requests_free_us
        # A batch above the whole budget is left for validation to refuse with 400.
        if lines <= config.lines_per_s:
            lines_free_us = self._lines_admitted.free_at_us(
                now_us, amount=lines, limit=config.lines_per_s
            )
            if lines_free_us > now_us:
                free_at_us["lines_per_s"] = lines_free_us
        if not free_at_us:
            return None

        limit = max(free_at_us, key=lambda name: free_at_us[name])
        # Whole seconds, rounded up, and at least one, as Retry-After allows no less.
        retry_after_s = max(1, math.ceil((free_at_us[limit] - now_us) / US_PER_S))
        logger.debug("batch throttled: limit=%s retry_after_s=%d", limit, retry_after_s)
        response = _error(
            429,
            "RATE_LIMITED",
            f"over the {limit} limit; retry after {retry_after_s} s",
            limit=limit,
            limits=sorted(free_at_us),
            retry_after_s=retry_after_s,
        )
        response.headers["Retry-After"] = str(retry_after_s)
        return response

    async def _answer(self, body: object) -> web.Response:
        if self.faults.latency_ms > 0:
            await self._clock.sleep(self.faults.latency_ms / 1_000)

        try:
            batch = parse_batch(body, lines_per_request=self.config.lines_per_request)
            self._check_item_numbers(batch)
        except InvalidInput as error:
            self.stats.invalid += 1
            return _invalid(error)

        # One draw decides both faults, so their rates never overlap.
        draw = self._rng.random()
        faults = self.faults
        if draw < faults.error_rate:
            self.stats.failed += 1
            logger.debug("fault injected: batch_id=%s kind=unavailable", batch.batch_id)
            return _error(
                503, "UNAVAILABLE", "the ERP is unavailable; nothing was applied"
            )

        seen, earlier = self.books.look_up(batch)
        if seen is Seen.CONFLICT:
            self.stats.conflicts += 1
            return _error(
                409,
                "BATCH_CONFLICT",
                f"batch_id {batch.batch_id} was used before with different content",
                field="batch_id",
            )
        if seen is Seen.DUPLICATE:
            assert earlier is not None
            self.stats.duplicates += 1
            return web.json_response(earlier.to_json(status="duplicate"))

        result = self.books.apply(batch)
        self.stats.applied += 1
        self.stats.rejected_lines += len(result.rejected)
        if draw < faults.error_rate + faults.applied_then_error_rate:
            self.stats.failed += 1
            logger.debug(
                "fault injected: batch_id=%s kind=applied_then_error", batch.batch_id
            )
            return _error(500, "INTERNAL", "the ERP failed while answering")
        return _applied(result)

    def _check_item_numbers(self, batch: Batch) -> None:
        pattern = self.config.sku_pattern
        if not pattern:
            return
        for index, line in enumerate(batch.lines):
            if re.fullmatch(pattern, line.sku) is None:
                raise InvalidInput(
                    f"lines[{index}].sku", f"is not an item number ({pattern})"
                )

    async def _get_ledger(self, request: web.Request) -> web.Response:
        # No await before the snapshot is built: that is what makes it atomic.
        return web.json_response(self.books.ledger_json())

    async def _get_stats(self, request: web.Request) -> web.Response:
        stats: dict[str, object] = dataclasses.asdict(self.stats)
        stats["max_requests_in_any_second"] = self._requests_arriving.peak
        stats["max_lines_in_any_second"] = self._lines_arriving.peak
        stats["requests_in_progress"] = len(self._in_progress)
        stats["limits"] = {
            "requests_per_s": self.config.requests_per_s,
            "lines_per_request": self.config.lines_per_request,
            "lines_per_s": self.config.lines_per_s,
            "concurrent_max": self.config.concurrent_max,
        }
        return web.json_response(stats)

    async def _put_items(self, request: web.Request) -> web.Response:
        try:
            self.books.known_skus = parse_text_list(await _read_json(request), "skus")
        except InvalidInput as error:
            return _invalid(error)
        logger.info("item master loaded: skus=%d", len(self.books.known_skus))
        return web.json_response({"skus": len(self.books.known_skus)})

    async def _put_closed_locations(self, request: web.Request) -> web.Response:
        try:
            closed = parse_text_list(await _read_json(request), "locations")
        except InvalidInput as error:
            return _invalid(error)
        self.books.closed_locations = closed
        logger.info("periods closed: locations=%d", len(closed))
        return web.json_response({"locations": len(closed)})

    async def _put_faults(self, request: web.Request) -> web.Response:
        try:
            self.faults = parse_faults(await _read_json(request), self.faults)
        except InvalidInput as error:
            return _invalid(error)
        logger.info(
            "faults set: error_rate=%s applied_then_error_rate=%s latency_ms=%d",
            self.faults.error_rate,
            self.faults.applied_then_error_rate,
            self.faults.latency_ms,
        )
        return web.json_response(dataclasses.asdict(self.faults))

    async def _put_on_hand(self, request: web.Request) -> web.Response:
        try:
            counts = parse_on_hand(await _read_json(request))
        except InvalidInput as error:
            return _invalid(error)
        self.books.count_on_hand(counts)
        logger.info("stock counted: positions=%d", len(counts))
        return web.json_response({"positions": len(counts)})


class _Malformed:
    """A body that is not JSON; validation names it as the field `body`."""


async def _read_json(request: web.Request) -> object:
    raw = await request.read()
    try:
        body: object = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return _Malformed()
    return body


def _applied(result: BatchResult) -> web.Response:
    return web.json_response(result.to_json(status="applied"))


def _invalid(error: InvalidInput) -> web.Response:
    return _error(400, "INVALID_ARGUMENT", error.message, field=error.field)


def _error(status: int, code: str, message: str, **details: object) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message, **details}}, status=status
    )
