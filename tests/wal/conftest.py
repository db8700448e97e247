"""Servers for tests that may leave one broken on purpose."""

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

import pytest

from server.clock import FakeClock
from server.config import Config
from tests.conftest import Running, ServerFactory, launch

# A clean stop drains idle writers and stores one small checkpoint: well under this.
STOP_WAIT_S = 5.0
# Teardown of a server a failed test may have wedged: shorter, as nothing is judged.
TEARDOWN_STOP_WAIT_S = 2.0


async def stop_within(server: Running, *, timeout_s: float = STOP_WAIT_S) -> None:
    """Stop the server; fails the test if stopping hangs or raises."""
    await server.channel.close()
    try:
        async with asyncio.timeout(timeout_s):
            await server.app.stop()
    except TimeoutError as error:
        raise AssertionError(f"the server did not stop within {timeout_s}s") from error


@pytest.fixture
async def start_fragile_server(
    config: Config, clock: FakeClock
) -> AsyncIterator[ServerFactory]:
    """Like start_server, for tests of failures that can wedge the server.

    A wedged server cannot be stopped cleanly, and the test has already failed by then,
    so teardown gives each server a bounded stop and sets its failure aside. Tests that
    pass end with stop_within(), so a clean stop is still checked where it matters.
    Broken invariants reach `Running.broken` and are the test's to assert.
    """
    running: list[Running] = []

    async def start(**overrides: object) -> Running:
        settings = dataclasses.replace(config, **overrides)  # type: ignore[arg-type]
        server = await launch(settings, clock)
        running.append(server)
        return server

    yield start
    for server in running:
        if server.app.ledger.state.value == "stopped":
            continue
        # A wedged stop ends in AssertionError from stop_within, a recovery that broke
        # an invariant re-raises InvariantBroken (also an AssertionError) from stop().
        with contextlib.suppress(Exception):
            await stop_within(server, timeout_s=TEARDOWN_STOP_WAIT_S)
