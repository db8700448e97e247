"""The reservation engine: decides every command synchronously, in memory.

Design note. `decide` checks a command, looks up its idempotency key, changes state and
returns a Decision: the answer, the write-ahead record and request-log row that must be
durable before the answer is sent, and the availability gains that must wait for that.
The caller (the ledger) writes those and calls `mark_durable` or, when the write failed,
throws this engine away and recovers a new one from Postgres. Because deciding never
awaits, a multi-line reservation across shards is atomic without locks.

Holds count against available-to-sell from the moment they are decided; gains (release,
expiry, receipts) are withheld until durable. So a write that fails can leave stock
under-promised for a moment, never promised twice.
"""

import base64
import binascii

from server.engine.changes import Changing
from server.engine.commands import (
    Command,
    PolicyCommand,
    ReconcileOnHand,
    Reserve,
    StockCommand,
    check_count,
    check_id,
    validate_policy_command,
    validate_reconcile,
    validate_reservation_command,
    validate_reserve,
    validate_stock_command,
)
from server.engine.errors import (
    InvalidArgument,
    ensure,
)
from server.engine.model import (
    Reservation,
    ReservationState,
)
from server.engine.reserving import Reserving
from server.engine.restore import Restoring
from server.engine.rules import Ruling
from server.engine.state import (
    US_PER_S,
    Decision,
    EngineStats,
    Replay,
    RequestRow,
    WalRecord,
)

# Adapters import the engine's value types from here, beside the engine itself.
__all__ = [
    "US_PER_S",
    "Decision",
    "Engine",
    "EngineStats",
    "Replay",
    "RequestRow",
    "WalRecord",
]


