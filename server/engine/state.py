"""What the engine holds, and the helpers every kind of decision shares.

The engine is split by concern: this base holds the state (shards, reservations,
policies, the idempotency memory) and the bookkeeping of decisions; reserving.py,
changes.py, rules.py and restore.py each add one family of decisions, and engine.py
puts them together behind `decide`.
"""

import dataclasses
import json
import secrets
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from server.clock import Clock
from server.engine.commands import (
    Command,
    PolicyCommand,
    Result,
    SourcedCommand,
    fingerprint,
    result_from_json,
)
from server.engine.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ensure,
)
from server.engine.limits import Limits
from server.engine.model import (
    Position,
    Reservation,
    ReservationState,
)
from server.engine.policy import Policies
from server.engine.shard import Shard, shard_of

US_PER_S = 1_000_000


@dataclasses.dataclass(frozen=True, slots=True)
class WalRecord:
    """One commitment, as the write-ahead table stores it.

    `body["fx"]` lists [sku, location, on_hand_delta, held_delta] per position touched;
    `body["rsv"]`, when present, is the reservation as it stands after the record.
    """

    shard: int
    seq: int
    kind: str
    reservation_id: str
    body: dict[str, Any]
    recorded_us: int


@dataclasses.dataclass(frozen=True, slots=True)
class RequestRow:
    """An answered request, kept so that a retry gets the same answer."""

    scope: str
    request_id: str
    fingerprint: str
    result: dict[str, Any]
    created_us: int


