"""A counting semaphore shared by every bridge process through Redis: leased slots.

Design note. Besides its rates, the ERP allows at most N requests in flight per
account, however many bridge processes send them. Each request in flight holds a slot,
and a slot is a lease: a member of one Redis sorted set, named by a random token and
scored with the instant its lease lapses, in microseconds of the holder's injected
clock. A lease is live while now < expiry. Every script first drops the lapsed leases
(score <= now), then counts and adds or removes in the same call, so two processes can
never both see N - 1 live leases and both add one.

Why a lease and not a counter. An INCR on acquire and a DECR on release lose a slot for
good whenever the DECR never happens: a process killed or partitioned while holding, or
a release whose reply timed out and is not retried for fear of decrementing twice. After
N such losses nobody holds anything and every process waits forever. A lease comes back
by itself at most `lease_s` after its holder went silent, and a release names its token,
so repeating a release, or releasing a lease that already lapsed and went to another
process, frees nothing that is not its own. The price is that `lease_s` must outlast
the longest a request can be in flight (the request timeout plus slack): a lease that
lapses while its request still runs stops counting, and the ERP may see N + 1. Work
that can run longer renews its lease.

Waiting. A refusal tells the caller when the earliest live lease lapses, which is an
upper bound: releases usually come much sooner and nothing announces them, so
wait_and_acquire polls every `SLOT_POLL_INTERVAL_S` at most. Times come from the
injected clock, as in rate_limit.py, so tests run on a FakeClock. The set's key expires
`KEY_TTL_SLACK_MS` after its latest lease, so an idle account leaves nothing behind.

Known shortcomings:
- Clock skew: a process whose clock runs d ahead of the others sees their leases lapse
  d early and may take a slot whose request is still running, for up to d at the end of
  each lease. This is harmless while `lease_s` exceeds the request timeout by more than
  the skew, which NTP's milliseconds leave plenty of room for. A process behind only
  waits longer.
- A Redis restart without persistence, a failover to a replica that missed the latest
  writes, or an eviction of the key loses every lease. Every process then sees N free
  slots while up to N requests are still in flight, so the ERP can see up to N extra
  concurrent requests (2N in all) for at most one lease period, until those requests
  end. The ERP's own refusal (429) still protects it, and the bridge backs off on it;
  releases of the lost tokens are harmless.
- An acquire whose reply is lost (a timeout or a cancellation after the script ran)
  leaves a lease nobody holds: one slot fewer, never one more, until it lapses.
- Waiters are not served in order. A waiter can lose the race to a process that polls
  at the right moment, and a freed slot may sit idle for up to a poll interval;
  wait_and_acquire bounds the waiting by its deadline and `SLOT_ATTEMPTS_MAX`.
- Every process must be configured with the same N: each admits against its own, so
  while N is being changed the largest N in use is the one the ERP sees.
"""

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as redis_asyncio
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from erp_bridge.rate_limit import (
    KEY_TTL_SLACK_MS,
    REDIS_CALL_TIMEOUT_S,
    RateLimiterUnavailable,
    seconds_covering,
)
from server.clock import US_PER_S, Clock
from server.engine.errors import ensure

logger = logging.getLogger(__name__)

# A lease covers one ERP request plus slack, which is seconds to minutes. A lease of
# more than an hour is most likely milliseconds passed as seconds, and would keep a
# dead process's slot away from everyone for that long.
LEASE_MAX_S = 3_600.0

# ERP requests take hundreds of milliseconds, so a waiter that looks every 50 ms adds
# little to its wait for a freed slot, at a cost of 20 Redis round trips per second per
# waiting task.
SLOT_POLL_INTERVAL_S = 0.05

# At the poll interval this is 100 s of polling, far beyond the request-sized deadlines
# callers pass, so reaching it means the clock or the deadline is broken.
SLOT_ATTEMPTS_MAX = 2_000

# 128 random bits: two processes never draw the same token, so a token names one lease.
TOKEN_BYTES = 16

# Lua that drops the leases lapsed at ARGV[1] (now_us) from the set in KEYS[1].
_DROP_LAPSED = """
local key = KEYS[1]
local now_us = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%d', now_us))
"""

# Lua that sets the set's TTL to outlive its latest lease by ARGV[#ARGV] ms.
_EXTEND_TTL = """
local latest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
local ttl_ms = math.ceil((tonumber(latest[2]) - now_us) / 1000) + tonumber(ARGV[#ARGV])
redis.call('PEXPIRE', key, string.format('%d', ttl_ms))
"""

