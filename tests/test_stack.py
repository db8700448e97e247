"""`python -m server.stack`, the launcher behind `make run`, with every part real.

Each test runs the launcher as a subprocess on free loopback ports with a fresh schema
and its own run directory, so it never meets a `make run` going on at the same time.
"""

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import sys
import time
from asyncio import FIRST_COMPLETED
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import aiohttp
import grpc
import pytest

from server import stack
from stockward.v1 import inventory_pb2, inventory_pb2_grpc
from tests.conftest import DATABASE_URL

# Four interpreters import grpc and asyncpg side by side before the demo is up; a few
# seconds on a laptop, so two minutes only trips on a launcher that is truly stuck.
READY_WAIT_S = 120.0
# The bridge sends a batch within half a second of a change; the rest is slack for a
# loaded machine.
LEDGER_WAIT_S = 30.0
# The launcher's own worst case: every part used up its stop budget and was killed.
EXIT_WAIT_S = len(stack.START_ORDER) * (stack.STOP_WAIT_S + stack.KILL_WAIT_S) + 10.0
# The guard's worst case after the launcher is killed: its wait, then SIGKILL.
GUARD_WAIT_S = stack.STOP_WAIT_S + stack.KILL_WAIT_S + 10.0
# Pause between looks at the ERP's ledger or at the process table.
POLL_INTERVAL_S = 0.1
RPC_TIMEOUT_S = 10.0
REDIS_URL = os.environ.get("STOCKWARD_REDIS_URL", "redis://127.0.0.1:6379/0")
READY_LINE = "stack ready:"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclasses.dataclass
class Launcher:
    process: asyncio.subprocess.Process
    run_dir: Path
    server_listen: str
    simulator_listen: str
    output: list[str]
    ready: asyncio.Event

    def pids(self) -> dict[str, int]:
        """Every running part's pid, and the guard's, from the launcher's pid files."""
        return {path.stem: int(path.read_text()) for path in self.run_dir.glob("*.pid")}

    def text(self) -> str:
        return "".join(self.output)

    async def exit_code(self) -> int:
        async with asyncio.timeout(EXIT_WAIT_S):
            return await self.process.wait()


async def read_output(launcher: Launcher) -> None:
    assert launcher.process.stdout is not None
    async for raw in launcher.process.stdout:
        line = raw.decode(errors="replace")
        launcher.output.append(line)
        if READY_LINE in line:
            launcher.ready.set()


@contextlib.asynccontextmanager
async def launched(
    schema: str, tmp_path: Path, *, redis_url: str
) -> AsyncIterator[Launcher]:
    """A launcher that is up; killed on the way out if the test left it running."""
    server_listen = f"127.0.0.1:{free_port()}"
    simulator_listen = f"127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server.stack",
        "--database-schema",
        schema,
        "--server-listen",
        server_listen,
        "--simulator-listen",
        simulator_listen,
        "--bridge-admin-listen",
        f"127.0.0.1:{free_port()}",
        "--bridge-metrics-listen",
        f"127.0.0.1:{free_port()}",
        "--redis-url",
        redis_url,
        "--redis-dir",
        str(tmp_path / "redis"),
        "--run-dir",
        str(run_dir),
        env={**os.environ, "STOCKWARD_DATABASE_URL": DATABASE_URL},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    launcher = Launcher(
        process, run_dir, server_listen, simulator_listen, [], asyncio.Event()
    )
    reader = asyncio.create_task(read_output(launcher))
    try:
        exited = asyncio.create_task(process.wait())
        ready = asyncio.create_task(launcher.ready.wait())
        try:
            async with asyncio.timeout(READY_WAIT_S):
                await asyncio.wait({exited, ready}, return_when=FIRST_COMPLETED)
        finally:
            ready.cancel()
        assert launcher.ready.is_set(), f"launcher did not come up:\n{launcher.text()}"
        yield launcher
    finally:
        if process.returncode is None:
            # The guard then stops the parts, as it would after any crash.
            process.kill()
            await process.wait()
            await wait_gone(launcher.pids().values())
        # The guard shares the launcher's output, so the pipe ends when it exits too.
        async with asyncio.timeout(GUARD_WAIT_S):
            await reader


