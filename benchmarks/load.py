"""Load generation: run one operation many times and record what happened and how long.

Design note. The generator knows nothing of gRPC or reservations: an operation is an
async callable that performs logical operation number i and returns an outcome label.
Two ways of driving it answer two different questions.

Closed loop (`run_closed`): a fixed number of workers, each starting its next operation
as soon as the previous one completes. It answers "how much can the system do with this
many callers?". Its latency figures are honest only about the operations it sent: when
the system stalls, the workers stall with it and send nothing, so the stall appears in
one sample per worker however long it lasts. This is coordinated omission.

Open loop (`run_open`): operations arrive on a fixed schedule, operation i at
t0 + i/rate, whether or not earlier ones have completed. Latency is measured from that
intended start, not from the moment the generator got round to starting it, so a stall
is charged to every operation that should have been sent while it lasted. It answers
"what do callers arriving at this rate experience?". Outstanding operations are capped
(`in_flight_max`) so that an overloaded system cannot make the generator exhaust memory;
operations held back by the cap still have their latency counted from their intended
start, and are counted as late starts.

Both loops read time only through an injected `monotonic` (and the open loop sleeps
only through an injected `sleep`), so tests drive them on a virtual clock.

Known shortcoming: the asyncio event loop wakes timers with whole-millisecond
granularity (epoll waits in milliseconds), so open-loop operations start up to about
1 ms after their intended time and that slack is included in their latency. Open-loop
latencies below a few milliseconds carry that error; closed-loop ones do not.
"""

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, TypedDict

from hdrh.histogram import HdrHistogram

log = logging.getLogger(__name__)

Op = Callable[[int], Awaitable[str]]
"""Performs logical operation number i and returns its outcome label."""

Monotonic = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
Progress = Callable[[int], None]
"""Called with the number of operations completed so far."""
Stop = Callable[[Mapping[str, int]], bool]
"""Given the outcome counts so far, says whether to start no more operations."""

US_PER_S = 1_000_000

# The histogram's range. A reservation call that takes a minute is a hang, not a slow
# answer; longer latencies are recorded at the ceiling rather than dropped, so they
# still count in the percentiles.
LATENCY_LOWEST_US = 1
LATENCY_HIGHEST_US = 60 * US_PER_S
# Three significant digits: percentiles are exact to 0.1%, far finer than run-to-run
# noise, and the histogram stays at a few tens of kilobytes.
LATENCY_SIGNIFICANT_DIGITS = 3

# An open-loop operation counts as a late start only past the event loop's timer
# granularity (see the design note); anything sooner is as punctual as asyncio can be.
LATE_START_S = 0.001

# Ten progress updates a second keep a bar smooth while costing one call per 100 ms
# instead of one per operation.
PROGRESS_INTERVAL_S = 0.1

ERROR_PREFIX = "error:"


class LoadFigures(TypedDict):
    """A LoadResult as plain JSON: what the report reads."""

    name: str
    mode: Literal["closed", "open"]
    completed: int
    outcomes: dict[str, int]
    elapsed_s: float
    per_s: float
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    target_rate_per_s: float | None
    late_starts: int
    concurrency: int
    in_flight_peak: int


def new_latency_histogram() -> Any:
    """An empty histogram of latencies in microseconds, over the range above."""
    return HdrHistogram(
        LATENCY_LOWEST_US, LATENCY_HIGHEST_US, LATENCY_SIGNIFICANT_DIGITS
    )


