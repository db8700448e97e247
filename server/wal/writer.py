"""Group commit: one writer per shard turns many decisions into one transaction.

Design note. Decisions queue up while the previous transaction commits; the writer then
takes everything queued (up to batch_entries_max) and writes it in one transaction: the
records with COPY, the request-log rows with one array INSERT. One fsync then covers the
whole batch, which is where the throughput comes from. A shard has exactly one writer
and it never overlaps its own transactions, so its seqs commit in order and without gaps.

A failed or timed-out transaction may still have committed (the connection can die
between COMMIT and its answer). So after a failure the writer takes nothing more: every
queued decision fails with UNAVAILABLE, and the ledger rebuilds the engine from what
Postgres actually holds. A retry with the same request id then finds the stored answer
if the write had in fact committed.
"""

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator

import asyncpg

from server.engine.engine import Decision
from server.engine.errors import Unavailable, ensure
from server.wal import codec
from server.wal.schema import DATABASE_ERRORS, WRITE_FENCE_SHARED

log = logging.getLogger(__name__)

_RECORD_COLUMNS = ("shard", "seq", "kind", "reservation_id", "body", "recorded_us")

_INSERT_REQUESTS = """
INSERT INTO request_log (scope, request_id, fingerprint, result, created_us)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::bigint[])
ON CONFLICT (scope, request_id) DO UPDATE
    SET fingerprint = excluded.fingerprint,
        result = excluded.result,
        created_us = excluded.created_us
"""
# A request id may come back after its retention ended and the server forgot it; the
# new answer then replaces the stale one instead of failing the whole batch.


@dataclasses.dataclass(frozen=True, slots=True)
class WriterStats:
    shard: int
    queued: int
    queued_peak: int
    queue_entries_max: int
    batches: int
    entries: int
    batch_entries_peak: int
    last_commit_ms: float
    failed: bool


class WriterFailed(Unavailable):
    pass


