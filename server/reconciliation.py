"""Comparing an ERP's on-hand snapshot with stockward, and correcting for it.

Design note. The ERP's counts are as of the batches it had applied, while stockward
keeps deciding. A fair comparison needs both sides as of one point in each shard's
stream:

1. The cut. In one step of the event loop, with no await, read each shard's last
   durable seq and the durable figures of the counted positions (ledger.durable_cut).
   Writers mark a batch durable in one step too, so the seqs and figures agree: the
   figures are exactly the records up to those seqs.
2. The unseen. Read from Postgres the lines after the ERP's watermark on each shard up
   to the cut's seq, and the lines it refused before its watermark (wal/unseen.py).
   The ERP's count plus those is what it would show had it seen everything up to the
   cut.
3. The findings. Difference = stockward at the cut - (ERP count + unseen). Decisions
   made after the cut change neither side of that equation.
4. The decision. One engine command answers with the findings and, with
   apply_correction, moves each diverging on-hand by minus its difference. That move
   is relative, so it stays right although more was decided since the cut.
5. The report. The findings replace the rows of erp_divergence they cover.

Known shortcoming: a dead letter being retried counts as unbooked until the bridge marks
it resolved, even if the ERP applied the retry batch before its snapshot (retry batch
ids say nothing about stream positions); such a line shows as a difference of its size
until the next snapshot after it is resolved.

Known shortcoming: a crash after the decision is durable but before the report is
stored leaves the report as it was; the retry gets the stored answer but does not write
the report again (it could overwrite a newer one), so the next snapshot refreshes it.
"""

import asyncio
import base64
import binascii
import dataclasses
import json
import logging
from collections.abc import Sequence

import asyncpg

from server.clock import Clock
from server.config import Config
from server.engine.changes import CORRECTION_KIND
from server.engine.commands import (
    Divergence,
    ReconcileOnHand,
    StockResult,
    check_count,
    check_id,
)
from server.engine.errors import InvalidArgument, Unavailable, ensure
from server.engine.limits import Limits
from server.ledger import DurableCut, Ledger
from server.wal.divergence import Reported, report_page, store_report
from server.wal.feed import NAME_PATTERN, RECONCILE_KIND, StreamPosition, parse_batch_id
from server.wal.schema import DATABASE_ERRORS
from server.wal.unseen import Unseen, check_watermarks, read_unseen

log = logging.getLogger(__name__)

# The engine writes corrections under this kind and the feed skips records of it; if
# the two names ever differ, corrections would be sent back to the ERP.
ensure(
    CORRECTION_KIND == RECONCILE_KIND, "the engine and the feed name corrections apart"
)

# The whole read of the records an ERP has not applied: well above the ten seconds the
# most allowed (Config.erp_unseen_records_max, a million) take.
_UNSEEN_READ_BUDGET_S = 60.0
# One id per shard (at most 1,024) plus the odd dead-letter retry id.
_BATCH_IDS_MAX = 2_048
# Batch ids stay within what an ERP stores (see feed.NAME_PATTERN).
_BATCH_ID_LENGTH_MAX = 128
_RETRY_MARK = ".retry."


@dataclasses.dataclass(frozen=True, slots=True)
class ErpView:
    """What the ERP says it has applied: one watermark per shard, and the bridge that
    fed it ('' when no id names one)."""

    bridge: str
    watermarks: tuple[StreamPosition, ...]


