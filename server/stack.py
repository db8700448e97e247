"""`python -m server.stack`: the whole demo in one foreground command (`make run`).

`make run` brings Postgres up (server/devenv.py) and then runs this launcher, which
starts the other parts in START_ORDER: Redis for the ERP bridge's shared quota (the one
at the URL if it answers, else a private redis-server), the ERP simulator, the
reservation server with the demo catalogue, and the ERP bridge feeding positions from
the server's write-ahead log to the simulator. Each part starts once the one before it
is ready (Redis answers PING, the simulator and the bridge accept connections, the
server's gRPC health says SERVING); then the launcher prints where everything listens
and waits. Each part logs to its own file under the run directory, next to a pid file.

Design note on stopping. SIGINT or SIGTERM stops the parts in reverse start order, so
nothing loses what it talks to while it is still working: each gets SIGTERM and
STOP_WAIT_S to exit, then SIGKILL. A second signal skips the waiting. If a part exits
on its own, the launcher names it, shows the end of its log, stops the rest and exits
with 1.

The launcher may itself be killed outright, and its parts must not outlive it.
PR_SET_PDEATHSIG could do that on Linux, but it fires when the thread that forked the
child ends rather than the process, and it needs a preexec_fn, which Python documents
as unsafe once threads run (asyncio's child watcher starts one per child). Instead a
small guard process starts first, as the leader of a new process group, and every part
joins that group. The guard reads a pipe, the lifeline, whose only write end the
launcher holds; the kernel closes it however the launcher ends. At end of file the
guard sends SIGTERM to the group, waits, then SIGKILL. After an orderly stop the parts
are already gone and the guard simply exits. The guard signals the group, never a pid
it was told, so a pid reused by an unrelated process cannot be hit. Its own group also
keeps a terminal's Ctrl-C, which goes to the foreground group, away from the parts, so
that the launcher can stop them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import signal
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server import devenv, logs
from server.flags import parse_settings

logger = logging.getLogger(__name__)
banner = logs.console(__name__ + ".banner")

ENV_PREFIX = "STOCKWARD_STACK_"
DATA_DIR = devenv.REPO_ROOT / ".data"

# The server with a fresh schema serves within two seconds; recovering a large demo
# schema, or waiting out a killed predecessor's session (Config.owner_wait_s, 15 s),
# still fits well inside a minute.
SERVING_WAIT_S = 60.0
# The simulator binds at once; the bridge first connects to Postgres and Redis. Both
# are up within a few seconds even while the other parts import at the same time.
LISTENING_WAIT_S = 30.0
# redis-server answers within milliseconds of starting.
REDIS_START_WAIT_S = 10.0
# The server gives in-flight requests Config.shutdown_grace_s (10 s) and then writes
# a checkpoint; the others stop in well under a second.
STOP_WAIT_S = 20.0
# After SIGKILL only an uninterruptible sleep in the kernel can delay the exit.
KILL_WAIT_S = 5.0
# One health or connect attempt: loopback answers in milliseconds.
PROBE_TIMEOUT_S = 1.0
# Pause between readiness probes, and between the guard's looks at its group: quick
# enough that start-up does not feel padded, slow enough not to spin.
POLL_INTERVAL_S = 0.1
# The end of a failed part's log that is shown: enough for a Python traceback.
LOG_TAIL_CHARS = 3_000


class Part(enum.Enum):
    REDIS = "redis"
    SIMULATOR = "erp-simulator"
    SERVER = "server"
    BRIDGE = "erp-bridge"


# Each part needs only those before it; stopping runs the list backwards.
START_ORDER = (Part.REDIS, Part.SIMULATOR, Part.SERVER, Part.BRIDGE)
GUARD_NAME = "guard"


class StackError(Exception):
    """A part could not be started; the message names it and says why."""


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """Where every part listens, in one place. Each field is a flag (--server-listen)
    and an environment variable (STOCKWARD_STACK_SERVER_LISTEN); flags win."""

    # Postgres, shared by the server and the bridge. Its variable is the one `make`
    # exports and `make services` makes usable: STOCKWARD_DATABASE_URL.
    database_url: str = devenv.DEFAULT_DATABASE_URL
    # The schema holding the server's tables and the bridge's cursor; tests use a
    # fresh one each.
    database_schema: str = "stockward"
    # host:port of the reservation server's gRPC.
    server_listen: str = "127.0.0.1:50051"
    # host:port of the ERP simulator; loopback only, it refuses anything else.
    simulator_listen: str = "127.0.0.1:8900"
    # host:port of the bridge's admin gRPC (python -m erp_bridge.cli) and metrics.
    bridge_admin_listen: str = "127.0.0.1:50061"
    bridge_metrics_listen: str = "127.0.0.1:9464"
    # Redis for the bridge's quota. When nothing answers there and the host is this
    # machine, a private redis-server is started on the URL's port.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The private Redis's working directory; it writes nothing there.
    redis_dir: Path = DATA_DIR / "redis"
    # Pid files and logs, one of each per part.
    run_dir: Path = DATA_DIR / "stack"

    def listen(self, part: Part) -> str:
        addresses = {
            Part.SIMULATOR: self.simulator_listen,
            Part.SERVER: self.server_listen,
            Part.BRIDGE: self.bridge_admin_listen,
        }
        return addresses[part]


def env_name(field: str) -> str:
    if field == "database_url":
        return devenv.DATABASE_URL_ENV
    return ENV_PREFIX + field.upper()


def load_config(argv: Sequence[str] | None, environ: Mapping[str, str]) -> StackConfig:
    config = parse_settings(
        StackConfig,
        argv,
        prog="python -m server.stack",
        description="Run the stockward demo: Redis, ERP simulator, server, ERP bridge.",
        env_name=env_name,
        environ=environ,
    )
    validate(config)
    return config


def validate(config: StackConfig) -> None:
    if not config.database_schema.isidentifier():
        raise SystemExit("--database-schema must be a plain identifier")
    addresses = [config.listen(part) for part in START_ORDER if part is not Part.REDIS]
    addresses.append(config.bridge_metrics_listen)
    for address in addresses:
        host, port = split_address(address)
        # Port 0 would leave the launcher unable to say, or check, where a part is.
        if not host or not 0 < port < 65536:
            raise SystemExit(f"listen addresses must be host:port, got {address!r}")
    if len(set(addresses)) != len(addresses):
        raise SystemExit(f"two parts would share an address: {', '.join(addresses)}")
    try:
        devenv.parse_database_url(config.database_url, environ=os.environ)
    except devenv.DevenvError as error:
        raise SystemExit(str(error)) from error
    try:
        redis_parts = urllib.parse.urlsplit(config.redis_url)
        is_redis_url = redis_parts.scheme == "redis" and redis_parts.port is not None
    except ValueError:
        is_redis_url = False
    if not is_redis_url:
        raise SystemExit(
            f"--redis-url must read redis://host:port/db, got {config.redis_url!r}"
        )


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else 0


def part_argv(part: Part, config: StackConfig) -> list[str]:
    """The command line of every part but Redis, which devenv starts."""
    python = [sys.executable, "-m"]
    if part is Part.SIMULATOR:
        return [*python, "erp_bridge.simulator", "--listen", config.simulator_listen]
    if part is Part.SERVER:
        server = [*python, "server", "--demo-catalogue"]
        return [*server, "--listen", config.server_listen, *schema_flag(config)]
    assert part is Part.BRIDGE, f"no command line for {part}"
    simulator_host, simulator_port = split_address(config.simulator_listen)
    return [
        *python,
        "erp_bridge",
        *schema_flag(config),
        "--feed",
        "positions",
        "--erp-url",
        f"http://{simulator_host}:{simulator_port}",
        "--redis-url",
        config.redis_url,
        "--admin-listen",
        config.bridge_admin_listen,
        "--metrics-listen",
        config.bridge_metrics_listen,
    ]


def schema_flag(config: StackConfig) -> list[str]:
    return ["--database-schema", config.database_schema]


def part_environ(config: StackConfig) -> dict[str, str]:
    # The database URL goes in the environment, not on the command line, so that a
    # password in it does not show in `ps`.
    environ = dict(os.environ)
    environ["STOCKWARD_DATABASE_URL"] = config.database_url
    environ["STOCKWARD_BRIDGE_DATABASE_URL"] = config.database_url
    return environ


@dataclasses.dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    log_path: Path | None
    pid_path: Path
    # Completes when the process has exited and been reaped.
    exited: asyncio.Task[int]


class Stack:
    """Starts the parts, watches them, and stops them all; see the module note."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self._children: dict[Part, Child] = {}
        self._guard: Child | None = None
        self._lifeline_fd: int | None = None
        self._halt = asyncio.Event()
        self._hurry = asyncio.Event()
        self._is_stopping = False
        self._has_failed = False
        self._redis_note = ""

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, signum)
        self.config.run_dir.mkdir(parents=True, exist_ok=True)

        try:
            await self._start_all()
            if not self._halt.is_set():
                self._announce()
            await self._halt.wait()
        except StackError as error:
            logger.error("stack start failed: %s", error)
            self._has_failed = True
        finally:
            is_clean = await self._stop_all()
            is_clean = await self._release_guard() and is_clean
        code = 1 if self._has_failed or not is_clean else 0
        logger.info("stack stopped: code=%d", code)
        return code

    async def _start_all(self) -> None:
        await self._start_guard()
        for part in START_ORDER:
            if self._halt.is_set():
                return
            await self._unless_halted(self._start(part))

    async def _start(self, part: Part) -> None:
        if part is Part.REDIS:
            await self._start_redis()
            return
        child = await self._spawn(part, part_argv(part, self.config))
        if part is Part.SERVER:
            await wait_serving(self.config.server_listen, child)
        else:
            await wait_listening(self.config.listen(part), child)
        logger.info("part ready: part=%s pid=%d", part.value, child.process.pid)

    async def _unless_halted(self, step: Awaitable[None]) -> None:
        """Run a start-up step, abandoning it when a signal or a failure halts us."""
        step_task = asyncio.ensure_future(step)
        halt_task = asyncio.ensure_future(self._halt.wait())
        try:
            await asyncio.wait(
                {step_task, halt_task}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (step_task, halt_task):
                task.cancel()
            await asyncio.gather(step_task, halt_task, return_exceptions=True)
        if step_task.done() and not step_task.cancelled():
            step_task.result()

    async def _start_redis(self) -> None:
        url = self.config.redis_url
        if await devenv.redis_answers(url):
            self._redis_note = "already running"
            logger.info("redis answering: url=%s", url)
            return

        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname or "", parts.port
        assert port is not None, "validate() requires a port in the Redis URL"
        if not devenv.is_loopback_host(host):
            raise StackError(f"redis: nothing answers at {url}, not this machine")
        self.config.redis_dir.mkdir(parents=True, exist_ok=True)
        log_path = self._log_path(Part.REDIS.value)
        with open_log(log_path) as sink:
            try:
                process = await devenv.start_private_redis(
                    port=port,
                    data_dir=self.config.redis_dir,
                    deadline=devenv.Deadline.after(REDIS_START_WAIT_S),
                    output=sink,
                    process_group=self._group,
                )
            except devenv.DevenvError as error:
                raise StackError(f"redis: {error}; log: {log_path}") from error
        self._adopt(Part.REDIS, process, log_path)
        self._redis_note = f"private, pid {process.pid}, in {self.config.redis_dir}"

    async def _start_guard(self) -> None:
        read_fd, self._lifeline_fd = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                "from server.stack import guard; guard()",
                stdin=read_fd,
                process_group=0,
            )
        finally:
            os.close(read_fd)
        self._guard = self._watch(GUARD_NAME, process, log_path=None)
        logger.debug("guard started: pid=%d", process.pid)

    @property
    def _group(self) -> int:
        assert self._guard is not None, "the guard starts first"
        return self._guard.process.pid

    async def _spawn(self, part: Part, argv: Sequence[str]) -> Child:
        log_path = self._log_path(part.value)
        try:
            with open_log(log_path) as sink:
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=sink,
                    stderr=sink,
                    env=part_environ(self.config),
                    process_group=self._group,
                )
        except OSError as error:
            raise StackError(f"{part.value} could not start: {error}") from error
        return self._adopt(part, process, log_path)

    def _adopt(
        self, part: Part, process: asyncio.subprocess.Process, log_path: Path
    ) -> Child:
        child = self._watch(part.value, process, log_path=log_path)
        self._children[part] = child
        # The guard learns every pid so that it can tell when the group has stopped.
        assert self._lifeline_fd is not None
        try:
            os.write(self._lifeline_fd, f"{process.pid}\n".encode())
        except BrokenPipeError:
            # The guard is gone; its exit has already halted the stack.
            logger.warning("guard gone, part unguarded: part=%s", part.value)
        logger.info(
            "part started: part=%s pid=%d log=%s", part.value, process.pid, log_path
        )
        return child

    def _watch(
        self, name: str, process: asyncio.subprocess.Process, *, log_path: Path | None
    ) -> Child:
        pid_path = self.config.run_dir / f"{name}.pid"
        pid_path.write_text(f"{process.pid}\n")
        exited = asyncio.ensure_future(process.wait())
        child = Child(name, process, log_path, pid_path, exited)
        exited.add_done_callback(lambda _: self._on_exit(child))
        return child

    def _log_path(self, name: str) -> Path:
        return self.config.run_dir / f"{name}.log"

    def _on_exit(self, child: Child) -> None:
        if self._is_stopping:
            return
        self._has_failed = True
        self._halt.set()
        logger.error(
            "part exited unexpectedly, stopping the rest: part=%s pid=%d code=%s "
            "log=%s%s",
            child.name,
            child.process.pid,
            child.process.returncode,
            child.log_path,
            log_tail(child.log_path),
        )

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._halt.is_set():
            logger.warning("second signal, killing the parts now: signal=%s", name)
            self._hurry.set()
            return
        logger.info("stack stopping: signal=%s", name)
        self._halt.set()

    async def _stop_all(self) -> bool:
        """Stop every part, last started first; False if any stopped badly."""
        self._is_stopping = True
        is_clean = True
        for part in reversed(START_ORDER):
            child = self._children.get(part)
            if child is None:
                continue
            code = child.process.returncode
            if code is None:
                code = await self._stop(child)
            is_clean = is_clean and code == 0
            child.pid_path.unlink(missing_ok=True)
        return is_clean

    async def _stop(self, child: Child) -> int:
        pid = child.process.pid
        # Exited but not yet reaped is the one way signalling can fail here.
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(signal.SIGTERM)
        hurry = asyncio.ensure_future(self._hurry.wait())
        try:
            await asyncio.wait(
                {child.exited, hurry},
                timeout=STOP_WAIT_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            hurry.cancel()
        if not child.exited.done():
            logger.warning("part killed: part=%s pid=%d", child.name, pid)
            with contextlib.suppress(ProcessLookupError):
                child.process.kill()
            await asyncio.wait({child.exited}, timeout=KILL_WAIT_S)
        if not child.exited.done():
            logger.error("part survived SIGKILL: part=%s pid=%d", child.name, pid)
            return -1
        code = child.exited.result()
        logger.info("part stopped: part=%s pid=%d code=%d", child.name, pid, code)
        return code

    async def _release_guard(self) -> bool:
        """Close the lifeline; with the parts gone the guard exits at once."""
        if self._lifeline_fd is not None:
            os.close(self._lifeline_fd)
            self._lifeline_fd = None
        guard = self._guard
        if guard is None:
            return True
        await asyncio.wait({guard.exited}, timeout=STOP_WAIT_S + KILL_WAIT_S)
        guard.pid_path.unlink(missing_ok=True)
        if not guard.exited.done():
            logger.error("guard did not exit: pid=%d", guard.process.pid)
            return False
        return guard.exited.result() == 0

    def _announce(self) -> None:
        config = self.config
        python = display_path(sys.executable)
        host, port = split_address(config.simulator_listen)
        ledger_url = f"http://{host}:{port}/v1/ledger"
        metrics_host, metrics_port = split_address(config.bridge_metrics_listen)
        reserve = (
            "import grpc; from stockward.v1 import inventory_pb2 as i, "
            "inventory_pb2_grpc as g; s = g.InventoryServiceStub("
            f"grpc.insecure_channel('{config.server_listen}')); "
            "print(s.Reserve(i.ReserveRequest(request_id='demo-1', channel='web', "
            "lines=[i.ReserveLine(sku='SNEAKER-42', quantity=1, location='DC-EAST')])))"
        )
        admin = config.bridge_admin_listen
        lines = [
            "stockward demo is up; Ctrl-C stops every part.",
            f"  server         {config.server_listen} (gRPC, demo catalogue, "
            f"schema {config.database_schema})",
            f"  erp simulator  {ledger_url}",
            f"  erp bridge     admin {admin}, "
            f"metrics http://{metrics_host}:{metrics_port}/metrics",
            f"  redis          {config.redis_url} ({self._redis_note})",
            f"  postgres       {database_display_url(config.database_url)}",
            f"  logs           {display_path(str(config.run_dir))}/*.log",
            "Reserve a pair of sneakers, then see the hold reach the ERP:",
            f'  {python} -c "{reserve}"',
            f"  {python} -m erp_bridge.cli --target {admin} status",
            f"  curl -s {ledger_url}",
        ]
        logger.info("stack ready: schema=%s", config.database_schema)
        # The banner is for the person at the terminal, so it goes out unadorned.
        banner.info("%s", "\n".join(lines))


async def wait_serving(address: str, child: Child) -> None:
    """Until the server's gRPC health says SERVING, within SERVING_WAIT_S."""
    request = health_pb2.HealthCheckRequest()
    try:
        async with (
            asyncio.timeout(SERVING_WAIT_S),
            grpc.aio.insecure_channel(address) as channel,
        ):
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    answer = await health.Check(request, timeout=PROBE_TIMEOUT_S)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(POLL_INTERVAL_S)
    except TimeoutError as error:
        raise StackError(
            f"{child.name} not SERVING after {SERVING_WAIT_S:.0f} s; "
            f"log: {child.log_path}"
        ) from error


async def wait_listening(address: str, child: Child) -> None:
    """Until `address` accepts a connection, within LISTENING_WAIT_S."""
    host, port = split_address(address)
    try:
        async with asyncio.timeout(LISTENING_WAIT_S):
            while True:
                try:
                    async with asyncio.timeout(PROBE_TIMEOUT_S):
                        _, writer = await asyncio.open_connection(host, port)
                except (OSError, TimeoutError):
                    await asyncio.sleep(POLL_INTERVAL_S)
                    continue
                writer.close()
                await writer.wait_closed()
                return
    except TimeoutError as error:
        raise StackError(
            f"{child.name} not listening on {address} after "
            f"{LISTENING_WAIT_S:.0f} s; log: {child.log_path}"
        ) from error


def open_log(path: Path) -> IO[bytes]:
    # Truncated at every start, so the tail shown after a failure, and `tail -f`,
    # belong to this run only.
    return path.open("wb")


def log_tail(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    except OSError:
        return ""
    return "\n" + text.rstrip() if text.strip() else ""


def display_path(path: str) -> str:
    """`path` relative to the working directory when it lies inside it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def database_display_url(url: str) -> str:
    # Without the password, which the URL may carry.
    return devenv.parse_database_url(url, environ=os.environ).display_url


def guard() -> None:
    """The guard process of the module note: stdin is the lifeline.

    It reads the parts' pids until end of file, which comes when the launcher exits
    however it exits. The group then gets SIGTERM, and SIGKILL if a part is still
    running after STOP_WAIT_S. The guard leads the group, so it ignores the
    SIGTERM; the SIGKILL, if it comes to that, ends it too.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pids = [int(line) for line in sys.stdin.buffer if line.strip().isdigit()]

    # Sent even when every known part is gone, for one the launcher spawned but had
    # not yet reported when it died.
    os.killpg(os.getpgrp(), signal.SIGTERM)
    alive = [pid for pid in pids if is_running(pid)]
    deadline_s = time.monotonic() + STOP_WAIT_S
    while alive and time.monotonic() < deadline_s:
        time.sleep(POLL_INTERVAL_S)
        alive = [pid for pid in alive if is_running(pid)]
    if alive:
        os.killpg(os.getpgrp(), signal.SIGKILL)


def is_running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        # No /proc (not Linux) or gone meanwhile: trust the signal check above.
        return True
    # The state letter follows the command name, which is in parentheses and may
    # itself contain spaces or parentheses.
    return stat.rpartition(")")[2].split()[0] != "Z"


def main(argv: Sequence[str] | None = None) -> int:
    logs.configure()
    config = load_config(argv, os.environ)
    return asyncio.run(Stack(config).run())


if __name__ == "__main__":
    sys.exit(main())
