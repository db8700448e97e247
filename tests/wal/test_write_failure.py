"""A write that cannot be made durable: UNAVAILABLE, recovery, nothing promised twice.

Commits are made to fail for real. A lock held on wal_records outlasts a short
commit_timeout_s, or Postgres terminates the server's backend while its commit waits
for that lock, or the commit collides with a row the test put in its way. ACCESS
EXCLUSIVE also blocks recovery's reads, which keeps the server recovering (and health
NOT_SERVING) until the test lets go, so each step can be observed in order.
"""

import asyncio
import dataclasses
import pathlib
from collections.abc import Awaitable

import asyncpg
import grpc
import pytest

from server.app import App
from server.clock import FakeClock
from server.config import Config
from server.engine.shard import shard_of
from server.wal.schema import UnsafeDatabase
from stockward.v1 import admin_pb2, inventory_pb2, types_pb2
from tests.conftest import DATABASE_URL, Running, ServerFactory
from tests.reliability.rpc import reason_of
from tests.reliability.server_process import ServerProcess, free_port
from tests.wal.durable import (
    NOT_SERVING,
    SERVING,
    HealthWatch,
    connect,
    durable_state,
    next_seq,
    shown_positions,
    sku_on_shard,
    wait_until_any_blocked,
    wait_until_blocked,
)

SKU = "SKU-W"
LOCATION = "DC"
# Short enough that a blocked commit fails quickly; ample for an unblocked one.
COMMIT_TIMEOUT_S = 1.0
# A caller that gives up on an answer well before the commit could time out.
CALLER_PATIENCE_S = 0.3
# Longer than the commit timeout: a caller this patient must get an answer.
ANSWER_WAIT_S = 5.0
# Recovery that hits a broken invariant reports it within its first tries.
BROKEN_WAIT_S = 10.0
BROKEN_POLL_S = 0.05
LOSSY_URL = f"{DATABASE_URL}?synchronous_commit=off"
LOCK_EVERYTHING = "LOCK TABLE wal_records IN ACCESS EXCLUSIVE MODE"


async def set_on_hand(server: Running, sku: str, on_hand: int) -> None:
    await server.admin.SetOnHand(
        admin_pb2.SetOnHandRequest(
            source="erp",
            source_event_id=f"count-{sku}-{on_hand}",
            counts=[admin_pb2.OnHandCount(sku=sku, location=LOCATION, on_hand=on_hand)],
        )
    )


def reserve(
    request_id: str, quantity: int, sku: str = SKU
) -> inventory_pb2.ReserveRequest:
    return inventory_pb2.ReserveRequest(
        request_id=request_id,
        channel="web",
        lines=[
            inventory_pb2.ReserveLine(sku=sku, quantity=quantity, location=LOCATION)
        ],
    )


async def confirmed_hold(server: Running, request_id: str, quantity: int) -> str:
    answer = await server.inventory.Reserve(reserve(request_id, quantity))
    assert answer.outcome == inventory_pb2.RESERVE_OUTCOME_RESERVED
    await server.inventory.Confirm(
        inventory_pb2.ConfirmRequest(
            request_id=f"{request_id}-confirm", reservation_id=answer.reservation_id
        )
    )
    return str(answer.reservation_id)


