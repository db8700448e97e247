"""The shared GCRA limiter against a real Redis on loopback, on a fake clock.

Every test gets its own key prefix and deletes its keys afterwards. The randomized test
prints its seed; replay it with STOCKWARD_TEST_SEED=<seed>.
"""

import asyncio
import math
import os
import random
import secrets
from collections.abc import Callable, Mapping, Sequence

import pytest
import redis.asyncio as redis_asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from erp_bridge.rate_limit import (
    HOLD_OFF_MAX_S,
    KEY_TTL_SLACK_MS,
    RateLimit,
    RateLimiterUnavailable,
    RateLimitTimeout,
    SharedLimiter,
    limit_for_window,
)
from server.clock import US_PER_S, FakeClock
from tests.erp.redis_support import REDIS_HOST, advance_us, new_client

# How long a test waits for a background task to reach its sleep on the fake clock: a
# couple of loopback round trips, so a second means something is wrong.
SLEEP_REACHED_TIMEOUT_S = 1.0

Admission = tuple[int, Mapping[str, int]]


class SignallingClock(FakeClock):
    """A FakeClock that tells the test when someone starts sleeping on it."""

    def __init__(self) -> None:
        super().__init__()
        self.sleep_started = asyncio.Event()

    async def sleep(self, duration_s: float) -> None:
        self.sleep_started.set()
        await super().sleep(duration_s)


@pytest.fixture
def clock() -> SignallingClock:
    return SignallingClock()


@pytest.fixture
def make_limiter(
    client: redis_asyncio.Redis, key_prefix: str, clock: SignallingClock
) -> Callable[..., SharedLimiter]:
    def make(*limits: RateLimit) -> SharedLimiter:
        return SharedLimiter(client, key_prefix=key_prefix, limits=limits, clock=clock)

    return make


def window_peaks(admissions: Sequence[Admission]) -> dict[str, int]:
    """Per limit, the largest total cost admitted in any window (t - 1 s, t]."""
    ordered = sorted(admissions, key=lambda admission: admission[0])
    peaks: dict[str, int] = {}
    for name in {name for _, costs in ordered for name in costs}:
        total = 0
        oldest = 0
        for at_us, costs in ordered:
            total += costs.get(name, 0)
            # An admission at t counts for windows ending before t + 1 s only.
            while ordered[oldest][0] + US_PER_S <= at_us:
                total -= ordered[oldest][1].get(name, 0)
                oldest += 1
            peaks[name] = max(peaks.get(name, 0), total)
    return peaks


async def test_burst_of_one_admits_evenly_spaced_at_the_rate(
    make_limiter: Callable[..., SharedLimiter], clock: FakeClock
) -> None:
    limiter = make_limiter(RateLimit("requests", rate_per_s=4))

    assert await limiter.acquire({"requests": 1}) == 0.0
    for _ in range(5):
        assert await limiter.acquire({"requests": 1}) == 0.25

        advance_us(clock, 249_999)
        assert await limiter.acquire({"requests": 1}) > 0.0

        advance_us(clock, 1)
        assert await limiter.acquire({"requests": 1}) == 0.0
    assert limiter.stats.admitted == 6


async def test_burst_admits_back_to_back_then_spaces_at_the_rate(
    make_limiter: Callable[..., SharedLimiter], clock: FakeClock
) -> None:
    limiter = make_limiter(RateLimit("requests", rate_per_s=2, burst=3))

    for _ in range(3):
        assert await limiter.acquire({"requests": 1}) == 0.0
    assert await limiter.acquire({"requests": 1}) == 0.5

    advance_us(clock, 500_000)
    assert await limiter.acquire({"requests": 1}) == 0.0
    assert await limiter.acquire({"requests": 1}) == 0.5

    # A long idle spell refills the burst, and no more than the burst.
    advance_us(clock, 10 * US_PER_S)
    for _ in range(3):
        assert await limiter.acquire({"requests": 1}) == 0.0
    assert await limiter.acquire({"requests": 1}) == 0.5


async def test_line_limit_charges_the_line_count(
    make_limiter: Callable[..., SharedLimiter], clock: FakeClock
) -> None:
    limiter = make_limiter(RateLimit("lines", rate_per_s=100, burst=50))

    assert await limiter.acquire({"lines": 30}) == 0.0
    # 60 cells against a burst of 50: 10 cells of 10 ms each too early.
    assert await limiter.acquire({"lines": 30}) == 0.1

    advance_us(clock, 100_000)
    assert await limiter.acquire({"lines": 30}) == 0.0
    assert await limiter.acquire({"lines": 1}) == 0.01


