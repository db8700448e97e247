"""Checkpoints and recovery: the state to store, and rebuilding it from a checkpoint
plus the records after it, checking the same invariants as before every write."""

from typing import Any

from server.engine.commands import Result, result_from_json
from server.engine.errors import (
    ensure,
)
from server.engine.model import (
    Reservation,
    ReservationState,
)
from server.engine.policy import Attribution, Policies
from server.engine.shard import shard_of
from server.engine.state import EngineState, Remembered


class Restoring(EngineState):
    def checkpoint_rows(
        self,
    ) -> tuple[
        list[tuple[str, str, int, int]], list[dict[str, Any]], list[int], dict[str, Any]
    ]:
        """State to checkpoint: positions, reservations, the last seq per shard and
        the policies.

        Only meaningful when nothing is in flight: every decided record durable, so no
        gain is withheld and the sequences cover exactly the state shown.
        """
        ensure(self._undurable == 0, "checkpoint taken with writes in flight")
        positions = []
        for position in self.iter_positions():
            ensure(position.withheld == 0, "checkpoint taken with gains withheld")
            positions.append(
                (position.sku, position.location, position.on_hand, position.held)
            )
        ensure(
            not any(self.channel_withheld.values())
            and not any(self.policies.pool_pending.values())
            and not any(self.policies.inbound_pending.values())
            and not any(p.on_hand_pending for p in self.iter_positions()),
            "checkpoint taken with changes in flight",
        )
        reservations = [r.to_json() for r in self.reservations.values()]
        seqs = [shard.next_seq - 1 for shard in self.shards]
        return positions, reservations, seqs, self.policies.to_json()

    def restore_position(
        self, sku: str, location: str, on_hand: int, held: int
    ) -> None:
        shard = self.shards[shard_of(sku, len(self.shards))]
        position = shard.position_or_new(sku, location)
        position.on_hand = on_hand
        self._replayed_held[(sku, location)] = held
        self.locations.add(location)

    def restore_reservation(self, body: dict[str, Any]) -> None:
        reservation = Reservation.from_json(body)
        self.reservations[reservation.reservation_id] = reservation

    def restore_policies(self, body: dict[str, Any]) -> None:
        self.policies = Policies.from_json(body)

    def restore_seq(self, shard: int, last_seq: int) -> None:
        self.shards[shard].next_seq = last_seq + 1

    def replay_record(self, shard: int, seq: int, body: dict[str, Any]) -> None:
        """Apply one committed record on top of the checkpoint, in shard order."""
        ensure(
            seq == self.shards[shard].next_seq,
            f"shard {shard} replays seq {seq}, expected {self.shards[shard].next_seq}",
        )
        self.shards[shard].next_seq = seq + 1
        for sku, location, on_hand_delta, held_delta in body.get("fx", ()):
            position = self.shards[shard_of(sku, len(self.shards))].position_or_new(
                sku, location
            )
            position.on_hand += on_hand_delta
            at = (sku, location)
            self._replayed_held[at] = self._replayed_held.get(at, 0) + held_delta
            self.locations.add(location)
        if "rsv" in body:
            self.restore_reservation(body["rsv"])
        for sku, channel, group, delta in body.get("pools", ()):
            self.policies.add_to_pool((sku, channel, group), delta)
        for sku, location, delta in body.get("inbound", ()):
            self.policies.add_inbound(sku, location, delta)
        if "policy" in body:
            attribution = Attribution(body["actor"], body["change_id"], body["at_us"])
            self.policies.apply(body["policy"], attribution)

    def restore_request(
        self,
        *,
        scope: str,
        request_id: str,
        fingerprint_: str,
        result: dict[str, Any] | str,
        created_us: int,
    ) -> None:
        """One remembered answer. Given as JSON text, it is decoded only if a retry
        asks for it: most never are, and decoding every one made up a fifth of
        recovery."""
        answer: Result | str = (
            result
            if isinstance(result, str)
            else result_from_json(result, replayed=False)
        )
        self._remembered[(scope, request_id)] = Remembered(
            fingerprint_, answer, created_us, True
        )

    def finish_recovery(self) -> None:
        """Derive held from the reservations, check it against the records, and rebuild
        the expiry schedule; the same invariants as before every write."""
        derived: dict[tuple[str, str], int] = {}
        ordered = sorted(self.reservations.values(), key=lambda r: r.updated_us)
        for reservation in ordered:
            reservation.check()
            if reservation.is_active:
                for line in reservation.lines:
                    at = (line.sku, line.location)
                    derived[at] = derived.get(at, 0) + line.quantity_held
                    self.add_channel_held(
                        reservation.channel, line.sku, line.location, line.quantity_held
                    )
            else:
                self._finished.append(
                    (reservation.updated_us, reservation.reservation_id)
                )
            if reservation.state is ReservationState.PENDING:
                home = self.shards[reservation.home_shard]
                home.schedule_expiry(reservation.expires_us, reservation.reservation_id)

        for position in self.iter_positions():
            at = (position.sku, position.location)
            position.held = derived.pop(at, 0)
            position.withheld = 0
            position.check()
            ensure(
                position.held == self._replayed_held.get(at, 0),
                f"recovered held {position.held} at {at} disagrees with the records' "
                f"{self._replayed_held.get(at, 0)}",
            )
        ensure(not derived, f"reservations hold unknown positions: {sorted(derived)}")
        self._replayed_held.clear()
