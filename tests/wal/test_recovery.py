"""One test per row of the recovery table in server/wal/recovery.py.

Each test builds the situation for real: a server on the test's schema makes the
records, `stop_as_if_crashed` leaves Postgres as a crash would (no shutdown
checkpoint), and direct SQL arranges what only a crash at an awkward moment or a
damaged database could leave. A restarted server must then show exactly what was
acknowledged; where recovery must refuse, `recover` is called directly.
"""

import dataclasses
import pathlib

import asyncpg
import grpc
import pytest

from server.clock import FakeClock
from server.config import Config
from server.engine.errors import InvariantBroken
from server.engine.limits import Limits
from server.engine.shard import shard_of
from server.wal.recovery import recover
from stockward.v1 import admin_pb2, inventory_pb2, types_pb2
from tests.conftest import DATABASE_URL, Running, ServerFactory
from tests.reliability.server_process import ServerProcess, free_port
from tests.wal.durable import (
    NOT_SERVING,
    SERVING,
    At,
    HealthWatch,
    connect,
    stop_as_if_crashed,
    wait_until_blocked,
)

DC = "DC"
STORE = "STORE"
SKUS = ["SKU-A", "SKU-B", "SKU-C"]
# Short, so that a commit held up by the test's lock fails quickly.
COMMIT_TIMEOUT_S = 1.0
# A caller that gives up before its commit is through.
CALLER_PATIENCE_S = 0.3
# A refused start-up is over within seconds; the child gets this long to exit.
EXIT_WAIT_S = 30.0


@dataclasses.dataclass(frozen=True, slots=True)
class Shown:
    """What the server shows, to compare before a crash and after recovery."""

    positions: dict[At, tuple[int, int, int]]
    reservations: dict[str, types_pb2.Reservation]


async def show(server: Running, reservation_ids: list[str]) -> Shown:
    answer = await server.inventory.GetAvailability(
        inventory_pb2.GetAvailabilityRequest(skus=SKUS)
    )
    positions = {
        (item.sku, place.location): (
            place.availability.on_hand,
            place.availability.held,
            place.availability.available_to_sell,
        )
        for item in answer.skus
        for place in item.locations
    }
    reservations = {}
    for reservation_id in reservation_ids:
        found = await server.inventory.GetReservation(
            inventory_pb2.GetReservationRequest(reservation_id=reservation_id)
        )
        reservations[reservation_id] = found.reservation
    return Shown(positions, reservations)


def line(sku: str, quantity: int, location: str = DC) -> inventory_pb2.ReserveLine:
    return inventory_pb2.ReserveLine(sku=sku, quantity=quantity, location=location)


def reserve(
    request_id: str, *lines: inventory_pb2.ReserveLine
) -> inventory_pb2.ReserveRequest:
    return inventory_pb2.ReserveRequest(
        request_id=request_id, channel="web", lines=lines
    )


FIRST_RESERVE = reserve("r1", line("SKU-A", 2), line("SKU-B", 3))


async def make_history(server: Running) -> list[str]:
    """Stock, then holds in every state a record can leave them in; their ids."""
    await server.admin.SetOnHand(
        admin_pb2.SetOnHandRequest(
            source="erp",
            source_event_id="count-1",
            counts=[
                admin_pb2.OnHandCount(sku="SKU-A", location=DC, on_hand=10),
                admin_pb2.OnHandCount(sku="SKU-A", location=STORE, on_hand=4),
                admin_pb2.OnHandCount(sku="SKU-B", location=DC, on_hand=8),
                admin_pb2.OnHandCount(sku="SKU-C", location=DC, on_hand=6),
            ],
        )
    )
    inventory = server.inventory
    first = (await inventory.Reserve(FIRST_RESERVE)).reservation_id
    await inventory.Confirm(
        inventory_pb2.ConfirmRequest(request_id="r1-confirm", reservation_id=first)
    )
    await inventory.Fulfill(
        inventory_pb2.FulfillRequest(
            request_id="r1-ship",
            reservation_id=first,
            lines=[types_pb2.LineQuantity(sku="SKU-B", location=DC, quantity=1)],
        )
    )
    second = (await inventory.Reserve(reserve("r2", line("SKU-C", 2)))).reservation_id
    await inventory.Release(
        inventory_pb2.ReleaseRequest(
            request_id="r2-part",
            reservation_id=second,
            lines=[types_pb2.LineQuantity(sku="SKU-C", location=DC, quantity=1)],
        )
    )
    split = inventory_pb2.ReserveLine(
        sku="SKU-A", quantity=6, locations=[STORE, DC], allow_split=True
    )
    third = (await inventory.Reserve(reserve("r3", split))).reservation_id
    await server.admin.AdjustStock(
        admin_pb2.AdjustStockRequest(
            source="wms",
            source_event_id="receipt-1",
            adjustments=[
                admin_pb2.StockAdjustment(
                    sku="SKU-C",
                    location=DC,
                    delta=4,
                    reason=admin_pb2.ADJUSTMENT_REASON_RECEIPT,
                )
            ],
        )
    )
    return [first, second, third]


