"""A rate limiter shared by every bridge process through Redis (GCRA).

Design note. The ERP throttles per account, not per connection, so the bridge processes
must share one quota. Each limit is a generic cell rate algorithm (GCRA): one number
per limit, the theoretical arrival time (TAT), kept in Redis. With the emission interval
T = 1/rate, a cost of c cells is admitted at time t when max(TAT, t) + c*T - t is at
most burst*T, and then TAT becomes max(TAT, t) + c*T. A refusal needs no bookkeeping:
the caller may come back after max(TAT, t) + c*T - burst*T - t, and at that instant
the same cost is admitted exactly.

One Lua script reads every limit a call names and writes them only if all of them
admit the cost, so a batch charged against requests and lines is either charged to both
or to neither, and no other process can slip in between the read and the write. The
script is registered once and runs with EVALSHA, so a call sends its arguments, not the
script text. Keys are `{prefix}:name`; the braces are a Redis Cluster hash tag that
keeps every limit of one prefix in the same slot, as a multi-key script requires.

The current time comes from the caller's injected clock, not from Redis's TIME, so that
tests drive the limiter on a FakeClock and never sleep. That is sound because all
bridge processes run on one machine or on NTP-synced hosts. Times are integer
microseconds, exact in Lua's doubles until the year 2255, and T is rounded up to a
whole microsecond, which only ever makes the limiter slower (by under 1 us per cell).

Window guarantee. The ERP admits "at most N in any sliding window (t - 1 s, t]". Take
cells admitted at t_1 <= ... <= t_k inside one such window, with costs c_1..c_k. After
the first, TAT >= t_1 + c_1*T; each later one adds c_i*T; the last admission needs
TAT - t_k <= burst*T. So t_1 + (c_1 + ... + c_k)*T <= t_k + burst*T, and as
t_k - t_1 < 1 s, the window holds c_1 + ... + c_k < burst + rate. The most a window can
hold is therefore burst + ceil(rate) - 1, and a greedy caller reaches it (burst back to
back, then one cell every T). It stays within N exactly when rate <= N - burst + 1;
`limit_for_window` picks that rate. A larger burst buys latency for a batch of lines at
the price of sustained rate: burst = N would leave one cell per second.

Hold-off. When the ERP answers 429 with Retry-After R at time n, no process may send
before n + R. A second script raises every limit's TAT to at least
H = n + R + (burst - 1)*T, and never lowers it. Proof that this suffices: a cost
c >= 1 at a time t < n + R finds TAT >= H > t, so admitting it would need
H + c*T - t <= TAT + c*T - t <= burst*T, that is n + R + (c - 1)*T <= t, which is
false for every c >= 1 because t < n + R. When the TAT is exactly H, a cost of 1 is
admitted at t = n + R (n + R + 0*T <= t), so the hold-off ends on time, and a cost c
waits (c - 1)*T longer, as if a full burst had been spent at n + R. A larger TAT is
left alone, so a short hold-off never shortens a long one or forgives a debt. Raising
a TAT only ever admits less, so the window guarantee above still holds. R is rounded
up to a whole microsecond.

Known shortcomings:
- Clock skew between processes leaks quota: a process whose clock runs d ahead of the
  others reads their TATs as d older and can take up to about rate*d extra cells in one
  window (a process behind only waits longer). A wall-clock step forward does the same.
- The guarantee holds for admission times here; the ERP counts arrivals there. Network
  jitter can bunch two admissions closer on arrival, so the bridge should either leave
  a little headroom below the ERP's N or treat a 429 as a signal to back off.
- Key TTLs run on Redis's own clock while TATs run on the callers', so each TTL gets
  `KEY_TTL_SLACK_MS` on top; an idle key lingers that long before it vanishes.
- A hold-off starts from the receiving process's clock when it calls hold_off, not from
  the instant the ERP sent the 429, so it ends late by the reply's transit time (safe).
  A process that sent before the hold-off landed in Redis is not recalled: requests
  already on the wire may still draw 429s of their own.
"""

