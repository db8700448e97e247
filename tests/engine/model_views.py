"""What the randomized tests compare: the reference model's state and answers as plain
values, which the engine's state and answers are translated into.

Reservations are named by the model's ids: the comparison maps the engine's ids to the
model's before it compares. Every view is frozen, so a view taken before a command
cannot change under the test.
"""

import dataclasses

from server.engine.commands import PolicyResult, ReserveResult, StockResult
from server.engine.errors import ErrorKind
from server.engine.model import ReservationState
from server.engine.policy import ControlKind

US_PER_S = 1_000_000

# (sku, location): one position.
At = tuple[str, str]
# (sku, channel): what one channel may take of one sku.
Pair = tuple[str, str]
# (sku, channel, group): one allocation, scoped to a location group ("" for every
# location).
AllocationKey = tuple[str, str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class LineView:
    sku: str
    location: str
    quantity_reserved: int
    quantity_held: int
    quantity_fulfilled: int
    quantity_released: int


@dataclasses.dataclass(frozen=True, slots=True)
class ReservationView:
    channel: str
    order_ref: str
    state: ReservationState
    lines: tuple[LineView, ...]
    created_us: int
    updated_us: int
    # Zero unless the reservation is a pending hold.
    expires_us: int


@dataclasses.dataclass(frozen=True, slots=True)
class PositionView:
    on_hand: int
    held: int
    available_to_sell: int


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelView:
    """One position as a channel sees it ("" for no channel)."""

    safety_stock: int
    buffer: int
    available_to_sell: int


@dataclasses.dataclass(frozen=True, slots=True)
class SetBy:
    """Who made a policy setting, under which change id, and when."""

    actor: str
    change_id: str
    at_us: int


@dataclasses.dataclass(frozen=True, slots=True)
class ControlView:
    """A continuity control; only the fields its kind uses are set."""

    kind: ControlKind
    channel: str
    sku: str
    location: str
    units: int
    percent: int
    rate_per_s: int
    until_us: int
    reason: str
    set_by: SetBy

    def is_active(self, now_us: int) -> bool:
        return self.set_by.at_us <= now_us < self.until_us


@dataclasses.dataclass(frozen=True, slots=True)
class PoliciesView:
    # (sku, location) -> units; sku "" is the location's default.
    safety_stock: dict[At, tuple[int, SetBy]]
    # (channel, sku) -> units; sku "" is the channel's default.
    buffers: dict[tuple[str, str], tuple[int, SetBy]]
    groups: dict[str, tuple[tuple[str, ...], SetBy]]
    # channel -> (group, allow_split)
    sourcing: dict[str, tuple[tuple[str, bool], SetBy]]
    # (sku, channel, group) -> whether the allocation is exclusive.
    allocations: dict[AllocationKey, tuple[bool, SetBy]]
    # (sku, channel, group) -> the pool of an allocation in force: the units set, less
    # the channel's fulfilments of the sku within the scope since. It may go below
    # zero when the pool was set below what the channel already held there.
    pools: dict[AllocationKey, int]
    # control id -> control; those whose time box ended stay until `in_force` hides
    # them, lifted ones are gone.
    controls: dict[str, ControlView]
    # (sku, location) -> units still expected, for every entry in force; receipts may
    # bring it to zero without removing the entry.
    inbound: dict[At, int]
    # (sku, location) -> (eta_us, who set the entry last).
    inbound_eta: dict[At, tuple[int, SetBy]]
    # Channels that may hold against inbound supply.
    preorder_channels: dict[str, SetBy]
    # The channel registry; empty while every channel name is accepted.
    channels: dict[str, SetBy]

    def in_force(self, now_us: int) -> "PoliciesView":
        """The policies as GetPolicies shows them: controls in force only."""
        return dataclasses.replace(
            self,
            controls={
                cid: c for cid, c in self.controls.items() if c.is_active(now_us)
            },
        )


@dataclasses.dataclass(frozen=True, slots=True)
class ReachView:
    """What one channel could take of one sku now, in one request that may split, as
    GetAvailability shows it for some locations (or every location)."""

    reach: int
    # Units its allocations of the sku have left, summed over their scopes; None
    # when it has none.
    allocation_left: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class AtRiskView:
    """One reservation that on-hand no longer covers in full, as the at-risk listing
    shows it."""

    reservation_id: str
    reservation: ReservationView
    # (sku, location, units not covered), in (sku, location) order: the order of one
    # reservation's positions is not part of the listing's contract.
    uncovered: tuple[tuple[str, str, int], ...]


ModelResult = ReserveResult | ReservationView | StockResult | PolicyResult


@dataclasses.dataclass(frozen=True, slots=True)
class Answered:
    result: ModelResult
    replayed: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Refused:
    kind: ErrorKind
    reason: str


Outcome = Answered | Refused
