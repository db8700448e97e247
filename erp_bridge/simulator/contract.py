"""The JSON bodies the simulator accepts, checked and turned into values.

Every check raises InvalidInput naming the field at fault (`lines[3].sku`), which the
HTTP layer answers with 400. Unknown keys are ignored, as most ERPs do, and do not take
part in the content hash that tells a replay from a conflicting reuse of a batch id.
"""

import dataclasses
import hashlib
import json

from erp_bridge.simulator.config import Faults

FEEDS = ("positions", "ledger")
# Longer than any id or code stockward issues (its own limits stop at 128), short
# enough that a runaway value is caught here rather than stored.
TEXT_LENGTH_MAX = 128
# A stock movement above a trillion units is corruption, not trade; the bound also
# keeps every ledger sum an exact integer in any JSON reader.
DELTA_ABS_MAX = 10**12
# Admin lists are set up by tests; a hundred thousand entries is a generous catalogue
# and, at about 150 bytes each, fits the admin body size limit of the HTTP layer.
ADMIN_ENTRIES_MAX = 100_000


class InvalidInput(Exception):
    """A caller mistake in a request body, naming the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclasses.dataclass(frozen=True)
class Line:
    line_id: str
    sku: str
    location: str
    on_hand_delta: int
    held_delta: int
    reservation_id: str
    channel: str
    kind: str


@dataclasses.dataclass(frozen=True)
class Batch:
    batch_id: str
    # "" when the batch belongs to no stream (the key absent or empty).
    stream: str
    feed: str
    lines: tuple[Line, ...]

    def content_hash(self) -> str:
        """Digest of feed, lines and stream as canonical JSON; the batch id is left out.

        The stream takes part only when there is one, so that a batch without it
        hashes as it did before streams existed and old replays still dedupe.
        """
        content: dict[str, object] = {
            "feed": self.feed,
            "lines": [dataclasses.asdict(x) for x in self.lines],
        }
        if self.stream:
            content["stream"] = self.stream
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def count_lines(body: object) -> int:
    """Lines a batch body carries, for rate accounting before it is validated."""
    if isinstance(body, dict):
        lines = body.get("lines")
        if isinstance(lines, list):
            return len(lines)
    return 0


def parse_batch(body: object, *, lines_per_request: int) -> Batch:
    fields = _require_object(body, "body")
    batch_id = _require_text(fields, "batch_id", "", allow_empty=False)
    stream = ""
    if "stream" in fields:
        stream = _require_text(fields, "stream", "", allow_empty=True)
    feed = _require_text(fields, "feed", "", allow_empty=False)
    if feed not in FEEDS:
        raise InvalidInput("feed", f"must be one of {', '.join(FEEDS)}")

    raw_lines = fields.get("lines")
    if not isinstance(raw_lines, list):
        raise InvalidInput("lines", "must be a list")
    if not 1 <= len(raw_lines) <= lines_per_request:
        raise InvalidInput("lines", f"must hold 1..{lines_per_request} lines")
    lines = tuple(_parse_line(raw, f"lines[{i}]") for i, raw in enumerate(raw_lines))

    seen: set[str] = set()
    for i, line in enumerate(lines):
        if line.line_id in seen:
            raise InvalidInput(
                f"lines[{i}].line_id", "repeats an earlier line of the batch"
            )
        seen.add(line.line_id)
    return Batch(batch_id=batch_id, stream=stream, feed=feed, lines=lines)


def _parse_line(raw: object, where: str) -> Line:
    fields = _require_object(raw, where)
    return Line(
        line_id=_require_text(fields, "line_id", where, allow_empty=False),
        sku=_require_text(fields, "sku", where, allow_empty=False),
        location=_require_text(fields, "location", where, allow_empty=False),
        on_hand_delta=_require_int(fields, "on_hand_delta", where, DELTA_ABS_MAX),
        held_delta=_require_int(fields, "held_delta", where, DELTA_ABS_MAX),
        reservation_id=_require_text(fields, "reservation_id", where, allow_empty=True),
        channel=_require_text(fields, "channel", where, allow_empty=True),
        kind=_require_text(fields, "kind", where, allow_empty=False),
    )


def parse_text_list(body: object, key: str) -> frozenset[str]:
    """`{"<key>": ["a", "b"]}` of the admin endpoints."""
    fields = _require_object(body, "body")
    values = fields.get(key)
    if not isinstance(values, list) or len(values) > ADMIN_ENTRIES_MAX:
        raise InvalidInput(
            key, f"must be a list of at most {ADMIN_ENTRIES_MAX} strings"
        )
    for i, value in enumerate(values):
        if not isinstance(value, str) or not 1 <= len(value) <= TEXT_LENGTH_MAX:
            raise InvalidInput(
                f"{key}[{i}]", f"must be a string of 1..{TEXT_LENGTH_MAX}"
            )
    return frozenset(values)


def parse_on_hand(body: object) -> list[tuple[str, str, int]]:
    """`{"positions": [{"sku", "location", "on_hand"}]}`: the ERP's own count."""
    fields = _require_object(body, "body")
    raw = fields.get("positions")
    if not isinstance(raw, list) or len(raw) > ADMIN_ENTRIES_MAX:
        raise InvalidInput(
            "positions", f"must be a list of at most {ADMIN_ENTRIES_MAX}"
        )
    counts = []
    for i, entry in enumerate(raw):
        where = f"positions[{i}]"
        position = _require_object(entry, where)
        sku = _require_text(position, "sku", where, allow_empty=False)
        location = _require_text(position, "location", where, allow_empty=False)
        on_hand = _require_int(position, "on_hand", where, DELTA_ABS_MAX)
        counts.append((sku, location, on_hand))
    return counts


def parse_faults(body: object, current: Faults) -> Faults:
    """`{"error_rate", "applied_then_error_rate", "latency_ms"}`; absent keys stay."""
    fields = _require_object(body, "body")
    changes: dict[str, float | int] = {}
    for key in ("error_rate", "applied_then_error_rate"):
        if key in fields:
            value = fields[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInput(key, "must be a number")
            changes[key] = float(value)
    if "latency_ms" in fields:
        changes["latency_ms"] = _require_int(fields, "latency_ms", "", DELTA_ABS_MAX)

    try:
        return dataclasses.replace(current, **changes)  # type: ignore[arg-type]
    except ValueError as error:
        raise InvalidInput("faults", str(error)) from error


def _require_object(value: object, where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise InvalidInput(where, "must be a JSON object")
    return value


def _require_text(
    fields: dict[str, object], key: str, where: str, *, allow_empty: bool
) -> str:
    field = _field_name(where, key)
    value = fields.get(key)
    if not isinstance(value, str):
        raise InvalidInput(field, "is required and must be a string")
    length_min = 0 if allow_empty else 1
    if not length_min <= len(value) <= TEXT_LENGTH_MAX:
        raise InvalidInput(field, f"must be {length_min}..{TEXT_LENGTH_MAX} characters")
    return value


def _require_int(fields: dict[str, object], key: str, where: str, abs_max: int) -> int:
    field = _field_name(where, key)
    value = fields.get(key)
    # JSON true is a Python bool, which is an int; a flag is never a quantity.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(field, "is required and must be an integer")
    if abs(value) > abs_max:
        raise InvalidInput(field, f"must be within -{abs_max}..{abs_max}")
    return value


def _field_name(where: str, key: str) -> str:
    # Top-level fields are named bare (`batch_id`), nested ones (`lines[2].sku`).
    if where in ("", "body"):
        return key
    return f"{where}.{key}"
