"""Bridge configuration: one frozen dataclass, read from flags and environment in one
place. Flags win over STOCKWARD_BRIDGE_* environment variables, which win over defaults.

The ERP's limits are configured as the ERP states them (per second, per request,
concurrent); the bridge derives its GCRA limits from them so that no sliding second
ever holds more than the ERP allows (see erp_bridge/rate_limit.py).
"""

import dataclasses
import json
from collections.abc import Sequence

from erp_bridge.adapters import Feed
from server.config import DEFAULT_DATABASE_URL
from server.flags import parse_settings
from server.wal.feed import NAME_PATTERN

ADAPTERS = ("http", "file")
# Any wait configured in seconds: an hour is already far past a sensible setting, and
# the bound keeps a typo from making the bridge look hung.
DURATION_MAX_S = 3_600.0
# A dead-letter retry batch is claimed as one page of dead letters (store.py).
LINES_PER_REQUEST_MAX = 1_000


@dataclasses.dataclass(frozen=True)
class BridgeConfig:
    # The stockward database and schema whose write-ahead records are fed.
    database_url: str = DEFAULT_DATABASE_URL
    database_schema: str = "stockward"
    # Names this feed: part of every batch and line id and of the cursor's key, so two
    # bridges (say an ERP and a data warehouse) can read the same records apart.
    name: str = "erp"
    # positions: one netted line per (sku, location) per batch; ledger: one line per
    # stock effect of every commitment.
    feed: str = Feed.POSITIONS.value
    # Shards this process feeds, comma separated; empty means all. Each shard's stream
    # is owned by one process at a time (an advisory lock), so overlapping lists are
    # safe: the second process waits as a standby.
    shards: str = ""
    # Where a new cursor starts: "beginning" (every retained record) or "end".
    start_from: str = "beginning"

    # The ERP adapter: http (erp_url) or file (drop_dir).
    adapter: str = "http"
    erp_url: str = "http://127.0.0.1:8900"
    # An auth header sent with every request, as "Name: value"; empty for none.
    erp_auth_header: str = ""
    # JSON object renaming fields for the ERP, e.g. {"sku": "itemNumber"}.
    erp_field_mapping: str = ""
    drop_dir: str = ".data/erp-drop"

    # The ERP's limits, as it states them.
    requests_per_s: int = 10
    lines_per_request: int = 500
    lines_per_s: int = 5_000
    concurrent_requests_max: int = 4
    # One request may take this long before it counts as failed (and is resent).
    request_timeout_s: float = 10.0
    # The quota is taken when a send is admitted, the ERP counts when it arrives; a
    # send may lag its admission by this much (event loop, slot) without a sliding
    # second at the ERP ever seeing more than its limit. Costs 2% of the rate.
    send_delay_allowance_ms: int = 20

    # A batch waits at most this long for more lines before it goes out part full.
    batch_window_s: float = 0.5
    # How often an idle stream looks for new records. LISTEN/NOTIFY would save the
    # polls, at the cost of a connection per stream held in LISTEN.
    poll_interval_s: float = 0.05

    # Backoff after a 5xx or timeout: doubling from the first, capped, with jitter.
    backoff_first_s: float = 0.2
    backoff_max_s: float = 30.0
    # Consecutive failures that open the circuit breaker, and how long it stays open
    # before one probe request is let through.
    breaker_failures: int = 5
    breaker_open_s: float = 10.0
    # After the ERP refused a whole batch (auth, conflict), try again this often: an
    # operator may have fixed the ERP side meanwhile.
    refused_retry_s: float = 60.0

    # Redis holding the shared quota; every bridge on the same ERP account uses the
    # same key prefix.
    redis_url: str = "redis://127.0.0.1:6379/0"
    quota_key: str = "stockward:erp-quota"

    # The admin gRPC service (status, dead letters) and the Prometheus metrics page;
    # port 0 picks a free one, an empty value turns it off.
    admin_listen: str = "127.0.0.1:50061"
    metrics_listen: str = "127.0.0.1:9464"

    def shard_list(self, shard_count: int) -> list[int]:
        if not self.shards:
            return list(range(shard_count))
        try:
            chosen = sorted({int(part) for part in self.shards.split(",") if part})
        except ValueError as error:
            raise SystemExit(f"--shards must list shard numbers: {error}") from error
        for shard in chosen:
            if not 0 <= shard < shard_count:
                raise SystemExit(
                    f"--shards names {shard}; the database has shards 0..{shard_count - 1}"
                )
        return chosen


def env_name(field: str) -> str:
    return "STOCKWARD_BRIDGE_" + field.upper()


def from_args(argv: Sequence[str] | None = None) -> BridgeConfig:
    config = parse_settings(
        BridgeConfig,
        argv,
        prog="stockward-erp-bridge",
        description="feed stockward's commitments to the ERP in rate-limited batches",
        env_name=env_name,
    )
    validate(config)
    return config


def validate(config: BridgeConfig) -> None:
    if not config.database_schema.isidentifier():
        raise SystemExit("--database-schema must be a plain identifier")
    if not NAME_PATTERN.fullmatch(config.name):
        raise SystemExit(f"--name must match {NAME_PATTERN.pattern}")
    if config.feed not in {feed.value for feed in Feed}:
        raise SystemExit("--feed must be positions or ledger")
    if config.adapter not in ADAPTERS:
        raise SystemExit(f"--adapter must be one of {', '.join(ADAPTERS)}")
    if config.start_from not in ("beginning", "end"):
        raise SystemExit("--start-from must be beginning or end")
    if (
        min(
            config.requests_per_s,
            config.lines_per_request,
            config.lines_per_s,
            config.concurrent_requests_max,
        )
        < 1
    ):
        raise SystemExit("the ERP limits must all be at least 1")
    for name in (
        "poll_interval_s",
        "batch_window_s",
        "request_timeout_s",
        "backoff_first_s",
        "breaker_open_s",
        "refused_retry_s",
    ):
        if not 0 < getattr(config, name) <= DURATION_MAX_S:
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"{flag} must be above 0 and at most {DURATION_MAX_S:g}")
    if config.backoff_max_s < config.backoff_first_s:
        raise SystemExit("--backoff-max-s may not be below --backoff-first-s")
    if config.breaker_failures < 1:
        raise SystemExit("--breaker-failures must be at least 1")
    if config.lines_per_request > LINES_PER_REQUEST_MAX:
        raise SystemExit(f"--lines-per-request may be at most {LINES_PER_REQUEST_MAX}")
    if config.erp_field_mapping:
        try:
            mapping = json.loads(config.erp_field_mapping)
        except ValueError as error:
            raise SystemExit(f"--erp-field-mapping is not JSON: {error}") from error
        if not isinstance(mapping, dict) or not all(
            isinstance(v, str) for v in mapping.values()
        ):
            raise SystemExit("--erp-field-mapping must be a JSON object of names")
    if not 0 <= config.send_delay_allowance_ms <= 1_000:
        raise SystemExit("--send-delay-allowance-ms must be within 0..1000")
    if config.lines_per_request > config.lines_per_s:
        # A full request could then never be admitted by the lines-per-second limit.
        raise SystemExit("--lines-per-request may not exceed --lines-per-s")
    if config.erp_auth_header and ":" not in config.erp_auth_header:
        raise SystemExit('--erp-auth-header must read "Name: value"')
