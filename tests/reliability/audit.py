"""The end of a crash test: hold the restarted server to everything it acknowledged.

Each check returns the problems it found as sentences, so that one run reports every
broken promise at once instead of stopping at the first.
"""

import asyncio
import collections
import dataclasses

import grpc

from stockward.v1 import admin_pb2_grpc, inventory_pb2, inventory_pb2_grpc, types_pb2
from tests.reliability.acknowledgements import (
    ACTIVE_STATES,
    PENDING,
    Acknowledgements,
    At,
    ReservationView,
    legal_outcomes,
)
from tests.reliability.load import Catalogue
from tests.reliability.rpc import reason_of

# Per call; the server is idle during the audit.
CALL_TIMEOUT_S = 10.0
# ListReservations pages: the contract's maximum, so few round trips.
PAGE_SIZE = 1_000
# Far more pages than any test makes; a server handing out tokens forever fails.
PAGES_MAX = 1_000
# GetReservation calls in flight at once.
READS_IN_FLIGHT_MAX = 32
# Short holds outlive their last extension by at most a few seconds. The child server
# runs on the real clock, so this waits in real time, checking every quarter second.
DUE_WAIT_S = 20.0
DUE_POLL_S = 0.25
# A hold expiring later than this from now cannot expire during the audit.
QUIET_HORIZON_S = 120
US_PER_S = 1_000_000


@dataclasses.dataclass(frozen=True, slots=True)
class PositionView:
    on_hand: int
    held: int
    available_to_sell: int