def parse_applied(batch_ids: Sequence[str], *, shard_count: int) -> ErpView:
    """The watermarks the ERP's last applied batch ids give; a shard with no id has
    seen nothing."""
    check_count(
        len(batch_ids),
        field="erp_applied_batch_ids",
        count_max=_BATCH_IDS_MAX,
        required=False,
    )
    bridges: set[str] = set()
    ends: dict[int, StreamPosition] = {}
    for index, value in enumerate(batch_ids):
        field = f"erp_applied_batch_ids[{index}]"
        check_id(value, field=field, length_max=_BATCH_ID_LENGTH_MAX)
        coverage = parse_batch_id(value)
        if coverage is None:
            bridges.add(_retry_bridge(value, field=field))
            continue
        if coverage.shard >= shard_count:
            raise InvalidArgument(
                "BATCH_ID_INVALID",
                f"{field} names stream s{coverage.shard}; this server has shards 0 to "
                f"{shard_count - 1}",
                field=field,
            )
        if coverage.shard in ends:
            raise InvalidArgument(
                "BATCH_ID_SHARD_REPEATED",
                f"{field} is a second id for stream s{coverage.shard}; give only the "
                "last batch applied on each stream",
                field=field,
            )
        ends[coverage.shard] = coverage.end
        bridges.add(coverage.name)
    if len(bridges) > 1:
        raise InvalidArgument(
            "BATCH_ID_BRIDGES_MIXED",
            f"erp_applied_batch_ids come from bridges {sorted(bridges)}; one snapshot "
            "comes from one bridge",
            field="erp_applied_batch_ids",
        )
    watermarks = tuple(
        ends.get(shard, StreamPosition(0)) for shard in range(shard_count)
    )
    return ErpView(bridge=next(iter(bridges), ""), watermarks=watermarks)


def _retry_bridge(value: str, *, field: str) -> str:
    """A dead-letter retry batch says nothing about stream positions: accepted, and
    only its bridge name is kept."""
    bridge, mark, _ = value.partition(_RETRY_MARK)
    if not mark or NAME_PATTERN.fullmatch(bridge) is None:
        raise InvalidArgument(
            "BATCH_ID_INVALID",
            f"{field} is not a batch id of the ERP feed "
            "(<bridge>.s<shard>.<seq>.<line>-<seq>.<line>, or a <bridge>.retry. id)",
            field=field,
        )
    return bridge


def findings_of(
    command: ReconcileOnHand, cut: DurableCut, unseen: Unseen, *, observed_us: int
) -> tuple[Divergence, ...]:
    """One finding per count and per channel figure, in the request's order."""
    findings: list[Divergence] = []
    for count in command.counts:
        at = (count.sku, count.location)
        findings.append(
            Divergence(
                sku=count.sku,
                location=count.location,
                channel="",
                stockward=cut.on_hand[at],
                erp=count.on_hand,
                erp_unseen=unseen.on_hand.get(at, 0),
                observed_us=observed_us,
            )
        )
        for item in count.held_by_channel:
            key = (item.channel, count.sku, count.location)
            findings.append(
                Divergence(
                    sku=count.sku,
                    location=count.location,
                    channel=item.channel,
                    stockward=cut.held[key],
                    erp=item.held,
                    erp_unseen=unseen.held.get(key, 0),
                    observed_us=observed_us,
                )
            )
    return tuple(findings)