async def make_later_history(server: Running, reservation_ids: list[str]) -> list[str]:
    """More changes on top of make_history: a confirm, a full release, a new hold."""
    first, second, third = reservation_ids
    inventory = server.inventory
    await inventory.Confirm(
        inventory_pb2.ConfirmRequest(request_id="r3-confirm", reservation_id=third)
    )
    await inventory.Release(
        inventory_pb2.ReleaseRequest(request_id="r2-rest", reservation_id=second)
    )
    fourth = (await inventory.Reserve(reserve("r4", line("SKU-B", 2)))).reservation_id
    return [first, second, third, fourth]


async def forget_records_covered_by_checkpoint(conn: asyncpg.Connection) -> int:
    """Delete what the newest complete checkpoint covers, so that recovery can only
    succeed by using it. Returns how many records are left."""
    await conn.execute(
        "DELETE FROM wal_records AS w USING (SELECT shard_seqs FROM checkpoints "
        "WHERE complete ORDER BY id DESC LIMIT 1) AS c "
        "WHERE w.seq <= c.shard_seqs[w.shard + 1]"
    )
    left: int = await conn.fetchval("SELECT count(*) FROM wal_records")
    return left


async def recover_directly(
    conn: asyncpg.Connection, config: Config, clock: FakeClock
) -> None:
    await recover(
        conn,
        shard_count=config.shards,
        clock=clock,
        limits=Limits(),
        idempotency_retention_s=config.idempotency_retention_s,
    )


# Empty database -------------------------------------------------------------------------


async def test_empty_database_recovers_an_empty_engine_whose_seqs_start_at_one(
    start_server: ServerFactory, schema: str, config: Config, clock: FakeClock
) -> None:
    server = await start_server()

    unknown = await server.inventory.GetAvailability(
        inventory_pb2.GetAvailabilityRequest(skus=["SKU-A"])
    )
    assert not unknown.skus[0].known
    listed = await server.inventory.ListReservations(
        inventory_pb2.ListReservationsRequest()
    )
    assert list(listed.reservations) == []

    await server.admin.SetOnHand(
        admin_pb2.SetOnHandRequest(
            source="erp",
            source_event_id="count-1",
            counts=[admin_pb2.OnHandCount(sku="SKU-A", location=DC, on_hand=1)],
        )
    )
    async with connect(schema) as conn:
        rows = await conn.fetch("SELECT shard, seq FROM wal_records")
    assert [tuple(row) for row in rows] == [(shard_of("SKU-A", config.shards), 1)]


# Records, checkpoints and both ----------------------------------------------------------


async def test_records_without_a_checkpoint_are_all_replayed(
    start_server: ServerFactory, schema: str
) -> None:
    server = await start_server()
    reservation_ids = await make_history(server)
    before = await show(server, reservation_ids)
    async with connect(schema) as conn:
        await stop_as_if_crashed(server, conn)
        assert await conn.fetchval("SELECT count(*) FROM checkpoints") == 0

    restarted = await start_server()

    assert await show(restarted, reservation_ids) == before
    replay = await restarted.inventory.Reserve(FIRST_RESERVE)
    assert replay.replayed
    assert replay.reservation_id == reservation_ids[0]


async def test_checkpoint_without_later_records_is_the_recovered_state(
    start_server: ServerFactory, schema: str
) -> None:
    server = await start_server()
    reservation_ids = await make_history(server)
    before = await show(server, reservation_ids)
    await server.app.ledger.checkpoint()
    async with connect(schema) as conn:
        await stop_as_if_crashed(server, conn)
        assert await forget_records_covered_by_checkpoint(conn) == 0

    restarted = await start_server()

    assert await show(restarted, reservation_ids) == before
    # New records continue each shard's seqs after the checkpoint's.
    more = await restarted.inventory.Reserve(reserve("r9", line("SKU-C", 1)))
    assert more.outcome == inventory_pb2.RESERVE_OUTCOME_RESERVED
    async with connect(schema) as conn:
        seqs = await conn.fetchrow(
            "SELECT w.seq, c.shard_seqs[w.shard + 1] AS covered "
            "FROM wal_records w, checkpoints c WHERE c.complete"
        )
    assert seqs is not None
    assert seqs["seq"] == seqs["covered"] + 1


