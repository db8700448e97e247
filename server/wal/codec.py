"""JSON for the write-ahead log, checkpoints and the request log, in one place.

orjson encodes and decodes several times faster than the standard library, which
matters twice: every decision's record and answer are encoded on the write path,
and recovery decodes one record, one answer and one checkpointed reservation per
hold (a million holds meant seconds of json.loads alone). Postgres stores the
text as jsonb, so the choice of encoder is invisible to the data.
"""

from typing import Any

import orjson


def encode(value: Any) -> str:
    return orjson.dumps(value).decode()


def decode(text: str | bytes) -> Any:
    return orjson.loads(text)
