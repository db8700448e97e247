"""The ERP's limits as bridges live with them: a Retry-After is waited out, and two
bridge processes on one quota stay within it together."""

import asyncio
import json
import pathlib
import random
import sys
import urllib.request
from typing import Any

from erp_bridge.bridge import Bridge
from erp_bridge.simulator import ErpSimulator, Faults, SimulatorConfig
from server.clock import US_PER_S
from tests.conftest import Running, ServerFactory
from tests.erp.bridge_process import BridgeProcess
from tests.erp.bridge_support import (
    bridge_config,
    erp_positions,
    stock,
    stockward_positions,
    traffic,
    wait_caught_up,
)
from tests.reliability.server_process import REPO_ROOT, free_port

SKUS = [f"SKU-{i}" for i in range(6)]
# Metrics page reads, 0.1 s apart, before a figure must show: five status periods.
METRICS_TRIES = 50


def seeded() -> random.Random:
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    return random.Random(seed)


async def test_no_request_arrives_before_a_retry_after_ends(
    start_server: ServerFactory, schema: str
) -> None:
    server: Running = await start_server()
    erp = ErpSimulator(
        SimulatorConfig(
            requests_per_s=3, lines_per_s=1_000, faults=Faults(latency_ms=1)
        )
    )
    await erp.start()
    # Configured far above what the ERP allows, so the ERP's 429s are what hold it;
    # one slot makes the bridge's requests strictly one after another.
    bridge = Bridge(
        bridge_config(
            schema,
            erp,
            requests_per_s=50,
            lines_per_request=4,
            concurrent_requests_max=1,
        ),
        seed=1,
    )
    try:
        await stock(server, SKUS, 30)
        await traffic(server, seeded(), SKUS, 40)
        await bridge.start()
        await wait_caught_up(schema)
    finally:
        await bridge.stop()
        await erp.stop()

    arrivals = list(erp.arrivals)
    throttles = [a for a in arrivals if a.throttled]
    assert len(throttles) >= 2, f"the ERP never had to throttle: {len(arrivals)} calls"
    for index, arrival in enumerate(arrivals):
        if arrival.throttled:
            ends_us = arrival.arrived_us + arrival.retry_after_s * US_PER_S
            later = arrivals[index + 1 : index + 2]
            assert not later or later[0].arrived_us >= ends_us, (
                f"a request came {(ends_us - later[0].arrived_us) / 1e3:.1f} ms "
                "before the Retry-After ended"
            )
    assert bridge.counters.throttled == len(throttles)
    assert erp_positions(erp) == stockward_positions(server)


async def test_two_bridge_processes_share_one_quota(
    start_server: ServerFactory, schema: str, tmp_path: pathlib.Path
) -> None:
    server: Running = await start_server()
    limit_per_s = 5
    erp = ErpSimulator(
        SimulatorConfig(
            requests_per_s=limit_per_s, lines_per_s=1_000, faults=Faults(latency_ms=1)
        )
    )
    await erp.start()
    # Each process alone may send 4 a second; without the shared quota the two would
    # send 8 and the ERP would throttle. One second of headroom under the ERP's 5
    # absorbs arrivals bunched by scheduling (see erp_bridge/rate_limit.py).
    shared = bridge_config(
        schema, erp, requests_per_s=limit_per_s - 1, lines_per_request=2
    )
    admin_port, metrics_port = free_port(), free_port()
    first = BridgeProcess(
        bridge_config(
            schema,
            erp,
            **{
                **_overrides(shared),
                "shards": "0",
                "admin_listen": f"127.0.0.1:{admin_port}",
                "metrics_listen": f"127.0.0.1:{metrics_port}",
            },
        ),
        log_path=tmp_path / "first.log",
    )
    second = BridgeProcess(
        bridge_config(schema, erp, **{**_overrides(shared), "shards": "1,2"}),
        log_path=tmp_path / "second.log",
    )
    try:
        await stock(server, SKUS, 40)
        await traffic(server, seeded(), SKUS, 60)
        await first.start()
        await second.start()
        await first.wait_started()
        await second.wait_started()
        await wait_caught_up(schema)

        status = await _cli_status(admin_port)
        # Lag is refreshed once a second: the page catches up within a few.
        metrics = await _metrics_showing(
            metrics_port, 'stockward_bridge_lag_records{shard="0"} 0.0'
        )
        assert await first.stop() == 0, first.log_tail()
        assert await second.stop() == 0, second.log_tail()
    finally:
        for process in (first, second):
            if process.is_running:
                await process.close()
        await erp.stop()

    assert erp.stats.throttled == 0
    peak = erp.max_requests_in_any_second
    assert 2 <= peak <= limit_per_s, f"peak {peak} per second"
    assert erp_positions(erp) == stockward_positions(server)
    assert [s["shard"] for s in status["streams"]] == [-1, 0]
    assert status["counters"]["batches"] > 0
    assert "stockward_bridge_netting_ratio" in metrics


def _overrides(config: object) -> dict[str, object]:
    fields = ("quota_key", "requests_per_s", "lines_per_request")
    return {name: getattr(config, name) for name in fields}


async def _cli_status(port: int) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "erp_bridge.cli",
        "--target",
        f"127.0.0.1:{port}",
        "--json",
        "status",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    answer: dict[str, Any] = json.loads(out)
    return answer


async def _metrics_showing(port: int, text: str) -> str:
    for _ in range(METRICS_TRIES):
        page = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
        if text in page:
            return page
        await asyncio.sleep(0.1)
    raise AssertionError(f"metrics never showed {text!r}:\n{page}")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        text: str = response.read().decode()
    return text
