"""ERP snapshots compared while reservations, fulfilments and adjustments keep
committing: every reported difference must be exactly the one planted in the count.

The ERP is simulated from what is committed in wal_records when the snapshot is taken:
a watermark per shard (sometimes inside a record), and counts that are the sum of the
stream's lines up to it, as the bridge would have fed them. Commands decided after the
test read the records, and those still in flight at the server's cut, must change
nothing in the result. The seed is printed; set RECONCILIATION_SEED to replay a run.
"""

import asyncio
import os
import random

import grpc

from server.config import Config
from server.wal.feed import FeedLine, StreamPosition
from stockward.v1 import admin_pb2, inventory_pb2
from tests.api.client import line, refusal, reserve_request, set_on_hand, taken
from tests.api.erp_snapshots import (
    SHARDS,
    Count,
    applied_ids,
    compare,
    erp_view,
    last_seqs,
    stream,
)
from tests.conftest import Running, ServerFactory
from tests.wal.durable import connect

SKUS = [f"RACE-{index}" for index in range(6)]
LOCATIONS = ["DC", "STORE"]
CHANNELS = ["web", "app"]
# Enough stock that adjustments rarely hit zero; refusals are expected and harmless.
START_ON_HAND = 1_000
WORKERS = 8
OPERATIONS_PER_WORKER = 40
SNAPSHOTS = 12
# A watermark read from Postgres can be committed but not yet marked durable by the
# server for a moment (WATERMARK_AHEAD); such a snapshot is taken again.
AHEAD_RETRIES_MAX = 20
# Planted differences: mostly none, so that agreement is checked as often as not.
PLANTS = [0, 0, 0, 1, 4]


async def _work(server: Running, rng: random.Random, worker: int) -> None:
    """Reserve, confirm, fulfil or release, and adjust stock, in a random mix."""
    for step in range(OPERATIONS_PER_WORKER):
        sku, location = rng.choice(SKUS), rng.choice(LOCATIONS)
        tag = f"w{worker}-{step}"
        try:
            if rng.random() < 0.3:
                await _adjust(server, tag, sku, location, rng.choice([-3, -1, 2, 5]))
            else:
                await _order(server, rng, tag, sku, location)
        except grpc.aio.AioRpcError as error:
            # Stock at zero or a hold already gone: outcomes, not failures.
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error


async def _adjust(
    server: Running, tag: str, sku: str, location: str, delta: int
) -> None:
    await server.admin.AdjustStock(
        admin_pb2.AdjustStockRequest(
            source="wms",
            source_event_id=tag,
            adjustments=[
                admin_pb2.StockAdjustment(
                    sku=sku,
                    location=location,
                    delta=delta,
                    reason=admin_pb2.ADJUSTMENT_REASON_COUNT_CORRECTION,
                )
            ],
        )
    )


async def _order(
    server: Running, rng: random.Random, tag: str, sku: str, location: str
) -> None:
    quantity = rng.randint(1, 3)
    answer = await server.inventory.Reserve(
        reserve_request(
            "rsv-" + tag,
            line(sku, quantity, location=location),
            channel=rng.choice(CHANNELS),
        )
    )
    if answer.outcome != inventory_pb2.RESERVE_OUTCOME_RESERVED:
        return
    reservation_id = answer.reservation_id
    if rng.random() < 0.3:
        await server.inventory.Release(
            inventory_pb2.ReleaseRequest(
                request_id="rel-" + tag, reservation_id=reservation_id
            )
        )
        return
    await server.inventory.Confirm(
        inventory_pb2.ConfirmRequest(
            request_id="cnf-" + tag, reservation_id=reservation_id
        )
    )
    await server.inventory.Fulfill(
        inventory_pb2.FulfillRequest(
            request_id="ful-" + tag,
            reservation_id=reservation_id,
            lines=[taken(sku, location, rng.randint(1, quantity))],
        )
    )


def _watermark(
    rng: random.Random, lines: list[FeedLine], last_seq: int
) -> StreamPosition:
    """Somewhere in the committed stream, often inside a record."""
    seq = rng.randint(0, last_seq)
    in_next = sum(1 for item in lines if item.seq == seq + 1)
    if in_next and rng.random() < 0.5:
        return StreamPosition(seq, rng.randint(0, in_next))
    return StreamPosition(seq)


async def _snapshot(
    server: Running, config: Config, rng: random.Random, round_: int
) -> tuple[dict[tuple[str, str, str], int], bool]:
    """One ERP snapshot; returns the differences the server reported minus the
    planted ones (all zero when the server is right), and whether records were
    committed while it was compared."""
    for attempt in range(AHEAD_RETRIES_MAX):
        async with connect(config.database_schema) as conn:
            seqs = await last_seqs(conn)
            lines = [await stream(conn, shard) for shard in range(SHARDS)]
        watermarks = [_watermark(rng, lines[s], seqs[s]) for s in range(SHARDS)]
        counts: list[Count] = []
        planted: dict[tuple[str, str, str], int] = {}
        for sku in SKUS:
            for location in LOCATIONS:
                on_hand, _ = erp_view(lines, watermarks, sku=sku, location=location)
                plant = rng.choice(PLANTS)
                planted[(sku, location, "")] = -plant
                held: list[tuple[str, int]] = []
                for channel in CHANNELS:
                    _, units = erp_view(
                        lines, watermarks, sku=sku, location=location, channel=channel
                    )
                    channel_plant = rng.choice(PLANTS)
                    planted[(sku, location, channel)] = -channel_plant
                    held.append((channel, units + channel_plant))
                counts.append(Count(sku, location, on_hand + plant, tuple(held)))
        try:
            response = await compare(
                server, f"snap-{round_}-{attempt}", counts, applied_ids(watermarks)
            )
        except grpc.aio.AioRpcError as error:
            assert refusal(error)[1] == "WATERMARK_AHEAD", error
            continue
        async with connect(config.database_schema) as conn:
            raced = await last_seqs(conn) != seqs
        reported = {
            (d.sku, d.location, d.channel): d.difference for d in response.divergences
        }
        assert reported.keys() == planted.keys()
        return {key: reported[key] - planted[key] for key in planted}, raced
    raise AssertionError(f"every watermark of snapshot {round_} was ahead")


async def test_snapshots_racing_with_commits_report_exactly_the_planted_differences(
    start_server: ServerFactory, config: Config
) -> None:
    seed = int(
        os.environ.get("RECONCILIATION_SEED", random.SystemRandom().randrange(2**32))
    )
    print(f"RECONCILIATION_SEED={seed}")
    rng = random.Random(seed)
    server = await start_server()
    await set_on_hand(
        server,
        "count-0",
        *[(sku, location, START_ON_HAND) for sku in SKUS for location in LOCATIONS],
    )

    workers = [
        asyncio.create_task(_work(server, random.Random(rng.random()), index))
        for index in range(WORKERS)
    ]
    errors: list[dict[tuple[str, str, str], int]] = []
    raced = 0
    for round_ in range(SNAPSHOTS):
        found, during_commits = await _snapshot(server, config, rng, round_)
        errors.append(found)
        raced += during_commits
    await asyncio.gather(*workers)
    # One more once everything is quiet.
    errors.append((await _snapshot(server, config, rng, SNAPSHOTS))[0])

    wrong = [
        (round_, key, error)
        for round_, found in enumerate(errors)
        for key, error in found.items()
        if error
    ]
    assert not wrong, f"seed {seed}: differences off by {wrong[:10]}"
    # Snapshots must have raced with commits for the test to mean anything.
    assert raced > 0, f"seed {seed}: no snapshot was compared while records committed"