# ARGV: now_us, slots_max, lease_us, token, ttl slack in ms. Returns {1, live leases,
# expiry in us} when leased, or {0, live leases, wait in us until the earliest lapses}.
_ACQUIRE_SCRIPT = (
    _DROP_LAPSED
    + """
local live = redis.call('ZCARD', key)
if live >= tonumber(ARGV[2]) then
  local earliest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return {0, live, tonumber(earliest[2]) - now_us}
end

local expires_us = now_us + tonumber(ARGV[3])
local added = redis.call('ZADD', key, 'NX', string.format('%d', expires_us), ARGV[4])
if added ~= 1 then
  return redis.error_reply('slot token already in use')
end
"""
    + _EXTEND_TTL
    + """
return {1, live + 1, expires_us}
"""
)

# ARGV: now_us, lease_us, token, ttl slack in ms. Returns {1, live leases, expiry in us}
# when the lease was live (its expiry never moves earlier), else {0, live leases, 0}.
_RENEW_SCRIPT = (
    _DROP_LAPSED
    + """
local live = redis.call('ZCARD', key)
if not redis.call('ZSCORE', key, ARGV[3]) then
  return {0, live, 0}
end

local expires_us = now_us + tonumber(ARGV[2])
redis.call('ZADD', key, 'XX', 'GT', string.format('%d', expires_us), ARGV[3])
"""
    + _EXTEND_TTL
    + """
return {1, live, tonumber(redis.call('ZSCORE', key, ARGV[3]))}
"""
)

# ARGV: now_us, token, ttl slack in ms (unused: a release never extends the key).
# Returns {1 when the token held a live lease else 0, live leases}.
_RELEASE_SCRIPT = (
    _DROP_LAPSED
    + """
local removed = redis.call('ZREM', key, ARGV[2])
return {removed, redis.call('ZCARD', key)}
"""
)


@dataclasses.dataclass(frozen=True)
class SlotLease:
    """A held slot: renew or release it by `token`; it lapses at `expires_us`."""

    token: str
    expires_us: int


@dataclasses.dataclass(frozen=True)
class SlotsBusy:
    """Every slot was held; the earliest lease lapses `wait_s` from now.

    A holder may release sooner, so this is the longest a caller needs to wait, assuming
    no other caller takes the slot first.
    """

    wait_s: float


class SlotTimeout(Exception):
    """wait_and_acquire found no free slot before its deadline."""


@dataclasses.dataclass
class SlotStats:
    # The ERP's limit N, the live leases of all processes as of this process's last
    # call, and the most it has seen.
    limit: int
    current: int = 0
    peak: int = 0
    acquired: int = 0
    # Refusals because every slot was held, and acquisitions that had to wait.
    busy: int = 0
    waits: int = 0
    timeouts: int = 0
    renewed: int = 0
    released: int = 0
    # Renewals and releases that found no live lease: it lapsed, so lease_s is too
    # short for the work done under it, or the token was never leased here.
    lapsed: int = 0


