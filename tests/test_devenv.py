"""`python -m server.devenv` against real servers.

The private-server tests run the real embedded PostgreSQL in a temporary directory on
a free loopback port, so they never touch the shared server at the default URL nor
the repository's own `.data/postgres`.
"""

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from server import devenv

# The command's own budget plus the time to start an interpreter: the command should
# always report on its own before the test gives up on it.
COMMAND_TIMEOUT_S = devenv.COMMAND_BUDGET_S + 10.0
CONNECT_TIMEOUT_S = 5.0
# Database and role that a fresh private server does not have, so that starting it
# also exercises their creation.
PRIVATE_USER = "devenv_check"
PRIVATE_DATABASE = "devenv_check_db"


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str


async def run_devenv(*args: str, environ: dict[str, str]) -> Outcome:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server.devenv",
        *args,
        cwd=devenv.REPO_ROOT,
        env=environ,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(
            process.communicate(), COMMAND_TIMEOUT_S
        )
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Outcome(process.returncode, stdout.decode(), stderr.decode())


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def environ_with(url: str | None) -> dict[str, str]:
    environ = dict(os.environ)
    environ.pop(devenv.PRIVATE_DIR_ENV, None)
    environ.pop(devenv.DATABASE_URL_ENV, None)
    if url is not None:
        environ[devenv.DATABASE_URL_ENV] = url
    return environ


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A scratch directory for one private server, stopped and removed afterwards."""
    scratch = Path(tempfile.mkdtemp(prefix="stockward-devenv-"))
    server_dir = scratch / "postgres"
    yield server_dir

    # Normally the test has stopped the server already. If it failed first, stop it
    # through the command, and failing that signal the pid its own pid file names.
    stop = [sys.executable, "-m", "server.devenv", "stop-private"]
    stop += ["--data-dir", str(server_dir)]
    subprocess.run(
        stop,
        cwd=devenv.REPO_ROOT,
        stdout=subprocess.DEVNULL,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    leftover = devenv.read_postmaster(devenv.PrivateServerPaths(server_dir).pgdata)
    if leftover is not None:
        os.kill(leftover.pid, signal.SIGQUIT)
    shutil.rmtree(scratch, ignore_errors=True)


async def fetch_value(url: str, query: str) -> object:
    connection = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S)
    try:
        return await connection.fetchval(query, timeout=CONNECT_TIMEOUT_S)
    finally:
        await connection.close(timeout=CONNECT_TIMEOUT_S)


async def execute(url: str, script: str) -> None:
    connection = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S)
    try:
        await connection.execute(script, timeout=CONNECT_TIMEOUT_S)
    finally:
        await connection.close(timeout=CONNECT_TIMEOUT_S)


async def test_postgres_command_makes_the_default_url_answer_queries() -> None:
    outcome = await run_devenv("postgres", environ=environ_with(None))

    assert outcome.returncode == 0, outcome.stderr
    assert devenv.DEFAULT_DATABASE_URL in outcome.stdout
    assert await fetch_value(devenv.DEFAULT_DATABASE_URL, "select 1") == 1


async def test_private_server_serves_with_fsync_on_and_closes_its_port_when_stopped(
    private_dir: Path,
) -> None:
    port = free_loopback_port()
    url = f"postgresql://{PRIVATE_USER}@127.0.0.1:{port}/{PRIVATE_DATABASE}"
    environ = environ_with(url)

    started = await run_devenv(
        "postgres", "--private", "--data-dir", str(private_dir), environ=environ
    )
    assert started.returncode == 0, started.stderr
    assert "private server initialised and started" in started.stdout
    assert f"data={private_dir / 'pgdata'}" in started.stdout

    assert await fetch_value(url, "select 1") == 1
    assert await fetch_value(url, "show fsync") == "on"
    assert await fetch_value(url, "show synchronous_commit") == "on"
    assert await fetch_value(url, "select current_user") == PRIVATE_USER

    stopped = await run_devenv(
        "stop-private", "--data-dir", str(private_dir), environ=environ
    )
    assert stopped.returncode == 0, stopped.stderr
    assert "private server stopped" in stopped.stdout
    with pytest.raises(ConnectionRefusedError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5.0)


async def test_private_server_starts_again_on_its_existing_data(
    private_dir: Path,
) -> None:
    port = free_loopback_port()
    url = f"postgresql://{PRIVATE_USER}@127.0.0.1:{port}/{PRIVATE_DATABASE}"
    environ = environ_with(url)
    start = ("postgres", "--private", "--data-dir", str(private_dir))
    stop = ("stop-private", "--data-dir", str(private_dir))

    assert (await run_devenv(*start, environ=environ)).returncode == 0
    await execute(url, "create table kept (sku text); insert into kept values ('a')")
    assert (await run_devenv(*stop, environ=environ)).returncode == 0

    restarted = await run_devenv(*start, environ=environ)
    assert restarted.returncode == 0, restarted.stderr
    assert "private server started:" in restarted.stdout
    assert await fetch_value(url, "select sku from kept") == "a"

    assert (await run_devenv(*stop, environ=environ)).returncode == 0


def test_private_server_refuses_a_url_that_is_not_on_this_machine(
    private_dir: Path,
) -> None:
    # --private skips the connection attempt, so no packet leaves the machine.
    url = "postgresql://postgres@db.example:5432/test"
    argv = ["postgres", "--private", "--data-dir", str(private_dir)]
    config = devenv.load_config(argv, {devenv.DATABASE_URL_ENV: url})
    # A clock that never moves: the refusal must come before anything waits.
    deadline = devenv.Deadline.after(devenv.COMMAND_BUDGET_S, clock=lambda: 0.0)

    with pytest.raises(devenv.DevenvError, match="loopback") as refused:
        devenv.ensure_postgres(config, deadline=deadline)

    assert url in str(refused.value)
    assert not private_dir.exists()


def test_cluster_choice_takes_main_on_the_url_port_only() -> None:
    listing = (
        "14 main 5433 down postgres /var/lib/postgresql/14/main /var/log/pg-14.log\n"
        "15 main 5432 down postgres /var/lib/postgresql/15/main /var/log/pg-15.log\n"
        "15 spare 5434 online postgres /var/lib/postgresql/15/spare /var/log/x.log\n"
    )
    clusters = devenv.parse_clusters(listing)

    chosen = devenv.pick_cluster(clusters, port=5432)
    assert chosen is not None
    assert (chosen.version, chosen.name, chosen.status) == ("15", "main", "down")
    assert devenv.pick_cluster(clusters, port=5434) is None


def test_database_url_fills_gaps_like_libpq_and_is_shown_without_password() -> None:
    target = devenv.parse_database_url(
        "postgresql://shop:secret@localhost", environ={"PGUSER": "ignored"}
    )
    assert (target.host, target.port, target.user, target.database) == (
        "localhost",
        5432,
        "shop",
        "shop",
    )
    assert target.display_url == "postgresql://shop@localhost:5432/shop"
    assert target.is_loopback

    from_environ = devenv.parse_database_url(
        "postgresql://db.example", environ={"PGUSER": "clerk", "PGPORT": "6543"}
    )
    assert (from_environ.port, from_environ.user, from_environ.database) == (
        6543,
        "clerk",
        "clerk",
    )
    assert not from_environ.is_loopback


async def test_redis_command_leaves_a_running_redis_alone() -> None:
    environ = dict(os.environ, **{devenv.REDIS_URL_ENV: devenv.DEFAULT_REDIS_URL})

    outcome = await run_devenv("redis", environ=environ)

    assert outcome.returncode == 0, outcome.stderr
    assert "redis: answering at" in outcome.stdout


async def test_redis_command_starts_a_private_redis_that_outlives_it() -> None:
    port = free_loopback_port()
    url = f"redis://127.0.0.1:{port}/0"
    environ = dict(os.environ, **{devenv.REDIS_URL_ENV: url})

    outcome = await run_devenv("redis", environ=environ)

    assert outcome.returncode == 0, outcome.stderr
    assert "started a private redis-server" in outcome.stdout
    pid = int((devenv.REPO_ROOT / ".data" / "redis" / "redis.pid").read_text())
    try:
        assert await devenv.redis_answers(url)
    finally:
        os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if not await devenv.redis_answers(url, timeout_s=0.1):
            break
        await asyncio.sleep(0.05)
    assert not await devenv.redis_answers(url, timeout_s=0.1)