import asyncio
import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as redis_asyncio
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from server.clock import US_PER_S, Clock
from server.engine.errors import ensure

logger = logging.getLogger(__name__)

# A key's TTL is counted by Redis's clock while its TAT is in the callers' clock; the
# slack keeps a key alive through a minute of disagreement (far beyond NTP's
# milliseconds, and beyond a test pausing its fake clock) so that a debt is never
# forgotten early. An idle key still vanishes within a minute of being paid off.
KEY_TTL_SLACK_MS = 60_000

# One script call is a single round trip on the local network; two seconds means Redis
# is down or stalled, and the bridge should hear about it rather than hang.
REDIS_CALL_TIMEOUT_S = 2.0

# Each attempt in wait_and_acquire is a Redis round trip after a wait that another
# process may have used first. A caller that loses this many races in a row is starved,
# which is a fault worth surfacing even when its deadline has not yet passed.
ACQUIRE_ATTEMPTS_MAX = 1_000

# ERPs ask for seconds to minutes. A Retry-After beyond an hour is either an outage,
# which the bridge's circuit breaker should handle instead of a silent stall of every
# process, or a misparsed header (an HTTP date read as seconds), so it is refused.
HOLD_OFF_MAX_S = 3_600.0

# Returns 0 when every limit admitted its cost (and charges them all), else the wait in
# microseconds until the slowest refusing limit would admit it (and charges nothing).
# ARGV: now_us, ttl slack in ms, then interval_us, capacity_us, cost for each key.
_GCRA_SCRIPT = """
local now_us = tonumber(ARGV[1])
local slack_ms = tonumber(ARGV[2])
local new_tats_us = {}
local wait_us = 0

for i, key in ipairs(KEYS) do
  local base = 2 + (i - 1) * 3
  local interval_us = tonumber(ARGV[base + 1])
  local capacity_us = tonumber(ARGV[base + 2])
  local cost = tonumber(ARGV[base + 3])
  local tat_us = now_us
  local stored = redis.call('GET', key)
  if stored then
    tat_us = math.max(tonumber(stored), now_us)
  end
  local new_tat_us = tat_us + cost * interval_us
  wait_us = math.max(wait_us, new_tat_us - capacity_us - now_us)
  new_tats_us[i] = new_tat_us
end

if wait_us > 0 then
  return wait_us
end

for i, key in ipairs(KEYS) do
  local ttl_ms = math.ceil((new_tats_us[i] - now_us) / 1000) + slack_ms
  redis.call('SET', key, string.format('%d', new_tats_us[i]),
             'PX', string.format('%d', ttl_ms))
end
return 0
"""

# Raises each key's TAT to at least the hold-off TAT, never lowering it; returns how
# many limits it moved. ARGV: now_us, ttl slack in ms, the hold-off end in us, then for
# each key (burst - 1) * interval_us.
_HOLD_OFF_SCRIPT = """
local now_us = tonumber(ARGV[1])
local slack_ms = tonumber(ARGV[2])
local until_us = tonumber(ARGV[3])
local moved = 0

for i, key in ipairs(KEYS) do
  local held_tat_us = until_us + tonumber(ARGV[3 + i])
  local stored = redis.call('GET', key)
  if not stored or tonumber(stored) < held_tat_us then
    local ttl_ms = math.ceil((held_tat_us - now_us) / 1000) + slack_ms
    redis.call('SET', key, string.format('%d', held_tat_us),
               'PX', string.format('%d', ttl_ms))
    moved = moved + 1
  end
end
return moved
"""