class Auditor:
    def __init__(
        self,
        *,
        channel: grpc.aio.Channel,
        acks: Acknowledgements,
        catalogue: Catalogue,
    ) -> None:
        self._inventory = inventory_pb2_grpc.InventoryServiceStub(channel)
        self._admin = admin_pb2_grpc.StockAdminServiceStub(channel)
        self._acks = acks
        self._catalogue = catalogue

    async def audit(self) -> list[str]:
        problems = await self.wait_until_no_hold_can_expire()
        listed = await self.list_reservations()
        positions = await self.availability()
        problems += await self.check_acknowledged_reservations()
        problems += check_positions(listed, positions)

        replayed_ids, resolve_problems = await self.resolve_lost_reserves()
        problems += resolve_problems
        problems += self.check_every_reservation_was_acknowledged(listed, replayed_ids)
        problems += await self.resolve_lost_adjustments()
        problems += self.check_on_hand(listed, await self.availability())
        return problems

    # Reads ------------------------------------------------------------------------------

    async def now_us(self) -> int:
        answer = await self._inventory.GetAvailability(
            inventory_pb2.GetAvailabilityRequest(skus=self._catalogue.skus[:1]),
            timeout=CALL_TIMEOUT_S,
        )
        return int(answer.as_of.ToMicroseconds())

    async def wait_until_no_hold_can_expire(self) -> list[str]:
        """Until no pending hold expires soon, so nothing changes during the audit."""
        for _ in range(int(DUE_WAIT_S / DUE_POLL_S)):
            now_us = await self.now_us()
            horizon_us = now_us + QUIET_HORIZON_S * US_PER_S
            pending = await self.list_reservations(state=PENDING)
            expiring = [
                r
                for r in pending.values()
                if r.expires_at.ToMicroseconds() <= horizon_us
            ]
            if not expiring:
                return []
            await asyncio.sleep(DUE_POLL_S)
        overdue = [r for r in expiring if r.expires_at.ToMicroseconds() < now_us]
        return [
            f"{len(overdue)} pending holds still not expired {DUE_WAIT_S}s after the "
            f"load, e.g. {overdue[0].reservation_id if overdue else '-'}"
        ]

    async def list_reservations(
        self,
        *,
        state: types_pb2.ReservationState.ValueType = (
            types_pb2.RESERVATION_STATE_UNSPECIFIED
        ),
    ) -> dict[str, types_pb2.Reservation]:
        listed: dict[str, types_pb2.Reservation] = {}
        token = ""
        for _ in range(PAGES_MAX):
            page = await self._inventory.ListReservations(
                inventory_pb2.ListReservationsRequest(
                    state=state, page_size=PAGE_SIZE, page_token=token
                ),
                timeout=CALL_TIMEOUT_S,
            )
            for reservation in page.reservations:
                assert reservation.reservation_id not in listed, "listed twice"
                listed[reservation.reservation_id] = reservation
            token = page.next_page_token
            if not token:
                return listed
        raise AssertionError(f"ListReservations still paging after {PAGES_MAX} pages")

    async def availability(self) -> dict[At, PositionView]:
        answer = await self._inventory.GetAvailability(
            inventory_pb2.GetAvailabilityRequest(skus=self._catalogue.skus),
            timeout=CALL_TIMEOUT_S,
        )
        positions = {}
        for sku in answer.skus:
            for place in sku.locations:
                stock = place.availability
                positions[(sku.sku, place.location)] = PositionView(
                    stock.on_hand, stock.held, stock.available_to_sell
                )
        return positions

    # Checks -----------------------------------------------------------------------------

    async def check_acknowledged_reservations(self) -> list[str]:
        """Each acknowledged reservation is in its last acknowledged state or a legal
        later one; in particular nothing acknowledged as finished holds anything."""
        limit = asyncio.Semaphore(READS_IN_FLIGHT_MAX)

        async def check(reservation_id: str) -> str | None:
            async with limit:
                return await self._check_reservation(reservation_id)

        found = await asyncio.gather(*(check(rid) for rid in self._acks.reservations))
        return [problem for problem in found if problem is not None]

    async def _check_reservation(self, reservation_id: str) -> str | None:
        tracked = self._acks.reservations[reservation_id]
        try:
            answer = await self._inventory.GetReservation(
                inventory_pb2.GetReservationRequest(reservation_id=reservation_id),
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as error:
            return (
                f"{reservation_id}: acknowledged as {tracked.acked.describe()}, "
                f"now {error.code()} {reason_of(error)}"
            )
        now = ReservationView.of(answer.reservation)
        if now in legal_outcomes(tracked.acked, tracked.lost):
            return None
        return (
            f"{reservation_id}: acknowledged as {tracked.acked.describe()} "
            f"(lost change: {tracked.lost}), now {now.describe()}"
        )

    def check_every_reservation_was_acknowledged(
        self, listed: dict[str, types_pb2.Reservation], replayed_ids: set[str]
    ) -> list[str]:
        """A reservation nobody was told about may only come from a lost answer."""
        known = set(self._acks.reservations) | replayed_ids
        return [
            f"{rid}: exists ({ReservationView.of(r).describe()}) but no Reserve made it"
            for rid, r in listed.items()
            if rid not in known
        ]

    def check_on_hand(
        self,
        listed: dict[str, types_pb2.Reservation],
        positions: dict[At, PositionView],
    ) -> list[str]:
        """On-hand is the seed plus acknowledged receipts minus what was fulfilled."""
        fulfilled: dict[At, int] = collections.defaultdict(int)
        for reservation in listed.values():
            for line in reservation.lines:
                fulfilled[(line.sku, line.location)] += line.quantity_fulfilled
        problems = []
        for at, seeded in self._acks.seed_on_hand.items():
            expected = seeded + self._acks.adjusted[at] - fulfilled[at]
            actual = positions[at].on_hand if at in positions else None
            if actual != expected:
                problems.append(
                    f"{at}: on_hand {actual}, expected {expected} (seed {seeded} + "
                    f"received {self._acks.adjusted[at]} - fulfilled {fulfilled[at]})"
                )
        return problems

    # Resolving lost answers by retrying them -------------------------------------------

    async def resolve_lost_reserves(self) -> tuple[set[str], list[str]]:
        """Send every lost Reserve again with its id: a replayed answer names the
        reservation the lost one made; a fresh one shows the first never counted."""
        replayed_ids: set[str] = set()
        problems = []
        for request in self._acks.lost_reserves:
            try:
                answer = await self._inventory.Reserve(request, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                problems.append(f"retry of lost {request.request_id}: {error.code()}")
                continue
            if not (answer.replayed and answer.reservation_id):
                continue
            replayed_ids.add(answer.reservation_id)
            # Now acknowledged: the hold the lost Reserve made must be as it answered.
            self._acks.reserved(answer, owner=-1, is_short=True)
            problem = await self._check_reservation(answer.reservation_id)
            if problem is not None:
                problems.append(problem)
        return replayed_ids, problems

    async def resolve_lost_adjustments(self) -> list[str]:
        """Send every lost AdjustStock again; either way it is acknowledged after."""
        problems = []
        for request in self._acks.lost_adjustments:
            try:
                await self._admin.AdjustStock(request, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                problems.append(
                    f"retry of lost {request.source_event_id}: {error.code()}"
                )
                continue
            self._acks.adjusted_stock(request)
        return problems


def check_positions(
    listed: dict[str, types_pb2.Reservation], positions: dict[At, PositionView]
) -> list[str]:
    """Held at each position is what the active reservations hold, never above
    on-hand, and with nothing in flight available-to-sell is exactly the rest."""
    held: dict[At, int] = collections.defaultdict(int)
    for reservation in listed.values():
        if reservation.state in ACTIVE_STATES:
            for line in reservation.lines:
                held[(line.sku, line.location)] += line.quantity_held
    problems = [
        f"{at}: reservations hold {n} at an unknown position"
        for at, n in held.items()
        if at not in positions
    ]
    for at, stock in positions.items():
        if stock.held != held[at]:
            problems.append(
                f"{at}: held {stock.held}, active reservations hold {held[at]}"
            )
        if stock.held > stock.on_hand:
            problems.append(f"{at}: held {stock.held} exceeds on_hand {stock.on_hand}")
        if stock.available_to_sell != max(0, stock.on_hand - stock.held):
            problems.append(
                f"{at}: available_to_sell {stock.available_to_sell} with on_hand "
                f"{stock.on_hand} and held {stock.held}"
            )
    return problems