async def expect_unavailable(call: Awaitable[object], reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
    assert reason_of(failed.value) == reason


async def test_commit_that_times_out_is_unavailable_then_recovery_shows_postgres(
    start_server: ServerFactory, schema: str
) -> None:
    server = await start_server(commit_timeout_s=COMMIT_TIMEOUT_S)
    await set_on_hand(server, SKU, 10)
    kept = await confirmed_hold(server, "keep", 3)
    health = HealthWatch(server)
    assert await health.next_status() == SERVING

    async with connect(schema) as locker:
        async with locker.transaction():
            await locker.execute(LOCK_EVERYTHING)
            await expect_unavailable(
                server.inventory.Reserve(reserve("lost", 4)), "WRITE_FAILED"
            )
            assert await health.next_status() == NOT_SERVING
            release = inventory_pb2.ReleaseRequest(
                request_id="keep-release", reservation_id=kept
            )
            await expect_unavailable(server.inventory.Release(release), "NOT_SERVING")
        assert await health.next_status() == SERVING
        durable = await durable_state(locker)

    assert durable.positions == {(SKU, LOCATION): (10, 3)}
    assert await shown_positions(server, [SKU]) == durable.positions
    shown = await server.inventory.GetReservation(
        inventory_pb2.GetReservationRequest(reservation_id=kept)
    )
    assert shown.reservation.state == types_pb2.RESERVATION_STATE_CONFIRMED
    assert durable.reservations[kept]["state"] == "confirmed"
    health.close()


async def test_commit_cut_off_by_postgres_is_unavailable_and_its_retry_holds_once(
    start_server: ServerFactory, schema: str
) -> None:
    application_name = f"stockward-{schema}"
    server = await start_server(
        database_url=f"{DATABASE_URL}?application_name={application_name}"
    )
    await set_on_hand(server, SKU, 5)
    health = HealthWatch(server)
    assert await health.next_status() == SERVING

    async with connect(schema) as locker:
        async with locker.transaction():
            await locker.execute(LOCK_EVERYTHING)
            cut = asyncio.ensure_future(server.inventory.Reserve(reserve("cut", 4)))
            writer = await wait_until_blocked(locker, application_name=application_name)
            assert await locker.fetchval("SELECT pg_terminate_backend($1)", writer)
            await expect_unavailable(cut, "WRITE_FAILED")
            assert await health.next_status() == NOT_SERVING
        assert await health.next_status() == SERVING

        retry = await server.inventory.Reserve(reserve("cut", 4))
        assert retry.outcome == inventory_pb2.RESERVE_OUTCOME_RESERVED
        # Nothing of the first attempt committed, so the retry decided anew.
        assert not retry.replayed
        more = await server.inventory.Reserve(reserve("more", 2))
        assert more.outcome == inventory_pb2.RESERVE_OUTCOME_REJECTED
        durable = await durable_state(locker)

    assert durable.positions == {(SKU, LOCATION): (5, 4)}
    assert await shown_positions(server, [SKU]) == durable.positions
    assert list(durable.reservations) == [retry.reservation_id]
    health.close()


async def test_retry_while_the_first_attempt_commits_is_not_acknowledged_early(
    start_server: ServerFactory, schema: str
) -> None:
    """A caller gives up while its commit is stuck and retries with the same id. The
    retry must not be answered OK before the commit is durable: that commit can still
    fail, and then the acknowledged hold would not exist."""
    server = await start_server(commit_timeout_s=COMMIT_TIMEOUT_S)
    await set_on_hand(server, SKU, 5)
    health = HealthWatch(server)
    assert await health.next_status() == SERVING
    request = reserve("impatient", 2)
    acknowledged: list[inventory_pb2.ReserveResponse] = []

    async with connect(schema) as locker:
        async with locker.transaction():
            await locker.execute(LOCK_EVERYTHING)
            for _attempt in range(2):
                try:
                    answer = await server.inventory.Reserve(
                        request, timeout=CALLER_PATIENCE_S
                    )
                except grpc.aio.AioRpcError as error:
                    assert error.code() in {
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.UNAVAILABLE,
                    }
                else:
                    acknowledged.append(answer)
            # The stuck commit times out while the lock is still held.
            assert await health.next_status() == NOT_SERVING
        assert await health.next_status() == SERVING
        durable = await durable_state(locker)

    for answer in acknowledged:
        assert answer.reservation_id in durable.reservations, (
            f"the retry was answered OK (replayed={answer.replayed}) with reservation "
            f"{answer.reservation_id} while its first attempt was still committing; "
            "that commit then failed and the acknowledged hold does not exist"
        )
    assert await shown_positions(server, [SKU]) == durable.positions
    health.close()


async def test_write_in_flight_on_another_shard_is_answered_when_a_write_fails(
    start_server: ServerFactory, schema: str, config: Config
) -> None:
    """One shard's commit fails while another shard's commit is still waiting. The
    waiting caller must still get an answer (UNAVAILABLE once its own commit fails or
    times out), not silence until its deadline."""
    failing_sku = sku_on_shard(0, shard_count=config.shards)
    waiting_sku = sku_on_shard(1, shard_count=config.shards)
    server = await start_server(commit_timeout_s=COMMIT_TIMEOUT_S)
    await set_on_hand(server, failing_sku, 5)
    await set_on_hand(server, waiting_sku, 5)
    insert = (
        "INSERT INTO wal_records (shard, seq, kind, reservation_id, body, recorded_us) "
        "VALUES ($1, $2, 'adjust', '', '{\"fx\": []}', 0)"
    )

    async with connect(schema) as saboteur, connect(schema) as blocker:
        # Shard 0's next commit collides with this committed row and fails at once.
        await saboteur.execute(insert, 0, await next_seq(saboteur, 0))
        async with blocker.transaction():
            # Shard 1's next commit waits for this uncommitted row with its key.
            await blocker.execute(insert, 1, await next_seq(blocker, 1))
            waiting = asyncio.ensure_future(
                server.inventory.Reserve(
                    reserve("waiting", 1, waiting_sku), timeout=ANSWER_WAIT_S
                )
            )
            await wait_until_any_blocked(saboteur, blocker_pid=blocker.get_server_pid())
            await expect_unavailable(
                server.inventory.Reserve(reserve("failing", 1, failing_sku)),
                "WRITE_FAILED",
            )
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await waiting

    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, (
        f"the caller whose commit was in flight on shard 1 got {failed.value.code()} "
        f"after {ANSWER_WAIT_S}s instead of an answer within the "
        f"{COMMIT_TIMEOUT_S}s commit timeout"
    )


async def test_reads_while_recovering_show_no_change_whose_write_failed(
    start_server: ServerFactory, schema: str
) -> None:
    """A release whose write failed is undone by recovery, so no read may show it
    done: a caller told UNAVAILABLE that reads RELEASED would not retry, and the
    confirmed hold would stay for good."""
    server = await start_server(commit_timeout_s=COMMIT_TIMEOUT_S)
    await set_on_hand(server, SKU, 5)
    kept = await confirmed_hold(server, "keep", 3)
    health = HealthWatch(server)
    assert await health.next_status() == SERVING
    release = inventory_pb2.ReleaseRequest(request_id="give-back", reservation_id=kept)
    get = inventory_pb2.GetReservationRequest(reservation_id=kept)

    async with connect(schema) as locker:
        async with locker.transaction():
            await locker.execute(LOCK_EVERYTHING)
            await expect_unavailable(server.inventory.Release(release), "WRITE_FAILED")
            assert await health.next_status() == NOT_SERVING
            try:
                seen = (await server.inventory.GetReservation(get)).reservation
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
            else:
                assert seen.state == types_pb2.RESERVATION_STATE_CONFIRMED, (
                    "while recovering, GetReservation shows "
                    f"{types_pb2.ReservationState.Name(seen.state)}: the release "
                    "whose write failed, which recovery is about to undo"
                )
        assert await health.next_status() == SERVING

    after = (await server.inventory.GetReservation(get)).reservation
    assert after.state == types_pb2.RESERVATION_STATE_CONFIRMED
    assert [line.quantity_held for line in after.lines] == [3]
    health.close()


async def test_recovery_that_finds_a_broken_invariant_after_a_failed_write_stops(
    start_fragile_server: ServerFactory, schema: str, config: Config
) -> None:
    """At start-up a broken invariant stops the server; recovery after a failed write
    must do the same (App's on_invariant_broken, which exits the process), not leave
    it NOT_SERVING for good."""
    server = await start_fragile_server(commit_timeout_s=COMMIT_TIMEOUT_S)
    await set_on_hand(server, SKU, 10)
    for request_id in ("first", "second"):
        await server.inventory.Reserve(reserve(request_id, 1))
    shard = shard_of(SKU, config.shards)

    async with connect(schema) as locker:
        # A gap in the shard's seqs. The running engine never looks back, so only
        # the recovery after the next failed write can find it.
        await locker.execute(
            "DELETE FROM wal_records WHERE shard = $1 AND seq = 2", shard
        )
        async with locker.transaction():
            await locker.execute(LOCK_EVERYTHING)
            await expect_unavailable(
                server.inventory.Reserve(reserve("third", 1)), "WRITE_FAILED"
            )

    for _ in range(int(BROKEN_WAIT_S / BROKEN_POLL_S)):
        if server.broken:
            break
        # The recovery task has no event to wait on; poll the hook's list.
        await asyncio.sleep(BROKEN_POLL_S)
    assert server.broken, (
        f"recovery met a seq gap in shard {shard} and {BROKEN_WAIT_S}s later the "
        f"server had not stopped; ledger state {server.app.ledger.state.value}"
    )


async def test_server_refuses_to_start_when_postgres_may_lose_commits(
    config: Config, clock: FakeClock
) -> None:
    app = App(dataclasses.replace(config, database_url=LOSSY_URL), clock=clock)
    try:
        with pytest.raises(UnsafeDatabase, match="synchronous_commit=off"):
            await app.start()
    finally:
        await app.stop()


async def test_server_process_exits_when_postgres_may_lose_commits(
    schema: str, config: Config, tmp_path: pathlib.Path
) -> None:
    process = ServerProcess(
        database_url=LOSSY_URL,
        schema=schema,
        port=free_port(),
        log_path=tmp_path / "server.log",
        extra_args=("--shards", str(config.shards)),
    )
    await process.start()
    try:
        exit_code = await process.wait_exit()
    finally:
        await process.close()

    assert exit_code != 0
    assert "synchronous_commit=off" in process.log_tail()


async def test_lossy_postgres_is_used_only_when_explicitly_allowed(
    start_server: ServerFactory,
) -> None:
    conn = await asyncpg.connect(LOSSY_URL)
    try:
        # The setting must really reach the session, or this test proves nothing.
        assert await conn.fetchval("SHOW synchronous_commit") == "off"
    finally:
        await conn.close()

    server = await start_server(
        database_url=LOSSY_URL, unsafe_allow_lossy_postgres=True
    )
    await set_on_hand(server, SKU, 2)
    answer = await server.inventory.Reserve(reserve("lossy", 2))

    assert answer.outcome == inventory_pb2.RESERVE_OUTCOME_RESERVED
