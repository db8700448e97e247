"""A shard's records reach its writer in seq order, whoever decided them.

The writer refuses a record whose seq is not the next one (a gap would stop recovery),
so every path that decides must hand its decisions over before another path can decide.
These tests call the ledger directly, in a fixed order of tasks, because that order is
what decides the interleaving; over gRPC the same race happens under load (see
tests/reliability/test_crash.py) but not on every run.
"""

import asyncio

from server.clock import FakeClock
from server.config import Config
from server.engine import commands
from server.engine.commands import ReserveOutcome, ReserveResult
from stockward.v1 import admin_pb2, inventory_pb2, types_pb2
from tests.conftest import Running, ServerFactory
from tests.wal.conftest import stop_within
from tests.wal.durable import sku_on_shard

LOCATION = "DC"
# Commits of one record take milliseconds; a shard that answers nothing in this long
# has stopped writing.
ANSWER_WAIT_S = 5.0


async def stock_two_skus_on_one_shard(server: Running, config: Config) -> list[str]:
    skus = [
        sku_on_shard(0, shard_count=config.shards, prefix=prefix)
        for prefix in ("A-", "B-")
    ]
    await server.admin.SetOnHand(
        admin_pb2.SetOnHandRequest(
            source="erp",
            source_event_id="count-1",
            counts=[
                admin_pb2.OnHandCount(sku=sku, location=LOCATION, on_hand=10)
                for sku in skus
            ],
        )
    )
    return skus


def reserve(request_id: str, sku: str) -> commands.Reserve:
    return commands.Reserve(
        request_id=request_id,
        channel="web",
        lines=(commands.ReserveLine(sku=sku, quantity=1, location=LOCATION),),
    )


async def answers_within(*tasks: "asyncio.Task[object]", what: str) -> list[object]:
    try:
        async with asyncio.timeout(ANSWER_WAIT_S):
            return list(await asyncio.gather(*tasks))
    except TimeoutError as error:
        raise AssertionError(
            f"{what}: no answer within {ANSWER_WAIT_S}s. The shard's writer was "
            "handed seq n+1 before seq n and stopped; everything later on that "
            "shard waits forever."
        ) from error


async def test_batch_and_a_single_command_on_one_shard_are_both_answered(
    start_fragile_server: ServerFactory, config: Config
) -> None:
    server = await start_fragile_server()
    batch_sku, single_sku = await stock_two_skus_on_one_shard(server, config)
    ledger = server.app.ledger

    # The batch decides first; the single command decides while the batch waits.
    batch = asyncio.create_task(ledger.execute_batch([reserve("in-batch", batch_sku)]))
    single = asyncio.create_task(ledger.execute(reserve("alone", single_sku)))
    batch_results, single_result = await answers_within(
        batch, single, what="a batch and a Reserve on one shard"
    )

    assert isinstance(batch_results, list)
    assert [type(result) for result in batch_results] == [ReserveResult]
    assert isinstance(single_result, ReserveResult)
    assert single_result.outcome is ReserveOutcome.RESERVED
    await stop_within(server)


async def test_expiry_sweep_and_a_reserve_on_one_shard_are_both_answered(
    start_fragile_server: ServerFactory, config: Config, clock: FakeClock
) -> None:
    server = await start_fragile_server()
    due_sku, other_sku = await stock_two_skus_on_one_shard(server, config)
    short = await server.inventory.Reserve(
        inventory_pb2.ReserveRequest(
            request_id="short",
            channel="web",
            ttl_seconds=5,
            lines=[
                inventory_pb2.ReserveLine(sku=due_sku, quantity=1, location=LOCATION)
            ],
        )
    )
    ledger = server.app.ledger

    # Wakes the expiry loop, which expires the hold; the Reserve decides while the
    # sweep waits for its writes.
    clock.advance(10)
    single = asyncio.create_task(ledger.execute(reserve("alone", other_sku)))
    (single_result,) = await answers_within(
        single, what="a Reserve on the shard of an expiring hold"
    )

    assert isinstance(single_result, ReserveResult)
    assert single_result.outcome is ReserveOutcome.RESERVED
    expired = await server.inventory.GetReservation(
        inventory_pb2.GetReservationRequest(reservation_id=short.reservation_id)
    )
    assert expired.reservation.state == types_pb2.RESERVATION_STATE_EXPIRED
    await stop_within(server)