@dataclasses.dataclass(frozen=True)
class RateLimit:
    """One limit: `rate_per_s` cells per second, `burst` of them back to back.

    A call charges each limit a cost in cells: 1 for a request, the line count for
    lines. `burst` = 1 spaces cells evenly; it must be at least the largest cost.
    """

    name: str
    rate_per_s: float
    burst: int = 1

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("RateLimit.name must be a non-empty string")
        if not 0 < self.rate_per_s <= US_PER_S:
            raise ValueError(
                f"RateLimit {self.name!r}: rate_per_s must be in (0, {US_PER_S}], "
                f"got {self.rate_per_s}"
            )
        if self.burst < 1:
            raise ValueError(
                f"RateLimit {self.name!r}: burst must be at least 1, got {self.burst}"
            )

    @property
    def interval_us(self) -> int:
        # Rounded up: a slightly longer interval can only admit less, so the window
        # guarantee survives the rounding.
        return math.ceil(US_PER_S / self.rate_per_s)

    def window_max(self) -> int:
        """The most cells this limit can admit in any window (t - 1 s, t]."""
        # Exact over the rounded interval: the window spans at most 1 s - 1 us between
        # its first and last admission, so k*T <= burst*T + 1 s - 1 us.
        return (self.burst * self.interval_us + US_PER_S - 1) // self.interval_us


def limit_for_window(name: str, n_per_window: int, *, burst: int) -> RateLimit:
    """The fastest limit that never admits more than `n_per_window` in (t - 1 s, t].

    From the design note: a window holds at most burst + ceil(rate) - 1 cells, so the
    rate is n_per_window - burst + 1.
    """
    if not 1 <= burst <= n_per_window:
        raise ValueError(
            f"limit_for_window({name!r}): burst must be in 1..n_per_window "
            f"({n_per_window}), got {burst}"
        )

    limit = RateLimit(name=name, rate_per_s=n_per_window - burst + 1, burst=burst)
    ensure(limit.window_max() <= n_per_window, f"{limit} breaks the window bound")
    return limit


class RateLimitTimeout(Exception):
    """wait_and_acquire could not be admitted before its deadline."""


class RateLimiterUnavailable(Exception):
    """Redis failed or did not answer in time.

    Whether the call took effect is unknown: a cost may have been charged, a hold-off
    set or a slot leased (erp_bridge.slots raises this too) with the reply lost.
    """


@dataclasses.dataclass
class LimiterStats:
    admitted: int = 0
    refused: int = 0
    timeouts: int = 0
    hold_offs: int = 0