@dataclasses.dataclass(slots=True)
class Decision:
    result: Result
    shard: int
    record: WalRecord | None
    request: RequestRow | None
    # Availability gains to make visible once durable.
    gains: list[tuple[Position, int]]
    # Allocation gains, per (channel, sku, location), likewise.
    channel_gains: list[tuple[tuple[str, str, str], int]] = dataclasses.field(
        default_factory=list
    )
    # On-hand and pool changes that stop being pending once durable.
    on_hand_pending: list[tuple[Position, int]] = dataclasses.field(
        default_factory=list
    )
    pool_pending: list[tuple[tuple[str, str, str], int]] = dataclasses.field(
        default_factory=list
    )
    inbound_pending: list[tuple[tuple[str, str], int]] = dataclasses.field(
        default_factory=list
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Replay:
    """The command was seen before. While its first answer is not durable yet the
    caller must wait for it (`durable` False) before answering."""

    result: Result
    durable: bool
    key: tuple[str, str]


@dataclasses.dataclass(slots=True)
class Remembered:
    fingerprint: str
    # The answer, or its JSON text as restored from the request log until a retry
    # needs it (see `answer`).
    result: Result | str
    created_us: int
    durable: bool

    def answer(self) -> Result:
        if isinstance(self.result, str):
            self.result = result_from_json(json.loads(self.result), replayed=False)
        return self.result


@dataclasses.dataclass(frozen=True, slots=True)
class EngineStats:
    reservations: int
    active_reservations: int
    positions: int
    remembered_requests: int
    undurable_requests: int


class _RandomIds:
    """96 random bits per id, as unguessable as secrets.token_hex(12), read from the
    OS a few hundred ids at a time: one system call per id cost a few per cent of a
    reservation's CPU."""

    _ID_BYTES = 12
    _IDS_PER_READ = 512

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def __call__(self) -> str:
        if self._at >= len(self._pool):
            self._pool = secrets.token_bytes(self._ID_BYTES * self._IDS_PER_READ)
            self._at = 0
        chunk = self._pool[self._at : self._at + self._ID_BYTES]
        self._at += self._ID_BYTES
        return "r" + chunk.hex()


new_reservation_id = _RandomIds()


class EngineState:
    def __init__(
        self,
        *,
        shard_count: int,
        clock: Clock,
        limits: Limits | None = None,
        idempotency_retention_s: int = 24 * 3600,
        new_id: Callable[[], str] = new_reservation_id,
    ) -> None:
        assert shard_count > 0
        self.limits = limits or Limits()
        self.shards = [Shard(index) for index in range(shard_count)]
        self.reservations: dict[str, Reservation] = {}
        self.locations: set[str] = set()
        self._clock = clock
        self._retention_us = idempotency_retention_s * US_PER_S
        self._new_id = new_id
        self._remembered: dict[tuple[str, str], Remembered] = {}
        # Finished reservations in the order they finished, for pruning after retention.
        self._finished: deque[tuple[int, str]] = deque()
        self._undurable = 0
        # Recovery bookkeeping: held per position as the records said, to compare with
        # what the recovered reservations hold.
        self._replayed_held: dict[tuple[str, str], int] = {}
        self.policies = Policies()
        # Units each channel holds per (channel, sku, location), and releases of them
        # not yet durable: summed over an allocation's scope, what its pool has lent.
        self.channel_held: dict[tuple[str, str, str], int] = {}
        self.channel_withheld: dict[tuple[str, str, str], int] = {}
        # Throttles' token buckets: control id -> (tokens, when counted).
        self._buckets: dict[str, tuple[float, int]] = {}

    def _is_due(self, reservation: Reservation, now_us: int) -> bool:
        return (
            reservation.state is ReservationState.PENDING
            and 0 < reservation.expires_us <= now_us
        )

    def _reservation(self, reservation_id: str) -> Reservation:
        reservation = self.reservations.get(reservation_id)
        if reservation is None:
            raise NotFound(
                "RESERVATION_NOT_FOUND",
                f"no reservation {reservation_id}",
                field="reservation_id",
            )
        return reservation

    def _check_channel(self, channel: str, *, field: str) -> None:
        if not self.policies.is_known(channel):
            raise FailedPrecondition(
                "CHANNEL_UNKNOWN",
                f"channel {channel} is not registered; register it with SetChannels",
                field=field,
            )

    def _position(self, sku: str, location: str) -> Position:
        position = self.shards[shard_of(sku, len(self.shards))].position(sku, location)
        ensure(position is not None, f"a reservation holds unknown {sku}@{location}")
        assert position is not None
        return position

    def _replay(self, key: tuple[str, str], command: Command) -> Replay | None:
        remembered = self._remembered.get(key)
        if remembered is None:
            return None
        if remembered.fingerprint != fingerprint(command):
            field = "request_id"
            if isinstance(command, SourcedCommand):
                field = "source_event_id"
            elif isinstance(command, PolicyCommand):
                field = "change_id"
            raise InvalidArgument(
                "REQUEST_ID_REUSED",
                f"{field} {key[1]!r} was already used for a different request",
                field=field,
            )
        replayed = dataclasses.replace(remembered.answer(), replayed=True)
        return Replay(result=replayed, durable=remembered.durable, key=key)

    def _answer(
        self, key: tuple[str, str], command: Command, result: Result, *, shard: int
    ) -> Decision:
        """A decision that changes nothing but must still be remembered durably."""
        decision = self._decision(key, command, result, record=None, gains=[])
        decision.shard = shard
        return decision

    def _decision(
        self,
        key: tuple[str, str],
        command: Command,
        result: Result,
        *,
        record: WalRecord | None,
        gains: list[tuple[Position, int]],
    ) -> Decision:
        now_us = self._clock.now_us()
        print_ = fingerprint(command)
        self._remembered[key] = Remembered(print_, result, now_us, durable=False)
        self._undurable += 1
        request = RequestRow(key[0], key[1], print_, result.to_json(), now_us)
        shard = record.shard if record else 0
        return Decision(result, shard, record, request, gains)

    def _record(
        self, reservation: Reservation, kind: str, fx: list[list[Any]], now_us: int
    ) -> WalRecord:
        shard = self.shards[reservation.home_shard]
        return WalRecord(
            shard=shard.index,
            seq=shard.take_seq(),
            kind=kind,
            reservation_id=reservation.reservation_id,
            body={"fx": fx, "rsv": reservation.to_json()},
            recorded_us=now_us,
        )

    def _stock_record(
        self, home: int, kind: str, body: dict[str, Any], now_us: int
    ) -> WalRecord:
        shard = self.shards[home]
        return WalRecord(home, shard.take_seq(), kind, "", body, now_us)

    def positions_of(self, sku: str) -> dict[str, Position]:
        shard = self.shards[shard_of(sku, len(self.shards))]
        return shard.positions.get(sku, {})

    def iter_positions(self) -> Iterator[Position]:
        for shard in self.shards:
            for by_location in shard.positions.values():
                yield from by_location.values()

    def allocation_remaining(self, sku: str, channel: str, group: str) -> int:
        """Units of the channel's pool scoped to `group` it may still hold (never
        below zero). Holds exist only at positions, so their locations suffice."""
        lent = 0
        for location in self.positions_of(sku):
            if self.policies.in_scope(group, location):
                key = (channel, sku, location)
                lent += self.channel_held.get(key, 0)
                lent += self.channel_withheld.get(key, 0)
        pool = self.policies.pools.get((sku, channel, group), 0)
        return max(0, pool - lent)

    def _free_units(self, sku: str, group: str) -> int:
        """Units of a sku free to promise in a scope, before channel buffers."""
        now_us = self._clock.now_us()
        return sum(
            self.policies.available(position, "", now_us)
            for location, position in self.positions_of(sku).items()
            if self.policies.in_scope(group, location)
        )

    def unfenced_units(self, sku: str, channel: str, group: str | None) -> int:
        """Units of a sku `channel` may take in the scope `group` without eating into
        another channel's exclusive allocation there (no limit when there is none)."""
        if group is None:
            return self.limits.on_hand_max
        fence = sum(
            self.allocation_remaining(sku, other, scope)
            for (other, scope), (exclusive, _) in self.policies.allocations.get(
                sku, {}
            ).items()
            if exclusive and other != channel and scope == group
        )
        if not fence:
            return self.limits.on_hand_max
        return self._free_units(sku, group) - fence

    def add_channel_held(
        self, channel: str, sku: str, location: str, quantity: int
    ) -> None:
        key = (channel, sku, location)
        held = self.channel_held.get(key, 0) + quantity
        ensure(held >= 0, f"channel {channel} holds {held} of {sku} at {location}")
        if held:
            self.channel_held[key] = held
        else:
            # A line can hold nothing (released or fulfilled in full) while its
            # reservation stays open, so there may be nothing to drop.
            self.channel_held.pop(key, None)
