"""`python -m benchmarks [--quick]`: every scenario against stockward and its
baselines in one run, on this machine, then a report under benchmarks/results/.

It starts what it needs (stockward and the baselines as child processes, a private
Redis if none answers), stops them by pid afterwards and drops the schemas and keys
it made. Targets are ratios reported as met or missed, never asserted. The ERP
bridge's figures (benchmarks/bridge.py) come last, each on a rig of its own.
"""

import argparse
import contextlib
import gc
import logging
import os
import pathlib
import sys
import time
from collections.abc import AsyncIterator, Sequence

import tqdm
import uvloop

from benchmarks import bridge as bridge_bench
from benchmarks import scenarios
from benchmarks.bridge_rig import BridgeBench
from benchmarks.load import LoadFigures, LoadResult, Progress
from benchmarks.pg_ceiling import measure_insert_ceiling
from benchmarks.report import (
    Check,
    Row,
    Scenario,
    Target,
    collect_metadata,
    write_report,
)
from benchmarks.report import System as SystemInfo
from benchmarks.scenarios import FULL, QUICK, SMOKE, Bench, Sizes
from benchmarks.services import RedisHandle, add_run_arguments, ensure_redis
from benchmarks.systems import (
    System,
    make_naive_pg,
    make_noop,
    make_redis_lua,
    make_stockward,
    stock,
)
from clients import Batching

log = logging.getLogger(__name__)

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
# Flash-sale and auto-batching figures use this window: 2 ms adds little latency
# and fills batches of hundreds under load.
WINDOW_S = 0.002