class SharedLimiter:
    """Limits shared through Redis by every process that uses the same key prefix."""

    def __init__(
        self,
        redis_client: redis_asyncio.Redis,
        *,
        key_prefix: str,
        limits: Sequence[RateLimit],
        clock: Clock,
    ) -> None:
        names = [limit.name for limit in limits]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"limits must be non-empty with unique names, got {names}")
        if not key_prefix:
            raise ValueError("key_prefix must be a non-empty string")

        self._limits = {limit.name: limit for limit in limits}
        self._key_prefix = key_prefix
        self._clock = clock
        self._script: AsyncScript = redis_client.register_script(_GCRA_SCRIPT)
        self._hold_off_script: AsyncScript = redis_client.register_script(
            _HOLD_OFF_SCRIPT
        )
        self.stats = LimiterStats()

    def key(self, name: str) -> str:
        """The Redis key holding the TAT of limit `name`."""
        return f"{{{self._key_prefix}}}:{name}"

    async def acquire(self, costs: Mapping[str, int]) -> float:
        """0.0 if every named limit admitted its cost (all charged), else the wait in s.

        On a refusal nothing is charged, and the wait is until the slowest refusing
        limit would admit, assuming no other caller gets there first.
        """
        args = self._script_args(costs)

        wait_us = await self._call(self._script, list(costs), args)

        if wait_us == 0:
            self.stats.admitted += 1
            return 0.0
        self.stats.refused += 1
        logger.debug("rate limit refused: costs=%s wait_us=%d", dict(costs), wait_us)
        return seconds_covering(wait_us)

    async def wait_and_acquire(
        self, costs: Mapping[str, int], *, deadline_s: float
    ) -> float:
        """Wait on the clock until admitted; returns the seconds waited.

        `deadline_s` is the budget from this call. Raises RateLimitTimeout, without
        sleeping in vain, once the next admission would come after it.
        """
        if deadline_s < 0:
            raise ValueError(f"deadline_s must be at least 0, got {deadline_s}")
        start_us = self._clock.now_us()
        deadline_us = start_us + int(deadline_s * US_PER_S)

        for _ in range(ACQUIRE_ATTEMPTS_MAX):
            wait_s = await self.acquire(costs)
            now_us = self._clock.now_us()
            if wait_s == 0.0:
                return (now_us - start_us) / US_PER_S
            if now_us + wait_s * US_PER_S > deadline_us:
                self.stats.timeouts += 1
                raise RateLimitTimeout(
                    f"costs {dict(costs)} would be admitted in {wait_s:.6f} s, "
                    f"after the deadline of {deadline_s} s from the call"
                )
            await self._clock.sleep(wait_s)

        self.stats.timeouts += 1
        logger.warning(
            "rate limit starved: costs=%s attempts=%d",
            dict(costs),
            ACQUIRE_ATTEMPTS_MAX,
        )
        raise RateLimitTimeout(
            f"costs {dict(costs)} were refused {ACQUIRE_ATTEMPTS_MAX} times in a row"
        )

    async def hold_off(self, retry_after_s: float) -> int:
        """Let no process on this prefix be admitted before now + `retry_after_s`.

        For the ERP's 429 with Retry-After: every limit's TAT is raised so that the
        first cell is admitted exactly then (see the design note), never lowered.
        Returns how many limits were pushed back; 0 means a longer hold-off or debt
        was already in place.
        """
        if not 0 <= retry_after_s <= HOLD_OFF_MAX_S:
            raise ValueError(
                f"retry_after_s must be in 0..{HOLD_OFF_MAX_S}, got {retry_after_s}"
            )
        now_us = self._clock.now_us()
        # Rounded to a nanosecond first so that float noise (536.868 s comes out as
        # 536868000.00000006 us) is not taken for a fraction worth a microsecond more.
        until_us = now_us + math.ceil(round(retry_after_s * US_PER_S, 3))
        names = list(self._limits)
        args = [now_us, KEY_TTL_SLACK_MS, until_us]
        args += [
            (limit.burst - 1) * limit.interval_us for limit in self._limits.values()
        ]

        moved = await self._call(self._hold_off_script, names, args)

        ensure(moved <= len(names), f"hold-off moved {moved} of {len(names)} limits")
        self.stats.hold_offs += 1
        logger.warning(
            "rate limit hold off: retry_after_s=%s limits_moved=%d",
            retry_after_s,
            moved,
        )
        return moved

    def _script_args(self, costs: Mapping[str, int]) -> list[int]:
        if not costs:
            raise ValueError("costs must name at least one limit")
        args = [self._clock.now_us(), KEY_TTL_SLACK_MS]
        for name, cost in costs.items():
            limit = self._limits.get(name)
            if limit is None:
                raise ValueError(
                    f"unknown limit {name!r}; expected one of {sorted(self._limits)}"
                )
            if not 1 <= cost <= limit.burst:
                raise ValueError(
                    f"cost {cost} for limit {name!r} must be in 1..burst "
                    f"({limit.burst}): a larger cost could never be admitted"
                )
            args += [limit.interval_us, limit.burst * limit.interval_us, cost]
        return args

    async def _call(
        self, script: AsyncScript, names: list[str], args: list[int]
    ) -> int:
        # The one place where Redis's exceptions become ours.
        keys = [self.key(name) for name in names]
        try:
            async with asyncio.timeout(REDIS_CALL_TIMEOUT_S):
                reply: Any = await script(keys=keys, args=args)
        except (RedisError, TimeoutError) as error:
            raise RateLimiterUnavailable(
                f"rate limit script failed: {error!r}"
            ) from error

        ensure(isinstance(reply, int) and reply >= 0, f"script reply {reply!r}")
        return int(reply)


def seconds_covering(duration_us: int) -> float:
    """`duration_us` as seconds that convert back to at least `duration_us`."""
    # A clock that turns seconds back into microseconds by truncation (as FakeClock
    # does) must land on or after the instant waited for, never 1 us before it.
    seconds = duration_us / US_PER_S
    while int(seconds * US_PER_S) < duration_us:
        seconds = math.nextafter(seconds, math.inf)
    return seconds
