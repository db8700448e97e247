"""HttpAdapter against the ERP simulator on loopback, and against tiny servers that
answer what a real ERP should not; the simulator runs on a fake clock."""

import asyncio
import datetime
import email.utils
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from erp_bridge.adapters import (
    Acknowledgement,
    BatchConflict,
    BatchRefused,
    ErpBatch,
    ErpLine,
    Feed,
    LineRejection,
    Throttled,
    Transient,
)
from erp_bridge.adapters.http import (
    ANSWER_BYTES_MAX,
    RETRY_AFTER_DEFAULT_S,
    RETRY_AFTER_MAX_S,
    HttpAdapter,
    field_names,
    retry_after_s,
)
from erp_bridge.simulator import ErpSimulator, Faults, SimulatorConfig
from server.clock import US_PER_S, FakeClock

TOKEN = "s3cret"
AUTH = ("Authorization", f"Bearer {TOKEN}")
# Loopback answers in milliseconds; a send that takes this long has hung.
TIMEOUT_S = 10.0
# The budget of the test whose server never answers: short, since it is waited out.
HANG_TIMEOUT_S = 0.2
# Far above HANG_TIMEOUT_S, so a slow machine does not fail the test, and far below
# what a send without a working budget would take (aiohttp's default is 5 minutes).
HANG_NOTICED_S = 3.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Harness:
    """Simulators, tiny servers and adapters of one test, closed in the right order."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http
        self.clock = FakeClock()
        self._simulators: list[ErpSimulator] = []
        self._runners: list[web.AppRunner] = []
        self._adapters: list[HttpAdapter] = []

    async def start_erp(self, **settings: Any) -> ErpSimulator:
        # Latency would hold every request until the fake clock is advanced.
        settings.setdefault("faults", Faults(latency_ms=0))
        simulator = ErpSimulator(
            SimulatorConfig(token=TOKEN, **settings), clock=self.clock
        )
        await simulator.start()
        self._simulators.append(simulator)
        return simulator

    async def serve(self, handler: Handler) -> str:
        """A tiny ERP on loopback whose POST /v1/batches is `handler`; its url."""
        app = web.Application()
        app.router.add_post("/v1/batches", handler)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self._runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    def adapter(self, url: str, **settings: Any) -> HttpAdapter:
        settings.setdefault("auth_header", AUTH)
        adapter = HttpAdapter(url=url, clock=self.clock, **settings)
        self._adapters.append(adapter)
        return adapter

    async def admin(self, erp: ErpSimulator, path: str, body: object) -> None:
        async with self.http.put(
            erp.url + path, json=body, headers={AUTH[0]: AUTH[1]}
        ) as response:
            assert response.status == 200, await response.text()

    async def close(self) -> None:
        for adapter in self._adapters:
            await adapter.close()
        for runner in self._runners:
            await runner.cleanup()
        for simulator in self._simulators:
            await simulator.stop()


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        harness = Harness(http)
        try:
            yield harness
        finally:
            await harness.close()


def line(line_id: str, **fields: Any) -> ErpLine:
    values: dict[str, Any] = {
        "line_id": line_id,
        "sku": "SKU-1",
        "location": "WH-1",
        "on_hand_delta": 0,
        "held_delta": 1,
        "reservation_id": "R-" + line_id,
        "channel": "web",
        "kind": "reserve",
    }
    return ErpLine(**(values | fields))


def batch(batch_id: str, *lines: ErpLine, stream: str = "bridge.s0") -> ErpBatch:
    return ErpBatch(batch_id=batch_id, stream=stream, feed=Feed.LEDGER, lines=lines)


async def test_applied_batch_is_acknowledged_and_booked_on_its_stream(
    harness: Harness,
) -> None:
    erp = await harness.start_erp()
    adapter = harness.adapter(erp.url)

    ack = await adapter.send(
        batch("B1", line("L1", held_delta=2), line("L2", sku="SKU-2", on_hand_delta=5)),
        timeout_s=TIMEOUT_S,
    )

    assert ack == Acknowledgement("B1", applied_lines=2, rejected=(), duplicate=False)
    ledger = erp.books.ledger_json()
    assert ledger["positions"] == [
        {"sku": "SKU-1", "location": "WH-1", "on_hand": 0, "held": 2},
        {"sku": "SKU-2", "location": "WH-1", "on_hand": 5, "held": 1},
    ]
    assert ledger["last_batch_ids"] == {"bridge.s0": "B1"}
    assert adapter.endpoint == f"{erp.url}/v1/batches"
    assert adapter.stats.in_flight == 0
    assert adapter.stats.in_flight_peak == 1


async def test_resent_batch_is_acknowledged_as_duplicate(harness: Harness) -> None:
    erp = await harness.start_erp()
    adapter = harness.adapter(erp.url)
    sent = batch("B1", line("L1"), line("L2"))
    first = await adapter.send(sent, timeout_s=TIMEOUT_S)

    again = await adapter.send(sent, timeout_s=TIMEOUT_S)

    assert again == Acknowledgement("B1", applied_lines=2, rejected=(), duplicate=True)
    assert first.duplicate is False
    assert erp.books.lines_applied == 2


async def test_unknown_item_and_closed_period_come_back_as_line_rejections(
    harness: Harness,
) -> None:
    erp = await harness.start_erp()
    await harness.admin(erp, "/v1/admin/items", {"skus": ["SKU-1"]})
    await harness.admin(erp, "/v1/admin/closed-locations", {"locations": ["OLD"]})
    adapter = harness.adapter(erp.url)

    ack = await adapter.send(
        batch("B1", line("L1"), line("L2", sku="NOPE"), line("L3", location="OLD")),
        timeout_s=TIMEOUT_S,
    )

    assert ack.applied_lines == 1
    assert [(r.line_id, r.reason) for r in ack.rejected] == [
        ("L2", "UNKNOWN_ITEM"),
        ("L3", "PERIOD_CLOSED"),
    ]
    assert all(r.message for r in ack.rejected)
    assert erp.books.lines_applied == 1


async def test_throttled_batch_carries_the_retry_after_of_the_erp(
    harness: Harness,
) -> None:
    erp = await harness.start_erp(requests_per_s=1)
    adapter = harness.adapter(erp.url)
    await adapter.send(batch("B1", line("L1")), timeout_s=TIMEOUT_S)

    with pytest.raises(Throttled) as caught:
        await adapter.send(batch("B2", line("L2")), timeout_s=TIMEOUT_S)

    assert caught.value.retry_after_s == 1.0
    assert erp.books.batches_applied == 1
    harness.clock.advance(caught.value.retry_after_s)
    ack = await adapter.send(batch("B2", line("L2")), timeout_s=TIMEOUT_S)
    assert ack.applied_lines == 1


async def test_unavailable_erp_is_transient_and_books_nothing(
    harness: Harness,
) -> None:
    erp = await harness.start_erp(faults=Faults(error_rate=1.0, latency_ms=0))
    adapter = harness.adapter(erp.url)

    with pytest.raises(Transient, match="503"):
        await adapter.send(batch("B1", line("L1")), timeout_s=TIMEOUT_S)

    assert erp.books.batches_applied == 0


async def test_batch_applied_before_a_500_is_a_duplicate_when_resent(
    harness: Harness,
) -> None:
    erp = await harness.start_erp(
        faults=Faults(applied_then_error_rate=1.0, latency_ms=0)
    )
    adapter = harness.adapter(erp.url)
    sent = batch("B1", line("L1", held_delta=4))

    with pytest.raises(Transient, match="500"):
        await adapter.send(sent, timeout_s=TIMEOUT_S)
    await harness.admin(erp, "/v1/admin/faults", {"applied_then_error_rate": 0.0})
    ack = await adapter.send(sent, timeout_s=TIMEOUT_S)

    assert ack == Acknowledgement("B1", applied_lines=1, rejected=(), duplicate=True)
    assert erp.books.ledger_json()["positions"] == [
        {"sku": "SKU-1", "location": "WH-1", "on_hand": 0, "held": 4}
    ]


async def test_other_content_under_a_used_batch_id_is_a_conflict(
    harness: Harness,
) -> None:
    erp = await harness.start_erp()
    adapter = harness.adapter(erp.url)
    await adapter.send(batch("B1", line("L1")), timeout_s=TIMEOUT_S)

    with pytest.raises(BatchConflict, match="BATCH_CONFLICT"):
        await adapter.send(batch("B1", line("L1", held_delta=7)), timeout_s=TIMEOUT_S)
    # The stream takes part in the content too.
    with pytest.raises(BatchConflict):
        await adapter.send(batch("B1", line("L1"), stream="other"), timeout_s=TIMEOUT_S)

    assert erp.books.lines_applied == 1


@pytest.mark.parametrize(
    ("sent", "line_index"),
    [
        (batch("B1", line("L1"), line("L2", sku="")), 1),
        (batch("B1", line("L1"), line("L2"), line("L3", kind="")), 2),
        (batch("B" * 129, line("L1")), None),
        (batch("B1", line("L1"), line("L1")), 1),
    ],
)
async def test_invalid_batch_is_refused_naming_the_line_at_fault(
    harness: Harness, sent: ErpBatch, line_index: int | None
) -> None:
    erp = await harness.start_erp()
    adapter = harness.adapter(erp.url)

    with pytest.raises(BatchRefused, match="INVALID_ARGUMENT") as caught:
        await adapter.send(sent, timeout_s=TIMEOUT_S)

    assert caught.value.line_index == line_index
    assert erp.books.batches_applied == 0


@pytest.mark.parametrize("auth_header", [None, ("Authorization", "Bearer wrong")])
async def test_missing_or_wrong_auth_is_refused_as_auth(
    harness: Harness, auth_header: tuple[str, str] | None
) -> None:
    erp = await harness.start_erp()
    adapter = harness.adapter(erp.url, auth_header=auth_header)

    with pytest.raises(BatchRefused, match="auth failed") as caught:
        await adapter.send(batch("B1", line("L1")), timeout_s=TIMEOUT_S)

    assert caught.value.line_index is None
    assert "wrong" not in str(caught.value)
    assert erp.stats.unauthorized == 1


MAPPING = {
    "batch_id": "batchRef",
    "lines": "items",
    "line_id": "lineRef",
    "sku": "itemNumber",
    "rejected": "refused",
}


async def test_field_mapping_renames_keys_sent_and_read_back(harness: Harness) -> None:
    received: list[Any] = []

    async def erp(request: web.Request) -> web.Response:
        body = await request.json()
        received.append(body)
        return web.json_response(
            {
                "batchRef": body["batchRef"],
                "status": "applied",
                "applied_lines": 1,
                "refused": [
                    {"lineRef": "L2", "reason": "UNKNOWN_ITEM", "message": "?"}
                ],
            }
        )

    adapter = harness.adapter(await harness.serve(erp), field_mapping=MAPPING)

    ack = await adapter.send(
        batch("B1", line("L1"), line("L2", sku="X")), timeout_s=TIMEOUT_S
    )

    assert ack == Acknowledgement(
        "B1",
        applied_lines=1,
        rejected=(LineRejection("L2", "UNKNOWN_ITEM", "?"),),
        duplicate=False,
    )
    [body] = received
    assert list(body) == ["batchRef", "stream", "feed", "items"]
    assert (body["batchRef"], body["stream"], body["feed"]) == (
        "B1",
        "bridge.s0",
        "ledger",
    )
    assert body["items"][1] == {
        "lineRef": "L2",
        "itemNumber": "X",
        "location": "WH-1",
        "on_hand_delta": 0,
        "held_delta": 1,
        "reservation_id": "R-L2",
        "channel": "web",
        "kind": "reserve",
    }


async def test_field_mapping_applies_to_the_field_a_400_names(harness: Harness) -> None:
    async def erp(request: web.Request) -> web.Response:
        error = {
            "code": "BAD",
            "message": "no such item",
            "field": "items[1].itemNumber",
        }
        return web.json_response({"error": error}, status=400)

    url = await harness.serve(erp)
    mapped = harness.adapter(url, field_mapping=MAPPING)
    unmapped = harness.adapter(url)
    sent = batch("B1", line("L1"), line("L2"))

    with pytest.raises(BatchRefused) as caught:
        await mapped.send(sent, timeout_s=TIMEOUT_S)
    assert caught.value.line_index == 1
    # Without the mapping, `items` is not our name for the lines.
    with pytest.raises(BatchRefused) as caught:
        await unmapped.send(sent, timeout_s=TIMEOUT_S)
    assert caught.value.line_index is None


def test_field_mapping_refuses_unknown_keys_and_clashing_names() -> None:
    with pytest.raises(ValueError, match="unknown"):
        field_names({"colour": "color"})
    with pytest.raises(ValueError, match="one name"):
        field_names({"sku": "location"})
    with pytest.raises(ValueError, match="non-empty"):
        field_names({"sku": ""})
    assert field_names(None)["sku"] == "sku"


def answer(**changes: Any) -> dict[str, Any]:
    """A well-formed answer to batch("B1", line("L1"), line("L2")), then changed."""
    fields: dict[str, Any] = {
        "batch_id": "B1",
        "status": "applied",
        "applied_lines": 1,
        "rejected": [{"line_id": "L2", "reason": "UNKNOWN_ITEM", "message": "?"}],
    }
    return fields | changes


def rejection(line_id: object, reason: object = "X", message: object = "m") -> object:
    return {"line_id": line_id, "reason": reason, "message": message}


@pytest.mark.parametrize(
    "body",
    [
        b"<html>OK</html>",
        b"",
        b"[1, 2]",
        answer(batch_id="B2"),
        answer(status="queued"),
        answer(status=None),
        answer(applied_lines="1"),
        answer(applied_lines=True),
        answer(applied_lines=2),
        answer(rejected=None),
        answer(rejected=[rejection("L9")]),
        answer(applied_lines=0, rejected=[rejection("L2"), rejection("L2")]),
        answer(rejected=["L2"]),
        answer(rejected=[rejection("L2", reason="")]),
        answer(rejected=[rejection("L2", message=None)]),
        # A well-formed answer, but padded past the size an answer may have.
        orjson.dumps(answer()).replace(b",", b"," + b" " * ANSWER_BYTES_MAX, 1),
    ],
    ids=lambda body: repr(body)[:60],
)
async def test_garbage_answer_is_transient(harness: Harness, body: object) -> None:
    async def erp(request: web.Request) -> web.Response:
        if isinstance(body, bytes):
            return web.Response(body=body, content_type="application/json")
        return web.json_response(body)

    adapter = harness.adapter(await harness.serve(erp))
    # The next test shows the unchanged answer accepted: only the change is at fault.
    sent = batch("B1", line("L1"), line("L2"))

    with pytest.raises(Transient, match="garbage answer"):
        await adapter.send(sent, timeout_s=TIMEOUT_S)


async def test_well_formed_answer_of_the_garbage_test_is_accepted(
    harness: Harness,
) -> None:
    async def erp(request: web.Request) -> web.Response:
        return web.json_response(answer())

    adapter = harness.adapter(await harness.serve(erp))

    ack = await adapter.send(batch("B1", line("L1"), line("L2")), timeout_s=TIMEOUT_S)

    assert ack.rejected == (LineRejection("L2", "UNKNOWN_ITEM", "?"),)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (202, Transient),
        (302, Transient),
        (404, Transient),
        (408, Transient),
        (502, Transient),
        (403, BatchRefused),
        (413, BatchRefused),
        (422, BatchRefused),
    ],
)
async def test_other_statuses_map_to_an_outcome(
    harness: Harness, status: int, expected: type[Exception]
) -> None:
    async def erp(request: web.Request) -> web.Response:
        headers = {"Location": "http://127.0.0.1:1/elsewhere"} if status == 302 else {}
        return web.Response(status=status, text="<html>no</html>", headers=headers)

    adapter = harness.adapter(await harness.serve(erp))

    with pytest.raises(expected, match=str(status)) as caught:
        await adapter.send(batch("B1", line("L1")), timeout_s=TIMEOUT_S)

    if isinstance(caught.value, BatchRefused):
        assert caught.value.line_index is None


@pytest.mark.parametrize(
    ("header", "expected_s"),
    [
        ("30", 30.0),
        ("0", 0.0),
        ("100000", RETRY_AFTER_MAX_S),
        ("9" * 5_000, RETRY_AFTER_MAX_S),
        ("Thu, 01 Jan 2026 00:00:45 GMT", 45.0),
        ("Wed, 31 Dec 2025 23:00:00 GMT", 0.0),
        ("Sat, 01 Jan 2028 00:00:00 GMT", RETRY_AFTER_MAX_S),
        ("soon", RETRY_AFTER_DEFAULT_S),
        ("-5", RETRY_AFTER_DEFAULT_S),
        ("1.5", RETRY_AFTER_DEFAULT_S),
        (None, RETRY_AFTER_DEFAULT_S),
    ],
)
def test_retry_after_reads_seconds_or_a_date_with_default_and_cap(
    header: str | None, expected_s: float
) -> None:
    # The fake clock starts at 2026-01-01T00:00:00Z.
    now_us = FakeClock().now_us()
    assert now_us == 1_767_225_600 * US_PER_S

    assert retry_after_s(header, now_us=now_us) == expected_s


async def test_throttle_with_a_date_counts_from_the_injected_clock(
    harness: Harness,
) -> None:
    now = datetime.datetime.fromtimestamp(
        harness.clock.now_us() / US_PER_S, datetime.UTC
    )
    until = email.utils.format_datetime(
        now + datetime.timedelta(seconds=12), usegmt=True
    )

    async def erp(request: web.Request) -> web.Response:
        return web.Response(status=429, headers={"Retry-After": until})

    adapter = harness.adapter(await harness.serve(erp))

    with pytest.raises(Throttled) as caught:
        await adapter.send(batch("B1", line("L1")), timeout_s=TIMEOUT_S)

    assert caught.value.retry_after_s == 12.0


async def test_erp_that_never_answers_is_transient_within_the_budget(
    harness: Harness,
) -> None:
    async def swallow(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # Reads the request and never answers, until the client gives up.
        await reader.read()
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    adapter = harness.adapter(f"http://127.0.0.1:{port}")
    try:
        started = time.monotonic()
        with pytest.raises(Transient, match="TimeoutError") as caught:
            await adapter.send(batch("B1", line("L1")), timeout_s=HANG_TIMEOUT_S)
        elapsed_s = time.monotonic() - started
    finally:
        await adapter.close()
        server.close()
        await server.wait_closed()

    assert isinstance(caught.value.__cause__, TimeoutError)
    assert elapsed_s < HANG_NOTICED_S


async def test_refused_connection_is_transient(harness: Harness) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    adapter = harness.adapter(f"http://127.0.0.1:{port}")

    with pytest.raises(Transient) as caught:
        await adapter.send(batch("B1", line("L1")), timeout_s=TIMEOUT_S)

    assert isinstance(caught.value.__cause__, aiohttp.ClientConnectionError)


async def test_closed_adapter_and_bad_settings_are_caller_mistakes(
    harness: Harness,
) -> None:
    erp = await harness.start_erp()
    adapter = harness.adapter(erp.url)
    await adapter.send(batch("B1", line("L1")), timeout_s=TIMEOUT_S)
    await adapter.close()

    with pytest.raises(RuntimeError, match="closed"):
        await adapter.send(batch("B2", line("L2")), timeout_s=TIMEOUT_S)
    with pytest.raises(ValueError, match="timeout_s"):
        await harness.adapter(erp.url).send(batch("B2", line("L2")), timeout_s=0)
    for url in ["ftp://erp/", "http://user:pw@erp/", "http://erp/?key=1", "erp:80"]:
        with pytest.raises(ValueError, match="url"):
            HttpAdapter(url=url)
    with pytest.raises(ValueError, match="line breaks"):
        HttpAdapter(url=erp.url, auth_header=("X-Key", "a\r\nX-Evil: 1"))
