"""Fixtures shared by the gRPC tests."""

import pathlib
from collections.abc import AsyncIterator

import pytest

from tests.conftest import DATABASE_URL
from tests.reliability.server_process import ServerProcess, free_port


@pytest.fixture
async def server_process(
    schema: str, tmp_path: pathlib.Path
) -> AsyncIterator[ServerProcess]:
    """A server in its own process with three shards, for tests that SIGKILL it."""
    process = ServerProcess(
        database_url=DATABASE_URL,
        schema=schema,
        port=free_port(),
        log_path=tmp_path / "server.log",
        extra_args=("--shards", "3"),
    )
    await process.start()
    yield process
    await process.close()
