"""What one ERP bridge measurement runs on: the ERP's limits and the run's sizes, the
processes of a rig (stockward, the ERP simulator, the bridge) and the reads this side
makes of them: the simulator's counters and ledger, the bridge's metrics page and its
cursors in Postgres. The measurements themselves are in benchmarks/bridge_scenarios.py.

Design note. Each measurement gets its own rig: a stockward server on a fresh schema,
an ERP simulator and a bridge, all child processes started and stopped here by pid,
with a Redis quota key of its own; the schema is dropped and the keys deleted at the
end. The simulator runs as its own process rather than in this one: on two cores the
load generator keeps this event loop busy, and a simulator sharing it would count
arrivals late and in bunches, which is exactly what its per-second peaks must not
suffer from. The simulator and the bridge are given the same limits, as an operator
would configure them from the ERP's documentation.
"""

import asyncio
import contextlib
import dataclasses
import logging
import os
import pathlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as redis
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.load import Progress
from benchmarks.services import SERVING_WAIT_S, Service, python_module
from benchmarks.systems import System, make_stockward
from erp_bridge.config import BridgeConfig

log = logging.getLogger(__name__)

BRIDGE_NAME = BridgeConfig.name

# The bridge's own defaults for how long a batch waits and how often a stream looks:
# the benchmark measures what an operator gets out of the box.
BATCH_WINDOW_S = BridgeConfig.batch_window_s
POLL_INTERVAL_S = BridgeConfig.poll_interval_s

# Every HTTP call to the simulator or the bridge's metrics page is a loopback request
# answered from memory; five seconds means the process is stuck.
HTTP_TIMEOUT_S = 5.0
# Draining what is left after a load: the netting run leaves at most a few seconds of
# the ERP's line rate behind, so two minutes means the bridge is stuck.
CATCH_UP_TIMEOUT_S = 120.0
# How often this side looks at the bridge's cursors while waiting for a catch-up.
CATCH_UP_POLL_S = 0.1

ProgressFactory = Callable[[str, int | None], Progress]


@dataclasses.dataclass(frozen=True)
class ErpLimits:
    """The ERP's stated limits: the simulator enforces them, the bridge obeys them."""

    requests_per_s: int = 20
    lines_per_request: int = 100
    # Five times what the request limit lets through, so that requests bind.
    lines_per_s: int = 10_000
    concurrent_max: int = 4
    # A quick ERP on a local network; slower ones only lengthen the lag figure.
    latency_ms: int = 20

    @property
    def request_lines_per_s(self) -> int:
        """Lines per second when every request is full: the usable line rate."""
        return min(self.lines_per_s, self.requests_per_s * self.lines_per_request)


LIMITS = ErpLimits()


@dataclasses.dataclass(frozen=True)
class BridgeSizes:
    backlog_records: int
    # From the first request the ERP admits to the start of the measured window.
    backlog_warm_up_s: float
    backlog_window_s: float
    lag_duration_s: float
    flash_buyers: int
    flash_duration_s: float


# The backlog must outlast warm-up and window at the ERP's line rate, with room.
FULL = BridgeSizes(
    backlog_records=60_000,
    backlog_warm_up_s=3.0,
    backlog_window_s=15.0,
    lag_duration_s=20.0,
    flash_buyers=48,
    flash_duration_s=15.0,
)
QUICK = BridgeSizes(
    backlog_records=20_000,
    backlog_warm_up_s=2.0,
    backlog_window_s=5.0,
    lag_duration_s=6.0,
    flash_buyers=48,
    flash_duration_s=5.0,
)
SMOKE = BridgeSizes(
    backlog_records=5_000,
    backlog_warm_up_s=0.5,
    backlog_window_s=1.0,
    lag_duration_s=1.5,
    flash_buyers=16,
    flash_duration_s=1.5,
)


@dataclasses.dataclass
class BridgeBench:
    sizes: BridgeSizes
    database_url: str
    redis_url: str
    log_dir: pathlib.Path
    shards: int
    progress: ProgressFactory


# Processes --------------------------------------------------------------------------


@dataclasses.dataclass
class HttpService(Service):
    """A child serving HTTP: it is up once GET `ready_path` answers 200."""

    ready_path: str = "/"

    async def wait_serving(self, timeout_s: float = SERVING_WAIT_S) -> float:
        started = time.monotonic()
        url = f"http://{self.address}{self.ready_path}"
        probe = aiohttp.ClientTimeout(total=1.0)
        async with asyncio.timeout(timeout_s), aiohttp.ClientSession() as session:
            while True:
                self._check_alive()
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url, timeout=probe) as answer:
                        if answer.status == 200:
                            return time.monotonic() - started
                await asyncio.sleep(0.05)


def simulator_service(log_dir: pathlib.Path, limits: ErpLimits) -> HttpService:
    argv = python_module(
        "erp_bridge.simulator",
        "--listen",
        "{address}",
        "--requests-per-s",
        str(limits.requests_per_s),
        "--lines-per-request",
        str(limits.lines_per_request),
        "--lines-per-s",
        str(limits.lines_per_s),
        "--concurrent-max",
        str(limits.concurrent_max),
        "--latency-ms",
        str(limits.latency_ms),
    )
    return HttpService(
        "erp-simulator", argv, log_dir / "erp_simulator.log", ready_path="/v1/stats"
    )


