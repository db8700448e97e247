"""The benchmark report: a results structure in; results.json, report.md, charts out.

The results structure (`Results`, below) holds everything a run measured, as plain JSON
values, so that a report can be rendered again later from results.json alone:

- metadata: when and where the run happened (`Metadata`; `collect_metadata` fills it);
- systems (optional): each system compared, with a sentence saying what it is;
- scenarios: each with a name, a description and one row per system and variant
  measured (`Row`): the load figures from LoadResult.to_json(), CPU seconds per 1,000
  reservations and peak RSS per process, reservations per write-ahead commit where
  known, and correctness checks that passed or failed; and, where a scenario states
  expected figures (the ERP bridge's), each figure against its estimate (`ExpectedFigure`);
- targets: the ratios the caller computed against our targets, each met or missed;
- notes: caveats worth reading before the figures.

Within a scenario the first row is the reference: every row's throughput is also shown
as a ratio of it, because absolute figures on a shared machine drift between runs while
ratios taken side by side in one run do not.

Charts are drawn with matplotlib's Agg canvas directly rather than through pyplot, so
rendering needs no display and touches no global figure state.
"""

import datetime
import json
import logging
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata as distributions
from pathlib import Path
from typing import Any, NotRequired, TypedDict, cast

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from benchmarks.load import LoadFigures

log = logging.getLogger(__name__)

REPORT_NAME = "report.md"
RESULTS_NAME = "results.json"
CHARTS_DIR = "charts"

# The distributions whose versions decide the figures: the service's own stack and the
# clients of the systems it is compared with. Missing ones are reported as such.
PACKAGES = ("grpcio", "protobuf", "asyncpg", "redis", "uvloop", "hdrhistogram")

# Reading the commit must not hold up a report; a local git answers in milliseconds.
GIT_TIMEOUT_S = 5.0

BYTES_PER_MIB = 1024**2
BYTES_PER_GIB = 1024**3
KIB = 1024

# Charts: enough pixels to read in a browser, a width that grows with the bars drawn.
CHART_DPI = 110
CHART_HEIGHT_IN = 4.2
CHART_WIDTH_MIN_IN = 6.5
CHART_WIDTH_PER_BAR_IN = 1.1
# Past this many bars, labels are turned so that they do not overlap.
CHART_LABELS_LEVEL_MAX = 4
# Batch sizes spanning a factor of ten or more (1, 10, 100) read better on a log axis.
BATCH_AXIS_LOG_RATIO = 10


class MachineInfo(TypedDict):
    cpu_count: int
    """Logical CPUs in the machine."""
    cpus_usable: int
    """Logical CPUs this process may run on (fewer in a container or under taskset)."""
    cpu_model: str
    memory_bytes: int
    kernel: str


class Metadata(TypedDict):
    date: str
    """ISO 8601, UTC."""
    machine: MachineInfo
    python: str
    packages: dict[str, str]
    """Distribution name -> version, or "not installed"."""
    mode: str
    """"full" or "quick"."""
    git_commit: str | None
    """The commit, with "-dirty" when tracked files were modified; None outside git."""


class Check(TypedDict):
    text: str
    """What was checked and what was found, e.g. "units held 500 of 500: exact"."""
    passed: bool


class Row(TypedDict):
    system: str
    variant: str
    """How the system was driven, e.g. "single calls" or "ExecuteBatch size 100"."""
    load: LoadFigures
    cpu_s_per_1k_reservations: dict[str, float]
    """Process name -> CPU seconds it spent per 1,000 reservations."""
    peak_rss_bytes: dict[str, int]
    """Process name -> its peak resident memory."""
    reservations_per_commit: float | None
    """Reservations made durable per write-ahead commit, None where not known."""
    checks: list[Check]
    batch_size: NotRequired[int]
    """Present on rows that vary a batch size: they are also charted against it."""


class ExpectedFigure(TypedDict):
    """One figure measured against the figure expected of it (the ERP bridge's)."""

    name: str
    unit: str
    expected: float
    measured: float
    estimate: str
    """How `expected` was worked out, in a sentence."""
    verdict: str
    """A short reading of the two, e.g. "0.98x expected" or "never above 20: yes"."""


