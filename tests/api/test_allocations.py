"""Channel allocations through the real gRPC server on Postgres: ceilings and ring
fences, how holds, releases, expiries and fulfilments move a pool, races between
channels, the channel's view of availability, refusals, idempotency, and pools after a
restart, a failed write and a SIGKILL under load.

Pools are read back as GetPolicies shows them: (quantity, remaining, exclusive), where
quantity is the units set less the units fulfilled since, and remaining is quantity
less what the channel holds. The crash test prints its seed; replay it with
STOCKWARD_TEST_SEED=<seed>.
"""

import asyncio
import os
import pathlib
import secrets

import grpc
import pytest

from server.clock import FakeClock
from server.config import Config
from server.wal.schema import WRITE_FENCE_SHARED
from stockward.v1 import admin_pb2, inventory_pb2, types_pb2
from tests.api.allocations_support import (
    APP,
    DC,
    EXHAUSTED,
    INSUFFICIENT,
    MARKET,
    PARTIALLY_RESERVED,
    REJECTED,
    RESERVED,
    STORE,
    WEB,
    Acknowledged,
    ChannelStubs,
    Shopper,
    allocate,
    allocation_request,
    channel_view,
    count,
    fulfil,
    held,
    level,
    location_views,
    one_line,
    policies,
    pools,
    release,
    reserve_one,
    units_held,
)
from tests.api.client import refusal, refused, taken
from tests.conftest import DATABASE_URL, Running, ServerFactory, stop_server
from tests.reliability.load import Gate
from tests.reliability.server_process import CHANNEL_OPTIONS, ServerProcess, free_port
from tests.wal.durable import (
    NOT_SERVING,
    SERVING,
    HealthWatch,
    connect,
    next_seq,
    sku_on_shard,
    stop_as_if_crashed,
    wait_until_any_blocked,
)

SKU = "SNEAKER-42"
# The expiry loop sleeps on the fake clock; ticking once a day keeps it asleep while a
# test advances by minutes, so only the test's own sweeps expire holds.
QUIET_TICK_S = 24 * 3600.0


async def stocked(start_server: ServerFactory, **overrides: object) -> Running:
    """A server with 12 of SKU at DC and 8 at STORE."""
    server = await start_server(**overrides)
    await count(server, "count-1", (SKU, DC, 12), (SKU, STORE, 8))
    return server


async def total_held(server: Running, sku: str = SKU) -> int:
    response: inventory_pb2.GetAvailabilityResponse = (
        await server.inventory.GetAvailability(
            inventory_pb2.GetAvailabilityRequest(skus=[sku])
        )
    )
    return int(response.skus[0].total.held)


# Ceilings and ring fences ---------------------------------------------------------------


