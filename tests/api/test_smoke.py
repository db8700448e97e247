from stockward.v1 import admin_pb2, inventory_pb2
from tests.conftest import ServerFactory, stop_server


async def test_reserve_then_replay_after_restart(start_server: ServerFactory) -> None:
    server = await start_server()
    await server.admin.SetOnHand(
        admin_pb2.SetOnHandRequest(
            source="erp",
            source_event_id="e1",
            counts=[admin_pb2.OnHandCount(sku="A", location="L1", on_hand=3)],
        )
    )
    request = inventory_pb2.ReserveRequest(
        request_id="r1",
        channel="web",
        lines=[inventory_pb2.ReserveLine(sku="A", quantity=2, location="L1")],
    )
    first = await server.inventory.Reserve(request)
    assert first.outcome == inventory_pb2.RESERVE_OUTCOME_RESERVED
    await stop_server(server)

    again = await start_server()
    replay = await again.inventory.Reserve(request)
    assert replay.replayed
    assert replay.reservation_id == first.reservation_id
