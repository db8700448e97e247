"""Leased slots shared through a real Redis on loopback, on a fake clock.

Every test gets its own key prefix and deletes its keys afterwards. The randomized test
prints its seed; replay it with STOCKWARD_TEST_SEED=<seed>.
"""

import asyncio
import itertools
import os
import random
import secrets
from collections.abc import Awaitable, Callable, Sequence

import pytest
import redis.asyncio as redis_asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from erp_bridge.rate_limit import KEY_TTL_SLACK_MS, RateLimiterUnavailable
from erp_bridge.slots import (
    LEASE_MAX_S,
    SLOT_POLL_INTERVAL_S,
    SharedSlots,
    SlotLease,
    SlotsBusy,
    SlotTimeout,
)
from server.clock import US_PER_S, FakeClock
from tests.erp.redis_support import REDIS_HOST, advance_us, new_client

# How long the driver waits for the tasks to go back to sleep on the fake clock: a few
# loopback round trips each, so five seconds means something is stuck.
QUIET_TIMEOUT_S = 5.0

LEASE_S = 10.0
LEASE_US = round(LEASE_S * US_PER_S)
POLL_US = round(SLOT_POLL_INTERVAL_S * US_PER_S)


class ParkingClock(FakeClock):
    """A FakeClock that counts the tasks asleep on it, so a test can advance it only
    once every task it drives has nothing left to do but wait for time to pass."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()
        self._deadlines_us: dict[int, int] = {}
        self._sleeper_ids = itertools.count()

    async def sleep(self, duration_s: float) -> None:
        deadline_us = self.now_us() + int(duration_s * US_PER_S)
        # FakeClock wakes a sleep of 0 us only at the next advance, which would look
        # like a task that never parks; the code under test must never ask for one.
        assert deadline_us > self.now_us(), f"sleep of {duration_s} s is under 1 us"
        sleeper = next(self._sleeper_ids)
        self._deadlines_us[sleeper] = deadline_us
        self.changed.set()
        try:
            await super().sleep(duration_s)
        finally:
            del self._deadlines_us[sleeper]

    def parked(self) -> int:
        """Sleepers not yet woken: an advance wakes those whose deadline it reached."""
        return sum(
            deadline_us > self.now_us() for deadline_us in self._deadlines_us.values()
        )


async def drive(
    clock: ParkingClock,
    tasks: Sequence[asyncio.Task[None]],
    *,
    step_us: int,
    steps_max: int,
    on_quiet: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Advance by `step_us` whenever every unfinished task sleeps; returns the steps."""
    for task in tasks:
        task.add_done_callback(lambda _: clock.changed.set())
    steps = 0

    while unfinished := [task for task in tasks if not task.done()]:
        if clock.parked() < len(unfinished):
            clock.changed.clear()
            await asyncio.wait_for(clock.changed.wait(), QUIET_TIMEOUT_S)
            continue

        if on_quiet is not None:
            await on_quiet()
        assert steps < steps_max, f"tasks still running after {steps} steps"
        advance_us(clock, step_us)
        steps += 1

    await asyncio.gather(*tasks)
    return steps


@pytest.fixture
def clock() -> ParkingClock:
    return ParkingClock()


@pytest.fixture
def make_slots(
    client: redis_asyncio.Redis, key_prefix: str, clock: ParkingClock
) -> Callable[..., SharedSlots]:
    def make(
        slots_max: int,
        *,
        lease_s: float = LEASE_S,
        redis_client: redis_asyncio.Redis | None = None,
    ) -> SharedSlots:
        return SharedSlots(
            redis_client or client,
            key_prefix=key_prefix,
            name="requests",
            slots_max=slots_max,
            lease_s=lease_s,
            clock=clock,
        )

    return make


async def leased(slots: SharedSlots) -> SlotLease:
    outcome = await slots.acquire()
    assert isinstance(outcome, SlotLease), outcome
    return outcome


async def busy_wait_s(slots: SharedSlots) -> float:
    outcome = await slots.acquire()
    assert isinstance(outcome, SlotsBusy), outcome
    return outcome.wait_s


