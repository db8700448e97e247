"""The bridge's admin service and its command line, against a real Postgres schema and a
real gRPC server on loopback.

Dead letters are made the way the bridge makes them: a cursor is loaded and a batch
acknowledged with refused lines. The command line runs as a subprocess against the
served port, as an operator would run it.
"""

import asyncio
import base64
import dataclasses
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeAlias

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from erp_bridge.adapters import ErpLine, Feed, LineRejection
from erp_bridge.admin import (
    ERROR_DOMAIN,
    IDS_MAX,
    PAGE_SIZE_MAX,
    BridgeAdminServicer,
    serve_admin,
)
from erp_bridge.status import (
    BreakerState,
    BridgeStatus,
    Counters,
    StreamState,
    StreamStatus,
)
from erp_bridge.store import BridgeStore, Refused
from server.wal.feed import StreamPosition, batch_id, stream_name
from server.wal.schema import ensure_schema
from stockward.v1 import bridge_pb2, bridge_pb2_grpc
from tests.conftest import DATABASE_URL

# grpc has no type stubs, so mypy takes the stub on an aio channel for the plain one;
# its calls are awaited all the same.
Stub: TypeAlias = bridge_pb2_grpc.BridgeAdminServiceStub
WireStatus: TypeAlias = bridge_pb2.DeadLetterStatus.ValueType

NAME = "erp"
# A second bridge on the same schema: its dead letters are none of NAME's business.
OTHER_NAME = "warehouse"
SHARDS = 2
# Generous for loopback: a stalled call fails the test instead of hanging the run.
RPC_TIMEOUT_S = 5.0
# A fresh interpreter importing grpc and protobuf, plus the call.
CLI_TIMEOUT_S = 30.0

DEAD = bridge_pb2.DEAD_LETTER_STATUS_DEAD
RETRYING = bridge_pb2.DEAD_LETTER_STATUS_RETRYING
RESOLVED = bridge_pb2.DEAD_LETTER_STATUS_RESOLVED
DISCARDED = bridge_pb2.DEAD_LETTER_STATUS_DISCARDED

# Every field differs from its default and from the others, so a field dropped or
# crossed on the way shows.
SNAPSHOT = BridgeStatus(
    name=NAME,
    feed="ledger",
    endpoint="http://erp.example:8900/batches",
    breaker=BreakerState.HALF_OPEN,
    streams=(
        StreamStatus(
            shard=1,
            state=StreamState.WAITING,
            acked_seq=41,
            acked_line=3,
            acked_batch_id="erp.s1.30.0-41.3",
            head_seq=57,
            lag_records=16,
            lag_s=2.75,
            last_error="throttled: retry_after_s=1.5",
        ),
        StreamStatus(
            shard=0,
            state=StreamState.REFUSED,
            acked_seq=1_000_000_000_007,
            acked_line=1,
            acked_batch_id="erp.s0.9.0-1000000000007.1",
            head_seq=1_000_000_000_009,
            lag_records=2,
            lag_s=0.125,
            last_error="batch refused: lines[3].sku",
        ),
    ),
    counters=Counters(
        batches=11,
        lines_in=500,
        lines_out=200,
        batches_empty=3,
        requests=13,
        throttled=5,
        retries=7,
        duplicates=2,
        lines_dead_lettered=9,
        lines_refused_invalid=4,
    ),
    dead_letters={"dead": 6, "retrying": 3, "resolved": 8, "discarded": 1},
    divergences=17,
    delivery_lag_p50_s=0.375,
    delivery_lag_p99_s=4.5,
    batches_per_s=12.5,
    lines_per_s=600.25,
)


@dataclasses.dataclass
class Bridge:
    """A served admin service over seeded dead letters."""

    pool: asyncpg.Pool
    stub: Stub
    port: int
    # NAME's dead letters, ascending; and one of OTHER_NAME's.
    ids: list[int]
    other_id: int


