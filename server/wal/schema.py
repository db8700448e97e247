"""Tables of the write-ahead log, and the durability settings the server insists on.

wal_records holds every commitment, one stream per shard, in commit order: a shard has
one writer, which starts a transaction only after the previous one committed, so a
record with a higher seq is never visible before a lower one. request_log keeps the
answer to every mutating request for idempotent replay. A checkpoint is the state as of
a seq per shard; recovery loads the newest complete one and replays the records after it.
Records stay until retention (retention.py) finds them old, checkpointed and delivered.

The bridge tables belong to `erp_bridge` (see erp_bridge/store.py) but are created here,
with the rest, because the server reads them too: reconciliation needs to know what the
ERP was sent, and retention must keep every record a bridge has not yet delivered.
bridge_cursors holds, per bridge name and shard, the stream position the ERP has
acknowledged and the end of the batch planned after it, which a restart resends as is.
bridge_dead_letters holds the lines the ERP refused, with its reason, until an operator
retries or discards them; status is one of dead, retrying, resolved, discarded.

erp_divergence is the server's report of where the ERP's last snapshot of a position
disagreed with stockward (see server/wal/divergence.py): one row per sku, location and
channel ('' for on-hand), removed when a later snapshot agrees.
"""

import asyncio
import logging

import asyncpg

from server.engine.errors import ensure

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"

# How often a starting server asks again for the owner lock.
_OWNER_RETRY_S = 0.1

DDL = """
CREATE TABLE IF NOT EXISTS stockward_meta (
    key text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE IF NOT EXISTS wal_records (
    shard smallint NOT NULL,
    seq bigint NOT NULL,
    kind text NOT NULL,
    reservation_id text NOT NULL,
    body jsonb NOT NULL,
    recorded_us bigint NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (shard, seq)
);
CREATE TABLE IF NOT EXISTS request_log (
    scope text NOT NULL,
    request_id text NOT NULL,
    fingerprint text NOT NULL,
    result jsonb NOT NULL,
    created_us bigint NOT NULL,
    PRIMARY KEY (scope, request_id)
);
CREATE INDEX IF NOT EXISTS request_log_created_us ON request_log (created_us);
CREATE TABLE IF NOT EXISTS checkpoints (
    id bigserial PRIMARY KEY,
    created_us bigint NOT NULL,
    shard_seqs bigint[] NOT NULL,
    complete boolean NOT NULL DEFAULT false
);
ALTER TABLE checkpoints ADD COLUMN IF NOT EXISTS policies jsonb NOT NULL DEFAULT '{}';
CREATE TABLE IF NOT EXISTS checkpoint_positions (
    checkpoint_id bigint NOT NULL REFERENCES checkpoints (id) ON DELETE CASCADE,
    sku text NOT NULL,
    location text NOT NULL,
    on_hand bigint NOT NULL,
    held bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoint_positions_id ON checkpoint_positions (checkpoint_id);
CREATE TABLE IF NOT EXISTS checkpoint_reservations (
    checkpoint_id bigint NOT NULL REFERENCES checkpoints (id) ON DELETE CASCADE,
    body jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoint_reservations_id
    ON checkpoint_reservations (checkpoint_id);
CREATE TABLE IF NOT EXISTS bridge_cursors (
    name text NOT NULL,
    shard smallint NOT NULL,
    acked_seq bigint NOT NULL DEFAULT 0,
    acked_line integer NOT NULL DEFAULT 0,
    acked_batch_id text NOT NULL DEFAULT '',
    acked_at timestamptz,
    inflight_seq bigint,
    inflight_line integer,
    inflight_feed text,
    PRIMARY KEY (name, shard)
);
CREATE TABLE IF NOT EXISTS bridge_dead_letters (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    shard smallint NOT NULL,
    batch_id text NOT NULL,
    end_seq bigint NOT NULL,
    end_line integer NOT NULL,
    line_id text NOT NULL,
    line jsonb NOT NULL,
    reason text NOT NULL,
    message text NOT NULL,
    attempts integer NOT NULL DEFAULT 1,
    status text NOT NULL,
    retry_batch_id text,
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    last_failed_at timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    UNIQUE (name, line_id)
);
CREATE INDEX IF NOT EXISTS bridge_dead_letters_status
    ON bridge_dead_letters (name, status, id);
CREATE TABLE IF NOT EXISTS erp_divergence (
    sku text NOT NULL,
    location text NOT NULL,
    channel text NOT NULL,
    stockward bigint NOT NULL,
    erp bigint NOT NULL,
    erp_unseen bigint NOT NULL,
    difference bigint NOT NULL,
    observed_us bigint NOT NULL,
    source text NOT NULL,
    source_event_id text NOT NULL,
    corrected boolean NOT NULL,
    PRIMARY KEY (sku, location, channel)
);
"""

