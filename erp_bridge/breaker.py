"""A circuit breaker per ERP endpoint, and the backoff between failed attempts.

A failing ERP gets fewer requests, not more: after `failures_max` failures in a row
the breaker opens and no stream of this process sends for `open_s`; then one probe
goes through (half open) and its outcome closes or reopens the breaker. Throttling
(429) is not a failure: the ERP is healthy and said when to come back.
"""

import logging
import random

from erp_bridge.status import BreakerState
from server.clock import US_PER_S, Clock
from server.engine.errors import ensure

log = logging.getLogger(__name__)

_MOVES = {
    BreakerState.CLOSED: {BreakerState.OPEN},
    BreakerState.OPEN: {BreakerState.HALF_OPEN},
    BreakerState.HALF_OPEN: {BreakerState.CLOSED, BreakerState.OPEN},
}


class CircuitBreaker:
    def __init__(
        self, *, endpoint: str, failures_max: int, open_s: float, clock: Clock
    ) -> None:
        ensure(
            failures_max >= 1 and open_s > 0, "breaker needs a threshold and a pause"
        )
        self.endpoint = endpoint
        self._failures_max = failures_max
        self._open_us = int(open_s * US_PER_S)
        self._clock = clock
        self.state = BreakerState.CLOSED
        self._failures = 0
        self._opened_us = 0
        self._probing = False
        self.opened_count = 0

    def wait_s(self) -> float:
        """How long a sender must wait before it may send; 0 means go (and, when half
        open, this sender is the one probe)."""
        if self.state is BreakerState.CLOSED:
            return 0.0
        if self.state is BreakerState.OPEN:
            left_us = self._opened_us + self._open_us - self._clock.now_us()
            if left_us > 0:
                return left_us / US_PER_S
            self._move(BreakerState.HALF_OPEN)
        if self._probing:
            # Another stream's probe is out; look again in a while.
            return self._open_us / US_PER_S / 10
        self._probing = True
        return 0.0

    def release_probe(self) -> None:
        """The sender that was let through sent nothing after all."""
        self._probing = False

    def succeeded(self) -> None:
        self._failures = 0
        self._probing = False
        if self.state is BreakerState.HALF_OPEN:
            self._move(BreakerState.CLOSED)

    def failed(self) -> None:
        self._failures += 1
        self._probing = False
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED and self._failures >= self._failures_max
        ):
            self._opened_us = self._clock.now_us()
            self.opened_count += 1
            self._move(BreakerState.OPEN)

    def _move(self, target: BreakerState) -> None:
        ensure(target in _MOVES[self.state], f"breaker {self.state} -> {target}")
        log.warning(
            "breaker %s: endpoint=%s failures=%d",
            target.value,
            self.endpoint,
            self._failures,
        )
        self.state = target


class Backoff:
    """Capped exponential backoff with jitter: attempt n waits a random time between
    half and all of min(cap, first * 2^n), so streams that failed together do not
    come back together."""

    def __init__(self, *, first_s: float, max_s: float, rng: random.Random) -> None:
        ensure(0 < first_s <= max_s, f"backoff {first_s} s to {max_s} s")
        self._first_s = first_s
        self._max_s = max_s
        self._rng = rng

    def delay_s(self, attempt: int) -> float:
        ensure(attempt >= 0, f"attempt {attempt}")
        # 2**60 is past any cap; the bound keeps the power from growing without end.
        ceiling_s = min(self._max_s, self._first_s * 2.0 ** min(attempt, 60))
        jitter_s: float = self._rng.uniform(0, ceiling_s / 2)
        return ceiling_s / 2 + jitter_s