async def test_checkpoint_plus_later_records_recovers_both(
    start_server: ServerFactory, schema: str
) -> None:
    server = await start_server()
    reservation_ids = await make_history(server)
    await server.app.ledger.checkpoint()
    reservation_ids = await make_later_history(server, reservation_ids)
    before = await show(server, reservation_ids)
    async with connect(schema) as conn:
        await stop_as_if_crashed(server, conn)
        assert await forget_records_covered_by_checkpoint(conn) > 0

    restarted = await start_server()

    assert await show(restarted, reservation_ids) == before


@pytest.mark.parametrize(
    "has_complete_checkpoint", [True, False], ids=["previous", "none"]
)
async def test_incomplete_checkpoint_is_ignored(
    start_server: ServerFactory,
    schema: str,
    config: Config,
    has_complete_checkpoint: bool,
) -> None:
    server = await start_server()
    reservation_ids = await make_history(server)
    if has_complete_checkpoint:
        await server.app.ledger.checkpoint()
    reservation_ids = await make_later_history(server, reservation_ids)
    before = await show(server, reservation_ids)
    async with connect(schema) as conn:
        await stop_as_if_crashed(server, conn)
        # What a crash while storing a checkpoint would leave if its rows were
        # visible: newest id, claims everything, never marked complete.
        incomplete = await conn.fetchval(
            "INSERT INTO checkpoints (created_us, shard_seqs, complete) "
            "SELECT 0, array_agg(last), false FROM ("
            "  SELECT coalesce(max(seq), 0) + 100 AS last "
            "  FROM generate_series(0, $1 - 1) AS s "
            "  LEFT JOIN wal_records w ON w.shard = s GROUP BY s ORDER BY s) AS per_shard "
            "RETURNING id",
            config.shards,
        )
        await conn.execute(
            "INSERT INTO checkpoint_positions VALUES ($1, 'SKU-A', $2, 999, 0)",
            incomplete,
            DC,
        )

    restarted = await start_server()

    assert await show(restarted, reservation_ids) == before
    more = await restarted.inventory.Reserve(reserve("r9", line("SKU-C", 1)))
    assert more.outcome == inventory_pb2.RESERVE_OUTCOME_RESERVED


# Crashes around COMMIT ------------------------------------------------------------------


async def test_answer_lost_after_commit_is_replayed_to_the_retry_after_a_crash(
    start_server: ServerFactory, schema: str
) -> None:
    application_name = f"stockward-{schema}"
    server = await start_server(
        database_url=f"{DATABASE_URL}?application_name={application_name}"
    )
    await make_history(server)
    request = reserve("lost-answer", line("SKU-A", 1))

    async with connect(schema) as locker:
        async with locker.transaction():
            await locker.execute("LOCK TABLE wal_records IN EXCLUSIVE MODE")
            with pytest.raises(grpc.aio.AioRpcError) as gave_up:
                await server.inventory.Reserve(request, timeout=CALLER_PATIENCE_S)
            assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_until_blocked(locker, application_name=application_name)
        # The lock is gone and the commit goes through with nobody to answer. A later
        # command on the same shard is written after it, so its answer means the
        # lost one is durable.
        await server.admin.AdjustStock(
            admin_pb2.AdjustStockRequest(
                source="wms",
                source_event_id="after-lost-answer",
                adjustments=[
                    admin_pb2.StockAdjustment(
                        sku="SKU-A",
                        location=DC,
                        delta=1,
                        reason=admin_pb2.ADJUSTMENT_REASON_RECEIPT,
                    )
                ],
            )
        )
        committed = await conn_reservations_of(locker, "lost-answer")
        assert len(committed) == 1
        await stop_as_if_crashed(server, locker)

    restarted = await start_server()
    retry = await restarted.inventory.Reserve(request)

    assert retry.replayed
    assert [retry.reservation_id] == committed
    held = await show(restarted, [retry.reservation_id])
    assert held.reservations[retry.reservation_id].lines[0].quantity_held == 1


