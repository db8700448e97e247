"""Many callers at once against one sku: never more held than is on hand."""

import asyncio

from stockward.v1 import inventory_pb2
from tests.api.client import (
    availability,
    line,
    list_all,
    reserve,
    reserve_request,
    set_on_hand,
)
from tests.conftest import ServerFactory

RESERVED = inventory_pb2.RESERVE_OUTCOME_RESERVED
REJECTED = inventory_pb2.RESERVE_OUTCOME_REJECTED


def one_mug(request_id: str) -> inventory_pb2.ReserveRequest:
    return reserve_request(request_id, line("MUG", 1, location="DC"))


async def test_concurrent_reserves_hold_exactly_what_is_on_hand(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 50))

    responses = await asyncio.gather(
        *(reserve(server, one_mug(f"order-{index}")) for index in range(200))
    )

    outcomes = [response.outcome for response in responses]
    assert outcomes.count(RESERVED) == 50
    assert outcomes.count(REJECTED) == 150
    assert await availability(server, "MUG") == (50, 50, 0)
    listed = await list_all(server, page_size=1000)
    assert len(listed[0]) == 50


async def test_concurrent_reserves_and_releases_never_hold_more_than_on_hand(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 50))
    first = await asyncio.gather(
        *(reserve(server, one_mug(f"a-{index}")) for index in range(50))
    )

    async def give_back(reservation_id: str) -> None:
        await server.inventory.Release(
            inventory_pb2.ReleaseRequest(
                request_id="give-" + reservation_id, reservation_id=reservation_id
            )
        )

    _, second, seen = await asyncio.gather(
        asyncio.gather(*(give_back(item.reservation_id) for item in first[:20])),
        asyncio.gather(
            *(reserve(server, one_mug(f"b-{index}")) for index in range(100))
        ),
        asyncio.gather(*(availability(server, "MUG") for _ in range(20))),
    )

    assert all(held <= on_hand for on_hand, held, _ in seen)
    won = [item.outcome for item in second].count(RESERVED)
    # Only the 20 released units can be won again, however the calls interleave.
    assert won <= 20
    assert await availability(server, "MUG") == (50, 30 + won, 20 - won)


async def test_concurrent_retries_of_one_request_hold_once(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 50))
    request = reserve_request("order-1", line("MUG", 5, location="DC"))

    responses = await asyncio.gather(*(reserve(server, request) for _ in range(50)))

    assert len({response.reservation_id for response in responses}) == 1
    assert sum(1 for response in responses if not response.replayed) == 1
    assert await availability(server, "MUG") == (50, 5, 45)
