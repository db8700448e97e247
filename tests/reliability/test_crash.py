"""Crash tests: a real server process, killed under load, must keep every promise.

The server runs as a child process on its own schema. Fifty clients send seeded random
reservation and stock commands and record every answer they get. The test kills the
server with SIGKILL at random points of the load (in answers received, so a slow
machine sees the same kill points as a fast one), starts it again on the same schema
and port, and lets the clients retry what was cut off. A final kill and restart later,
the audit holds the server to every acknowledged answer. A second test does the same
with SIGTERM, which must drain and exit 0 without losing anything it answered.

Replay a run with STOCKWARD_TEST_SEED=<seed printed by the failing run>.
"""

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import random
import secrets
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from stockward.v1 import admin_pb2, admin_pb2_grpc
from tests.conftest import DATABASE_URL
from tests.reliability.acknowledgements import Acknowledgements, At
from tests.reliability.audit import Auditor
from tests.reliability.load import Catalogue, Client, Gate
from tests.reliability.server_process import CHANNEL_OPTIONS, ServerProcess, free_port

pytestmark = pytest.mark.reliability

CATALOGUE = Catalogue(
    skus=tuple(f"SKU-{n:02d}" for n in range(20)),
    locations=("DC-EAST", "STORE-01"),
)
SEED_ON_HAND = 40
CLIENTS = 50
# A bound on each client's commands; the test normally stops them much earlier.
COMMANDS_PER_CLIENT_MAX = 2_000
# Kills under load, each after a random number of further answers.
KILLS = 5
ANSWERS_BETWEEN_KILLS = (500, 2_500)
# Load after the last restart, so that retries of cut-off commands are answered.
ANSWERS_AFTER_LAST_RESTART = 500
# A server that stops answering must still be killed: each wait for answers ends
# after this long.
ANSWERS_WAIT_MAX_S = 5.0
# The whole load phase; a run that takes longer is stuck, not slow.
LOAD_TIME_MAX_S = 90.0
SERVER_ARGS = (
    "--shards",
    "4",
    # Checkpoints every second or so, so that kills land before, during and after them.
    "--checkpoint-interval-s",
    "1",
    "--checkpoint-records-min",
    "200",
    "--shutdown-grace-s",
    "5",
)
# SIGTERM: grace for in-flight RPCs, then drain and a checkpoint.
TERMINATE_EXIT_WAIT_S = 20.0
# Enough lines of a failure to see its pattern without flooding the report.
FAILURE_LINES_MAX = 60
LOG_TAIL_ON_HANG_CHARS = 1_500


@dataclasses.dataclass(slots=True)
class RunReport:
    seed: int
    kills: int = 0
    terminations: int = 0
    exit_codes: list[int] = dataclasses.field(default_factory=list)
    restart_s: list[float] = dataclasses.field(default_factory=list)
    log_tail: str = ""

    def describe(self, acks: Acknowledgements) -> str:
        counts = ", ".join(f"{kind}={n}" for kind, n in sorted(acks.counts.items()))
        slowest_s = max(self.restart_s, default=0.0)
        return (
            f"seed={self.seed} kills={self.kills} terminations={self.terminations} "
            f"exit_codes={self.exit_codes} reservations={len(acks.reservations)} "
            f"answers={acks.answers} slowest_restart_s={slowest_s:.2f} [{counts}]"
        )


def seed_for_run() -> int:
    seed = int(os.environ.get("STOCKWARD_TEST_SEED", secrets.randbits(32)))
    print(f"STOCKWARD_TEST_SEED={seed}")
    return seed


@pytest.fixture
async def server(schema: str, tmp_path: pathlib.Path) -> AsyncIterator[ServerProcess]:
    process = ServerProcess(
        database_url=DATABASE_URL,
        schema=schema,
        port=free_port(),
        log_path=tmp_path / "server.log",
        extra_args=SERVER_ARGS,
    )
    await process.start()
    await process.wait_serving()
    yield process
    await process.close()


async def seed_stock(channel: grpc.aio.Channel) -> Acknowledgements:
    admin = admin_pb2_grpc.StockAdminServiceStub(channel)
    counts = [
        admin_pb2.OnHandCount(sku=sku, location=location, on_hand=SEED_ON_HAND)
        for sku, location in CATALOGUE.positions
    ]
    await admin.SetOnHand(
        admin_pb2.SetOnHandRequest(source="erp", source_event_id="seed", counts=counts),
        timeout=10.0,
    )
    seeded: dict[At, int] = dict.fromkeys(CATALOGUE.positions, SEED_ON_HAND)
    return Acknowledgements(seed_on_hand=seeded)


def failure(report: RunReport, acks: Acknowledgements, broken: list[str]) -> str:
    shown = broken[:FAILURE_LINES_MAX]
    more = len(broken) - len(shown)
    tail = [f"... and {more} more"] if more else []
    return "\n".join([report.describe(acks), f"{len(broken)} broken:", *shown, *tail])


