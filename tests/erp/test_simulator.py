"""The ERP simulator over real HTTP on loopback, on a fake clock: nothing sleeps."""

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from erp_bridge.simulator import ErpSimulator, Faults, SimulatorConfig
from erp_bridge.simulator.config import parse_args
from server.clock import FakeClock

TOKEN = "s3cret"
# Generous for loopback; a hung request fails the test instead of the whole run.
CLIENT_TIMEOUT_S = 10.0
# Stats polls while waiting for requests to reach their latency; each poll is a round
# trip on loopback, so this bounds the wait to well under a second.
POLLS_MAX = 200

Json = dict[str, Any]


class Erp:
    """A started simulator, its fake clock and an authenticated HTTP session."""

    def __init__(
        self, simulator: ErpSimulator, clock: FakeClock, http: aiohttp.ClientSession
    ) -> None:
        self.simulator = simulator
        self.clock = clock
        self.http = http

    async def call(
        self, method: str, path: str, body: object = None, *, token: str | None = TOKEN
    ) -> tuple[int, Json, CIMultiDictProxy[str]]:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        url = self.simulator.url + path
        async with self.http.request(
            method, url, json=body, headers=headers
        ) as response:
            payload: Json = await response.json()
            return response.status, payload, response.headers

    async def post(self, batch: Json) -> tuple[int, Json]:
        status, payload, _ = await self.call("POST", "/v1/batches", batch)
        return status, payload

    async def ledger(self) -> Json:
        status, payload, _ = await self.call("GET", "/v1/ledger")
        assert status == 200
        return payload

    async def stats(self) -> Json:
        status, payload, _ = await self.call("GET", "/v1/stats")
        assert status == 200
        return payload


ErpFactory = Callable[..., Awaitable[Erp]]


@pytest.fixture
async def start_erp() -> AsyncIterator[ErpFactory]:
    started: list[tuple[ErpSimulator, aiohttp.ClientSession]] = []

    async def start(**settings: Any) -> Erp:
        # Tests on the fake clock choose their latency; the default would hold every
        # request until the clock is advanced.
        settings.setdefault("faults", Faults(latency_ms=0))
        config = SimulatorConfig(token=TOKEN, **settings)
        clock = FakeClock()
        simulator = ErpSimulator(config, clock=clock)
        await simulator.start()
        http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
        )
        started.append((simulator, http))
        return Erp(simulator, clock, http)

    yield start
    for simulator, http in started:
        await http.close()
        await simulator.stop()


def line(line_id: str, **fields: Any) -> Json:
    values: Json = {
        "line_id": line_id,
        "sku": "SKU-1",
        "location": "WH-1",
        "on_hand_delta": 0,
        "held_delta": 1,
        "reservation_id": "R-" + line_id,
        "channel": "web",
        "kind": "confirmed",
    }
    return values | fields


def batch(
    batch_id: str, *lines: Json, feed: str = "ledger", stream: str | None = None
) -> Json:
    body: Json = {"batch_id": batch_id, "feed": feed, "lines": list(lines)}
    if stream is not None:
        body["stream"] = stream
    return body


def lines_of(count: int, prefix: str) -> list[Json]:
    return [line(f"{prefix}-{i}") for i in range(count)]


async def test_applied_batch_shows_in_ledger(start_erp: ErpFactory) -> None:
    erp = await start_erp()

    status, answer = await erp.post(
        batch(
            "B1",
            line("L1", sku="A", on_hand_delta=10, held_delta=0),
            line("L2", sku="A", held_delta=3),
            line("L3", sku="B", location="WH-2", on_hand_delta=-2, held_delta=-1),
        )
    )

    assert status == 200
    assert answer == {
        "batch_id": "B1",
        "status": "applied",
        "applied_lines": 3,
        "rejected": [],
    }
    assert await erp.ledger() == {
        "positions": [
            {"sku": "A", "location": "WH-1", "on_hand": 10, "held": 3},
            {"sku": "B", "location": "WH-2", "on_hand": -2, "held": -1},
        ],
        "last_batch_id": "B1",
        "last_batch_ids": {},
        "batches_applied": 1,
        "lines_applied": 3,
    }


