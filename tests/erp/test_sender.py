"""Delivery through the breaker, the shared quota and the slots, against an ERP that
answers in a scripted order (real HTTP on loopback, real Redis)."""

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from erp_bridge.adapters import ErpBatch, ErpLine, Feed
from erp_bridge.adapters.http import HttpAdapter
from erp_bridge.breaker import Backoff, CircuitBreaker
from erp_bridge.rate_limit import RateLimit, SharedLimiter
from erp_bridge.sender import LINES, REQUESTS, Sender
from erp_bridge.slots import SharedSlots
from erp_bridge.status import BreakerState, Counters, StreamStatus
from server.clock import SystemClock
from tests.erp.redis_support import new_client

# Far more than the scripted answers take (one Retry-After of 1 s).
DELIVERY_TIMEOUT_S = 10.0

BATCH = ErpBatch(
    batch_id="erp.s0.0.0-1.0",
    stream="erp.s0",
    feed=Feed.LEDGER,
    lines=(ErpLine("erp.s0.1.0", "A", "L", 0, 1, "r1", "web", "reserve"),),
)


class ScriptedErp:
    """Answers batch requests with the given statuses in turn, then 200."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.seen = 0

    async def batches(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen += 1
        if self.statuses:
            status = self.statuses.pop(0)
            headers = {"Retry-After": "1"} if status == 429 else {}
            return web.json_response(
                {"error": {"code": "SCRIPTED", "message": "as scripted"}},
                status=status,
                headers=headers,
            )
        return web.json_response(
            {
                "batch_id": body["batch_id"],
                "status": "applied",
                "applied_lines": len(body["lines"]),
                "rejected": [],
            }
        )


@pytest.fixture
async def erp_url() -> AsyncIterator[tuple[ScriptedErp, str]]:
    # A 503 opens the breaker; its probe is throttled; then the batch goes through.
    erp = ScriptedErp([503, 429])
    app = web.Application()
    app.router.add_post("/v1/batches", erp.batches)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield erp, f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_a_throttled_probe_closes_the_breaker_instead_of_wedging_it(
    erp_url: tuple[ScriptedErp, str], key_prefix: str
) -> None:
    erp, url = erp_url
    clock = SystemClock()
    client = new_client()
    breaker = CircuitBreaker(endpoint=url, failures_max=1, open_s=0.05, clock=clock)
    counters = Counters()
    adapter = HttpAdapter(url=url)
    sender = Sender(
        adapter=adapter,
        limiter=SharedLimiter(
            client,
            key_prefix=key_prefix,
            limits=[RateLimit(REQUESTS, 100), RateLimit(LINES, 1_000, burst=10)],
            clock=clock,
        ),
        slots=SharedSlots(
            client,
            key_prefix=key_prefix,
            name="concurrent",
            slots_max=1,
            lease_s=5.0,
            clock=clock,
        ),
        breaker=breaker,
        backoff=Backoff(first_s=0.01, max_s=0.05, rng=random.Random(1)),
        counters=counters,
        clock=clock,
        request_timeout_s=2.0,
    )
    try:
        async with asyncio.timeout(DELIVERY_TIMEOUT_S):
            acknowledgement = await sender.deliver(BATCH, StreamStatus(shard=0))
    finally:
        await adapter.close()
        await client.aclose()

    assert acknowledgement.applied_lines == 1
    assert erp.seen == 3
    assert (counters.retries, counters.throttled, counters.requests) == (1, 1, 3)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.opened_count == 1
