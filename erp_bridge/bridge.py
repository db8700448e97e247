"""The bridge process: one stream per shard, from wal_records to the ERP, exactly once.

Design note. A stream loops: read the committed records after its cursor (never past
a gap, see reader.py), wait up to the batch window for a full batch, write the planned
end to the cursor, deliver the batch (sender.py), then, in one transaction, move the
cursor to that end and keep the lines the ERP refused as dead letters. A crash at any
point leaves either the old cursor with the plan (the same batch goes again, under the
same id, and the ERP's dedupe answers "duplicate") or the new cursor (the batch is
done). Nothing is skipped: a batch that cannot be delivered holds its stream.

Exactly once rests on two things the ERP must do and the simulator does: recognise a
batch id it has seen (and answer as the first time), and, for the ledger feed, refuse
a line id it has booked. Streams of different shards go in parallel; within a stream
one batch is in flight at a time, so the ERP applies a stream's batches in order and
its "last batch applied per stream" tells reconciliation exactly what it has seen.

Dead letters queued for a retry go out on a stream of their own, `<name>.retry`, after
the lines that followed them; a positions feed sums deltas, so the order does not
matter there. For a ledger feed it means a retried line arrives out of order.
"""

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import random
from collections.abc import Callable

import asyncpg
import redis.asyncio as redis_asyncio

from erp_bridge.adapters import (
    Acknowledgement,
    BatchConflict,
    BatchRefused,
    ErpAdapter,
    ErpBatch,
    Feed,
    LineRejection,
)
from erp_bridge.adapters.file_drop import FileDropAdapter
from erp_bridge.adapters.http import HttpAdapter
from erp_bridge.batches import Stretch, build, stretch_to, take, without_line
from erp_bridge.breaker import Backoff, CircuitBreaker
from erp_bridge.config import BridgeConfig
from erp_bridge.rate_limit import RateLimit, SharedLimiter, limit_for_window
from erp_bridge.reader import RECORDS_PER_READ_MAX, StreamReader
from erp_bridge.sender import LINES, REQUESTS, Sender
from erp_bridge.slots import SharedSlots
from erp_bridge.status import (
    BridgeStatus,
    Counters,
    LagSamples,
    StreamState,
    StreamStatus,
)
from erp_bridge.store import (
    ALREADY_APPLIED,
    DATABASE_TIMEOUT_S,
    BridgeStore,
    Refused,
    StreamTaken,
)
from server.clock import US_PER_S, Clock, SystemClock
from server.engine.errors import ensure
from server.wal.feed import StreamPosition
from server.wal.schema import DATABASE_ERRORS

log = logging.getLogger(__name__)

# A standby looks this often whether the owner of a stream has gone.
STANDBY_POLL_S = 1.0
# After Postgres failed, a stream waits this long before it reads again.
DATABASE_RETRY_S = 1.0
# The bridge waits this long at start for the server to have created its schema.
SCHEMA_WAIT_S = 60.0
# Status (lag, dead letters, divergences) is refreshed this often.
STATUS_PERIOD_S = 1.0
# Queued dead-letter retries are looked for this often.
RETRY_POLL_S = 1.0
# Connections beyond one per stream: status, dead-letter retries and admin calls.
POOL_EXTRA_CONNECTIONS = 4
# A slot lease outlives the request it covers by this much, so a slow answer never
# lets another process take the slot while the request is still running.
SLOT_LEASE_SLACK_S = 5.0

RETRY_STREAM_SUFFIX = "retry"
# The retry stream's lock, beside the shards' (which are never negative).
RETRY_STREAM_LOCK = -1

# What a loop survives by starting over from the cursor in Postgres: database errors,
# and the driver's own confusion when a session ends under an operation (asyncpg then
# hands the connection back to its pool while the operation still holds it).
RESTARTABLE_ERRORS = (*DATABASE_ERRORS, asyncpg.InternalClientError)


class PlannedBatchTooLarge(Exception):
    """A planned batch has more lines than the configuration now lets a request carry."""


def _stop_process(error: BaseException) -> None:
    # A loop of the bridge ended with an error it cannot survive: a broken invariant
    # or a bug. Stop loudly; a restart resumes every stream from its cursor.
    log.critical("stopping: bridge task failed: %r", error)
    os._exit(70)


