"""`python -m benchmarks` end to end, at its smallest sizes: it starts every system,
runs every scenario, checks what each system holds, stops what it started and writes
the report."""

import asyncio
import json
import os
import pathlib
import subprocess
import sys

import asyncpg

from tests.conftest import DATABASE_URL

# The smoke run takes about 25 s here; a hung service must not hang the suite.
RUN_TIMEOUT_S = 240


def test_smoke_run_reports_every_scenario_and_cleans_up(
    tmp_path: pathlib.Path,
) -> None:
    env = {**os.environ, "GRPC_VERBOSITY": "ERROR"}
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--smoke",
            "--no-progress",
            "--out",
            str(tmp_path),
            "--database-url",
            DATABASE_URL,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as runner:
        stdout, stderr = runner.communicate(timeout=RUN_TIMEOUT_S)
    assert runner.returncode == 0, stderr[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    names = [scenario["name"] for scenario in results["scenarios"]]
    assert names == [
        "Flash sale",
        "Latency at half of peak",
        "Catalogue",
        "Batch path",
        "Recovery",
    ]
    flash_systems = {row["system"] for row in results["scenarios"][0]["rows"]}
    assert {"stockward", "naive-postgres", "noop-grpc"} <= flash_systems
    failed = [
        (row["system"], row["variant"], check["text"])
        for scenario in results["scenarios"]
        for row in scenario["rows"]
        for check in row["checks"]
        if not check["passed"]
    ]
    assert failed == []
    assert len(results["targets"]) == 5
    report = (tmp_path / "report.md").read_text()
    for target in results["targets"]:
        assert target["name"] in report
    assert "report:" in stdout

    # Only this run's schemas, tagged with its pid: other benchmark runs on the same
    # database may hold theirs for now.
    assert asyncio.run(_bench_schemas(runner.pid)) == []


async def _bench_schemas(pid: int) -> list[str]:
    """Schemas left by the runner with this pid (`bench_<kind>_<pid>[_<tag>]`)."""
    connection = await asyncpg.connect(DATABASE_URL)
    try:
        rows = await connection.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench%'"
        )
    finally:
        await connection.close()
    names = [row["nspname"] for row in rows]
    return [name for name in names if name.split("_")[2:3] == [str(pid)]]
