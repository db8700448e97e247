"""Reading a shard's committed records in order, never past a missing one.

Design note. The classic trap of feeding from a table is a sequence number that
becomes visible before a lower one: two transactions take seqs 7 and 8, the one with 8
commits first, a reader sees 8, moves its cursor past it, and never sees 7. stockward
rules this out twice over:
1. A shard has exactly one writer (server/wal/writer.py), which opens a transaction
   only after the previous one committed, and a recovering server takes the write
   fence exclusively before it writes again, so a transaction that was still on its
   way has landed or died. Postgres makes a commit visible before it releases the
   transaction's locks, so no later seq can be visible before an earlier one.
2. The reader does not trust that: it asks for the records after its position and
   keeps only the unbroken run that starts at the next seq. A gap, whatever caused
   it, stops the stream at the gap until the missing record appears; a gap that stays
   is reported, never skipped.
"""

import dataclasses
import logging
from typing import Any

import asyncpg
import orjson

from server.engine.errors import ensure
from server.wal.feed import FeedLine, StreamPosition, lines_of

log = logging.getLogger(__name__)

# Records fetched per query at most: a full batch of the largest request the config
# allows (1,000 lines) and one more, even when records carry one line each; few
# enough to decode in a few milliseconds.
RECORDS_PER_READ_MAX = 2_000

_READ = """
SELECT seq, kind, reservation_id, body::text AS body, recorded_us,
       (extract(epoch FROM committed_at) * 1000000)::bigint AS committed_us
FROM wal_records WHERE shard = $1 AND seq > $2 ORDER BY seq LIMIT $3
"""

_READ_RANGE = """
SELECT seq, kind, reservation_id, body::text AS body, recorded_us,
       (extract(epoch FROM committed_at) * 1000000)::bigint AS committed_us
FROM wal_records WHERE shard = $1 AND seq > $2 AND seq <= $3 ORDER BY seq
"""


@dataclasses.dataclass(frozen=True, slots=True)
class StreamRecord:
    seq: int
    committed_us: int
    lines: tuple[FeedLine, ...]


class MissingRecords(Exception):
    """Records the stream needs are not in wal_records (pruned, or never written)."""


class StreamReader:
    def __init__(self, *, shard: int, timeout_s: float) -> None:
        self.shard = shard
        self._timeout_s = timeout_s
        # Where the last read stopped short of a gap, to tell a gap that stays.
        self.gap_after_seq: int | None = None

    async def read(
        self, conn: asyncpg.Connection, position: StreamPosition, *, records_max: int
    ) -> list[StreamRecord]:
        """The unbroken run of committed records after `position` (the one it is
        inside of included), at most records_max of them."""
        ensure(0 < records_max <= RECORDS_PER_READ_MAX, f"read of {records_max}")
        rows = await conn.fetch(
            _READ, self.shard, position.seq, records_max, timeout=self._timeout_s
        )
        records = self._contiguous(rows, after_seq=position.seq)
        if records and position.line:
            ensure(
                position.line < len(records[0].lines),
                f"shard {self.shard}: position {position} past its record's lines",
            )
        return records

    async def read_range(
        self, conn: asyncpg.Connection, start: StreamPosition, end: StreamPosition
    ) -> list[StreamRecord]:
        """Every record from `start` to `end`, for resending a planned batch."""
        last_seq = end.seq + (1 if end.line else 0)
        rows = await conn.fetch(
            _READ_RANGE, self.shard, start.seq, last_seq, timeout=self._timeout_s
        )
        records = self._contiguous(rows, after_seq=start.seq)
        if len(records) != last_seq - start.seq:
            raise MissingRecords(
                f"shard {self.shard}: records {start.seq + 1}..{last_seq} of a planned "
                f"batch are not all there ({len(records)} found)"
            )
        return records

    def _contiguous(self, rows: list[Any], *, after_seq: int) -> list[StreamRecord]:
        records: list[StreamRecord] = []
        expected = after_seq + 1
        for row in rows:
            if row["seq"] != expected:
                self._note_gap(expected, row["seq"])
                break
            body = orjson.loads(row["body"])
            lines = lines_of(
                shard=self.shard,
                seq=row["seq"],
                kind=row["kind"],
                reservation_id=row["reservation_id"],
                body=body,
            )
            records.append(StreamRecord(row["seq"], row["committed_us"], tuple(lines)))
            expected += 1
        else:
            self.gap_after_seq = None
        return records

    def _note_gap(self, expected: int, found: int) -> None:
        if self.gap_after_seq != expected - 1:
            log.warning(
                "wal gap: shard=%d expected_seq=%d next_visible_seq=%d; waiting",
                self.shard,
                expected,
                found,
            )
        self.gap_after_seq = expected - 1