async def more_answers(acks: Acknowledgements, count: int) -> None:
    """Until the clients got `count` more answers, or ANSWERS_WAIT_MAX_S passed."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(ANSWERS_WAIT_MAX_S):
            await acks.wait_for_answers(acks.answers + count)


async def restart(server: ServerProcess, report: RunReport) -> None:
    started = time.perf_counter()
    await server.start()
    await server.wait_serving()
    report.restart_s.append(time.perf_counter() - started)


async def kill_and_restart(
    server: ServerProcess, gate: Gate, report: RunReport
) -> None:
    gate.close()
    # A server that already exited on its own shows up as an exit code other than -9.
    if server.is_running:
        server.kill()
    report.exit_codes.append(await server.wait_exit())
    report.kills += 1
    await restart(server, report)
    gate.open()


async def terminate_and_restart(
    server: ServerProcess, gate: Gate, report: RunReport
) -> None:
    gate.close()
    if server.is_running:
        server.terminate()
    report.terminations += 1
    try:
        report.exit_codes.append(
            await server.wait_exit(timeout_s=TERMINATE_EXIT_WAIT_S)
        )
    except TimeoutError:
        # Recorded as no exit code; the log tail in the failure shows where it hung.
        report.log_tail = server.log_tail()[-LOG_TAIL_ON_HANG_CHARS:]
        server.kill()
        await server.wait_exit()
    await restart(server, report)
    gate.open()


async def run_load(
    *,
    channel: grpc.aio.Channel,
    acks: Acknowledgements,
    seed: int,
    disrupt: asyncio.Task[None],
    gate: Gate,
    stop: asyncio.Event,
) -> None:
    clients = [
        Client(
            index=index,
            seed=seed,
            channel=channel,
            acks=acks,
            gate=gate,
            stop=stop,
            catalogue=CATALOGUE,
        )
        for index in range(CLIENTS)
    ]
    tasks = [
        asyncio.create_task(client.run(commands_max=COMMANDS_PER_CLIENT_MAX))
        for client in clients
    ]
    try:
        async with asyncio.timeout(LOAD_TIME_MAX_S):
            # Gathered together so that a client that fails stops the test at once.
            await asyncio.gather(disrupt, *tasks)
    finally:
        for task in [*tasks, disrupt]:
            task.cancel()
        await asyncio.gather(*tasks, disrupt, return_exceptions=True)


async def audit(channel: grpc.aio.Channel, acks: Acknowledgements) -> list[str]:
    return await Auditor(channel=channel, acks=acks, catalogue=CATALOGUE).audit()


async def test_acknowledged_state_survives_sigkill_under_load(
    server: ServerProcess,
) -> None:
    seed = seed_for_run()
    rng = random.Random(seed)
    report = RunReport(seed)
    gate = Gate()
    stop = asyncio.Event()

    async def kill_repeatedly() -> None:
        for _ in range(KILLS):
            await more_answers(acks, rng.randint(*ANSWERS_BETWEEN_KILLS))
            await kill_and_restart(server, gate, report)
        await more_answers(acks, ANSWERS_AFTER_LAST_RESTART)
        stop.set()

    async with grpc.aio.insecure_channel(
        server.address, options=CHANNEL_OPTIONS
    ) as channel:
        acks = await seed_stock(channel)
        started = time.perf_counter()
        await run_load(
            channel=channel,
            acks=acks,
            seed=seed,
            disrupt=asyncio.create_task(kill_repeatedly()),
            gate=gate,
            stop=stop,
        )
        load_s = time.perf_counter() - started
        # One more crash with nothing in flight, then judge the restarted server.
        await kill_and_restart(server, gate, report)
        problems = await audit(channel, acks)

    print(f"{report.describe(acks)} load_s={load_s:.1f}")
    assert report.kills >= KILLS, report.describe(acks)
    assert all(code == -9 for code in report.exit_codes), report.describe(acks)
    broken = acks.violations + problems
    assert not broken, failure(report, acks, broken)


async def test_sigterm_under_load_exits_zero_and_keeps_every_answer(
    server: ServerProcess,
) -> None:
    seed = seed_for_run()
    rng = random.Random(seed)
    report = RunReport(seed)
    gate = Gate()
    stop = asyncio.Event()

    async def terminate_once() -> None:
        await more_answers(acks, rng.randint(*ANSWERS_BETWEEN_KILLS))
        await terminate_and_restart(server, gate, report)
        await more_answers(acks, ANSWERS_AFTER_LAST_RESTART)
        stop.set()

    async with grpc.aio.insecure_channel(
        server.address, options=CHANNEL_OPTIONS
    ) as channel:
        acks = await seed_stock(channel)
        await run_load(
            channel=channel,
            acks=acks,
            seed=seed,
            disrupt=asyncio.create_task(terminate_once()),
            gate=gate,
            stop=stop,
        )
        problems = await audit(channel, acks)

    print(report.describe(acks))
    broken = acks.violations + problems
    if report.exit_codes != [0]:
        broken.insert(
            0, f"SIGTERM did not end in exit 0; server log:\n{report.log_tail}"
        )
    assert not broken, failure(report, acks, broken)