# What a database call can fail with: server errors, a broken or closed connection, the
# socket, or our own timeout. The one list every caller of Postgres catches.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)

# The write fence, an advisory lock per schema. Every writer transaction holds it shared;
# recovery takes it exclusively before it reads, so a commit that was still on its way
# when a write failed (a timeout, a lost answer to COMMIT) has landed or died by then.
WRITE_FENCE_SHARED = (
    "SELECT pg_advisory_xact_lock_shared(hashtext(current_schema() || ':wal-fence'))"
)
WRITE_FENCE_LOCK = "SELECT pg_advisory_lock(hashtext(current_schema() || ':wal-fence'))"
WRITE_FENCE_UNLOCK = (
    "SELECT pg_advisory_unlock(hashtext(current_schema() || ':wal-fence'))"
)

# Ownership: one server process per schema. Two would each promise the same units.
# Held on a connection of its own for the server's lifetime; Postgres releases it when
# that connection ends, including when the process is killed.
OWNER_TRY_LOCK = "SELECT pg_try_advisory_lock(hashtext(current_schema() || ':owner'))"

# Serialises schema creation when several servers or tests start at once.
_SCHEMA_LOCK_KEY = 0x5704_C3A4D


class UnsafeDatabase(Exception):
    """Postgres would acknowledge commits it could still lose."""


class SchemaOwned(Exception):
    """Another server process serves this schema."""


async def take_ownership(conn: asyncpg.Connection, *, wait_s: float) -> None:
    """Take the schema's owner lock, waiting up to wait_s for a previous owner's
    connection to end (after a kill, Postgres notices within moments)."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while not await conn.fetchval(OWNER_TRY_LOCK):
        if asyncio.get_running_loop().time() > deadline:
            raise SchemaOwned(
                "another stockward server holds this schema; one process per schema"
            )
        await asyncio.sleep(_OWNER_RETRY_S)


async def check_durability(conn: asyncpg.Connection, *, allow_unsafe: bool) -> None:
    fsync = await conn.fetchval("SHOW fsync")
    synchronous_commit = await conn.fetchval("SHOW synchronous_commit")
    if fsync == "on" and synchronous_commit != "off":
        return
    message = (
        f"postgres has fsync={fsync} synchronous_commit={synchronous_commit}: "
        "an acknowledged reservation could be lost in a crash"
    )
    if not allow_unsafe:
        raise UnsafeDatabase(
            message + "; pass --unsafe-allow-lossy-postgres to run anyway"
        )
    log.warning("durability off: %s", message)


async def ensure_schema(conn: asyncpg.Connection, *, shard_count: int) -> None:
    """Create the tables if missing and pin the shard count the records were made with."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_KEY)
        await conn.execute(DDL)
        await conn.execute(
            "INSERT INTO stockward_meta (key, value) VALUES ('schema_version', $1), "
            "('shard_count', $2) ON CONFLICT (key) DO NOTHING",
            SCHEMA_VERSION,
            str(shard_count),
        )
        stored = await conn.fetchval(
            "SELECT value FROM stockward_meta WHERE key = 'shard_count'"
        )
    ensure(stored is not None, "stockward_meta lost its shard_count")
    if int(stored) != shard_count:
        # Moving skus between shards needs a migration that rewrites the streams.
        raise UnsafeDatabase(
            f"the database was written with {stored} shards; this server runs "
            f"{shard_count}. Start it with --shards {stored}."
        )