async def connect(schema: str) -> asyncpg.Pool:
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    finally:
        await conn.close()
    pool: asyncpg.Pool = await asyncpg.create_pool(
        DATABASE_URL,
        min_size=1,
        max_size=4,
        command_timeout=RPC_TIMEOUT_S,
        server_settings={"search_path": schema},
    )
    async with pool.acquire() as conn:
        await ensure_schema(conn, shard_count=SHARDS)
    return pool


async def refuse(
    store: BridgeStore,
    pool: asyncpg.Pool,
    *,
    name: str,
    shard: int,
    end_seq: int,
    skus: Sequence[str],
) -> None:
    """Plan and acknowledge the shard's first batch, up to end_seq, with these lines
    refused, as the bridge does."""
    async with pool.acquire() as conn:
        await _refuse(store, conn, name=name, shard=shard, end_seq=end_seq, skus=skus)


async def _refuse(
    store: BridgeStore,
    conn: asyncpg.Connection,
    *,
    name: str,
    shard: int,
    end_seq: int,
    skus: Sequence[str],
) -> None:
    cursor = await store.load_cursor(conn, shard, start_at_end=False)
    end = StreamPosition(end_seq)
    await store.plan(conn, shard=shard, acked=cursor.acked, end=end, feed=Feed.LEDGER)
    refused = [
        Refused(
            line=ErpLine(
                line_id=f"{stream_name(name, shard)}.{seq}.0",
                sku=sku,
                location="store-12",
                on_hand_delta=0,
                held_delta=seq,
                reservation_id=f"r-{shard}-{seq}",
                channel="web",
                kind="reserve",
            ),
            rejection=LineRejection(
                line_id=f"{stream_name(name, shard)}.{seq}.0",
                reason="UNKNOWN_ITEM",
                message=f"item {sku} is not in the item master",
            ),
        )
        for seq, sku in enumerate(skus, start=1)
    ]
    await store.acknowledge(
        conn,
        shard=shard,
        start=cursor.acked,
        end=end,
        batch_id=batch_id(name, shard, cursor.acked, end),
        refused=refused,
    )


async def dead_letter_ids(pool: asyncpg.Pool, name: str) -> list[int]:
    rows = await pool.fetch(
        "SELECT id FROM bridge_dead_letters WHERE name = $1 ORDER BY id", name
    )
    return [row["id"] for row in rows]


async def table(pool: asyncpg.Pool) -> list[tuple[Any, ...]]:
    rows = await pool.fetch(
        "SELECT id, name, status, attempts, retry_batch_id, resolved_at "
        "FROM bridge_dead_letters ORDER BY id"
    )
    return [tuple(row) for row in rows]


async def statuses_of(pool: asyncpg.Pool, ids: Sequence[int]) -> list[str]:
    rows = await pool.fetch(
        "SELECT status FROM bridge_dead_letters WHERE id = ANY($1::bigint[]) "
        "ORDER BY id",
        list(ids),
    )
    return [row["status"] for row in rows]


