"""Commands the engine accepts, how they are checked, and what they answer.

Every command is a frozen value. `validate` raises InvalidArgument naming the field in
the contract's own terms (`lines[2].quantity`), so the gRPC edge can pass the path on in
a google.rpc.ErrorInfo without translating it. Results serialise to JSON for the request
log, which is how a retry after a restart gets the same answer.
"""

import dataclasses
import enum
import hashlib
from typing import Any

from server.engine.errors import InvalidArgument
from server.engine.limits import Limits
from server.engine.model import Reservation
from server.engine.policy import ControlKind

# Ids are printable ASCII without spaces: they travel through URLs, CSV exports and
# ERP fields.


@dataclasses.dataclass(frozen=True, slots=True)
class ReserveLine:
    sku: str
    quantity: int
    location: str = ""
    locations: tuple[str, ...] = ()
    allow_split: bool = False

    @property
    def candidates(self) -> tuple[str, ...]:
        return (self.location,) if self.location else self.locations


@dataclasses.dataclass(frozen=True, slots=True)
class Reserve:
    request_id: str
    channel: str
    lines: tuple[ReserveLine, ...]
    order_ref: str = ""
    ttl_s: int = 0
    allow_partial: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class LineQuantity:
    sku: str
    location: str
    quantity: int


@dataclasses.dataclass(frozen=True, slots=True)
class Confirm:
    request_id: str
    reservation_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class Release:
    request_id: str
    reservation_id: str
    lines: tuple[LineQuantity, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Fulfill:
    request_id: str
    reservation_id: str
    lines: tuple[LineQuantity, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Move:
    """Move held units of one sku to another location (an order re-sourced to a
    store for pickup), all or nothing."""

    request_id: str
    reservation_id: str
    sku: str
    from_location: str
    to_location: str
    quantity: int


@dataclasses.dataclass(frozen=True, slots=True)
class Extend:
    request_id: str
    reservation_id: str
    ttl_s: int


class AdjustmentReason(enum.Enum):
    RECEIPT = "receipt"
    POS_SALE = "pos_sale"
    COUNT_CORRECTION = "count_correction"
    DAMAGE = "damage"
    RETURN_TO_STOCK = "return_to_stock"
    TRANSFER = "transfer"


@dataclasses.dataclass(frozen=True, slots=True)
class Adjustment:
    sku: str
    location: str
    delta: int
    reason: AdjustmentReason | None


@dataclasses.dataclass(frozen=True, slots=True)
class AdjustStock:
    source: str
    source_event_id: str
    adjustments: tuple[Adjustment, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class OnHandCount:
    sku: str
    location: str
    on_hand: int


@dataclasses.dataclass(frozen=True, slots=True)
class SetOnHand:
    source: str
    source_event_id: str
    counts: tuple[OnHandCount, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class SafetyLevel:
    # Empty: the location's default for every sku without a level of its own.
    sku: str
    location: str
    units: int


@dataclasses.dataclass(frozen=True, slots=True)
class SetSafetyStock:
    actor: str
    change_id: str
    levels: tuple[SafetyLevel, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class BufferLevel:
    channel: str
    # Empty: the channel's default for every sku without a buffer of its own.
    sku: str
    units: int


@dataclasses.dataclass(frozen=True, slots=True)
class SetChannelBuffer:
    actor: str
    change_id: str
    buffers: tuple[BufferLevel, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class SetLocationGroup:
    actor: str
    change_id: str
    name: str
    # In priority order; empty removes the group.
    locations: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class SetChannelSourcing:
    actor: str
    change_id: str
    channel: str
    # Empty removes the channel's default.
    group: str
    allow_split: bool


@dataclasses.dataclass(frozen=True, slots=True)
class AllocationLevel:
    sku: str
    channel: str
    # The pool: units the channel may hold or sell from now on; 0 removes it.
    units: int
    # Ring-fenced: other channels cannot take the pool's remaining units.
    exclusive: bool
    # The scope: a location group, or "" for every location.
    group: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class SetChannelAllocation:
    actor: str
    change_id: str
    allocations: tuple[AllocationLevel, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class SetControl:
    """A time-boxed continuity control; its id is "<actor>:<change_id>"."""

    actor: str
    change_id: str
    kind: ControlKind | None
    channel: str
    sku: str
    location: str
    units: int
    percent: int
    rate_per_s: int
    until_us: int
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class LiftControl:
    """End a continuity control before its time box does."""

    actor: str
    change_id: str
    control_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class InboundSupply:
    sku: str
    location: str
    # Units expected; 0 removes the entry.
    units: int
    eta_us: int


@dataclasses.dataclass(frozen=True, slots=True)
class SetInboundSupply:
    actor: str
    change_id: str
    supplies: tuple[InboundSupply, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class SetChannelPreorders:
    """Whether a channel may hold against inbound supply."""

    actor: str
    change_id: str
    channel: str
    allowed: bool


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelEntry:
    channel: str
    # False takes the channel out of the registry.
    registered: bool


@dataclasses.dataclass(frozen=True, slots=True)
class SetChannels:
    """Changes to the channel registry. While it is empty every channel name is
    accepted; once it names any, only those may reserve or be named by policies."""

    actor: str
    change_id: str
    channels: tuple[ChannelEntry, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelHeld:
    channel: str
    held: int


@dataclasses.dataclass(frozen=True, slots=True)
class ErpCount:
    """One position as an ERP snapshot counts it: on-hand, and optionally held per
    channel."""

    sku: str
    location: str
    on_hand: int
    held_by_channel: tuple[ChannelHeld, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Divergence:
    """One figure compared between stockward and an ERP snapshot.

    `stockward` is the durable figure at the cut, `erp` the snapshot's, `erp_unseen`
    what the ERP had not booked by then. The channel is empty for on-hand.
    """

    sku: str
    location: str
    channel: str
    stockward: int
    erp: int
    erp_unseen: int
    observed_us: int
    corrected: bool = False

    @property
    def difference(self) -> int:
        return self.stockward - (self.erp + self.erp_unseen)

    def to_json(self) -> list[Any]:
        return [
            self.sku,
            self.location,
            self.channel,
            self.stockward,
            self.erp,
            self.erp_unseen,
            self.observed_us,
            self.corrected,
        ]


@dataclasses.dataclass(frozen=True, slots=True)
class ReconcileOnHand:
    """An ERP snapshot compared with stockward, and corrected for if asked.

    The server fills `findings` between its durable cut and the decision; they are
    left out of the fingerprint (repr=False), which covers only what the caller sent.
    """

    source: str
    source_event_id: str
    counts: tuple[ErpCount, ...]
    # As the caller sent them; validated and parsed by the server before deciding.
    erp_applied_batch_ids: tuple[str, ...]
    apply_correction: bool
    findings: tuple[Divergence, ...] = dataclasses.field(default=(), repr=False)


ReservationCommand = Confirm | Release | Fulfill | Extend | Move
StockCommand = AdjustStock | SetOnHand
# Commands idempotent on (source, source_event_id).
SourcedCommand = AdjustStock | SetOnHand | ReconcileOnHand
PolicyCommand = (
    SetSafetyStock
    | SetChannelBuffer
    | SetLocationGroup
    | SetChannelSourcing
    | SetChannelAllocation
    | SetControl
    | LiftControl
    | SetInboundSupply
    | SetChannelPreorders
    | SetChannels
)
Command = Reserve | ReservationCommand | SourcedCommand | PolicyCommand


# Results ------------------------------------------------------------------------------


class ShortReason(enum.Enum):
    INSUFFICIENT_STOCK = "insufficient_stock"
    UNKNOWN_SKU = "unknown_sku"
    UNKNOWN_LOCATION = "unknown_location"
    OTHER_LINE_SHORT = "other_line_short"
    CHANNEL_ALLOCATION_EXHAUSTED = "channel_allocation_exhausted"
    CHANNEL_SUPPRESSED = "channel_suppressed"


class ReserveOutcome(enum.Enum):
    RESERVED = "reserved"
    PARTIALLY_RESERVED = "partially_reserved"
    REJECTED = "rejected"


@dataclasses.dataclass(frozen=True, slots=True)
class LineResult:
    line_index: int
    sku: str
    quantity_requested: int
    quantity_held: int
    held_at: tuple[tuple[str, int], ...]
    short_reason: ShortReason | None
    quantity_available: int


@dataclasses.dataclass(frozen=True, slots=True)
class ReserveResult:
    reservation_id: str
    outcome: ReserveOutcome
    lines: tuple[LineResult, ...]
    expires_us: int
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "reserve",
            "id": self.reservation_id,
            "outcome": self.outcome.value,
            "expires_us": self.expires_us,
            "lines": [
                [
                    line.line_index,
                    line.sku,
                    line.quantity_requested,
                    line.quantity_held,
                    [list(pair) for pair in line.held_at],
                    line.short_reason.value if line.short_reason else None,
                    line.quantity_available,
                ]
                for line in self.lines
            ],
        }


@dataclasses.dataclass(frozen=True, slots=True)
class ReservationResult:
    """The reservation as it stands after a Confirm, Release, Fulfill or Extend."""

    reservation: Reservation
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"type": "reservation", "reservation": self.reservation.to_json()}


@dataclasses.dataclass(frozen=True, slots=True)
class PositionSnapshot:
    sku: str
    location: str
    on_hand: int
    held: int
    available_to_sell: int


@dataclasses.dataclass(frozen=True, slots=True)
class StockResult:
    positions: tuple[PositionSnapshot, ...]
    replayed: bool = False
    # ERP snapshots only: what the comparison found, per count and channel figure.
    divergences: tuple[Divergence, ...] = ()

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": "stock",
            "positions": [dataclasses.astuple(p) for p in self.positions],
        }
        # Only when there are any, so that plain counts store what they always did.
        if self.divergences:
            body["divergences"] = [d.to_json() for d in self.divergences]
        return body


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyResult:
    # The continuity control a SetControl made; empty otherwise.
    control_id: str = ""
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"type": "policy", "control_id": self.control_id}


Result = ReserveResult | ReservationResult | StockResult | PolicyResult


def result_from_json(body: dict[str, Any], *, replayed: bool) -> Result:
    """Rebuild a stored answer; `replayed` marks it as the answer to a retry."""
    if body["type"] == "reserve":
        lines = tuple(
            LineResult(
                line_index=index,
                sku=sku,
                quantity_requested=requested,
                quantity_held=held,
                held_at=tuple((location, qty) for location, qty in held_at),
                short_reason=ShortReason(reason) if reason else None,
                quantity_available=available,
            )
            for index, sku, requested, held, held_at, reason, available in body["lines"]
        )
        return ReserveResult(
            reservation_id=body["id"],
            outcome=ReserveOutcome(body["outcome"]),
            lines=lines,
            expires_us=body["expires_us"],
            replayed=replayed,
        )
    if body["type"] == "reservation":
        reservation = Reservation.from_json(body["reservation"])
        return ReservationResult(reservation=reservation, replayed=replayed)
    if body["type"] == "policy":
        return PolicyResult(control_id=body.get("control_id", ""), replayed=replayed)
    if body["type"] == "stock":
        positions = tuple(PositionSnapshot(*fields) for fields in body["positions"])
        divergences = tuple(
            Divergence(*fields) for fields in body.get("divergences", ())
        )
        return StockResult(
            positions=positions, replayed=replayed, divergences=divergences
        )
    raise ValueError(f"unknown stored result type {body['type']!r}")


def fingerprint(command: Command) -> str:
    """What a retry must repeat exactly: the command without its idempotency key.

    The dataclass repr lists every field in declaration order, so it is stable across
    processes and releases as long as the command's fields do not change.
    """
    if isinstance(command, SourcedCommand):
        keyless: Command = dataclasses.replace(command, source_event_id="")
    elif isinstance(command, PolicyCommand):
        keyless = dataclasses.replace(command, change_id="")
    else:
        keyless = dataclasses.replace(command, request_id="")
    return hashlib.blake2b(repr(keyless).encode(), digest_size=16).hexdigest()


# Validation ---------------------------------------------------------------------------


def check_id(value: str, *, field: str, length_max: int, required: bool = True) -> None:
    if not value:
        if required:
            raise InvalidArgument("FIELD_REQUIRED", f"{field} is required", field=field)
        return
    _check_length(value, field=field, length_max=length_max)
    # str methods run in C: printable ASCII without spaces, without a Python loop.
    if not (value.isascii() and value.isprintable()) or " " in value:
        raise InvalidArgument(
            "FIELD_MALFORMED",
            f"{field} must be printable ASCII without spaces",
            field=field,
        )


def check_text(value: str, *, field: str, length_max: int) -> None:
    """Free text for people (a reason): required, bounded, no control characters."""
    if not value.strip():
        raise InvalidArgument("FIELD_REQUIRED", f"{field} is required", field=field)
    _check_length(value, field=field, length_max=length_max)
    if not value.isprintable():
        raise InvalidArgument(
            "FIELD_MALFORMED",
            f"{field} must not contain control characters",
            field=field,
        )


def _check_length(value: str, *, field: str, length_max: int) -> None:
    if len(value) > length_max:
        raise InvalidArgument(
            "FIELD_TOO_LONG",
            f"{field} is {len(value)} characters; at most {length_max} are allowed",
            field=field,
        )


def check_quantity(value: int, *, field: str, quantity_max: int) -> None:
    if not 0 < value <= quantity_max:
        raise InvalidArgument(
            "QUANTITY_OUT_OF_RANGE",
            f"{field} is {value}; it must be from 1 to {quantity_max}",
            field=field,
        )


def check_count(
    count: int, *, field: str, count_max: int, required: bool = True
) -> None:
    """A list's length: at most count_max, and not empty unless optional."""
    if count == 0 and required:
        raise InvalidArgument(
            "FIELD_REQUIRED", f"{field} must not be empty", field=field
        )
    if count > count_max:
        raise InvalidArgument(
            "TOO_MANY_ITEMS",
            f"{field} has {count} items; at most {count_max} are allowed",
            field=field,
        )


def check_ttl(ttl_s: int, *, field: str, limits: Limits, zero_ok: bool) -> None:
    if ttl_s == 0 and zero_ok:
        return
    if not limits.ttl_min_s <= ttl_s <= limits.ttl_max_s:
        raise InvalidArgument(
            "TTL_OUT_OF_RANGE",
            f"{field} is {ttl_s}; it must be from {limits.ttl_min_s} "
            f"to {limits.ttl_max_s} seconds",
            field=field,
        )


def validate_reserve(command: Reserve, limits: Limits) -> None:
    check_id(
        command.request_id, field="request_id", length_max=limits.request_id_length_max
    )
    check_id(command.channel, field="channel", length_max=limits.channel_length_max)
    check_id(
        command.order_ref,
        field="order_ref",
        length_max=limits.order_ref_length_max,
        required=False,
    )
    check_ttl(command.ttl_s, field="ttl_seconds", limits=limits, zero_ok=True)
    check_count(
        len(command.lines), field="lines", count_max=limits.lines_per_reservation_max
    )
    for index, line in enumerate(command.lines):
        validate_reserve_line(line, field=f"lines[{index}]", limits=limits)


def validate_reserve_line(line: ReserveLine, *, field: str, limits: Limits) -> None:
    check_id(line.sku, field=f"{field}.sku", length_max=limits.sku_length_max)
    check_quantity(
        line.quantity, field=f"{field}.quantity", quantity_max=limits.quantity_max
    )
    if line.location and line.locations:
        raise InvalidArgument(
            "LOCATION_AMBIGUOUS",
            f"{field} sets both location and locations; set one",
            field=f"{field}.location",
        )
    if line.allow_split and not line.locations:
        raise InvalidArgument(
            "SPLIT_NEEDS_LOCATIONS",
            f"{field}.allow_split needs a locations preference list",
            field=f"{field}.allow_split",
        )
    check_count(
        len(line.locations),
        field=f"{field}.locations",
        count_max=limits.locations_per_line_max,
        required=False,
    )
    for index, location in enumerate(line.candidates):
        path = f"{field}.location" if line.location else f"{field}.locations[{index}]"
        check_id(location, field=path, length_max=limits.location_length_max)
    if len(set(line.candidates)) != len(line.candidates):
        raise InvalidArgument(
            "DUPLICATE_LOCATION",
            f"{field}.locations names a location twice",
            field=f"{field}.locations",
        )


def validate_reservation_command(command: ReservationCommand, limits: Limits) -> None:
    check_id(
        command.request_id, field="request_id", length_max=limits.request_id_length_max
    )
    check_id(
        command.reservation_id,
        field="reservation_id",
        length_max=limits.reservation_id_length_max,
    )
    if isinstance(command, Extend):
        check_ttl(command.ttl_s, field="ttl_seconds", limits=limits, zero_ok=False)
    if isinstance(command, Move):
        check_id(command.sku, field="sku", length_max=limits.sku_length_max)
        for name in ("from_location", "to_location"):
            check_id(
                getattr(command, name),
                field=name,
                length_max=limits.location_length_max,
            )
        if command.from_location == command.to_location:
            raise InvalidArgument(
                "SAME_LOCATION",
                "from_location and to_location are the same",
                field="to_location",
            )
        check_quantity(
            command.quantity, field="quantity", quantity_max=limits.quantity_max
        )
    if isinstance(command, Release | Fulfill):
        check_count(
            len(command.lines),
            field="lines",
            count_max=limits.lines_per_reservation_max,
            required=False,
        )
        for index, line in enumerate(command.lines):
            field = f"lines[{index}]"
            check_id(line.sku, field=f"{field}.sku", length_max=limits.sku_length_max)
            check_id(
                line.location,
                field=f"{field}.location",
                length_max=limits.location_length_max,
            )
            check_quantity(
                line.quantity,
                field=f"{field}.quantity",
                quantity_max=limits.quantity_max,
            )


def validate_stock_command(command: StockCommand, limits: Limits) -> None:
    check_id(command.source, field="source", length_max=limits.source_length_max)
    check_id(
        command.source_event_id,
        field="source_event_id",
        length_max=limits.request_id_length_max,
    )
    if isinstance(command, AdjustStock):
        _validate_adjustments(command, limits)
    else:
        _validate_counts(command, limits)


def _validate_adjustments(command: AdjustStock, limits: Limits) -> None:
    check_count(
        len(command.adjustments),
        field="adjustments",
        count_max=limits.adjustments_per_request_max,
    )
    for index, adjustment in enumerate(command.adjustments):
        field = f"adjustments[{index}]"
        _check_position_ids(adjustment.sku, adjustment.location, field, limits)
        if adjustment.delta == 0 or abs(adjustment.delta) > limits.on_hand_max:
            raise InvalidArgument(
                "DELTA_OUT_OF_RANGE",
                f"{field}.delta is {adjustment.delta}; it must be non-zero and at most "
                f"{limits.on_hand_max} either way",
                field=f"{field}.delta",
            )
        if adjustment.reason is None:
            raise InvalidArgument(
                "FIELD_REQUIRED",
                f"{field}.reason is required",
                field=f"{field}.reason",
            )


def _validate_counts(command: SetOnHand, limits: Limits) -> None:
    check_count(
        len(command.counts),
        field="counts",
        count_max=limits.adjustments_per_request_max,
    )
    seen: set[tuple[str, str]] = set()
    for index, count in enumerate(command.counts):
        field = f"counts[{index}]"
        _check_position_ids(count.sku, count.location, field, limits)
        if not 0 <= count.on_hand <= limits.on_hand_max:
            raise InvalidArgument(
                "ON_HAND_OUT_OF_RANGE",
                f"{field}.on_hand is {count.on_hand}; it must be from 0 "
                f"to {limits.on_hand_max}",
                field=f"{field}.on_hand",
            )
        if (count.sku, count.location) in seen:
            raise InvalidArgument(
                "DUPLICATE_POSITION",
                f"{field} counts {count.sku}@{count.location} a second time",
                field=field,
            )
        seen.add((count.sku, count.location))


def validate_reconcile(command: ReconcileOnHand, limits: Limits) -> None:
    """The counts of an ERP snapshot; its batch ids are checked by the server, which
    knows the streams."""
    check_id(command.source, field="source", length_max=limits.source_length_max)
    check_id(
        command.source_event_id,
        field="source_event_id",
        length_max=limits.request_id_length_max,
    )
    plain = SetOnHand(
        source=command.source,
        source_event_id=command.source_event_id,
        counts=tuple(OnHandCount(c.sku, c.location, c.on_hand) for c in command.counts),
    )
    _validate_counts(plain, limits)
    for index, count in enumerate(command.counts):
        _validate_channel_held(count, field=f"counts[{index}]", limits=limits)


def _validate_channel_held(count: ErpCount, *, field: str, limits: Limits) -> None:
    check_count(
        len(count.held_by_channel),
        field=f"{field}.held_by_channel",
        count_max=limits.channels_per_count_max,
        required=False,
    )
    seen: set[str] = set()
    for index, item in enumerate(count.held_by_channel):
        path = f"{field}.held_by_channel[{index}]"
        check_id(
            item.channel, field=f"{path}.channel", length_max=limits.channel_length_max
        )
        _check_units(item.held, field=f"{path}.held", limits=limits)
        if item.channel in seen:
            raise InvalidArgument(
                "DUPLICATE_CHANNEL",
                f"{path} names channel {item.channel} a second time",
                field=f"{path}.channel",
            )
        seen.add(item.channel)


def _check_position_ids(sku: str, location: str, field: str, limits: Limits) -> None:
    check_id(sku, field=f"{field}.sku", length_max=limits.sku_length_max)
    check_id(location, field=f"{field}.location", length_max=limits.location_length_max)


def validate_policy_command(command: PolicyCommand, limits: Limits) -> None:
    check_id(command.actor, field="actor", length_max=limits.source_length_max)
    check_id(
        command.change_id, field="change_id", length_max=limits.request_id_length_max
    )
    if isinstance(command, SetSafetyStock):
        _validate_safety_levels(command, limits)
    elif isinstance(command, SetChannelBuffer):
        _validate_buffers(command, limits)
    elif isinstance(command, SetLocationGroup):
        _validate_group(command, limits)
    elif isinstance(command, SetChannelAllocation):
        _validate_allocations(command, limits)
    elif isinstance(command, SetControl):
        _validate_control(command, limits)
    elif isinstance(command, SetInboundSupply):
        _validate_inbound(command, limits)
    elif isinstance(command, SetChannelPreorders):
        check_id(command.channel, field="channel", length_max=limits.channel_length_max)
    elif isinstance(command, SetChannels):
        _validate_channels(command, limits)
    elif isinstance(command, LiftControl):
        check_id(
            command.control_id,
            field="control_id",
            length_max=limits.source_length_max + limits.request_id_length_max + 1,
        )
    else:
        check_id(
            command.channel,
            field="sourcing.channel",
            length_max=limits.channel_length_max,
        )
        check_id(
            command.group,
            field="sourcing.location_group",
            length_max=limits.location_length_max,
            required=False,
        )


def _check_units(units: int, *, field: str, limits: Limits) -> None:
    if not 0 <= units <= limits.on_hand_max:
        raise InvalidArgument(
            "UNITS_OUT_OF_RANGE",
            f"{field} is {units}; it must be from 0 to {limits.on_hand_max}",
            field=field,
        )


def _validate_safety_levels(command: SetSafetyStock, limits: Limits) -> None:
    check_count(
        len(command.levels),
        field="levels",
        count_max=limits.adjustments_per_request_max,
    )
    seen: set[tuple[str, str]] = set()
    for index, level in enumerate(command.levels):
        field = f"levels[{index}]"
        check_id(
            level.sku,
            field=f"{field}.sku",
            length_max=limits.sku_length_max,
            required=False,
        )
        check_id(
            level.location,
            field=f"{field}.location",
            length_max=limits.location_length_max,
        )
        _check_units(level.units, field=f"{field}.quantity", limits=limits)
        if (level.sku, level.location) in seen:
            raise InvalidArgument(
                "DUPLICATE_POSITION",
                f"{field} sets {level.sku or 'the default'}@{level.location} twice",
                field=field,
            )
        seen.add((level.sku, level.location))


def _validate_buffers(command: SetChannelBuffer, limits: Limits) -> None:
    check_count(
        len(command.buffers),
        field="buffers",
        count_max=limits.adjustments_per_request_max,
    )
    seen: set[tuple[str, str]] = set()
    for index, buffer in enumerate(command.buffers):
        field = f"buffers[{index}]"
        check_id(
            buffer.channel,
            field=f"{field}.channel",
            length_max=limits.channel_length_max,
        )
        check_id(
            buffer.sku,
            field=f"{field}.sku",
            length_max=limits.sku_length_max,
            required=False,
        )
        _check_units(buffer.units, field=f"{field}.quantity", limits=limits)
        if (buffer.channel, buffer.sku) in seen:
            raise InvalidArgument(
                "DUPLICATE_BUFFER",
                f"{field} sets {buffer.channel}/{buffer.sku or 'default'} twice",
                field=field,
            )
        seen.add((buffer.channel, buffer.sku))


def _validate_group(command: SetLocationGroup, limits: Limits) -> None:
    check_id(command.name, field="group.name", length_max=limits.location_length_max)
    check_count(
        len(command.locations),
        field="group.locations",
        count_max=limits.locations_per_line_max,
        required=False,
    )
    for index, location in enumerate(command.locations):
        check_id(
            location,
            field=f"group.locations[{index}]",
            length_max=limits.location_length_max,
        )
    if len(set(command.locations)) != len(command.locations):
        raise InvalidArgument(
            "DUPLICATE_LOCATION",
            "group.locations names a location twice",
            field="group.locations",
        )


def _validate_channels(command: SetChannels, limits: Limits) -> None:
    check_count(
        len(command.channels),
        field="channels",
        count_max=limits.adjustments_per_request_max,
    )
    seen: set[str] = set()
    for index, entry in enumerate(command.channels):
        field = f"channels[{index}].channel"
        check_id(entry.channel, field=field, length_max=limits.channel_length_max)
        if entry.channel in seen:
            raise InvalidArgument(
                "DUPLICATE_CHANNEL",
                f"{field} names {entry.channel} twice in one request",
                field=field,
            )
        seen.add(entry.channel)


def _validate_allocations(command: SetChannelAllocation, limits: Limits) -> None:
    check_count(
        len(command.allocations),
        field="allocations",
        count_max=limits.adjustments_per_request_max,
    )
    seen: set[tuple[str, str, str]] = set()
    for index, level in enumerate(command.allocations):
        field = f"allocations[{index}]"
        check_id(level.sku, field=f"{field}.sku", length_max=limits.sku_length_max)
        check_id(
            level.channel,
            field=f"{field}.channel",
            length_max=limits.channel_length_max,
        )
        if level.group:
            check_id(
                level.group,
                field=f"{field}.location_group",
                length_max=limits.location_length_max,
            )
        _check_units(level.units, field=f"{field}.quantity", limits=limits)
        if (level.sku, level.channel, level.group) in seen:
            raise InvalidArgument(
                "DUPLICATE_ALLOCATION",
                f"{field} sets {level.channel}'s allocation of {level.sku} twice",
                field=field,
            )
        seen.add((level.sku, level.channel, level.group))


def _validate_control(command: SetControl, limits: Limits) -> None:
    if command.kind is None:
        raise InvalidArgument(
            "FIELD_REQUIRED", "control.kind is required", field="control.kind"
        )
    check_text(
        command.reason, field="control.reason", length_max=limits.reason_length_max
    )
    if command.kind is ControlKind.RAISE_SAFETY:
        check_id(
            command.sku,
            field="control.sku",
            length_max=limits.sku_length_max,
            required=False,
        )
        check_id(
            command.location,
            field="control.location",
            length_max=limits.location_length_max,
            required=False,
        )
        _check_units(command.units, field="control.safety_units", limits=limits)
        if not 0 <= command.percent <= 100:
            raise InvalidArgument(
                "PERCENT_OUT_OF_RANGE",
                f"control.safety_percent is {command.percent}; it must be from 0 to 100",
                field="control.safety_percent",
            )
        if not command.units and not command.percent:
            raise InvalidArgument(
                "FIELD_REQUIRED",
                "a safety stock raise needs safety_units or safety_percent",
                field="control.safety_units",
            )
        return
    check_id(
        command.channel, field="control.channel", length_max=limits.channel_length_max
    )
    if command.kind is ControlKind.SUPPRESS:
        check_id(
            command.sku,
            field="control.sku",
            length_max=limits.sku_length_max,
            required=False,
        )
        return
    if not 0 < command.rate_per_s <= limits.throttle_rate_max_per_s:
        raise InvalidArgument(
            "RATE_OUT_OF_RANGE",
            f"control.reservations_per_second is {command.rate_per_s}; it must be from 1 "
            f"to {limits.throttle_rate_max_per_s}",
            field="control.reservations_per_second",
        )


def _validate_inbound(command: SetInboundSupply, limits: Limits) -> None:
    check_count(
        len(command.supplies),
        field="supplies",
        count_max=limits.adjustments_per_request_max,
    )
    seen: set[tuple[str, str]] = set()
    for index, supply in enumerate(command.supplies):
        field = f"supplies[{index}]"
        _check_position_ids(supply.sku, supply.location, field, limits)
        _check_units(supply.units, field=f"{field}.quantity", limits=limits)
        if supply.units and supply.eta_us <= 0:
            raise InvalidArgument(
                "FIELD_REQUIRED", f"{field}.eta is required", field=f"{field}.eta"
            )
        if (supply.sku, supply.location) in seen:
            raise InvalidArgument(
                "DUPLICATE_POSITION",
                f"{field} sets {supply.sku}@{supply.location} twice",
                field=field,
            )
        seen.add((supply.sku, supply.location))
