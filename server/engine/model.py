"""Positions and reservations, the state the engine decides on.

A position is one sku at one location. Its `held` is the sum of quantity_held over the
active reservation lines at that position; recovery derives it from the reservations and
checks it against what the write-ahead records said.

Availability gains (a release, an expiry, a receipt) count only once they are durable, so
that a failed write can never leave units promised twice. Until then the gain sits in
`withheld`: the position already shows the decided on-hand and held, but
available-to-sell leaves the gain out.
"""

import dataclasses
import enum
from typing import Any

from server.engine.errors import FailedPrecondition, ensure


class ReservationState(enum.Enum):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    FULFILLED = "fulfilled"
    RELEASED = "released"
    EXPIRED = "expired"


# The one place that lists the legal moves. A move to the same state is how partial
# releases and fulfilments are recorded; the reservation stays open while anything is
# held.
TRANSITIONS: dict[ReservationState, frozenset[ReservationState]] = {
    ReservationState.PENDING: frozenset(
        {
            ReservationState.PENDING,
            ReservationState.CONFIRMED,
            ReservationState.RELEASED,
            ReservationState.EXPIRED,
        }
    ),
    ReservationState.CONFIRMED: frozenset(
        {
            ReservationState.CONFIRMED,
            ReservationState.FULFILLED,
            ReservationState.RELEASED,
        }
    ),
    ReservationState.FULFILLED: frozenset(),
    ReservationState.RELEASED: frozenset(),
    ReservationState.EXPIRED: frozenset(),
}

ACTIVE_STATES = frozenset({ReservationState.PENDING, ReservationState.CONFIRMED})


@dataclasses.dataclass(slots=True)
class Position:
    sku: str
    location: str
    on_hand: int = 0
    held: int = 0
    withheld: int = 0
    # On-hand changes decided but not yet durable. Absolute counts (SetOnHand) are
    # recorded as a delta from the durable on-hand, so the delta replays to the same
    # result whether or not the writes in flight land.
    on_hand_pending: int = 0

    @property
    def available_to_sell(self) -> int:
        """Before policies (safety stock, buffers, controls): Policies.available says
        what a channel may be promised."""
        return max(0, self.on_hand - self.held - self.withheld)

    def check(self) -> None:
        ensure(self.on_hand >= 0, f"negative on-hand at {self.sku}@{self.location}")
        ensure(self.held >= 0, f"negative held at {self.sku}@{self.location}")
        ensure(self.withheld >= 0, f"negative withheld at {self.sku}@{self.location}")


@dataclasses.dataclass(slots=True)
class ReservationLine:
    sku: str
    location: str
    quantity_reserved: int
    quantity_held: int
    quantity_fulfilled: int = 0
    quantity_released: int = 0

    def check(self) -> None:
        accounted = (
            self.quantity_held + self.quantity_fulfilled + self.quantity_released
        )
        ensure(self.quantity_held >= 0, "negative quantity held on a line")
        ensure(
            accounted == self.quantity_reserved,
            f"line {self.sku}@{self.location} accounts for {accounted} "
            f"of {self.quantity_reserved} reserved",
        )


@dataclasses.dataclass(slots=True)
class Reservation:
    reservation_id: str
    channel: str
    order_ref: str
    state: ReservationState
    lines: list[ReservationLine]
    created_us: int
    updated_us: int
    # Zero once the hold no longer expires (confirmed or finished).
    expires_us: int
    # The shard whose write-ahead stream carries every record of this reservation.
    home_shard: int

    @property
    def quantity_held(self) -> int:
        return sum(line.quantity_held for line in self.lines)

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE_STATES

    def move_to(self, target: ReservationState, *, now_us: int) -> None:
        """Change state through the legal moves only."""
        if target not in TRANSITIONS[self.state]:
            raise FailedPrecondition(
                f"RESERVATION_{self.state.name}",
                f"reservation {self.reservation_id} is {self.state.value}; "
                f"it cannot become {target.value}",
                field="reservation_id",
            )
        self.state = target
        self.updated_us = now_us
        if target is not ReservationState.PENDING:
            self.expires_us = 0
        self.check()

    def check(self) -> None:
        for line in self.lines:
            line.check()
        ensure(bool(self.lines), f"reservation {self.reservation_id} has no lines")
        held = self.quantity_held
        ensure(
            self.is_active == (held > 0),
            f"reservation {self.reservation_id} is {self.state.value} with {held} held",
        )
        ensure(
            (self.state is ReservationState.PENDING) == (self.expires_us > 0),
            f"reservation {self.reservation_id} is {self.state.value} "
            f"with expires_us={self.expires_us}",
        )

    def copy(self) -> "Reservation":
        return dataclasses.replace(
            self, lines=[dataclasses.replace(line) for line in self.lines]
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.reservation_id,
            "channel": self.channel,
            "order_ref": self.order_ref,
            "state": self.state.value,
            "lines": [
                [
                    line.sku,
                    line.location,
                    line.quantity_reserved,
                    line.quantity_held,
                    line.quantity_fulfilled,
                    line.quantity_released,
                ]
                for line in self.lines
            ],
            "created_us": self.created_us,
            "updated_us": self.updated_us,
            "expires_us": self.expires_us,
            "home_shard": self.home_shard,
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> "Reservation":
        reservation = cls(
            reservation_id=body["id"],
            channel=body["channel"],
            order_ref=body["order_ref"],
            state=ReservationState(body["state"]),
            lines=[ReservationLine(*fields) for fields in body["lines"]],
            created_us=body["created_us"],
            updated_us=body["updated_us"],
            expires_us=body["expires_us"],
            home_shard=body["home_shard"],
        )
        reservation.check()
        return reservation