async def serve(pool: asyncpg.Pool, *, shard0_skus: int) -> AsyncIterator[Bridge]:
    store = BridgeStore(pool, name=NAME)
    skus = [f"sku-{i:04d}" for i in range(shard0_skus)]
    await refuse(store, pool, name=NAME, shard=0, end_seq=len(skus) + 5, skus=skus)
    await refuse(store, pool, name=NAME, shard=1, end_seq=4, skus=["sku-b1", "sku-b2"])
    other = BridgeStore(pool, name=OTHER_NAME)
    await refuse(other, pool, name=OTHER_NAME, shard=0, end_seq=1, skus=["sku-w"])

    async def snapshot() -> BridgeStatus:
        return SNAPSHOT

    server, port = await serve_admin(
        BridgeAdminServicer(store, snapshot), "127.0.0.1:0"
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Bridge(
            pool=pool,
            stub=bridge_pb2_grpc.BridgeAdminServiceStub(channel),
            port=port,
            ids=await dead_letter_ids(pool, NAME),
            other_id=(await dead_letter_ids(pool, OTHER_NAME))[0],
        )
    finally:
        await channel.close()
        await server.stop(grace=None)


@pytest.fixture
async def pool(schema: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await connect(schema)
    yield pool
    await pool.close()


@pytest.fixture
async def bridge(pool: asyncpg.Pool) -> AsyncIterator[Bridge]:
    """Seven dead letters of NAME: five on shard 0, two on shard 1."""
    async for served in serve(pool, shard0_skus=5):
        yield served


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)
    assert status is not None, f"{error.code()} carries no status details"
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    assert len(infos) == 1, status
    return infos[0]


# Status.


async def test_status_carries_every_field_of_the_snapshot(bridge: Bridge) -> None:
    response = await bridge.stub.GetBridgeStatus(
        bridge_pb2.GetBridgeStatusRequest(), timeout=RPC_TIMEOUT_S
    )

    assert response.name == NAME
    assert response.feed == bridge_pb2.BRIDGE_FEED_LEDGER
    assert response.endpoint == SNAPSHOT.endpoint
    assert response.breaker == bridge_pb2.BRIDGE_BREAKER_STATE_HALF_OPEN
    assert response.divergences == 17
    assert response.delivery_lag_p50_seconds == 0.375
    assert response.delivery_lag_p99_seconds == 4.5
    assert response.batches_per_second == 12.5
    assert response.lines_per_second == 600.25
    counts = response.dead_letters
    assert (counts.dead, counts.retrying, counts.resolved, counts.discarded) == (
        6,
        3,
        8,
        1,
    )

    # Named by the dataclass fields, so a counter added to the bridge but not to the
    # contract fails here.
    for field in dataclasses.fields(Counters):
        expected = getattr(SNAPSHOT.counters, field.name)
        assert getattr(response.counters, field.name) == expected, field.name
    assert response.counters.netting_ratio == 2.5

    assert [s.shard for s in response.streams] == [0, 1]
    by_shard = {s.shard: s for s in SNAPSHOT.streams}
    for stream in response.streams:
        sent = by_shard[stream.shard]
        state_name = bridge_pb2.BridgeStreamState.Name(stream.state)
        assert state_name == "BRIDGE_STREAM_STATE_" + sent.state.name
        assert stream.lag_seconds == sent.lag_s
        for field in dataclasses.fields(StreamStatus):
            if field.name in ("state", "lag_s"):
                continue
            assert getattr(stream, field.name) == getattr(sent, field.name), field.name


async def test_status_provider_on_a_broken_database_is_unavailable(
    schema: str,
) -> None:
    pool = await connect(schema)
    store = BridgeStore(pool, name=NAME)
    await pool.close()

    async def snapshot() -> BridgeStatus:
        counts = await store.count_dead_letters()
        return dataclasses.replace(
            SNAPSHOT, dead_letters={s.value: n for s, n in counts.items()}
        )

    server, port = await serve_admin(
        BridgeAdminServicer(store, snapshot), "127.0.0.1:0"
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = bridge_pb2_grpc.BridgeAdminServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.GetBridgeStatus(
                    bridge_pb2.GetBridgeStatusRequest(), timeout=RPC_TIMEOUT_S
                )
            list_error = await list_failure(stub)
    finally:
        await server.stop(grace=None)

    for error in (raised.value, list_error):
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        info = error_info(error)
        assert (info.domain, info.reason) == (ERROR_DOMAIN, "DATABASE_UNAVAILABLE")


async def list_failure(
    stub: Stub,
) -> grpc.aio.AioRpcError:
    try:
        await stub.ListDeadLetters(
            bridge_pb2.ListDeadLettersRequest(), timeout=RPC_TIMEOUT_S
        )
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("listing on a closed pool succeeded")


# Listing.


async def list_all(
    bridge: Bridge, *, page_size: int, statuses: Sequence[WireStatus] = ()
) -> list[list[bridge_pb2.DeadLetter]]:
    pages = []
    token = ""
    while True:
        page = await bridge.stub.ListDeadLetters(
            bridge_pb2.ListDeadLettersRequest(
                statuses=statuses, page_size=page_size, page_token=token
            ),
            timeout=RPC_TIMEOUT_S,
        )
        pages.append(list(page.dead_letters))
        token = page.next_page_token
        if not token:
            return pages
        assert len(pages) <= len(bridge.ids), "paging does not end"


async def test_list_pages_through_open_dead_letters_in_id_order(
    bridge: Bridge,
) -> None:
    pages = await list_all(bridge, page_size=3)

    assert [len(p) for p in pages] == [3, 3, 1]
    letters = [x for page in pages for x in page]
    assert [x.id for x in letters] == bridge.ids
    assert bridge.other_id not in {x.id for x in letters}

    first = letters[0]
    assert first.shard == 0
    assert first.batch_id == "erp.s0.0.0-10.0"
    assert first.line == bridge_pb2.ErpLine(
        line_id="erp.s0.1.0",
        sku="sku-0000",
        location="store-12",
        on_hand_delta=0,
        held_delta=1,
        reservation_id="r-0-1",
        channel="web",
        kind="reserve",
    )
    assert (first.reason, first.message) == (
        "UNKNOWN_ITEM",
        "item sku-0000 is not in the item master",
    )
    assert (first.attempts, first.status, first.retry_batch_id) == (1, DEAD, "")
    assert first.first_failed_at.seconds > 1_600_000_000
    assert first.last_failed_at == first.first_failed_at
    assert letters[-1].shard == 1
    assert letters[-1].line.sku == "sku-b2"


async def test_full_last_page_carries_a_token_to_an_empty_page(bridge: Bridge) -> None:
    pages = await list_all(bridge, page_size=len(bridge.ids))

    assert [len(p) for p in pages] == [len(bridge.ids), 0]


async def test_list_filters_by_status(bridge: Bridge) -> None:
    retried = bridge.ids[:2]
    discarded = bridge.ids[2:3]
    await bridge.stub.RetryDeadLetters(
        bridge_pb2.RetryDeadLettersRequest(ids=retried, actor="ana", reason="fixed"),
        timeout=RPC_TIMEOUT_S,
    )
    await bridge.stub.DiscardDeadLetters(
        bridge_pb2.DiscardDeadLettersRequest(
            ids=discarded, actor="ana", reason="test order"
        ),
        timeout=RPC_TIMEOUT_S,
    )

    async def ids(*statuses: WireStatus) -> list[int]:
        pages = await list_all(bridge, page_size=2, statuses=statuses)
        return [x.id for page in pages for x in page]

    assert await ids() == [i for i in bridge.ids if i not in discarded]
    assert await ids(RETRYING) == retried
    assert await ids(DISCARDED) == discarded
    assert await ids(DEAD) == bridge.ids[3:]
    assert await ids(DISCARDED, RETRYING) == sorted(retried + discarded)
    assert await ids(RESOLVED) == []


# Retry and discard.


async def test_retry_moves_dead_to_retrying_and_reports_ids_not_dead(
    bridge: Bridge, caplog: pytest.LogCaptureFixture
) -> None:
    wanted = [bridge.ids[4], bridge.ids[1], 999_999, bridge.other_id, bridge.ids[1]]

    with caplog.at_level(logging.INFO, logger="erp_bridge.admin"):
        response = await bridge.stub.RetryDeadLetters(
            bridge_pb2.RetryDeadLettersRequest(
                ids=wanted, actor="ana@example.com", reason="items created in ERP"
            ),
            timeout=RPC_TIMEOUT_S,
        )

    assert list(response.retried_ids) == [bridge.ids[1], bridge.ids[4]]
    assert list(response.not_dead_ids) == [bridge.other_id, 999_999]
    assert await statuses_of(bridge.pool, bridge.ids) == [
        "dead",
        "retrying",
        "dead",
        "dead",
        "retrying",
        "dead",
        "dead",
    ]
    assert await statuses_of(bridge.pool, [bridge.other_id]) == ["dead"]
    audit = [r.getMessage() for r in caplog.records if r.name == "erp_bridge.admin"]
    assert audit == [
        f"dead letters retried: actor='ana@example.com' "
        f"ids={bridge.ids[1]},{bridge.ids[4]} reason='items created in ERP' "
        f"not_dead={bridge.other_id},999999"
    ]

    again = await bridge.stub.RetryDeadLetters(
        bridge_pb2.RetryDeadLettersRequest(
            ids=[bridge.ids[1]], actor="ana", reason="twice"
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert list(again.retried_ids) == []
    assert list(again.not_dead_ids) == [bridge.ids[1]]


async def test_discarded_dead_letters_cannot_be_retried(bridge: Bridge) -> None:
    doomed = bridge.ids[5:]

    discarded = await bridge.stub.DiscardDeadLetters(
        bridge_pb2.DiscardDeadLettersRequest(
            ids=doomed, actor="ana", reason="test orders"
        ),
        timeout=RPC_TIMEOUT_S,
    )
    retried = await bridge.stub.RetryDeadLetters(
        bridge_pb2.RetryDeadLettersRequest(
            ids=[*doomed, bridge.ids[0]], actor="ana", reason="changed my mind"
        ),
        timeout=RPC_TIMEOUT_S,
    )

    assert list(discarded.discarded_ids) == doomed
    assert list(discarded.not_dead_ids) == []
    assert list(retried.retried_ids) == [bridge.ids[0]]
    assert list(retried.not_dead_ids) == doomed
    assert await statuses_of(bridge.pool, doomed) == ["discarded", "discarded"]
    rows = await bridge.pool.fetch(
        "SELECT resolved_at FROM bridge_dead_letters WHERE id = ANY($1::bigint[])",
        doomed,
    )
    assert all(row["resolved_at"] is not None for row in rows)


# Bad requests.


def _token(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


def _retry(**fields: Any) -> tuple[str, Any]:
    request = {"ids": [1], "actor": "ana", "reason": "fixed", **fields}
    return "RetryDeadLetters", bridge_pb2.RetryDeadLettersRequest(**request)


def _discard(**fields: Any) -> tuple[str, Any]:
    request = {"ids": [1], "actor": "ana", "reason": "fixed", **fields}
    return "DiscardDeadLetters", bridge_pb2.DiscardDeadLettersRequest(**request)


def _list(**fields: Any) -> tuple[str, Any]:
    return "ListDeadLetters", bridge_pb2.ListDeadLettersRequest(**fields)


BAD_REQUESTS = {
    "page size above the limit": (
        _list(page_size=PAGE_SIZE_MAX + 1),
        "PAGE_SIZE_OUT_OF_RANGE",
        "page_size",
    ),
    "negative page size": (_list(page_size=-1), "PAGE_SIZE_OUT_OF_RANGE", "page_size"),
    "garbage page token": (
        _list(page_token="not a token!"),
        "PAGE_TOKEN_INVALID",
        "page_token",
    ),
    "page token of words": (
        _list(page_token=_token("seven/dead,retrying")),
        "PAGE_TOKEN_INVALID",
        "page_token",
    ),
    "page token of another filter": (
        _list(page_token=_token("3/discarded")),
        "PAGE_TOKEN_INVALID",
        "page_token",
    ),
    "unspecified status": (
        _list(statuses=[bridge_pb2.DEAD_LETTER_STATUS_UNSPECIFIED]),
        "STATUS_INVALID",
        "statuses",
    ),
    "unknown status number": (_list(statuses=[DEAD, 9]), "STATUS_INVALID", "statuses"),
    "missing actor": (_retry(actor=""), "ACTOR_INVALID", "actor"),
    "blank actor": (_discard(actor="   "), "ACTOR_INVALID", "actor"),
    "actor too long": (_retry(actor="a" * 65), "ACTOR_INVALID", "actor"),
    "missing reason": (_discard(reason=""), "REASON_INVALID", "reason"),
    "reason forging a log line": (
        _retry(reason="fixed\ndead letters retried: actor='someone else'"),
        "REASON_INVALID",
        "reason",
    ),
    "reason too long": (_retry(reason="x" * 501), "REASON_INVALID", "reason"),
    "no ids": (_retry(ids=[]), "IDS_EMPTY", "ids"),
    "too many ids": (_discard(ids=[1] * (IDS_MAX + 1)), "IDS_TOO_MANY", "ids"),
    "negative id": (_retry(ids=[1, -3]), "ID_INVALID", "ids"),
    "zero id": (_discard(ids=[0]), "ID_INVALID", "ids"),
}


@pytest.mark.parametrize(
    ("call", "reason", "field"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys()
)
async def test_bad_request_is_refused_and_changes_nothing(
    bridge: Bridge, call: tuple[str, Any], reason: str, field: str
) -> None:
    method, request = call
    before = await table(bridge.pool)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await getattr(bridge.stub, method)(request, timeout=RPC_TIMEOUT_S)

    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(raised.value)
    assert (info.domain, info.reason) == (ERROR_DOMAIN, reason)
    assert info.metadata["field"] == field
    assert await table(bridge.pool) == before


# The command line.


@dataclasses.dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str


async def cli(bridge: Bridge, *args: str, target: bool = True) -> Outcome:
    """Run the command line against the served port, as a separate process."""
    env = dict(os.environ)
    env.pop("STOCKWARD_BRIDGE_ADMIN", None)
    flags = ["--target", f"127.0.0.1:{bridge.port}"] if target else []
    if not target:
        env["STOCKWARD_BRIDGE_ADMIN"] = f"127.0.0.1:{bridge.port}"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "erp_bridge.cli",
        *flags,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Outcome(process.returncode, stdout.decode(), stderr.decode())


async def test_cli_status_as_table_and_json(bridge: Bridge) -> None:
    text = await cli(bridge, "status")
    as_json = await cli(bridge, "--json", "status", target=False)

    assert (text.code, text.stderr) == (0, "")
    assert "bridge erp  feed ledger" in text.stdout
    assert "breaker half_open" in text.stdout
    assert "erp.s0.9.0-1000000000007.1" in text.stdout
    assert as_json.code == 0
    status = json.loads(as_json.stdout)
    assert status["name"] == NAME
    assert status["breaker"] == "half_open"
    assert status["counters"]["netting_ratio"] == 2.5
    assert status["dead_letters"] == {
        "dead": 6,
        "retrying": 3,
        "resolved": 8,
        "discarded": 1,
    }
    assert [(s["shard"], s["state"], s["acked_seq"]) for s in status["streams"]] == [
        (0, "refused", 1_000_000_000_007),
        (1, "waiting", 41),
    ]


async def test_cli_lists_retries_and_discards(bridge: Bridge) -> None:
    listed = await cli(bridge, "--json", "dead-letters", "list", "--limit", "3")
    table_text = await cli(bridge, "dead-letters", "list")
    retried = await cli(
        bridge,
        "--json",
        "dead-letters",
        "retry",
        str(bridge.ids[0]),
        str(bridge.ids[1]),
        str(bridge.other_id),
        "--actor",
        "ana",
        "--reason",
        "items created in ERP",
    )
    discarded = await cli(
        bridge,
        "dead-letters",
        "discard",
        str(bridge.ids[2]),
        "--actor",
        "ana",
        "--reason",
        "test order",
    )
    retrying = await cli(
        bridge, "--json", "dead-letters", "list", "--status", "retrying,discarded"
    )

    assert listed.code == 0, listed.stderr
    page = json.loads(listed.stdout)
    assert [x["id"] for x in page["dead_letters"]] == bridge.ids[:3]
    assert page["more"] is True
    assert page["dead_letters"][0]["status"] == "dead"
    assert page["dead_letters"][0]["line"]["sku"] == "sku-0000"
    assert table_text.code == 0
    assert "sku-b2" in table_text.stdout
    assert table_text.stdout.rstrip().endswith("7 dead letters")
    assert retried.code == 0, retried.stderr
    assert json.loads(retried.stdout) == {
        "retried_ids": bridge.ids[:2],
        "not_dead_ids": [bridge.other_id],
    }
    assert discarded.code == 0, discarded.stderr
    assert discarded.stdout.strip() == f"discarded ids: {bridge.ids[2]}"
    assert await statuses_of(bridge.pool, bridge.ids[:4]) == [
        "retrying",
        "retrying",
        "discarded",
        "dead",
    ]
    assert retrying.code == 0
    later = json.loads(retrying.stdout)
    assert [(x["id"], x["status"]) for x in later["dead_letters"]] == [
        (bridge.ids[0], "retrying"),
        (bridge.ids[1], "retrying"),
        (bridge.ids[2], "discarded"),
    ]
    assert later["more"] is False


async def test_cli_list_follows_pages_up_to_the_limit(pool: asyncpg.Pool) -> None:
    # More letters than the command line asks for in one call (250), so it needs a
    # second page.
    async for bridge in serve(pool, shard0_skus=300):
        everything = await cli(
            bridge, "--json", "dead-letters", "list", "--limit", "500"
        )
        some = await cli(bridge, "--json", "dead-letters", "list", "--limit", "260")

    assert everything.code == 0, everything.stderr
    listed = json.loads(everything.stdout)
    assert [x["id"] for x in listed["dead_letters"]] == bridge.ids
    assert len(bridge.ids) == 302
    assert listed["more"] is False
    assert some.code == 0, some.stderr
    first = json.loads(some.stdout)
    assert [x["id"] for x in first["dead_letters"]] == bridge.ids[:260]
    assert first["more"] is True


async def test_cli_refused_call_exits_1_with_code_and_reason(bridge: Bridge) -> None:
    before = await table(bridge.pool)

    negative = await cli(
        bridge,
        "dead-letters",
        "retry",
        str(bridge.ids[0]),
        "-4",
        "--actor",
        "ana",
        "--reason",
        "fixed",
    )
    blank_actor = await cli(
        bridge, "dead-letters", "discard", "1", "--actor", " ", "--reason", "fixed"
    )

    assert negative.code == 1
    assert negative.stdout == ""
    assert negative.stderr.startswith("error: INVALID_ARGUMENT ID_INVALID: ")
    assert blank_actor.code == 1
    assert blank_actor.stderr.startswith("error: INVALID_ARGUMENT ACTOR_INVALID: ")
    assert await table(bridge.pool) == before


async def test_cli_usage_errors_exit_2_and_change_nothing(bridge: Bridge) -> None:
    before = await table(bridge.pool)
    usages = [
        ["dead-letters", "retry", "1", "--actor", "ana"],
        ["dead-letters", "retry", "one", "--actor", "ana", "--reason", "r"],
        ["dead-letters", "list", "--limit", "0"],
        ["dead-letters", "list", "--status", "dead,lost"],
        ["dead-letters", "resurrect", "1"],
        [],
    ]

    outcomes = [await cli(bridge, *usage) for usage in usages]

    for usage, outcome in zip(usages, outcomes, strict=True):
        assert outcome.code == 2, (usage, outcome)
        assert "usage:" in outcome.stderr, usage
        assert outcome.stdout == "", usage
    assert await table(bridge.pool) == before
