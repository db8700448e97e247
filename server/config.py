"""Server configuration: one frozen dataclass, read from flags and environment in one
place. Flags win over STOCKWARD_* environment variables, which win over defaults."""

import dataclasses
from collections.abc import Sequence

from server.flags import parse_settings

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"


@dataclasses.dataclass(frozen=True)
class Config:
    # Postgres holding the write-ahead log.
    database_url: str = DEFAULT_DATABASE_URL
    # Postgres schema holding stockward's tables; one database can host several
    # independent servers (tests give each its own).
    database_schema: str = "stockward"
    # host:port to serve gRPC on; loopback unless told otherwise.
    listen: str = "127.0.0.1:50051"
    # Write-ahead streams and engine partitions. Fixed per database (see schema.py).
    shards: int = 4
    # Decisions per transaction: 1,000 keeps one COPY well under a megabyte and a
    # commit near a few milliseconds on a laptop SSD.
    batch_entries_max: int = 1_000
    # Decisions queued per shard before new requests get RESOURCE_EXHAUSTED: about one
    # second of the durable rate, so a stall shows as overload, not as memory growth.
    queue_entries_max: int = 20_000
    # A transaction slower than this is treated as failed and the engine recovers.
    commit_timeout_s: float = 10.0
    # How long answers stay replayable for a retry with the same request id.
    idempotency_retention_s: int = 24 * 3600
    # Pending holds get this TTL when the request says 0.
    ttl_default_s: int = 900
    # Expiry sweep period and the most holds expired per sweep: 1,000 keeps one turn
    # of the event loop near 20 ms; a full sweep is followed by another at once.
    expiry_tick_s: float = 0.2
    expiry_batch_max: int = 1_000
    # A checkpoint every so often, once enough records have accumulated since the last.
    checkpoint_interval_s: float = 60.0
    checkpoint_records_min: int = 10_000
    # Write-ahead records older than this may be deleted once the newest checkpoint
    # covers them and every ERP bridge has delivered them. A week leaves time to look
    # into a bad week of ERP numbers and to reconcile an ERP that was down for days.
    wal_retention_s: int = 7 * 24 * 3600
    # How often retention looks for records to delete.
    wal_prune_interval_s: float = 300.0
    # Records deleted per shard per pass: 100,000 rows is a few seconds of Postgres
    # work in chunks; a backlog is worked off over the following passes.
    wal_prune_records_max: int = 100_000
    # Records read to compare one ERP snapshot, over all shards: a million is some ten
    # seconds of reading. An ERP further behind gets FAILED_PRECONDITION: its counts
    # are not worth comparing until it has caught up.
    erp_unseen_records_max: int = 1_000_000
    # gRPC concurrency: more concurrent RPCs than this are refused RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 2_000
    # SIGTERM: in-flight requests get this long to finish.
    shutdown_grace_s: float = 10.0
    # Connections: one per shard writer plus reads, checkpoints and health checks.
    pool_extra_connections: int = 3
    # A starting server waits this long for a previous owner of the schema to go (after
    # a kill, Postgres ends its session within moments), then refuses to start.
    owner_wait_s: float = 15.0
    # Every call to Postgres that is not a commit gets this long.
    database_timeout_s: float = 5.0
    # Seed a small demo catalogue at start (make run).
    demo_catalogue: bool = False
    # Run even when Postgres could lose acknowledged commits (fsync or
    # synchronous_commit off). For throwaway benchmarks only.
    unsafe_allow_lossy_postgres: bool = False


def env_name(field: str) -> str:
    return "STOCKWARD_" + field.upper()


def from_args(argv: Sequence[str] | None = None) -> Config:
    config = parse_settings(
        Config,
        argv,
        prog="stockward-server",
        description="stockward reservation server",
        env_name=env_name,
    )
    validate(config)
    return config


def validate(config: Config) -> None:
    if not config.database_schema.isidentifier():
        raise SystemExit("--database-schema must be a plain identifier")
    if config.shards < 1 or config.shards > 1024:
        raise SystemExit("--shards must be from 1 to 1024")
    if (
        config.batch_entries_max < 1
        or config.queue_entries_max < config.batch_entries_max
    ):
        raise SystemExit("--queue-entries-max must be at least --batch-entries-max")
    if config.wal_retention_s < 0 or config.wal_prune_records_max < 1:
        raise SystemExit(
            "--wal-retention-s must be 0 or more, --wal-prune-records-max 1 or more"
        )
    if config.erp_unseen_records_max < 0:
        raise SystemExit("--erp-unseen-records-max must be 0 or more")
    if config.wal_prune_interval_s <= 0:
        raise SystemExit("--wal-prune-interval-s must be more than 0")