async def test_refusal_by_one_limit_charges_no_limit(
    make_limiter: Callable[..., SharedLimiter],
    client: redis_asyncio.Redis,
    clock: FakeClock,
) -> None:
    limiter = make_limiter(
        RateLimit("requests", rate_per_s=10),
        RateLimit("lines", rate_per_s=100, burst=20),
    )
    assert await limiter.acquire({"requests": 1}) == 0.0

    assert await limiter.acquire({"requests": 1, "lines": 20}) == 0.1
    assert await client.exists(limiter.key("lines")) == 0

    # The lines limit was not charged by the refused call: its whole burst is there.
    assert await limiter.acquire({"lines": 20}) == 0.0

    # Both refuse now, requests for 0.05 s and lines for 0.15 s; the slower one counts.
    advance_us(clock, 50_000)
    assert await limiter.acquire({"requests": 1, "lines": 20}) == 0.15
    advance_us(clock, 150_000)
    assert await limiter.acquire({"requests": 1, "lines": 20}) == 0.0


@pytest.mark.parametrize("rate_per_s", [3.0, 7.5, 1000 / 3, 999.0])
async def test_returned_wait_is_exact_to_the_microsecond(
    make_limiter: Callable[..., SharedLimiter], clock: FakeClock, rate_per_s: float
) -> None:
    limiter = make_limiter(RateLimit("lines", rate_per_s=rate_per_s, burst=5))
    assert await limiter.acquire({"lines": 4}) == 0.0

    for cost in [3, 5, 1, 2, 5]:
        wait_s = await limiter.acquire({"lines": cost})
        wait_us = int(wait_s * US_PER_S)
        assert wait_us > 0

        advance_us(clock, wait_us - 1)
        assert await limiter.acquire({"lines": cost}) > 0.0

        advance_us(clock, 1)
        assert await limiter.acquire({"lines": cost}) == 0.0


@pytest.mark.parametrize(("n_per_window", "burst"), [(1, 1), (10, 1), (10, 4), (7, 7)])
async def test_limit_for_window_is_tight_against_a_greedy_caller(
    make_limiter: Callable[..., SharedLimiter],
    clock: FakeClock,
    n_per_window: int,
    burst: int,
) -> None:
    # Jumping straight to each admission instant is the densest schedule any caller
    # can achieve, so its peak is the worst case, and it must be exactly N.
    limit = limit_for_window("requests", n_per_window, burst=burst)
    limiter = make_limiter(limit)
    admissions: list[Admission] = []

    while len(admissions) < 4 * n_per_window + burst:
        wait_s = await limiter.acquire({"requests": 1})
        if wait_s == 0.0:
            admissions.append((clock.now_us(), {"requests": 1}))
        else:
            advance_us(clock, int(wait_s * US_PER_S))

    assert window_peaks(admissions) == {"requests": n_per_window}
    assert limit.window_max() == n_per_window


async def test_rate_of_n_with_a_burst_lets_more_than_n_into_one_window(
    make_limiter: Callable[..., SharedLimiter], clock: FakeClock
) -> None:
    # Why limit_for_window lowers the rate: the naive setting breaks the ERP's window.
    limit = RateLimit("requests", rate_per_s=10, burst=10)
    limiter = make_limiter(limit)
    admissions: list[Admission] = []
    end_us = clock.now_us() + 3 * US_PER_S

    while clock.now_us() < end_us:
        wait_s = await limiter.acquire({"requests": 1})
        if wait_s == 0.0:
            admissions.append((clock.now_us(), {"requests": 1}))
        else:
            advance_us(clock, int(wait_s * US_PER_S))

    assert window_peaks(admissions) == {"requests": 19}
    assert limit.window_max() == 19


async def test_two_processes_never_exceed_the_window_together(
    key_prefix: str, clock: FakeClock
) -> None:
    seed = int(os.environ.get("STOCKWARD_TEST_SEED", secrets.randbelow(2**32)))
    print(f"seed={seed}")
    rng = random.Random(seed)
    limits = [
        limit_for_window("requests", 10, burst=2),
        limit_for_window("lines", 200, burst=40),
    ]
    clients = [new_client(), new_client()]
    processes = [
        SharedLimiter(client, key_prefix=key_prefix, limits=limits, clock=clock)
        for client in clients
    ]
    admissions: list[Admission] = []

    async def attempt(limiter: SharedLimiter) -> None:
        costs = {"requests": 1, "lines": rng.randint(1, 40)}
        if await limiter.acquire(costs) == 0.0:
            admissions.append((clock.now_us(), costs))

    try:
        # Both processes try twice every simulated millisecond for three seconds,
        # interleaved on the event loop as separate connections would be, in a
        # shuffled order so that neither always sends first.
        for _ in range(3_000):
            contenders = processes * 2
            rng.shuffle(contenders)
            await asyncio.gather(*(attempt(limiter) for limiter in contenders))
            advance_us(clock, 1_000)
    finally:
        for client in clients:
            await client.aclose()

    peaks = window_peaks(admissions)
    print(f"peaks={peaks}")
    assert peaks["requests"] <= 10
    assert peaks["lines"] <= 200
    # Not vacuous: the pair pressed one limit to within a single call of its N (a line
    # cost is at most 40), and both processes got a share.
    assert peaks["requests"] >= 9 or peaks["lines"] > 200 - 40
    assert all(limiter.stats.admitted > 0 for limiter in processes)


