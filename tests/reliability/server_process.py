"""A stockward server run as a child process, so that a test can kill it for real.

The child is `python -m server` from this interpreter, on loopback, with its own schema.
Its output goes to a log file (a pipe nobody reads would fill and stall the server), and
a failing test quotes the end of that file.
"""

import asyncio
import os
import pathlib
import random
import signal
import socket
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# Start-up imports grpc and asyncpg, connects and recovers: seconds on a slow machine.
SERVING_WAIT_S = 30.0
# SIGTERM lets in-flight RPCs finish (shutdown_grace_s), drains and checkpoints.
EXIT_WAIT_S = 30.0
# Enough of the log to show a traceback without flooding the report.
LOG_TAIL_CHARS = 4_000

# A killed server comes back within about a second; the default reconnect backoff
# (1 s growing to 120 s) would leave clients idle long after it is back.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
]


# Linux publishes its ephemeral port range here; IANA's range starts at 49152.
EPHEMERAL_RANGE_PATH = pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range")
EPHEMERAL_FIRST_DEFAULT = 49_152
# Registered ports well above the well-known ones, and tries before giving up.
PORT_RANGE_FIRST = 20_000
PORT_TRIES_MAX = 100


def free_port() -> int:
    """A loopback port nobody listens on now, below the kernel's ephemeral range.

    The server is restarted on the same port. A port from the ephemeral range could be
    taken while it is down: by another process binding port 0, or by one of our own
    clients reconnecting, whose socket can be given that very port and so connect to
    itself (a TCP self-connect), leaving the restarted server unable to listen.
    """
    first_ephemeral = _first_ephemeral_port()
    rng = random.SystemRandom()
    for _ in range(PORT_TRIES_MAX):
        port = rng.randrange(PORT_RANGE_FIRST, first_ephemeral)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free loopback port below {first_ephemeral}")


def _first_ephemeral_port() -> int:
    try:
        text = EPHEMERAL_RANGE_PATH.read_text()
    except OSError:
        return EPHEMERAL_FIRST_DEFAULT
    return int(text.split()[0])


class ChildProcess:
    """`python <args>` run again and again as a child, its output appended to one log
    file with a marker per start."""

    def __init__(self, args: tuple[str, ...], *, log_path: pathlib.Path) -> None:
        self.starts = 0
        self._args = args
        self._log_path = log_path
        self._child: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self._child is not None, "start() first"
        return self._child.pid

    async def start(self) -> None:
        assert self._child is None or self._child.returncode is not None
        with self._log_path.open("ab") as log:
            log.write(f"--- start {self.starts + 1}\n".encode())
            log.flush()
            self._child = await asyncio.create_subprocess_exec(
                sys.executable,
                *self._args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=os.environ.copy(),
            )
        self.starts += 1

    @property
    def is_running(self) -> bool:
        return self._child is not None and self._child.returncode is None

    def kill(self) -> None:
        """SIGKILL: no drain, no checkpoint, whatever was in flight is cut off."""
        self._signal(signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM: the graceful shutdown path."""
        self._signal(signal.SIGTERM)

    def _signal(self, signum: signal.Signals) -> None:
        assert self._child is not None and self._child.returncode is None
        os.kill(self._child.pid, signum)

    async def wait_exit(self, *, timeout_s: float = EXIT_WAIT_S) -> int:
        assert self._child is not None, "start() first"
        async with asyncio.timeout(timeout_s):
            return await self._child.wait()

    async def close(self) -> None:
        """Kill the child if it still runs, and wait for it."""
        if self.is_running:
            self.kill()
            await self.wait_exit()

    def log_text(self) -> str:
        try:
            return self._log_path.read_text(errors="replace")
        except OSError as error:
            return f"<no log: {error}>"

    def log_tail(self) -> str:
        return self.log_text()[-LOG_TAIL_CHARS:]


class ServerProcess(ChildProcess):
    """One server address; each start() runs a new child on the same schema and port."""

    def __init__(
        self,
        *,
        database_url: str,
        schema: str,
        port: int,
        log_path: pathlib.Path,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.address = f"127.0.0.1:{port}"
        args = (
            "-m",
            "server",
            "--listen",
            self.address,
            "--database-url",
            database_url,
            "--database-schema",
            schema,
            *extra_args,
        )
        super().__init__(args, log_path=log_path)

    async def wait_serving(self, *, timeout_s: float = SERVING_WAIT_S) -> None:
        """Until health says SERVING; fails early, with the log, if the child exits."""
        assert self._child is not None, "start() first"
        watch = asyncio.create_task(self._watch_until_serving(timeout_s))
        exited = asyncio.create_task(self._child.wait())
        done, _ = await asyncio.wait(
            {watch, exited}, return_when=asyncio.FIRST_COMPLETED
        )
        for task in (watch, exited):
            if task not in done:
                task.cancel()
        if exited in done:
            raise AssertionError(
                f"server exited with {exited.result()} before SERVING:\n{self.log_tail()}"
            )
        try:
            watch.result()
        except (grpc.aio.AioRpcError, TimeoutError) as error:
            raise AssertionError(
                f"server not SERVING within {timeout_s}s ({error!r}):\n{self.log_tail()}"
            ) from error

    async def _watch_until_serving(self, timeout_s: float) -> None:
        async with (
            asyncio.timeout(timeout_s),
            grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS) as channel,
        ):
            stub = health_pb2_grpc.HealthStub(channel)
            # A stream can break while the server starts; the timeout bounds the tries.
            while True:
                stream = stub.Watch(
                    health_pb2.HealthCheckRequest(), wait_for_ready=True
                )
                try:
                    async for answer in stream:
                        if answer.status == health_pb2.HealthCheckResponse.SERVING:
                            stream.cancel()
                            return
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
