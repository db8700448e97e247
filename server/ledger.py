"""The ledger: the engine plus its write-ahead log, answering only what is durable.

Design note. `execute` decides a command in the engine and hands the decision to its
shard's writer without awaiting in between, so queue order is seq order. It answers
once the writer reports the batch committed. A retry of a request whose first answer is
still being written waits for that write instead of deciding twice.

When a write fails the in-memory state may no longer match Postgres (the commit may or
may not have happened). The ledger then stops taking commands (UNAVAILABLE, health
NOT_SERVING), lets every writer finish or fail what it has, and recovers a fresh engine
from Postgres, retrying until Postgres answers.
"""

import asyncio
import contextlib
import dataclasses
import enum
import functools
import gc
import logging
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from server.clock import Clock
from server.config import Config
from server.engine.commands import Command, Result
from server.engine.engine import Decision, Engine, Replay
from server.engine.errors import (
    EngineError,
    InvariantBroken,
    Overloaded,
    Unavailable,
    ensure,
)
from server.engine.limits import Limits
from server.wal.checkpoint import store_checkpoint
from server.wal.recovery import recover
from server.wal.retention import prune_shard
from server.wal.schema import (
    DATABASE_ERRORS,
    check_durability,
    ensure_schema,
    take_ownership,
)
from server.wal.writer import ShardWriter, WriterStats

log = logging.getLogger(__name__)

# Recovery retries while Postgres is down: first wait, and the cap of the doubling.
_RECOVERY_RETRY_FIRST_S = 0.2
_RECOVERY_RETRY_MAX_S = 5.0