class Scenario(TypedDict):
    name: str
    description: str
    rows: list[Row]
    figures: NotRequired[list[ExpectedFigure]]
    """Present on scenarios that state expected figures: shown above the rows."""


class System(TypedDict):
    name: str
    description: str


class Target(TypedDict):
    name: str
    description: str
    measured_ratio: float
    target_ratio: float
    met: bool
    detail: str


class Results(TypedDict):
    metadata: Metadata
    systems: NotRequired[list[System]]
    scenarios: list[Scenario]
    targets: list[Target]
    notes: list[str]


def write_report(results: Mapping[str, Any], out_dir: Path) -> Path:
    """Write results.json, report.md and its charts into `out_dir`; return report.md.

    `results` is a `Results` structure, as built by the runner or read back from an
    earlier results.json. Raises ValueError naming the first missing field.
    """
    checked = validate_results(results)
    charts_dir = out_dir / CHARTS_DIR
    charts_dir.mkdir(parents=True, exist_ok=True)

    (out_dir / RESULTS_NAME).write_text(json.dumps(checked, indent=2) + "\n")

    colours = _system_colours(checked)
    lines = [*_header(checked), *_targets_section(checked["targets"])]
    lines += _systems_section(checked)
    for index, scenario in enumerate(checked["scenarios"], start=1):
        charts = _draw_scenario_charts(
            scenario,
            stem=f"{index:02d}-{_slug(scenario['name'])}",
            out_dir=out_dir,
            colours=colours,
        )
        lines += _scenario_section(scenario, charts)
    lines += _notes_section(checked["notes"])

    report = out_dir / REPORT_NAME
    report.write_text("\n".join(lines) + "\n")
    log.info(
        "report written: path=%s scenarios=%d targets=%d",
        report,
        len(checked["scenarios"]),
        len(checked["targets"]),
    )
    return report


# Validation -----------------------------------------------------------------------


def validate_results(results: Mapping[str, Any]) -> Results:
    """Check that every required field of the structure is present, and return it typed.

    Only presence and shape (mapping or list) are checked, which is what rendering
    needs to fail with a clear message rather than a KeyError deep in a chart.
    """
    _require(results, Results, "results")
    _require(results["metadata"], Metadata, "results.metadata")
    _require(results["metadata"]["machine"], MachineInfo, "results.metadata.machine")
    for index, system in enumerate(_items(results.get("systems", []), "systems")):
        _require(system, System, f"results.systems[{index}]")
    for s, scenario in enumerate(_items(results["scenarios"], "scenarios")):
        _require(scenario, Scenario, f"results.scenarios[{s}]")
        for r, row in enumerate(_items(scenario["rows"], f"scenarios[{s}].rows")):
            where = f"results.scenarios[{s}].rows[{r}]"
            _require(row, Row, where)
            _require(row["load"], LoadFigures, f"{where}.load")
            for c, check in enumerate(_items(row["checks"], f"{where}.checks")):
                _require(check, Check, f"{where}.checks[{c}]")
        for f, figure in enumerate(
            _items(scenario.get("figures", []), f"scenarios[{s}].figures")
        ):
            _require(figure, ExpectedFigure, f"results.scenarios[{s}].figures[{f}]")
    for index, target in enumerate(_items(results["targets"], "targets")):
        _require(target, Target, f"results.targets[{index}]")
    _items(results["notes"], "notes")
    return cast(Results, results)


def _require(value: object, shape: Any, where: str) -> None:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
    missing = sorted(shape.__required_keys__ - value.keys())
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")


def _items(value: object, where: str) -> Sequence[Any]:
    if not isinstance(value, list):
        raise ValueError(
            f"results.{where}: expected a list, got {type(value).__name__}"
        )
    return value


# Metadata -------------------------------------------------------------------------


