"""Delivering one batch to the ERP: within the shared quota, through the breaker,
again and again until the ERP acknowledges it or refuses it outright.

Design note. Every attempt first takes a slot of the ERP's concurrent-request limit,
then its cost from the shared quota in Redis (one request, and one cell per line), and
sends at once: the quota counts admissions while the ERP counts arrivals, so nothing
that can wait long may stand between the two (the config's send-delay allowance covers
the rest). A 429 is honoured for every process sharing the quota: its
Retry-After pushes the shared limits forward, so nobody sends before it ends. A 5xx,
a timeout or an answer that makes no sense counts against the breaker and is followed
by a capped, jittered backoff; the same batch is then resent, which the ERP recognises
by its id. Nothing is ever given up on here: skipping a batch would lose commitments,
so a stream that cannot deliver waits, and says so in its logs and status.
"""

import logging

from erp_bridge.adapters import (
    Acknowledgement,
    BatchConflict,
    BatchRefused,
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

# How long one attempt may wait for a slot before it looks again (and reports itself
# waiting); the ERP's own backlog can keep a stream waiting longer.
QUOTA_WAIT_S = 30.0
# How long an attempt holding a slot may wait for the rate quota: well inside the
# slot's lease (the request timeout plus five seconds), so the lease cannot lapse
# while the request has yet to be sent.
QUOTA_WAIT_IN_SLOT_S = 2.0
# Redis down: the bridge cannot know the shared quota, so it sends nothing and looks
# again this often. Sending blind could break the ERP's limits for every process.
REDIS_RETRY_S = 1.0


class _NotSent(Exception):
    """The attempt sent nothing (no slot, no quota, Redis down); try after a while."""

    def __init__(self, retry_in_s: float) -> None:
        super().__init__(f"not sent; again in {retry_in_s} s")
        self.retry_in_s = retry_in_s


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
            wait_s = self._breaker.wait_s()
            if wait_s > 0:
                status.last_error = f"breaker open for {self._breaker.endpoint}"
                await self._clock.sleep(wait_s)
                continue

            # From here this sender may be the breaker's one probe: every way out
            # must tell the breaker how it went, or no stream would send again.
            try:
                acknowledgement = await self._attempt(batch, status)
            except _NotSent as error:
                self._breaker.release_probe()
                await self._clock.sleep(error.retry_in_s)
                continue
            except Throttled as error:
                # The ERP answered: it is up, and said when to come back.
                self._breaker.succeeded()
                self._counters.throttled += 1
                await self._hold_off(error.retry_after_s, batch, status)
                continue
            except Transient as error:
                failures += 1
                self._counters.retries += 1
                self._breaker.failed()
                await self._back_off(batch, status, error, failures)
                continue
            except (BatchRefused, BatchConflict):
                self._breaker.succeeded()
                raise
            except BaseException:
                self._breaker.release_probe()
                raise

            self._breaker.succeeded()
            status.last_error = ""
            return acknowledgement

    async def _attempt(self, batch: ErpBatch, status: StreamStatus) -> Acknowledgement:
        """One send: a concurrent slot first, then the rate quota, then the request,
        so that nothing but the event loop stands between admission and arrival."""
        try:
            lease = await self._slots.wait_and_acquire(deadline_s=QUOTA_WAIT_S)
        except SlotTimeout as error:
            raise _NotSent(0.0) from error
        except RateLimiterUnavailable as error:
            self._redis_down("slots", batch, status, error)
            raise _NotSent(REDIS_RETRY_S) from error

        may_still_run = False
        try:
            await self._take_quota(batch, status)
            status.state = StreamState.SENDING
            self._counters.requests += 1
            acknowledgement = await self._adapter.send(
                batch, timeout_s=self._request_timeout_s
            )
        except Transient as error:
            may_still_run = error.may_still_run
            raise
        finally:
            # A request that got no answer may still run at the ERP: its slot is
            # left to lapse with its lease rather than handed to the next request.
            if not may_still_run:
                await self._release(lease.token)

        if acknowledgement.duplicate:
            self._counters.duplicates += 1
        return acknowledgement

    async def _take_quota(self, batch: ErpBatch, status: StreamStatus) -> None:
        # The slot's lease runs while this waits, so the wait stays well inside it;
        # a longer one (a shared hold-off) gives the slot back and comes again.
        costs = {REQUESTS: 1, LINES: max(1, len(batch.lines))}
        try:
            await self._limiter.wait_and_acquire(costs, deadline_s=QUOTA_WAIT_IN_SLOT_S)
        except RateLimitTimeout as error:
            status.last_error = "waiting for the shared ERP quota"
            raise _NotSent(QUOTA_WAIT_IN_SLOT_S) from error
        except RateLimiterUnavailable as error:
            self._redis_down("quota", batch, status, error)
            raise _NotSent(REDIS_RETRY_S) from error

    async def _release(self, token: str) -> None:
        try:
            await self._slots.release(token)
        except RateLimiterUnavailable as error:
            # The lease lapses on its own; nothing else is lost.
            log.warning("slot release failed: error=%s", error)

    def _redis_down(
        self, what: str, batch: ErpBatch, status: StreamStatus, error: Exception
    ) -> None:
        status.last_error = f"shared {what} unavailable: {error}"
        log.error(
            "shared %s unavailable: batch_id=%s error=%s", what, batch.batch_id, error
        )

    async def _back_off(
        self, batch: ErpBatch, status: StreamStatus, error: Transient, failures: int
    ) -> None:
        delay_s = self._backoff.delay_s(failures - 1)
        status.last_error = f"ERP failed: {error}"
        status.state = StreamState.WAITING
        log.warning(
            "erp attempt failed: batch_id=%s attempt=%d retry_in_s=%.2f error=%s",
            batch.batch_id,
            failures,
            delay_s,
            error,
        )
        await self._clock.sleep(delay_s)

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