async def test_wait_and_acquire_sleeps_until_admitted(
    make_limiter: Callable[..., SharedLimiter], clock: SignallingClock
) -> None:
    limiter = make_limiter(RateLimit("requests", rate_per_s=1))
    assert await limiter.wait_and_acquire({"requests": 1}, deadline_s=0.0) == 0.0

    waiter = asyncio.create_task(
        limiter.wait_and_acquire({"requests": 1}, deadline_s=1.0)
    )
    await asyncio.wait_for(clock.sleep_started.wait(), SLEEP_REACHED_TIMEOUT_S)
    assert not waiter.done()

    clock.advance(1.0)
    assert await asyncio.wait_for(waiter, SLEEP_REACHED_TIMEOUT_S) == 1.0


async def test_wait_and_acquire_gives_up_before_a_wait_past_its_deadline(
    make_limiter: Callable[..., SharedLimiter], clock: SignallingClock
) -> None:
    limiter = make_limiter(RateLimit("requests", rate_per_s=1))
    assert await limiter.acquire({"requests": 1}) == 0.0
    start_us = clock.now_us()

    with pytest.raises(RateLimitTimeout, match="after the deadline"):
        await asyncio.wait_for(
            limiter.wait_and_acquire({"requests": 1}, deadline_s=0.999_999),
            SLEEP_REACHED_TIMEOUT_S,
        )

    assert not clock.sleep_started.is_set()
    assert clock.now_us() == start_us
    assert limiter.stats.timeouts == 1


@pytest.mark.parametrize("retry_after_s", [0.001, 1.1, 2.5, 536.868])
async def test_hold_off_refuses_another_process_until_exactly_retry_after(
    key_prefix: str, clock: FakeClock, retry_after_s: float
) -> None:
    limits = [
        limit_for_window("requests", 10, burst=2),
        RateLimit("lines", rate_per_s=100, burst=50),
    ]
    clients = [new_client(), new_client()]
    first, second = (
        SharedLimiter(client, key_prefix=key_prefix, limits=limits, clock=clock)
        for client in clients
    )
    retry_after_us = round(retry_after_s * US_PER_S)
    try:
        assert await first.hold_off(retry_after_s) == 2

        # The other process waits out the whole Retry-After on either limit.
        assert await second.acquire({"requests": 1}) == retry_after_s
        assert await second.acquire({"lines": 1}) == retry_after_s
        advance_us(clock, retry_after_us - 1)
        assert await second.acquire({"requests": 1, "lines": 1}) == 1e-6

        # At the instant itself one cell passes; a larger cost waits (cost - 1)*T more,
        # as if a full burst had just been spent.
        advance_us(clock, 1)
        assert await second.acquire({"lines": 20}) == 0.19
        assert await second.acquire({"requests": 1, "lines": 1}) == 0.0
    finally:
        for client in clients:
            await client.aclose()

    assert first.stats.hold_offs == 1
    assert second.stats.admitted == 1


async def test_shorter_hold_off_never_shortens_a_longer_one_or_a_debt(
    make_limiter: Callable[..., SharedLimiter], clock: FakeClock
) -> None:
    limiter = make_limiter(
        RateLimit("requests", rate_per_s=1),
        RateLimit("lines", rate_per_s=100, burst=50),
    )
    assert await limiter.acquire({"requests": 1}) == 0.0

    assert await limiter.hold_off(5.0) == 2
    assert await limiter.hold_off(1.0) == 0
    assert await limiter.acquire({"requests": 1}) == 5.0
    assert await limiter.acquire({"lines": 1}) == 5.0

    # After the hold-off, a request leaves a debt of 1 s on requests, longer than the
    # next hold-off of 0.5 s, which therefore moves only the lines limit.
    advance_us(clock, 5 * US_PER_S)
    assert await limiter.acquire({"requests": 1, "lines": 1}) == 0.0
    assert await limiter.hold_off(0.5) == 1
    assert await limiter.acquire({"requests": 1}) == 1.0
    assert await limiter.acquire({"lines": 1}) == 0.5
    assert limiter.stats.hold_offs == 3


