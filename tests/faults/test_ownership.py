"""One server per schema: a second one would promise the same units again."""

import pytest

from server.wal.schema import SchemaOwned
from stockward.v1 import inventory_pb2
from tests.conftest import ServerFactory, stop_server


async def test_second_server_on_a_schema_refuses_to_start_until_the_first_stops(
    start_server: ServerFactory,
) -> None:
    first = await start_server()

    with pytest.raises(SchemaOwned):
        await start_server(owner_wait_s=0.3)

    await stop_server(first)
    second = await start_server(owner_wait_s=0.3)
    answer = await second.inventory.GetAvailability(
        inventory_pb2.GetAvailabilityRequest(skus=["ANY"])
    )
    assert not answer.skus[0].known
