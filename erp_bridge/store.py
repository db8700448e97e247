"""The bridge's state in Postgres: cursors, stream ownership and dead letters.

Design note. A stream's cursor has two positions. `acked` is how far the ERP has
acknowledged; it moves only in the transaction that also records the batch's dead
letters, and only from the position the batch started at (compare and set), so two
processes can never both advance it. `inflight` is the end of the batch planned after
`acked`, written before the batch is first sent: a bridge that restarts after a crash
or timeout resends exactly that stretch, under the same id and with the same content,
instead of planning a longer one whose netted lines the ERP could not recognise.

Ownership of a stream is a session advisory lock held on a connection of its own for
as long as the process feeds it; Postgres drops it when that connection ends, also
when the process is killed, and a standby process takes the stream over.
"""

import dataclasses
import enum
import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson

from erp_bridge.adapters import ErpLine, Feed, LineRejection
from server.engine.errors import ensure
from server.wal.feed import StreamPosition

log = logging.getLogger(__name__)

# Every statement but the ownership wait gets this long: Postgres on loopback answers
# in milliseconds, so five seconds means it is down or stalled.
DATABASE_TIMEOUT_S = 5.0
# Dead letters one list or one retry covers: a page an operator can read, and a bound
# on what one admin call may change.
DEAD_LETTERS_PAGE_MAX = 1_000


class DeadLetterStatus(enum.StrEnum):
    DEAD = "dead"
    RETRYING = "retrying"
    RESOLVED = "resolved"
    DISCARDED = "discarded"


# The legal moves of a dead letter; the SQL below makes no other.
DEAD_LETTER_MOVES = {
    DeadLetterStatus.DEAD: {DeadLetterStatus.RETRYING, DeadLetterStatus.DISCARDED},
    DeadLetterStatus.RETRYING: {DeadLetterStatus.RESOLVED, DeadLetterStatus.DEAD},
    DeadLetterStatus.RESOLVED: set(),
    DeadLetterStatus.DISCARDED: set(),
}


@dataclasses.dataclass(frozen=True, slots=True)
class Cursor:
    shard: int
    acked: StreamPosition
    acked_batch_id: str
    inflight: StreamPosition | None
    inflight_feed: Feed | None


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    shard: int
    batch_id: str
    line: ErpLine
    reason: str
    message: str
    attempts: int
    status: DeadLetterStatus
    retry_batch_id: str | None
    first_failed_us: int
    last_failed_us: int


@dataclasses.dataclass(frozen=True, slots=True)
class Refused:
    """A line the ERP refused, to be dead-lettered with the batch's acknowledgement."""

    line: ErpLine
    rejection: LineRejection


class StreamTaken(Exception):
    """Another process advanced this stream's cursor: it owns the stream now."""


def _lock_key(schema: str, name: str, shard: int) -> str:
    return f"{schema}:bridge:{name}:{shard}"


