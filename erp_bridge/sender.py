"""Delivering one batch to the ERP: within the shared quota, through the breaker,
again and again until the ERP acknowledges it or refuses it outright.

Design note. Every attempt first takes its cost from the shared quota in Redis (one
request, and one cell per line), then a slot of the ERP's concurrent-request limit,
and only then sends. A 429 is honoured for every process sharing the quota: its
Retry-After pushes the shared limits forward, so nobody sends before it ends. A 5xx,
a timeout or an answer that makes no sense counts against the breaker and is followed
by a capped, jittered backoff; the same batch is then resent, which the ERP recognises
by its id. Nothing is ever given up on here: skipping a batch would lose commitments,
so a stream that cannot deliver waits, and says so in its logs and status.
"""

import logging

from erp_bridge.adapters import (
    Acknowledgement,
    ErpAdapter,
    ErpBatch,
    Throttled,
    Transient,
)
from erp_bridge.breaker import Backoff, CircuitBreaker
from erp_bridge.rate_limit import (
    HOLD_OFF_MAX_S,
    RateLimiterUnavailable,
    RateLimitTimeout,
    SharedLimiter,
)
from erp_bridge.slots import SharedSlots, SlotTimeout
from erp_bridge.status import Counters, StreamState, StreamStatus
from server.clock import Clock

log = logging.getLogger(__name__)

# The limiter names every bridge charges.
REQUESTS = "requests"
LINES = "lines"

# How long one attempt may wait for the quota or a slot before it looks again (and
# reports itself waiting); the ERP's own backlog can keep a stream waiting longer.
QUOTA_WAIT_S = 30.0
# Redis down: the bridge cannot know the shared quota, so it sends nothing and looks
# again this often. Sending blind could break the ERP's limits for every process.
REDIS_RETRY_S = 1.0


class Sender:
    def __init__(
        self,
        *,
        adapter: ErpAdapter,
        limiter: SharedLimiter,
        slots: SharedSlots,
        breaker: CircuitBreaker,
        backoff: Backoff,
        counters: Counters,
        clock: Clock,
        request_timeout_s: float,
    ) -> None:
        self._adapter = adapter
        self._limiter = limiter
        self._slots = slots
        self._breaker = breaker
        self._backoff = backoff
        self._counters = counters
        self._clock = clock
        self._request_timeout_s = request_timeout_s

    async def deliver(self, batch: ErpBatch, status: StreamStatus) -> Acknowledgement:
        """Send until acknowledged. BatchRefused and BatchConflict are raised to the
        caller: resending the same batch cannot help."""
        failures = 0
        while True:
            status.state = StreamState.WAITING
            if not await self._admitted(batch, status):
                continue

            status.state = StreamState.SENDING
            try:
                acknowledgement = await self._attempt(batch)
            except SlotTimeout:
                # Every concurrent slot stayed taken: nothing was sent; queue again.
                self._breaker.release_probe()
                continue
            except RateLimiterUnavailable as error:
                self._breaker.release_probe()
                status.last_error = f"shared quota unavailable: {error}"
                log.error(
                    "slots unavailable: batch_id=%s error=%s", batch.batch_id, error
                )
                await self._clock.sleep(REDIS_RETRY_S)
                continue
            except Throttled as error:
                self._counters.throttled += 1
                await self._hold_off(error.retry_after_s, batch, status)
                continue
            except Transient as error:
                failures += 1
                self._counters.retries += 1
                self._breaker.failed()
                delay_s = self._backoff.delay_s(failures - 1)
                status.last_error = f"ERP failed: {error}"
                log.warning(
                    "erp attempt failed: batch_id=%s attempt=%d retry_in_s=%.2f "
                    "error=%s",
                    batch.batch_id,
                    failures,
                    delay_s,
                    error,
                )
                await self._clock.sleep(delay_s)
                continue

            self._breaker.succeeded()
            status.last_error = ""
            return acknowledgement

    async def _admitted(self, batch: ErpBatch, status: StreamStatus) -> bool:
        """Wait for the breaker and the shared quota; False means look again."""
        wait_s = self._breaker.wait_s()
        if wait_s > 0:
            status.last_error = f"breaker open for {self._breaker.endpoint}"
            await self._clock.sleep(wait_s)
            return False

        costs = {REQUESTS: 1, LINES: max(1, len(batch.lines))}
        try:
            await self._limiter.wait_and_acquire(costs, deadline_s=QUOTA_WAIT_S)
        except RateLimitTimeout:
            self._breaker.release_probe()
            return False
        except RateLimiterUnavailable as error:
            self._breaker.release_probe()
            status.last_error = f"shared quota unavailable: {error}"
            log.error("quota unavailable: batch_id=%s error=%s", batch.batch_id, error)
            await self._clock.sleep(REDIS_RETRY_S)
            return False
        return True

    async def _attempt(self, batch: ErpBatch) -> Acknowledgement:
        self._counters.requests += 1
        async with self._slots.slot(deadline_s=QUOTA_WAIT_S):
            acknowledgement = await self._adapter.send(
                batch, timeout_s=self._request_timeout_s
            )
        if acknowledgement.duplicate:
            self._counters.duplicates += 1
        return acknowledgement

    async def _hold_off(
        self, retry_after_s: float, batch: ErpBatch, status: StreamStatus
    ) -> None:
        log.warning(
            "erp throttled: batch_id=%s retry_after_s=%.3f",
            batch.batch_id,
            retry_after_s,
        )
        status.last_error = f"ERP throttled for {retry_after_s:.3f} s"
        try:
            await self._limiter.hold_off(min(retry_after_s, HOLD_OFF_MAX_S))
        except RateLimiterUnavailable as error:
            log.error("quota unavailable: hold_off error=%s", error)
        # The shared hold-off makes the next acquire wait; sleeping here as well keeps
        # this process honest even when Redis could not be told.
        await self._clock.sleep(retry_after_s)
