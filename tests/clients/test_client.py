"""The client library against a real server on loopback: idempotency keys reused on
retry, deadlines, error decoding, auto-batching under concurrency, and the blocking
wrapper.

A lost answer is the one fault simulated here: an interceptor lets a call reach the
server and then tells the client it failed with UNAVAILABLE, as a connection cut
after the server answered would.
"""

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from clients import (
    Batching,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    RetryPolicy,
    StockwardClient,
    SyncStockwardClient,
    UnavailableError,
    line,
)
from server.clock import FakeClock
from stockward.v1 import admin_pb2, inventory_pb2
from tests.conftest import Running, ServerFactory

RESERVED = inventory_pb2.RESERVE_OUTCOME_RESERVED
REJECTED = inventory_pb2.RESERVE_OUTCOME_REJECTED
SKU, DC = "KETTLE", "DC"
# Retries in these tests wait milliseconds, not the production backoff.
FAST_RETRY = RetryPolicy(attempts_max=4, backoff_initial_s=0.005, backoff_max_s=0.02)


class LoseAnswers(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Deliver the first `count` calls of a method, then report them as failed."""

    def __init__(self, method: str, count: int) -> None:
        self.method = method
        self.left = count
        self.requests: list[Any] = []

    async def intercept_unary_unary(
        self,
        continuation: Callable[[Any, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        call = await continuation(client_call_details, request)
        method = client_call_details.method
        name = method.decode() if isinstance(method, bytes) else method
        if not name.endswith("/" + self.method):
            return call
        self.requests.append(request)
        await call
        if self.left > 0:
            self.left -= 1
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details="connection lost after the server answered",
            )
        return call


def address(server: Running) -> str:
    return f"127.0.0.1:{server.app.port}"


async def stocked(start_server: ServerFactory, units: int = 100) -> Running:
    server = await start_server()
    await server.admin.SetOnHand(
        admin_pb2.SetOnHandRequest(
            source="erp",
            source_event_id="count-1",
            counts=[admin_pb2.OnHandCount(sku=SKU, location=DC, on_hand=units)],
        )
    )
    return server


async def held(server: Running) -> int:
    response = await server.inventory.GetAvailability(
        inventory_pb2.GetAvailabilityRequest(skus=[SKU])
    )
    units: int = response.skus[0].total.held
    return units


# Retries ----------------------------------------------------------------------------


async def test_lost_answer_is_retried_with_the_same_request_id_and_applied_once(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    lose = LoseAnswers("Reserve", count=2)
    ids: list[str] = []

    def new_id() -> str:
        ids.append(f"op-{len(ids)}")
        return ids[-1]

    channel = grpc.aio.insecure_channel(address(server), interceptors=[lose])
    async with channel, StockwardClient(channel, retry=FAST_RETRY, new_id=new_id) as c:
        answer = await c.reserve("web", [line(SKU, 3, location=DC)])

        assert answer.outcome == RESERVED
        assert answer.replayed
        assert ids == ["op-0"]
        assert [r.request_id for r in lose.requests] == ["op-0"] * 3
        assert c.retries == 2
    assert await held(server) == 3


async def test_retries_stop_at_the_cap_and_surface_unavailable(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    lose = LoseAnswers("Confirm", count=10)
    channel = grpc.aio.insecure_channel(address(server), interceptors=[lose])
    async with channel, StockwardClient(channel, retry=FAST_RETRY) as client:
        held_ = await client.reserve("web", [line(SKU, 1, location=DC)])

        with pytest.raises(UnavailableError):
            await client.confirm(held_.reservation_id)

        assert len(lose.requests) == FAST_RETRY.attempts_max
        assert len({r.request_id for r in lose.requests}) == 1


async def test_caller_mistakes_are_not_retried(start_server: ServerFactory) -> None:
    server = await stocked(start_server)
    async with StockwardClient(address(server), retry=FAST_RETRY) as client:
        with pytest.raises(InvalidArgumentError):
            await client.reserve("web", [line(SKU, 0, location=DC)])

        assert client.retries == 0


# Deadlines --------------------------------------------------------------------------


async def test_deadline_bounds_the_whole_operation_including_retries(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    lose = LoseAnswers("Reserve", count=1000)
    patient = RetryPolicy(attempts_max=1000, backoff_initial_s=0.01, backoff_max_s=0.02)
    channel = grpc.aio.insecure_channel(address(server), interceptors=[lose])
    async with channel, StockwardClient(channel, retry=patient) as client:
        started = time.monotonic()
        with pytest.raises((UnavailableError, DeadlineExceededError)):
            await client.reserve("web", [line(SKU, 1, location=DC)], deadline_s=0.3)
        elapsed_s = time.monotonic() - started

    assert 0.2 < elapsed_s < 1.0
    assert 2 < len(lose.requests) < 1000


async def test_call_to_a_hung_server_ends_at_its_deadline() -> None:
    # A listener that accepts connections and never speaks HTTP/2: a hung server.
    accepted: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    hung = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = hung.sockets[0].getsockname()[1]
    try:
        async with StockwardClient(f"127.0.0.1:{port}", retry=FAST_RETRY) as client:
            started = time.monotonic()
            with pytest.raises(DeadlineExceededError) as caught:
                await client.get_availability([SKU], deadline_s=0.2)
            elapsed_s = time.monotonic() - started
    finally:
        for writer in accepted:
            writer.close()
        hung.close()
        await hung.wait_closed()

    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.15 < elapsed_s < 1.0


# Errors -----------------------------------------------------------------------------


async def test_errors_are_decoded_into_exceptions_that_name_the_reason(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    async with StockwardClient(address(server)) as client:
        with pytest.raises(InvalidArgumentError) as bad:
            await client.reserve("web", [line(SKU, -1, location=DC)])
        with pytest.raises(NotFoundError) as missing:
            await client.confirm("no-such-reservation")
        done = await client.reserve("web", [line(SKU, 1, location=DC)])
        await client.release(done.reservation_id)
        with pytest.raises(FailedPreconditionError) as twice:
            await client.release(done.reservation_id)

    assert (bad.value.reason, bad.value.field) == (
        "QUANTITY_OUT_OF_RANGE",
        "lines[0].quantity",
    )
    assert missing.value.reason == "RESERVATION_NOT_FOUND"
    assert twice.value.reason == "RESERVATION_RELEASED"
    assert "RESERVATION_RELEASED" in str(twice.value)


async def test_throttle_comes_back_with_the_delay_the_server_asks_for(
    start_server: ServerFactory, clock: FakeClock
) -> None:
    server = await stocked(start_server)
    async with StockwardClient(address(server)) as client:
        until = clock.now_us() // 1_000_000 + 3600
        control = admin_pb2.ContinuityControl(
            kind=admin_pb2.CONTROL_KIND_THROTTLE_CHANNEL,
            channel="web",
            reservations_per_second=1,
            reason="incident 7",
        )
        control.until.FromSeconds(int(until))
        await client.set_continuity_control(
            admin_pb2.SetContinuityControlRequest(actor="ops", control=control)
        )
        await client.reserve("web", [line(SKU, 1, location=DC)])

        with pytest.raises(ResourceExhaustedError) as throttled:
            await client.reserve("web", [line(SKU, 1, location=DC)])

    assert throttled.value.reason == "CHANNEL_THROTTLED"
    assert throttled.value.retry_after_s is not None
    assert 0 < throttled.value.retry_after_s <= 1.0


# Auto-batching ----------------------------------------------------------------------


async def test_concurrent_reserves_are_coalesced_and_each_caller_gets_its_own_answer(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server, units=200)
    batching = Batching(window_s=0.005, size_max=100)
    async with StockwardClient(address(server), batching=batching) as client:
        answers = await asyncio.gather(
            *(
                client.reserve("web", [line(SKU, 1, location=DC)], order_ref=f"o-{i}")
                for i in range(300)
            )
        )
        stats = client.batch_stats
        assert stats is not None
        for index in (0, 150, 299):
            if answers[index].outcome == RESERVED:
                mine = await client.get_reservation(answers[index].reservation_id)
                assert mine.order_ref == f"o-{index}"

    outcomes = [answer.outcome for answer in answers]
    assert outcomes.count(RESERVED) == 200
    assert outcomes.count(REJECTED) == 100
    assert len({a.reservation_id for a in answers if a.outcome == RESERVED}) == 200
    assert stats.commands_sent == 300
    assert 3 <= stats.batches_sent <= 30
    assert await held(server) == 200


async def test_batched_refusal_reaches_only_its_own_caller(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    batching = Batching(window_s=0.02)
    async with StockwardClient(address(server), batching=batching) as client:
        good, bad = await asyncio.gather(
            client.reserve("web", [line(SKU, 2, location=DC)]),
            client.reserve("web", [line(SKU, 0, location=DC)]),
            return_exceptions=True,
        )
        stats = client.batch_stats

    assert isinstance(good, inventory_pb2.ReserveResponse)
    assert good.outcome == RESERVED
    assert isinstance(bad, InvalidArgumentError)
    assert bad.reason == "QUANTITY_OUT_OF_RANGE"
    assert stats is not None and stats.batches_sent == 1


async def test_lost_batch_answer_is_retried_and_every_command_applied_once(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    lose = LoseAnswers("ExecuteBatch", count=1)
    batching = Batching(window_s=0.01)
    channel = grpc.aio.insecure_channel(address(server), interceptors=[lose])
    async with (
        channel,
        StockwardClient(channel, batching=batching, retry=FAST_RETRY) as client,
    ):
        answers = await asyncio.gather(
            *(client.reserve("web", [line(SKU, 1, location=DC)]) for _ in range(40))
        )

    assert all(answer.outcome == RESERVED for answer in answers)
    assert all(answer.replayed for answer in answers)
    first, *again = lose.requests
    lost_ids = [c.reserve.request_id for c in first.commands]
    sent_again = [c.reserve.request_id for batch in again for c in batch.commands]
    assert len(lost_ids) == 40
    assert sorted(sent_again) == sorted(lost_ids)
    assert await held(server) == 40


async def test_batched_caller_past_its_deadline_gives_up_alone(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server)
    batching = Batching(window_s=0.2)
    async with StockwardClient(address(server), batching=batching) as client:
        hasty, patient = await asyncio.gather(
            client.reserve("web", [line(SKU, 1, location=DC)], deadline_s=0.05),
            client.reserve("web", [line(SKU, 1, location=DC)], deadline_s=5.0),
            return_exceptions=True,
        )

    assert isinstance(hasty, DeadlineExceededError)
    assert isinstance(patient, inventory_pb2.ReserveResponse)
    assert patient.outcome == RESERVED


# Blocking wrapper -------------------------------------------------------------------


async def test_blocking_client_works_from_plain_threads_and_batches_them(
    start_server: ServerFactory,
) -> None:
    server = await stocked(start_server, units=30)

    def shop() -> tuple[list[inventory_pb2.ReserveResponse], int]:
        batching = Batching(window_s=0.01)
        with SyncStockwardClient(address(server), batching=batching) as client:
            answers = [client.reserve("web", [line(SKU, 1, location=DC)])]
            results: list[inventory_pb2.ReserveResponse] = []

            def buyer() -> None:
                results.append(client.reserve("web", [line(SKU, 1, location=DC)]))

            threads = [threading.Thread(target=buyer) for _ in range(40)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            stats = client.batch_stats
            assert stats is not None
            return answers + results, stats.batches_sent

    answers, batches_sent = await asyncio.to_thread(shop)

    outcomes = [answer.outcome for answer in answers]
    assert outcomes.count(RESERVED) == 30
    assert outcomes.count(REJECTED) == 11
    assert batches_sent < 41
    assert await held(server) == 30
