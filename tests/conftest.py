"""Shared fixtures: a real Postgres schema per test and a real server on loopback."""

import dataclasses
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import grpc
import pytest

from server.app import App
from server.clock import FakeClock
from server.config import DEFAULT_DATABASE_URL, Config
from stockward.v1 import admin_pb2_grpc, inventory_pb2_grpc

DATABASE_URL = os.environ.get("STOCKWARD_DATABASE_URL", DEFAULT_DATABASE_URL)


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    """A fresh, empty Postgres schema, dropped afterwards."""
    name = "t_" + secrets.token_hex(6)
    yield name
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
def config(schema: str) -> Config:
    return Config(
        database_url=DATABASE_URL,
        database_schema=schema,
        listen="127.0.0.1:0",
        shards=3,
        shutdown_grace_s=2.0,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@dataclasses.dataclass
class Running:
    """An in-process server on loopback with stubs connected to it."""

    app: App
    channel: grpc.aio.Channel
    inventory: inventory_pb2_grpc.InventoryServiceStub
    admin: admin_pb2_grpc.StockAdminServiceStub
    broken: list[BaseException]


ServerFactory = Callable[..., Awaitable[Running]]


async def launch(config: Config, clock: FakeClock) -> Running:
    """An in-process server with stubs; broken invariants are collected, not fatal."""
    broken: list[BaseException] = []
    app = App(config, clock=clock, on_invariant_broken=broken.append)
    port = await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return Running(
        app=app,
        channel=channel,
        inventory=inventory_pb2_grpc.InventoryServiceStub(channel),
        admin=admin_pb2_grpc.StockAdminServiceStub(channel),
        broken=broken,
    )


@pytest.fixture
async def start_server(
    config: Config, clock: FakeClock
) -> AsyncIterator[ServerFactory]:
    """Start servers on the test's schema and fake clock; all stopped at the end.

    A broken invariant fails the test instead of ending the test process.
    """
    running: list[Running] = []

    async def start(**overrides: object) -> Running:
        settings = dataclasses.replace(config, **overrides)  # type: ignore[arg-type]
        server = await launch(settings, clock)
        running.append(server)
        return server

    yield start
    for server in running:
        await server.channel.close()
        if server.app.ledger.state.value != "stopped":
            await server.app.stop()
        assert not server.broken, f"invariants broken: {server.broken}"


async def stop_server(server: Running) -> None:
    await server.channel.close()
    await server.app.stop()