@dataclass
class LoadResult:
    """What one load run did.

    `latency_us` is an HdrHistogram of per-operation latencies in microseconds.
    `concurrency` is the number of workers (closed loop) or the in-flight cap (open
    loop); `in_flight_peak` is the most operations ever outstanding at once.
    """

    name: str
    mode: Literal["closed", "open"]
    completed: int
    outcomes: dict[str, int]
    elapsed_s: float
    latency_us: Any
    target_rate_per_s: float | None = None
    late_starts: int = 0
    concurrency: int = 0
    in_flight_peak: int = 0

    @property
    def per_s(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, percentile: float) -> float:
        if self.latency_us.get_total_count() == 0:
            return 0.0
        return float(self.latency_us.get_value_at_percentile(percentile)) / 1_000

    @property
    def p50_ms(self) -> float:
        return self.percentile_ms(50)

    @property
    def p90_ms(self) -> float:
        return self.percentile_ms(90)

    @property
    def p99_ms(self) -> float:
        return self.percentile_ms(99)

    @property
    def p999_ms(self) -> float:
        return self.percentile_ms(99.9)

    @property
    def max_ms(self) -> float:
        if self.latency_us.get_total_count() == 0:
            return 0.0
        return float(self.latency_us.get_max_value()) / 1_000

    @property
    def mean_ms(self) -> float:
        if self.latency_us.get_total_count() == 0:
            return 0.0
        return float(self.latency_us.get_mean_value()) / 1_000

    def to_json(self) -> LoadFigures:
        return LoadFigures(
            name=self.name,
            mode=self.mode,
            completed=self.completed,
            outcomes=dict(self.outcomes),
            elapsed_s=self.elapsed_s,
            per_s=self.per_s,
            mean_ms=self.mean_ms,
            p50_ms=self.p50_ms,
            p90_ms=self.p90_ms,
            p99_ms=self.p99_ms,
            p999_ms=self.p999_ms,
            max_ms=self.max_ms,
            target_rate_per_s=self.target_rate_per_s,
            late_starts=self.late_starts,
            concurrency=self.concurrency,
            in_flight_peak=self.in_flight_peak,
        )


class _Tally:
    """Outcome counts, latency histogram, in-flight accounting and progress calls."""

    def __init__(self, *, monotonic: Monotonic, progress: Progress | None) -> None:
        self.monotonic = monotonic
        self.outcomes: dict[str, int] = {}
        self.latency_us = new_latency_histogram()
        self.completed = 0
        self.in_flight = 0
        self.in_flight_peak = 0
        self._progress = progress
        self._progress_last_s = monotonic()

    def begin(self) -> None:
        self.in_flight += 1
        self.in_flight_peak = max(self.in_flight_peak, self.in_flight)

    def finish(self, outcome: str, *, since_s: float) -> None:
        """Record an operation that completed now, timed from `since_s`."""
        now_s = self.monotonic()
        latency_us = round((now_s - since_s) * US_PER_S)
        self.latency_us.record_value(
            min(max(latency_us, LATENCY_LOWEST_US), LATENCY_HIGHEST_US)
        )
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.completed += 1
        self.in_flight -= 1

        if self._progress is not None and (
            now_s - self._progress_last_s >= PROGRESS_INTERVAL_S
        ):
            self._progress_last_s = now_s
            self._progress(self.completed)

    def close(self) -> None:
        """Report final progress, so that a bar always ends at the true count."""
        if self._progress is not None:
            self._progress(self.completed)


async def _perform(op: Op, index: int) -> str:
    """Run one operation; an exception becomes an outcome, never escapes."""
    try:
        return await op(index)
    except Exception as error:
        log.debug("operation failed: index=%d error=%r", index, error)
        return ERROR_PREFIX + type(error).__name__


