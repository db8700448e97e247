"""Time, injected.

Everything that expires, backs off or rate-limits asks a Clock for the time, so that tests
run those paths on a FakeClock and never sleep.
"""

import asyncio
import heapq
import itertools
import time
from typing import Protocol

US_PER_S = 1_000_000


class Clock(Protocol):
    def now_us(self) -> int:
        """Microseconds since the Unix epoch (wall clock: it is shown to callers)."""
        ...

    async def sleep(self, duration_s: float) -> None: ...


class SystemClock:
    def now_us(self) -> int:
        return time.time_ns() // 1_000

    async def sleep(self, duration_s: float) -> None:
        await asyncio.sleep(duration_s)


class FakeClock:
    """A clock that moves only when a test calls advance().

    Sleepers wake, in deadline order, once the clock has been advanced past their
    deadline; nothing ever waits on real time.
    """

    def __init__(self, *, start_us: int = 1_767_225_600 * US_PER_S) -> None:
        self._now_us = start_us
        self._sleepers: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now_us(self) -> int:
        return self._now_us

    async def sleep(self, duration_s: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        deadline_us = self._now_us + int(duration_s * US_PER_S)
        heapq.heappush(self._sleepers, (deadline_us, next(self._order), future))
        await future

    def advance(self, duration_s: float) -> None:
        assert duration_s >= 0, "a clock never runs backwards"
        self._now_us += int(duration_s * US_PER_S)
        while self._sleepers and self._sleepers[0][0] <= self._now_us:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)
