"""What the bridge reports about itself: per stream, per endpoint and in total.

The running bridge keeps one `Counters` and one `StreamStatus` per stream it owns; the
status RPC and the metrics page both read a `BridgeStatus` snapshot, so the two never
tell different stories.
"""

import collections
import dataclasses
import enum
import statistics

# Delivery lags kept for the percentiles: the last few thousand batches, minutes of
# traffic at an ERP's usual request rates, in well under a megabyte.
LAG_SAMPLES_MAX = 4_096


class StreamState(enum.StrEnum):
    # Another process feeds this shard; this one waits to take over.
    STANDBY = "standby"
    # Waiting for records or for the batch window.
    IDLE = "idle"
    SENDING = "sending"
    # Waiting out a 429, a backoff or an open breaker.
    WAITING = "waiting"
    # The ERP refused a whole batch; retried every refused_retry_s.
    REFUSED = "refused"


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclasses.dataclass
class StreamStatus:
    shard: int
    state: StreamState = StreamState.STANDBY
    acked_seq: int = 0
    acked_line: int = 0
    acked_batch_id: str = ""
    # The newest record of the shard, and how far behind the ERP is.
    head_seq: int = 0
    lag_records: int = 0
    lag_s: float = 0.0
    last_error: str = ""


@dataclasses.dataclass
class Counters:
    batches: int = 0
    # Lines read from the records, and lines sent after netting.
    lines_in: int = 0
    lines_out: int = 0
    # Batches whose lines all netted to nothing: acknowledged without a request.
    batches_empty: int = 0
    requests: int = 0
    throttled: int = 0
    retries: int = 0
    duplicates: int = 0
    lines_dead_lettered: int = 0
    lines_refused_invalid: int = 0

    @property
    def netting_ratio(self) -> float:
        """Lines read per line sent (1.0 without netting)."""
        return self.lines_in / self.lines_out if self.lines_out else 1.0


class LagSamples:
    """Seconds from a record's commit to the ERP's acknowledgement of its batch."""

    def __init__(self) -> None:
        self._samples: collections.deque[float] = collections.deque(
            maxlen=LAG_SAMPLES_MAX
        )

    def add(self, lag_s: float) -> None:
        self._samples.append(max(0.0, lag_s))

    def percentile(self, fraction: float) -> float:
        if not self._samples:
            return 0.0
        if len(self._samples) == 1:
            return self._samples[0]
        cuts = statistics.quantiles(self._samples, n=100, method="inclusive")
        return cuts[min(98, max(0, round(fraction * 100) - 1))]


@dataclasses.dataclass(frozen=True)
class BridgeStatus:
    name: str
    feed: str
    endpoint: str
    breaker: BreakerState
    streams: tuple[StreamStatus, ...]
    counters: Counters
    dead_letters: dict[str, int]
    divergences: int
    delivery_lag_p50_s: float
    delivery_lag_p99_s: float
    # Over the last status period.
    batches_per_s: float = 0.0
    lines_per_s: float = 0.0
