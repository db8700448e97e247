"""Auto-batching: concurrent single commands coalesced into ExecuteBatch calls.

Design note. A Python gRPC client manages a few thousand calls per second; one
ExecuteBatch of a few hundred commands costs little more than one call. So each
command joins a pending list, and the list is sent when it reaches `size_max` or
`window_s` after its first command arrived, whichever comes first. Up to
`in_flight_max` batches may be on the wire at once; a new list fills while they are.

Each caller awaits its own future, under its own deadline: a batch is sent with the
latest deadline among its commands, and a caller whose deadline passes first gets
DeadlineExceededError while the batch carries on for the others. A batch that fails
as a whole with UNAVAILABLE, or a single command answered UNAVAILABLE, is retried
under the retry policy with the same request ids, so the server applies each
command once.
"""

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable

import grpc

from clients.errors import (
    DeadlineExceededError,
    StockwardError,
    error_from_status,
)
from clients.retry import RetryPolicy
from stockward.v1 import inventory_pb2

log = logging.getLogger(__name__)

# The server takes at most 1,000 commands per ExecuteBatch.
BATCH_SIZE_LIMIT = 1000

SendBatch = Callable[
    [list[inventory_pb2.Command], float], Awaitable[list[inventory_pb2.CommandResult]]
]


@dataclasses.dataclass(frozen=True, slots=True)
class Batching:
    # How long the first command of a batch waits for company. 2 ms adds little
    # to a reservation's latency and, under load, fills batches of hundreds.
    window_s: float = 0.002
    size_max: int = 500
    # Batches on the wire at once: enough to keep the server's shards busy while
    # one batch's results travel back.
    in_flight_max: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.size_max <= BATCH_SIZE_LIMIT:
            raise ValueError(f"size_max must be from 1 to {BATCH_SIZE_LIMIT}")
        if self.window_s < 0 or self.in_flight_max < 1:
            raise ValueError("window_s must be >= 0 and in_flight_max >= 1")


@dataclasses.dataclass(slots=True)
class _Item:
    command: inventory_pb2.Command
    future: asyncio.Future[inventory_pb2.CommandResult]
    deadline: float
    attempt: int = 1


@dataclasses.dataclass(slots=True)
class BatchStats:
    batches_sent: int = 0
    commands_sent: int = 0
    retries: int = 0


class Batcher:
    def __init__(
        self,
        send: SendBatch,
        batching: Batching,
        retry: RetryPolicy,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._send = send
        self._batching = batching
        self._retry = retry
        self._rng = rng or random.Random()
        self._pending: list[_Item] = []
        self._timer: asyncio.TimerHandle | None = None
        self._slots = asyncio.Semaphore(batching.in_flight_max)
        # Sending tasks, held so that the loop cannot collect them mid-flight.
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats = BatchStats()

    async def submit(
        self, command: inventory_pb2.Command, deadline: float
    ) -> inventory_pb2.CommandResult:
        """Send `command` in a batch; its result, or the error it got alone."""
        loop = asyncio.get_running_loop()
        item = _Item(command, loop.create_future(), deadline)
        self._add(item)
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                return await asyncio.shield(item.future)
        except TimeoutError:
            raise DeadlineExceededError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the deadline passed while the batch was on its way",
            ) from None

    async def close(self) -> None:
        """Send what is pending and wait for every batch on the wire."""
        self._flush()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _add(self, item: _Item) -> None:
        self._pending.append(item)
        if len(self._pending) >= self._batching.size_max:
            self._flush()
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._batching.window_s, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending:
            items = self._pending[: self._batching.size_max]
            del self._pending[: self._batching.size_max]
            task = asyncio.get_running_loop().create_task(self._send_batch(items))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send_batch(self, items: list[_Item]) -> None:
        async with self._slots:
            items = [item for item in items if not item.future.done()]
            if not items:
                return
            timeout_s = max(item.deadline for item in items) - time.monotonic()
            self.stats.batches_sent += 1
            self.stats.commands_sent += len(items)
            try:
                results = await self._send([item.command for item in items], timeout_s)
            except StockwardError as error:
                log.debug("batch failed: commands=%d error=%s", len(items), error)
                # One delay for all, so that the batch is sent again as a batch.
                delay_s = self._retry.delay_s(error, items[0].attempt, self._rng)
                for item in items:
                    self._retry_or_fail(item, error, delay_s)
                return
        assert len(results) == len(items), "ExecuteBatch answered a different count"
        for item, result in zip(items, results, strict=True):
            if result.WhichOneof("result") == "error":
                refused = error_from_status(result.error)
                delay_s = self._retry.delay_s(refused, item.attempt, self._rng)
                self._retry_or_fail(item, refused, delay_s)
            elif not item.future.done():
                item.future.set_result(result)

    def _retry_or_fail(
        self, item: _Item, error: StockwardError, delay_s: float
    ) -> None:
        if item.future.done():
            return
        if self._retry.should_retry(error, item.attempt) and (
            time.monotonic() + delay_s < item.deadline
        ):
            item.attempt += 1
            self.stats.retries += 1
            asyncio.get_running_loop().call_later(delay_s, self._add, item)
            return
        item.future.set_exception(error)


def _loop_time(deadline: float) -> float:
    """A time.monotonic() deadline on the event loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())