class BridgeStore:
    def __init__(self, pool: asyncpg.Pool, *, name: str) -> None:
        self._pool = pool
        self._name = name

    async def try_own(self, conn: asyncpg.Connection, shard: int) -> bool:
        """Take the stream's ownership lock on `conn` if no other session holds it."""
        schema = await conn.fetchval("SELECT current_schema()")
        owned = await conn.fetchval(
            "SELECT pg_try_advisory_lock(hashtext($1))",
            _lock_key(schema, self._name, shard),
            timeout=DATABASE_TIMEOUT_S,
        )
        return bool(owned)

    async def load_cursor(
        self, conn: asyncpg.Connection, shard: int, *, start_at_end: bool
    ) -> Cursor:
        """The stream's cursor. A new one starts after the last record (start_at_end)
        or before the first one still retained: records pruned before this bridge
        name existed were never its to send."""
        bound = "max(seq)" if start_at_end else "min(seq) - 1"
        created = await conn.fetchval(
            "INSERT INTO bridge_cursors (name, shard, acked_seq) "
            f"SELECT $1, $2, coalesce({bound}, 0) FROM wal_records WHERE shard = $2 "
            "ON CONFLICT (name, shard) DO NOTHING RETURNING acked_seq",
            self._name,
            shard,
            timeout=DATABASE_TIMEOUT_S,
        )
        if created:
            log.warning(
                "cursor created past records: name=%s shard=%d acked_seq=%d",
                self._name,
                shard,
                created,
            )
        row = await conn.fetchrow(
            "SELECT * FROM bridge_cursors WHERE name = $1 AND shard = $2",
            self._name,
            shard,
            timeout=DATABASE_TIMEOUT_S,
        )
        ensure(row is not None, f"cursor of shard {shard} vanished")
        return _cursor(row)

    async def plan(
        self,
        conn: asyncpg.Connection,
        *,
        shard: int,
        acked: StreamPosition,
        end: StreamPosition,
        feed: Feed,
    ) -> None:
        """Record the batch about to be sent, before it is sent.

        `conn` holds the stream's ownership lock: a process that lost its session,
        and with it the lock, cannot plan over the new owner's plan."""
        ensure(acked < end, f"a batch from {acked} to {end} covers nothing")
        status = await conn.execute(
            "UPDATE bridge_cursors SET inflight_seq = $5, inflight_line = $6, "
            "inflight_feed = $7 WHERE name = $1 AND shard = $2 "
            "AND acked_seq = $3 AND acked_line = $4 AND inflight_seq IS NULL",
            self._name,
            shard,
            acked.seq,
            acked.line,
            end.seq,
            end.line,
            feed.value,
            timeout=DATABASE_TIMEOUT_S,
        )
        if status != "UPDATE 1":
            raise StreamTaken(f"shard {shard}'s cursor moved away from {acked}")

    async def acknowledge(
        self,
        conn: asyncpg.Connection,
        *,
        shard: int,
        start: StreamPosition,
        end: StreamPosition,
        batch_id: str,
        refused: Sequence[Refused],
    ) -> None:
        """Move the cursor past an acknowledged batch and keep its refused lines, in
        one transaction on the connection holding the stream's lock."""
        ensure(start < end, f"acknowledged batch {batch_id} covers nothing")
        async with conn.transaction():
            status = await conn.execute(
                "UPDATE bridge_cursors SET acked_seq = $5, acked_line = $6, "
                "acked_batch_id = $7, acked_at = now(), inflight_seq = NULL, "
                "inflight_line = NULL, inflight_feed = NULL "
                "WHERE name = $1 AND shard = $2 AND acked_seq = $3 AND acked_line = $4 "
                "AND inflight_seq = $8 AND inflight_line = $9",
                self._name,
                shard,
                start.seq,
                start.line,
                end.seq,
                end.line,
                batch_id,
                end.seq,
                end.line,
                timeout=DATABASE_TIMEOUT_S,
            )
            if status != "UPDATE 1":
                raise StreamTaken(f"shard {shard}'s cursor moved away from {start}")
            if refused:
                await conn.executemany(
                    "INSERT INTO bridge_dead_letters (name, shard, batch_id, end_seq, "
                    "end_line, line_id, line, reason, message, status) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, 'dead') "
                    "ON CONFLICT (name, line_id) DO NOTHING",
                    [
                        (
                            self._name,
                            shard,
                            batch_id,
                            end.seq,
                            end.line,
                            r.line.line_id,
                            _line_json(r.line),
                            r.rejection.reason,
                            r.rejection.message,
                        )
                        for r in refused
                    ],
                    timeout=DATABASE_TIMEOUT_S,
                )

    # Dead letters.

    async def list_dead_letters(
        self,
        *,
        statuses: Sequence[DeadLetterStatus],
        after_id: int,
        limit: int,
    ) -> list[DeadLetter]:
        ensure(0 < limit <= DEAD_LETTERS_PAGE_MAX, f"page of {limit} dead letters")
        rows = await self._pool.fetch(
            "SELECT * FROM bridge_dead_letters WHERE name = $1 "
            "AND status = ANY($2::text[]) AND id > $3 ORDER BY id LIMIT $4",
            self._name,
            [s.value for s in statuses],
            after_id,
            limit,
            timeout=DATABASE_TIMEOUT_S,
        )
        return [_dead_letter(row) for row in rows]

    async def count_dead_letters(self) -> dict[DeadLetterStatus, int]:
        rows = await self._pool.fetch(
            "SELECT status, count(*) AS n FROM bridge_dead_letters WHERE name = $1 "
            "GROUP BY status",
            self._name,
            timeout=DATABASE_TIMEOUT_S,
        )
        counts = dict.fromkeys(DeadLetterStatus, 0)
        for row in rows:
            counts[DeadLetterStatus(row["status"])] = row["n"]
        return counts

    async def retry_dead_letters(self, ids: Sequence[int]) -> list[int]:
        """Queue dead letters for a resend; returns the ids that were dead."""
        return await self._move(ids, DeadLetterStatus.DEAD, DeadLetterStatus.RETRYING)

    async def discard_dead_letters(self, ids: Sequence[int]) -> list[int]:
        """Give dead letters up for good; returns the ids that were dead."""
        return await self._move(ids, DeadLetterStatus.DEAD, DeadLetterStatus.DISCARDED)

    async def _move(
        self, ids: Sequence[int], source: DeadLetterStatus, target: DeadLetterStatus
    ) -> list[int]:
        ensure(target in DEAD_LETTER_MOVES[source], f"{source} -> {target}")
        ensure(len(ids) <= DEAD_LETTERS_PAGE_MAX, f"{len(ids)} dead letters at once")
        rows = await self._pool.fetch(
            "UPDATE bridge_dead_letters SET status = $4, "
            "resolved_at = CASE WHEN $4 = 'discarded' THEN now() END "
            "WHERE name = $1 AND id = ANY($2::bigint[]) AND status = $3 RETURNING id",
            self._name,
            list(ids),
            source.value,
            target.value,
            timeout=DATABASE_TIMEOUT_S,
        )
        moved = sorted(row["id"] for row in rows)
        log.info(
            "dead letters moved: name=%s to=%s asked=%d moved=%d",
            self._name,
            target.value,
            len(ids),
            len(moved),
        )
        return moved

    async def claim_retry_batch(
        self, conn: asyncpg.Connection, *, lines_max: int
    ) -> list[DeadLetter]:
        """The dead letters of the retry batch to send next: the one a crash left
        unacknowledged, else a new one from those queued for retry. `conn` holds the
        retry stream's lock, so one process claims and settles at a time."""
        ensure(0 < lines_max <= DEAD_LETTERS_PAGE_MAX, f"retry batch of {lines_max}")
        async with conn.transaction():
            rows = await conn.fetch(
                "SELECT * FROM bridge_dead_letters WHERE name = $1 AND status = "
                "'retrying' AND retry_batch_id = (SELECT min(retry_batch_id) FROM "
                "bridge_dead_letters WHERE name = $1 AND status = 'retrying') "
                "ORDER BY id LIMIT $2",
                self._name,
                DEAD_LETTERS_PAGE_MAX,
                timeout=DATABASE_TIMEOUT_S,
            )
            if rows:
                return [_dead_letter(row) for row in rows]

            rows = await conn.fetch(
                "SELECT * FROM bridge_dead_letters WHERE name = $1 AND status = "
                "'retrying' AND retry_batch_id IS NULL ORDER BY id LIMIT $2 "
                "FOR UPDATE",
                self._name,
                lines_max,
                timeout=DATABASE_TIMEOUT_S,
            )
            if not rows:
                return []
            letters = [_dead_letter(row) for row in rows]
            batch_id = retry_batch_id(self._name, letters)
            await conn.execute(
                "UPDATE bridge_dead_letters SET retry_batch_id = $2 "
                "WHERE id = ANY($1::bigint[])",
                [letter.id for letter in letters],
                batch_id,
                timeout=DATABASE_TIMEOUT_S,
            )
        return [dataclasses.replace(x, retry_batch_id=batch_id) for x in letters]

    async def settle_retry_batch(
        self,
        conn: asyncpg.Connection,
        letters: Sequence[DeadLetter],
        rejected: Sequence[LineRejection],
    ) -> None:
        """Resolve the retried lines the ERP booked; the refused ones die again. Only
        rows still in this very retry batch move."""
        again = {r.line_id: r for r in rejected if r.reason != ALREADY_APPLIED}
        async with conn.transaction():
            for letter in letters:
                ensure(
                    letter.retry_batch_id is not None, f"letter {letter.id} unclaimed"
                )
                rejection = again.get(letter.line.line_id)
                if rejection is None:
                    await conn.execute(
                        "UPDATE bridge_dead_letters SET status = 'resolved', "
                        "resolved_at = now() WHERE id = $1 AND status = 'retrying' "
                        "AND retry_batch_id = $2",
                        letter.id,
                        letter.retry_batch_id,
                        timeout=DATABASE_TIMEOUT_S,
                    )
                    continue
                await conn.execute(
                    "UPDATE bridge_dead_letters SET status = 'dead', "
                    "retry_batch_id = NULL, attempts = attempts + 1, reason = $2, "
                    "message = $3, last_failed_at = now() "
                    "WHERE id = $1 AND status = 'retrying' AND retry_batch_id = $4",
                    letter.id,
                    rejection.reason,
                    rejection.message,
                    letter.retry_batch_id,
                    timeout=DATABASE_TIMEOUT_S,
                )


