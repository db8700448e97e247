"""The ERP bridge under load: how close it runs to the ERP's rate limit without ever
crossing it, how stale the ERP is at a steady load, and how much a flash sale nets.

`python -m benchmarks` runs this after the stockward scenarios (left out of --smoke);
`python -m benchmarks.bridge [--quick | --smoke]` runs it alone, with its own report.

Design note. Each measurement gets its own rig: a stockward server on a fresh schema,
an ERP simulator and a bridge, all child processes started and stopped here by pid,
with a Redis quota key of its own; the schema is dropped and the keys deleted at the
end. The simulator runs as its own process rather than in this one: on two cores the
load generator keeps this event loop busy, and a simulator sharing it would count
arrivals late and in bunches, which is exactly what its per-second peaks must not
suffer from. The simulator and the bridge are given the same limits, as an operator
would configure them from the ERP's documentation.

Three figures, each against an estimate worked out before the run:
1. Backlog. Records committed with the bridge stopped, then drained through the
   ledger feed (no netting, so every record is a line). The bridge's request limit
   is a GCRA with burst 1, which admits one request every 1/N s; with a batch always
   waiting on every stream it is the rate, not the four streams, that binds. The
   simulator's own counters are read over a fixed window once the drain is steady.
2. Lag. Single reservations at a steady fraction of the ERP's line rate. The bridge
   reports commit-to-acknowledgement lag of the oldest record of each batch; this
   side also times every reservation from its answer to the moment the ERP's ledger
   shows it, by polling the ledger.
3. Netting. Buyers on many channels reserve, then release or confirm and fulfil, a
   handful of skus through the positions feed. Lines read against lines sent shows
   the netting; at the end the ERP's positions must equal stockward's exactly.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import pathlib
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as redis
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import scenarios
from benchmarks.load import LoadResult, Op, Progress, run_closed, run_open
from benchmarks.proc import measure_cpu, usage_of
from benchmarks.report import (
    Check,
    ExpectedFigure,
    Row,
    Scenario,
    Target,
    collect_metadata,
    write_report,
)
from benchmarks.services import (
    SERVING_WAIT_S,
    Service,
    ensure_redis,
    python_module,
)
from benchmarks.systems import System, is_reserved, make_stockward, stock
from clients import StockwardClient, line
from erp_bridge.config import BridgeConfig
from server.config import DEFAULT_DATABASE_URL
from server.engine.shard import shard_of

log = logging.getLogger(__name__)

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results" / "bridge"
REDIS_URL_DEFAULT = "redis://127.0.0.1:6379/0"
LOCATION = scenarios.LOCATION
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
# How often the lag measurement reads the ERP's ledger: the resolution of the
# independent lag figure, small against a lag of hundreds of milliseconds.
LEDGER_POLL_S = 0.02
# Holds placed here must outlive the run: an expiry would add records of its own.
HOLD_TTL_S = 3_600
# Units on hand per sku: far more than any run reserves, so nothing sells out.
UNITS_PER_SKU = 10_000_000
# The backlog's records round-robin over this many skus, spread over every shard.
BACKLOG_SKUS = 1_000
# ExecuteBatch size for the backlog: the server's largest batch, the fastest fill.
BACKLOG_BATCH = 1_000
# The lag load cycles over this many skus, so the ledger polled stays small, and a
# sku comes round every LAG_SKUS / rate seconds (0.5 s at 200/s): its holds are
# committed in the order they were made, which the lag measurement relies on.
LAG_SKUS = 100
# A flash sale: a handful of skus, many channels.
FLASH_SKUS = 5
FLASH_CHANNELS = tuple(
    ["web", "app", "pos", "kiosk", "callcentre"] + [f"market-{n}" for n in range(7)]
)
# Share of flash-sale holds confirmed and shipped; the rest are released.
FULFIL_SHARE = 0.6
# Admission slop of the bridge's limiter: a stream sleeps exactly until the next
# request may go, then wakes on an event loop timer (whole milliseconds) and asks
# Redis again, so each request goes about a millisecond after its slot, and the next
# slot counts from then.
ADMISSION_SLOP_S = 0.001
# A stream's own work per batch besides the ERP's answer: read, plan and acknowledge
# in Postgres, a few milliseconds each on loopback.
STREAM_OVERHEAD_S = 0.010
# The lag load as a share of the ERP's line rate: well under it, so nothing queues.
LAG_LOAD_SHARE = 0.1

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


@dataclasses.dataclass
class BridgePart:
    """What the runner adds to its report."""

    scenarios: list[Scenario]
    targets: list[Target]
    notes: list[str]


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


# 1. Backlog -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ErpSample:
    at_s: float
    requests: int
    throttled: int
    lines_applied: int


async def _erp_sample(erp: Rig) -> ErpSample:
    stats = await erp.erp("/v1/stats")
    ledger = await erp.erp("/v1/ledger")
    return ErpSample(
        at_s=time.monotonic(),
        requests=int(stats["requests"]),
        throttled=int(stats["throttled"]),
        lines_applied=int(ledger["lines_applied"]),
    )


async def backlog(bench: BridgeBench, http: aiohttp.ClientSession) -> Scenario:
    sizes = bench.sizes
    async with rig(bench, http, tag="backlog", feed="ledger") as erp:
        skus = [f"BACKLOG-{n:04d}" for n in range(BACKLOG_SKUS)]
        await stock(erp.stockward, ((sku, LOCATION, UNITS_PER_SKU) for sku in skus))
        fill, fill_row = await _fill(bench, erp, skus=skus)

        await erp.bridge.start()
        await _wait_for_first_request(erp)
        await asyncio.sleep(sizes.backlog_warm_up_s)
        pids = erp.pids()
        with measure_cpu(pids.values()) as cpu:
            first = await _erp_sample(erp)
            await asyncio.sleep(sizes.backlog_window_s)
            last = await _erp_sample(erp)
        metrics = await erp.bridge_metrics()
        stats = await erp.erp("/v1/stats")
        peaks = {name: usage_of(pid).peak_rss_bytes() for name, pid in pids.items()}

    drained_lines = last.lines_applied - first.lines_applied
    cpu_by_name = {name: cpu[pid] for name, pid in _named(cpu, pids)}
    fill_row["peak_rss_bytes"] = peaks
    fill_row["checks"] = _backlog_checks(
        fill, stats, metrics=metrics, cpu_s=cpu_by_name, drained_lines=drained_lines
    )
    figures = _backlog_figures(first, last, stats, streams=bench.shards)
    return Scenario(
        name="ERP bridge: backlog",
        description=(
            f"{fill.completed * BACKLOG_BATCH:,} reservations committed with the bridge "
            "stopped (the row below is that fill), then drained through the ledger feed "
            f"to an ERP allowing {LIMITS.requests_per_s} requests/s of at most "
            f"{LIMITS.lines_per_request} lines, {LIMITS.lines_per_s:,} lines/s, "
            f"{LIMITS.concurrent_max} requests at once, {LIMITS.latency_ms} ms each; "
            f"the bridge has the same limits and {bench.shards} streams. Measured by the "
            f"simulator over {sizes.backlog_window_s:g} s after "
            f"{sizes.backlog_warm_up_s:g} s of warm-up."
        ),
        rows=[fill_row],
        figures=figures,
    )


def _named(
    cpu: Mapping[int, float], pids: Mapping[str, int]
) -> Iterable[tuple[str, int]]:
    return ((name, pid) for name, pid in pids.items() if pid in cpu)


async def _fill(
    bench: BridgeBench, erp: Rig, *, skus: list[str]
) -> tuple[LoadResult, Row]:
    batches = -(-bench.sizes.backlog_records // BACKLOG_BATCH)
    progress = bench.progress("bridge backlog: committing", batches)
    async with erp.stockward.client() as client:
        op = scenarios.batch_op(client, skus, BACKLOG_BATCH, ttl_s=HOLD_TTL_S)
        with measure_cpu(erp.pids().values()) as cpu:
            result = await run_closed(
                op,
                name="backlog fill",
                concurrency=4,
                total=batches,
                progress=progress,
            )
    reservations = max(1, result.completed * BACKLOG_BATCH)
    pids = erp.pids()
    row = Row(
        system="stockward",
        variant=f"backlog fill, ExecuteBatch x{BACKLOG_BATCH}, bridge stopped",
        load=result.to_json(),
        cpu_s_per_1k_reservations={
            name: cpu[pid] * 1000 / reservations for name, pid in _named(cpu, pids)
        },
        peak_rss_bytes={},
        reservations_per_commit=None,
        checks=[],
    )
    return result, row


async def _wait_for_first_request(erp: Rig) -> None:
    deadline = time.monotonic() + SERVING_WAIT_S
    while (await erp.erp("/v1/stats"))["requests"] == 0:
        if time.monotonic() > deadline:
            raise RuntimeError("the bridge sent nothing:\n" + erp.bridge.log_tail())
        await asyncio.sleep(CATCH_UP_POLL_S)


def expected_admitted_per_s(limits: ErpLimits) -> float:
    """Requests/s a GCRA with burst 1 admits when a request is always waiting: one
    per interval, stretched by the bridge's send-delay allowance, each late by the
    admission slop, which the next interval counts from."""
    stretch = 1 + BridgeConfig.send_delay_allowance_ms / 1_000
    interval_s = stretch / limits.requests_per_s
    return 1 / (interval_s + ADMISSION_SLOP_S)


def _backlog_figures(
    first: ErpSample, last: ErpSample, stats: Mapping[str, Any], *, streams: int
) -> list[ExpectedFigure]:
    elapsed_s = last.at_s - first.at_s
    arrived = last.requests - first.requests
    throttled = last.throttled - first.throttled
    admitted_per_s = (arrived - throttled) / elapsed_s
    lines_per_s = (last.lines_applied - first.lines_applied) / elapsed_s
    expected_per_s = expected_admitted_per_s(LIMITS)
    allowance_ms = BridgeConfig.send_delay_allowance_ms
    interval_ms = (1000 + allowance_ms) / LIMITS.requests_per_s
    cycle_ms = LIMITS.latency_ms + STREAM_OVERHEAD_S * 1000
    peak_requests = int(stats["max_requests_in_any_second"])
    peak_lines = int(stats["max_lines_in_any_second"])
    return [
        ExpectedFigure(
            name="requests admitted by the ERP",
            unit="requests/s",
            expected=expected_per_s,
            measured=admitted_per_s,
            estimate=(
                f"GCRA, burst 1, a second stretched by the {allowance_ms} ms "
                f"send-delay allowance: one request per {interval_ms:g} ms, each about "
                f"{ADMISSION_SLOP_S * 1000:g} ms late (timer and Redis round trip). "
                f"The rate binds: {streams} streams, one request in flight each, "
                f"could send one per {cycle_ms:g} ms each ({LIMITS.latency_ms} ms "
                f"ERP latency, ~{STREAM_OVERHEAD_S * 1000:g} ms Postgres), "
                f"{streams * 1000 / cycle_ms:.0f}/s, and the ERP takes "
                f"{LIMITS.concurrent_max} at once, "
                f"{LIMITS.concurrent_max * 1000 / LIMITS.latency_ms:.0f}/s"
            ),
            verdict=f"{admitted_per_s / LIMITS.requests_per_s:.1%} of the limit "
            f"({LIMITS.requests_per_s}/s)",
        ),
        ExpectedFigure(
            name="lines booked by the ERP",
            unit="lines/s",
            expected=expected_per_s * LIMITS.lines_per_request,
            measured=lines_per_s,
            estimate=(
                f"every request full ({LIMITS.lines_per_request} lines: one line per "
                "record in the ledger feed) at the admitted request rate"
            ),
            verdict=f"{lines_per_s / LIMITS.request_lines_per_s:.1%} of "
            f"{LIMITS.request_lines_per_s:,}/s",
        ),
        ExpectedFigure(
            name="most requests arriving in any one second (whole run)",
            unit="requests",
            expected=LIMITS.requests_per_s,
            measured=peak_requests,
            estimate="the limit: GCRA admits at most N in any sliding second",
            verdict=_never_above(peak_requests, LIMITS.requests_per_s),
        ),
        ExpectedFigure(
            name="most lines arriving in any one second (whole run)",
            unit="lines",
            expected=LIMITS.requests_per_s * LIMITS.lines_per_request,
            measured=peak_lines,
            estimate=(
                f"the request limit times full requests; the line limit "
                f"({LIMITS.lines_per_s:,}) is five times that"
            ),
            verdict=_never_above(peak_lines, LIMITS.lines_per_s),
        ),
        ExpectedFigure(
            name="requests throttled (429) in the window",
            unit="requests",
            expected=0,
            measured=throttled,
            estimate="the bridge keeps to the limits the ERP enforces",
            verdict="none" if throttled == 0 else f"{throttled} throttled",
        ),
        ExpectedFigure(
            name="most requests in progress at once (whole run)",
            unit="requests",
            expected=1,
            measured=int(stats["max_requests_in_progress"]),
            estimate=(
                f"a request takes {LIMITS.latency_ms} ms and the next is admitted "
                f"{interval_ms:g} ms later, so they do not overlap"
            ),
            verdict=_never_above(
                int(stats["max_requests_in_progress"]), LIMITS.concurrent_max
            ),
        ),
    ]


def _backlog_checks(
    fill: LoadResult,
    stats: Mapping[str, Any],
    *,
    metrics: Metrics,
    cpu_s: Mapping[str, float],
    drained_lines: int,
) -> list[Check]:
    peak_requests = int(stats["max_requests_in_any_second"])
    peak_lines = int(stats["max_lines_in_any_second"])
    left = metrics.value("stockward_bridge_lag_records")
    throttled = int(stats["throttled"])
    per_1k = {
        name: seconds * 1000 / max(1, drained_lines) for name, seconds in cpu_s.items()
    }
    return [
        _no_errors(fill),
        Check(
            text=f"ERP peaks {peak_requests} requests and {peak_lines:,} lines in any "
            f"second, limits {LIMITS.requests_per_s} and {LIMITS.lines_per_s:,}",
            passed=peak_requests <= LIMITS.requests_per_s
            and peak_lines <= LIMITS.lines_per_s,
        ),
        Check(text=f"throttled by the ERP {throttled}", passed=throttled == 0),
        Check(
            text=f"backlog left at the end of the window {left:,.0f} records",
            passed=left > 0,
        ),
        Check(
            text="CPU s per 1,000 lines drained: "
            + ", ".join(f"{name} {value:.3f}" for name, value in per_1k.items()),
            passed=True,
        ),
    ]


# 2. Lag -----------------------------------------------------------------------------


class LedgerWatch:
    """Polls the ERP's ledger and notes when each sku's held units first reached n:
    with one-unit holds on a sku that only gains holds, that is when its n-th
    reservation was booked."""

    def __init__(self, erp: Rig, skus: Sequence[str]) -> None:
        self._erp = erp
        self._skus = frozenset(skus)
        self.booked_at_s: dict[str, list[float]] = {sku: [] for sku in skus}

    async def run(self, stop: asyncio.Event) -> None:
        while True:
            await self.poll()
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LEDGER_POLL_S):
                    await stop.wait()

    async def poll(self) -> None:
        ledger = await self._erp.erp("/v1/ledger")
        seen_s = time.monotonic()
        for position in ledger["positions"]:
            times = self.booked_at_s.get(position["sku"])
            if times is None or position["location"] != LOCATION:
                continue
            times.extend([seen_s] * (int(position["held"]) - len(times)))


async def lag(bench: BridgeBench, http: aiohttp.ClientSession) -> Scenario:
    rate_per_s = LIMITS.request_lines_per_s * LAG_LOAD_SHARE
    duration_s = bench.sizes.lag_duration_s
    skus = [f"LAG-{n:03d}" for n in range(LAG_SKUS)]
    async with rig(bench, http, tag="lag", feed="ledger") as erp:
        await erp.bridge.start()
        await stock(erp.stockward, ((sku, LOCATION, UNITS_PER_SKU) for sku in skus))
        await erp.wait_caught_up()

        watch = LedgerWatch(erp, skus)
        stop = asyncio.Event()
        watching = asyncio.create_task(watch.run(stop))
        answered_at_s: dict[int, float] = {}
        async with erp.stockward.client() as client:

            async def reserve(index: int) -> str:
                sku = skus[index % len(skus)]
                channel = FLASH_CHANNELS[index % len(FLASH_CHANNELS)]
                answer = await client.reserve(
                    channel, [line(sku, 1, location=LOCATION)], ttl_s=HOLD_TTL_S
                )
                answered_at_s[index] = time.monotonic()
                return "reserved" if is_reserved(answer) else "rejected"

            progress = bench.progress(
                f"bridge lag: {rate_per_s:.0f}/s", int(rate_per_s * duration_s)
            )
            with measure_cpu(erp.pids().values()) as cpu:
                result = await run_open(
                    reserve,
                    name="paced reservations",
                    rate_per_s=rate_per_s,
                    duration_s=duration_s,
                    in_flight_max=1_000,
                    progress=progress,
                )
        await erp.wait_caught_up()
        stop.set()
        await watching
        await watch.poll()
        metrics = await erp.bridge_metrics()
        row = _load_row(
            result, cpu, erp, reservations=result.outcomes.get("reserved", 0)
        )

    lags_s = _lags(watch, answered_at_s, skus=skus)
    row["checks"] = [
        _no_errors(result),
        Check(
            text=f"reservations seen in the ERP's ledger {len(lags_s):,} of "
            f"{result.completed:,}",
            passed=len(lags_s) == result.completed,
        ),
    ]
    return Scenario(
        name="ERP bridge: lag under the limit",
        description=(
            f"Single reservations at {rate_per_s:.0f}/s ({LAG_LOAD_SHARE:.0%} of the "
            f"ERP's {LIMITS.request_lines_per_s:,} lines/s) for {duration_s:g} s, "
            f"ledger feed, batch window {BATCH_WINDOW_S:g} s, poll "
            f"{POLL_INTERVAL_S * 1000:g} ms, ERP latency {LIMITS.latency_ms} ms. "
            "The row is the reservation load; its latency is the reservation call's."
        ),
        rows=[row],
        figures=_lag_figures(metrics, lags_s),
    )


def _load_row(
    result: LoadResult, cpu: Mapping[int, float], erp: Rig, *, reservations: int
) -> Row:
    """A row for the load that fed the bridge, with every process's CPU and memory."""
    made = max(1, reservations)
    pids = erp.pids()
    return Row(
        system="stockward + erp-bridge",
        variant=f"open loop at {result.target_rate_per_s or 0:.0f}/s, ledger feed",
        load=result.to_json(),
        cpu_s_per_1k_reservations={
            name: cpu[pid] * 1000 / made for name, pid in _named(cpu, pids)
        },
        peak_rss_bytes={
            name: usage_of(pid).peak_rss_bytes() for name, pid in pids.items()
        },
        reservations_per_commit=None,
        checks=[],
    )