async def test_acquire_leases_up_to_the_limit_then_reports_the_earliest_lapse(
    make_slots: Callable[..., SharedSlots],
    client: redis_asyncio.Redis,
    clock: FakeClock,
) -> None:
    slots = make_slots(3)
    start_us = clock.now_us()

    leases = []
    for _ in range(3):
        leases.append(await leased(slots))
        advance_us(clock, US_PER_S)
    assert [lease.expires_us for lease in leases] == [
        start_us + LEASE_US + i * US_PER_S for i in range(3)
    ]
    assert len({lease.token for lease in leases}) == 3

    # Three seconds in, the first lease has seven seconds to run.
    assert await busy_wait_s(slots) == 7.0
    assert await client.zcard(slots.key) == 3
    assert (slots.stats.current, slots.stats.peak, slots.stats.limit) == (3, 3, 3)
    assert (slots.stats.acquired, slots.stats.busy) == (3, 1)

    assert await slots.release(leases[1].token)
    assert slots.stats.current == 2
    assert (await leased(slots)).expires_us == clock.now_us() + LEASE_US


async def test_lapsed_lease_of_a_dead_holder_frees_its_slot_after_lease_s(
    make_slots: Callable[..., SharedSlots],
    client: redis_asyncio.Redis,
    clock: FakeClock,
) -> None:
    dead_client = new_client()
    dead = make_slots(2, redis_client=dead_client)
    await leased(dead)
    await leased(dead)
    # The holder dies without releasing: its connection goes, its leases stay.
    await dead_client.aclose()
    survivor = make_slots(2)

    assert await busy_wait_s(survivor) == LEASE_S
    advance_us(clock, LEASE_US - 1)
    assert await busy_wait_s(survivor) == 1e-6

    advance_us(clock, 1)
    await leased(survivor)
    await leased(survivor)
    assert await busy_wait_s(survivor) == LEASE_S
    assert await client.zcard(survivor.key) == 2


async def test_release_of_an_unknown_or_lapsed_token_frees_nothing(
    make_slots: Callable[..., SharedSlots],
    client: redis_asyncio.Redis,
    clock: FakeClock,
) -> None:
    first, second = make_slots(1), make_slots(1)
    assert not await first.release("never-leased")

    lapsed = await leased(first)
    advance_us(clock, LEASE_US)
    current = await leased(second)

    # The lapsed holder's late release must not free the slot that went to another.
    assert not await first.release(lapsed.token)
    assert await busy_wait_s(first) == LEASE_S
    assert await client.zcard(first.key) == 1

    assert await second.release(current.token)
    assert not await second.release(current.token)
    assert await client.exists(first.key) == 0
    assert (first.stats.lapsed, first.stats.released) == (2, 0)
    assert (second.stats.lapsed, second.stats.released) == (1, 1)


async def test_renew_extends_a_live_lease_and_refuses_a_lapsed_one(
    make_slots: Callable[..., SharedSlots],
    client: redis_asyncio.Redis,
    clock: FakeClock,
) -> None:
    holder, other = make_slots(1), make_slots(1)
    lease = await leased(holder)

    advance_us(clock, 8 * US_PER_S)
    renewed = await holder.renew(lease.token)
    assert renewed == SlotLease(token=lease.token, expires_us=clock.now_us() + LEASE_US)
    ttl_ms = await client.pttl(holder.key)
    assert KEY_TTL_SLACK_MS + 9_000 < ttl_ms <= KEY_TTL_SLACK_MS + 10_000

    # Past the original expiry the slot is still held, until the renewed one.
    advance_us(clock, 5 * US_PER_S)
    assert await busy_wait_s(other) == 5.0
    advance_us(clock, 5 * US_PER_S)
    assert await holder.renew(lease.token) is None
    await leased(other)
    assert (holder.stats.renewed, holder.stats.lapsed) == (1, 1)