async def test_replayed_batch_is_duplicate_with_first_answer(
    start_erp: ErpFactory,
) -> None:
    erp = await start_erp(faults=Faults(latency_ms=0))
    await erp.call("PUT", "/v1/admin/items", {"skus": ["SKU-1"]})
    first = batch("B1", line("L1"), line("L2", sku="NOPE"))
    _, applied = await erp.post(first)
    ledger = await erp.ledger()

    status, replayed = await erp.post(first)

    assert status == 200
    assert replayed == applied | {"status": "duplicate"}
    assert replayed["rejected"][0]["reason"] == "UNKNOWN_ITEM"
    assert await erp.ledger() == ledger
    assert (await erp.stats())["duplicates"] == 1


async def test_same_batch_id_with_other_content_conflicts(
    start_erp: ErpFactory,
) -> None:
    erp = await start_erp()
    await erp.post(batch("B1", line("L1")))
    ledger = await erp.ledger()

    status, answer = await erp.post(batch("B1", line("L1", held_delta=2)))

    assert status == 409
    assert answer["error"]["code"] == "BATCH_CONFLICT"
    assert answer["error"]["field"] == "batch_id"
    assert await erp.ledger() == ledger
    assert (await erp.stats())["conflicts"] == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"feed": "ledger", "lines": [line("L1")]}, "batch_id"),
        (batch("B", line("L1"), feed="orders"), "feed"),
        (batch("B"), "lines"),
        (batch("B", *lines_of(11, "L")), "lines"),
        ({"batch_id": "B", "feed": "ledger", "lines": "L1"}, "lines"),
        (
            batch("B", line("L1"), {k: v for k, v in line("L2").items() if k != "sku"}),
            "lines[1].sku",
        ),
        (batch("B", line("L1", on_hand_delta="3")), "lines[0].on_hand_delta"),
        (batch("B", line("L1", held_delta=True)), "lines[0].held_delta"),
        (batch("B", line("L1", reservation_id=None)), "lines[0].reservation_id"),
        (batch("B", line("L1"), line("L1")), "lines[1].line_id"),
        (batch("B", line("L1")) | {"stream": 5}, "stream"),
        (batch("B", line("L1")) | {"stream": "s" * 129}, "stream"),
        ([1, 2], "body"),
    ],
)
async def test_bad_input_is_refused_naming_the_field(
    start_erp: ErpFactory, body: object, field: str
) -> None:
    erp = await start_erp(lines_per_request=10)

    status, answer = await erp.post(body)  # type: ignore[arg-type]

    assert status == 400
    assert answer["error"]["code"] == "INVALID_ARGUMENT"
    assert answer["error"]["field"] == field
    assert (await erp.ledger())["lines_applied"] == 0


async def test_empty_item_references_are_accepted(start_erp: ErpFactory) -> None:
    erp = await start_erp()

    status, _ = await erp.post(batch("B1", line("L1", reservation_id="", channel="")))

    assert status == 200


@pytest.mark.parametrize("token", [None, "wrong"])
async def test_missing_or_wrong_token_is_unauthorized(
    start_erp: ErpFactory, token: str | None
) -> None:
    erp = await start_erp()

    for method, path in [
        ("POST", "/v1/batches"),
        ("GET", "/v1/ledger"),
        ("GET", "/v1/stats"),
    ]:
        status, answer, _ = await erp.call(
            method, path, batch("B1", line("L1")), token=token
        )
        assert status == 401
        assert answer["error"]["code"] == "UNAUTHORIZED"

    assert (await erp.ledger())["lines_applied"] == 0
    assert (await erp.stats())["unauthorized"] == 3