def _lags(
    watch: LedgerWatch, answered_at_s: Mapping[int, float], *, skus: Sequence[str]
) -> list[float]:
    """Seconds from each reservation's answer to the ledger poll that first showed it.

    Reservation i is the (i // len(skus))-th of its sku, and a sku's reservations are
    half a second or more apart, so they are booked in the order they were made.
    """
    lags_s = []
    for index, answered_s in answered_at_s.items():
        times = watch.booked_at_s[skus[index % len(skus)]]
        nth = index // len(skus)
        if nth < len(times):
            lags_s.append(times[nth] - answered_s)
    return lags_s


def _lag_figures(metrics: Metrics, lags_s: list[float]) -> list[ExpectedFigure]:
    """Lag against the bridge's timing; the estimates leave out the stream's own
    Postgres and Redis calls per batch, a few tens of milliseconds on two cores."""
    window_ms, poll_ms = BATCH_WINDOW_S * 1000, POLL_INTERVAL_S * 1000
    latency_ms = LIMITS.latency_ms
    series = "stockward_bridge_delivery_lag_seconds"
    oldest = (
        "the oldest record of a batch waits to be seen (half a poll on average, a "
        "whole one at worst), the batch window, then the ERP's answer"
    )
    each = (
        "windows run back to back, so a record waits for what is left of the window "
        "and poll it lands in (half of one on average), then the ERP's answer"
    )
    plan = [
        (
            "bridge-reported lag, p50 (oldest record of each batch)",
            window_ms + poll_ms / 2 + latency_ms,
            1000 * metrics.value(series, quantile="0.5"),
            f"{oldest}: {window_ms:g} + {poll_ms / 2:g} + {latency_ms} ms",
        ),
        (
            "bridge-reported lag, p99 (oldest record of each batch)",
            window_ms + poll_ms + latency_ms,
            1000 * metrics.value(series, quantile="0.99"),
            f"{oldest}: {window_ms:g} + {poll_ms:g} + {latency_ms} ms",
        ),
        (
            "lag seen in the ERP's ledger, p50 (every reservation)",
            (window_ms + poll_ms) / 2 + latency_ms,
            1000 * _percentile(lags_s, 0.50),
            f"{each}: ({window_ms:g} + {poll_ms:g}) / 2 + {latency_ms} ms",
        ),
        (
            "lag seen in the ERP's ledger, p99 (every reservation)",
            window_ms + poll_ms + 2 * latency_ms,
            1000 * _percentile(lags_s, 0.99),
            "a record committed just after a batch's last read waits for that "
            f"batch's answer, a whole window and poll, then its own: {window_ms:g} + "
            f"{poll_ms:g} + 2 x {latency_ms} ms",
        ),
    ]
    return [
        ExpectedFigure(
            name=name,
            unit="ms",
            expected=expected_ms,
            measured=measured_ms,
            estimate=estimate,
            verdict=_ratio_text(measured_ms, expected_ms),
        )
        for name, expected_ms, measured_ms, estimate in plan
    ]


