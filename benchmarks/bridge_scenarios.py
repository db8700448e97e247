"""The three ERP bridge measurements, each with the estimates its figures are held
against, worked out before the run. Each runs on a rig of its own
(benchmarks/bridge_rig.py); benchmarks/bridge.py runs them in order.

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

import asyncio
import contextlib
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import aiohttp

from benchmarks import scenarios
from benchmarks.bridge_rig import (
    BATCH_WINDOW_S,
    CATCH_UP_POLL_S,
    LIMITS,
    POLL_INTERVAL_S,
    BridgeBench,
    ErpLimits,
    ErpSample,
    Metrics,
    Rig,
    erp_sample,
    rig,
)
from benchmarks.load import LoadResult, Op, run_closed, run_open
from benchmarks.proc import measure_cpu, usage_of
from benchmarks.report import Check, ExpectedFigure, Row, Scenario
from benchmarks.services import SERVING_WAIT_S
from benchmarks.systems import is_reserved, stock
from clients import StockwardClient, line
from erp_bridge.config import BridgeConfig
from server.engine.shard import shard_of

LOCATION = scenarios.LOCATION

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


# 1. Backlog -------------------------------------------------------------------------


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
            first = await erp_sample(erp)
            await asyncio.sleep(sizes.backlog_window_s)
            last = await erp_sample(erp)
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
