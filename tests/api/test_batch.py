"""ExecuteBatch: independent commands, one result each, in request order."""

import grpc

from stockward.v1 import inventory_pb2, types_pb2
from tests.api.client import (
    availability,
    confirm,
    line,
    list_all,
    reserve,
    reserve_request,
    set_on_hand,
    status_refusal,
)
from tests.conftest import ServerFactory, stop_server

RESERVED = inventory_pb2.RESERVE_OUTCOME_RESERVED
REJECTED = inventory_pb2.RESERVE_OUTCOME_REJECTED


def reserve_command(request_id: str, quantity: int = 1) -> inventory_pb2.Command:
    request = reserve_request(request_id, line("MUG", quantity, location="DC"))
    return inventory_pb2.Command(reserve=request)


async def test_batch_answers_each_kind_of_command_in_request_order(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 20))
    ids = {}
    for name in ("to-confirm", "to-release", "to-fulfil", "to-extend"):
        ids[name] = (
            await reserve(server, reserve_request(name, line("MUG", 2, location="DC")))
        ).reservation_id
    await confirm(server, ids["to-fulfil"])
    extend_before = (
        await server.inventory.GetReservation(
            inventory_pb2.GetReservationRequest(reservation_id=ids["to-extend"])
        )
    ).reservation.expires_at.ToMicroseconds()

    response = await server.inventory.ExecuteBatch(
        inventory_pb2.ExecuteBatchRequest(
            commands=[
                reserve_command("new", quantity=3),
                inventory_pb2.Command(
                    confirm=inventory_pb2.ConfirmRequest(
                        request_id="b1", reservation_id=ids["to-confirm"]
                    )
                ),
                inventory_pb2.Command(
                    release=inventory_pb2.ReleaseRequest(
                        request_id="b2", reservation_id=ids["to-release"]
                    )
                ),
                inventory_pb2.Command(
                    fulfill=inventory_pb2.FulfillRequest(
                        request_id="b3", reservation_id=ids["to-fulfil"]
                    )
                ),
                inventory_pb2.Command(
                    extend=inventory_pb2.ExtendRequest(
                        request_id="b4",
                        reservation_id=ids["to-extend"],
                        ttl_seconds=3600,
                    )
                ),
            ]
        )
    )

    kinds = [result.WhichOneof("result") for result in response.results]
    assert kinds == ["reserve", "confirm", "release", "fulfill", "extend"]
    made, confirmed, released, fulfilled, extended = response.results
    assert made.reserve.outcome == RESERVED
    assert confirmed.confirm.reservation.state == types_pb2.RESERVATION_STATE_CONFIRMED
    assert released.release.reservation.state == types_pb2.RESERVATION_STATE_RELEASED
    assert fulfilled.fulfill.reservation.state == types_pb2.RESERVATION_STATE_FULFILLED
    assert extended.extend.reservation.expires_at.ToMicroseconds() > extend_before
    # 20 counted, 2 shipped; held: new 3, to-confirm 2, to-extend 2.
    assert await availability(server, "MUG") == (18, 7, 11)


async def test_bad_commands_get_an_error_status_while_the_others_succeed(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 10))

    response = await server.inventory.ExecuteBatch(
        inventory_pb2.ExecuteBatchRequest(
            commands=[
                reserve_command("first", quantity=2),
                reserve_command("zero", quantity=0),
                inventory_pb2.Command(),
                inventory_pb2.Command(
                    confirm=inventory_pb2.ConfirmRequest(
                        request_id="c1", reservation_id="r-unknown"
                    )
                ),
                reserve_command("last", quantity=3),
            ]
        )
    )

    first, zero, empty, unknown, last = response.results
    assert first.reserve.outcome == RESERVED
    assert last.reserve.outcome == RESERVED
    assert status_refusal(zero.error) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "QUANTITY_OUT_OF_RANGE",
        "lines[0].quantity",
    )
    assert status_refusal(empty.error) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "FIELD_REQUIRED",
        "commands[2].command",
    )
    assert status_refusal(unknown.error) == (
        grpc.StatusCode.NOT_FOUND,
        "RESERVATION_NOT_FOUND",
        "reservation_id",
    )
    assert await availability(server, "MUG") == (10, 5, 5)
    listed = await list_all(server, page_size=100)
    assert sorted(listed[0]) == sorted(
        [first.reserve.reservation_id, last.reserve.reservation_id]
    )


async def test_a_retried_batch_replays_every_answer_without_holding_again(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 10))
    request = inventory_pb2.ExecuteBatchRequest(
        commands=[reserve_command(f"b{index}", quantity=2) for index in range(3)]
    )

    first = await server.inventory.ExecuteBatch(request)
    again = await server.inventory.ExecuteBatch(request)

    assert [result.reserve.replayed for result in again.results] == [True] * 3
    assert [r.reserve.reservation_id for r in again.results] == [
        r.reserve.reservation_id for r in first.results
    ]
    assert await availability(server, "MUG") == (10, 6, 4)


async def test_the_same_request_twice_in_one_batch_holds_once(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 10))

    response = await server.inventory.ExecuteBatch(
        inventory_pb2.ExecuteBatchRequest(
            commands=[reserve_command("twice", quantity=4)] * 2
        )
    )

    first, second = response.results
    assert not first.reserve.replayed
    assert second.reserve.replayed
    assert second.reserve.reservation_id == first.reserve.reservation_id
    assert await availability(server, "MUG") == (10, 4, 6)


async def test_a_thousand_reserves_against_six_hundred_units_hold_exactly_six_hundred(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    await set_on_hand(server, "count-1", ("MUG", "DC", 600))

    response = await server.inventory.ExecuteBatch(
        inventory_pb2.ExecuteBatchRequest(
            commands=[reserve_command(f"order-{index}") for index in range(1000)]
        )
    )

    outcomes = [result.reserve.outcome for result in response.results]
    assert outcomes.count(RESERVED) == 600
    assert outcomes.count(REJECTED) == 400
    made = {
        r.reserve.reservation_id
        for r in response.results
        if r.reserve.outcome == RESERVED
    }
    assert len(made) == 600
    assert await availability(server, "MUG") == (600, 600, 0)

    await stop_server(server)
    server = await start_server()
    assert await availability(server, "MUG") == (600, 600, 0)
    listed = await list_all(server, page_size=1000)
    assert set(listed[0]) == made