async def wait_gone(pids: Iterable[int]) -> list[int]:
    """Wait until none of `pids` runs, within GUARD_WAIT_S; those still running."""
    alive = [pid for pid in pids if stack.is_running(pid)]
    deadline_s = time.monotonic() + GUARD_WAIT_S
    while alive and time.monotonic() < deadline_s:
        await asyncio.sleep(POLL_INTERVAL_S)
        alive = [pid for pid in alive if stack.is_running(pid)]
    return alive


async def reserve_sneakers(server_listen: str, *, quantity: int) -> None:
    async with grpc.aio.insecure_channel(server_listen) as channel:
        inventory = inventory_pb2_grpc.InventoryServiceStub(channel)
        answer = await inventory.Reserve(
            inventory_pb2.ReserveRequest(
                request_id="stack-test-1",
                channel="web",
                lines=[
                    inventory_pb2.ReserveLine(
                        sku="SNEAKER-42", quantity=quantity, location="DC-EAST"
                    )
                ],
            ),
            timeout=RPC_TIMEOUT_S,
        )
    assert answer.outcome == inventory_pb2.RESERVE_OUTCOME_RESERVED
    assert answer.lines[0].quantity_held == quantity


async def wait_for_held(simulator_listen: str, *, held: int) -> None:
    """Until the ERP's ledger shows `held` sneakers held at DC-EAST."""
    url = f"http://{simulator_listen}/v1/ledger"
    timeout = aiohttp.ClientTimeout(total=RPC_TIMEOUT_S)
    seen: object = None
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        asyncio.timeout(LEDGER_WAIT_S),
    ):
        while True:
            async with session.get(url) as response:
                assert response.status == 200
                ledger = await response.json()
            seen = [
                p["held"]
                for p in ledger["positions"]
                if (p["sku"], p["location"]) == ("SNEAKER-42", "DC-EAST")
            ]
            if seen == [held]:
                return
            await asyncio.sleep(POLL_INTERVAL_S)


@pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs redis-server installed"
)
async def test_demo_feeds_a_reservation_to_the_erp_and_stops_every_part_on_sigterm(
    schema: str, tmp_path: Path
) -> None:
    # A port where no Redis answers, as on a fresh machine: the launcher starts one.
    redis_url = f"redis://127.0.0.1:{free_port()}/0"
    async with launched(schema, tmp_path, redis_url=redis_url) as launcher:
        pids = launcher.pids()
        assert set(pids) == {"guard", "redis", "erp-simulator", "server", "erp-bridge"}

        await reserve_sneakers(launcher.server_listen, quantity=2)
        await wait_for_held(launcher.simulator_listen, held=2)

        launcher.process.send_signal(signal.SIGTERM)
        code = await launcher.exit_code()

    assert code == 0, launcher.text()
    assert [pid for pid in pids.values() if stack.is_running(pid)] == []
    assert launcher.pids() == {}


async def test_a_part_that_dies_stops_the_rest_and_fails_the_launcher(
    schema: str, tmp_path: Path
) -> None:
    async with launched(schema, tmp_path, redis_url=REDIS_URL) as launcher:
        pids = launcher.pids()

        os.kill(pids["erp-simulator"], signal.SIGKILL)
        code = await launcher.exit_code()

    assert code == 1, launcher.text()
    assert "part exited unexpectedly" in launcher.text()
    assert "part=erp-simulator" in launcher.text()
    assert [pid for pid in pids.values() if stack.is_running(pid)] == []


async def test_killing_the_launcher_outright_leaves_no_part_running(
    schema: str, tmp_path: Path
) -> None:
    async with launched(schema, tmp_path, redis_url=REDIS_URL) as launcher:
        pids = launcher.pids()

        launcher.process.kill()
        await launcher.exit_code()

        assert await wait_gone(pids.values()) == []
