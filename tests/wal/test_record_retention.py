"""Retention of write-ahead records: exactly what the newest checkpoint, the age rule
and every ERP bridge's cursor allow goes, in seq order, and recovery still works.

Records are aged by moving committed_at back in SQL (it is Postgres's own time); the
bridge's cursors are written directly, as the bridge is a separate process.
"""

import asyncpg
import grpc

from server.config import Config
from server.engine.shard import shard_of
from stockward.v1 import admin_pb2
from tests.api.client import availability_at, refusal, refused, set_on_hand
from tests.api.erp_snapshots import Count, compare
from tests.conftest import Running, ServerFactory
from tests.wal.durable import connect, stop_as_if_crashed

DC = "DC"
SHARDS = 3
SKU = "KEEP-A"
# A sku on another shard than SKU, with no bridge cursor on its shard.
OTHER = next(
    f"KEEP-{n}"
    for n in range(100)
    if shard_of(f"KEEP-{n}", SHARDS) != shard_of(SKU, SHARDS)
)
HOME = shard_of(SKU, SHARDS)
RETENTION_S = 7 * 24 * 3600
# Well past the retention, in Postgres's interval syntax.
AGED = "8 days"


async def _adjust(server: Running, event_id: str, sku: str) -> None:
    await server.admin.AdjustStock(
        admin_pb2.AdjustStockRequest(
            source="wms",
            source_event_id=event_id,
            adjustments=[
                admin_pb2.StockAdjustment(
                    sku=sku,
                    location=DC,
                    delta=1,
                    reason=admin_pb2.ADJUSTMENT_REASON_RECEIPT,
                )
            ],
        )
    )


async def _seqs(conn: asyncpg.Connection, shard: int) -> list[int]:
    rows = await conn.fetch(
        "SELECT seq FROM wal_records WHERE shard = $1 ORDER BY seq", shard
    )
    return [row["seq"] for row in rows]


async def _age(conn: asyncpg.Connection, shard: int, *seqs: int) -> None:
    await conn.execute(
        f"UPDATE wal_records SET committed_at = now() - interval '{AGED}' "
        "WHERE shard = $1 AND seq = ANY($2::bigint[])",
        shard,
        list(seqs),
    )


async def _ack(conn: asyncpg.Connection, name: str, seq: int) -> None:
    await conn.execute(
        "INSERT INTO bridge_cursors (name, shard, acked_seq) VALUES ($1, $2, $3) "
        "ON CONFLICT (name, shard) DO UPDATE SET acked_seq = excluded.acked_seq",
        name,
        HOME,
        seq,
    )


async def test_records_go_only_when_checkpointed_old_and_delivered_to_every_bridge(
    start_server: ServerFactory, config: Config
) -> None:
    server = await start_server(wal_retention_s=RETENTION_S)
    ledger = server.app.ledger
    await set_on_hand(server, "count-1", (SKU, DC, 10))
    await set_on_hand(server, "count-2", (OTHER, DC, 10))
    for index in range(5):
        await _adjust(server, f"receipt-{index}", SKU)
    async with connect(config.database_schema) as conn:
        assert await _seqs(conn, HOME) == [1, 2, 3, 4, 5, 6]
        await _age(conn, HOME, 1, 2, 3, 5, 6)
        await _age(conn, shard_of(OTHER, SHARDS), 1)

        # No checkpoint: recovery would need every record.
        assert await ledger.prune_records() == 0
        await ledger.checkpoint()
        for index in range(5, 7):
            await _adjust(server, f"receipt-{index}", SKU)
        await _age(conn, HOME, 7, 8)
        await _ack(conn, "erp", 5)
        await _ack(conn, "erp2", 2)

        # The other shard has no bridge: its old, checkpointed record goes. On the
        # home shard the slower bridge has had only up to 2 delivered.
        assert await ledger.prune_records() == 3
        assert await _seqs(conn, HOME) == [3, 4, 5, 6, 7, 8]
        assert await _seqs(conn, shard_of(OTHER, SHARDS)) == []

        # Both bridges past 5: 3 goes, and 4 is too young, which keeps 5 as well.
        await _ack(conn, "erp2", 6)
        assert await ledger.prune_records() == 1
        assert await _seqs(conn, HOME) == [4, 5, 6, 7, 8]

        # 4 old too: up to the slower bridge's 5.
        await _age(conn, HOME, 4)
        assert await ledger.prune_records() == 2
        assert await _seqs(conn, HOME) == [6, 7, 8]

        # Every bridge has everything: the checkpoint (at 6) still keeps 7 and 8.
        await _ack(conn, "erp", 8)
        await _ack(conn, "erp2", 8)
        assert await ledger.prune_records() == 1
        assert await _seqs(conn, HOME) == [7, 8]
        assert ledger.stats().records_pruned == 7

        # Recovery from the checkpoint and the records after it still shows it all.
        before = await availability_at(server, SKU)
        await stop_as_if_crashed(server, conn)
    server = await start_server(wal_retention_s=RETENTION_S)
    assert await availability_at(server, SKU) == before == {DC: (17, 0, 17)}
    assert await availability_at(server, OTHER) == {DC: (10, 0, 10)}


async def test_a_pass_deletes_at_most_its_limit(
    start_server: ServerFactory, config: Config
) -> None:
    server = await start_server(wal_retention_s=RETENTION_S, wal_prune_records_max=2)
    await set_on_hand(server, "count-1", (SKU, DC, 10))
    for index in range(4):
        await _adjust(server, f"receipt-{index}", SKU)
    await server.app.ledger.checkpoint()
    async with connect(config.database_schema) as conn:
        await _age(conn, HOME, 1, 2, 3, 4, 5)

        passes = [await server.app.ledger.prune_records() for _ in range(4)]

        assert passes == [2, 2, 1, 0]
        assert await _seqs(conn, HOME) == []


async def test_a_snapshot_needing_deleted_records_is_refused(
    start_server: ServerFactory, config: Config
) -> None:
    server = await start_server(wal_retention_s=RETENTION_S)
    await set_on_hand(server, "count-1", (SKU, DC, 10))
    await _adjust(server, "receipt-0", SKU)
    await _adjust(server, "receipt-1", SKU)
    await server.app.ledger.checkpoint()
    async with connect(config.database_schema) as conn:
        await _age(conn, HOME, 1, 2)
        await _ack(conn, "erp", 2)
        assert await server.app.ledger.prune_records() == 2

    # The ERP that has seen nothing needs record 1, which is gone.
    error = await refused(compare(server, "snap-1", [Count(SKU, DC, 0)]))
    # The ERP that applied up to 2 needs only record 3, which is kept.
    caught_up = await compare(
        server, "snap-2", [Count(SKU, DC, 11)], [f"erp.s{HOME}.0.0-2.0"]
    )

    assert refusal(error) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "RECORDS_PRUNED",
        "erp_applied_batch_ids",
    )
    assert [(d.erp_unseen, d.difference) for d in caught_up.divergences] == [(1, 0)]
