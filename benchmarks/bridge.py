"""The ERP bridge under load: how close it runs to the ERP's rate limit without ever
crossing it, how stale the ERP is at a steady load, and how much a flash sale nets.

`python -m benchmarks` runs this after the stockward scenarios (left out of --smoke);
`python -m benchmarks.bridge [--quick | --smoke]` runs it alone, with its own report.

This module runs the three measurements of benchmarks/bridge_scenarios.py in order,
each on a rig of benchmarks/bridge_rig.py, and holds the figures that have a target
to it: the share of the ERP's request limit used, and its limits never crossed.
"""

import argparse
import dataclasses
import logging
import pathlib
import sys
import time
from collections.abc import Sequence

import aiohttp
import uvloop

from benchmarks.bridge_rig import (
    FULL,
    LIMITS,
    QUICK,
    SMOKE,
    BridgeBench,
    BridgeSizes,
)
from benchmarks.bridge_scenarios import LEDGER_POLL_S, backlog, lag, netting
from benchmarks.load import Progress
from benchmarks.report import Scenario, Target, collect_metadata, write_report
from benchmarks.services import add_run_arguments, ensure_redis

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results" / "bridge"


@dataclasses.dataclass
class BridgePart:
    """What the runner adds to its report."""

    scenarios: list[Scenario]
    targets: list[Target]
    notes: list[str]


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
    add_run_arguments(parser, quick_help="a run under a minute")
    parser.set_defaults(out=RESULTS_DIR)
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
