"""The load generator: closed and open loops, on a virtual clock where timing counts."""

import asyncio
import heapq
import itertools
import json
import math
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from benchmarks.load import LoadResult, run_closed, run_open

T = TypeVar("T")

NS_PER_S = 1_000_000_000

# Wake-up chains in these tests (a lock handed on, a slot freed, a task started, then a
# new sleep) are a few event-loop passes long; twenty passes leave ample margin before
# the virtual clock decides that everything is waiting on it.
SETTLE_YIELDS = 20


class VirtualClock:
    """Time that stands still while any task can run, then jumps to the next sleeper.

    Runs covering seconds of virtual time take milliseconds of real time, and come out
    the same every time because nothing depends on the real clock.
    """

    def __init__(self) -> None:
        self._now_ns = 0
        self._sleepers: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def monotonic(self) -> float:
        return self._now_ns / NS_PER_S

    async def sleep(self, duration_s: float) -> None:
        if duration_s <= 0:
            await asyncio.sleep(0)
            return
        # At least one nanosecond, so that a sleep always moves time on.
        deadline_ns = self._now_ns + max(1, math.ceil(duration_s * NS_PER_S))
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline_ns, next(self._order), future))
        await future

    async def drive(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work` to completion, advancing time whenever every task is waiting."""
        task = asyncio.create_task(work)
        while not task.done():
            for _ in range(SETTLE_YIELDS):
                await asyncio.sleep(0)
            if task.done():
                break
            assert self._sleepers, "every task waits and none on the clock: a deadlock"
            self._wake_next()
        return task.result()

    def _wake_next(self) -> None:
        self._now_ns = self._sleepers[0][0]
        while self._sleepers and self._sleepers[0][0] <= self._now_ns:
            _, _, future = heapq.heappop(self._sleepers)
            future.set_result(None)


class StallingService:
    """A one-at-a-time service: 1 ms per operation, except that the first operation it
    begins 0.5 s or more into the run freezes it for 300 ms, as a long pause would."""

    SERVICE_S = 0.001
    STALL_AFTER_S = 0.5
    STALL_S = 0.3

    def __init__(self, clock: VirtualClock) -> None:
        self._clock = clock
        self._lock = asyncio.Lock()
        self._stall_at_s = clock.monotonic() + self.STALL_AFTER_S
        self.has_stalled = False

    async def reserve(self, index: int) -> str:
        async with self._lock:
            if not self.has_stalled and self._clock.monotonic() >= self._stall_at_s:
                self.has_stalled = True
                await self._clock.sleep(self.STALL_S)
            else:
                await self._clock.sleep(self.SERVICE_S)
        return "reserved"


async def test_closed_loop_runs_exactly_total_operations_at_the_given_concurrency() -> (
    None
):
    seen: list[int] = []
    in_flight = 0
    in_flight_peak = 0

    async def op(index: int) -> str:
        nonlocal in_flight, in_flight_peak
        in_flight += 1
        in_flight_peak = max(in_flight_peak, in_flight)
        for _ in range(3):
            await asyncio.sleep(0)
        in_flight -= 1
        seen.append(index)
        return "reserved"

    result = await run_closed(op, name="exact", concurrency=8, total=100)

    assert result.completed == 100
    assert sorted(seen) == list(range(100))
    assert result.outcomes == {"reserved": 100}
    assert in_flight_peak == 8
    assert result.in_flight_peak == 8
    assert result.latency_us.get_total_count() == 100
    assert result.mode == "closed"


async def test_closed_loop_starts_nothing_more_once_stop_says_so() -> None:
    stock = 37
    concurrency = 4

    async def op(index: int) -> str:
        nonlocal stock
        await asyncio.sleep(0)
        if stock == 0:
            return "sold_out"
        stock -= 1
        return "reserved"

    result = await run_closed(
        op,
        name="flash sale",
        concurrency=concurrency,
        total=10_000,
        stop=lambda outcomes: outcomes.get("sold_out", 0) > 0,
    )

    assert result.outcomes["reserved"] == 37
    # Operations already running when stock ran out still complete.
    assert 1 <= result.outcomes["sold_out"] <= concurrency
    assert result.completed == 37 + result.outcomes["sold_out"]


async def test_closed_loop_ends_after_its_duration() -> None:
    clock = VirtualClock()

    async def op(index: int) -> str:
        await clock.sleep(0.010)
        return "reserved"

    result = await clock.drive(
        run_closed(
            op, name="timed", concurrency=2, duration_s=1.0, monotonic=clock.monotonic
        )
    )

    # Two workers, 10 ms per operation, for one second.
    assert result.completed == 200
    assert result.elapsed_s == pytest.approx(1.0)
    assert result.per_s == pytest.approx(200)
    assert result.p50_ms == pytest.approx(10, rel=1e-3)


async def test_closed_loop_refuses_to_run_without_an_end() -> None:
    async def op(index: int) -> str:
        return "reserved"

    with pytest.raises(ValueError, match="total, duration_s or stop"):
        await run_closed(op, name="endless", concurrency=1)


async def test_open_loop_starts_each_operation_at_its_intended_time() -> None:
    clock = VirtualClock()
    started_s: list[float] = []

    async def op(index: int) -> str:
        started_s.append(clock.monotonic())
        await clock.sleep(0.005)
        return "reserved"

    result = await clock.drive(
        run_open(
            op,
            name="steady",
            rate_per_s=200,
            duration_s=1.0,
            in_flight_max=100,
            monotonic=clock.monotonic,
            sleep=clock.sleep,
        )
    )

    assert result.completed == 200
    assert started_s == pytest.approx([i / 200 for i in range(200)], abs=1e-6)
    assert result.late_starts == 0
    assert result.target_rate_per_s == 200
    assert result.elapsed_s == pytest.approx(0.995 + 0.005, abs=1e-6)
    assert result.p99_ms == pytest.approx(5, rel=1e-3)


async def test_open_loop_keeps_its_rate_on_the_real_clock() -> None:
    # The one test on real time: it checks the default clock and asyncio.sleep wiring,
    # which the virtual clock replaces everywhere else, and takes 0.3 s.
    started_s: list[float] = []

    async def op(index: int) -> str:
        started_s.append(time.monotonic())
        return "reserved"

    result = await run_open(
        op, name="real", rate_per_s=100, duration_s=0.3, in_flight_max=10
    )

    # The count is fixed by the schedule; the spread shows it was kept in real time.
    assert result.completed == 30
    assert started_s[-1] - started_s[0] == pytest.approx(0.29, abs=0.05)
    assert 0.29 <= result.elapsed_s < 1.0


async def test_open_loop_charges_waiting_for_a_slot_to_latency() -> None:
    clock = VirtualClock()

    async def op(index: int) -> str:
        await clock.sleep(0.100)
        return "reserved"

    result = await clock.drive(
        run_open(
            op,
            name="capped",
            rate_per_s=100,
            duration_s=0.5,
            in_flight_max=2,
            monotonic=clock.monotonic,
            sleep=clock.sleep,
        )
    )

    # Two slots of 100 ms each serve 20 operations a second against 100 arriving, so
    # all but the first two start late and the last, intended at 0.49 s, starts at
    # 2.41 s and completes at 2.51 s.
    assert result.completed == 50
    assert result.late_starts == 48
    assert result.in_flight_peak == 2
    assert result.elapsed_s == pytest.approx(2.51)
    assert result.max_ms == pytest.approx(2_020, rel=2e-3)


async def test_open_loop_latency_shows_a_stall_that_a_closed_loop_hides() -> None:
    clock = VirtualClock()
    service = StallingService(clock)
    open_loop = await clock.drive(
        run_open(
            service.reserve,
            name="open",
            rate_per_s=50,
            duration_s=1.0,
            in_flight_max=100,
            monotonic=clock.monotonic,
            sleep=clock.sleep,
        )
    )
    assert service.has_stalled

    clock = VirtualClock()
    service = StallingService(clock)
    closed_loop = await clock.drive(
        run_closed(
            service.reserve,
            name="closed",
            concurrency=1,
            duration_s=1.0,
            monotonic=clock.monotonic,
        )
    )
    assert service.has_stalled

    # Arrivals kept coming during the 300 ms stall, and each waited behind it: eleven
    # of the fifty took 100 ms or more.
    assert open_loop.completed == 50
    assert open_loop.p99_ms >= 200
    assert open_loop.p90_ms >= 100
    # The single closed-loop worker waited too, but sent nothing while it waited: the
    # stall is one sample among some 700 fast ones, invisible at the 99th percentile.
    assert closed_loop.max_ms >= 300
    assert closed_loop.completed > 600
    assert closed_loop.p99_ms < 10
    assert open_loop.p99_ms > 20 * closed_loop.p99_ms


async def test_an_exception_becomes_an_error_outcome() -> None:
    class StockServiceUnavailable(Exception):
        pass

    async def op(index: int) -> str:
        await asyncio.sleep(0)
        if index % 2:
            raise StockServiceUnavailable
        return "reserved"

    closed_loop = await run_closed(op, name="closed", concurrency=3, total=10)
    clock = VirtualClock()
    open_loop = await clock.drive(
        run_open(
            op,
            name="open",
            rate_per_s=100,
            duration_s=0.1,
            in_flight_max=10,
            monotonic=clock.monotonic,
            sleep=clock.sleep,
        )
    )

    expected = {"reserved": 5, "error:StockServiceUnavailable": 5}
    assert closed_loop.outcomes == expected
    assert open_loop.outcomes == expected


async def test_progress_is_reported_at_intervals_and_at_the_end() -> None:
    clock = VirtualClock()
    reported: list[int] = []

    async def op(index: int) -> str:
        await clock.sleep(0.010)
        return "reserved"

    result = await clock.drive(
        run_closed(
            op,
            name="progress",
            concurrency=2,
            duration_s=1.0,
            progress=reported.append,
            monotonic=clock.monotonic,
        )
    )

    # Every 100 ms of a one-second run, plus the final count: not once per operation.
    assert reported == sorted(reported)
    assert 10 <= len(reported) <= 12
    assert reported[-1] == result.completed == 200


async def test_result_figures_round_trip_through_json() -> None:
    async def op(index: int) -> str:
        await asyncio.sleep(0)
        return "rejected" if index % 4 == 0 else "reserved"

    result: LoadResult = await run_closed(op, name="json", concurrency=2, total=40)
    figures = result.to_json()

    assert json.loads(json.dumps(figures)) == figures
    assert figures["completed"] == 40
    assert figures["outcomes"] == {"rejected": 10, "reserved": 30}
    assert figures["per_s"] == result.per_s
    assert figures["p99_ms"] == result.p99_ms
    assert "latency_us" not in figures