# The ERP already booked this line under an earlier batch: it is delivered, not dead.
ALREADY_APPLIED = "LINE_ALREADY_APPLIED"


def retry_batch_id(name: str, letters: Sequence[DeadLetter]) -> str:
    """Derived from the dead letters and their attempt counts: the same retry keeps
    its id across restarts, and a later retry of the same lines gets a new one."""
    ensure(bool(letters), "a retry batch of no dead letters")
    parts = ",".join(f"{x.id}:{x.attempts}" for x in sorted(letters, key=_by_id))
    digest = hashlib.sha256(parts.encode()).hexdigest()[:24]
    return f"{name}.retry.{digest}"


def _by_id(letter: DeadLetter) -> int:
    return letter.id


def _line_json(line: ErpLine) -> str:
    return orjson.dumps(dataclasses.asdict(line)).decode()


def _cursor(row: Any) -> Cursor:
    inflight = None
    feed = None
    if row["inflight_seq"] is not None:
        inflight = StreamPosition(row["inflight_seq"], row["inflight_line"])
        feed = Feed(row["inflight_feed"])
    return Cursor(
        shard=row["shard"],
        acked=StreamPosition(row["acked_seq"], row["acked_line"]),
        acked_batch_id=row["acked_batch_id"],
        inflight=inflight,
        inflight_feed=feed,
    )


def _dead_letter(row: Any) -> DeadLetter:
    line = orjson.loads(row["line"])
    return DeadLetter(
        id=row["id"],
        shard=row["shard"],
        batch_id=row["batch_id"],
        line=ErpLine(**line),
        reason=row["reason"],
        message=row["message"],
        attempts=row["attempts"],
        status=DeadLetterStatus(row["status"]),
        retry_batch_id=row["retry_batch_id"],
        first_failed_us=int(row["first_failed_at"].timestamp() * 1_000_000),
        last_failed_us=int(row["last_failed_at"].timestamp() * 1_000_000),
    )
