"""The circuit breaker's moves and the backoff's bounds, on a fake clock."""

import random

import pytest

from erp_bridge.breaker import Backoff, CircuitBreaker
from erp_bridge.status import BreakerState
from server.clock import FakeClock


def state_of(subject: CircuitBreaker) -> BreakerState:
    # Read through a call, so that the type checker does not carry one assertion's
    # narrowing over the calls that move the breaker on.
    return subject.state


def breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(endpoint="erp", failures_max=3, open_s=10.0, clock=clock)


def test_breaker_opens_after_failures_in_a_row_and_not_before() -> None:
    clock = FakeClock()
    subject = breaker(clock)

    subject.failed()
    subject.failed()
    subject.succeeded()
    subject.failed()
    subject.failed()
    assert state_of(subject) is BreakerState.CLOSED
    assert subject.wait_s() == 0.0

    subject.failed()

    assert state_of(subject) is BreakerState.OPEN
    assert subject.wait_s() == pytest.approx(10.0)
    clock.advance(4.0)
    assert subject.wait_s() == pytest.approx(6.0)


def test_half_open_lets_one_probe_through_and_its_outcome_decides() -> None:
    clock = FakeClock()
    subject = breaker(clock)
    for _ in range(3):
        subject.failed()
    clock.advance(10.0)

    assert subject.wait_s() == 0.0
    assert state_of(subject) is BreakerState.HALF_OPEN
    assert subject.wait_s() > 0.0, "a second sender must wait for the probe"

    subject.failed()
    assert state_of(subject) is BreakerState.OPEN
    assert subject.opened_count == 2

    clock.advance(10.0)
    assert subject.wait_s() == 0.0
    subject.succeeded()
    assert state_of(subject) is BreakerState.CLOSED
    assert subject.wait_s() == 0.0


def test_a_probe_that_sent_nothing_frees_the_way_for_another() -> None:
    clock = FakeClock()
    subject = breaker(clock)
    for _ in range(3):
        subject.failed()
    clock.advance(10.0)
    assert subject.wait_s() == 0.0

    subject.release_probe()

    assert subject.wait_s() == 0.0
    assert state_of(subject) is BreakerState.HALF_OPEN


def test_backoff_doubles_within_jitter_and_stays_under_its_cap() -> None:
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    backoff = Backoff(first_s=0.1, max_s=5.0, rng=random.Random(seed))

    for attempt in range(80):
        ceiling_s = min(5.0, 0.1 * 2**attempt)
        delay_s = backoff.delay_s(attempt)
        assert ceiling_s / 2 <= delay_s <= ceiling_s
    delays = {backoff.delay_s(3) for _ in range(20)}
    assert len(delays) > 1, "jitter spreads attempts that failed together"