async def conn_reservations_of(conn: asyncpg.Connection, request_id: str) -> list[str]:
    """Reservation ids the request log says this request made."""
    rows = await conn.fetch(
        "SELECT result->>'id' AS id FROM request_log WHERE request_id = $1", request_id
    )
    return [row["id"] for row in rows]


async def test_request_never_committed_is_decided_anew_on_retry_after_a_crash(
    start_server: ServerFactory, schema: str
) -> None:
    server = await start_server(commit_timeout_s=COMMIT_TIMEOUT_S)
    await make_history(server)
    # SKU-C at DC: 10 on hand, 1 held by r2, so 9 to sell.
    request = reserve("never-committed", line("SKU-C", 6))
    health = HealthWatch(server)
    assert await health.next_status() == SERVING

    async with connect(schema) as locker:
        async with locker.transaction():
            # ACCESS EXCLUSIVE holds recovery's reads too, so NOT_SERVING lasts.
            await locker.execute("LOCK TABLE wal_records IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await server.inventory.Reserve(request)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert await health.next_status() == NOT_SERVING
        assert await health.next_status() == SERVING
        health.close()
        assert await conn_reservations_of(locker, "never-committed") == []
        await stop_as_if_crashed(server, locker)

    restarted = await start_server()
    other = await restarted.inventory.Reserve(reserve("other", line("SKU-C", 6)))
    assert other.outcome == inventory_pb2.RESERVE_OUTCOME_RESERVED
    retry = await restarted.inventory.Reserve(request)

    assert not retry.replayed
    assert retry.outcome == inventory_pb2.RESERVE_OUTCOME_REJECTED
    assert retry.lines[0].quantity_available == 3


# Refusing to start ----------------------------------------------------------------------


async def test_records_that_disagree_with_their_reservation_refuse_recovery(
    start_server: ServerFactory, schema: str, config: Config, clock: FakeClock
) -> None:
    server = await start_server()
    await make_history(server)
    async with connect(schema) as conn:
        await stop_as_if_crashed(server, conn)
        # r2's reserve record now says it held 5 units; its reservation says 2.
        await conn.execute(
            "UPDATE wal_records SET body = jsonb_set(body, '{fx,0,3}', '5') "
            "WHERE kind = 'reserve' AND body->'rsv'->>'order_ref' = '' "
            "AND body->'fx'->0->>0 = 'SKU-C'"
        )

        with pytest.raises(InvariantBroken, match="disagrees with the records"):
            await recover_directly(conn, config, clock)


async def test_gap_in_a_shards_seqs_refuses_recovery(
    start_server: ServerFactory, schema: str, config: Config, clock: FakeClock
) -> None:
    server = await start_server()
    await make_history(server)
    async with connect(schema) as conn:
        await stop_as_if_crashed(server, conn)
        shard, seq = await remove_a_middle_record(conn)

        with pytest.raises(
            InvariantBroken, match=f"shard {shard} replays seq {seq + 1}"
        ):
            await recover_directly(conn, config, clock)


async def remove_a_middle_record(conn: asyncpg.Connection) -> tuple[int, int]:
    """Delete a record that has a later one in its shard; its (shard, seq)."""
    row = await conn.fetchrow(
        "SELECT shard, min(seq) + 1 AS seq FROM wal_records GROUP BY shard "
        "HAVING count(*) >= 3 ORDER BY shard LIMIT 1"
    )
    assert row is not None, "make_history leaves no shard with three records"
    await conn.execute(
        "DELETE FROM wal_records WHERE shard = $1 AND seq = $2",
        row["shard"],
        row["seq"],
    )
    return int(row["shard"]), int(row["seq"])


async def test_server_process_exits_instead_of_serving_over_a_seq_gap(
    start_server: ServerFactory, schema: str, config: Config, tmp_path: pathlib.Path
) -> None:
    server = await start_server()
    await make_history(server)
    async with connect(schema) as conn:
        await stop_as_if_crashed(server, conn)
        await remove_a_middle_record(conn)
    process = ServerProcess(
        database_url=DATABASE_URL,
        schema=schema,
        port=free_port(),
        log_path=tmp_path / "server.log",
        extra_args=("--shards", str(config.shards)),
    )

    await process.start()
    try:
        exit_code = await process.wait_exit(timeout_s=EXIT_WAIT_S)
    finally:
        await process.close()

    assert exit_code != 0
    assert "InvariantBroken" in process.log_tail()
