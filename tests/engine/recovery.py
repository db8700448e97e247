"""Recovery checks for the engine-vs-model sequences: what a ledger would have written
is replayed into a second engine, which must show the same state and give the same
answers as the engine it was recovered from.

A checkpoint is taken part-way through a sequence, and the records written after it are
replayed with the shards' streams interleaved at random, as recovery reads them
independently. Throttle buckets are the one thing not recovered: a recovered engine
starts them full, which a third engine recovered for the purpose checks.
"""

import dataclasses
import json
import random
from collections.abc import Iterator
from typing import Any

from server.engine.commands import Reserve, ReserveLine
from server.engine.engine import Decision, Engine, Replay, WalRecord
from server.engine.errors import EngineError, ErrorKind
from server.engine.policy import ControlKind
from tests.engine.catalogue import LOCATIONS, PAIRS, REACH_SUBSETS, SKUS, VIEWS
from tests.engine.comparison import Comparison
from tests.engine.engine_views import (
    check_invariants,
    engine_at_risk,
    engine_channel_views,
    engine_policies,
    engine_positions,
    engine_reach,
    engine_remaining,
)
from tests.engine.model_views import At
from tests.engine.support import IdSource


def json_round_trip(value: Any) -> Any:
    """What comes back from a jsonb column."""
    return json.loads(json.dumps(value))


def interleave(records: list[WalRecord], rng: random.Random) -> Iterator[WalRecord]:
    """The records in a random order that keeps each shard's own order: recovery reads
    the shards' streams independently."""
    streams: dict[int, list[WalRecord]] = {}
    for record in records:
        streams.setdefault(record.shard, []).append(record)
    for stream in streams.values():
        stream.reverse()
    while streams:
        shard = rng.choice(sorted(streams))
        yield streams[shard].pop()
        if not streams[shard]:
            del streams[shard]


@dataclasses.dataclass(frozen=True, slots=True)
class Checkpoint:
    positions: list[list[Any]]
    reservations: list[dict[str, Any]]
    seqs: list[int]
    policies: dict[str, Any]
    records_before: int


def take_checkpoint(comparison: Comparison) -> Checkpoint:
    positions, reservations, seqs, policies = comparison.engine.checkpoint_rows()
    return Checkpoint(
        positions=json_round_trip(positions),
        reservations=json_round_trip(reservations),
        seqs=json_round_trip(seqs),
        policies=json_round_trip(policies),
        records_before=len(comparison.journal.records),
    )


def recover(
    comparison: Comparison, checkpoint: Checkpoint, rng: random.Random
) -> Engine:
    """A new engine from the checkpoint, the later records (shards interleaved as `rng`
    says) and the request log."""
    engine = Engine(
        shard_count=comparison.shard_count,
        clock=comparison.clock,
        new_id=IdSource(start=comparison.ids.next),
    )
    engine.restore_policies(checkpoint.policies)
    for sku, location, on_hand, held in checkpoint.positions:
        engine.restore_position(sku, location, on_hand, held)
    for body in checkpoint.reservations:
        engine.restore_reservation(body)
    for shard, last_seq in enumerate(checkpoint.seqs):
        engine.restore_seq(shard, last_seq)

    later = comparison.journal.records[checkpoint.records_before :]
    for record in interleave(later, rng):
        engine.replay_record(record.shard, record.seq, json_round_trip(record.body))
    for _, row in comparison.journal.requests:
        engine.restore_request(
            scope=row.scope,
            request_id=row.request_id,
            fingerprint_=row.fingerprint,
            result=json_round_trip(row.result),
            created_us=row.created_us,
        )
    engine.finish_recovery()
    return engine


def compare_recovered(comparison: Comparison, recovered: Engine) -> None:
    where = f"{comparison.where()} after recovery"
    original = comparison.engine
    check_invariants(recovered, where)
    assert engine_positions(recovered) == engine_positions(original), where
    now_us = comparison.clock.now_us()
    assert engine_policies(recovered, now_us=now_us) == engine_policies(
        original, now_us=now_us
    ), where
    # Controls whose time box ended are kept until pruned, and recovered as they were.
    assert recovered.policies.controls == original.policies.controls, where
    # Inbound figures are sums of deltas: shards replayed in any order must agree.
    assert _nonzero(recovered.policies.inbound) == _nonzero(
        original.policies.inbound
    ), where
    assert recovered.policies.inbound_eta == original.policies.inbound_eta, where
    assert (
        recovered.policies.preorder_channels == original.policies.preorder_channels
    ), where
    # Pools are sums of deltas and what channels hold is rebuilt from reservations:
    # what each scope has left, and what each channel could take, must agree.
    assert engine_remaining(recovered) == engine_remaining(original), where
    assert recovered.channel_held == original.channel_held, where
    for within in REACH_SUBSETS:
        reach = engine_reach(recovered, PAIRS, within)
        assert reach == engine_reach(original, PAIRS, within), f"{where}: {within}"
    assert recovered.policies.channels == original.policies.channels, where
    for channel in VIEWS:
        got = engine_channel_views(recovered, channel)
        assert got == engine_channel_views(original, channel), f"{where}: {channel!r}"
        at_risk = engine_at_risk(recovered, channel)
        assert at_risk == engine_at_risk(original, channel), f"{where}: {channel!r}"
    assert {rid: r.to_json() for rid, r in recovered.reservations.items()} == {
        rid: r.to_json() for rid, r in original.reservations.items()
    }, where

    for command, _ in comparison.journal.requests:
        first = original.decide(command)
        again = recovered.decide(command)
        assert isinstance(first, Replay), f"{where}: {command!r}"
        assert isinstance(again, Replay), f"{where}: {command!r} not replayed"
        assert again.result == first.result, f"{where}: {command!r}"


def _nonzero(figures: dict[At, int]) -> dict[At, int]:
    return {at: units for at, units in figures.items() if units}


def check_buckets_start_full(comparison: Comparison, checkpoint: Checkpoint) -> None:
    """Throttle buckets are not durable: on an engine recovered for the purpose, each
    throttled channel may make as many requests at once as its rate, and no more."""
    where = f"{comparison.where()} after recovery"
    probe = recover(comparison, checkpoint, random.Random(comparison.step_index))
    now_us = comparison.clock.now_us()
    for throttle in comparison.model.controls_in_force(ControlKind.THROTTLE, now_us):
        line = ReserveLine(SKUS[0], 1, location=LOCATIONS[0])
        for index in range(throttle.rate_per_s + 1):
            command = Reserve(f"probe-{index}", throttle.channel, (line,))
            try:
                decision = probe.decide(command)
            except EngineError as error:
                refused = (error.kind, error.reason)
                assert refused == (ErrorKind.RESOURCE_EXHAUSTED, "CHANNEL_THROTTLED")
                assert index == throttle.rate_per_s, f"{where}: {throttle} refused"
                continue
            assert index < throttle.rate_per_s, f"{where}: {throttle} let one more by"
            assert isinstance(decision, Decision), f"{where}: {command!r}"
            probe.mark_durable(decision)