async def run_closed(
    op: Op,
    *,
    name: str,
    concurrency: int,
    total: int | None = None,
    duration_s: float | None = None,
    stop: Stop | None = None,
    progress: Progress | None = None,
    monotonic: Monotonic = time.monotonic,
) -> LoadResult:
    """Run `op` from `concurrency` workers, each starting its next operation as soon as
    its previous one completes.

    No operation starts once `total` have been started, `duration_s` has passed, or
    `stop(outcome_counts)` has returned True, whichever comes first; operations already
    running then complete and are counted, so a run ended by `stop` completes up to
    `concurrency - 1` operations after the one that ended it. Latency runs from the
    call to its completion.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if total is None and duration_s is None and stop is None:
        raise ValueError("a closed loop needs total, duration_s or stop to end")
    if total is not None and total < 0:
        raise ValueError(f"total must not be negative, got {total}")

    tally = _Tally(monotonic=monotonic, progress=progress)
    outcomes_view = MappingProxyType(tally.outcomes)
    started_s = monotonic()
    deadline_s = math.inf if duration_s is None else started_s + duration_s
    total_max = math.inf if total is None else total
    next_index = 0
    is_stopped = False

    async def worker() -> None:
        nonlocal next_index, is_stopped
        while not is_stopped and next_index < total_max:
            begun_s = monotonic()
            if begun_s >= deadline_s:
                return
            index = next_index
            next_index += 1

            tally.begin()
            outcome = await _perform(op, index)
            tally.finish(outcome, since_s=begun_s)

            if stop is not None and not is_stopped and stop(outcomes_view):
                is_stopped = True

    async with asyncio.TaskGroup() as workers:
        for _ in range(concurrency):
            workers.create_task(worker())
    tally.close()

    result = LoadResult(
        name=name,
        mode="closed",
        completed=tally.completed,
        outcomes=tally.outcomes,
        elapsed_s=monotonic() - started_s,
        latency_us=tally.latency_us,
        concurrency=concurrency,
        in_flight_peak=tally.in_flight_peak,
    )
    _log_finished(result)
    return result


def _arrival_offsets_s(rate_per_s: float, duration_s: float) -> Iterator[float]:
    """Offsets from the start at which operations 0, 1, 2, ... are intended to begin."""
    index = 0
    while (offset_s := index / rate_per_s) < duration_s:
        yield offset_s
        index += 1


async def _sleep_until(deadline_s: float, monotonic: Monotonic, sleep: Sleep) -> None:
    # A timer may fire a hair early; loop so that nothing starts before its time.
    while (remaining_s := deadline_s - monotonic()) > 0:
        await sleep(remaining_s)


async def run_open(
    op: Op,
    *,
    name: str,
    rate_per_s: float,
    duration_s: float,
    in_flight_max: int,
    progress: Progress | None = None,
    monotonic: Monotonic = time.monotonic,
    sleep: Sleep = asyncio.sleep,
) -> LoadResult:
    """Start operation i at its intended time t0 + i/rate_per_s, for every i whose
    intended time falls within `duration_s`, then wait for all of them to complete.

    Latency runs from the intended start to completion. When `in_flight_max` operations
    are outstanding, the next one waits for a slot; its latency still runs from its
    intended start, and it counts in `late_starts` if it began more than LATE_START_S
    after that. Elapsed time runs until the last operation completes.
    """
    if rate_per_s <= 0:
        raise ValueError(f"rate_per_s must be positive, got {rate_per_s}")
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    if in_flight_max < 1:
        raise ValueError(f"in_flight_max must be at least 1, got {in_flight_max}")

    tally = _Tally(monotonic=monotonic, progress=progress)
    slots = asyncio.Semaphore(in_flight_max)
    started_s = monotonic()
    late_starts = 0

    async def perform(index: int, intended_s: float) -> None:
        try:
            outcome = await _perform(op, index)
            tally.finish(outcome, since_s=intended_s)
        finally:
            slots.release()

    async with asyncio.TaskGroup() as in_flight:
        for index, offset_s in enumerate(_arrival_offsets_s(rate_per_s, duration_s)):
            intended_s = started_s + offset_s
            await _sleep_until(intended_s, monotonic, sleep)
            await slots.acquire()

            if monotonic() - intended_s > LATE_START_S:
                late_starts += 1
            tally.begin()
            in_flight.create_task(perform(index, intended_s))
    tally.close()

    result = LoadResult(
        name=name,
        mode="open",
        completed=tally.completed,
        outcomes=tally.outcomes,
        elapsed_s=monotonic() - started_s,
        latency_us=tally.latency_us,
        target_rate_per_s=rate_per_s,
        late_starts=late_starts,
        concurrency=in_flight_max,
        in_flight_peak=tally.in_flight_peak,
    )
    _log_finished(result)
    return result


def _log_finished(result: LoadResult) -> None:
    log.info(
        "load run finished: name=%s mode=%s completed=%d per_s=%.1f p50_ms=%.3f "
        "p99_ms=%.3f max_ms=%.3f late_starts=%d in_flight_peak=%d",
        result.name,
        result.mode,
        result.completed,
        result.per_s,
        result.p50_ms,
        result.p99_ms,
        result.max_ms,
        result.late_starts,
        result.in_flight_peak,
    )
