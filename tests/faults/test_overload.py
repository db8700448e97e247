"""A stalled write-ahead log shows as RESOURCE_EXHAUSTED, not as memory growth."""

import asyncio

import asyncpg
import grpc

from server.config import Config
from stockward.v1 import admin_pb2, inventory_pb2
from tests.conftest import DATABASE_URL, ServerFactory

REQUESTS = 12


async def test_full_write_queue_refuses_new_commands_and_keeps_the_rest(
    start_server: ServerFactory, config: Config
) -> None:
    server = await start_server(shards=1, batch_entries_max=1, queue_entries_max=2)
    await server.admin.SetOnHand(
        admin_pb2.SetOnHandRequest(
            source="erp",
            source_event_id="count-1",
            counts=[admin_pb2.OnHandCount(sku="SKU-1", location="DC", on_hand=100)],
        )
    )

    blocker = await asyncpg.connect(
        DATABASE_URL, server_settings={"search_path": config.database_schema}
    )
    lock = blocker.transaction()
    await lock.start()
    await blocker.execute("LOCK TABLE wal_records IN ACCESS EXCLUSIVE MODE")
    calls = [
        asyncio.ensure_future(
            server.inventory.Reserve(
                inventory_pb2.ReserveRequest(
                    request_id=f"r{i}",
                    channel="web",
                    lines=[
                        inventory_pb2.ReserveLine(
                            sku="SKU-1", quantity=1, location="DC"
                        )
                    ],
                )
            )
        )
        for i in range(REQUESTS)
    ]
    refused = 0
    pending = set(calls)
    # Refusals answer at once; the accepted calls wait behind the lock.
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        refused += sum(1 for call in done if call.exception() is not None)
        if refused + 3 >= REQUESTS:
            break
    await lock.rollback()
    await blocker.close()

    results = await asyncio.gather(*calls, return_exceptions=True)
    accepted = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(accepted) + len(errors) == REQUESTS
    assert errors and all(
        e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors
    )
    assert all(r.outcome == inventory_pb2.RESERVE_OUTCOME_RESERVED for r in accepted)
    availability = await server.inventory.GetAvailability(
        inventory_pb2.GetAvailabilityRequest(skus=["SKU-1"])
    )
    assert availability.skus[0].total.held == len(accepted)