# 3. Netting -------------------------------------------------------------------------


async def netting(bench: BridgeBench, http: aiohttp.ClientSession) -> Scenario:
    skus = [f"FLASH-{n}" for n in range(FLASH_SKUS)]
    rng = random.Random(11)
    async with rig(bench, http, tag="netting", feed="positions") as erp:
        await erp.bridge.start()
        await stock(erp.stockward, ((sku, LOCATION, UNITS_PER_SKU) for sku in skus))
        async with erp.stockward.client() as client:
            order = _flash_order(client, skus, rng)
            progress = bench.progress("bridge netting: flash sale", None)
            with measure_cpu(erp.pids().values()) as cpu:
                result = await run_closed(
                    order,
                    name="flash sale, many channels",
                    concurrency=bench.sizes.flash_buyers,
                    duration_s=bench.sizes.flash_duration_s,
                    progress=progress,
                )
            await erp.wait_caught_up()
            ours = await _stockward_positions(client, skus)
        theirs = _erp_positions(await erp.erp("/v1/ledger"))
        metrics = await erp.bridge_metrics()
        row = _load_row(result, cpu, erp, reservations=_lines_made(result) // 2)

    made = _lines_made(result) + len(skus)
    row["variant"] = (
        f"flash sale, {len(skus)} skus, {len(FLASH_CHANNELS)} channels, "
        f"{bench.sizes.flash_buyers} buyers, positions feed"
    )
    row["checks"] = _netting_checks(
        result, metrics, lines_made=made, ours=ours, theirs=theirs
    )
    return Scenario(
        name="ERP bridge: netting in a flash sale",
        description=(
            f"{bench.sizes.flash_buyers} buyers on {len(FLASH_CHANNELS)} channels "
            f"reserve one unit of one of {len(skus)} skus, then release it "
            f"({1 - FULFIL_SHARE:.0%}) or confirm and fulfil it ({FULFIL_SHARE:.0%}), "
            f"for {bench.sizes.flash_duration_s:g} s; the positions feed sends one "
            "netted line per position per batch. Afterwards the ERP's positions are "
            "compared with stockward's."
        ),
        rows=[row],
        figures=[_netting_figure(result, metrics, shards=bench.shards, skus=skus)],
    )


def _flash_order(
    client: StockwardClient, skus: Sequence[str], rng: random.Random
) -> Op:
    async def order(index: int) -> str:
        channel = FLASH_CHANNELS[index % len(FLASH_CHANNELS)]
        answer = await client.reserve(
            channel, [line(rng.choice(skus), 1, location=LOCATION)], ttl_s=HOLD_TTL_S
        )
        if not is_reserved(answer):
            return "rejected"
        if rng.random() < FULFIL_SHARE:
            await client.confirm(answer.reservation_id)
            await client.fulfill(answer.reservation_id)
            return "fulfilled"
        await client.release(answer.reservation_id)
        return "released"

    return order


def _lines_made(result: LoadResult) -> int:
    """Stock lines the orders wrote: the hold, then its release or its shipment (a
    confirmation moves no stock)."""
    return 2 * (
        result.outcomes.get("fulfilled", 0) + result.outcomes.get("released", 0)
    )


Positions = dict[tuple[str, str], tuple[int, int]]


async def _stockward_positions(
    client: StockwardClient, skus: Sequence[str]
) -> Positions:
    answer = await client.get_availability(skus, locations=[LOCATION])
    return {
        (sku.sku, at.location): (at.availability.on_hand, at.availability.held)
        for sku in answer.skus
        for at in sku.locations
    }


def _erp_positions(ledger: Mapping[str, Any]) -> Positions:
    return {
        (p["sku"], p["location"]): (int(p["on_hand"]), int(p["held"]))
        for p in ledger["positions"]
    }


def _netting_checks(
    result: LoadResult,
    metrics: Metrics,
    *,
    lines_made: int,
    ours: Positions,
    theirs: Positions,
) -> list[Check]:
    lines_in = int(metrics.counter("lines_in"))
    differing = sorted(
        at for at in ours.keys() | theirs.keys() if ours.get(at) != theirs.get(at)
    )
    return [
        _no_errors(result),
        Check(
            text=f"lines read by the bridge {lines_in:,}, lines the load wrote "
            f"{lines_made:,}",
            passed=lines_in == lines_made,
        ),
        Check(
            text=f"ERP positions equal stockward's: {len(ours)} positions, "
            + (
                "all equal"
                if not differing
                else f"{len(differing)} DIFFER: {differing}"
            ),
            passed=not differing and bool(ours),
        ),
    ]


def expected_netting_ratio(
    *,
    line_rate_per_s: float,
    skus_per_stream: Sequence[int],
    cycle_s: float,
    lines_per_request: int,
) -> float:
    """Lines read per line sent, when each batch carries one line per position of its
    stream: a stream sends a batch per cycle, or more often when a full request's
    lines come in sooner. Demand is spread evenly over the skus."""
    sku_count = sum(skus_per_stream)
    lines_out_per_s = 0.0
    for skus in skus_per_stream:
        stream_rate_per_s = line_rate_per_s * skus / sku_count
        batches_per_s = max(1 / cycle_s, stream_rate_per_s / lines_per_request)
        lines_out_per_s += batches_per_s * skus if skus else 0.0
    return line_rate_per_s / lines_out_per_s if lines_out_per_s else 1.0


def _netting_figure(
    result: LoadResult, metrics: Metrics, *, shards: int, skus: Sequence[str]
) -> ExpectedFigure:
    line_rate_per_s = _lines_made(result) / result.elapsed_s
    per_stream = [
        sum(shard_of(sku, shards) == s for sku in skus) for s in range(shards)
    ]
    cycle_s = BATCH_WINDOW_S + POLL_INTERVAL_S / 2 + LIMITS.latency_ms / 1000
    expected = expected_netting_ratio(
        line_rate_per_s=line_rate_per_s,
        skus_per_stream=per_stream,
        cycle_s=cycle_s,
        lines_per_request=LIMITS.lines_per_request,
    )
    lines_in = metrics.counter("lines_in")
    lines_out = metrics.counter("lines_out")
    measured = lines_in / lines_out if lines_out else 0.0
    return ExpectedFigure(
        name="netting: lines read per line sent",
        unit="ratio",
        expected=expected,
        measured=measured,
        estimate=(
            f"{line_rate_per_s:,.0f} lines/s offered over skus per stream "
            f"{per_stream}; a stream sends a batch every {cycle_s * 1000:.0f} ms "
            f"(window, half a poll, ERP latency) or per {LIMITS.lines_per_request} "
            "lines, whichever comes first, with one line per position"
        ),
        verdict=f"{lines_in:,.0f} lines read, {lines_out:,.0f} sent",
    )


# Shared helpers ---------------------------------------------------------------------


def _never_above(measured: int, limit: int) -> str:
    return f"never above {limit:,}: " + ("yes" if measured <= limit else "NO")


def _ratio_text(measured: float, expected: float) -> str:
    return f"{measured / expected:.2f}x expected" if expected else "n/a"


def _percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, round(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _no_errors(result: LoadResult) -> Check:
    errors = sum(n for label, n in result.outcomes.items() if label.startswith("error"))
    return Check(text=f"errors {errors}", passed=errors == 0)


def _targets(scenario_list: Sequence[Scenario]) -> list[Target]:
    """The figures held to a target: rate use, and the ERP's limits never crossed."""
    figures = {
        figure["name"]: figure
        for scenario in scenario_list
        for figure in scenario.get("figures", [])
    }
    admitted = figures["requests admitted by the ERP"]["measured"]
    peak_requests = figures["most requests arriving in any one second (whole run)"]
    peak_lines = figures["most lines arriving in any one second (whole run)"]
    return [
        _target(
            "ERP bridge backlog: requests admitted vs the ERP's limit",
            "requests/s the simulator admitted while draining a backlog, over its "
            f"limit of {LIMITS.requests_per_s}/s (at least 0.95x)",
            measured=admitted,
            base=LIMITS.requests_per_s,
            target=0.95,
            at_least=True,
        ),
        _target(
            "ERP bridge: requests in any second vs the ERP's limit",
            "most requests arriving in one sliding second over the limit "
            "(at most 1.00x: never above)",
            measured=peak_requests["measured"],
            base=LIMITS.requests_per_s,
            target=1.0,
            at_least=False,
        ),
        _target(
            "ERP bridge: lines in any second vs the ERP's limit",
            "most lines arriving in one sliding second over the limit "
            "(at most 1.00x: never above)",
            measured=peak_lines["measured"],
            base=LIMITS.lines_per_s,
            target=1.0,
            at_least=False,
        ),
    ]


def _target(
    name: str,
    description: str,
    *,
    measured: float,
    base: float,
    target: float,
    at_least: bool,
) -> Target:
    ratio = measured / base
    return Target(
        name=name,
        description=description,
        measured_ratio=ratio,
        target_ratio=target,
        met=ratio >= target if at_least else ratio <= target,
        detail=f"{measured:,.1f} vs {base:,}: {ratio:.3f}x",
    )


# Running ----------------------------------------------------------------------------


async def measure(bench: BridgeBench) -> BridgePart:
    """All three measurements, one rig each, in this order."""
    async with aiohttp.ClientSession() as http:
        scenario_list = [
            await backlog(bench, http),
            await lag(bench, http),
            await netting(bench, http),
        ]
    notes = [
        "ERP bridge: the simulator runs as its own process, so that its per-second "
        "counts are taken on time rather than between the load generator's steps.",
        "ERP bridge: the bridge's own lag figure is the age of the oldest record of "
        "each batch when the ERP acknowledged it, over its last 4,096 batches; the "
        "ledger figure times every reservation but only to the "
        f"{LEDGER_POLL_S * 1000:g} ms the ledger is polled at.",
    ]
    return BridgePart(scenario_list, _targets(scenario_list), notes)


def sizes_for(mode: str) -> BridgeSizes:
    return {"full": FULL, "quick": QUICK, "smoke": SMOKE}[mode]


def _no_progress(name: str, total: int | None) -> Progress:
    return lambda done: None


async def main_async(args: argparse.Namespace) -> int:
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    out_dir: pathlib.Path = args.out
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    redis_handle = await ensure_redis(args.redis_url, log_dir)
    if redis_handle is None:
        print("no Redis: the bridge needs one for its shared quota", file=sys.stderr)
        return 1
    try:
        bench = BridgeBench(
            sizes=sizes_for(mode),
            database_url=args.database_url,
            redis_url=redis_handle.url,
            log_dir=log_dir,
            shards=args.shards,
            progress=_no_progress,
        )
        part = await measure(bench)
    finally:
        await redis_handle.close()

    results = {
        "metadata": collect_metadata(mode=mode),
        "scenarios": part.scenarios,
        "targets": part.targets,
        "notes": part.notes,
    }
    report = write_report(results, out_dir)
    print(f"report: {report} ({time.monotonic() - started:.0f} s)")
    for target in part.targets:
        verdict = "MET" if target["met"] else "MISSED"
        print(f"  {verdict:6} {target['name']}: {target['detail']}")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bridge")
    parser.add_argument("--quick", action="store_true", help="a run under a minute")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("STOCKWARD_DATABASE_URL", DEFAULT_DATABASE_URL),
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("STOCKWARD_REDIS_URL", REDIS_URL_DEFAULT)
    )
    parser.add_argument("--shards", type=int, default=4)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=args.out / "bench.log",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return uvloop.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
