"""Cutting a shard's stream into batches: where each ends, and its lines."""

import random

import pytest

from erp_bridge.adapters import Feed
from erp_bridge.batches import Stretch, build, stretch_to, take, without_line
from erp_bridge.reader import StreamRecord
from server.wal.feed import FeedLine, StreamPosition, parse_batch_id


def record(
    seq: int, *effects: tuple[str, str, int, int], kind: str = "reserve", shard: int = 0
) -> StreamRecord:
    lines = tuple(
        FeedLine(shard, seq, i, kind, sku, loc, on_hand, held, f"r{seq}", "web")
        for i, (sku, loc, on_hand, held) in enumerate(effects)
    )
    return StreamRecord(seq=seq, committed_us=seq * 1_000, lines=lines)


def test_take_stops_at_lines_max_and_splits_a_record_too_long_to_fit() -> None:
    records = [
        record(1, ("A", "L", 0, 1)),
        record(2, ("A", "L", 0, 1), ("B", "L", 0, 2), ("C", "L", 0, 3)),
        record(3, ("A", "L", 0, -1)),
    ]

    first = take(records, StreamPosition(0), lines_max=2)
    assert first is not None
    assert first.end == StreamPosition(1, 1)
    assert [(x.seq, x.index) for x in first.lines] == [(1, 0), (2, 0)]

    second = take(records[1:], first.end, lines_max=2)
    assert second is not None
    assert second.end == StreamPosition(2, 0)
    assert [(x.seq, x.index) for x in second.lines] == [(2, 1), (2, 2)]


def test_records_without_lines_are_passed_without_costing_room() -> None:
    records = [record(1), record(2, ("A", "L", 0, 1)), record(3), record(4)]

    stretch = take(records, StreamPosition(0), lines_max=1)

    assert stretch is not None
    assert stretch.end == StreamPosition(4, 0)
    assert len(stretch.lines) == 1


def test_take_returns_none_when_nothing_follows() -> None:
    assert take([], StreamPosition(5), lines_max=10) is None


def test_stretch_to_rebuilds_exactly_the_planned_stretch() -> None:
    rng = random.Random(7)
    records = [
        record(seq, *[("S", "L", 0, rng.randint(1, 5))] * rng.randint(0, 4))
        for seq in range(1, 30)
    ]
    position = StreamPosition(0)
    while (stretch := take(records[position.seq :], position, lines_max=3)) is not None:
        needed = records[
            position.seq : stretch.end.seq + (1 if stretch.end.line else 0)
        ]

        rebuilt = stretch_to(needed, position, stretch.end)

        assert rebuilt.lines == stretch.lines
        position = stretch.end
    assert position == StreamPosition(29, 0)


def test_positions_feed_nets_per_sku_and_location_and_drops_what_cancels() -> None:
    records = [
        record(1, ("A", "L1", 0, 2), ("B", "L1", 0, 1)),
        record(2, ("A", "L1", -2, -2), ("B", "L1", 0, -1), kind="fulfill"),
        record(3, ("A", "L2", 5, 0), kind="adjust"),
    ]
    stretch = take(records, StreamPosition(0), lines_max=100)
    assert stretch is not None

    batch = build(name="erp", shard=0, feed=Feed.POSITIONS, stretch=stretch)

    assert batch.batch_id == "erp.s0.0.0-3.0"
    assert batch.stream == "erp.s0"
    assert [
        (x.sku, x.location, x.on_hand_delta, x.held_delta) for x in batch.lines
    ] == [
        ("A", "L1", -2, 0),
        ("A", "L2", 5, 0),
    ]
    assert [x.line_id for x in batch.lines] == ["erp.s0.0.0-3.0.0", "erp.s0.0.0-3.0.1"]


def test_ledger_feed_passes_every_line_through_with_a_stable_id() -> None:
    records = [
        record(1, ("A", "L", 0, 2), shard=3),
        record(2, ("A", "L", 0, -2), kind="release", shard=3),
    ]
    stretch = take(records, StreamPosition(0), lines_max=100)
    assert stretch is not None

    batch = build(name="erp", shard=3, feed=Feed.LEDGER, stretch=stretch)

    assert [x.line_id for x in batch.lines] == ["erp.s3.1.0", "erp.s3.2.0"]
    assert [x.kind for x in batch.lines] == ["reserve", "release"]
    assert {x.reservation_id for x in batch.lines} == {"r1", "r2"}
    assert {x.channel for x in batch.lines} == {"web"}


def test_batch_ids_parse_back_to_what_they_cover() -> None:
    stretch = Stretch(StreamPosition(10, 2), StreamPosition(12, 1), (), 0)

    batch = build(name="erp", shard=2, feed=Feed.LEDGER, stretch=stretch)
    coverage = parse_batch_id(batch.batch_id)

    assert coverage is not None
    assert (coverage.shard, coverage.start, coverage.end) == (
        2,
        StreamPosition(10, 2),
        StreamPosition(12, 1),
    )
    assert parse_batch_id("erp.retry.abc") is None
    assert parse_batch_id("erp.s2.12.1-10.2") is None


def test_without_line_drops_one_line_under_an_id_of_its_own() -> None:
    records = [record(1, ("A", "L", 0, 1), ("B", "L", 0, 1), ("C", "L", 0, 1))]
    stretch = take(records, StreamPosition(0), lines_max=10)
    assert stretch is not None
    batch = build(name="erp", shard=0, feed=Feed.LEDGER, stretch=stretch)

    smaller = without_line(batch, 0)
    smallest = without_line(smaller, 1)

    assert (smaller.batch_id, smallest.batch_id) == (
        "erp.s0.0.0-1.0.x1",
        "erp.s0.0.0-1.0.x2",
    )
    assert [x.sku for x in smallest.lines] == ["B"]
    coverage = parse_batch_id(smallest.batch_id)
    assert coverage is not None
    assert (coverage.start, coverage.end) == (StreamPosition(0), StreamPosition(1))
    with pytest.raises(Exception, match="line 5"):
        without_line(batch, 5)