class ShardWriter:
    def __init__(
        self,
        *,
        shard: int,
        last_seq: int,
        pool: asyncpg.Pool,
        on_durable: Callable[[Decision], None],
        on_failure: Callable[[BaseException], None],
        batch_entries_max: int,
        queue_entries_max: int,
        commit_timeout_s: float,
    ) -> None:
        self.shard = shard
        self._pool = pool
        self._on_durable = on_durable
        self._on_failure = on_failure
        self._batch_entries_max = batch_entries_max
        self._queue_entries_max = queue_entries_max
        self._commit_timeout_s = commit_timeout_s
        self._queue: collections.deque[tuple[Decision, asyncio.Future[None]]] = (
            collections.deque()
        )
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._failed = False
        self._closing = False
        # The seq of the last record this shard handed to Postgres.
        self._last_seq = last_seq
        # The seq of the last record marked durable in the engine. It moves in the
        # same step of the event loop as the engine's marks, so that a reader between
        # two steps sees a seq and engine state that agree (see reconciliation.py).
        self._durable_seq = last_seq
        # The batch being committed: decided, out of the queue, not durable yet.
        self._writing: list[Decision] = []
        self._queued_peak = 0
        self._batches = 0
        self._entries = 0
        self._batch_entries_peak = 0
        self._last_commit_ms = 0.0

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def durable_seq(self) -> int:
        return self._durable_seq

    def undurable(self) -> Iterator[Decision]:
        """Every decision handed to this writer and not yet marked durable."""
        yield from self._writing
        for decision, _ in self._queue:
            yield decision

    @property
    def has_room(self) -> bool:
        return len(self._queue) < self._queue_entries_max

    def submit(self, decision: Decision) -> asyncio.Future[None]:
        """Queue a decision; the future resolves once it is durable."""
        if self._failed or self._closing:
            raise WriterFailed("WRITE_FAILED", "the write-ahead log is recovering")
        if decision.record is not None:
            ensure(
                decision.record.shard == self.shard, "record queued on the wrong shard"
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((decision, future))
        self._queued_peak = max(self._queued_peak, len(self._queue))
        self._idle.clear()
        self._wakeup.set()
        return future

    async def run(self) -> None:
        """Write batches until closed or failed. Idle is set only when no transaction
        of this writer is open, so a recovery that waits for it never races a commit
        still on its way."""
        try:
            while not self._failed:
                if not self._queue:
                    if self._closing:
                        break
                    self._idle.set()
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                batch = [
                    self._queue.popleft()
                    for _ in range(min(len(self._queue), self._batch_entries_max))
                ]
                if not await self._write(batch):
                    break
        finally:
            self._fail_queued("the write-ahead log stopped taking writes")
            self._idle.set()

    async def drain(self) -> None:
        """Wait until everything queued so far is durable or failed."""
        await self._idle.wait()

    async def close(self) -> None:
        """Write what is queued, then stop."""
        self._closing = True
        self._wakeup.set()
        await self.drain()

    def abort(self, reason: str) -> None:
        """Fail everything queued and take nothing more. A transaction already open
        runs to its end; drain() waits for it."""
        self._failed = True
        self._fail_queued(reason)
        self._wakeup.set()

    def _fail_queued(self, reason: str) -> None:
        while self._queue:
            _, future = self._queue.popleft()
            if not future.done():
                future.set_exception(WriterFailed("WRITE_FAILED", reason))

    def stats(self) -> WriterStats:
        return WriterStats(
            shard=self.shard,
            queued=len(self._queue),
            queued_peak=self._queued_peak,
            queue_entries_max=self._queue_entries_max,
            batches=self._batches,
            entries=self._entries,
            batch_entries_peak=self._batch_entries_peak,
            last_commit_ms=self._last_commit_ms,
            failed=self._failed,
        )

    async def _write(self, batch: list[tuple[Decision, asyncio.Future[None]]]) -> bool:
        decisions = [decision for decision, _ in batch]
        self._writing = decisions
        records = [d.record for d in decisions if d.record is not None]
        for record in records:
            ensure(
                record.seq == self._last_seq + 1,
                f"shard {self.shard} writes seq {record.seq} after {self._last_seq}",
            )
            self._last_seq = record.seq

        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._commit_timeout_s):
                await self._commit(decisions)
        except DATABASE_ERRORS as error:
            log.error(
                "wal commit failed: shard=%d entries=%d error=%r",
                self.shard,
                len(batch),
                error,
            )
            self._failed = True
            self._writing = []
            for _, future in batch:
                if not future.done():
                    future.set_exception(
                        WriterFailed(
                            "WRITE_FAILED", "the write could not be made durable"
                        )
                    )
            self._fail_queued("an earlier write of this shard failed")
            self._on_failure(error)
            return False

        self._last_commit_ms = (time.perf_counter() - started) * 1000
        self._batches += 1
        self._entries += len(batch)
        self._batch_entries_peak = max(self._batch_entries_peak, len(batch))
        # No await from here to the end: the marks, the durable seq and the end of
        # `_writing` change together.
        self._writing = []
        for decision, future in batch:
            self._on_durable(decision)
            if decision.record is not None:
                self._durable_seq = decision.record.seq
            if not future.done():
                future.set_result(None)
        return True

    async def _commit(self, decisions: list[Decision]) -> None:
        records = [
            (
                r.shard,
                r.seq,
                r.kind,
                r.reservation_id,
                codec.encode(r.body),
                r.recorded_us,
            )
            for d in decisions
            if (r := d.record) is not None
        ]
        requests = [d.request for d in decisions if d.request is not None]
        async with self._pool.acquire() as conn, conn.transaction():
            # Shared with every other writer, exclusive for recovery: recovery reads
            # only once no transaction of ours can still commit (see recovery.py).
            await conn.execute(WRITE_FENCE_SHARED)
            if records:
                await conn.copy_records_to_table(
                    "wal_records", records=records, columns=_RECORD_COLUMNS
                )
            if requests:
                await conn.execute(
                    _INSERT_REQUESTS,
                    [r.scope for r in requests],
                    [r.request_id for r in requests],
                    [r.fingerprint for r in requests],
                    [codec.encode(r.result) for r in requests],
                    [r.created_us for r in requests],
                )
