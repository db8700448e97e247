"""The real Redis the bridge's tests use, and exact moves of a fake clock."""

import math

import redis.asyncio as redis_asyncio

from server.clock import US_PER_S, FakeClock

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
# Generous for loopback; a stalled Redis fails the test instead of hanging the run.
REDIS_TIMEOUT_S = 5.0


def new_client() -> redis_asyncio.Redis:
    return redis_asyncio.Redis(
        host=REDIS_HOST,
        port=REDIS_PORT,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
    )


def advance_us(clock: FakeClock, duration_us: int) -> None:
    """Advance by exactly `duration_us`, whatever float rounding FakeClock applies."""
    target_us = clock.now_us() + duration_us
    seconds = duration_us / US_PER_S
    while int(seconds * US_PER_S) < duration_us:
        seconds = math.nextafter(seconds, math.inf)
    clock.advance(seconds)
    assert clock.now_us() == target_us
