"""ERP snapshots over gRPC: counts compared against stockward at a consistent cut,
corrections, the divergence report, and refusals, on a real server and Postgres."""

import base64

import grpc
import pytest

from server.config import Config
from server.wal import codec
from server.wal.feed import StreamPosition, lines_of
from stockward.v1 import admin_pb2, admin_pb2_grpc, inventory_pb2, inventory_pb2_grpc
from tests.api.client import (
    availability_at,
    confirm,
    line,
    refusal,
    refused,
    reserve,
    reserve_request,
    set_on_hand,
    taken,
)
from tests.api.erp_snapshots import (
    Count,
    add_dead_letter,
    applied_ids,
    compare,
    differences,
    home_shard,
    last_seqs,
    report,
    snapshot_request,
    stream,
)
from tests.conftest import Running, ServerFactory
from tests.reliability.server_process import CHANNEL_OPTIONS, ServerProcess
from tests.wal.durable import connect

A, B = "SKU-A", "SKU-B"
DC = "DC"
WEB = "web"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


async def _adjust(server: Running, event_id: str, sku: str, delta: int) -> None:
    await server.admin.AdjustStock(
        admin_pb2.AdjustStockRequest(
            source="wms",
            source_event_id=event_id,
            adjustments=[
                admin_pb2.StockAdjustment(
                    sku=sku,
                    location=DC,
                    delta=delta,
                    reason=admin_pb2.ADJUSTMENT_REASON_COUNT_CORRECTION,
                )
            ],
        )
    )


async def _hold_and_ship(server: Running, held: int, shipped: int) -> None:
    """A web order of `held` units of A at DC, confirmed, `shipped` of them fulfilled."""
    answer = await reserve(
        server, reserve_request("order-1", line(A, held, location=DC))
    )
    await confirm(server, answer.reservation_id)
    await server.inventory.Fulfill(
        inventory_pb2.FulfillRequest(
            request_id="ship-1",
            reservation_id=answer.reservation_id,
            lines=[taken(A, DC, shipped)],
        )
    )


async def _on_hand(server: Running, sku: str) -> int:
    return (await availability_at(server, sku))[DC][0]


async def _full_watermarks(config: Config) -> list[StreamPosition]:
    async with connect(config.database_schema) as conn:
        return [StreamPosition(seq) for seq in await last_seqs(conn)]


async def _record_count(config: Config) -> int:
    async with connect(config.database_schema) as conn:
        count: int = await conn.fetchval("SELECT count(*) FROM wal_records")
        return count


