"""The README's example works against the server as `make run` starts it."""

import asyncio
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import DATABASE_URL

README = Path(__file__).resolve().parent.parent / "README.md"
# `make run` listens here; the test swaps in a free port.
README_ADDRESS = "127.0.0.1:50051"
_START_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def demo_server(schema: str) -> Iterator[str]:
    """`python -m server --demo-catalogue`, as `make run` starts it, on a free port."""
    address = f"127.0.0.1:{_free_port()}"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "--demo-catalogue",
            "--listen",
            address,
            "--database-url",
            DATABASE_URL,
            "--database-schema",
            schema,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_until_serving(address)
        yield address
    finally:
        process.terminate()
        assert process.wait(timeout=_START_TIMEOUT_S) == 0


def _wait_until_serving(address: str) -> None:
    async def watch() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            await channel.channel_ready()
            stub = health_pb2_grpc.HealthStub(channel)
            async for update in stub.Watch(health_pb2.HealthCheckRequest()):
                if update.status == health_pb2.HealthCheckResponse.SERVING:
                    return

    async def bounded() -> None:
        async with asyncio.timeout(_START_TIMEOUT_S):
            await watch()

    asyncio.run(bounded())


def test_readme_python_example_reserves_from_the_demo_catalogue(
    demo_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README lost its Python example"
    example = blocks[0]
    assert README_ADDRESS in example

    exec(compile(example.replace(README_ADDRESS, demo_server), "README", "exec"), {})

    printed = capsys.readouterr().out.split()
    # outcome 1 is RESERVE_OUTCOME_RESERVED; the store comes first in the preference.
    assert printed[0] == "1"
    assert printed[1].startswith("r")
    assert "STORE-NYC-01" in " ".join(printed)


def test_readme_flash_sale_example_holds_what_it_says(
    demo_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 2, "the README lost its flash sale example"
    example = blocks[1]
    assert README_ADDRESS in example

    exec(compile(example.replace(README_ADDRESS, demo_server), "README", "exec"), {})

    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        "pickup: RESERVE_OUTCOME_RESERVED",
        "web sold: 11",
        "web can still sell 1",
        "marketplace can still sell 3",
    ]
    text = README.read_text()
    for line in printed:
        assert f"`{line}`" in text, f"the README no longer says {line!r}"


def test_readme_client_library_example_batches_and_names_refusals(
    demo_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    example = next(block for block in blocks if "StockwardClient" in block)
    assert README_ADDRESS in example

    exec(compile(example.replace(README_ADDRESS, demo_server), "README", "exec"), {})

    held, refused = capsys.readouterr().out.splitlines()
    assert held.startswith("held: 50 batches: ")
    assert 1 <= int(held.split()[-1]) <= 10
    assert refused == "refused: RESERVATION_RELEASED"
