"""The ERP bridge killed with SIGKILL again and again while commitments keep coming:
the ERP's books end equal to stockward's, every line booked exactly once."""

import asyncio
import pathlib
import random

import pytest

from erp_bridge.simulator import ErpSimulator, Faults, SimulatorConfig
from tests.conftest import Running, ServerFactory
from tests.erp.bridge_process import BridgeProcess
from tests.erp.bridge_support import (
    bridge_config,
    effects_recorded,
    erp_positions,
    stock,
    stockward_positions,
    traffic,
    wait_caught_up,
)

pytestmark = pytest.mark.reliability

# Kills per run, and the longest a bridge lives between them: long enough to be in
# the middle of sending, short enough that the run stays within seconds.
KILLS = 6
LIFETIME_MAX_S = 1.5
SKUS = [f"SKU-{i}" for i in range(5)]


@pytest.mark.parametrize("feed", ["positions", "ledger"])
async def test_sigkilled_bridge_neither_loses_nor_repeats_a_line(
    feed: str, start_server: ServerFactory, schema: str, tmp_path: pathlib.Path
) -> None:
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    server: Running = await start_server()
    erp = ErpSimulator(
        SimulatorConfig(
            requests_per_s=100,
            lines_per_request=4,
            lines_per_s=1_000,
            seed=seed,
            # Answers lost after booking make resends that must be recognised.
            faults=Faults(error_rate=0.1, applied_then_error_rate=0.2, latency_ms=5),
        )
    )
    await erp.start()
    bridge = BridgeProcess(
        bridge_config(schema, erp, feed=feed, breaker_failures=1_000),
        log_path=tmp_path / "bridge.log",
    )
    try:
        await stock(server, SKUS, 40)
        load = asyncio.create_task(traffic(server, rng, SKUS, 400))
        for _ in range(KILLS):
            await bridge.start()
            await asyncio.sleep(rng.uniform(0.3, LIFETIME_MAX_S))
            await bridge.close()
        await load
        await bridge.start()
        await bridge.wait_started()
        await wait_caught_up(schema)
        assert bridge.is_running, bridge.log_tail()

        assert erp_positions(erp) == stockward_positions(server), bridge.log_tail()
        if feed == "ledger":
            assert erp.books.lines_applied == await effects_recorded(schema)
        assert erp.stats.duplicates > 0 or erp.stats.failed > 0
        assert await bridge.stop() == 0, bridge.log_tail()
    finally:
        if bridge.is_running:
            await bridge.close()
        await erp.stop()
