"""Rate accounting over a sliding one-second window.

Design note. The simulator states its rates as "at most N in any one-second window",
and reports the peak a client reached in the same terms, so that a test can compare the
two figures directly. A GCRA or token bucket would admit a full burst and then keep
refilling, which lets nearly 2N through in one sliding second; the limit it enforces
and the peak a test measures would then disagree. So both the limiter and the meter
here keep a log of (time, amount) entries inside the window and sum it exactly.

Entries at the same instant are merged, which keeps the log small under the fake clock
of the tests. Known shortcoming: the meter, which sees throttled requests too, holds
one entry per distinct arrival time in the last second, so its memory grows with the
rate a client attempts; at the few thousand requests per second a benchmark makes that
is tens of kilobytes.
"""

import collections
import dataclasses

from server.clock import US_PER_S

WINDOW_US = US_PER_S


class SlidingWindow:
    """Amounts added within the last second, summed."""

    def __init__(self) -> None:
        self._entries: collections.deque[list[int]] = collections.deque()
        self._total = 0

    def total(self, now_us: int) -> int:
        self._expire(now_us)
        return self._total

    def add(self, now_us: int, amount: int) -> None:
        self._expire(now_us)
        if self._entries and self._entries[-1][0] == now_us:
            self._entries[-1][1] += amount
        else:
            self._entries.append([now_us, amount])
        self._total += amount

    def free_at_us(self, now_us: int, *, amount: int, limit: int) -> int:
        """When `amount` more would first fit under `limit`, given no other arrivals."""
        self._expire(now_us)
        assert amount <= limit, "an amount above the limit never fits"
        excess = self._total + amount - limit
        if excess <= 0:
            return now_us

        # The oldest entries leave the window first; find the one whose departure
        # brings the total low enough.
        for at_us, entry_amount in self._entries:
            excess -= entry_amount
            if excess <= 0:
                return at_us + WINDOW_US
        raise AssertionError("the window's entries sum to its total")

    def _expire(self, now_us: int) -> None:
        # An entry at time t counts for the window (t - 1 s, t]: it is gone at t + 1 s.
        while self._entries and self._entries[0][0] + WINDOW_US <= now_us:
            _, amount = self._entries.popleft()
            self._total -= amount


@dataclasses.dataclass
class PeakMeter:
    """The largest amount seen in any one-second window so far."""

    window: SlidingWindow = dataclasses.field(default_factory=SlidingWindow)
    peak: int = 0

    def record(self, now_us: int, amount: int) -> None:
        # A sliding sum only grows when something arrives, so checking it at every
        # arrival finds the peak over all windows.
        self.window.add(now_us, amount)
        self.peak = max(self.peak, self.window.total(now_us))
