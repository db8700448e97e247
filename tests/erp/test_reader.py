"""Reading a shard's records in order, and never past a record not yet visible."""

import asyncpg
import orjson
import pytest

from erp_bridge.reader import MissingRecords, StreamReader
from server.wal.feed import StreamPosition

_INSERT = (
    "INSERT INTO wal_records (shard, seq, kind, reservation_id, body, recorded_us) "
    "VALUES ($1, $2, 'adjust', '', $3::jsonb, 0)"
)


def body(*effects: tuple[str, str, int, int]) -> str:
    return orjson.dumps({"fx": [list(e) for e in effects], "src": "wms"}).decode()


async def test_a_later_seq_committed_first_is_not_read_until_the_gap_fills(
    pool: asyncpg.Pool,
) -> None:
    await pool.execute(_INSERT, 0, 1, body(("A", "L", 1, 0)))
    reader = StreamReader(shard=0, timeout_s=5.0)

    # Seq 2's transaction is still open while seq 3's commits: the trap.
    async with pool.acquire() as slow, pool.acquire() as fast:
        transaction = slow.transaction()
        await transaction.start()
        await slow.execute(_INSERT, 0, 2, body(("A", "L", 2, 0)))
        await fast.execute(_INSERT, 0, 3, body(("A", "L", 3, 0)))

        async with pool.acquire() as conn:
            seen = await reader.read(conn, StreamPosition(0), records_max=100)
        assert [r.seq for r in seen] == [1]
        assert reader.gap_after_seq == 1

        await transaction.commit()

    async with pool.acquire() as conn:
        seen = await reader.read(conn, StreamPosition(1), records_max=100)
    assert [r.seq for r in seen] == [2, 3]
    assert [r.lines[0].on_hand_delta for r in seen] == [2, 3]
    assert reader.gap_after_seq is None


async def test_read_keeps_to_its_shard_and_skips_zero_effects(
    pool: asyncpg.Pool,
) -> None:
    await pool.execute(_INSERT, 1, 1, body(("A", "L", 0, 0), ("B", "L", 4, 0)))
    await pool.execute(_INSERT, 2, 1, body(("C", "L", 9, 0)))
    reader = StreamReader(shard=1, timeout_s=5.0)

    async with pool.acquire() as conn:
        seen = await reader.read(conn, StreamPosition(0), records_max=10)

    assert len(seen) == 1
    assert [(x.sku, x.index, x.shard) for x in seen[0].lines] == [("B", 0, 1)]


async def test_read_range_refuses_a_planned_batch_whose_records_are_gone(
    pool: asyncpg.Pool,
) -> None:
    for seq in (1, 2, 4):
        await pool.execute(_INSERT, 0, seq, body(("A", "L", 1, 0)))
    reader = StreamReader(shard=0, timeout_s=5.0)

    async with pool.acquire() as conn:
        whole = await reader.read_range(conn, StreamPosition(0), StreamPosition(2))
        assert [r.seq for r in whole] == [1, 2]
        with pytest.raises(MissingRecords, match=r"records 1\.\.4"):
            await reader.read_range(conn, StreamPosition(0), StreamPosition(4))
