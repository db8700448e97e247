"""Inbound supply and pre-orders over gRPC, on a real server and Postgres."""

import grpc
import pytest

from server.clock import US_PER_S, FakeClock
from stockward.v1 import admin_pb2, inventory_pb2
from tests.api.client import (
    line,
    refusal,
    refused,
    reserve,
    reserve_request,
    set_on_hand,
)
from tests.conftest import Running, ServerFactory, stop_server

SKU = "PHONE"
DC = "DC"
WEEK_S = 7 * 24 * 3600


async def _expect(
    server: Running, clock: FakeClock, change_id: str, units: int, *, eta: bool = True
) -> None:
    supply = admin_pb2.InboundSupply(sku=SKU, location=DC, quantity=units)
    if eta:
        supply.eta.FromMicroseconds(clock.now_us() + WEEK_S * US_PER_S)
    await server.admin.SetInboundSupply(
        admin_pb2.SetInboundSupplyRequest(
            actor="erp", change_id=change_id, supplies=[supply]
        )
    )


async def _allow_preorders(server: Running, channel: str) -> None:
    await server.admin.SetChannelPreorders(
        admin_pb2.SetChannelPreordersRequest(
            actor="ops", change_id=f"pre-{channel}", channel=channel, allowed=True
        )
    )


async def _receive(server: Running, event_id: str, units: int) -> None:
    await server.admin.AdjustStock(
        admin_pb2.AdjustStockRequest(
            source="wms",
            source_event_id=event_id,
            adjustments=[
                admin_pb2.StockAdjustment(
                    sku=SKU,
                    location=DC,
                    delta=units,
                    reason=admin_pb2.ADJUSTMENT_REASON_RECEIPT,
                )
            ],
        )
    )


async def _held(server: Running, request_id: str, channel: str, units: int) -> bool:
    answer = await reserve(
        server,
        reserve_request(request_id, line(SKU, units, location=DC), channel=channel),
    )
    return answer.outcome == inventory_pb2.RESERVE_OUTCOME_RESERVED


async def _view(server: Running, channel: str) -> inventory_pb2.Availability:
    answer = await server.inventory.GetAvailability(
        inventory_pb2.GetAvailabilityRequest(skus=[SKU], channel=channel)
    )
    total: inventory_pb2.Availability = answer.skus[0].total
    return total


async def _inbound(server: Running) -> list[tuple[str, str, int]]:
    policies = await server.admin.GetPolicies(admin_pb2.GetPoliciesRequest())
    return [(x.sku, x.location, x.quantity) for x in policies.inbound]


async def test_only_preorder_channels_hold_against_inbound_supply(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", (SKU, DC, 2))
    await _expect(server, clock, "po-1", 10)
    await _allow_preorders(server, "web")

    assert await _held(server, "web-1", "web", 8)
    assert not await _held(server, "pos-1", "pos", 1)
    assert (await _view(server, "web")).available_to_sell == 4
    assert (await _view(server, "pos")).available_to_sell == 0
    assert (await _view(server, "pos")).inbound == 10


async def test_receipt_serves_waiting_preorders_first_and_uses_up_inbound(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", (SKU, DC, 2))
    await _expect(server, clock, "po-1", 10)
    await _allow_preorders(server, "web")
    assert await _held(server, "web-1", "web", 8)

    await _receive(server, "receipt-1", 7)

    # 9 on hand cover the 8 pre-ordered first: one unit is left for other channels.
    assert (await _view(server, "pos")).available_to_sell == 1
    assert await _inbound(server) == [(SKU, DC, 3)]
    assert (await _view(server, "web")).available_to_sell == 4


async def test_preorders_covered_by_inbound_are_not_at_risk(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", (SKU, DC, 0))
    await _expect(server, clock, "po-1", 5)
    await _allow_preorders(server, "web")
    assert await _held(server, "web-1", "web", 5)

    listed = await server.admin.ListAtRiskReservations(
        admin_pb2.ListAtRiskReservationsRequest()
    )
    assert list(listed.reservations) == []

    await _expect(server, clock, "po-2", 2)
    listed = await server.admin.ListAtRiskReservations(
        admin_pb2.ListAtRiskReservationsRequest()
    )
    assert [x.quantity_uncovered for r in listed.reservations for x in r.lines] == [3]


async def test_preorder_cannot_ship_before_the_receipt(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", (SKU, DC, 0))
    await _expect(server, clock, "po-1", 5)
    await _allow_preorders(server, "web")
    answer = await reserve(
        server, reserve_request("web-1", line(SKU, 2, location=DC), channel="web")
    )
    await server.inventory.Confirm(
        inventory_pb2.ConfirmRequest(
            request_id="c-1", reservation_id=answer.reservation_id
        )
    )

    error = await refused(
        server.inventory.Fulfill(
            inventory_pb2.FulfillRequest(
                request_id="f-1", reservation_id=answer.reservation_id
            )
        )
    )

    assert refusal(error) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ON_HAND_SHORT",
        "lines",
    )


async def test_inbound_and_preorder_settings_survive_a_restart(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", (SKU, DC, 1))
    await _expect(server, clock, "po-1", 6)
    await _allow_preorders(server, "web")
    await _receive(server, "receipt-1", 2)
    await stop_server(server)

    again = await start_server()

    assert await _inbound(again) == [(SKU, DC, 4)]
    policies = await again.admin.GetPolicies(admin_pb2.GetPoliciesRequest())
    assert [p.channel for p in policies.preorder_channels] == ["web"]
    assert (await _view(again, "web")).available_to_sell == 7


@pytest.mark.parametrize(
    ("supply", "reason", "field"),
    [
        (
            admin_pb2.InboundSupply(sku=SKU, location=DC, quantity=3),
            "FIELD_REQUIRED",
            "supplies[0].eta",
        ),
        (
            admin_pb2.InboundSupply(sku=SKU, location=DC, quantity=-1),
            "UNITS_OUT_OF_RANGE",
            "supplies[0].quantity",
        ),
        (
            admin_pb2.InboundSupply(sku="", location=DC, quantity=1),
            "FIELD_REQUIRED",
            "supplies[0].sku",
        ),
    ],
    ids=["no eta", "negative", "no sku"],
)
async def test_bad_inbound_supply_is_refused_and_changes_nothing(
    start_server: ServerFactory,
    supply: admin_pb2.InboundSupply,
    reason: str,
    field: str,
) -> None:
    server = await start_server()

    error = await refused(
        server.admin.SetInboundSupply(
            admin_pb2.SetInboundSupplyRequest(
                actor="erp", change_id="bad", supplies=[supply]
            )
        )
    )

    assert refusal(error) == (grpc.StatusCode.INVALID_ARGUMENT, reason, field)
    assert await _inbound(server) == []