class Bridge:
    def __init__(
        self,
        config: BridgeConfig,
        *,
        clock: Clock | None = None,
        adapter: ErpAdapter | None = None,
        seed: int | None = None,
        on_fatal: Callable[[BaseException], None] = _stop_process,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.feed = Feed(config.feed)
        self.counters = Counters()
        self.lags = LagSamples()
        self.streams: dict[int, StreamStatus] = {}
        # The dead-letter retry stream, reported beside the shards' streams.
        self.retry_status = StreamStatus(shard=RETRY_STREAM_LOCK)
        self.dead_letters: dict[str, int] = {}
        self.divergences = 0
        # Batches and lines sent per second over the last status period, and the
        # counts and time they were measured from.
        self._rates = (0.0, 0.0)
        self._rates_from: tuple[float, int, int] | None = None
        self._adapter = adapter
        self._on_fatal = on_fatal
        self._rng = random.Random(seed)
        self._pool: asyncpg.Pool | None = None
        self._redis: redis_asyncio.Redis | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._store: BridgeStore | None = None
        self._sender: Sender | None = None
        self._breaker: CircuitBreaker | None = None

    @property
    def store(self) -> BridgeStore:
        ensure(self._store is not None, "Bridge.start() first")
        assert self._store is not None
        return self._store

    async def start(self) -> None:
        config = self.config
        shard_count = await self._wait_for_schema()
        shards = config.shard_list(shard_count)
        self._pool = await asyncpg.create_pool(
            config.database_url,
            min_size=1,
            # One connection per owned stream (it holds the ownership lock), plus
            # status, retries and admin calls.
            max_size=len(shards) + POOL_EXTRA_CONNECTIONS,
            timeout=DATABASE_TIMEOUT_S,
            command_timeout=DATABASE_TIMEOUT_S,
            server_settings=self._session_settings(),
        )
        self._store = BridgeStore(self._pool, name=config.name)

        self._redis = redis_asyncio.Redis.from_url(config.redis_url)
        self._sender = self._make_sender()
        for shard in shards:
            self.streams[shard] = StreamStatus(shard=shard)
            self._spawn(self._run_stream(shard), f"stream-{shard}")
        self._spawn(self._run_retries(), "retries")
        self._spawn(self._run_status(), "status")
        log.info(
            "bridge started: name=%s feed=%s endpoint=%s shards=%s",
            config.name,
            self.feed.value,
            self.endpoint,
            sorted(self.streams),
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._adapter is not None:
            await self._adapter.close()
        if self._redis is not None:
            await self._redis.aclose()
        if self._pool is not None:
            await self._pool.close()
        log.info("bridge stopped: name=%s", self.config.name)

    @property
    def endpoint(self) -> str:
        return self._adapter.endpoint if self._adapter else ""

    async def status(self) -> BridgeStatus:
        return self.snapshot()

    def snapshot(self) -> BridgeStatus:
        breaker = self._breaker
        assert breaker is not None
        return BridgeStatus(
            name=self.config.name,
            feed=self.feed.value,
            endpoint=self.endpoint,
            breaker=breaker.state,
            streams=tuple(
                dataclasses.replace(s)
                for s in (
                    self.retry_status,
                    *(v for _, v in sorted(self.streams.items())),
                )
            ),
            counters=dataclasses.replace(self.counters),
            dead_letters=dict(self.dead_letters),
            divergences=self.divergences,
            delivery_lag_p50_s=self.lags.percentile(0.50),
            delivery_lag_p99_s=self.lags.percentile(0.99),
            batches_per_s=self._rates[0],
            lines_per_s=self._rates[1],
        )

    def _spawn(self, coroutine: "asyncio._CoroutineLike[None]", name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        task.add_done_callback(self._task_ended)
        self._tasks.append(task)

    def _task_ended(self, task: "asyncio.Task[None]") -> None:
        # Every loop runs until stop() cancels it; any other end is fatal.
        if task.cancelled():
            return
        error = task.exception()
        self._on_fatal(error or RuntimeError(f"task {task.get_name()} returned"))

    def _make_sender(self) -> Sender:
        config = self.config
        assert self._redis is not None
        if self._adapter is None:
            self._adapter = make_adapter(config)
        limiter = SharedLimiter(
            self._redis,
            key_prefix=config.quota_key,
            limits=[
                _with_allowance(
                    limit_for_window(REQUESTS, config.requests_per_s, burst=1),
                    config.send_delay_allowance_ms,
                ),
                # A full request's lines must fit in one burst, or it could never go.
                _with_allowance(
                    limit_for_window(
                        LINES, config.lines_per_s, burst=config.lines_per_request
                    ),
                    config.send_delay_allowance_ms,
                ),
            ],
            clock=self.clock,
        )
        slots = SharedSlots(
            self._redis,
            key_prefix=config.quota_key,
            name="concurrent",
            slots_max=config.concurrent_requests_max,
            lease_s=config.request_timeout_s + SLOT_LEASE_SLACK_S,
            clock=self.clock,
        )
        self._breaker = CircuitBreaker(
            endpoint=self._adapter.endpoint,
            failures_max=config.breaker_failures,
            open_s=config.breaker_open_s,
            clock=self.clock,
        )
        backoff = Backoff(
            first_s=config.backoff_first_s, max_s=config.backoff_max_s, rng=self._rng
        )
        return Sender(
            adapter=self._adapter,
            limiter=limiter,
            slots=slots,
            breaker=self._breaker,
            backoff=backoff,
            counters=self.counters,
            clock=self.clock,
            request_timeout_s=config.request_timeout_s,
        )

    def _session_settings(self) -> dict[str, str]:
        return {
            "search_path": self.config.database_schema,
            # Names the bridge's sessions for operators (pg_stat_activity).
            "application_name": application_name(self.config),
        }

    async def _wait_for_schema(self) -> int:
        """The shard count the server created the schema with, once it has."""
        deadline = asyncio.get_running_loop().time() + SCHEMA_WAIT_S
        while True:
            with contextlib.suppress(asyncpg.UndefinedTableError, *DATABASE_ERRORS):
                conn = await asyncpg.connect(
                    self.config.database_url,
                    timeout=DATABASE_TIMEOUT_S,
                    command_timeout=DATABASE_TIMEOUT_S,
                    server_settings=self._session_settings(),
                )
                try:
                    value = await conn.fetchval(
                        "SELECT value FROM stockward_meta WHERE key = 'shard_count'"
                    )
                    has_bridge_tables = await conn.fetchval(
                        "SELECT to_regclass('bridge_cursors') IS NOT NULL"
                    )
                finally:
                    await conn.close()
                if value is not None and has_bridge_tables:
                    return int(value)
            if asyncio.get_running_loop().time() > deadline:
                raise SystemExit(
                    f"schema {self.config.database_schema} has no stockward tables; "
                    "start the server first"
                )
            log.info("waiting for schema: schema=%s", self.config.database_schema)
            await asyncio.sleep(STANDBY_POLL_S)

    # Streams.

    async def _run_stream(self, shard: int) -> None:
        status = self.streams[shard]
        while True:
            try:
                await self._own_and_feed(shard, status)
            except StreamTaken as error:
                log.warning("stream taken: shard=%d error=%s", shard, error)
                status.state = StreamState.STANDBY
            except RESTARTABLE_ERRORS as error:
                log.error("stream database error: shard=%d error=%r", shard, error)
                status.last_error = f"database: {error!r}"
                await self.clock.sleep(DATABASE_RETRY_S)

    async def _own_and_feed(self, shard: int, status: StreamStatus) -> None:
        assert self._pool is not None
        async with self._pool.acquire(timeout=DATABASE_TIMEOUT_S) as conn:
            if not await self.store.try_own(conn, shard):
                status.state = StreamState.STANDBY
                await self.clock.sleep(STANDBY_POLL_S)
                return
            log.info("stream owned: name=%s shard=%d", self.config.name, shard)
            try:
                await self._feed(shard, conn, status)
            finally:
                with contextlib.suppress(*RESTARTABLE_ERRORS):
                    await conn.execute("SELECT pg_advisory_unlock_all()")

    async def _feed(
        self, shard: int, conn: asyncpg.Connection, status: StreamStatus
    ) -> None:
        reader = StreamReader(shard=shard, timeout_s=DATABASE_TIMEOUT_S)
        cursor = await self.store.load_cursor(
            conn, shard, start_at_end=self.config.start_from == "end"
        )
        position = cursor.acked
        status.acked_seq, status.acked_line = position.seq, position.line
        status.acked_batch_id = cursor.acked_batch_id

        if cursor.inflight is not None:
            assert cursor.inflight_feed is not None
            records = await reader.read_range(conn, position, cursor.inflight)
            stretch = stretch_to(records, position, cursor.inflight)
            log.info(
                "resending planned batch: shard=%d start=%s end=%s",
                shard,
                position,
                cursor.inflight,
            )
            await self._ship(conn, shard, stretch, cursor.inflight_feed, status)
            position = stretch.end

        while True:
            stretch = await self._next_stretch(conn, reader, position, status)
            await self.store.plan(
                conn, shard=shard, acked=position, end=stretch.end, feed=self.feed
            )
            await self._ship(conn, shard, stretch, self.feed, status)
            position = stretch.end

    async def _next_stretch(
        self,
        conn: asyncpg.Connection,
        reader: StreamReader,
        position: StreamPosition,
        status: StreamStatus,
    ) -> Stretch:
        """The next stretch to send: full, or part full once the window has passed."""
        lines_max = self.config.lines_per_request
        window_us = int(self.config.batch_window_s * US_PER_S)
        first_seen_us: int | None = None
        while True:
            # Records carry a line or more, bar policy changes: a batch's worth and
            # one more tell a full batch without decoding records it will not send.
            records_max = min(RECORDS_PER_READ_MAX, lines_max + 1)
            records = await reader.read(conn, position, records_max=records_max)
            if reader.gap_after_seq is not None:
                status.last_error = (
                    f"record {reader.gap_after_seq + 1} of shard {reader.shard} is not "
                    "visible while later ones are; waiting for it"
                )
            stretch = take(records, position, lines_max=lines_max)
            if stretch is not None:
                now_us = self.clock.now_us()
                first_seen_us = first_seen_us or now_us
                is_full = (
                    len(stretch.lines) >= lines_max
                    or len(records) >= records_max
                    or not stretch.lines
                )
                if is_full or now_us - first_seen_us >= window_us:
                    return stretch
            status.state = StreamState.IDLE
            await self.clock.sleep(self.config.poll_interval_s)

    async def _ship(
        self,
        conn: asyncpg.Connection,
        shard: int,
        stretch: Stretch,
        feed: Feed,
        status: StreamStatus,
    ) -> None:
        """Deliver a planned stretch and move the cursor past it."""
        assert self._sender is not None
        batch = build(name=self.config.name, shard=shard, feed=feed, stretch=stretch)
        if len(batch.lines) > self.config.lines_per_request:
            # Planned before --lines-per-request was lowered: it must go as planned,
            # and the quota could never admit it.
            raise PlannedBatchTooLarge(
                f"shard {shard} has a planned batch {batch.batch_id} of "
                f"{len(batch.lines)} lines; restart with --lines-per-request of at "
                "least that until it is delivered"
            )
        refused: list[Refused] = []
        acknowledgement = None
        if batch.lines:
            batch, acknowledgement, refused = await self._deliver_whole(batch, status)
        else:
            self.counters.batches_empty += 1

        if acknowledgement is not None:
            refused += self._rejected(batch, acknowledgement)
        await self.store.acknowledge(
            conn,
            shard=shard,
            start=stretch.start,
            end=stretch.end,
            batch_id=batch.batch_id,
            refused=refused,
        )

        self.counters.batches += 1
        self.counters.lines_in += len(stretch.lines)
        self.counters.lines_out += len(batch.lines)
        self.counters.lines_dead_lettered += len(refused)
        if stretch.oldest_committed_us:
            # Postgres stamped the commit with its wall clock, so the lag is read on
            # the wall clock too, whatever clock drives the bridge's waits.
            self.lags.add(
                (SystemClock().now_us() - stretch.oldest_committed_us) / US_PER_S
            )
        status.state = StreamState.IDLE
        status.acked_seq, status.acked_line = stretch.end.seq, stretch.end.line
        status.acked_batch_id = batch.batch_id
        log.debug(
            "batch acknowledged: batch_id=%s lines=%d refused=%d",
            batch.batch_id,
            len(batch.lines),
            len(refused),
        )

    async def _deliver_whole(
        self, batch: ErpBatch, status: StreamStatus
    ) -> tuple[ErpBatch, Acknowledgement | None, list[Refused]]:
        """Deliver, dropping lines the ERP names as invalid into dead letters; waits
        while the ERP refuses the batch as a whole."""
        assert self._sender is not None
        refused: list[Refused] = []
        while batch.lines:
            try:
                return batch, await self._sender.deliver(batch, status), refused
            except BatchRefused as error:
                if error.line_index is not None and error.line_index < len(batch.lines):
                    line = batch.lines[error.line_index]
                    rejection = LineRejection(line.line_id, "INVALID_LINE", str(error))
                    refused.append(Refused(line, rejection))
                    self.counters.lines_refused_invalid += 1
                    batch = without_line(batch, error.line_index)
                    continue
                await self._wait_refused(batch, status, error)
            except BatchConflict as error:
                await self._wait_refused(batch, status, error)
        return batch, None, refused

    async def _wait_refused(
        self, batch: ErpBatch, status: StreamStatus, error: Exception
    ) -> None:
        status.state = StreamState.REFUSED
        status.last_error = f"ERP refused batch {batch.batch_id}: {error}"
        log.error(
            "batch refused: batch_id=%s retry_in_s=%.0f error=%s",
            batch.batch_id,
            self.config.refused_retry_s,
            error,
        )
        await self.clock.sleep(self.config.refused_retry_s)

    @staticmethod
    def _rejected(batch: ErpBatch, acknowledgement: Acknowledgement) -> list[Refused]:
        by_id = {line.line_id: line for line in batch.lines}
        refused = []
        for rejection in acknowledgement.rejected:
            # Booked under an earlier batch: delivered, not dead.
            if rejection.reason == ALREADY_APPLIED:
                continue
            line = by_id.get(rejection.line_id)
            ensure(line is not None, f"ERP rejected unknown line {rejection.line_id}")
            assert line is not None
            refused.append(Refused(line, rejection))
        return refused

    # Dead-letter retries.

    async def _run_retries(self) -> None:
        """Dead letters queued for a retry, one batch at a time, by one process of
        this bridge name at a time (the retry stream's own lock)."""
        assert self._pool is not None
        while True:
            try:
                async with self._pool.acquire(timeout=DATABASE_TIMEOUT_S) as conn:
                    if await self.store.try_own(conn, RETRY_STREAM_LOCK):
                        self.retry_status.state = StreamState.IDLE
                        try:
                            while await self._retry_once(conn):
                                pass
                        finally:
                            self.retry_status.state = StreamState.STANDBY
                            with contextlib.suppress(*RESTARTABLE_ERRORS):
                                await conn.execute("SELECT pg_advisory_unlock_all()")
            except RESTARTABLE_ERRORS as error:
                log.error("retry database error: error=%r", error)
            await self.clock.sleep(RETRY_POLL_S)

    async def _retry_once(self, conn: asyncpg.Connection) -> bool:
        """Send one retry batch; False when none is queued."""
        letters = await self.store.claim_retry_batch(
            conn, lines_max=self.config.lines_per_request
        )
        if not letters:
            return False
        if len(letters) > self.config.lines_per_request:
            raise PlannedBatchTooLarge(
                f"the retry batch {letters[0].retry_batch_id} holds {len(letters)} "
                "dead letters; restart with --lines-per-request of at least that "
                "until it is delivered"
            )
        retry_id = letters[0].retry_batch_id
        assert retry_id is not None
        batch = ErpBatch(
            batch_id=retry_id,
            stream=f"{self.config.name}.{RETRY_STREAM_SUFFIX}",
            feed=self.feed,
            lines=tuple(letter.line for letter in letters),
        )

        rejected = await self._deliver_retry(batch)

        await self.store.settle_retry_batch(conn, letters, rejected)
        self.retry_status.state = StreamState.IDLE
        log.info(
            "dead letters retried: batch_id=%s lines=%d refused_again=%d",
            retry_id,
            len(letters),
            len(rejected),
        )
        return True

    async def _deliver_retry(self, batch: ErpBatch) -> list[LineRejection]:
        """What the ERP refused of a retry batch. A line it names as invalid is left
        out and the rest resent; a batch refused as a whole is refused line by line,
        back to the operator, rather than retried without end."""
        assert self._sender is not None
        rejected: list[LineRejection] = []
        while batch.lines:
            try:
                acknowledgement = await self._sender.deliver(batch, self.retry_status)
            except BatchRefused as error:
                index = error.line_index
                if index is None or not 0 <= index < len(batch.lines):
                    reason = "BATCH_REFUSED"
                    return rejected + _refuse_all(batch, reason, error)
                line = batch.lines[index]
                rejected.append(LineRejection(line.line_id, "INVALID_LINE", str(error)))
                batch = without_line(batch, index)
                continue
            except BatchConflict as error:
                return rejected + _refuse_all(batch, "BATCH_CONFLICT", error)
            return rejected + list(acknowledgement.rejected)
        return rejected

    # Status.

    async def _run_status(self) -> None:
        while True:
            try:
                await self._refresh_status()
            except RESTARTABLE_ERRORS as error:
                log.warning("status refresh failed: error=%r", error)
            await self.clock.sleep(STATUS_PERIOD_S)

    def _measure_rates(self) -> None:
        now_s = asyncio.get_running_loop().time()
        counters = self.counters
        if self._rates_from is not None:
            then_s, batches, lines = self._rates_from
            elapsed_s = max(now_s - then_s, 1e-3)
            self._rates = (
                (counters.batches - batches) / elapsed_s,
                (counters.lines_out - lines) / elapsed_s,
            )
        self._rates_from = (now_s, counters.batches, counters.lines_out)

    async def _refresh_status(self) -> None:
        assert self._pool is not None
        self._measure_rates()
        now_us = SystemClock().now_us()
        for shard, status in self.streams.items():
            if status.state is StreamState.STANDBY:
                # Another process feeds it and reports its lag.
                status.lag_records, status.lag_s = 0, 0.0
                continue
            row = await self._pool.fetchrow(
                "SELECT (SELECT coalesce(max(seq), 0) FROM wal_records "
                "WHERE shard = $1) AS head, "
                "(SELECT (extract(epoch FROM committed_at) * 1000000)::bigint "
                "FROM wal_records WHERE shard = $1 AND seq = $2 + 1) AS next_us",
                shard,
                status.acked_seq,
            )
            assert row is not None
            status.head_seq = row["head"]
            status.lag_records = max(0, row["head"] - status.acked_seq)
            next_us = row["next_us"]
            status.lag_s = max(0.0, (now_us - next_us) / US_PER_S) if next_us else 0.0
        counts = await self.store.count_dead_letters()
        self.dead_letters = {status.value: n for status, n in counts.items()}
        if await self._pool.fetchval(
            "SELECT to_regclass('erp_divergence') IS NOT NULL"
        ):
            self.divergences = await self._pool.fetchval(
                "SELECT count(*) FROM erp_divergence"
            )


def _refuse_all(batch: ErpBatch, reason: str, error: Exception) -> list[LineRejection]:
    return [LineRejection(line.line_id, reason, str(error)) for line in batch.lines]


def _with_allowance(limit: RateLimit, allowance_ms: int) -> RateLimit:
    """The limit slowed so that a send delayed by up to allowance_ms after its
    admission (a busy event loop, a slot to wait for) cannot land in the same ERP
    second as the sends admitted a full second after it. The window guarantee of
    rate_limit.py holds for admission times; stretching the window it is computed
    for by the allowance extends it to arrival times that lag by at most that much."""
    stretch = 1.0 + allowance_ms / 1_000
    return RateLimit(
        limit.name, rate_per_s=limit.rate_per_s / stretch, burst=limit.burst
    )


def application_name(config: BridgeConfig) -> str:
    return f"stockward-bridge:{config.name}:{config.database_schema}"


def make_adapter(config: BridgeConfig) -> ErpAdapter:
    if config.adapter == "file":
        # Made at start for convenience; vanishing later is the ERP side's fault
        # and shows as failed sends.
        pathlib.Path(config.drop_dir).mkdir(parents=True, exist_ok=True)
        return FileDropAdapter(directory=config.drop_dir)
    header: tuple[str, str] | None = None
    if config.erp_auth_header:
        name, _, value = config.erp_auth_header.partition(":")
        header = (name.strip(), value.strip())
    mapping = json.loads(config.erp_field_mapping) if config.erp_field_mapping else {}
    return HttpAdapter(url=config.erp_url, auth_header=header, field_mapping=mapping)