class LedgerState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    RECOVERING = "recovering"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclasses.dataclass(frozen=True, slots=True)
class LedgerStats:
    state: LedgerState
    recoveries: int
    checkpoints: int
    records_since_checkpoint: int
    # Write-ahead records deleted by retention since the server started.
    records_pruned: int
    writers: tuple[WriterStats, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class DurableCut:
    """What Postgres holds as of one instant: the last durable seq per shard, and the
    durable figures of the positions asked for at that same instant."""

    seqs: tuple[int, ...]
    # (sku, location) -> on-hand
    on_hand: dict[tuple[str, str], int]
    # (channel, sku, location) -> held
    held: dict[tuple[str, str, str], int]


@dataclasses.dataclass(frozen=True, slots=True)
class _Pending:
    """An answer and the write it waits for (None: already durable)."""

    result: Result
    future: "asyncio.Future[None] | None"


class Ledger:
    def __init__(
        self,
        *,
        config: Config,
        pool: asyncpg.Pool,
        clock: Clock,
        on_state: Callable[[LedgerState], None] = lambda _: None,
        on_invariant_broken: Callable[[BaseException], None],
    ) -> None:
        self._on_invariant_broken = on_invariant_broken
        self._config = config
        self._pool = pool
        self._clock = clock
        self._on_state = on_state
        self._limits = Limits(ttl_default_s=config.ttl_default_s)
        self._engine: Engine | None = None
        self._writers: list[ShardWriter] = []
        self._writer_tasks: list[asyncio.Task[None]] = []
        self._inflight: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._gate = asyncio.Event()
        self._gate.set()
        self._state = LedgerState.STARTING
        self._recovery_task: asyncio.Task[None] | None = None
        self._owner: asyncpg.Connection | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._recoveries = 0
        self._checkpoints = 0
        self._records_at_checkpoint = 0
        self._records_pruned = 0

    # Lifecycle --------------------------------------------------------------------------

    @property
    def state(self) -> LedgerState:
        return self._state

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise Unavailable("NOT_SERVING", "the server is starting; retry shortly")
        return self._engine

    def reader(self) -> Engine:
        """The engine, for reads. While recovering it may show changes whose write
        failed and that recovery will undo, so reads then get UNAVAILABLE too.

        Known shortcoming: while serving, reads show decisions whose commit is still
        on its way (a few milliseconds); if that commit fails, recovery undoes them.
        """
        if self._state not in {LedgerState.SERVING, LedgerState.STOPPING}:
            raise Unavailable(
                "NOT_SERVING", f"the server is {self._state.value}; retry shortly"
            )
        return self.engine

    async def start(self) -> None:
        async with self._pool.acquire() as conn:
            await check_durability(
                conn, allow_unsafe=self._config.unsafe_allow_lossy_postgres
            )
            await ensure_schema(conn, shard_count=self._config.shards)
        await self._own_schema()
        await self._recover_once()
        self._loops = [
            asyncio.create_task(self._expiry_loop(), name="expiry"),
            asyncio.create_task(self._checkpoint_loop(), name="checkpoint"),
            asyncio.create_task(self._prune_loop(), name="wal-prune"),
        ]

    async def stop(self) -> None:
        """Take no more commands, write what is queued, checkpoint, stop."""
        self._set_state(LedgerState.STOPPING)
        for task in self._loops:
            task.cancel()
        if self._recovery_task is not None:
            self._recovery_task.cancel()
        for task in [*self._loops, *filter(None, [self._recovery_task])]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for writer in self._writers:
            await writer.close()
        if self._engine is not None and not any(
            w.stats().failed for w in self._writers
        ):
            with contextlib.suppress(*DATABASE_ERRORS):
                await self._store_checkpoint()
        for task in self._writer_tasks:
            task.cancel()
        if self._owner is not None:
            self._owner.remove_termination_listener(self._on_owner_lost)
            with contextlib.suppress(*DATABASE_ERRORS):
                await self._pool.release(self._owner)
            self._owner = None
        self._set_state(LedgerState.STOPPED)

    def _set_state(self, state: LedgerState) -> None:
        if state is not self._state:
            log.info("ledger state: from=%s to=%s", self._state.value, state.value)
            self._state = state
            self._on_state(state)

    # Commands ---------------------------------------------------------------------------

    async def execute(self, command: Command) -> Result:
        await self._wait_for_gate()
        self._check_serving()
        self._check_room()
        pending = self._submit(self.engine.decide(command))
        return await self._settle(pending)

    async def execute_batch(
        self, commands: Sequence[Command]
    ) -> list[Result | EngineError]:
        """Independent commands decided back to back, written together."""
        await self._wait_for_gate()
        self._check_serving()
        self._check_room()
        pendings: list[_Pending | EngineError] = []
        for command in commands:
            try:
                pendings.append(self._submit(self.engine.decide(command)))
            except EngineError as error:
                pendings.append(error)
        # One wait for every write of the batch rather than a task per command: the
        # tasks cost more than the decisions. asyncio.wait leaves the writes running
        # if this caller goes away, as shield does for a single command.
        writes = {
            p.future
            for p in pendings
            if isinstance(p, _Pending) and p.future is not None
        }
        if writes:
            await asyncio.wait(writes)
        return [self._settled(p) for p in pendings]

    @staticmethod
    def _settled(pending: "_Pending | EngineError") -> Result | EngineError:
        """The answer of a command whose write (if any) has ended."""
        if isinstance(pending, EngineError):
            return pending
        if pending.future is not None:
            try:
                pending.future.result()
            except EngineError as error:
                return error
        return pending.result

    def _check_room(self) -> None:
        # One full shard means Postgres is not keeping up; refuse before deciding, as a
        # decision cannot be taken back.
        if not all(writer.has_room for writer in self._writers):
            raise Overloaded(
                "QUEUE_FULL", "the write-ahead queues are full; retry later"
            )

    def _submit(self, outcome: Decision | Replay) -> "_Pending":
        """Hand a decision to its writer at once: with no await between deciding and
        queueing, queue order is seq order on every shard."""
        if isinstance(outcome, Replay):
            if outcome.durable:
                return _Pending(outcome.result, None)
            first = self._inflight.get(outcome.key)
            if first is None:
                # Remembered, not durable, not in flight: its write failed and recovery
                # will tell whether it happened. Never answer it as done.
                raise Unavailable("WRITE_FAILED", "the first attempt's write failed")
            return _Pending(outcome.result, first)

        future = self._writers[outcome.shard].submit(outcome)
        key = None
        if outcome.request is not None:
            key = (outcome.request.scope, outcome.request.request_id)
            self._inflight[key] = future
        future.add_done_callback(functools.partial(self._written, key))
        return _Pending(outcome.result, future)

    def _written(
        self, key: tuple[str, str] | None, future: "asyncio.Future[None]"
    ) -> None:
        # Removed when the write ends, not when a waiter gives up: a retry arriving
        # after the first caller's deadline must still wait for the same write.
        if key is not None and self._inflight.get(key) is future:
            del self._inflight[key]
        if not future.cancelled():
            future.exception()  # retrieved, so a failure nobody awaits is not logged

    @staticmethod
    async def _settle(pending: "_Pending") -> Result:
        if pending.future is not None:
            await asyncio.shield(pending.future)
        return pending.result

    async def _wait_for_gate(self) -> None:
        if not self._gate.is_set():
            await self._gate.wait()

    def _check_serving(self) -> None:
        if self._state is not LedgerState.SERVING:
            raise Unavailable(
                "NOT_SERVING", f"the server is {self._state.value}; retry shortly"
            )

    # Expiry -----------------------------------------------------------------------------

    async def sweep_expired(self) -> int:
        """Expire due holds now; returns how many. The expiry loop calls this each tick."""
        if self._state is not LedgerState.SERVING:
            return 0
        decisions = self.engine.expire_due(count_max=self._config.expiry_batch_max)
        writes = [self._submit(decision).future for decision in decisions]
        if writes:
            await asyncio.wait({write for write in writes if write is not None})
        failed = sum(
            1
            for write in writes
            if write is not None and (write.cancelled() or write.exception())
        )
        if failed:
            log.warning("expiry write failed: holds=%d", failed)
        return len(decisions) - failed

    async def _expiry_loop(self) -> None:
        while True:
            await self._clock.sleep(self._config.expiry_tick_s)
            try:
                # A full sweep means more are due: catch up at once. Each sweep
                # waits for its writes, so requests are served in between.
                full = True
                while full:
                    swept = await self.sweep_expired()
                    full = swept >= self._config.expiry_batch_max
                self.engine.prune()
            except EngineError as error:
                log.warning("expiry sweep skipped: reason=%s", error.reason)

    # Checkpoints ------------------------------------------------------------------------

    async def checkpoint(self) -> int:
        """Pause decisions, wait for every write, snapshot, resume, then store it.

        Known shortcoming: the snapshot is taken on the event loop, so decisions pause
        for about a microsecond per position and reservation (about a second per
        million active holds).
        """
        self._check_serving()
        self._gate.clear()
        try:
            for writer in self._writers:
                await writer.drain()
            self._check_serving()
            rows = self.engine.checkpoint_rows()
        finally:
            self._gate.set()
        checkpoint_id = await self._write_checkpoint(*rows)
        self._checkpoints += 1
        self._records_at_checkpoint = sum(rows[2])
        return checkpoint_id

    async def _store_checkpoint(self) -> None:
        if self._state in {LedgerState.SERVING, LedgerState.STOPPING}:
            await self._write_checkpoint(*self.engine.checkpoint_rows())

    async def _write_checkpoint(
        self,
        positions: list[tuple[str, str, int, int]],
        reservations: list[dict[str, Any]],
        seqs: list[int],
        policies: dict[str, Any],
    ) -> int:
        now_us = self._clock.now_us()
        retention_us = self._config.idempotency_retention_s * 1_000_000
        async with self._pool.acquire() as conn:
            return await store_checkpoint(
                conn,
                positions=positions,
                reservations=reservations,
                shard_seqs=seqs,
                policies=policies,
                created_us=now_us,
                request_horizon_us=now_us - retention_us,
            )

    def _records_since_checkpoint(self) -> int:
        if self._engine is None:
            return 0
        total = sum(shard.next_seq - 1 for shard in self._engine.shards)
        return total - self._records_at_checkpoint

    async def _checkpoint_loop(self) -> None:
        while True:
            await self._clock.sleep(self._config.checkpoint_interval_s)
            if self._records_since_checkpoint() < self._config.checkpoint_records_min:
                continue
            try:
                await self.checkpoint()
            except EngineError as error:
                log.warning("checkpoint skipped: reason=%s", error.reason)
            except DATABASE_ERRORS as error:
                log.warning("checkpoint failed: error=%r", error)

    # Durable cut -----------------------------------------------------------------------

    def durable_cut(
        self,
        positions: Sequence[tuple[str, str]],
        channel_keys: Sequence[tuple[str, str, str]],
    ) -> DurableCut:
        """The durable seqs and figures, read without awaiting: writers mark a whole
        batch durable (engine state and seq together) within one step of the event
        loop, so nothing can change between reading the seqs and the figures.

        Held per channel has no pending count in the engine, so it is the decided held
        less the held deltas of every record still in flight; on-hand is read both
        ways and must agree.
        """
        self._check_serving()
        engine = self.engine
        seqs = tuple(writer.durable_seq for writer in self._writers)
        on_hand_inflight: dict[tuple[str, str], int] = {}
        held_inflight: dict[tuple[str, str, str], int] = {}
        for writer in self._writers:
            for decision in writer.undurable():
                if decision.record is not None:
                    _add_effects(decision.record.body, on_hand_inflight, held_inflight)

        on_hand: dict[tuple[str, str], int] = {}
        for at in positions:
            durable = engine.durable_on_hand(*at)
            ensure(
                durable == engine.on_hand(*at) - on_hand_inflight.get(at, 0),
                f"durable on-hand of {at} disagrees with the records in flight",
            )
            on_hand[at] = durable
        held = {
            key: engine.channel_held.get(key, 0) - held_inflight.get(key, 0)
            for key in channel_keys
        }
        return DurableCut(seqs=seqs, on_hand=on_hand, held=held)

    # Record retention -------------------------------------------------------------------

    async def prune_records(self) -> int:
        """Delete the write-ahead records nothing needs any more (see retention.py);
        returns how many."""
        pruned = 0
        for shard in range(self._config.shards):
            async with self._pool.acquire() as conn:
                count = await prune_shard(
                    conn,
                    shard=shard,
                    retention_s=self._config.wal_retention_s,
                    records_max=self._config.wal_prune_records_max,
                    timeout_s=self._config.database_timeout_s,
                )
            if count:
                log.info("wal pruned: shard=%d records=%d", shard, count)
            pruned += count
        self._records_pruned += pruned
        return pruned

    async def _prune_loop(self) -> None:
        while True:
            await self._clock.sleep(self._config.wal_prune_interval_s)
            try:
                await self.prune_records()
            except DATABASE_ERRORS as error:
                log.warning("wal prune failed: error=%r", error)

    # Recovery ---------------------------------------------------------------------------

    def _on_write_failure(self, error: BaseException) -> None:
        if self._state is not LedgerState.SERVING:
            return
        self._set_state(LedgerState.RECOVERING)
        for writer in self._writers:
            writer.abort("another shard's write failed; recovering")
        self._recovery_task = asyncio.create_task(self._recover_until_done())

    async def _recover_until_done(self) -> None:
        delay_s = _RECOVERY_RETRY_FIRST_S
        while True:
            try:
                await self._recover_once()
                return
            except InvariantBroken as error:
                # Postgres holds state that breaks the engine's rules: serving from it
                # could oversell. Stop loudly rather than retry.
                self._on_invariant_broken(error)
                return
            except DATABASE_ERRORS as error:
                log.error("recovery failed: retry_s=%.1f error=%r", delay_s, error)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, _RECOVERY_RETRY_MAX_S)

    async def _own_schema(self) -> None:
        """Hold the schema's owner lock on a connection kept for that alone."""
        if self._owner is not None and not self._owner.is_closed():
            return
        conn: asyncpg.Connection = await self._pool.acquire()
        try:
            await take_ownership(conn, wait_s=self._config.owner_wait_s)
        except BaseException:
            await self._pool.release(conn)
            raise
        conn.add_termination_listener(self._on_owner_lost)
        self._owner = conn

    def _on_owner_lost(self, conn: asyncpg.Connection) -> None:
        # Without the lock another server could start on this schema: stop deciding
        # until the lock is ours again and the state is re-read.
        log.error("schema ownership lost: recovering")
        self._owner = None
        self._on_write_failure(ConnectionError("owner connection ended"))

    async def _recover_once(self) -> None:
        self._set_state(LedgerState.RECOVERING)
        for writer in self._writers:
            await writer.drain()
        for task in self._writer_tasks:
            task.cancel()
        await self._own_schema()
        # Recovery builds millions of objects that all live on: collections while
        # it runs would find nothing to free and walk more each time. Afterwards
        # they are frozen, so that full collections never walk them again.
        gc.disable()
        try:
            async with asyncio.timeout(max(60.0, self._config.database_timeout_s)):
                async with self._pool.acquire() as conn:
                    engine = await recover(
                        conn,
                        shard_count=self._config.shards,
                        clock=self._clock,
                        limits=self._limits,
                        idempotency_retention_s=self._config.idempotency_retention_s,
                    )
        finally:
            gc.freeze()
            gc.enable()
        self._engine = engine
        self._inflight.clear()
        self._writers = [
            ShardWriter(
                shard=shard.index,
                last_seq=shard.next_seq - 1,
                pool=self._pool,
                on_durable=engine.mark_durable,
                on_failure=self._on_write_failure,
                batch_entries_max=self._config.batch_entries_max,
                queue_entries_max=self._config.queue_entries_max,
                commit_timeout_s=self._config.commit_timeout_s,
            )
            for shard in engine.shards
        ]
        self._writer_tasks = [
            asyncio.create_task(self._run_writer(w), name=f"wal-writer-{w.shard}")
            for w in self._writers
        ]
        self._records_at_checkpoint = sum(shard.next_seq - 1 for shard in engine.shards)
        self._recoveries += 1
        self._set_state(LedgerState.SERVING)

    async def _run_writer(self, writer: ShardWriter) -> None:
        try:
            await writer.run()
        except InvariantBroken as error:
            self._on_invariant_broken(error)

    def stats(self) -> LedgerStats:
        return LedgerStats(
            state=self._state,
            recoveries=self._recoveries,
            checkpoints=self._checkpoints,
            records_since_checkpoint=self._records_since_checkpoint(),
            records_pruned=self._records_pruned,
            writers=tuple(w.stats() for w in self._writers),
        )


def _add_effects(
    body: dict[str, Any],
    on_hand: dict[tuple[str, str], int],
    held: dict[tuple[str, str, str], int],
) -> None:
    """Add a record's stock effects: on-hand per position, held per channel."""
    reservation = body.get("rsv")
    channel = reservation["channel"] if reservation else ""
    for sku, location, on_hand_delta, held_delta in body.get("fx", ()):
        at = (sku, location)
        on_hand[at] = on_hand.get(at, 0) + on_hand_delta
        if held_delta:
            key = (channel, sku, location)
            held[key] = held.get(key, 0) + held_delta
