"""One random sequence decided by the engine and by the reference model side by side,
compared after every step.

Commands are generated in the engine's reservation ids and translated for the model,
which names its reservations itself; the map between the two is learnt when a Reserve
is answered. Every engine decision is marked durable at once, which is what lets the
model ignore withheld gains. After every step the comparison checks the answer (or the
refusal's kind and reason), every position, what each channel may hold at every
position, the policies in force with who set them (scoped allocations with their pools
and the channel registry among them), what each allocation has remaining in its scope,
the at-risk listing (of every channel at each step, and of one channel in turn), the
most one channel could take of each sku within a subset of locations or everywhere,
with what its allocations have left (a channel and a subset in turn), the reservations,
and the engine's own invariants. It also notes which paths of scoped allocations and
the channel registry each sequence reached (PATHS), for the test to count.

The clock moves between steps as well as in sweeps, so that continuity controls start,
bite and end mid-sequence, throttle buckets refill, and holds fall due before a sweep.
"""

import dataclasses
import json
import random

from server.clock import FakeClock
from server.engine.commands import (
    Command,
    Confirm,
    Extend,
    Fulfill,
    LiftControl,
    Move,
    PolicyResult,
    Release,
    ReservationResult,
    Reserve,
    ReserveResult,
    Result,
    SetControl,
    SetLocationGroup,
    ShortReason,
    StockResult,
)
from server.engine.engine import Decision, Engine, Replay, RequestRow, WalRecord
from server.engine.errors import EngineError, InvariantBroken
from server.engine.policy import ControlKind
from tests.engine.catalogue import (
    ACTORS,
    CHANNELS,
    LIMITS,
    PAIRS,
    REACH_SUBSETS,
    VIEWS,
)
from tests.engine.engine_views import (
    check_invariants,
    engine_at_risk,
    engine_channel_views,
    engine_policies,
    engine_positions,
    engine_reach,
    engine_remaining,
    engine_view,
)
from tests.engine.model_state import FENCE
from tests.engine.model_views import (
    Answered,
    At,
    AtRiskView,
    ModelResult,
    Outcome,
    Refused,
)
from tests.engine.random_commands import STEP_WEIGHTS, RandomCommands
from tests.engine.reference_model import ReferenceModel
from tests.engine.support import IdSource

# Far more holds than a sequence makes, so one sweep takes every due hold.
EXPIRIES_PER_SWEEP_MAX = 10_000
# Clock steps, seconds: many smaller than the shortest hold, some past the default TTL.
ADVANCES_S = (0.5, 1, 7, 30, 90, 300, 1000)
# Between steps the clock often moves a little: controls start and end, buckets refill.
CLOCK_STEP_SHARE = 0.4
CLOCK_STEPS_S = (0.125, 0.25, 0.5, 1, 2)
# A burst is several reservation requests of one channel at one instant, as a flash
# sale brings: enough to empty a throttle's bucket.
BURST_REQUESTS_MAX = 6

# Paths of scoped allocations and the channel registry that a sequence may reach: a
# line short because the channel's pool in a group ran out, or because other
# channels' ring fences in a group left it less than stock; allocations refused for
# overlapping scopes; a group that scopes an allocation kept from changing; a Reserve
# from a channel the registry does not know; a channel kept in the registry because a
# policy names it; and a move judged on the room at its target where the source and
# the target lie under different pools of the channel (or one under none).
SCOPED_POOL_SHORT = "scoped pool short"
SCOPED_FENCE_SHORT = "scoped fence short"
SCOPES_OVERLAP = "ALLOCATION_SCOPES_OVERLAP"
SCOPING_GROUP_KEPT = "scoping group kept"
CHANNEL_UNKNOWN_RESERVE = "reserve from unknown channel"
CHANNEL_IN_USE = "CHANNEL_IN_USE"
MOVE_ACROSS_SCOPES = "move across scopes"
PATHS = (
    SCOPED_POOL_SHORT,
    SCOPED_FENCE_SHORT,
    SCOPES_OVERLAP,
    SCOPING_GROUP_KEPT,
    CHANNEL_UNKNOWN_RESERVE,
    CHANNEL_IN_USE,
    MOVE_ACROSS_SCOPES,
)


