"""The divergence report: where stockward and the ERP disagreed when last compared.

One row per (sku, location, channel), channel '' for on-hand, holding what the latest
ERP snapshot to count it found. A snapshot that finds agreement removes the row, so the
number of rows is the number of current divergences. A report older than the row it
would replace (two snapshots compared at once, stored out of order) is dropped.
"""

import dataclasses
import logging
from collections.abc import Sequence

import asyncpg

from server.engine.commands import Divergence

log = logging.getLogger(__name__)

_UPSERT_ROWS = """
INSERT INTO erp_divergence AS old (
    sku, location, channel, stockward, erp, erp_unseen, difference, observed_us,
    source, source_event_id, corrected
)
SELECT sku, location, channel, stockward, erp, erp_unseen, difference, observed_us,
    $9, $10, corrected
FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[],
    $7::bigint[], $8::bigint[], $11::boolean[]
) AS row (
    sku, location, channel, stockward, erp, erp_unseen, difference, observed_us,
    corrected
)
ON CONFLICT (sku, location, channel) DO UPDATE SET
    stockward = excluded.stockward,
    erp = excluded.erp,
    erp_unseen = excluded.erp_unseen,
    difference = excluded.difference,
    observed_us = excluded.observed_us,
    source = excluded.source,
    source_event_id = excluded.source_event_id,
    corrected = excluded.corrected
WHERE old.observed_us <= excluded.observed_us
"""

_DELETE_AGREED = """
DELETE FROM erp_divergence AS old
USING unnest($1::text[], $2::text[], $3::text[]) AS row (sku, location, channel)
WHERE (old.sku, old.location, old.channel) = (row.sku, row.location, row.channel)
  AND old.observed_us <= $4
"""

_PAGE = """
SELECT sku, location, channel, stockward, erp, erp_unseen, observed_us, source,
    source_event_id, corrected
FROM erp_divergence
WHERE ($1 = '' OR sku = $1) AND (sku, location, channel) > ($2, $3, $4)
ORDER BY sku, location, channel
LIMIT $5
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Reported:
    """A stored divergence and the snapshot that found it."""

    divergence: Divergence
    source: str
    source_event_id: str


async def store_report(
    conn: asyncpg.Connection,
    *,
    findings: Sequence[Divergence],
    source: str,
    source_event_id: str,
    observed_us: int,
) -> None:
    """Replace the rows of every figure the snapshot compared."""
    differing = [f for f in findings if f.difference]
    agreed = [f for f in findings if not f.difference]
    async with conn.transaction():
        if differing:
            await conn.execute(
                _UPSERT_ROWS,
                [f.sku for f in differing],
                [f.location for f in differing],
                [f.channel for f in differing],
                [f.stockward for f in differing],
                [f.erp for f in differing],
                [f.erp_unseen for f in differing],
                [f.difference for f in differing],
                [f.observed_us for f in differing],
                source,
                source_event_id,
                [f.corrected for f in differing],
            )
        if agreed:
            await conn.execute(
                _DELETE_AGREED,
                [f.sku for f in agreed],
                [f.location for f in agreed],
                [f.channel for f in agreed],
                observed_us,
            )


async def report_page(
    conn: asyncpg.Connection,
    *,
    sku: str,
    after: tuple[str, str, str],
    rows_max: int,
) -> list[Reported]:
    """Up to rows_max rows after `after` ((sku, location, channel)), in that order."""
    rows = await conn.fetch(_PAGE, sku, *after, rows_max)
    return [
        Reported(
            divergence=Divergence(
                sku=row["sku"],
                location=row["location"],
                channel=row["channel"],
                stockward=row["stockward"],
                erp=row["erp"],
                erp_unseen=row["erp_unseen"],
                observed_us=row["observed_us"],
                corrected=row["corrected"],
            ),
            source=row["source"],
            source_event_id=row["source_event_id"],
        )
        for row in rows
    ]