class Reconciler:
    def __init__(
        self,
        *,
        ledger: Ledger,
        pool: asyncpg.Pool,
        clock: Clock,
        config: Config,
        limits: Limits,
    ) -> None:
        self._ledger = ledger
        self._pool = pool
        self._clock = clock
        self._config = config
        self._limits = limits

    async def reconcile(self, command: ReconcileOnHand) -> StockResult:
        """Compare an ERP snapshot (and correct for it if asked); see the note above."""
        view = parse_applied(
            command.erp_applied_batch_ids, shard_count=self._config.shards
        )
        if self._ledger.reader().replay_of(command) is not None:
            return await self._decide(command)

        positions = [(c.sku, c.location) for c in command.counts]
        channel_keys = [
            (item.channel, c.sku, c.location)
            for c in command.counts
            for item in c.held_by_channel
        ]
        observed_us = self._clock.now_us()
        cut = self._ledger.durable_cut(positions, channel_keys)
        check_watermarks(
            view.watermarks, cut.seqs, records_max=self._config.erp_unseen_records_max
        )

        unseen = await self._read_unseen(view, cut, positions)
        findings = findings_of(command, cut, unseen, observed_us=observed_us)
        result = await self._decide(dataclasses.replace(command, findings=findings))
        if not result.replayed:
            await self._store(result, command, observed_us)
        log.info(
            "erp snapshot compared: source=%s event=%s counts=%d differing=%d "
            "records=%d refused_lines=%d corrected=%s",
            command.source,
            command.source_event_id,
            len(command.counts),
            sum(1 for f in findings if f.difference),
            unseen.records,
            unseen.refused_lines,
            command.apply_correction,
        )
        return result

    async def _decide(self, command: ReconcileOnHand) -> StockResult:
        result = await self._ledger.execute(command)
        ensure(
            isinstance(result, StockResult),
            "an ERP snapshot answered a non-stock result",
        )
        assert isinstance(result, StockResult)
        return result

    async def _read_unseen(
        self, view: ErpView, cut: DurableCut, positions: list[tuple[str, str]]
    ) -> Unseen:
        try:
            async with (
                asyncio.timeout(_UNSEEN_READ_BUDGET_S),
                self._pool.acquire() as conn,
            ):
                return await read_unseen(
                    conn,
                    bridge=view.bridge,
                    watermarks=view.watermarks,
                    durable_seqs=cut.seqs,
                    positions=positions,
                )
        except DATABASE_ERRORS as error:
            raise Unavailable(
                "DATABASE_UNAVAILABLE",
                "the records the ERP has not applied could not be read; retry",
            ) from error

    async def _store(
        self, result: StockResult, command: ReconcileOnHand, observed_us: int
    ) -> None:
        """The report is secondary: the answer stands even if storing it fails."""
        try:
            async with (
                asyncio.timeout(self._config.database_timeout_s),
                self._pool.acquire() as conn,
            ):
                await store_report(
                    conn,
                    findings=result.divergences,
                    source=command.source,
                    source_event_id=command.source_event_id,
                    observed_us=observed_us,
                )
        except DATABASE_ERRORS as error:
            log.error(
                "divergence report not stored: event=%s error=%r",
                command.source_event_id,
                error,
            )

    async def list_divergences(
        self, *, sku: str, page_size: int, page_token: str
    ) -> tuple[list[Reported], str]:
        """One page of the report, and the token of the next ('' on the last)."""
        check_id(
            sku, field="sku", length_max=self._limits.sku_length_max, required=False
        )
        size = self._page_size(page_size)
        after = _decode_token(page_token)
        try:
            async with (
                asyncio.timeout(self._config.database_timeout_s),
                self._pool.acquire() as conn,
            ):
                rows = await report_page(conn, sku=sku, after=after, rows_max=size + 1)
        except DATABASE_ERRORS as error:
            raise Unavailable(
                "DATABASE_UNAVAILABLE", "the divergence report could not be read; retry"
            ) from error
        if len(rows) <= size:
            return rows, ""
        last = rows[size - 1].divergence
        return rows[:size], _encode_token((last.sku, last.location, last.channel))

    def _page_size(self, page_size: int) -> int:
        if page_size == 0:
            return self._limits.page_size_default
        if not 0 < page_size <= self._limits.page_size_max:
            raise InvalidArgument(
                "PAGE_SIZE_OUT_OF_RANGE",
                f"page_size is {page_size}; it must be from 1 to "
                f"{self._limits.page_size_max}",
                field="page_size",
            )
        return page_size


def _encode_token(after: tuple[str, str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(after)).encode()).decode()


def _decode_token(token: str) -> tuple[str, str, str]:
    if not token:
        return ("", "", "")
    try:
        after = json.loads(base64.urlsafe_b64decode(token.encode()).decode())
    except (ValueError, binascii.Error, UnicodeError) as error:
        raise _bad_token() from error
    if not (
        isinstance(after, list)
        and len(after) == 3
        and all(isinstance(part, str) for part in after)
    ):
        raise _bad_token()
    return (after[0], after[1], after[2])


def _bad_token() -> InvalidArgument:
    return InvalidArgument(
        "PAGE_TOKEN_INVALID",
        "page_token was not issued by this server",
        field="page_token",
    )