def bridge_service(
    log_dir: pathlib.Path,
    *,
    database_url: str,
    schema: str,
    erp_url: str,
    redis_url: str,
    quota_key: str,
    feed: str,
    limits: ErpLimits,
) -> HttpService:
    """The bridge, found through its metrics page (its admin service is off)."""
    argv = python_module(
        "erp_bridge",
        f"--database-url={database_url}",
        f"--database-schema={schema}",
        f"--erp-url={erp_url}",
        f"--redis-url={redis_url}",
        f"--quota-key={quota_key}",
        f"--feed={feed}",
        f"--requests-per-s={limits.requests_per_s}",
        f"--lines-per-request={limits.lines_per_request}",
        f"--lines-per-s={limits.lines_per_s}",
        f"--concurrent-requests-max={limits.concurrent_max}",
        f"--batch-window-s={BATCH_WINDOW_S}",
        f"--poll-interval-s={POLL_INTERVAL_S}",
        "--admin-listen=",
        "--metrics-listen={address}",
    )
    return HttpService(
        "erp-bridge", argv, log_dir / "erp_bridge.log", ready_path="/metrics"
    )


@dataclasses.dataclass
class Rig:
    """One measurement's processes: stockward on its own schema, the ERP simulator
    and a bridge between them (started when the measurement wants it)."""

    stockward: System
    simulator: HttpService
    bridge: HttpService
    schema: str
    quota_key: str
    database_url: str
    http: aiohttp.ClientSession

    async def erp(self, path: str) -> dict[str, Any]:
        return await _get_json(self.http, f"http://{self.simulator.address}{path}")

    async def bridge_metrics(self) -> "Metrics":
        url = f"http://{self.bridge.address}/metrics"
        async with self.http.get(url, timeout=_timeout()) as answer:
            answer.raise_for_status()
            return Metrics(await answer.text())

    def pids(self) -> dict[str, int]:
        """Process name -> pid, for every process of the rig that is running."""
        services: list[Service] = [self.stockward.service, self.simulator, self.bridge]
        pids = {s.name: s.pid for s in services if s.is_running}
        return {**pids, "client": os.getpid()}

    async def wait_caught_up(self) -> None:
        deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
        while not await _caught_up(self.database_url, self.schema):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"bridge did not catch up in {CATCH_UP_TIMEOUT_S:.0f} s:\n"
                    + self.bridge.log_tail()
                )
            await asyncio.sleep(CATCH_UP_POLL_S)


@contextlib.asynccontextmanager
async def rig(
    bench: BridgeBench, http: aiohttp.ClientSession, *, tag: str, feed: str
) -> AsyncIterator[Rig]:
    """Start stockward and the simulator; stop everything and clean up afterwards."""
    schema = f"bench_br_{os.getpid()}_{tag}"
    quota_key = f"bench-erp-{os.getpid()}-{tag}"
    stockward = make_stockward(
        bench.log_dir,
        database_url=bench.database_url,
        schema=schema,
        shards=bench.shards,
    )
    simulator = simulator_service(bench.log_dir, LIMITS)
    bridge = bridge_service(
        bench.log_dir,
        database_url=bench.database_url,
        schema=schema,
        erp_url=f"http://{simulator.address}",
        redis_url=bench.redis_url,
        quota_key=quota_key,
        feed=feed,
        limits=LIMITS,
    )
    running = Rig(
        stockward, simulator, bridge, schema, quota_key, bench.database_url, http
    )
    try:
        await stockward.service.start()
        await simulator.start()
        log.info("bridge rig up: tag=%s schema=%s quota_key=%s", tag, schema, quota_key)
        yield running
    finally:
        # The bridge first: it would only log errors once the others are gone.
        for service in (bridge, simulator, stockward.service):
            await service.stop()
        await stockward.cleanup()
        await delete_quota_keys(bench.redis_url, quota_key)
        log.info("bridge rig down: tag=%s", tag)


async def delete_quota_keys(redis_url: str, quota_key: str) -> None:
    """Every key the bridge made under `quota_key` (limits and slots)."""
    client = redis.from_url(redis_url, socket_timeout=HTTP_TIMEOUT_S)
    try:
        keys = [key async for key in client.scan_iter(match=f"*{quota_key}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def _caught_up(database_url: str, schema: str) -> bool:
    """Whether every shard's cursor has passed the shard's last record."""
    conn = await asyncpg.connect(
        database_url,
        server_settings={"search_path": schema},
        timeout=HTTP_TIMEOUT_S,
    )
    try:
        heads = await conn.fetch(
            "SELECT shard, max(seq) AS head FROM wal_records GROUP BY shard"
        )
        cursors = await conn.fetch(
            "SELECT shard, acked_seq, acked_line, inflight_seq FROM bridge_cursors "
            "WHERE name = $1",
            BRIDGE_NAME,
        )
    finally:
        await conn.close()
    acked = {
        row["shard"]: row["acked_seq"]
        for row in cursors
        if row["acked_line"] == 0 and row["inflight_seq"] is None
    }
    return all(acked.get(row["shard"], -1) >= row["head"] for row in heads)


class Metrics:
    """One scrape of the bridge's Prometheus page."""

    def __init__(self, text: str) -> None:
        self._samples = [
            sample
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples named `name` carrying every label given."""
        return sum(
            float(sample.value)
            for sample in self._samples
            if sample.name == name
            and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    def counter(self, field: str) -> float:
        return self.value(f"stockward_bridge_{field}_total")


def _timeout() -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)


async def _get_json(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url, timeout=_timeout()) as answer:
        answer.raise_for_status()
        body: dict[str, Any] = await answer.json()
        return body


# ERP samples --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ErpSample:
    at_s: float
    requests: int
    throttled: int
    lines_applied: int


async def erp_sample(erp: Rig) -> ErpSample:
    stats = await erp.erp("/v1/stats")
    ledger = await erp.erp("/v1/ledger")
    return ErpSample(
        at_s=time.monotonic(),
        requests=int(stats["requests"]),
        throttled=int(stats["throttled"]),
        lines_applied=int(ledger["lines_applied"]),
    )