async def test_request_rate_limit_throttles_until_retry_after(
    start_erp: ErpFactory,
) -> None:
    erp = await start_erp(requests_per_s=2)
    assert (await erp.post(batch("B1", line("L1"))))[0] == 200
    erp.clock.advance(0.4)
    assert (await erp.post(batch("B2", line("L2"))))[0] == 200

    status, answer, headers = await erp.call(
        "POST", "/v1/batches", batch("B3", line("L3"))
    )

    assert status == 429
    assert answer["error"]["limit"] == "requests_per_s"
    retry_after_s = int(headers["Retry-After"])
    assert retry_after_s >= 1
    assert (await erp.ledger())["batches_applied"] == 2

    erp.clock.advance(retry_after_s)
    assert (await erp.post(batch("B3", line("L3"))))[0] == 200
    assert (await erp.stats())["throttled"] == 1


async def test_line_rate_limit_throttles_until_retry_after(
    start_erp: ErpFactory,
) -> None:
    erp = await start_erp(lines_per_request=10, lines_per_s=10)
    assert (await erp.post(batch("B1", *lines_of(6, "A"))))[0] == 200

    status, answer, headers = await erp.call(
        "POST", "/v1/batches", batch("B2", *lines_of(5, "B"))
    )

    assert status == 429
    assert answer["error"]["limit"] == "lines_per_s"
    retry_after_s = int(headers["Retry-After"])
    assert retry_after_s >= 1
    # A smaller batch still fits the second's remaining budget.
    assert (await erp.post(batch("B3", *lines_of(4, "C"))))[0] == 200

    erp.clock.advance(retry_after_s)
    assert (await erp.post(batch("B2", *lines_of(5, "B"))))[0] == 200
    assert (await erp.ledger())["lines_applied"] == 15


async def test_concurrent_limit_throttles_requests_in_progress(
    start_erp: ErpFactory,
) -> None:
    erp = await start_erp(concurrent_max=2, faults=Faults(latency_ms=1_500))
    held = [
        asyncio.create_task(erp.post(batch(f"B{i}", line(f"L{i}")))) for i in range(2)
    ]
    for _ in range(POLLS_MAX):
        if (await erp.stats())["requests_in_progress"] == 2:
            break
    else:
        pytest.fail("the two requests never reached their latency")

    status, answer, headers = await erp.call(
        "POST", "/v1/batches", batch("B9", line("L9"))
    )

    assert status == 429
    assert answer["error"]["limit"] == "concurrent_max"
    # The oldest request in progress ends after its 1.5 s latency: two whole seconds.
    assert headers["Retry-After"] == "2"

    erp.clock.advance(1.5)
    assert [await task for task in held] == [
        (
            200,
            {
                "batch_id": f"B{i}",
                "status": "applied",
                "applied_lines": 1,
                "rejected": [],
            },
        )
        for i in range(2)
    ]
    stats = await erp.stats()
    assert stats["max_requests_in_progress"] == 2
    assert stats["requests_in_progress"] == 0


async def test_error_rate_answers_503_without_applying(start_erp: ErpFactory) -> None:
    seed = 7
    erp = await start_erp(
        seed=seed, requests_per_s=100, faults=Faults(error_rate=0.5, latency_ms=0)
    )
    # The simulator draws once per valid request from a generator seeded alike.
    dice = random.Random(seed)
    expected = [503 if dice.random() < 0.5 else 200 for _ in range(20)]
    assert 503 in expected and 200 in expected, f"seed {seed} should give both answers"

    statuses = [(await erp.post(batch(f"B{i}", line(f"L{i}"))))[0] for i in range(20)]

    assert statuses == expected
    ledger = await erp.ledger()
    assert ledger["lines_applied"] == expected.count(200)
    assert ledger["positions"][0]["held"] == expected.count(200)
    assert (await erp.stats())["failed"] == expected.count(503)


async def test_applied_then_error_books_once_and_retry_is_duplicate(
    start_erp: ErpFactory,
) -> None:
    erp = await start_erp(faults=Faults(applied_then_error_rate=1.0, latency_ms=0))
    sent = batch("B1", line("L1", held_delta=4))

    status, answer = await erp.post(sent)

    assert status == 500
    assert answer["error"]["code"] == "INTERNAL"

    status, answer = await erp.post(sent)

    assert status == 200
    assert answer["status"] == "duplicate"
    assert answer["applied_lines"] == 1
    ledger = await erp.ledger()
    assert ledger["positions"] == [
        {"sku": "SKU-1", "location": "WH-1", "on_hand": 0, "held": 4}
    ]
    assert ledger["lines_applied"] == 1
    assert ledger["batches_applied"] == 1