async def test_a_snapshot_in_step_with_stockward_differs_only_where_planted(
    start_server: ServerFactory, config: Config
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", (A, DC, 100), (B, DC, 50))
    await _hold_and_ship(server, held=5, shipped=3)
    await _adjust(server, "damage-1", B, -4)
    watermarks = await _full_watermarks(config)

    # The ERP booked everything: A 97 with 2 held for web, B 46; B is counted 2 over.
    response = await compare(
        server,
        "snap-1",
        [Count(A, DC, 97, held=((WEB, 2),)), Count(B, DC, 48)],
        applied_ids(watermarks),
    )

    assert differences(response) == {(A, DC, ""): 0, (A, DC, WEB): 0, (B, DC, ""): -2}
    figures = {
        (d.sku, d.channel): (d.stockward, d.erp, d.erp_unseen)
        for d in response.divergences
    }
    assert figures == {(A, ""): (97, 97, 0), (A, WEB): (2, 2, 0), (B, ""): (46, 48, 0)}
    assert not response.replayed
    assert (await _on_hand(server, A), await _on_hand(server, B)) == (97, 46)
    async with connect(config.database_schema) as conn:
        assert await report(conn) == {(B, DC, ""): -2}


async def test_lines_after_the_watermark_count_as_unseen_even_within_a_record(
    start_server: ServerFactory, config: Config
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", (A, DC, 100), (B, DC, 50))
    async with connect(config.database_schema) as conn:
        count_seq = (await last_seqs(conn))[home_shard(A)]
    await _hold_and_ship(server, held=5, shipped=3)
    await _adjust(server, "damage-1", B, -4)

    # The ERP applied the count's first line (A 100) and not its second (B 50), and
    # nothing after: on every other shard it has seen nothing at all.
    watermarks = [StreamPosition(0)] * 3
    watermarks[home_shard(A)] = StreamPosition(count_seq - 1, 1)
    response = await compare(
        server,
        "snap-1",
        [Count(A, DC, 100, held=((WEB, 0),)), Count(B, DC, 0)],
        applied_ids(watermarks),
    )

    figures = {
        (d.sku, d.channel): (d.stockward, d.erp_unseen, d.difference)
        for d in response.divergences
    }
    assert figures == {(A, ""): (97, -3, 0), (A, WEB): (2, 2, 0), (B, ""): (46, 46, 0)}


async def test_lines_the_erp_refused_before_its_watermark_count_as_unseen(
    start_server: ServerFactory, config: Config
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", (A, DC, 100))
    await _adjust(server, "receipt-1", A, 10)
    await _adjust(server, "receipt-2", A, 7)
    await _adjust(server, "damage-1", A, -1)
    async with connect(config.database_schema) as conn:
        lines = await stream(conn, home_shard(A))
        count_line, receipt_1, receipt_2, damage = lines
        # Refused and not booked: both receipts. Refused but booked on a retry: the
        # count. Refused after the watermark: the damage, unseen through its record.
        await add_dead_letter(
            conn, line=count_line, end=StreamPosition(count_line.seq), status="resolved"
        )
        await add_dead_letter(
            conn, line=receipt_1, end=StreamPosition(receipt_1.seq), status="dead"
        )
        await add_dead_letter(
            conn, line=receipt_2, end=StreamPosition(receipt_2.seq), status="retrying"
        )
        await add_dead_letter(
            conn, line=damage, end=StreamPosition(damage.seq), status="dead"
        )
    watermarks = [StreamPosition(0)] * 3
    watermarks[home_shard(A)] = StreamPosition(receipt_2.seq)

    response = await compare(
        server, "snap-1", [Count(A, DC, 100)], [*applied_ids(watermarks), "erp.retry.9"]
    )

    [found] = response.divergences
    assert (found.stockward, found.erp, found.erp_unseen, found.difference) == (
        116,
        100,
        16,
        0,
    )


async def test_a_correction_moves_on_hand_by_minus_the_difference_once(
    start_server: ServerFactory, config: Config
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", (A, DC, 100))
    await _adjust(server, "damage-1", A, -3)
    batch_ids = applied_ids(await _full_watermarks(config))
    records_before = await _record_count(config)

    first = await compare(
        server, "snap-1", [Count(A, DC, 90)], batch_ids, apply_correction=True
    )
    again = await compare(
        server, "snap-1", [Count(A, DC, 90)], batch_ids, apply_correction=True
    )

    assert [(d.difference, d.corrected) for d in first.divergences] == [(7, True)]
    assert again.replayed and list(again.divergences) == list(first.divergences)
    assert await _on_hand(server, A) == 90
    async with connect(config.database_schema) as conn:
        rows = await conn.fetch(
            "SELECT shard, seq, kind, reservation_id, body FROM wal_records "
            "WHERE kind = 'reconcile'"
        )
        assert await report(conn) == {(A, DC, ""): 7}
    assert await _record_count(config) == records_before + 1
    [row] = rows
    body = codec.decode(row["body"])
    assert body["fx"] == [[A, DC, -7, 0]]
    assert (
        lines_of(
            shard=row["shard"],
            seq=row["seq"],
            kind=row["kind"],
            reservation_id=row["reservation_id"],
            body=body,
        )
        == []
    )

    # The correction lies after the ERP's watermark but is nothing the ERP must see:
    # the same count against the same watermark now agrees, and the report clears.
    after = await compare(server, "snap-2", [Count(A, DC, 90)], batch_ids)
    assert [(d.stockward, d.erp_unseen, d.difference) for d in after.divergences] == [
        (90, 0, 0)
    ]
    async with connect(config.database_schema) as conn:
        assert await report(conn) == {}


async def test_a_correction_below_zero_is_refused_and_changes_nothing(
    start_server: ServerFactory, config: Config
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", (A, DC, 10))
    watermarks = await _full_watermarks(config)
    await _adjust(server, "damage-1", A, -8)
    records_before = await _record_count(config)

    # The ERP counts 0 before a damage of 8 it has not seen: on-hand would become -8.
    error = await refused(
        compare(
            server,
            "snap-1",
            [Count(A, DC, 0)],
            applied_ids(watermarks),
            apply_correction=True,
        )
    )

    assert refusal(error) == (
        PRECONDITION,
        "ON_HAND_WOULD_GO_NEGATIVE",
        "counts[0].on_hand",
    )
    assert await _on_hand(server, A) == 2
    assert await _record_count(config) == records_before
    async with connect(config.database_schema) as conn:
        assert await report(conn) == {}
    # Nothing was remembered either: the event id is free for a snapshot that fits.
    fits = await compare(server, "snap-1", [Count(A, DC, 10)], applied_ids(watermarks))
    assert differences(fits) == {(A, DC, ""): 0}


async def test_a_correction_survives_a_sigkill_and_replays_after_restart(
    server_process: ServerProcess,
) -> None:
    await server_process.wait_serving()
    counts = [Count(A, DC, 40)]
    async with grpc.aio.insecure_channel(
        server_process.address, options=CHANNEL_OPTIONS
    ) as channel:
        admin = admin_pb2_grpc.StockAdminServiceStub(channel)
        await admin.SetOnHand(
            admin_pb2.SetOnHandRequest(
                source="erp",
                source_event_id="count-1",
                counts=[admin_pb2.OnHandCount(sku=A, location=DC, on_hand=50)],
            )
        )
        first = await admin.SetOnHand(
            snapshot_request("snap-1", counts, apply_correction=True)
        )

    server_process.kill()
    assert await server_process.wait_exit() == -9
    await server_process.start()
    await server_process.wait_serving()

    async with grpc.aio.insecure_channel(
        server_process.address, options=CHANNEL_OPTIONS
    ) as channel:
        admin = admin_pb2_grpc.StockAdminServiceStub(channel)
        again = await admin.SetOnHand(
            snapshot_request("snap-1", counts, apply_correction=True)
        )
        # The ERP had seen nothing, so it has 50 to come: 40 + 50 against 50.
        [found] = first.divergences
        assert (found.erp_unseen, found.difference, found.corrected) == (50, -40, True)
        assert again.replayed and list(again.divergences) == list(first.divergences)
        assert [p.on_hand for p in again.positions] == [90], server_process.log_tail()
        inventory = inventory_pb2_grpc.InventoryServiceStub(channel)
        view = await inventory.GetAvailability(
            inventory_pb2.GetAvailabilityRequest(skus=[A])
        )
        assert view.skus[0].total.on_hand == 90


@pytest.mark.parametrize(
    ("batch_ids", "expected"),
    [
        (["not-a-batch"], (INVALID, "BATCH_ID_INVALID", "erp_applied_batch_ids[0]")),
        (["erp.s0.5.0-3.0"], (INVALID, "BATCH_ID_INVALID", "erp_applied_batch_ids[0]")),
        (["erp.s7.0.0-1.0"], (INVALID, "BATCH_ID_INVALID", "erp_applied_batch_ids[0]")),
        (
            ["erp.s1.0.0-1.0", "erp.s1.1.0-2.0"],
            (INVALID, "BATCH_ID_SHARD_REPEATED", "erp_applied_batch_ids[1]"),
        ),
        (
            ["erp.s0.0.0-1.0", "other.s1.0.0-1.0"],
            (INVALID, "BATCH_ID_BRIDGES_MIXED", "erp_applied_batch_ids"),
        ),
        (
            ["erp.s0.0.0-999.0"],
            (PRECONDITION, "WATERMARK_AHEAD", "erp_applied_batch_ids"),
        ),
    ],
)
async def test_bad_batch_ids_are_refused_and_nothing_is_stored(
    start_server: ServerFactory,
    config: Config,
    batch_ids: list[str],
    expected: tuple[grpc.StatusCode, str, str],
) -> None:
    server = await start_server()
    for sku in ("S0", "S1", "S2", "S3"):
        await set_on_hand(server, f"count-{sku}", (sku, DC, 5))
    records_before = await _record_count(config)

    error = await refused(compare(server, "snap-1", [Count("S0", DC, 1)], batch_ids))

    assert refusal(error) == expected
    assert await _record_count(config) == records_before
    async with connect(config.database_schema) as conn:
        assert await report(conn) == {}
    # With no id the ERP has seen nothing: its 0 plus the unseen 5 agrees.
    fits = await compare(server, "snap-1", [Count("S0", DC, 0)])
    assert differences(fits) == {("S0", DC, ""): 0}


async def test_an_erp_too_far_behind_is_refused(start_server: ServerFactory) -> None:
    server = await start_server(erp_unseen_records_max=2)
    for sku in ("S0", "S1", "S2"):
        await set_on_hand(server, f"count-{sku}", (sku, DC, 5))

    error = await refused(compare(server, "snap-1", [Count("S0", DC, 5)]))

    assert refusal(error) == (
        PRECONDITION,
        "ERP_TOO_FAR_BEHIND",
        "erp_applied_batch_ids",
    )


async def test_snapshot_fields_on_a_plain_count_are_refused(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    correction = admin_pb2.SetOnHandRequest(
        source="erp",
        source_event_id="count-1",
        counts=[admin_pb2.OnHandCount(sku=A, location=DC, on_hand=1)],
        apply_correction=True,
    )
    held = admin_pb2.SetOnHandRequest(
        source="erp",
        source_event_id="count-2",
        counts=[
            admin_pb2.OnHandCount(
                sku=A,
                location=DC,
                on_hand=1,
                held_by_channel=[admin_pb2.ChannelHeld(channel=WEB, held=1)],
            )
        ],
    )

    assert refusal(await refused(server.admin.SetOnHand(correction))) == (
        INVALID,
        "NOT_AN_ERP_SNAPSHOT",
        "apply_correction",
    )
    assert refusal(await refused(server.admin.SetOnHand(held))) == (
        INVALID,
        "NOT_AN_ERP_SNAPSHOT",
        "counts[0].held_by_channel",
    )
    assert (await availability_at(server, A)) == {}


async def test_the_report_pages_through_every_divergence_in_order(
    start_server: ServerFactory, config: Config
) -> None:
    server = await start_server()
    skus = [f"S{index}" for index in range(5)]
    await set_on_hand(server, "count-1", *[(sku, DC, 10) for sku in skus])
    batch_ids = applied_ids(await _full_watermarks(config))
    await compare(server, "snap-1", [Count(sku, DC, 9) for sku in skus], batch_ids)

    pages: list[list[str]] = []
    request = admin_pb2.ListDivergenceRequest(page_size=2)
    for _ in range(10):
        response = await server.admin.ListDivergence(request)
        pages.append([item.sku for item in response.divergences])
        if not response.next_page_token:
            break
        request.page_token = response.next_page_token
    one = await server.admin.ListDivergence(admin_pb2.ListDivergenceRequest(sku="S3"))

    assert pages == [["S0", "S1"], ["S2", "S3"], ["S4"]]
    [only] = one.divergences
    assert (only.sku, only.difference, only.source_event_id) == ("S3", 1, "snap-1")


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (
            admin_pb2.ListDivergenceRequest(page_token="!!not base64"),
            (INVALID, "PAGE_TOKEN_INVALID", "page_token"),
        ),
        (
            admin_pb2.ListDivergenceRequest(
                page_token=base64.urlsafe_b64encode(b'{"sku": 1}').decode()
            ),
            (INVALID, "PAGE_TOKEN_INVALID", "page_token"),
        ),
        (
            admin_pb2.ListDivergenceRequest(page_size=5_000),
            (INVALID, "PAGE_SIZE_OUT_OF_RANGE", "page_size"),
        ),
        (
            admin_pb2.ListDivergenceRequest(sku="two words"),
            (INVALID, "FIELD_MALFORMED", "sku"),
        ),
    ],
)
async def test_bad_report_queries_are_refused(
    start_server: ServerFactory,
    request_: admin_pb2.ListDivergenceRequest,
    expected: tuple[grpc.StatusCode, str, str],
) -> None:
    server = await start_server()

    error = await refused(server.admin.ListDivergence(request_))

    assert refusal(error) == expected
