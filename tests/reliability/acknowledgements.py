"""What the clients were told, and which later states those answers still allow.

Design note. A crash test may only hold the server to what it acknowledged. Every
answer a client received is recorded here: the state each reservation was last
acknowledged in, the stock adjustments acknowledged, and the commands whose outcome
stayed unknown (the answer was lost and no retry got one). A reservation whose change
was lost is left alone by its client afterwards, so at most one unknown change sits on
top of its last acknowledged state.

The legal final states are worked out by a small reference model written from the
contract (types.proto): the acknowledged state, that state after the lost change, and
either of those expired if still pending. It knows nothing of shards or records.
"""

import asyncio
import collections
import dataclasses

from stockward.v1 import admin_pb2, inventory_pb2, types_pb2

# (sku, location): one position.
At = tuple[str, str]

PENDING = types_pb2.RESERVATION_STATE_PENDING
CONFIRMED = types_pb2.RESERVATION_STATE_CONFIRMED
FULFILLED = types_pb2.RESERVATION_STATE_FULFILLED
RELEASED = types_pb2.RESERVATION_STATE_RELEASED
EXPIRED = types_pb2.RESERVATION_STATE_EXPIRED
ACTIVE_STATES = frozenset({PENDING, CONFIRMED})


@dataclasses.dataclass(frozen=True, slots=True)
class LineView:
    sku: str
    location: str
    reserved: int
    held: int
    fulfilled: int
    released: int


@dataclasses.dataclass(frozen=True, slots=True)
class ReservationView:
    """A reservation without its timestamps: what must survive a crash exactly."""

    state: "types_pb2.ReservationState.ValueType"
    lines: tuple[LineView, ...]

    @classmethod
    def of(cls, message: types_pb2.Reservation) -> "ReservationView":
        lines = (
            LineView(
                sku=line.sku,
                location=line.location,
                reserved=line.quantity_reserved,
                held=line.quantity_held,
                fulfilled=line.quantity_fulfilled,
                released=line.quantity_released,
            )
            for line in message.lines
        )
        return cls(message.state, tuple(sorted(lines, key=_line_key)))

    @classmethod
    def reserved(cls, response: inventory_pb2.ReserveResponse) -> "ReservationView":
        """The new hold as a Reserve answer shows it; lines at one position merge."""
        held: dict[At, int] = collections.defaultdict(int)
        for line in response.lines:
            for place in line.held_at:
                held[(line.sku, place.location)] += place.quantity
        lines = (LineView(sku, loc, qty, qty, 0, 0) for (sku, loc), qty in held.items())
        return cls(PENDING, tuple(sorted(lines, key=_line_key)))

    @property
    def held(self) -> int:
        return sum(line.held for line in self.lines)

    def describe(self) -> str:
        name = types_pb2.ReservationState.Name(self.state)
        lines = " ".join(
            f"{x.sku}@{x.location}:r{x.reserved}/h{x.held}/f{x.fulfilled}/x{x.released}"
            for x in self.lines
        )
        return f"{name} {lines}"


def _line_key(line: LineView) -> At:
    return (line.sku, line.location)


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """A command on one reservation. `lines` empty means everything still held."""

    kind: str  # confirm, release, fulfill or extend
    lines: tuple[tuple[str, str, int], ...] = ()


def legal_outcomes(
    acked: ReservationView, lost: Change | None
) -> list[ReservationView]:
    """Every state the reservation may be in now, given what was acknowledged."""
    candidates = [acked]
    if lost is not None:
        changed = apply_change(acked, lost)
        if changed is not None:
            candidates.append(changed)
    expired = [expire(view) for view in candidates if view.state == PENDING]
    return candidates + expired


def apply_change(view: ReservationView, change: Change) -> ReservationView | None:
    """The reservation after `change`, or None when the contract refuses it."""
    if change.kind == "confirm":
        if view.state not in ACTIVE_STATES:
            return None
        return dataclasses.replace(view, state=CONFIRMED)
    if change.kind == "extend":
        return view if view.state == PENDING else None
    if change.kind == "fulfill" and view.state != CONFIRMED:
        return None
    if view.state not in ACTIVE_STATES:
        return None
    return _give_back(view, change)


