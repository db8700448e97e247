"""Shards: which part of the catalogue a position belongs to, and its record stream.

Design note. A shard owns the positions of the skus that hash to it and one write-ahead
stream with its own sequence. The hash is CRC-32 of the sku's UTF-8 bytes, stable across
processes and releases (Python's `hash` is salted per process), so that a later release
can move whole shards between processes. A reservation's records all go to one home
shard, the shard of its first line's sku, which keeps them in order; its lines may touch
positions of other shards. That is atomic here because one event loop decides for every
shard. On replay it needs no cross-shard order: every position effect in a record is a
delta (even SetOnHand is recorded as the delta it applied), and deltas commute.
"""

import dataclasses
import heapq
import zlib

from server.engine.model import Position


def shard_of(sku: str, shard_count: int) -> int:
    return zlib.crc32(sku.encode()) % shard_count


@dataclasses.dataclass(slots=True)
class Shard:
    index: int
    # sku -> location -> position
    positions: dict[str, dict[str, Position]] = dataclasses.field(default_factory=dict)
    # The sequence number the next record of this shard gets.
    next_seq: int = 1
    # (expires_us, reservation_id) of pending holds homed here. Entries go stale when a
    # hold is confirmed, released or extended; the sweep skips those.
    expiry_heap: list[tuple[int, str]] = dataclasses.field(default_factory=list)

    def position(self, sku: str, location: str) -> Position | None:
        by_location = self.positions.get(sku)
        return by_location.get(location) if by_location else None

    def position_or_new(self, sku: str, location: str) -> Position:
        by_location = self.positions.setdefault(sku, {})
        position = by_location.get(location)
        if position is None:
            position = by_location[location] = Position(sku=sku, location=location)
        return position

    def take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def schedule_expiry(self, expires_us: int, reservation_id: str) -> None:
        heapq.heappush(self.expiry_heap, (expires_us, reservation_id))

    def pop_due(self, now_us: int) -> str | None:
        if self.expiry_heap and self.expiry_heap[0][0] <= now_us:
            return heapq.heappop(self.expiry_heap)[1]
        return None