async def test_renew_with_a_shorter_lease_never_shortens_one(
    make_slots: Callable[..., SharedSlots], clock: FakeClock
) -> None:
    long_lease, short_lease = make_slots(1, lease_s=LEASE_S), make_slots(1, lease_s=1.0)
    lease = await leased(long_lease)

    renewed = await short_lease.renew(lease.token)

    assert renewed == lease
    assert await busy_wait_s(short_lease) == LEASE_S


async def test_slot_waits_for_a_release_and_releases_when_the_body_fails(
    make_slots: Callable[..., SharedSlots],
    client: redis_asyncio.Redis,
    clock: ParkingClock,
) -> None:
    holder, waiter = make_slots(1), make_slots(1)
    held = await leased(holder)
    acquired_at_us: list[int] = []

    async def fail_while_holding() -> None:
        with pytest.raises(RuntimeError, match="request failed"):
            async with waiter.slot(deadline_s=1.0):
                acquired_at_us.append(clock.now_us())
                assert await client.zcard(waiter.key) == 1
                raise RuntimeError("request failed")

    async def release_after_two_polls() -> None:
        if clock.now_us() - start_us == 2 * POLL_US:
            assert await holder.release(held.token)

    start_us = clock.now_us()
    task = asyncio.create_task(fail_while_holding())
    await drive(
        clock, [task], step_us=POLL_US, steps_max=10, on_quiet=release_after_two_polls
    )

    # Refused at 0, 50 and 100 ms; released then, and found free at the next poll.
    assert acquired_at_us == [start_us + 3 * POLL_US]
    assert await client.exists(waiter.key) == 0
    assert (waiter.stats.busy, waiter.stats.waits, waiter.stats.released) == (3, 1, 1)


async def test_wait_and_acquire_sleeps_only_until_the_earliest_lease_lapses(
    make_slots: Callable[..., SharedSlots], clock: ParkingClock
) -> None:
    # A lease shorter than the poll interval: the waiter sleeps the hint, not the poll.
    dead = make_slots(1, lease_s=0.02)
    await leased(dead)
    waiter = make_slots(1)
    start_us = clock.now_us()
    leases: list[SlotLease] = []

    async def wait() -> None:
        leases.append(await waiter.wait_and_acquire(deadline_s=1.0))

    await drive(clock, [asyncio.create_task(wait())], step_us=1_000, steps_max=100)

    assert clock.now_us() == start_us + 20_000
    assert leases[0].expires_us == start_us + 20_000 + LEASE_US
    assert (waiter.stats.busy, waiter.stats.waits) == (1, 1)


async def test_wait_and_acquire_tries_last_at_its_deadline_then_times_out(
    make_slots: Callable[..., SharedSlots], clock: ParkingClock
) -> None:
    holder, waiter = make_slots(1), make_slots(1)
    await leased(holder)

    # Bounded, so that a waiter that wrongly sleeps fails instead of hanging.
    with pytest.raises(SlotTimeout, match=r"stayed held for 0\.0 s"):
        await asyncio.wait_for(waiter.wait_and_acquire(deadline_s=0.0), QUIET_TIMEOUT_S)

    start_us = clock.now_us()
    timed_out_at_us: list[int] = []

    async def wait() -> None:
        with pytest.raises(SlotTimeout, match=r"stayed held for 0\.12 s"):
            await waiter.wait_and_acquire(deadline_s=0.12)
        timed_out_at_us.append(clock.now_us())

    await drive(clock, [asyncio.create_task(wait())], step_us=10_000, steps_max=100)

    # Attempts at 0 (refused at once above), then 0, 50, 100 and 120 ms.
    assert timed_out_at_us == [start_us + 120_000]
    assert (waiter.stats.busy, waiter.stats.timeouts, waiter.stats.waits) == (5, 2, 0)