def _give_back(view: ReservationView, change: Change) -> ReservationView | None:
    amounts: dict[At, int] = collections.defaultdict(int)
    for sku, location, quantity in change.lines:
        amounts[(sku, location)] += quantity
    lines = []
    for line in view.lines:
        quantity = amounts.pop(_line_key(line), 0) if change.lines else line.held
        if quantity > line.held:
            return None
        if change.kind == "fulfill":
            after = dataclasses.replace(
                line, held=line.held - quantity, fulfilled=line.fulfilled + quantity
            )
        else:
            after = dataclasses.replace(
                line, held=line.held - quantity, released=line.released + quantity
            )
        lines.append(after)
    if amounts:
        return None
    state = view.state
    if not any(line.held for line in lines):
        state = FULFILLED if any(line.fulfilled for line in lines) else RELEASED
    return ReservationView(state, tuple(lines))


def expire(view: ReservationView) -> ReservationView:
    lines = tuple(
        dataclasses.replace(line, held=0, released=line.released + line.held)
        for line in view.lines
    )
    return ReservationView(EXPIRED, lines)


@dataclasses.dataclass(slots=True)
class Tracked:
    owner: int
    acked: ReservationView
    # Holds with a short TTL expire during the test; their extensions stay short too.
    is_short: bool
    # A change whose answer was lost; the owner then leaves the reservation alone.
    lost: Change | None = None


class Acknowledgements:
    """Shared by every client of one test; single event loop, so no locking."""

    def __init__(self, *, seed_on_hand: dict[At, int]) -> None:
        self.seed_on_hand = dict(seed_on_hand)
        self.reservations: dict[str, Tracked] = {}
        self.adjusted: dict[At, int] = collections.defaultdict(int)
        self.lost_reserves: list[inventory_pb2.ReserveRequest] = []
        self.lost_adjustments: list[admin_pb2.AdjustStockRequest] = []
        self.violations: list[str] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self._answers = 0
        self._answer_waiters: list[tuple[int, asyncio.Future[None]]] = []

    # Recording --------------------------------------------------------------------------

    def reserved(
        self,
        response: inventory_pb2.ReserveResponse,
        *,
        owner: int,
        is_short: bool,
    ) -> None:
        self._answered("reserve")
        if response.outcome == inventory_pb2.RESERVE_OUTCOME_REJECTED:
            self.counts["reserve rejected"] += 1
            return
        view = ReservationView.reserved(response)
        known = self.reservations.get(response.reservation_id)
        if known is not None and known.owner != owner:
            self.violations.append(
                f"reservation id {response.reservation_id} handed out twice"
            )
        if known is None:
            self.reservations[response.reservation_id] = Tracked(owner, view, is_short)

    def changed(
        self, reservation_id: str, message: types_pb2.Reservation, *, kind: str
    ) -> None:
        self._answered(kind)
        tracked = self.reservations[reservation_id]
        tracked.acked = ReservationView.of(message)
        tracked.lost = None

    def refused(self, kind: str, reason: str) -> None:
        self._answered(f"{kind} refused {reason}")

    def change_lost(self, reservation_id: str, change: Change) -> None:
        self.counts[f"{change.kind} lost"] += 1
        self.reservations[reservation_id].lost = change

    def adjusted_stock(self, request: admin_pb2.AdjustStockRequest) -> None:
        self._answered("adjust")
        for adjustment in request.adjustments:
            self.adjusted[(adjustment.sku, adjustment.location)] += adjustment.delta

    def violation(self, message: str) -> None:
        self.violations.append(message)

    # Progress, for killing the server after a given amount of work -----------------------

    @property
    def answers(self) -> int:
        return self._answers

    async def wait_for_answers(self, count: int) -> None:
        if self._answers >= count:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._answer_waiters.append((count, future))
        await future

    def _answered(self, kind: str) -> None:
        self.counts[kind] += 1
        self._answers += 1
        still_waiting = []
        for count, future in self._answer_waiters:
            if self._answers >= count:
                if not future.done():
                    future.set_result(None)
            else:
                still_waiting.append((count, future))
        self._answer_waiters = still_waiting
