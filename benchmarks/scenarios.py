"""The benchmark scenarios. Each measures one or more systems and returns report rows
(see report.py) with the checks that make a fast answer worth anything: the units
held afterwards, read from each system's own store, must be exactly what it promised.

Design note on what is counted. A row's throughput is operations per second as the
load generator saw them; in batch rows an operation is a whole batch, so the runner
scales completed and per_s by the batch size (latency stays per batch). CPU seconds
are taken per process over the measured interval and divided by the reservations
made; the client process includes the load generator itself, which is the same for
every system. "Reservations per commit" counts write-ahead records per Postgres
transaction in stockward's own table (see services.write_ahead_commits).
"""

import bisect
import dataclasses
import gc
import itertools
import logging
import os
import random
from collections.abc import Callable, Mapping
from typing import Any

from benchmarks.load import LoadResult, Op, Progress, run_closed, run_open
from benchmarks.proc import measure_cpu, usage_of
from benchmarks.report import Check, Row
from benchmarks.services import write_ahead_commits
from benchmarks.systems import System, is_reserved, stock
from clients import Batching, FailedPreconditionError, StockwardClient, line
from stockward.v1 import inventory_pb2

log = logging.getLogger(__name__)

LOCATION = "DC-1"
CHANNEL = "web"
ProgressFactory = Callable[[str, int | None], Progress]


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each scenario is: `full` for the report, `quick` for a look, `smoke`
    for the test that proves the runner works end to end."""

    flash_units: int
    # The naive baseline manages a few hundred per second: it sells a smaller
    # drop so that the run stays within its time budget.
    flash_units_naive: int
    flash_buyers: int
    latency_duration_s: float
    catalogue_skus: int
    catalogue_locations: int
    catalogue_duration_s: float
    catalogue_callers: int
    batch_sizes: tuple[int, ...]
    batch_duration_s: float
    windows_s: tuple[float, ...]
    ceiling_rows: int
    recovery_holds: int


FULL = Sizes(
    flash_units=20_000,
    flash_units_naive=3_000,
    flash_buyers=300,
    latency_duration_s=10.0,
    catalogue_skus=100_000,
    catalogue_locations=10,
    catalogue_duration_s=30.0,
    catalogue_callers=400,
    batch_sizes=(1, 10, 100, 500, 1_000),
    batch_duration_s=6.0,
    windows_s=(0.001, 0.002, 0.005),
    ceiling_rows=300_000,
    recovery_holds=1_000_000,
)
QUICK = Sizes(
    flash_units=3_000,
    flash_units_naive=600,
    flash_buyers=200,
    latency_duration_s=3.0,
    catalogue_skus=5_000,
    catalogue_locations=10,
    catalogue_duration_s=6.0,
    catalogue_callers=200,
    batch_sizes=(10, 100, 1_000),
    batch_duration_s=2.0,
    windows_s=(0.002,),
    ceiling_rows=50_000,
    recovery_holds=60_000,
)
SMOKE = Sizes(
    flash_units=200,
    flash_units_naive=100,
    flash_buyers=50,
    latency_duration_s=1.0,
    catalogue_skus=200,
    catalogue_locations=3,
    catalogue_duration_s=1.5,
    catalogue_callers=50,
    batch_sizes=(10, 100),
    batch_duration_s=0.5,
    windows_s=(0.002,),
    ceiling_rows=5_000,
    recovery_holds=2_000,
)


@dataclasses.dataclass
class Bench:
    """What every scenario needs: sizes, the stockward schema (to count commits),
    and a progress bar factory."""

    sizes: Sizes
    database_url: str
    stockward_schema: str
    progress: ProgressFactory


# Measuring --------------------------------------------------------------------------


async def measured(
    bench: Bench,
    system: System,
    run: Callable[[], Any],
    *,
    variant: str,
    reservations: Callable[[LoadResult], int],
) -> tuple[LoadResult, Row]:
    """Run one load against one system, with its CPU and commits counted."""
    pids = [system.service.pid, os.getpid()]
    commits_before = await _commits(bench, system)
    # Start each measurement without garbage from the last, and keep what lives on
    # out of the collector's way: its pauses would count as the system's latency.
    gc.collect()
    gc.freeze()
    with measure_cpu(pids) as cpu:
        result: LoadResult = await run()
    commits_after = await _commits(bench, system)

    made = max(1, reservations(result))
    row = Row(
        system=system.name,
        variant=variant,
        load=result.to_json(),
        cpu_s_per_1k_reservations={
            system.name: cpu[system.service.pid] * 1000 / made,
            "client": cpu[os.getpid()] * 1000 / made,
        },
        peak_rss_bytes={
            system.name: usage_of(system.service.pid).peak_rss_bytes(),
            "client": usage_of(os.getpid()).peak_rss_bytes(),
        },
        reservations_per_commit=_per_commit(commits_before, commits_after),
        checks=[],
    )
    return result, row


async def _commits(bench: Bench, system: System) -> tuple[int, int] | None:
    if system.name != "stockward":
        return None
    return await write_ahead_commits(bench.database_url, bench.stockward_schema)


def _per_commit(
    before: tuple[int, int] | None, after: tuple[int, int] | None
) -> float | None:
    if before is None or after is None or after[1] == before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def reserve_op(
    client: StockwardClient, sku: Callable[[int], str], location: str = LOCATION
) -> Op:
    async def op(index: int) -> str:
        answer = await client.reserve(CHANNEL, [line(sku(index), 1, location=location)])
        return "reserved" if is_reserved(answer) else "rejected"

    return op


def _no_errors(result: LoadResult) -> Check:
    errors = sum(n for label, n in result.outcomes.items() if label.startswith("error"))
    return Check(text=f"errors {errors}", passed=errors == 0)


def batch_op(
    client: StockwardClient, skus: list[str], size: int, *, ttl_s: int = 0
) -> Op:
    """One ExecuteBatch of `size` one-unit reserves, round-robin over `skus`."""
    counter = itertools.count()

    async def batch(_: int) -> str:
        commands = [
            inventory_pb2.Command(
                reserve=inventory_pb2.ReserveRequest(
                    channel=CHANNEL,
                    ttl_seconds=ttl_s,
                    lines=[line(skus[next(counter) % len(skus)], 1, location=LOCATION)],
                )
            )
            for _ in range(size)
        ]
        results = await client.execute_batch(commands)
        held = sum(
            result.WhichOneof("result") == "reserve" and is_reserved(result.reserve)
            for result in results
        )
        return "all reserved" if held == size else "some short"

    return batch


# 1. Flash sale ----------------------------------------------------------------------


async def flash_sale(
    bench: Bench, system: System, *, batching: Batching | None, variant: str
) -> tuple[LoadResult, Row]:
    """Hundreds of buyers for one sku until it is sold out; exactly N must be held."""
    units = bench.sizes.flash_units
    if system.name == "naive-postgres":
        units = bench.sizes.flash_units_naive
    sku = f"FLASH-{variant.replace(' ', '-')}"
    await stock(system, [(sku, LOCATION, units)])
    buyers = bench.sizes.flash_buyers

    def sold_out(outcomes: Mapping[str, int]) -> bool:
        return outcomes.get("rejected", 0) >= buyers

    async with system.client(batching) as client:
        progress = bench.progress(f"flash sale {system.name} {variant}", units)
        result, row = await measured(
            bench,
            system,
            lambda: run_closed(
                reserve_op(client, lambda _: sku),
                name=f"{system.name} {variant}",
                concurrency=buyers,
                # A stateless system never sells out: it sells N and stops.
                total=units if system.held is None else units * 2,
                stop=sold_out,
                progress=progress,
            ),
            variant=variant,
            reservations=lambda r: r.outcomes.get("reserved", 0),
        )
    row["checks"] = await _sold_exactly(system, sku, units, result)
    return result, row


async def _sold_exactly(
    system: System, sku: str, units: int, result: LoadResult
) -> list[Check]:
    answered = result.outcomes.get("reserved", 0)
    checks = [
        Check(
            text=f"RESERVED answers {answered} of {units} units",
            passed=answered == units,
        ),
        _no_errors(result),
    ]
    if system.held is not None:
        held = await system.held(sku, LOCATION)
        checks.append(
            Check(
                text=f"units held in its store {held} of {units}: "
                + ("exact" if held == units else "WRONG"),
                passed=held == units,
            )
        )
    return checks


# Latency at half of peak ------------------------------------------------------------


async def latency_at_rate(
    bench: Bench, system: System, *, rate_per_s: float
) -> tuple[LoadResult, Row]:
    """Single calls at a fixed arrival rate, latency from the intended send time."""
    duration_s = bench.sizes.latency_duration_s
    sku = "STEADY"
    await stock(system, [(sku, LOCATION, int(rate_per_s * duration_s * 2) + 1000)])
    async with system.client() as client:
        progress = bench.progress(
            f"open loop {system.name} {rate_per_s:.0f}/s", int(rate_per_s * duration_s)
        )
        result, row = await measured(
            bench,
            system,
            lambda: run_open(
                reserve_op(client, lambda _: sku),
                name=f"{system.name} open loop",
                rate_per_s=rate_per_s,
                duration_s=duration_s,
                # Far above what the rate needs: a backlog shows as latency.
                in_flight_max=2_000,
                progress=progress,
            ),
            variant=f"open loop at {rate_per_s:.0f}/s",
            reservations=lambda r: r.completed,
        )
    row["checks"] = [_no_errors(result)]
    return result, row


# 2. Catalogue -----------------------------------------------------------------------


class Zipf:
    """Ranks 0..n-1 drawn with probability proportional to 1 / (rank + 1) ** s: a
    few skus take most of the demand, as in real catalogues (s = 1.0 is the
    classic fit for web shop popularity)."""

    def __init__(self, n: int, s: float, rng: random.Random) -> None:
        self._cumulative = list(
            itertools.accumulate(1 / (k + 1) ** s for k in range(n))
        )
        self._rng = rng

    def draw(self) -> int:
        point = self._rng.random() * self._cumulative[-1]
        return bisect.bisect_left(self._cumulative, point)


async def catalogue(bench: Bench, system: System) -> tuple[LoadResult, Row]:
    """Skewed demand over many skus and locations with a realistic mix: every
    order reserves; half confirm (60% of those then ship), a fifth of the rest
    release, and the others are left to expire on a short TTL."""
    sizes = bench.sizes
    locations = [f"LOC-{n:02d}" for n in range(sizes.catalogue_locations)]
    skus = [f"SKU-{n:06d}" for n in range(sizes.catalogue_skus)]
    await stock(system, ((sku, loc, 50) for sku in skus for loc in locations))
    rng = random.Random(7)
    popularity = Zipf(len(skus), 1.0, rng)
    batching = Batching(window_s=0.002)

    async with system.client(batching) as client:

        async def order(index: int) -> str:
            sku = skus[popularity.draw()]
            preferred = rng.sample(locations, k=min(3, len(locations)))
            answer = await client.reserve(
                CHANNEL,
                [line(sku, rng.randint(1, 2), locations=preferred)],
                ttl_s=2,
            )
            if not is_reserved(answer):
                return "rejected"
            try:
                return await _follow_up(client, answer.reservation_id, rng)
            except FailedPreconditionError as error:
                # A hold that waited longer than its TTL in a queue expires before
                # the shopper confirms: a real outcome, not a failure.
                if error.reason != "RESERVATION_EXPIRED":
                    raise
                return "expired before confirm"

        progress = bench.progress(f"catalogue {system.name}", None)
        result, row = await measured(
            bench,
            system,
            lambda: run_closed(
                order,
                name=f"{system.name} catalogue",
                concurrency=sizes.catalogue_callers,
                duration_s=sizes.catalogue_duration_s,
                progress=progress,
            ),
            variant="auto-batched, Zipf demand, full lifecycle",
            reservations=lambda r: r.completed - r.outcomes.get("rejected", 0),
        )
    row["checks"] = [_no_errors(result)]
    return result, row


async def _follow_up(
    client: StockwardClient, reservation_id: str, rng: random.Random
) -> str:
    roll = rng.random()
    if roll < 0.5:
        await client.confirm(reservation_id)
        if rng.random() < 0.6:
            await client.fulfill(reservation_id)
            return "fulfilled"
        return "confirmed"
    if roll < 0.6:
        await client.release(reservation_id)
        return "released"
    return "left to expire"


# 3. Batch path ----------------------------------------------------------------------


async def execute_batch(
    bench: Bench, system: System, *, size: int, skus: list[str]
) -> tuple[LoadResult, Row]:
    """ExecuteBatch calls of `size` reserves, four batches in flight."""
    async with system.client() as client:
        batch = batch_op(client, skus, size)
        progress = bench.progress(f"ExecuteBatch {system.name} x{size}", None)
        result, row = await measured(
            bench,
            system,
            lambda: run_closed(
                batch,
                name=f"{system.name} ExecuteBatch x{size}",
                concurrency=4,
                duration_s=bench.sizes.batch_duration_s,
                progress=progress,
            ),
            variant=f"ExecuteBatch size {size} (latency per batch)",
            reservations=lambda r: r.completed * size,
        )
    row["load"]["completed"] *= size
    row["load"]["per_s"] *= size
    row["batch_size"] = size
    short = result.outcomes.get("some short", 0)
    row["checks"] = [
        Check(text=f"batches with a short line {short}", passed=short == 0),
        _no_errors(result),
    ]
    return result, row


async def auto_batched(
    bench: Bench, system: System, *, window_s: float, sku: str
) -> tuple[LoadResult, Row]:
    """Hundreds of concurrent single calls, coalesced by the client library."""
    batching = Batching(window_s=window_s, size_max=1_000)
    async with system.client(batching) as client:
        progress = bench.progress(f"auto-batched {window_s * 1000:g} ms", None)
        result, row = await measured(
            bench,
            system,
            lambda: run_closed(
                reserve_op(client, lambda _: sku),
                name=f"{system.name} auto-batched {window_s * 1000:g} ms",
                concurrency=1_000,
                duration_s=bench.sizes.batch_duration_s,
                progress=progress,
            ),
            variant=f"auto-batched single calls, window {window_s * 1000:g} ms",
            reservations=lambda r: r.outcomes.get("reserved", 0),
        )
        stats = client.batch_stats
    assert stats is not None
    mean_batch = stats.commands_sent / max(1, stats.batches_sent)
    row["checks"] = [
        Check(text=f"mean batch {mean_batch:.0f} commands", passed=mean_batch > 1),
        _no_errors(result),
    ]
    return result, row


# 4. Recovery ------------------------------------------------------------------------


@dataclasses.dataclass
class RecoveryFigures:
    holds: int
    rss_per_hold_bytes: float
    restart_after_kill_s: float
    restart_after_term_s: float
    load_per_s: float


async def recovery(bench: Bench, system: System) -> RecoveryFigures:
    """Fill the server with active holds, then time restarts: after SIGKILL (replay
    from the last checkpoint) and after SIGTERM (drain and checkpoint first)."""
    holds = bench.sizes.recovery_holds
    skus = [f"HOLD-{n:05d}" for n in range(max(1, holds // 100))]
    await stock(system, ((sku, LOCATION, 1_000) for sku in skus))
    rss_before = usage_of(system.service.pid).rss_bytes()

    per_batch = 1_000
    batches = -(-holds // per_batch)
    progress = bench.progress("recovery: placing holds", holds)
    async with system.client() as client:
        batch = batch_op(client, skus, per_batch, ttl_s=24 * 3600)
        placed = await run_closed(
            batch,
            name="recovery fill",
            concurrency=4,
            total=batches,
            progress=lambda done: progress(done * per_batch),
        )
    assert placed.outcomes.get("all reserved", 0) == batches, placed.outcomes
    rss_after = usage_of(system.service.pid).rss_bytes()

    await system.service.kill_and_wait()
    await system.service.start()
    after_kill_s = system.service.started_to_serving_s
    await system.service.stop()
    await system.service.start()
    after_term_s = system.service.started_to_serving_s
    return RecoveryFigures(
        holds=batches * per_batch,
        rss_per_hold_bytes=(rss_after - rss_before) / (batches * per_batch),
        restart_after_kill_s=after_kill_s,
        restart_after_term_s=after_term_s,
        load_per_s=placed.per_s * per_batch,
    )