async def test_wait_and_acquire_waits_out_a_hold_off(
    make_limiter: Callable[..., SharedLimiter], clock: SignallingClock
) -> None:
    limiter = make_limiter(limit_for_window("requests", 10, burst=3))
    assert await limiter.hold_off(2.5) == 1

    # Bounded, so that a limiter that wrongly decides to sleep fails instead of hanging.
    with pytest.raises(RateLimitTimeout, match="after the deadline"):
        await asyncio.wait_for(
            limiter.wait_and_acquire({"requests": 1}, deadline_s=2.499_999),
            SLEEP_REACHED_TIMEOUT_S,
        )
    assert not clock.sleep_started.is_set()

    waiter = asyncio.create_task(
        limiter.wait_and_acquire({"requests": 1}, deadline_s=2.5)
    )
    await asyncio.wait_for(clock.sleep_started.wait(), SLEEP_REACHED_TIMEOUT_S)
    assert not waiter.done()

    clock.advance(2.5)
    assert await asyncio.wait_for(waiter, SLEEP_REACHED_TIMEOUT_S) == 2.5


async def test_hold_off_keys_get_a_ttl_that_outlives_the_hold_off(
    make_limiter: Callable[..., SharedLimiter], client: redis_asyncio.Redis
) -> None:
    limiter = make_limiter(RateLimit("lines", rate_per_s=10, burst=30))

    assert await limiter.hold_off(4.0) == 1

    # The TAT lies 4 s plus 29 cells of 0.1 s ahead, more than the Retry-After alone.
    ttl_ms = await client.pttl(limiter.key("lines"))
    assert KEY_TTL_SLACK_MS + 4_000 < ttl_ms <= KEY_TTL_SLACK_MS + 6_900


async def test_keys_get_a_ttl_that_outlives_the_debt(
    make_limiter: Callable[..., SharedLimiter], client: redis_asyncio.Redis
) -> None:
    limiter = make_limiter(RateLimit("lines", rate_per_s=10, burst=30))

    assert await limiter.acquire({"lines": 25}) == 0.0

    # The TAT lies 2.5 s ahead; the key lives that long plus the slack, then vanishes.
    ttl_ms = await client.pttl(limiter.key("lines"))
    assert KEY_TTL_SLACK_MS < ttl_ms <= KEY_TTL_SLACK_MS + 2_500


async def test_caller_mistakes_raise_value_error(
    make_limiter: Callable[..., SharedLimiter],
) -> None:
    limiter = make_limiter(RateLimit("lines", rate_per_s=10, burst=30))

    with pytest.raises(ValueError, match=r"must be in 1\.\.burst"):
        await limiter.acquire({"lines": 31})
    with pytest.raises(ValueError, match=r"must be in 1\.\.burst"):
        await limiter.acquire({"lines": 0})
    with pytest.raises(ValueError, match="unknown limit 'requests'"):
        await limiter.acquire({"requests": 1})
    with pytest.raises(ValueError, match="at least one limit"):
        await limiter.acquire({})
    with pytest.raises(ValueError, match=r"burst must be in 1\.\.n_per_window"):
        limit_for_window("lines", 10, burst=11)
    with pytest.raises(ValueError, match="rate_per_s must be in"):
        RateLimit("lines", rate_per_s=0)
    with pytest.raises(ValueError, match="unique names"):
        make_limiter(RateLimit("lines", 1), RateLimit("lines", 2))
    for retry_after_s in [-0.1, HOLD_OFF_MAX_S + 1, math.nan]:
        with pytest.raises(ValueError, match="retry_after_s must be in"):
            await limiter.hold_off(retry_after_s)
    assert limiter.stats.hold_offs == 0


async def test_unreachable_redis_raises_unavailable(clock: FakeClock) -> None:
    # Port 1 on loopback has no listener, so the connection is refused at once.
    client = redis_asyncio.Redis(
        host=REDIS_HOST, port=1, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
    )
    limiter = SharedLimiter(
        client, key_prefix="unused", limits=[RateLimit("requests", 1)], clock=clock
    )
    try:
        with pytest.raises(RateLimiterUnavailable):
            await limiter.acquire({"requests": 1})
        with pytest.raises(RateLimiterUnavailable):
            await limiter.hold_off(1.0)
    finally:
        await client.aclose()
