"""When and how long to wait before trying a call again.

Only UNAVAILABLE is retried by default: stockward answers it while recovering or when
it cannot reach Postgres, and every write carries an idempotency key, so sending the
same command again with the same key either applies it once or returns the stored
answer. RESOURCE_EXHAUSTED (full queues, a throttled channel) is retried only when
asked for, after the delay the server names. Nothing else is retried: a caller
mistake stays a mistake, and a deadline is the caller's budget, not ours to extend.
"""

import dataclasses
import random

from clients.errors import ResourceExhaustedError, StockwardError, UnavailableError


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    # Tries per logical operation, the first included. Four tries with the backoff
    # below span about half a second: enough for a server restart on loopback,
    # short enough that a real outage surfaces to the caller quickly.
    attempts_max: int = 4
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 1.0
    backoff_multiplier: float = 2.0
    retry_resource_exhausted: bool = False

    def __post_init__(self) -> None:
        if self.attempts_max < 1:
            raise ValueError("attempts_max must be at least 1")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError("backoff_initial_s must be > 0 and <= backoff_max_s")

    def should_retry(self, error: StockwardError, attempt: int) -> bool:
        """Whether to try again after `error` on try number `attempt` (from 1)."""
        if attempt >= self.attempts_max:
            return False
        if isinstance(error, UnavailableError):
            return True
        return self.retry_resource_exhausted and isinstance(
            error, ResourceExhaustedError
        )

    def delay_s(self, error: StockwardError, attempt: int, rng: random.Random) -> float:
        """Full jitter over a capped exponential backoff, so that many clients cut
        off by the same outage do not come back in step; never shorter than a delay
        the server asked for."""
        ceiling_s = min(
            self.backoff_max_s,
            self.backoff_initial_s * self.backoff_multiplier ** (attempt - 1),
        )
        return max(rng.uniform(0.0, ceiling_s), error.retry_after_s or 0.0)