class SharedSlots:
    """At most `slots_max` leases live at once among every process on the same key."""

    def __init__(
        self,
        redis_client: redis_asyncio.Redis,
        *,
        key_prefix: str,
        name: str,
        slots_max: int,
        lease_s: float,
        clock: Clock,
    ) -> None:
        if not key_prefix or not name:
            raise ValueError(
                f"key_prefix and name must be non-empty, got {key_prefix!r}, {name!r}"
            )
        if slots_max < 1:
            raise ValueError(f"slots_max must be at least 1, got {slots_max}")
        if not 0 < lease_s <= LEASE_MAX_S:
            raise ValueError(f"lease_s must be in (0, {LEASE_MAX_S}], got {lease_s}")

        # The braces are the same Redis Cluster hash tag as the rate limiter's keys, so
        # one account's limits and slots live in one slot of the cluster.
        self.key = f"{{{key_prefix}}}:slots:{name}"
        self._slots_max = slots_max
        self._lease_us = round(lease_s * US_PER_S)
        self._clock = clock
        self._acquire_script: AsyncScript = redis_client.register_script(
            _ACQUIRE_SCRIPT
        )
        self._renew_script: AsyncScript = redis_client.register_script(_RENEW_SCRIPT)
        self._release_script: AsyncScript = redis_client.register_script(
            _RELEASE_SCRIPT
        )
        self.stats = SlotStats(limit=slots_max)

    async def acquire(self) -> SlotLease | SlotsBusy:
        """A lease when fewer than `slots_max` are live, else how long the wait is."""
        token = secrets.token_hex(TOKEN_BYTES)
        args: list[int | str] = [
            self._clock.now_us(),
            self._slots_max,
            self._lease_us,
            token,
        ]

        is_leased, _, value_us = await self._call(self._acquire_script, args, 3)

        if is_leased:
            self.stats.acquired += 1
            return SlotLease(token=token, expires_us=value_us)
        ensure(value_us > 0, f"a live lease lapses in {value_us} us")
        self.stats.busy += 1
        logger.debug("slots busy: key=%s wait_us=%d", self.key, value_us)
        return SlotsBusy(wait_s=seconds_covering(value_us))

    async def renew(self, token: str) -> SlotLease | None:
        """Extend a live lease to `lease_s` from now; None if it has already lapsed.

        A lapsed lease may have gone to another process, so its holder must treat the
        slot as lost rather than acquire it back silently.
        """
        args: list[int | str] = [self._clock.now_us(), self._lease_us, token]

        is_live, _, expires_us = await self._call(self._renew_script, args, 3)

        if not is_live:
            self._record_lapsed("renew", token)
            return None
        self.stats.renewed += 1
        return SlotLease(token=token, expires_us=expires_us)

    async def release(self, token: str) -> bool:
        """Give the slot back; False (and nothing freed) if the lease had lapsed.

        Harmless to repeat, and harmless for a token this process never held.
        """
        args: list[int | str] = [self._clock.now_us(), token]

        was_live, _ = await self._call(self._release_script, args, 2)

        if not was_live:
            self._record_lapsed("release", token)
            return False
        self.stats.released += 1
        return True

    async def wait_and_acquire(self, *, deadline_s: float) -> SlotLease:
        """Wait on the clock until a slot is leased, within `deadline_s` from the call.

        The last attempt is made at the deadline; SlotTimeout if it fails too.
        """
        if deadline_s < 0:
            raise ValueError(f"deadline_s must be at least 0, got {deadline_s}")
        deadline_us = self._clock.now_us() + round(deadline_s * US_PER_S)
        has_waited = False

        for _ in range(SLOT_ATTEMPTS_MAX):
            outcome = await self.acquire()
            if isinstance(outcome, SlotLease):
                if has_waited:
                    self.stats.waits += 1
                return outcome

            remaining_us = deadline_us - self._clock.now_us()
            if remaining_us <= 0:
                self.stats.timeouts += 1
                raise SlotTimeout(
                    f"all {self._slots_max} slots of {self.key} stayed held for "
                    f"{deadline_s} s"
                )
            has_waited = True
            pause_s = min(
                outcome.wait_s, SLOT_POLL_INTERVAL_S, seconds_covering(remaining_us)
            )
            await self._clock.sleep(pause_s)

        self.stats.timeouts += 1
        logger.warning("slots starved: key=%s attempts=%d", self.key, SLOT_ATTEMPTS_MAX)
        raise SlotTimeout(
            f"all {self._slots_max} slots of {self.key} were held for "
            f"{SLOT_ATTEMPTS_MAX} attempts in a row"
        )

    @contextlib.asynccontextmanager
    async def slot(self, *, deadline_s: float) -> AsyncIterator[SlotLease]:
        """`async with slots.slot(deadline_s=...) as lease:` holds a slot for the body.

        The slot is released on the way out, whatever the body did. A release that
        fails on Redis is logged, not raised: the body's own outcome (a request that
        reached the ERP) matters more than a slot that will lapse by itself.
        """
        lease = await self.wait_and_acquire(deadline_s=deadline_s)
        try:
            yield lease
        finally:
            await self._release_or_let_lapse(lease)

    async def _release_or_let_lapse(self, lease: SlotLease) -> None:
        try:
            await self.release(lease.token)
        except RateLimiterUnavailable as error:
            logger.warning(
                "slot release failed, lease will lapse: key=%s expires_us=%d error=%r",
                self.key,
                lease.expires_us,
                error,
            )

    def _record_lapsed(self, operation: str, token: str) -> None:
        self.stats.lapsed += 1
        logger.warning(
            "slot lease lapsed before %s: key=%s token=%s lease_us=%d",
            operation,
            self.key,
            token,
            self._lease_us,
        )

    async def _call(
        self, script: AsyncScript, args: list[int | str], reply_length: int
    ) -> list[int]:
        # The one place where Redis's exceptions become ours. Every script takes the
        # TTL slack as its last argument and returns the live leases second.
        try:
            async with asyncio.timeout(REDIS_CALL_TIMEOUT_S):
                reply: Any = await script(
                    keys=[self.key], args=[*args, KEY_TTL_SLACK_MS]
                )
        except (RedisError, TimeoutError) as error:
            raise RateLimiterUnavailable(f"slots script failed: {error!r}") from error

        ensure(
            isinstance(reply, list)
            and len(reply) == reply_length
            and all(isinstance(item, int) and item >= 0 for item in reply),
            f"slots script reply {reply!r}",
        )
        # No upper bound is checked on the live count: while N is being changed,
        # processes still on a larger N may rightly hold more than this one's N.
        self.stats.current = reply[1]
        self.stats.peak = max(self.stats.peak, reply[1])
        return [int(item) for item in reply]
