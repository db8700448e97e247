"""The processes a benchmark run measures: stockward and its baselines, each a child
process serving gRPC on loopback, started and stopped by this run, by pid.

Each child logs to a file under the results folder (a pipe nobody reads would fill
and stall it). Redis, needed by one baseline, is used where it already answers;
otherwise a private redis-server is started on a free port for the run, if one is
installed, and the baseline is left out (and the report says so) if none is.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import pathlib
import signal
import socket
import sys
import time
from collections.abc import Sequence

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server import devenv

log = logging.getLogger(__name__)

# Start-up imports grpc and asyncpg and, for stockward, recovers a million holds.
SERVING_WAIT_S = 120.0
# SIGTERM lets stockward drain and checkpoint; a baseline stops at once.
EXIT_WAIT_S = 60.0
REDIS_START_WAIT_S = 10.0
LOG_TAIL_CHARS = 2_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclasses.dataclass
class Service:
    """One child process serving gRPC at `address`."""

    name: str
    argv: Sequence[str]
    log_path: pathlib.Path
    port: int = dataclasses.field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None
    # From spawning the process to health SERVING, for the latest start.
    started_to_serving_s: float = 0.0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} is not running"
        return self.process.pid

    async def start(self) -> None:
        argv = [arg.replace("{address}", self.address) for arg in self.argv]
        started = time.monotonic()
        with self.log_path.open("ab") as sink:
            self.process = await asyncio.create_subprocess_exec(
                *argv, stdout=sink, stderr=sink, start_new_session=True
            )
        log.info("service started: name=%s pid=%d", self.name, self.process.pid)
        try:
            await self.wait_serving()
        except BaseException:
            if self.is_running:
                await self.kill_and_wait()
            raise
        self.started_to_serving_s = time.monotonic() - started

    async def wait_serving(self, timeout_s: float = SERVING_WAIT_S) -> float:
        """Seconds until health says SERVING."""
        started = time.monotonic()
        async with (
            asyncio.timeout(timeout_s),
            grpc.aio.insecure_channel(self.address) as channel,
        ):
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive()
                with contextlib.suppress(grpc.aio.AioRpcError):
                    answer = await health.Check(
                        health_pb2.HealthCheckRequest(), timeout=1.0
                    )
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - started
                await asyncio.sleep(0.05)

    @property
    def is_running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def log_tail(self) -> str:
        """The end of its log: enough to show a traceback."""
        return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]

    def _check_alive(self) -> None:
        if self.process is not None and self.process.returncode is not None:
            raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")

    async def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; its exit code."""
        if self.process is None:
            return 0
        if self.process.returncode is not None:
            return self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(EXIT_WAIT_S):
                code = await self.process.wait()
        except TimeoutError:
            log.warning("service stuck, killing: name=%s pid=%d", self.name, self.pid)
            self.process.kill()
            code = await self.process.wait()
        log.info("service stopped: name=%s code=%d", self.name, code)
        return code

    async def kill_and_wait(self) -> None:
        """SIGKILL: no drain, no checkpoint, as a crash would leave it."""
        assert self.process is not None
        self.process.kill()
        await self.process.wait()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def stockward(
    log_dir: pathlib.Path, *, database_url: str, schema: str, shards: int
) -> Service:
    argv = python_module(
        "server",
        "--listen",
        "{address}",
        "--database-url",
        database_url,
        "--database-schema",
        schema,
        "--shards",
        str(shards),
    )
    return Service("stockward", argv, log_dir / "stockward.log")


async def drop_schema(database_url: str, schema: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await connection.close()


async def write_ahead_commits(database_url: str, schema: str) -> tuple[int, int]:
    """(records, transactions) in stockward's write-ahead table: every row carries
    the id of the transaction that wrote it (xmin), and rows are never updated."""
    connection = await asyncpg.connect(database_url)
    try:
        row = await connection.fetchrow(
            f"SELECT count(*) AS records, count(DISTINCT xmin::text) AS commits "
            f'FROM "{schema}".wal_records'
        )
    finally:
        await connection.close()
    assert row is not None
    return int(row["records"]), int(row["commits"])


@dataclasses.dataclass
class RedisHandle:
    url: str
    # Set when this run started its own redis-server.
    process: asyncio.subprocess.Process | None = None

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


async def ensure_redis(url: str, data_dir: pathlib.Path) -> RedisHandle | None:
    """A Redis to measure against: the one at `url` if it answers, else a private
    one (working in `data_dir`, which must exist); None when there is none and none
    can be started."""
    if await devenv.redis_answers(url):
        return RedisHandle(url)
    port = free_port()
    try:
        process = await devenv.start_private_redis(
            port=port,
            data_dir=data_dir,
            deadline=devenv.Deadline.after(REDIS_START_WAIT_S),
        )
    except devenv.DevenvError as err:
        log.warning("redis unavailable: url=%s reason=%s", url, err)
        return None
    log.info("redis started: port=%d pid=%d", port, process.pid)
    return RedisHandle(f"redis://127.0.0.1:{port}/0", process)


def cpu_count() -> int:
    return os.cpu_count() or 1


def add_run_arguments(parser: argparse.ArgumentParser, *, quick_help: str) -> None:
    """The options every benchmark runner takes: size, output folder, where Postgres
    and Redis are (the same variables as the service), and the server's shards."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument(
        "--database-url",
        default=os.environ.get(devenv.DATABASE_URL_ENV, devenv.DEFAULT_DATABASE_URL),
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get(devenv.REDIS_URL_ENV, devenv.DEFAULT_REDIS_URL),
    )
    parser.add_argument("--shards", type=int, default=4)
