"""The server process: Postgres pool, ledger, gRPC services, health and shutdown."""

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.api.inventory import InventoryService, StockAdminService
from server.clock import Clock, SystemClock
from server.config import Config
from server.engine.commands import OnHandCount, SetOnHand
from server.engine.limits import Limits
from server.ledger import Ledger, LedgerState
from server.reconciliation import Reconciler
from server.wal.schema import DATABASE_ERRORS
from stockward.v1 import admin_pb2, admin_pb2_grpc, inventory_pb2, inventory_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    inventory_pb2.DESCRIPTOR.services_by_name["InventoryService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["StockAdminService"].full_name,
)

# Postgres reachability probe: how often, and how long one probe may take.
_HEALTH_PROBE_PERIOD_S = 1.0
_HEALTH_PROBE_TIMEOUT_S = 2.0
# Start-up waits this long for Postgres before giving up with an error.
_STARTUP_DATABASE_WAIT_S = 60.0

DEMO_CATALOGUE = (
    ("TSHIRT-BLK-M", "DC-EAST", 120),
    ("TSHIRT-BLK-M", "STORE-NYC-01", 8),
    ("TSHIRT-BLK-L", "DC-EAST", 90),
    ("SNEAKER-42", "DC-EAST", 12),
    ("SNEAKER-42", "STORE-NYC-01", 3),
    ("SNEAKER-42", "STORE-BOS-02", 2),
    ("MUG-LOGO", "DC-EAST", 400),
    ("CONSOLE-X", "DC-EAST", 5),
)


def _stop_process(error: BaseException) -> None:
    # A broken invariant means memory no longer matches what was promised: stop now
    # and let recovery rebuild the acknowledged state from Postgres.
    log.critical("stopping: invariant broken: %s", error)
    os._exit(70)


class App:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        on_invariant_broken: Callable[[BaseException], None] = _stop_process,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self._on_invariant_broken = on_invariant_broken
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._pool: asyncpg.Pool | None = None
        self._ledger: Ledger | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._health_tasks: set[asyncio.Task[None]] = set()
        self._database_ok = False
        self.port = 0

    @property
    def ledger(self) -> Ledger:
        assert self._ledger is not None, "App.start() first"
        return self._ledger

    async def start(self) -> int:
        """Serve (NOT_SERVING until recovered), connect, recover, then SERVING."""
        self._pool = await self._connect()
        self._ledger = Ledger(
            config=self.config,
            pool=self._pool,
            clock=self.clock,
            on_state=lambda _: self._publish_health(),
            on_invariant_broken=self._on_invariant_broken,
        )
        server = grpc.aio.server(
            maximum_concurrent_rpcs=self.config.max_concurrent_rpcs,
            options=[("grpc.so_reuseport", 0)],
        )
        inventory_pb2_grpc.add_InventoryServiceServicer_to_server(
            InventoryService(
                ledger=self._ledger,
                clock=self.clock,
                on_invariant_broken=self._on_invariant_broken,
            ),
            server,
        )
        admin_pb2_grpc.add_StockAdminServiceServicer_to_server(
            StockAdminService(
                ledger=self._ledger,
                reconciler=Reconciler(
                    ledger=self._ledger,
                    pool=self._pool,
                    clock=self.clock,
                    config=self.config,
                    limits=Limits(ttl_default_s=self.config.ttl_default_s),
                ),
                clock=self.clock,
                on_invariant_broken=self._on_invariant_broken,
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.port = server.add_insecure_port(self.config.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.listen}")
        self._server = server
        await self._publish_health_async()
        await server.start()
        log.info("listening: address=%s port=%d", self.config.listen, self.port)

        self._database_ok = True
        try:
            await self._ledger.start()
            if self.config.demo_catalogue:
                await self.seed_demo_catalogue()
        except BaseException:
            await self.stop()
            raise
        self._probe_task = asyncio.create_task(self._probe_database(), name="db-probe")
        return self.port

    async def _connect(self) -> asyncpg.Pool:
        deadline = asyncio.get_running_loop().time() + _STARTUP_DATABASE_WAIT_S
        while True:
            try:
                pool: asyncpg.Pool = await asyncpg.create_pool(
                    self.config.database_url,
                    min_size=1,
                    max_size=self.config.shards + self.config.pool_extra_connections,
                    command_timeout=self.config.commit_timeout_s,
                    timeout=self.config.database_timeout_s,
                    server_settings={"search_path": self.config.database_schema},
                    init=self._init_connection,
                )
                return pool
            except DATABASE_ERRORS as error:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                log.warning("postgres unreachable: retry_s=1 error=%r", error)
                await asyncio.sleep(1.0)

    async def _init_connection(self, conn: asyncpg.Connection) -> None:
        # The schema must exist before search_path can find tables in it.
        schema = self.config.database_schema
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')

    async def seed_demo_catalogue(self) -> None:
        command = SetOnHand(
            source="demo",
            source_event_id="demo-catalogue-v1",
            counts=tuple(OnHandCount(*row) for row in DEMO_CATALOGUE),
        )
        await self.ledger.execute(command)
        log.info("demo catalogue seeded: positions=%d", len(DEMO_CATALOGUE))

    def _serving(self) -> bool:
        return (
            self._ledger is not None
            and self._ledger.state is LedgerState.SERVING
            and self._database_ok
        )

    def _publish_health(self) -> None:
        # The event loop keeps only weak references to tasks: hold this one until done.
        task = asyncio.get_running_loop().create_task(self._publish_health_async())
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    async def _publish_health_async(self) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self._serving()
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, status)

    async def _probe_database(self) -> None:
        assert self._pool is not None
        while True:
            await asyncio.sleep(_HEALTH_PROBE_PERIOD_S)
            was_ok = self._database_ok
            try:
                async with asyncio.timeout(_HEALTH_PROBE_TIMEOUT_S):
                    await self._pool.fetchval("SELECT 1")
                self._database_ok = True
            except (
                OSError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                TimeoutError,
            ):
                self._database_ok = False
            if was_ok != self._database_ok:
                log.warning("postgres reachable changed: ok=%s", self._database_ok)
                await self._publish_health_async()

    async def stop(self) -> None:
        """NOT_SERVING, let in-flight RPCs finish, drain the writers, close."""
        log.info("stopping: grace_s=%.1f", self.config.shutdown_grace_s)
        self._database_ok = False
        await self._publish_health_async()
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
        if self._server is not None:
            await self._server.stop(self.config.shutdown_grace_s)
        if self._ledger is not None:
            await self._ledger.stop()
        if self._pool is not None:
            await self._pool.close()
        log.info("stopped")