async def test_two_processes_never_hold_more_than_the_limit(
    key_prefix: str, client: redis_asyncio.Redis, clock: ParkingClock
) -> None:
    seed = int(os.environ.get("STOCKWARD_TEST_SEED", secrets.randbelow(2**32)))
    print(f"seed={seed}")
    rng = random.Random(seed)
    slots_max = rng.randint(2, 5)
    clients = [new_client(), new_client()]
    processes = [
        SharedSlots(
            process_client,
            key_prefix=key_prefix,
            name="requests",
            slots_max=slots_max,
            # Far longer than the run, so that no lease lapses under its holder and
            # the live leases in Redis must match the model exactly.
            lease_s=LEASE_MAX_S,
            clock=clock,
        )
        for process_client in clients
    ]
    # Each worker's plan: which process it sends through and for how many polls it
    # holds the slot, round after round.
    plans = [
        [(rng.randrange(2), rng.randint(1, 6)) for _ in range(rng.randint(1, 4))]
        for _ in range(40)
    ]
    print(f"slots_max={slots_max} rounds={sum(map(len, plans))}")
    model = {"held": 0, "peak": 0}

    async def work(plan: list[tuple[int, int]]) -> None:
        for process, hold_polls in plan:
            async with processes[process].slot(deadline_s=LEASE_MAX_S):
                model["held"] += 1
                assert model["held"] <= slots_max
                model["peak"] = max(model["peak"], model["held"])
                await clock.sleep(hold_polls * SLOT_POLL_INTERVAL_S)
                model["held"] -= 1

    async def compare_with_redis() -> None:
        # Every task sleeps, either holding a slot or between polls for one.
        assert await client.zcard(processes[0].key) == model["held"]

    tasks = [asyncio.create_task(work(plan)) for plan in plans]
    try:
        await drive(
            clock, tasks, step_us=POLL_US, steps_max=10_000, on_quiet=compare_with_redis
        )
    finally:
        for process_client in clients:
            await process_client.aclose()

    stats = [process.stats for process in processes]
    print(f"stats={stats}")
    assert model["peak"] == slots_max
    assert all(process_stats.peak <= slots_max for process_stats in stats)
    assert sum(process_stats.acquired for process_stats in stats) == sum(
        map(len, plans)
    )
    assert sum(process_stats.released for process_stats in stats) == sum(
        map(len, plans)
    )
    assert all(process_stats.acquired > 0 for process_stats in stats)
    assert sum(process_stats.waits for process_stats in stats) > 0
    assert await client.exists(processes[0].key) == 0


async def test_caller_mistakes_raise_value_error(
    make_slots: Callable[..., SharedSlots], client: redis_asyncio.Redis
) -> None:
    with pytest.raises(ValueError, match="slots_max must be at least 1"):
        make_slots(0)
    with pytest.raises(ValueError, match="lease_s must be in"):
        make_slots(1, lease_s=0.0)
    with pytest.raises(ValueError, match="lease_s must be in"):
        make_slots(1, lease_s=LEASE_MAX_S + 1)
    with pytest.raises(ValueError, match="must be non-empty"):
        SharedSlots(
            client,
            key_prefix="",
            name="requests",
            slots_max=1,
            lease_s=1.0,
            clock=FakeClock(),
        )
    with pytest.raises(ValueError, match="deadline_s must be at least 0"):
        await make_slots(1).wait_and_acquire(deadline_s=-1.0)


async def test_unreachable_redis_raises_unavailable(clock: FakeClock) -> None:
    # Port 1 on loopback has no listener, so the connection is refused at once.
    client = redis_asyncio.Redis(
        host=REDIS_HOST, port=1, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
    )
    slots = SharedSlots(
        client,
        key_prefix="unused",
        name="requests",
        slots_max=1,
        lease_s=1.0,
        clock=clock,
    )
    try:
        with pytest.raises(RateLimiterUnavailable):
            await slots.acquire()
        with pytest.raises(RateLimiterUnavailable):
            await slots.renew("token")
        with pytest.raises(RateLimiterUnavailable):
            await slots.release("token")
        with pytest.raises(RateLimiterUnavailable):
            async with slots.slot(deadline_s=1.0):
                pytest.fail("no slot can be leased without Redis")
    finally:
        await client.aclose()