def collect_metadata(
    *,
    mode: str,
    packages: Sequence[str] = PACKAGES,
    now: datetime.datetime | None = None,
    repo_dir: Path | None = None,
) -> Metadata:
    """Describe this run: the time, the machine, the software and the commit."""
    moment = now or datetime.datetime.now(datetime.UTC)
    return Metadata(
        date=moment.isoformat(timespec="seconds"),
        machine=MachineInfo(
            cpu_count=os.cpu_count() or 0,
            cpus_usable=len(os.sched_getaffinity(0)),
            cpu_model=_cpu_model(),
            memory_bytes=_memory_bytes(),
            kernel=platform.release(),
        ),
        python=sys.version.split()[0],
        packages={name: _version_of(name) for name in packages},
        mode=mode,
        git_commit=_git_commit(repo_dir or Path(__file__).resolve().parent.parent),
    )


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    for line in text.splitlines():
        label, _, value = line.partition(":")
        if label.strip() == "model name":
            return value.strip()
    return platform.processor() or "unknown"


def _memory_bytes() -> int:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        label, _, value = line.partition(":")
        if label == "MemTotal":
            return int(value.split()[0]) * KIB
    return 0


def _version_of(name: str) -> str:
    try:
        return distributions.version(name)
    except distributions.PackageNotFoundError:
        return "not installed"


def _git_commit(repo_dir: Path) -> str | None:
    # Excluding every tag makes describe print the bare commit, plus "-dirty" if needed.
    command = ["git", "-C", str(repo_dir), "describe", "--always", "--dirty"]
    command += ["--abbrev=40", "--exclude=*"]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        log.info("git commit unknown: error=%r", error)
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


# Markdown -------------------------------------------------------------------------


def _header(results: Results) -> list[str]:
    meta = results["metadata"]
    machine = meta["machine"]
    packages = ", ".join(
        f"{name} {version}" for name, version in meta["packages"].items()
    )
    checks = [c for s in results["scenarios"] for r in s["rows"] for c in r["checks"]]
    failed = sum(not check["passed"] for check in checks)
    met = sum(target["met"] for target in results["targets"])
    return [
        "# stockward benchmark report",
        "",
        f"- Targets: **{met} of {len(results['targets'])} met**",
        f"- Correctness checks: {len(checks) - failed} passed, "
        + (f"**{failed} FAILED**" if failed else "0 failed"),
        f"- Run: {meta['date']}, mode {meta['mode']}, "
        f"commit {meta['git_commit'] or 'unknown'}",
        f"- Machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs "
        f"({machine['cpus_usable']} usable), "
        f"{machine['memory_bytes'] / BYTES_PER_GIB:.1f} GiB, Linux {machine['kernel']}",
        f"- Python {meta['python']}; {packages}",
        "",
    ]


def _targets_section(targets: list[Target]) -> list[str]:
    lines = ["## Targets", ""]
    if not targets:
        return [*lines, "No targets were evaluated in this run.", ""]
    lines += [
        "| Target | What it compares | Measured ratio | Target ratio | Result "
        "| Detail |",
        "|---|---|--:|--:|:-:|---|",
    ]
    for target in targets:
        result = "**MET**" if target["met"] else "**MISSED**"
        lines.append(
            _table_row(
                target["name"],
                target["description"],
                _ratio(target["measured_ratio"]),
                _ratio(target["target_ratio"]),
                result,
                target["detail"],
            )
        )
    return [*lines, ""]


def _systems_section(results: Results) -> list[str]:
    described = {s["name"]: s["description"] for s in results.get("systems", [])}
    lines = ["## Systems compared", ""]
    for name in _systems_in_order(results):
        description = described.get(name, "")
        lines.append(f"- **{name}**" + (f": {description}" if description else ""))
    return [*lines, ""]