async def test_ceiling_allocation_limits_only_its_channel(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await allocate(server, "chg-1", level(SKU, WEB, 5))

    over = await reserve_one(server, "web-1", WEB, SKU, 6)
    within = await reserve_one(server, "web-2", WEB, SKU, 5)
    others = await reserve_one(server, "market-1", MARKET, SKU, 15)

    assert (over.outcome, over.lines[0].short_reason) == (REJECTED, EXHAUSTED)
    assert over.lines[0].quantity_available == 5
    assert within.outcome == RESERVED
    assert others.outcome == RESERVED
    assert await pools(server) == {(SKU, WEB): (5, 0, False)}
    assert await total_held(server) == 20


async def test_exclusive_allocation_keeps_its_remaining_units_from_other_channels(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await allocate(server, "chg-1", level(SKU, WEB, 8, exclusive=True))

    fenced = await reserve_one(server, "market-1", MARKET, SKU, 13)
    unfenced = await reserve_one(server, "market-2", MARKET, SKU, 12)
    own = await reserve_one(server, "web-1", WEB, SKU, 8)

    assert (fenced.outcome, fenced.lines[0].short_reason) == (REJECTED, INSUFFICIENT)
    assert fenced.lines[0].quantity_available == 12
    assert unfenced.outcome == RESERVED
    assert own.outcome == RESERVED
    assert await pools(server) == {(SKU, WEB): (8, 0, True)}
    assert await total_held(server) == 20


async def test_partial_reserve_stops_at_the_pool_and_names_the_allocation(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await allocate(server, "chg-1", level(SKU, WEB, 14))

    answer = await reserve_one(server, "web-1", WEB, SKU, 16, allow_partial=True)

    assert answer.outcome == PARTIALLY_RESERVED
    assert answer.lines[0].quantity_held == 14
    assert [(x.location, x.quantity) for x in answer.lines[0].held_at] == [
        (DC, 12),
        (STORE, 2),
    ]
    assert answer.lines[0].short_reason == EXHAUSTED
    assert await pools(server) == {(SKU, WEB): (14, 0, False)}


# Holds, releases, expiries and fulfilments -----------------------------------------------


async def test_holds_draw_on_the_pool_and_releases_give_back(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await allocate(server, "chg-1", level(SKU, WEB, 10, exclusive=True))

    three = await held(server, "web-1", WEB, SKU, 3)
    four = await held(server, "web-2", WEB, SKU, 4)
    assert await pools(server) == {(SKU, WEB): (10, 3, True)}

    assert units_held(await release(server, four)) == 0
    assert await pools(server) == {(SKU, WEB): (10, 7, True)}
    assert units_held(await release(server, three, taken(SKU, DC, 1))) == 2
    assert await pools(server) == {(SKU, WEB): (10, 8, True)}
    # 18 free, 8 still fenced for web.
    fenced = await reserve_one(server, "market-1", MARKET, SKU, 11)
    assert (fenced.outcome, fenced.lines[0].quantity_available) == (REJECTED, 10)


async def test_expired_holds_give_back_to_the_pool(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await stocked(start_server, expiry_tick_s=QUIET_TICK_S)
    await allocate(server, "chg-1", level(SKU, WEB, 6, exclusive=True))
    await reserve_one(server, "web-1", WEB, SKU, 4, ttl_s=60)
    assert await pools(server) == {(SKU, WEB): (6, 2, True)}

    clock.advance(59)
    assert await server.app.ledger.sweep_expired() == 0
    assert await pools(server) == {(SKU, WEB): (6, 2, True)}
    clock.advance(2)
    assert await server.app.ledger.sweep_expired() == 1

    assert await pools(server) == {(SKU, WEB): (6, 6, True)}
    assert (await reserve_one(server, "web-2", WEB, SKU, 6)).outcome == RESERVED
    assert await pools(server) == {(SKU, WEB): (6, 0, True)}


async def test_fulfilment_consumes_the_pool_for_good(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await allocate(server, "chg-1", level(SKU, WEB, 10, exclusive=True))
    reservation_id = await held(server, "web-1", WEB, SKU, 6)

    after = await fulfil(server, reservation_id, taken(SKU, DC, 4))
    assert (units_held(after), after.state) == (
        2,
        types_pb2.RESERVATION_STATE_CONFIRMED,
    )
    assert await pools(server) == {(SKU, WEB): (6, 4, True)}
    await release(server, reservation_id)

    assert await pools(server) == {(SKU, WEB): (6, 6, True)}
    # 16 on hand, 6 fenced for web.
    assert await channel_view(server, SKU, MARKET) == (10, False, 0)
    assert await channel_view(server, SKU, WEB) == (6, True, 6)


async def test_fulfilment_by_another_channel_leaves_the_pool_alone(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await allocate(server, "chg-1", level(SKU, WEB, 5, exclusive=True))

    await fulfil(server, await held(server, "market-1", MARKET, SKU, 7))

    assert await pools(server) == {(SKU, WEB): (5, 5, True)}
    assert await channel_view(server, SKU, MARKET) == (8, False, 0)


# Changing and removing ------------------------------------------------------------------


async def test_changed_allocation_replaces_what_was_left_of_the_pool(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await stocked(start_server)
    await allocate(server, "chg-1", level(SKU, WEB, 10, exclusive=True))
    await fulfil(server, await held(server, "web-1", WEB, SKU, 2))
    await held(server, "web-2", WEB, SKU, 3)
    assert await pools(server) == {(SKU, WEB): (8, 5, True)}
    clock.advance(30)

    await allocate(server, "chg-2", level(SKU, WEB, 4))

    assert await pools(server) == {(SKU, WEB): (4, 1, False)}
    (shown,) = (await policies(server)).allocations
    assert (shown.attribution.actor, shown.attribution.change_id) == (
        "merchandiser",
        "chg-2",
    )
    assert shown.attribution.changed_at.ToMicroseconds() == clock.now_us()
    # A ceiling fences nothing: the marketplace may take all that is free.
    assert (await reserve_one(server, "market-1", MARKET, SKU, 15)).outcome == RESERVED


async def test_removed_allocation_lifts_its_ceiling_and_its_fence(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await allocate(
        server,
        "chg-1",
        level(SKU, WEB, 3, exclusive=True),
        level(SKU, APP, 5, exclusive=True),
    )
    await held(server, "web-1", WEB, SKU, 2)

    await allocate(server, "chg-2", level(SKU, WEB, 0))

    assert await pools(server) == {(SKU, APP): (5, 5, True)}
    assert (await reserve_one(server, "web-2", WEB, SKU, 13)).outcome == RESERVED
    assert await channel_view(server, SKU, WEB) == (0, False, 0)
    await allocate(server, "chg-3", level(SKU, APP, 0))
    assert await pools(server) == {}
    assert (await reserve_one(server, "market-1", MARKET, SKU, 5)).outcome == RESERVED


# Races ----------------------------------------------------------------------------------


def batch_of(prefix: str, channels: list[str]) -> inventory_pb2.ExecuteBatchRequest:
    return inventory_pb2.ExecuteBatchRequest(
        commands=[
            inventory_pb2.Command(reserve=one_line(f"{prefix}-{n}", channel, SKU, 1))
            for n, channel in enumerate(channels)
        ]
    )


async def test_two_channels_racing_for_an_exclusive_allocation_never_overdraw_it(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await count(server, "count-1", (SKU, DC, 60), (SKU, STORE, 40))
    await allocate(server, "chg-1", level(SKU, WEB, 30, exclusive=True))
    mixed = [WEB, MARKET] * 50
    seen: list[dict[tuple[str, str], tuple[int, int, bool]]] = []

    async def watch() -> None:
        for _ in range(20):
            seen.append(await pools(server))

    singles, batches, _ = await asyncio.gather(
        asyncio.gather(
            *(
                reserve_one(server, f"{channel}-{n}", channel, SKU, 1)
                for n in range(200)
                for channel in (WEB, MARKET)
            )
        ),
        asyncio.gather(
            server.inventory.ExecuteBatch(batch_of("batch-a", mixed)),
            server.inventory.ExecuteBatch(batch_of("batch-b", mixed[::-1])),
        ),
        watch(),
    )

    answers = [(a.outcome, a.lines[0]) for a in singles]
    channels = [WEB, MARKET] * 200
    for batch, order in zip(batches, (mixed, mixed[::-1]), strict=True):
        answers += [(r.reserve.outcome, r.reserve.lines[0]) for r in batch.results]
        channels += order
    won = {WEB: 0, MARKET: 0}
    refused_for: dict[str, set[int]] = {WEB: set(), MARKET: set()}
    for channel, (outcome, line_result) in zip(channels, answers, strict=True):
        if outcome == RESERVED:
            won[channel] += 1
        else:
            assert line_result.quantity_available == 0
            refused_for[channel].add(line_result.short_reason)
    assert won == {WEB: 30, MARKET: 70}
    # Web runs out of its own pool (and, once everything is held, of stock too); the
    # marketplace only ever runs out of unfenced stock.
    assert refused_for[WEB] <= {EXHAUSTED, INSUFFICIENT}
    assert refused_for[MARKET] == {INSUFFICIENT}
    assert await pools(server) == {(SKU, WEB): (30, 0, True)}
    assert await total_held(server) == 100
    assert all(
        view[(SKU, WEB)][0] == 30 and 0 <= view[(SKU, WEB)][1] <= 30 for view in seen
    )


async def test_concurrent_releases_and_reserves_keep_remaining_consistent(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await count(server, "count-1", (SKU, DC, 100))
    await allocate(server, "chg-1", level(SKU, WEB, 40))
    first = await asyncio.gather(
        *(reserve_one(server, f"a-{n}", WEB, SKU, 1) for n in range(40))
    )
    assert await pools(server) == {(SKU, WEB): (40, 0, False)}

    _, second, seen = await asyncio.gather(
        asyncio.gather(*(release(server, a.reservation_id) for a in first[:20])),
        asyncio.gather(
            *(reserve_one(server, f"b-{n}", WEB, SKU, 1) for n in range(60))
        ),
        asyncio.gather(*(pools(server) for _ in range(20))),
    )

    won = [a.outcome for a in second].count(RESERVED)
    # Only the 20 released units can be held again, however the calls interleave.
    assert won <= 20
    assert {a.lines[0].short_reason for a in second if a.outcome != RESERVED} <= {
        EXHAUSTED
    }
    assert await pools(server) == {(SKU, WEB): (40, 20 - won, False)}
    assert await channel_view(server, SKU, WEB) == (20 - won, True, 20 - won)
    assert all(
        view[(SKU, WEB)][0] == 40 and 0 <= view[(SKU, WEB)][1] <= 20 for view in seen
    )
    assert await total_held(server) == 20 + won


# The channel's view of availability -----------------------------------------------------


async def test_availability_for_a_channel_is_capped_by_its_pool_and_others_fences(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await count(server, "count-1", (SKU, DC, 20), (SKU, STORE, 10))
    await allocate(
        server,
        "chg-1",
        level(SKU, WEB, 5),
        level(SKU, APP, 10, exclusive=True),
    )

    assert await channel_view(server, SKU, WEB) == (5, True, 5)
    assert await channel_view(server, SKU, APP) == (10, True, 10)
    assert await channel_view(server, SKU, MARKET) == (20, False, 0)
    # Per location the view is not capped: the caps span every location.
    assert await location_views(server, SKU, WEB) == {DC: 20, STORE: 10}

    await held(server, "web-1", WEB, SKU, 3)
    await held(server, "app-1", APP, SKU, 4)

    assert await channel_view(server, SKU, WEB) == (2, True, 2)
    assert await channel_view(server, SKU, APP) == (6, True, 6)
    assert await channel_view(server, SKU, MARKET) == (17, False, 0)
    assert await pools(server) == {(SKU, WEB): (5, 2, False), (SKU, APP): (10, 6, True)}


async def test_availability_shows_nothing_to_others_while_the_fence_covers_all_stock(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await allocate(server, "chg-1", level(SKU, WEB, 50, exclusive=True))

    assert await channel_view(server, SKU, MARKET) == (0, False, 0)
    assert await channel_view(server, SKU, WEB) == (20, True, 50)
    short = await reserve_one(server, "market-1", MARKET, SKU, 1)
    assert (short.outcome, short.lines[0].short_reason) == (REJECTED, INSUFFICIENT)


# Bad input ------------------------------------------------------------------------------

TOO_MANY_UNITS = 1_000_000_000_001


@pytest.mark.parametrize(
    ("request_", "reason", "field"),
    [
        (
            allocation_request("bad", level(SKU, WEB, -1)),
            "UNITS_OUT_OF_RANGE",
            "allocations[0].quantity",
        ),
        (
            allocation_request(
                "bad", level(SKU, APP, 2), level(SKU, WEB, TOO_MANY_UNITS)
            ),
            "UNITS_OUT_OF_RANGE",
            "allocations[1].quantity",
        ),
        (
            allocation_request("bad", level(SKU, APP, 2), level(SKU, APP, 3)),
            "DUPLICATE_ALLOCATION",
            "allocations[1]",
        ),
        (
            allocation_request("bad", level("", WEB, 2)),
            "FIELD_REQUIRED",
            "allocations[0].sku",
        ),
        (
            allocation_request("bad", level(SKU, "", 2)),
            "FIELD_REQUIRED",
            "allocations[0].channel",
        ),
        (
            allocation_request("bad", level("SNEAKER 42", WEB, 2)),
            "FIELD_MALFORMED",
            "allocations[0].sku",
        ),
        (allocation_request("bad"), "FIELD_REQUIRED", "allocations"),
        (
            allocation_request("bad", level(SKU, WEB, 2), actor=""),
            "FIELD_REQUIRED",
            "actor",
        ),
        (allocation_request("", level(SKU, WEB, 2)), "FIELD_REQUIRED", "change_id"),
    ],
)
async def test_bad_allocation_is_refused_naming_the_field_and_changes_nothing(
    start_server: ServerFactory,
    request_: admin_pb2.SetChannelAllocationRequest,
    reason: str,
    field: str,
) -> None:
    server = await stocked(start_server)
    await allocate(server, "chg-1", level(SKU, WEB, 7, exclusive=True))
    before = await policies(server)

    error = await refused(server.admin.SetChannelAllocation(request_))

    assert refusal(error) == (grpc.StatusCode.INVALID_ARGUMENT, reason, field)
    assert await policies(server) == before
    # The refused change did not use up its change id.
    assert not await allocate(server, "bad", level(SKU, WEB, 3))
    assert await pools(server) == {(SKU, WEB): (3, 3, False)}


# Idempotency ----------------------------------------------------------------------------


async def test_retried_allocation_change_is_applied_once_even_after_a_restart(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    assert not await allocate(server, "chg-1", level(SKU, WEB, 10, exclusive=True))
    await fulfil(server, await held(server, "web-1", WEB, SKU, 4))
    assert await pools(server) == {(SKU, WEB): (6, 6, True)}

    assert await allocate(server, "chg-1", level(SKU, WEB, 10, exclusive=True))
    assert await pools(server) == {(SKU, WEB): (6, 6, True)}
    await stop_server(server)
    server = await start_server()
    assert await allocate(server, "chg-1", level(SKU, WEB, 10, exclusive=True))

    assert await pools(server) == {(SKU, WEB): (6, 6, True)}
    # The same change under a new id is a new change.
    assert not await allocate(server, "chg-2", level(SKU, WEB, 10, exclusive=True))
    assert await pools(server) == {(SKU, WEB): (10, 10, True)}


async def test_change_id_reused_for_other_allocations_is_refused_naming_change_id(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await allocate(server, "chg-1", level(SKU, WEB, 10, exclusive=True))

    error = await refused(
        server.admin.SetChannelAllocation(
            allocation_request("chg-1", level(SKU, WEB, 11, exclusive=True))
        )
    )

    assert refusal(error) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
        "change_id",
    )
    assert await pools(server) == {(SKU, WEB): (10, 10, True)}


async def test_same_change_id_from_another_actor_is_another_change(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    await allocate(server, "chg-1", level(SKU, WEB, 10))

    answer: admin_pb2.SetChannelAllocationResponse = (
        await server.admin.SetChannelAllocation(
            allocation_request("chg-1", level(SKU, WEB, 4), actor="planner")
        )
    )

    assert not answer.replayed
    assert await pools(server) == {(SKU, WEB): (4, 4, False)}


# Restarts -------------------------------------------------------------------------------


async def test_pools_survive_restarts_from_records_and_from_a_checkpoint(
    start_server: ServerFactory, config: Config, schema: str
) -> None:
    """Skus on every shard; a checkpoint in the middle; the first restart replays the
    records after it (no shutdown checkpoint), the second starts from a fresh one."""
    skus = [sku_on_shard(shard, shard_count=config.shards) for shard in range(3)]
    server = await start_server()
    await count(server, "count-1", *((sku, DC, 30) for sku in skus))
    await allocate(
        server,
        "chg-1",
        *(level(sku, WEB, 12, exclusive=True) for sku in skus),
        level(skus[0], MARKET, 9),
    )
    kept = [await held(server, f"keep-{sku}", WEB, sku, 2) for sku in skus]
    await fulfil(server, await held(server, "ship-0", WEB, skus[0], 3))
    await server.app.ledger.checkpoint()
    await fulfil(server, await held(server, "ship-1", WEB, skus[1], 5))
    await fulfil(server, await held(server, "ship-2", MARKET, skus[0], 4))
    await release(server, kept[2])
    await allocate(server, "chg-2", level(skus[2], WEB, 7), level(skus[1], APP, 3))
    await held(server, "app-1", APP, skus[1], 1)
    expected = {
        (skus[0], WEB): (9, 7, True),
        (skus[0], MARKET): (5, 5, False),
        (skus[1], WEB): (7, 5, True),
        (skus[1], APP): (3, 2, False),
        (skus[2], WEB): (7, 7, False),
    }
    before = await policies(server)
    assert await pools(server) == expected

    async with connect(schema) as conn:
        await stop_as_if_crashed(server, conn)
    server = await start_server()
    assert await policies(server) == before
    await stop_server(server)
    server = await start_server()

    assert await policies(server) == before
    assert await pools(server) == expected


async def test_pool_set_while_a_fulfilment_commits_is_as_acknowledged_after_it_fails(
    start_server: ServerFactory, config: Config, schema: str
) -> None:
    """The fulfilment's commit (on its sku's shard) is held up until it times out; the
    new pool is written on shard 0 meanwhile and acknowledged. After recovery the pool
    must be the one acknowledged, with the hold the failed fulfilment left in it; and
    the fulfilment, retried, then consumes from that pool."""
    sku = sku_on_shard(1, shard_count=config.shards)
    server = await start_server(commit_timeout_s=1.0)
    await count(server, "count-1", (sku, DC, 20))
    await allocate(server, "chg-1", level(sku, WEB, 10, exclusive=True))
    reservation_id = await held(server, "web-1", WEB, sku, 4)
    await server.inventory.Confirm(
        inventory_pb2.ConfirmRequest(
            request_id="confirm-1", reservation_id=reservation_id
        )
    )
    health = HealthWatch(server)
    assert await health.next_status() == SERVING
    fulfilment = inventory_pb2.FulfillRequest(
        request_id="fulfil-1", reservation_id=reservation_id
    )

    async with connect(schema) as saboteur, connect(schema) as blocker:
        transaction = blocker.transaction()
        await transaction.start()
        # Recovery waits for this share of the write fence, so NOT_SERVING lasts until
        # the rollback instead of flickering past the health stream.
        await blocker.execute(WRITE_FENCE_SHARED)
        # Shard 1's next commit waits for this uncommitted row with its key.
        await blocker.execute(
            "INSERT INTO wal_records (shard, seq, kind, reservation_id, body, "
            "recorded_us) VALUES (1, $1, 'adjust', '', '{\"fx\": []}', 0)",
            await next_seq(blocker, 1),
        )
        waiting = asyncio.ensure_future(
            server.inventory.Fulfill(fulfilment, timeout=10)
        )
        await wait_until_any_blocked(saboteur, blocker_pid=blocker.get_server_pid())
        assert not await allocate(server, "chg-2", level(sku, WEB, 10, exclusive=True))
        failed = await refused(waiting)
        assert failed.code() == grpc.StatusCode.UNAVAILABLE
        assert await health.next_status() == NOT_SERVING
        await transaction.rollback()
    assert await health.next_status() == SERVING
    health.close()

    shown = await server.inventory.GetReservation(
        inventory_pb2.GetReservationRequest(reservation_id=reservation_id)
    )
    assert units_held(shown.reservation) == 4
    assert await pools(server) == {(sku, WEB): (10, 6, True)}, (
        "acknowledged: pool set to 10 while 4 are held; the fulfilment failed"
    )
    await server.inventory.Fulfill(fulfilment)
    assert await pools(server) == {(sku, WEB): (6, 6, True)}


# SIGKILL under load ---------------------------------------------------------------------

CRASH_SKUS = ("SKU-0", "SKU-1", "SKU-2")
CRASH_ON_HAND = 400
SHOPPERS = 16
# Answers before each kill, and after the restart before the shoppers stop.
ANSWERS_BEFORE_KILL = 400
ANSWERS_AFTER_RESTART = 150
# Shoppers give hundreds of answers a second; a load this slow is stuck, not slow.
ANSWERS_WAIT_MAX_S = 30.0
SERVER_ARGS = (
    "--shards",
    "4",
    # Checkpoints every second once 100 records wait, so kills land on both sides.
    "--checkpoint-interval-s",
    "1",
    "--checkpoint-records-min",
    "100",
)
FIRST_ALLOCATIONS = (
    level("SKU-0", WEB, 150, exclusive=True),
    level("SKU-0", MARKET, 100),
    level("SKU-1", MARKET, 120, exclusive=True),
    level("SKU-2", WEB, 90),
)
SECOND_ALLOCATIONS = (
    level("SKU-0", WEB, 60),
    level("SKU-2", WEB, 0),
    level("SKU-2", APP, 80, exclusive=True),
    level("SKU-1", APP, 40, exclusive=True),
)


def crash_seed() -> int:
    seed = int(os.environ.get("STOCKWARD_TEST_SEED", secrets.randbits(32)))
    print(f"STOCKWARD_TEST_SEED={seed}")
    return seed


async def restart(process: ServerProcess) -> None:
    if process.is_running:
        process.kill()
    assert await process.wait_exit() == -9
    await process.start()
    await process.wait_serving()


async def more_answers(
    process: ServerProcess, acknowledged: Acknowledged, count_: int
) -> None:
    try:
        async with asyncio.timeout(ANSWERS_WAIT_MAX_S):
            await acknowledged.wait_for_answers(acknowledged.answers + count_)
    except TimeoutError as error:
        raise AssertionError(
            f"{count_} answers not given within {ANSWERS_WAIT_MAX_S}s "
            f"{dict(acknowledged.counts)}:\n{process.log_tail()}"
        ) from error


async def shop_through_a_kill(
    *,
    process: ServerProcess,
    stubs: ChannelStubs,
    acknowledged: Acknowledged,
    seed: int,
    phase: str,
    channels: tuple[str, ...],
) -> None:
    """Shoppers under load; SIGKILL after a number of answers, restart, let every
    shopper finish its story, stop."""
    gate, stop = Gate(), asyncio.Event()
    shoppers = [
        Shopper(
            index=index,
            seed=seed,
            stubs=stubs,
            acknowledged=acknowledged,
            gate=gate,
            skus=CRASH_SKUS,
            channels=channels,
            prefix=phase,
        )
        for index in range(SHOPPERS)
    ]
    tasks = [asyncio.create_task(shopper.run(stop)) for shopper in shoppers]
    try:
        await acknowledged.wait_for_answers(acknowledged.answers + ANSWERS_BEFORE_KILL)
        gate.close()
        await restart(process)
        gate.open()
        await acknowledged.wait_for_answers(
            acknowledged.answers + ANSWERS_AFTER_RESTART
        )
    finally:
        stop.set()
        gate.open()
        await asyncio.gather(*tasks)


@pytest.mark.reliability
async def test_pools_after_sigkill_under_load_are_as_acknowledged(
    schema: str, tmp_path: pathlib.Path
) -> None:
    seed = crash_seed()
    process = ServerProcess(
        database_url=DATABASE_URL,
        schema=schema,
        port=free_port(),
        log_path=tmp_path / "server.log",
        extra_args=SERVER_ARGS,
    )
    await process.start()
    acknowledged = Acknowledged()
    try:
        await process.wait_serving()
        async with grpc.aio.insecure_channel(
            process.address, options=CHANNEL_OPTIONS
        ) as channel:
            stubs = ChannelStubs.of(channel)
            await count(
                stubs,
                "count-1",
                *(
                    (sku, loc, CRASH_ON_HAND)
                    for sku in CRASH_SKUS
                    for loc in (DC, STORE)
                ),
            )
            assert not await allocate(stubs, "chg-1", *FIRST_ALLOCATIONS)
            acknowledged.set(*FIRST_ALLOCATIONS)

            await shop_through_a_kill(
                process=process,
                stubs=stubs,
                acknowledged=acknowledged,
                seed=seed,
                phase="a",
                channels=(WEB, MARKET),
            )
            assert await pools(stubs) == acknowledged.expected(), f"seed={seed}"

            # An acknowledged change, then a kill before anything else happens.
            assert not await allocate(stubs, "chg-2", *SECOND_ALLOCATIONS)
            acknowledged.set(*SECOND_ALLOCATIONS)
            await restart(process)
            assert await pools(stubs) == acknowledged.expected(), f"seed={seed}"
            assert await allocate(stubs, "chg-2", *SECOND_ALLOCATIONS)

            await shop_through_a_kill(
                process=process,
                stubs=stubs,
                acknowledged=acknowledged,
                seed=seed,
                phase="b",
                channels=(WEB, MARKET, APP),
            )
            assert await pools(stubs) == acknowledged.expected(), (
                f"seed={seed} {dict(acknowledged.counts)}"
            )
            assert acknowledged.counts["fulfil"] > 0
            assert acknowledged.counts["retries"] > 0
    finally:
        await process.close()
