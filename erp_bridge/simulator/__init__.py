"""A simulated ERP for tests and benchmarks of the bridge: strict, rate-limited, faulty.

It behaves as the ERP the bridge must live with, not as a stub that says yes: it
throttles, fails on purpose (also after booking), refuses lines it cannot book, and
makes replays harmless by batch id and by line id. Run it on its own with
`python -m erp_bridge.simulator --listen 127.0.0.1:PORT`, or in-process through
`ErpSimulator(config, clock=...)` with `start()`/`stop()` or `app()`.

HTTP contract (JSON in and out; every error body is
`{"error": {"code", "message", ...}}`, and `field` names the culprit of a 400 or 409):

Auth. When a token is configured, every endpoint needs `Authorization: Bearer <token>`;
otherwise 401 `UNAUTHORIZED`.

`POST /v1/batches` with `{"batch_id": str, "stream": str (optional), "feed":
"positions"|"ledger", "lines": [{"line_id": str, "sku": str, "location": str,
"on_hand_delta": int, "held_delta": int, "reservation_id": str (may be ""), "channel":
str (may be ""), "kind": str}]}`. Texts are 1..128 characters (the optional ones
0..128), deltas within +-10^12, unknown keys are ignored. A `stream` names the ordered
sequence the batch belongs to; absent and "" both mean none. Handling, in order:
1. Rate limits: at most `requests_per_s` batch requests and `lines_per_s` lines admitted
   in any sliding one-second window, and at most `concurrent_max` batch requests in
   progress. Over any -> 429 `RATE_LIMITED` with `Retry-After` (whole seconds, at least
   1, until the binding limit frees up), `limit` (that limit's name: `requests_per_s`,
   `lines_per_s` or `concurrent_max`), `limits` (every limit exceeded) and
   `retry_after_s`. Only the line count is read before this step.
2. Latency: the request waits `latency_ms` on the simulator's clock, in progress.
3. Validation: missing or mistyped fields, an unknown feed, no lines or more than
   `lines_per_request`, a line id repeated within the batch, a sku that does not
   match the configured `sku_pattern` -> 400 `INVALID_ARGUMENT`
   with `field` (`batch_id`, `lines`, `lines[2].sku`, or `body` if not a JSON object).
4. Fault dice, one seeded draw per valid request: with probability `error_rate`
   -> 503 `UNAVAILABLE`, nothing applied.
5. Dedupe by batch id, comparing a SHA-256 of the canonical JSON of feed and lines,
   plus the stream when there is one (so batches without one hash as they always did):
   seen with the same content -> 200 with `"status": "duplicate"` and the first answer's
   `applied_lines` and `rejected`, nothing applied; different content -> 409
   `BATCH_CONFLICT` with `field: "batch_id"`.
6. Booking: each line is booked unless its line id was booked before, under any batch
   id (`LINE_ALREADY_APPLIED`), its sku is not in the item master when one is loaded
   (`UNKNOWN_ITEM`), or its location's period is closed (`PERIOD_CLOSED`). A booked line
   adds `on_hand_delta` to on-hand and `held_delta` to held of (sku, location). Answer
   200 `{"batch_id", "status": "applied", "applied_lines": n, "rejected": [{"line_id",
   "reason", "message"}]}`, even when every line was refused.
7. With probability `applied_then_error_rate` (same draw) the batch is booked and the
   answer is 500 `INTERNAL` instead; a retry of it then gets "duplicate".

`GET /v1/ledger` -> `{"positions": [{"sku", "location", "on_hand", "held"}] sorted by
sku then location, "last_batch_id" ("" before the first), "last_batch_ids" ({stream:
the last batch id booked on it}, streams sorted; a duplicate changes nothing),
"batches_applied" (batches booked, including those whose lines were all refused),
"lines_applied"}`. The answer is an atomic snapshot: it is built in one step without an
await, so no batch is booked between reading the positions and reading
`last_batch_ids`, and a test may compare the two as the ERP's state at one instant.

`GET /v1/stats` -> batch-request counters `requests`, `applied`, `duplicates`,
`conflicts`, `invalid`, `rejected_lines`, `throttled` (429s), `failed` (5xx),
`unauthorized`, `requests_in_progress`, `max_requests_in_progress`; the peaks
`max_requests_in_any_second` and `max_lines_in_any_second`, measured over sliding
one-second windows on arrival (throttled requests included, so a figure above the limit
means the client sent too fast); and `limits`.

Admin, same auth: `PUT /v1/admin/items {"skus": [...]}` replaces the item master (empty:
every sku known); `PUT /v1/admin/closed-locations {"locations": [...]}` replaces the set
of locations whose period is closed; `PUT /v1/admin/faults {"error_rate",
"applied_then_error_rate", "latency_ms"}` changes the given ones; `PUT
/v1/admin/on-hand {"positions": [{"sku", "location", "on_hand"}]}` overwrites on-hand
with the ERP's own count, held unchanged.
"""

from erp_bridge.simulator.app import ErpSimulator, MonotonicClock, Stats
from erp_bridge.simulator.config import Faults, SimulatorConfig

__all__ = ["ErpSimulator", "Faults", "MonotonicClock", "SimulatorConfig", "Stats"]