async def test_unknown_item_and_closed_period_refuse_only_those_lines(
    start_erp: ErpFactory,
) -> None:
    erp = await start_erp()
    assert (await erp.call("PUT", "/v1/admin/items", {"skus": ["A", "B"]}))[0] == 200
    assert (
        await erp.call("PUT", "/v1/admin/closed-locations", {"locations": ["OLD"]})
    )[0] == 200

    status, answer = await erp.post(
        batch(
            "B1",
            line("L1", sku="A"),
            line("L2", sku="ZZZ"),
            line("L3", sku="B", location="OLD"),
            line("L4", sku="B"),
        )
    )

    assert status == 200
    assert answer["applied_lines"] == 2
    assert [(r["line_id"], r["reason"]) for r in answer["rejected"]] == [
        ("L2", "UNKNOWN_ITEM"),
        ("L3", "PERIOD_CLOSED"),
    ]
    assert all(r["message"] for r in answer["rejected"])
    assert [(p["sku"], p["location"]) for p in (await erp.ledger())["positions"]] == [
        ("A", "WH-1"),
        ("B", "WH-1"),
    ]
    assert (await erp.stats())["rejected_lines"] == 2


async def test_line_booked_under_another_batch_id_is_refused(
    start_erp: ErpFactory,
) -> None:
    erp = await start_erp()
    await erp.post(batch("B1", line("L1", held_delta=5)))

    status, answer = await erp.post(batch("B2", line("L1", held_delta=5), line("L2")))

    assert status == 200
    assert answer["applied_lines"] == 1
    assert [(r["line_id"], r["reason"]) for r in answer["rejected"]] == [
        ("L1", "LINE_ALREADY_APPLIED")
    ]
    ledger = await erp.ledger()
    assert ledger["positions"][0]["held"] == 6
    assert ledger["last_batch_id"] == "B2"


async def test_stats_peaks_count_arrivals_in_any_second(start_erp: ErpFactory) -> None:
    erp = await start_erp(requests_per_s=3, lines_per_request=10, lines_per_s=10)
    await erp.post(batch("B1", *lines_of(4, "A")))
    await erp.post(batch("B2", *lines_of(4, "B")))
    erp.clock.advance(0.6)
    await erp.post(batch("B3", *lines_of(2, "C")))
    # Throttled (a fourth request, and 13 lines): it still counts as sent.
    assert (await erp.post(batch("B4", *lines_of(3, "D"))))[0] == 429
    erp.clock.advance(0.5)
    # B1 and B2 have left the window; B3 and B4 remain.
    await erp.post(batch("B5", *lines_of(1, "E")))

    stats = await erp.stats()

    assert stats["max_requests_in_any_second"] == 4
    assert stats["max_lines_in_any_second"] == 13
    assert stats["requests"] == 5
    assert stats["applied"] == 4
    assert stats["throttled"] == 1


async def test_admin_counts_on_hand_and_changes_faults(start_erp: ErpFactory) -> None:
    erp = await start_erp()
    await erp.post(batch("B1", line("L1", on_hand_delta=5, held_delta=2)))

    counted = {"positions": [{"sku": "SKU-1", "location": "WH-1", "on_hand": 3}]}
    assert (await erp.call("PUT", "/v1/admin/on-hand", counted))[0] == 200
    status, faults, _ = await erp.call("PUT", "/v1/admin/faults", {"error_rate": 1.0})
    assert status == 200
    assert faults == {
        "error_rate": 1.0,
        "applied_then_error_rate": 0.0,
        "latency_ms": 0,
    }

    assert (await erp.post(batch("B2", line("L2"))))[0] == 503
    assert (await erp.ledger())["positions"] == [
        {"sku": "SKU-1", "location": "WH-1", "on_hand": 3, "held": 2}
    ]
    status, answer, _ = await erp.call("PUT", "/v1/admin/faults", {"error_rate": 2})
    assert status == 400
    assert answer["error"]["field"] == "faults"