@dataclasses.dataclass(slots=True)
class Journal:
    """What a ledger would have made durable, in decision order."""

    records: list[WalRecord] = dataclasses.field(default_factory=list)
    requests: list[tuple[Command, RequestRow]] = dataclasses.field(default_factory=list)

    def add(self, command: Command | None, decision: Decision) -> None:
        if decision.record is not None:
            self.records.append(decision.record)
        if decision.request is not None:
            assert command is not None
            self.requests.append((command, decision.request))


@dataclasses.dataclass(frozen=True, slots=True)
class EngineAnswer:
    """What one engine did with a command, comparable between two engines."""

    refused: Refused | None = None
    result: Result | None = None
    replayed: bool = False
    record: WalRecord | None = None
    request: RequestRow | None = None


def _expiries(decisions: list[Decision]) -> list[tuple[str, str]]:
    """Expiry decisions without their sequence numbers, which follow sweep order."""
    return [
        (d.result.reservation.reservation_id, json.dumps(d.result.to_json()))
        for d in decisions
        if isinstance(d.result, ReservationResult)
    ]


class Comparison:
    """One random sequence, decided by the engine and by the model."""

    def __init__(self, *, seed: int, label: str, shard_count: int) -> None:
        self.rng = random.Random(seed)
        self.label = label
        self.shard_count = shard_count
        self.clock = FakeClock()
        self.ids = IdSource()
        self.engine = Engine(shard_count=shard_count, clock=self.clock, new_id=self.ids)
        self.model = ReferenceModel(
            on_hand_max=LIMITS.on_hand_max,
            ttl_default_s=LIMITS.ttl_default_s,
            control_duration_max_s=LIMITS.control_duration_max_s,
        )
        self.to_model: dict[str, str] = {}
        self.commands = RandomCommands(
            rng=self.rng, clock=self.clock, model=self.model, to_model=self.to_model
        )
        self.journal = Journal()
        # A second engine fed the same commands, once one has been recovered.
        self.shadow: Engine | None = None
        self.step_index = 0
        self.step_name = ""
        # Steps after which some hold was at risk, and after which a shortfall fell on
        # some holds at a position and spared others there: where the order in which
        # holds are covered decides the listing.
        self.at_risk_steps = 0
        self.spared_steps = 0
        # The paths of scoped allocations and the channel registry this sequence
        # reached (see PATHS), so that the test can tell they were exercised.
        self.reached: set[str] = set()

    def where(self) -> str:
        return (
            f"{self.label} shards={self.shard_count} step={self.step_index} "
            f"({self.step_name})"
        )

    # Steps -------------------------------------------------------------------------------

    def run(self, steps: int) -> None:
        names = list(STEP_WEIGHTS)
        weights = list(STEP_WEIGHTS.values())
        for _ in range(steps):
            self.step_index += 1
            self.step_name = self.rng.choices(names, weights)[0]
            if self.step_index == 1:
                self.step_name = "set_on_hand"
            elif self.rng.random() < CLOCK_STEP_SHARE:
                self.clock.advance(self.rng.choice(CLOCK_STEPS_S))
            if self.step_name == "tick":
                touched = self.tick()
            elif self.step_name == "burst":
                touched = self.burst()
            elif self.step_name == "retune":
                touched = self.retune()
            else:
                touched = self.send_one()
            self.compare_state(touched)

    def send_one(self) -> list[str]:
        command = self.commands.make(self.step_name)
        self.commands.sent.append(command)
        if isinstance(command, SetControl):
            self.commands.control_ids.append(f"{command.actor}:{command.change_id}")
        self.send(command)
        target = getattr(command, "reservation_id", "")
        return [target] if target in self.to_model else []

    def burst(self) -> list[str]:
        """Several reservation requests of one channel at one instant; the reservations
        they make are active, so `compare_state` looks at them anyway."""
        channel = self.rng.choice(CHANNELS)
        for _ in range(self.rng.randint(2, BURST_REQUESTS_MAX)):
            command = self.commands.reserve(channel=channel)
            self.commands.sent.append(command)
            self.send(command)
        return []

    def retune(self) -> list[str]:
        """Lift a control in force and at once set another of the same kind and target,
        as an operator changes a throttle's rate: the overlap rule asks for just that.
        A new throttle must start with a full bucket of its own."""
        in_force = self.model.policies.in_force(self.clock.now_us()).controls
        if not in_force:
            return self.send_one()
        # Throttles first: their buckets are what a retune can get wrong.
        throttles = [
            cid for cid, c in in_force.items() if c.kind is ControlKind.THROTTLE
        ]
        control_id = self.rng.choice(throttles or sorted(in_force))
        actor = self.rng.choice(ACTORS)
        commands = self.commands
        lift = LiftControl(actor, commands.key("chg-"), control_id)
        like = in_force[control_id]
        replacement = commands.control(actor, commands.key("chg-"), like=like)
        for command in (lift, replacement):
            commands.sent.append(command)
            self.send(command)
        commands.control_ids.append(f"{actor}:{replacement.change_id}")
        return []

    # Deciding ----------------------------------------------------------------------------

    def for_model(self, command: Command) -> Command:
        if isinstance(command, Confirm | Release | Fulfill | Extend | Move):
            rid = command.reservation_id
            return dataclasses.replace(
                command, reservation_id=self.to_model.get(rid, rid)
            )
        return command

    def send(self, command: Command) -> None:
        is_fenced = isinstance(command, Reserve) and self.is_fence_tighter(command)
        expected = self.model.decide(
            self.for_model(command), now_us=self.clock.now_us()
        )
        answer = self.answer(self.engine, command)
        if self.shadow is not None:
            shadow_answer = self.answer(self.shadow, command)
            assert shadow_answer == answer, f"{self.where()}: recovered engine differs"

        if answer.result is not None and not answer.replayed:
            self.learn_id(answer.result, expected)
        actual = self.translate(answer)
        assert actual == expected, (
            f"{self.where()}: {command!r}\nengine: {actual!r}\nmodel:  {expected!r}"
        )
        self.note_path(self.for_model(command), expected, is_fenced=is_fenced)

    def answer(self, engine: Engine, command: Command) -> EngineAnswer:
        try:
            got = engine.decide(command)
        except EngineError as error:
            return EngineAnswer(refused=Refused(error.kind, error.reason))
        except InvariantBroken as error:
            raise AssertionError(
                f"{self.where()}: {command!r} broke an invariant: {error}"
            ) from error
        if isinstance(got, Replay):
            assert got.durable, f"{self.where()}: replay of a durable answer"
            assert got.result.replayed, f"{self.where()}: replay not marked"
            return EngineAnswer(result=got.result, replayed=True)
        assert not got.result.replayed, f"{self.where()}: fresh answer marked replayed"
        engine.mark_durable(got)
        if engine is self.engine:
            self.journal.add(command, got)
        return EngineAnswer(result=got.result, record=got.record, request=got.request)

    def learn_id(self, result: Result, expected: Outcome) -> None:
        if not isinstance(result, ReserveResult) or not result.reservation_id:
            return
        if isinstance(expected, Answered) and isinstance(
            expected.result, ReserveResult
        ):
            assert result.reservation_id not in self.to_model, self.where()
            self.to_model[result.reservation_id] = expected.result.reservation_id

    def translate(self, answer: EngineAnswer) -> Outcome:
        """The engine's answer in the model's terms and reservation ids."""
        if answer.refused is not None:
            return answer.refused
        result = answer.result
        model_result: ModelResult
        if isinstance(result, ReserveResult):
            rid = result.reservation_id
            model_result = dataclasses.replace(
                result, reservation_id=self.to_model.get(rid, rid), replayed=False
            )
        elif isinstance(result, ReservationResult):
            model_result = engine_view(result.reservation)
        else:
            assert isinstance(result, StockResult | PolicyResult)
            model_result = dataclasses.replace(result, replayed=False)
        return Answered(model_result, replayed=answer.replayed)

    def tick(self) -> list[str]:
        """Move the clock and run one bounded expiry sweep."""
        self.clock.advance(self.rng.choice(ADVANCES_S))
        now_us = self.clock.now_us()
        count_max = self.rng.randint(1, 4)
        if self.shadow is not None:
            # Which due holds a bounded sweep takes first may differ after recovery (the
            # recovered schedule has no stale entries), so with two engines each sweep
            # takes every due hold.
            count_max = EXPIRIES_PER_SWEEP_MAX
        decisions = self.expire(self.engine, count_max)
        if self.shadow is not None:
            shadow_decisions = self.expire(self.shadow, count_max)
            assert sorted(_expiries(shadow_decisions)) == sorted(
                _expiries(decisions)
            ), f"{self.where()}: recovered engine expired differently"

        assert len(decisions) <= count_max, self.where()
        expired: list[str] = []
        for decision in decisions:
            assert isinstance(decision.result, ReservationResult), self.where()
            reservation = decision.result.reservation
            model_id = self.to_model[reservation.reservation_id]
            assert self.model.is_due(model_id, now_us=now_us), (
                f"{self.where()}: expired {reservation} before its time"
            )
            expected = self.model.expire(model_id, now_us=now_us)
            assert engine_view(reservation) == expected, self.where()
            expired.append(reservation.reservation_id)
        if len(decisions) < count_max:
            assert not self.model.due(now_us=now_us), (
                f"{self.where()}: sweep left due holds {self.model.due(now_us=now_us)}"
            )
        return expired

    def expire(self, engine: Engine, count_max: int) -> list[Decision]:
        try:
            decisions = engine.expire_due(count_max=count_max)
        except InvariantBroken as error:
            raise AssertionError(f"{self.where()}: expiry broke: {error}") from error
        for decision in decisions:
            engine.mark_durable(decision)
            if engine is self.engine:
                self.journal.add(None, decision)
        return decisions

    # Paths reached -----------------------------------------------------------------------

    def is_fence_tighter(self, command: Reserve) -> bool:
        """Whether the first line of a request, the one planned before any other
        takes a unit, has a location in a group's scope where other channels' ring
        fences leave the channel less than its view of the position offers. Asked
        before the request is decided."""
        line = command.lines[0]
        now_us = self.clock.now_us()
        views = self.model.channel_views(command.channel, now_us=now_us)
        allowance = self.model.allowance(command.channel, now_us=now_us)
        for location in (line.location,) if line.location else line.locations:
            at = (line.sku, location)
            group = self.model.scope_at(*at) if at in views else None
            limits = allowance.limits(line.sku, group, (FENCE,)) if group else []
            if any(units < views[at].available_to_sell for units in limits):
                return True
        return False

    def note_path(self, command: Command, outcome: Outcome, *, is_fenced: bool) -> None:
        """Record which of PATHS the command took, in the model's terms."""
        is_judged = isinstance(outcome, Answered) or (
            outcome.reason == "INSUFFICIENT_STOCK_AT_TARGET"
        )
        if isinstance(command, Move) and is_judged and self.is_across_scopes(command):
            self.reached.add(MOVE_ACROSS_SCOPES)
        if isinstance(outcome, Refused):
            self.note_refusal(command, outcome.reason)
        elif isinstance(outcome.result, ReserveResult) and not outcome.replayed:
            assert isinstance(command, Reserve)
            self.note_reserve(command, outcome.result, is_fenced=is_fenced)

    def note_refusal(self, command: Command, reason: str) -> None:
        scoping = {group for _, _, group in self.model.policies.allocations}
        if reason == "CHANNEL_UNKNOWN" and isinstance(command, Reserve):
            self.reached.add(CHANNEL_UNKNOWN_RESERVE)
        elif reason in (SCOPES_OVERLAP, CHANNEL_IN_USE):
            self.reached.add(reason)
        elif (
            reason == "GROUP_IN_USE"
            and isinstance(command, SetLocationGroup)
            and command.name in scoping
        ):
            self.reached.add(SCOPING_GROUP_KEPT)

    def note_reserve(
        self, command: Reserve, result: ReserveResult, *, is_fenced: bool
    ) -> None:
        allocations = self.model.policies.allocations
        for line in result.lines:
            if line.short_reason is ShortReason.CHANNEL_ALLOCATION_EXHAUSTED and any(
                (sku, channel) == (line.sku, command.channel) and group
                for sku, channel, group in allocations
            ):
                self.reached.add(SCOPED_POOL_SHORT)
        first = result.lines[0]
        if first.short_reason is ShortReason.INSUFFICIENT_STOCK and is_fenced:
            self.reached.add(SCOPED_FENCE_SHORT)

    def is_across_scopes(self, command: Move) -> bool:
        """Whether a move's source and stocked target lie under different pools of
        the reservation's channel, or one under a pool and the other under none."""
        model = self.model
        reservation = model.reservations.get(command.reservation_id)
        if reservation is None or (command.sku, command.to_location) not in (
            model.on_hand
        ):
            return False
        pools = {
            model.own_scope_at(command.sku, reservation.channel, location)
            for location in (command.from_location, command.to_location)
        }
        return len(pools) > 1

    # Comparing state ---------------------------------------------------------------------

    def compare_state(self, touched: list[str]) -> None:
        where = self.where()
        now_us = self.clock.now_us()
        assert engine_positions(self.engine) == self.model.positions(), where
        assert engine_policies(
            self.engine, now_us=now_us
        ) == self.model.policies.in_force(now_us), where
        assert engine_remaining(self.engine) == self.model.remaining(), where
        # One view per step, in turn, keeps the run short: each is compared every third
        # step, and all of them by `compare_all`. The at-risk listing of every channel
        # ("") is compared at each step, as the counts read it.
        channel = VIEWS[self.step_index % len(VIEWS)]
        self.compare_channel_view(channel)
        # Reach likewise: one channel and one subset of locations per step, so that
        # every pair of them comes round in turn.
        turn = self.step_index
        within = REACH_SUBSETS[turn // len(CHANNELS) % len(REACH_SUBSETS)]
        self.compare_reach(CHANNELS[turn % len(CHANNELS)], within)
        self.count_at_risk(self.compare_at_risk(""))
        if channel:
            self.compare_at_risk(channel)
        check_invariants(self.engine, where)
        assert len(self.engine.reservations) == len(self.model.reservations), where
        # Finished reservations never change, so each step compares the active ones and
        # those the step named; `compare_all` covers the rest at the end.
        for engine_id in touched:
            self.compare_reservation(engine_id)
        for engine_id, reservation in self.engine.reservations.items():
            if reservation.is_active:
                self.compare_reservation(engine_id)

    def compare_reach(self, channel: str, within: tuple[str, ...]) -> None:
        """What `channel` could hold of each sku within a subset of locations (empty:
        everywhere), and what its allocations have left."""
        pairs = [pair for pair in PAIRS if pair[1] == channel]
        got = engine_reach(self.engine, pairs, within)
        expected = self.model.reach_views(pairs, within, now_us=self.clock.now_us())
        assert got == expected, (
            f"{self.where()}: reach of {channel} within {within}\n"
            f"engine: {got!r}\nmodel:  {expected!r}"
        )

    def compare_channel_view(self, channel: str) -> None:
        got = engine_channel_views(self.engine, channel)
        expected = self.model.channel_views(channel, now_us=self.clock.now_us())
        assert got == expected, f"{self.where()}: {channel!r}"

    def compare_at_risk(self, channel: str) -> list[AtRiskView]:
        """Compare the at-risk listing of `channel` ("" for every channel); returns the
        listing."""
        got = self.at_risk_for_model(channel)
        expected = self.model.at_risk(channel, now_us=self.clock.now_us())
        assert got == expected, (
            f"{self.where()}: at risk for {channel!r}\n"
            f"engine: {got!r}\nmodel:  {expected!r}"
        )
        return expected

    def at_risk_for_model(self, channel: str) -> list[AtRiskView]:
        """The engine's listing under the model's reservation ids. An id the model never
        learnt stays as it is, so that the comparison shows it."""
        listing: list[AtRiskView] = []
        for item in engine_at_risk(self.engine, channel):
            model_id = self.to_model.get(item.reservation_id, item.reservation_id)
            listing.append(dataclasses.replace(item, reservation_id=model_id))
        return listing

    def count_at_risk(self, listing: list[AtRiskView]) -> None:
        """Count the steps that put holds at risk, and those where a shortfall fell on
        some of the holds at a position and spared others there."""
        if not listing:
            return
        self.at_risk_steps += 1

        listed: dict[At, int] = {}
        for item in listing:
            for sku, location, _ in item.uncovered:
                listed[(sku, location)] = listed.get((sku, location), 0) + 1
        holders = self.model.holders()
        if any(count < len(holders[at]) for at, count in listed.items()):
            self.spared_steps += 1

    def compare_reservation(self, engine_id: str) -> None:
        got = engine_view(self.engine.get_reservation(engine_id))
        expected = self.model.view(self.to_model[engine_id])
        assert got == expected, f"{self.where()}: {engine_id}"

    def compare_all(self) -> None:
        assert sorted(self.engine.reservations) == sorted(self.to_model), self.where()
        for channel in CHANNELS:
            for within in REACH_SUBSETS:
                self.compare_reach(channel, within)
        for channel in VIEWS:
            self.compare_channel_view(channel)
        for engine_id in self.to_model:
            self.compare_reservation(engine_id)
        for channel in VIEWS:
            self.compare_at_risk(channel)
