"""The report: markdown, charts and results.json from a synthetic results structure."""

import datetime
import json
import re
from pathlib import Path

import pytest

from benchmarks.load import LoadFigures, LoadResult, new_latency_histogram
from benchmarks.report import (
    Check,
    Results,
    Row,
    collect_metadata,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_figures(
    name: str,
    *,
    per_s: float,
    latencies_ms: list[float],
    outcomes: dict[str, int],
    rate_per_s: float | None = None,
) -> LoadFigures:
    histogram = new_latency_histogram()
    for latency_ms in latencies_ms:
        histogram.record_value(round(latency_ms * 1_000))
    completed = sum(outcomes.values())
    result = LoadResult(
        name=name,
        mode="closed" if rate_per_s is None else "open",
        completed=completed,
        outcomes=outcomes,
        elapsed_s=completed / per_s,
        latency_us=histogram,
        target_rate_per_s=rate_per_s,
        late_starts=0 if rate_per_s is None else 12,
        concurrency=64,
    )
    return result.to_json()


def row(
    system: str,
    variant: str,
    *,
    per_s: float,
    p99_ms: float,
    checks: list[Check],
    batch_size: int | None = None,
    rate_per_s: float | None = None,
) -> Row:
    latencies_ms = [p99_ms / 10] * 98 + [p99_ms, p99_ms * 2]
    built = Row(
        system=system,
        variant=variant,
        load=load_figures(
            f"{system} {variant}",
            per_s=per_s,
            latencies_ms=latencies_ms,
            outcomes={"reserved": 90, "rejected": 10},
            rate_per_s=rate_per_s,
        ),
        cpu_s_per_1k_reservations={"server": 0.42, "postgres": 0.18},
        peak_rss_bytes={"server": 180 * 1024**2, "postgres": 95 * 1024**2},
        reservations_per_commit=None if system != "stockward" else 38.5,
        checks=checks,
    )
    if batch_size is not None:
        built["batch_size"] = batch_size
    return built


def synthetic_results() -> Results:
    exact = Check(text="units held 500 of 500: exact", passed=True)
    oversold = Check(text="units held 503 of 500: oversold by 3", passed=False)
    batches = [1, 10, 100]
    return Results(
        metadata=collect_metadata(
            mode="quick", now=datetime.datetime(2026, 5, 1, 12, 0, tzinfo=datetime.UTC)
        ),
        systems=[
            {"name": "stockward", "description": "this service, over gRPC"},
            {
                "name": "naive-pg",
                "description": "one Postgres row lock per reservation",
            },
        ],
        scenarios=[
            {
                "name": "Flash sale",
                "description": "5,000 buyers race for 500 units of one SKU.",
                "rows": [
                    row(
                        "stockward",
                        "single calls",
                        per_s=9_000,
                        p99_ms=4,
                        checks=[exact],
                    ),
                    row("stockward", "auto-batched", per_s=21_000, p99_ms=3, checks=[]),
                    row("naive-pg", "single calls", per_s=1_800, p99_ms=40, checks=[]),
                    row(
                        "redis-lua",
                        "open loop",
                        per_s=4_000,
                        p99_ms=2,
                        checks=[oversold],
                        rate_per_s=4_000,
                    ),
                ],
            },
            {
                "name": "Bulk import",
                "description": "ERP loads a catalogue through ExecuteBatch.",
                "rows": [
                    row(
                        system,
                        f"ExecuteBatch size {size}",
                        per_s=per_s * size**0.5,
                        p99_ms=size / 2,
                        checks=[],
                        batch_size=size,
                    )
                    for system, per_s in (("stockward", 5_000.0), ("naive-pg", 900.0))
                    for size in batches
                ],
            },
        ],
        targets=[
            {
                "name": "flash sale throughput",
                "description": "stockward single calls over naive-pg",
                "measured_ratio": 5.0,
                "target_ratio": 3.0,
                "met": True,
                "detail": "9,000/s against 1,800/s",
            },
            {
                "name": "flash sale p99",
                "description": "naive-pg p99 over stockward p99",
                "measured_ratio": 1.5,
                "target_ratio": 2.0,
                "met": False,
                "detail": "p99 4 ms against 6 ms",
            },
        ],
        notes=["Quick mode: durations are a tenth of a full run."],
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Results, Path]:
    """One report from the synthetic results, shared because charts take a second."""
    results = synthetic_results()
    report = write_report(results, tmp_path_factory.mktemp("report"))
    return results, report


def test_report_shows_every_scenario_system_and_target(
    written: tuple[Results, Path],
) -> None:
    results, report = written

    text = report.read_text()

    assert report.name == "report.md"
    for scenario in results["scenarios"]:
        assert f"## Scenario: {scenario['name']}" in text
        for measured in scenario["rows"]:
            assert f"| {measured['system']} | {measured['variant']} |" in text
    assert "**redis-lua**" in text
    assert line_with("flash sale throughput", text).count("**MET**") == 1
    assert line_with("flash sale p99", text).count("**MISSED**") == 1
    assert "**1 of 2 met**" in text
    assert "**FAIL**: units held 503 of 500: oversold by 3" in text
    assert "PASS: units held 500 of 500: exact" in text
    assert "Quick mode: durations are a tenth of a full run." in text
    # The auto-batched row is compared with the first row of its scenario.
    assert "| 2.33x |" in text


def test_report_charts_are_png_files_referenced_by_relative_path(
    written: tuple[Results, Path],
) -> None:
    _, report = written

    paths = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())

    # Throughput and latency for both scenarios, batch size for the one that varies it.
    assert len(paths) == 5
    assert sum("batch" in path for path in paths) == 1
    for path in paths:
        assert not Path(path).is_absolute()
        assert (report.parent / path).read_bytes()[:8] == PNG_SIGNATURE


def test_results_json_holds_the_input_and_renders_again(
    written: tuple[Results, Path], tmp_path: Path
) -> None:
    results, report = written

    saved = json.loads((report.parent / "results.json").read_text())
    assert saved == results

    again = write_report(saved, tmp_path)
    assert again.read_text() == report.read_text()


def test_report_names_a_missing_field(tmp_path: Path) -> None:
    results = synthetic_results()
    del results["scenarios"][1]["rows"][2]["load"]["p99_ms"]  # type: ignore[misc]

    with pytest.raises(
        ValueError, match=r"scenarios\[1\]\.rows\[2\]\.load: missing p99_ms"
    ):
        write_report(results, tmp_path)


def line_with(needle: str, text: str) -> str:
    [line] = [line for line in text.splitlines() if line.startswith(f"| {needle} |")]
    return line