class Engine(Reserving, Changing, Ruling, Restoring):
    # Commands ---------------------------------------------------------------------------

    def decide(self, command: Command) -> Decision | Replay:
        """Check and apply one command. Raises EngineError for refused commands."""
        if isinstance(command, Reserve):
            validate_reserve(command, self.limits)
            key = ("ch:" + command.channel, command.request_id)
            replay = self._replay(key, command)
            if replay is not None:
                return replay
            self._check_channel(command.channel, field="channel")
            self._check_throttle(command.channel)
            return self._reserve(command, key)
        if isinstance(command, StockCommand):
            validate_stock_command(command, self.limits)
            key = ("src:" + command.source, command.source_event_id)
            return self._replay(key, command) or self._stock(command, key)
        if isinstance(command, ReconcileOnHand):
            validate_reconcile(command, self.limits)
            key = ("src:" + command.source, command.source_event_id)
            return self._replay(key, command) or self._reconcile(command, key)
        if isinstance(command, PolicyCommand):
            validate_policy_command(command, self.limits)
            key = ("pol:" + command.actor, command.change_id)
            return self._replay(key, command) or self._policy(command, key)
        validate_reservation_command(command, self.limits)
        reservation = self._reservation(command.reservation_id)
        key = ("ch:" + reservation.channel, command.request_id)
        return self._replay(key, command) or self._change(command, reservation, key)

    def mark_durable(self, decision: Decision) -> None:
        """The decision's writes are committed: release its gains, trust its answer."""
        for position, gain in decision.gains:
            position.withheld -= gain
            position.check()
        for key, gain in decision.channel_gains:
            self.channel_withheld[key] -= gain
            ensure(self.channel_withheld[key] >= 0, f"negative withheld for {key}")
        for position, delta in decision.on_hand_pending:
            position.on_hand_pending -= delta
        for pool_key, delta in decision.pool_pending:
            self.policies.pool_pending[pool_key] -= delta
        for inbound_key, delta in decision.inbound_pending:
            self.policies.inbound_pending[inbound_key] -= delta
        if decision.request is not None:
            request = decision.request
            remembered = self._remembered[(request.scope, request.request_id)]
            ensure(not remembered.durable, "a request was made durable twice")
            remembered.durable = True
            self._undurable -= 1

    def replay_of(self, command: ReconcileOnHand) -> Replay | None:
        """The stored answer if this snapshot was compared before, without deciding:
        a retry must not need the records the first attempt read."""
        validate_reconcile(command, self.limits)
        return self._replay(("src:" + command.source, command.source_event_id), command)

    # Reads ------------------------------------------------------------------------------

    def get_reservation(self, reservation_id: str) -> Reservation:
        check_id(
            reservation_id,
            field="reservation_id",
            length_max=self.limits.reservation_id_length_max,
        )
        return self._reservation(reservation_id).copy()

    def check_availability_query(self, skus: list[str], locations: list[str]) -> None:
        check_count(
            len(skus),
            field="skus",
            count_max=self.limits.skus_per_availability_query_max,
        )
        for index, sku in enumerate(skus):
            check_id(sku, field=f"skus[{index}]", length_max=self.limits.sku_length_max)
        check_count(
            len(locations),
            field="locations",
            count_max=self.limits.locations_per_line_max,
            required=False,
        )
        for index, location in enumerate(locations):
            check_id(
                location,
                field=f"locations[{index}]",
                length_max=self.limits.location_length_max,
            )

    def list_reservations(
        self,
        *,
        channel: str,
        state: ReservationState | None,
        created_before_us: int | None,
        page_size: int,
        page_token: str,
    ) -> tuple[list[Reservation], str]:
        """One page, ordered by (created_us, reservation_id).

        Known shortcoming: filters and sorts every reservation in memory on each call,
        O(n log n) per page; fine for operators' pages, not for a hot path.
        """
        size = self._page_size(page_size)
        after = _decode_page_token(page_token)
        matches = sorted(
            (r.created_us, r.reservation_id)
            for r in self.reservations.values()
            if (not channel or r.channel == channel)
            and (state is None or r.state is state)
            and (created_before_us is None or r.created_us < created_before_us)
            and (after is None or (r.created_us, r.reservation_id) > after)
        )
        page = [self.reservations[rid].copy() for _, rid in matches[:size]]
        token = _encode_page_token(matches[size - 1]) if len(matches) > size else ""
        return page, token

    def _page_size(self, page_size: int) -> int:
        if page_size == 0:
            return self.limits.page_size_default
        if not 0 < page_size <= self.limits.page_size_max:
            raise InvalidArgument(
                "PAGE_SIZE_OUT_OF_RANGE",
                f"page_size is {page_size}; it must be from 1 to "
                f"{self.limits.page_size_max}",
                field="page_size",
            )
        return page_size

    def stats(self) -> EngineStats:
        active = sum(1 for r in self.reservations.values() if r.is_active)
        positions = sum(
            len(s) for shard in self.shards for s in shard.positions.values()
        )
        return EngineStats(
            reservations=len(self.reservations),
            active_reservations=active,
            positions=positions,
            remembered_requests=len(self._remembered),
            undurable_requests=self._undurable,
        )

    # Retention --------------------------------------------------------------------------

    def prune(self) -> int:
        """Forget answered requests and finished reservations past retention."""
        horizon_us = self._clock.now_us() - self._retention_us
        forgotten = 0
        while self._remembered:
            key, remembered = next(iter(self._remembered.items()))
            if remembered.created_us > horizon_us or not remembered.durable:
                break
            del self._remembered[key]
            forgotten += 1
        forgotten += self.policies.prune_controls(self._clock.now_us())
        for control_id in [c for c in self._buckets if c not in self.policies.controls]:
            del self._buckets[control_id]
        while self._finished and self._finished[0][0] <= horizon_us:
            _, reservation_id = self._finished.popleft()
            reservation = self.reservations.get(reservation_id)
            if reservation is not None and not reservation.is_active:
                del self.reservations[reservation_id]
                forgotten += 1
        return forgotten


def _encode_page_token(after: tuple[int, str]) -> str:
    return base64.urlsafe_b64encode(f"{after[0]}:{after[1]}".encode()).decode()


def _decode_page_token(token: str) -> tuple[int, str] | None:
    if not token:
        return None
    try:
        created, _, reservation_id = (
            base64.urlsafe_b64decode(token).decode().partition(":")
        )
        return int(created), reservation_id
    except (ValueError, binascii.Error, UnicodeDecodeError) as error:
        raise InvalidArgument(
            "PAGE_TOKEN_INVALID",
            "page_token was not issued by this server",
            field="page_token",
        ) from error