class Bars:
    """One tqdm bar per measurement, closed when the next one starts."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._bar: tqdm.tqdm | None = None

    def __call__(self, name: str, total: int | None) -> Progress:
        self.close()
        if not self._enabled:
            return lambda done: None
        bar = tqdm.tqdm(total=total, desc=name, unit="op", file=sys.stderr, leave=False)
        self._bar = bar
        return lambda done: bar.update(done - bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


async def main_async(args: argparse.Namespace) -> int:
    sizes: Sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    out_dir: pathlib.Path = args.out
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}"
    bars = Bars(enabled=not args.no_progress)
    started = time.monotonic()

    stockward = make_stockward(
        log_dir,
        database_url=args.database_url,
        schema=f"bench_sw_{tag}",
        shards=args.shards,
    )
    bench = Bench(sizes, args.database_url, f"bench_sw_{tag}", bars)
    naive = make_naive_pg(
        log_dir, database_url=args.database_url, schema=f"bench_pg_{tag}"
    )
    noop = make_noop(log_dir)
    notes: list[str] = []
    redis_handle = await ensure_redis(args.redis_url, log_dir)
    systems = [stockward, naive, noop]
    redis_lua: System | None = None
    if redis_handle is None:
        notes.append("Redis was not available: the Redis Lua baseline is left out.")
    else:
        redis_lua = make_redis_lua(log_dir, redis_url=redis_handle.url, prefix=tag)
        systems.append(redis_lua)

    try:
        async with _running(systems):
            scenario_rows, targets = await _measure(
                bench, stockward, naive, noop, redis_lua
            )
            recovery_row, recovery_target = await _recovery(bench, args, log_dir)
        bridge_part = await _bridge(
            args, mode=mode, log_dir=log_dir, redis_handle=redis_handle, bars=bars
        )
    finally:
        bars.close()
        if redis_handle is not None:
            await redis_handle.close()

    scenario_rows.append(recovery_row)
    targets.append(recovery_target)
    scenario_rows += bridge_part.scenarios
    targets += bridge_part.targets
    notes += _standing_notes(sizes) + bridge_part.notes
    results = {
        "metadata": collect_metadata(mode=mode),
        "systems": [
            SystemInfo(name=s.name, description=s.description) for s in [*systems]
        ],
        "scenarios": scenario_rows,
        "targets": targets,
        "notes": notes,
    }
    report = write_report(results, out_dir)
    elapsed_s = time.monotonic() - started
    print(f"report: {report} ({elapsed_s:.0f} s)")
    for target in targets:
        verdict = "MET" if target["met"] else "MISSED"
        print(f"  {verdict:6} {target['name']}: {target['detail']}")
    return 0


@contextlib.asynccontextmanager
async def _running(systems: list[System]) -> AsyncIterator[None]:
    started: list[System] = []
    try:
        for system in systems:
            await system.service.start()
            started.append(system)
        yield
    finally:
        for system in reversed(started):
            await system.service.stop()
        for system in systems:
            await system.cleanup()


async def _measure(
    bench: Bench,
    stockward: System,
    naive: System,
    noop: System,
    redis_lua: System | None,
) -> tuple[list[Scenario], list[Target]]:
    batching = Batching(window_s=WINDOW_S, size_max=1_000)

    # 1. Flash sale.
    flash: dict[str, LoadResult] = {}
    rows: list[Row] = []
    plan: list[tuple[str, System, Batching | None]] = [
        ("stockward single", stockward, None),
        ("stockward batched", stockward, batching),
        ("naive single", naive, None),
        ("noop single", noop, None),
        ("noop batched", noop, batching),
    ]
    if redis_lua is not None:
        plan.insert(3, ("redis single", redis_lua, None))
    for key, system, batch in plan:
        variant = "auto-batched calls" if batch else "single calls"
        result, row = await scenarios.flash_sale(
            bench, system, batching=batch, variant=variant
        )
        flash[key] = result
        rows.append(row)
    flash_scenario = Scenario(
        name="Flash sale",
        description=(
            f"One sku, {bench.sizes.flash_buyers} concurrent buyers reserving one unit "
            f"each until sold out ({bench.sizes.flash_units} units; "
            f"{bench.sizes.flash_units_naive} for the naive baseline)."
        ),
        rows=rows,
    )

    # Latency at half of stockward's single-call peak, stockward and the ceiling.
    rate_per_s = max(1.0, flash["stockward single"].per_s / 2)
    steady_sw, steady_sw_row = await scenarios.latency_at_rate(
        bench, stockward, rate_per_s=rate_per_s
    )
    steady_noop, steady_noop_row = await scenarios.latency_at_rate(
        bench, noop, rate_per_s=rate_per_s
    )
    latency_scenario = Scenario(
        name="Latency at half of peak",
        description=(
            "Open loop at half of stockward's single-call flash-sale rate; latency "
            "counted from each request's intended send time."
        ),
        rows=[steady_sw_row, steady_noop_row],
    )

    # 2. Catalogue.
    _, catalogue_row = await scenarios.catalogue(bench, stockward)
    catalogue_scenario = Scenario(
        name="Catalogue",
        description=(
            f"{bench.sizes.catalogue_skus:,} skus at "
            f"{bench.sizes.catalogue_locations} locations, Zipf (s=1) demand, "
            "reserve then confirm+fulfil, confirm, release or expiry (2 s TTL)."
        ),
        rows=[catalogue_row],
    )

    # 3. Batch path, against Postgres's own insert rate.
    batch_rows, best_batch_per_s = await _batch_path(bench, stockward, noop)
    ceiling = await measure_insert_ceiling(
        bench.database_url,
        bench.stockward_schema,
        rows_total=bench.sizes.ceiling_rows,
        batch_rows=1_000,
    )
    batch_scenario = Scenario(
        name="Batch path",
        description=(
            "ExecuteBatch at several sizes (4 batches in flight) and auto-batched "
            "single calls (1,000 callers). Postgres alone accepts "
            f"{ceiling.rows_per_s:,.0f} write-ahead-shaped rows/s as COPY batches of "
            "1,000 on one connection."
        ),
        rows=batch_rows,
    )

    targets = [
        _at_least(
            "Flash sale, single calls vs transport ceiling",
            "stockward single-call reservations/s over the do-nothing server's",
            flash["stockward single"].per_s,
            flash["noop single"].per_s,
            0.6,
        ),
        _at_least(
            "Flash sale, auto-batched vs naive Postgres",
            "stockward auto-batched reservations/s over the naive baseline's",
            flash["stockward batched"].per_s,
            flash["naive single"].per_s,
            50.0,
        ),
        _at_least(
            "Durable ExecuteBatch vs plain batched inserts",
            "best stockward ExecuteBatch reservations/s over Postgres COPY rows/s",
            best_batch_per_s,
            ceiling.rows_per_s,
            0.5,
        ),
        _at_most(
            "p99 at half of peak vs transport ceiling",
            f"stockward p99 over the do-nothing server's p99 at {rate_per_s:.0f}/s",
            steady_sw.p99_ms,
            steady_noop.p99_ms,
            3.0,
        ),
    ]
    scenario_list = [
        flash_scenario,
        latency_scenario,
        catalogue_scenario,
        batch_scenario,
    ]
    return scenario_list, targets


async def _batch_path(
    bench: Bench, stockward: System, noop: System
) -> tuple[list[Row], float]:
    skus = [f"BATCH-{n:04d}" for n in range(1_000)]
    # Enough that no batch comes up short in the time given.
    await stock(stockward, ((sku, scenarios.LOCATION, 10**9) for sku in skus))
    rows: list[Row] = []
    best_per_s = 0.0
    for system in (stockward, noop):
        for size in bench.sizes.batch_sizes:
            result, row = await scenarios.execute_batch(
                bench, system, size=size, skus=skus
            )
            rows.append(row)
            if system is stockward:
                best_per_s = max(best_per_s, result.per_s * size)
    await stock(stockward, [("AUTO", scenarios.LOCATION, 10**9)])
    for window_s in bench.sizes.windows_s:
        _, row = await scenarios.auto_batched(
            bench, stockward, window_s=window_s, sku="AUTO"
        )
        rows.append(row)
    return rows, best_per_s


async def _recovery(
    bench: Bench, args: argparse.Namespace, log_dir: pathlib.Path
) -> tuple[Scenario, Target]:
    schema = f"bench_rec_{os.getpid()}"
    system = make_stockward(
        log_dir, database_url=args.database_url, schema=schema, shards=args.shards
    )
    async with _running([system]):
        figures = await scenarios.recovery(bench, system)
    worst_s = max(figures.restart_after_kill_s, figures.restart_after_term_s)
    row = Row(
        system="stockward",
        variant=f"restart with {figures.holds:,} active holds",
        load=_restart_figures(figures),
        cpu_s_per_1k_reservations={},
        peak_rss_bytes={},
        reservations_per_commit=None,
        checks=[],
    )
    row["checks"] = [
        Check(
            text=(
                f"restart after SIGKILL {figures.restart_after_kill_s:.1f} s, after "
                f"SIGTERM {figures.restart_after_term_s:.1f} s; "
                f"{figures.rss_per_hold_bytes:.0f} bytes of memory per active hold; "
                f"holds placed at {figures.load_per_s:,.0f}/s"
            ),
            passed=True,
        )
    ]
    scenario = Scenario(
        name="Recovery",
        description=(
            "Active holds placed through ExecuteBatch, then the server is killed "
            "(SIGKILL) and started again, then stopped (SIGTERM) and started again; "
            "time from process start to health SERVING."
        ),
        rows=[row],
    )
    target = Target(
        name=f"Recovery of {figures.holds:,} active holds in under 20 s",
        description="20 s over the slower restart (above 1.0 is met)",
        measured_ratio=20.0 / max(worst_s, 1e-9),
        target_ratio=1.0,
        met=worst_s < 20.0,
        detail=f"slower restart {worst_s:.1f} s with {figures.holds:,} holds",
    )
    return scenario, target


async def _bridge(
    args: argparse.Namespace,
    *,
    mode: str,
    log_dir: pathlib.Path,
    redis_handle: RedisHandle | None,
    bars: Bars,
) -> bridge_bench.BridgePart:
    """The ERP bridge's figures (benchmarks/bridge.py), on rigs of its own once the
    systems above have stopped. The smoke run leaves them out to stay short; the
    bridge's own smoke test runs `python -m benchmarks.bridge --smoke`."""
    if mode == "smoke":
        return bridge_bench.BridgePart(
            [], [], ["The ERP bridge is left out of --smoke."]
        )
    if redis_handle is None:
        return bridge_bench.BridgePart(
            [],
            [],
            ["Redis was not available: the ERP bridge (which needs it) is left out."],
        )
    bench = BridgeBench(
        sizes=bridge_bench.sizes_for(mode),
        database_url=args.database_url,
        redis_url=redis_handle.url,
        log_dir=log_dir,
        shards=args.shards,
        progress=bars,
    )
    return await bridge_bench.measure(bench)


