"""Reconciliation end to end: the bridge feeds the simulator while commitments keep
coming, the simulator's own books are counted back into stockward through SetOnHand,
and the differences are exactly those planted in the ERP's books."""

import asyncio
import random

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from erp_bridge.bridge import Bridge
from erp_bridge.simulator import ErpSimulator, Faults, SimulatorConfig
from stockward.v1 import admin_pb2
from tests.conftest import Running, ServerFactory
from tests.erp.bridge_support import (
    LOCATIONS,
    bridge_config,
    stock,
    traffic,
    wait_caught_up,
)

SKUS = [f"SKU-{i}" for i in range(4)]
SNAPSHOTS = 8
# A batch the ERP applied can name a record the server committed but has not yet
# marked durable, for a moment: that snapshot is refused WATERMARK_AHEAD and taken
# again.
AHEAD_RETRIES_MAX = 50


async def test_erp_counts_taken_mid_feed_differ_only_where_planted(
    start_server: ServerFactory, schema: str
) -> None:
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    server: Running = await start_server()
    erp = ErpSimulator(
        SimulatorConfig(
            requests_per_s=500,
            lines_per_s=50_000,
            lines_per_request=5,
            faults=Faults(latency_ms=2),
        )
    )
    await erp.start()
    bridge = Bridge(bridge_config(schema, erp, feed="positions"), seed=seed)
    await bridge.start()
    try:
        await stock(server, SKUS, 60)
        load = asyncio.create_task(traffic(server, rng, SKUS, 250))
        planted: dict[tuple[str, str], int] = {}
        for snapshot in range(SNAPSHOTS):
            await asyncio.sleep(rng.uniform(0.0, 0.1))
            at = (rng.choice(SKUS), rng.choice(LOCATIONS))
            # Units the ERP counted that stockward never heard of: a difference of
            # minus that many there, and none anywhere else.
            extra = rng.choice([0, 0, 2, 7])
            if extra:
                erp.books.count_on_hand(
                    [(*at, erp.books.positions[at].on_hand + extra)]
                )
                planted[at] = planted.get(at, 0) - extra
            reported = await _reconcile(server, erp, f"count-{snapshot}")
            assert reported == {k: v for k, v in planted.items() if v}, (
                f"snapshot {snapshot}"
            )
        await load
        await wait_caught_up(schema)
        assert await _reconcile(server, erp, "final") == {
            k: v for k, v in planted.items() if v
        }
    finally:
        await bridge.stop()
        await erp.stop()


async def _reconcile(
    server: Running, erp: ErpSimulator, event_id: str
) -> dict[tuple[str, str], int]:
    """Count the ERP's books back into stockward; the non-zero differences."""
    for attempt in range(AHEAD_RETRIES_MAX):
        # Books and last batch ids read in one step: the ERP's count and what it had
        # applied when it counted.
        ledger = erp.books.ledger_json()
        counts = [
            admin_pb2.OnHandCount(sku=sku, location=location, on_hand=on_hand)
            for (sku, location), on_hand in _on_hand(ledger).items()
        ]
        applied = sorted(ledger["last_batch_ids"].values())  # type: ignore[attr-defined]
        try:
            response = await server.admin.SetOnHand(
                admin_pb2.SetOnHandRequest(
                    source="erp",
                    source_event_id=f"{event_id}-{attempt}",
                    counts=counts,
                    erp_snapshot=True,
                    erp_applied_batch_ids=applied,
                )
            )
        except grpc.aio.AioRpcError as error:
            assert _reason(error) == "WATERMARK_AHEAD", error
            await asyncio.sleep(0.01)
            continue
        return {
            (d.sku, d.location): d.difference
            for d in response.divergences
            if d.difference and not d.channel
        }
    raise AssertionError(f"every watermark of {event_id} was ahead")


def _on_hand(ledger: dict[str, object]) -> dict[tuple[str, str], int]:
    on_hand = {(sku, location): 0 for sku in SKUS for location in LOCATIONS}
    for position in ledger["positions"]:  # type: ignore[attr-defined]
        on_hand[(position["sku"], position["location"])] = position["on_hand"]
    return on_hand


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return "<no ErrorInfo>"