def test_config_refuses_other_than_loopback_and_impossible_limits() -> None:
    with pytest.raises(ValueError, match="loopback"):
        SimulatorConfig(host="0.0.0.0")
    with pytest.raises(ValueError, match="lines_per_request"):
        SimulatorConfig(lines_per_request=100, lines_per_s=10)

    config = parse_args(
        ["--listen", "127.0.0.1:9000", "--error-rate", "0.25", "--seed", "3"]
    )

    assert (config.host, config.port, config.seed) == ("127.0.0.1", 9000, 3)
    assert config.faults.error_rate == 0.25


async def test_ledger_names_the_last_batch_booked_on_each_stream(
    start_erp: ErpFactory,
) -> None:
    erp = await start_erp()
    first = batch("B1", line("L1"), stream="s0")
    for sent in [
        first,
        batch("B2", line("L2"), stream="s1"),
        batch("B3", line("L3"), stream="s0"),
        batch("B4", line("L4")),
        batch("B5", line("L5"), stream=""),
    ]:
        assert (await erp.post(sent))[0] == 200

    # A replay of an older batch of s0 is a duplicate and moves nothing.
    status, answer = await erp.post(first)

    assert (status, answer["status"]) == (200, "duplicate")
    ledger = await erp.ledger()
    assert ledger["last_batch_ids"] == {"s0": "B3", "s1": "B2"}
    assert ledger["last_batch_id"] == "B5"


async def test_stream_takes_part_in_dedupe_only_when_present(
    start_erp: ErpFactory,
) -> None:
    erp = await start_erp()
    assert (await erp.post(batch("B1", line("L1"))))[0] == 200
    assert (await erp.post(batch("B2", line("L2"), stream="s0")))[0] == 200

    # An empty stream is no stream: the same content as the first sending.
    status, answer = await erp.post(batch("B1", line("L1"), stream=""))
    assert (status, answer["status"]) == (200, "duplicate")

    for conflicting in [
        batch("B1", line("L1"), stream="s0"),
        batch("B2", line("L2"), stream="s1"),
        batch("B2", line("L2")),
    ]:
        status, answer = await erp.post(conflicting)
        assert status == 409, conflicting
        assert answer["error"]["code"] == "BATCH_CONFLICT"
    assert (await erp.ledger())["last_batch_ids"] == {"s0": "B2"}


async def test_ledger_snapshot_agrees_with_last_batch_ids_under_load(
    start_erp: ErpFactory,
) -> None:
    # Each stream books its batches in order and each adds one held unit to the
    # stream's own sku, so a snapshot naming batch k of a stream must show k + 1.
    streams = 4
    batches_per_stream = 15
    erp = await start_erp(requests_per_s=1_000, concurrent_max=streams)
    snapshots: list[Json] = []

    async def feed(stream: int) -> None:
        for k in range(batches_per_stream):
            sent = batch(
                f"s{stream}.{k}",
                line(f"s{stream}.L{k}", sku=f"SKU-{stream}"),
                stream=f"s{stream}",
            )
            assert (await erp.post(sent))[0] == 200

    async def watch(done: asyncio.Event) -> None:
        while not done.is_set():
            snapshots.append(await erp.ledger())

    done = asyncio.Event()
    watcher = asyncio.create_task(watch(done))
    await asyncio.gather(*(feed(s) for s in range(streams)))
    done.set()
    await watcher
    snapshots.append(await erp.ledger())

    assert len(snapshots) > 1
    for snapshot in snapshots:
        held = {p["sku"]: p["held"] for p in snapshot["positions"]}
        for stream, last in snapshot["last_batch_ids"].items():
            booked = int(last.rpartition(".")[2]) + 1
            assert held[f"SKU-{stream[1:]}"] == booked, snapshot
        assert sum(held.values()) == snapshot["batches_applied"]
    assert snapshots[-1]["batches_applied"] == streams * batches_per_stream