def _scenario_section(scenario: Scenario, charts: list[tuple[str, str]]) -> list[str]:
    lines = [f"## Scenario: {scenario['name']}", "", scenario["description"], ""]
    lines += _figures_table(scenario.get("figures", []))
    rows = scenario["rows"]
    if not rows:
        return [*lines, "Nothing was measured in this scenario.", ""]

    reference_per_s = rows[0]["load"]["per_s"]
    lines += [
        "| System | Variant | Load | Completed | Ops/s | vs first row | p50 ms "
        "| p99 ms | p99.9 ms | max ms | Outcomes |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for row in rows:
        load = row["load"]
        lines.append(
            _table_row(
                row["system"],
                row["variant"],
                _describe_load(load),
                f"{load['completed']:,}",
                _number(load["per_s"]),
                _ratio(load["per_s"] / reference_per_s) if reference_per_s else "n/a",
                _number(load["p50_ms"]),
                _number(load["p99_ms"]),
                _number(load["p999_ms"]),
                _number(load["max_ms"]),
                _describe_outcomes(load["outcomes"]),
            )
        )

    lines += [
        "",
        "| System | Variant | CPU s per 1,000 reservations | Peak RSS "
        "| Reservations per commit | Checks |",
        "|---|---|---|---|--:|---|",
    ]
    for row in rows:
        per_commit = row["reservations_per_commit"]
        lines.append(
            _table_row(
                row["system"],
                row["variant"],
                _per_process(row["cpu_s_per_1k_reservations"], _number),
                _per_process(row["peak_rss_bytes"], _mebibytes),
                "n/a" if per_commit is None else _number(per_commit),
                "<br>".join(_describe_check(check) for check in row["checks"])
                or "none",
            )
        )

    lines.append("")
    for title, path in charts:
        lines += [f"![{title}]({path})", ""]
    return lines


def _figures_table(figures: list[ExpectedFigure]) -> list[str]:
    """Measured against expected, with how each expectation was estimated."""
    if not figures:
        return []
    lines = [
        "| Figure | Expected | Measured | Measured / expected | Reading "
        "| How it was estimated |",
        "|---|--:|--:|--:|---|---|",
    ]
    for figure in figures:
        expected, measured = figure["expected"], figure["measured"]
        unit = figure["unit"]
        lines.append(
            _table_row(
                figure["name"],
                f"{_number(expected)} {unit}",
                f"{_number(measured)} {unit}",
                _ratio(measured / expected) if expected else "n/a",
                figure["verdict"],
                figure["estimate"],
            )
        )
    return [*lines, ""]


def _notes_section(notes: list[str]) -> list[str]:
    if not notes:
        return []
    return ["## Notes", "", *(f"- {_one_line(note)}" for note in notes), ""]


def _describe_load(load: LoadFigures) -> str:
    if load["mode"] == "closed":
        return f"closed, {load['concurrency']} workers"
    text = f"open, {_number(load['target_rate_per_s'] or 0)}/s, "
    text += f"at most {load['concurrency']} in flight"
    if load["late_starts"]:
        text += f", {load['late_starts']:,} late starts"
    return text


def _describe_outcomes(outcomes: Mapping[str, int]) -> str:
    ordered = sorted(outcomes.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{label} {count:,}" for label, count in ordered) or "none"


def _describe_check(check: Check) -> str:
    return ("PASS: " if check["passed"] else "**FAIL**: ") + check["text"]


def _per_process(values: Mapping[str, Any], show: Callable[[Any], str]) -> str:
    return ", ".join(f"{name} {show(value)}" for name, value in values.items()) or "n/a"


def _table_row(*cells: str) -> str:
    return (
        "| " + " | ".join(_one_line(cell).replace("|", "\\|") for cell in cells) + " |"
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _number(value: float) -> str:
    """A figure with about three significant digits, grouped when large."""
    if value >= 100 or value == 0:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _ratio(value: float) -> str:
    return f"{value:.2f}x"


def _mebibytes(value: int) -> str:
    return f"{value / BYTES_PER_MIB:,.1f} MiB"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "scenario"


# Charts ---------------------------------------------------------------------------


def _systems_in_order(results: Results) -> list[str]:
    names = [s["name"] for s in results.get("systems", [])]
    names += [r["system"] for s in results["scenarios"] for r in s["rows"]]
    return list(dict.fromkeys(names))


def _system_colours(results: Results) -> dict[str, str]:
    """One colour per system, the same in every chart."""
    palette = [f"C{index}" for index in range(10)]
    systems = _systems_in_order(results)
    return {name: palette[index % len(palette)] for index, name in enumerate(systems)}


def _draw_scenario_charts(
    scenario: Scenario, *, stem: str, out_dir: Path, colours: Mapping[str, str]
) -> list[tuple[str, str]]:
    """Draw the scenario's charts; return (title, path relative to out_dir) of each."""
    rows = scenario["rows"]
    charts: list[tuple[str, str]] = []
    if not rows:
        return charts

    name = scenario["name"]
    drawn = [
        (f"{name}: throughput", "throughput", _draw_throughput),
        (f"{name}: latency percentiles", "latency", _draw_latency),
    ]
    if len({row["batch_size"] for row in rows if "batch_size" in row}) >= 2:
        drawn.append((f"{name}: throughput by batch size", "batch", _draw_batch))

    for title, kind, draw in drawn:
        figure = Figure(figsize=(_chart_width_in(len(rows)), CHART_HEIGHT_IN))
        FigureCanvasAgg(figure)
        axes = figure.subplots()
        draw(axes, rows, colours)
        axes.set_title(title)
        figure.tight_layout()
        relative = f"{CHARTS_DIR}/{stem}-{kind}.png"
        figure.savefig(out_dir / relative, dpi=CHART_DPI)
        charts.append((title, relative))
    return charts


def _chart_width_in(bars: int) -> float:
    return max(CHART_WIDTH_MIN_IN, CHART_WIDTH_PER_BAR_IN * bars)


def _row_label(row: Row) -> str:
    return f"{row['system']}\n{row['variant']}" if row["variant"] else row["system"]


def _label_bars(axes: Axes, rows: list[Row]) -> None:
    axes.set_xticks(range(len(rows)))
    turned = len(rows) > CHART_LABELS_LEVEL_MAX
    axes.set_xticklabels(
        [_row_label(row) for row in rows],
        rotation=30 if turned else 0,
        ha="right" if turned else "center",
        fontsize="small",
    )


def _draw_throughput(axes: Axes, rows: list[Row], colours: Mapping[str, str]) -> None:
    per_s = [row["load"]["per_s"] for row in rows]
    axes.bar(range(len(rows)), per_s, color=[colours[row["system"]] for row in rows])
    _label_bars(axes, rows)
    axes.set_ylabel("operations per second")
    axes.grid(axis="y", alpha=0.3)


def _draw_latency(axes: Axes, rows: list[Row], colours: Mapping[str, str]) -> None:
    # Bars are coloured by percentile here, not by system: the groups are the rows.
    del colours
    loads = [row["load"] for row in rows]
    percentiles = [
        ("p50", "#9ecae1", [load["p50_ms"] for load in loads]),
        ("p99", "#3182bd", [load["p99_ms"] for load in loads]),
        ("p99.9", "#08306b", [load["p999_ms"] for load in loads]),
    ]
    width = 0.8 / len(percentiles)
    for offset, (label, colour, values_ms) in enumerate(percentiles):
        positions = [index + (offset - 1) * width for index in range(len(rows))]
        axes.bar(positions, values_ms, width, label=label, color=colour)
    _label_bars(axes, rows)

    # A log axis cannot show zero: a run that recorded nothing keeps a linear axis.
    if all(load["p50_ms"] > 0 for load in loads):
        axes.set_yscale("log")
        axes.set_ylabel("latency, ms (log scale)")
    else:
        axes.set_ylabel("latency, ms")
    axes.legend(title="percentile", fontsize="small")
    axes.grid(axis="y", which="both", alpha=0.3)


def _draw_batch(axes: Axes, rows: list[Row], colours: Mapping[str, str]) -> None:
    by_system: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if "batch_size" in row:
            point = (row["batch_size"], row["load"]["per_s"])
            by_system.setdefault(row["system"], []).append(point)

    for system, points in by_system.items():
        points.sort()
        sizes = [size for size, _ in points]
        per_s = [rate for _, rate in points]
        axes.plot(sizes, per_s, "o-", label=system, color=colours[system])

    sizes_all = sorted({size for points in by_system.values() for size, _ in points})
    if sizes_all[-1] >= BATCH_AXIS_LOG_RATIO * max(sizes_all[0], 1):
        axes.set_xscale("log")
    axes.set_xticks(sizes_all, [str(size) for size in sizes_all])
    axes.set_xlabel("batch size")
    axes.set_ylabel("operations per second")
    axes.legend(fontsize="small")
    axes.grid(which="both", alpha=0.3)
