"""`python -m benchmarks.bridge` end to end, at its smallest sizes: it starts stockward,
the ERP simulator and the bridge for each measurement, writes every figure with its
estimate into the report, and leaves no schema or quota key behind. Whether a figure
meets its target is the report's business, not this test's."""

import asyncio
import json
import os
import pathlib
import subprocess
import sys

import asyncpg
import redis.asyncio as redis

from benchmarks.report import ExpectedFigure
from server.devenv import DEFAULT_REDIS_URL, REDIS_URL_ENV
from tests.conftest import DATABASE_URL

# The smoke run takes about 15 s here; a hung service must not hang the suite.
RUN_TIMEOUT_S = 120
REDIS_URL = os.environ.get(REDIS_URL_ENV, DEFAULT_REDIS_URL)


def test_smoke_run_reports_every_figure_against_its_estimate_and_cleans_up(
    tmp_path: pathlib.Path,
) -> None:
    env = {**os.environ, "GRPC_VERBOSITY": "ERROR"}
    command = [sys.executable, "-m", "benchmarks.bridge", "--smoke"]
    command += ["--out", str(tmp_path), "--database-url", DATABASE_URL]
    command += ["--redis-url", REDIS_URL]
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as run:
        stdout, stderr = run.communicate(timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, stderr[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    names = [scenario["name"] for scenario in results["scenarios"]]
    assert names == [
        "ERP bridge: backlog",
        "ERP bridge: lag under the limit",
        "ERP bridge: netting in a flash sale",
    ]
    for scenario in results["scenarios"]:
        assert scenario["figures"], scenario["name"]
        for figure in scenario["figures"]:
            assert set(figure) == ExpectedFigure.__required_keys__
            assert figure["estimate"] and figure["verdict"]
    netting = results["scenarios"][2]["rows"][0]["checks"]
    equal = [check for check in netting if "ERP positions equal" in check["text"]]
    assert len(equal) == 1 and equal[0]["passed"], equal
    assert len(results["targets"]) == 3
    report = (tmp_path / "report.md").read_text()
    for target in results["targets"]:
        assert target["name"] in report
    assert "How it was estimated" in report
    assert "report:" in stdout

    assert asyncio.run(_left_behind(run.pid)) == ([], [])


async def _left_behind(pid: int) -> tuple[list[str], list[bytes]]:
    """The schemas and quota keys of the run with this pid that still exist."""
    connection = await asyncpg.connect(DATABASE_URL)
    try:
        rows = await connection.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1",
            f"bench_br_{pid}_%",
        )
    finally:
        await connection.close()
    client = redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"*bench-erp-{pid}-*")]
    finally:
        await client.aclose()
    return [row["nspname"] for row in rows], keys