def _restart_figures(figures: scenarios.RecoveryFigures) -> LoadFigures:
    """The restart as a load row: one operation, its time as the latency."""
    worst_ms = 1000 * max(figures.restart_after_kill_s, figures.restart_after_term_s)
    return LoadFigures(
        name="restart",
        mode="closed",
        completed=2,
        outcomes={"restarted": 2},
        elapsed_s=worst_ms / 1000,
        per_s=0.0,
        mean_ms=worst_ms,
        p50_ms=1000 * min(figures.restart_after_kill_s, figures.restart_after_term_s),
        p90_ms=worst_ms,
        p99_ms=worst_ms,
        p999_ms=worst_ms,
        max_ms=worst_ms,
        target_rate_per_s=None,
        late_starts=0,
        concurrency=1,
        in_flight_peak=1,
    )


def _at_least(
    name: str, description: str, measured: float, base: float, target: float
) -> Target:
    ratio = measured / base if base > 0 else 0.0
    return Target(
        name=name,
        description=description + f" (at least {target:g}x)",
        measured_ratio=ratio,
        target_ratio=target,
        met=ratio >= target,
        detail=f"{measured:,.0f} vs {base:,.0f}: {ratio:.2f}x",
    )


def _at_most(
    name: str, description: str, measured: float, base: float, target: float
) -> Target:
    ratio = measured / base if base > 0 else float("inf")
    return Target(
        name=name,
        description=description + f" (at most {target:g}x)",
        measured_ratio=ratio,
        target_ratio=target,
        met=ratio <= target,
        detail=f"{measured:.2f} ms vs {base:.2f} ms: {ratio:.2f}x",
    )


def _standing_notes(sizes: Sizes) -> list[str]:
    notes = [
        "Client and servers share this machine's cores: the load generator's CPU "
        "competes with the system measured, as the client CPU column shows.",
        "The baselines implement Reserve, ExecuteBatch and SetOnHand only, so the "
        "catalogue mix (confirm, release, fulfil, expiry) runs on stockward alone.",
        "The Redis baseline runs without persistence: fast, but a crash loses holds.",
    ]
    if sizes.recovery_holds < FULL.recovery_holds:
        notes.append(
            f"Recovery was measured with {sizes.recovery_holds:,} holds, not the "
            f"{FULL.recovery_holds:,} of the target: run `make bench` for that."
        )
    return notes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    add_run_arguments(parser, quick_help="a run under 2 minutes")
    parser.set_defaults(out=RESULTS_DIR)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


# The load generator allocates per request as a busy client does; collecting as
# rarely as the server does (see server/__main__.py) keeps the collector's pauses
# from being counted as the measured system's latency.
GC_YOUNG_THRESHOLD = 100_000


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=args.out / "bench.log",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return uvloop.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
