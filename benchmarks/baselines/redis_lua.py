"""Fast and not durable: stock in Redis hashes, held by one Lua script per Reserve.

NOT DURABLE. Redis here runs without persistence (no AOF, no RDB snapshots), so an
acknowledged reservation lives only in Redis's memory and a crash or restart loses
it. Even with appendonly and appendfsync everysec, up to a second of acknowledged
holds could go. stockward answers only after Postgres has the hold on disk. This
baseline shows what the same contract costs when that promise is dropped; it is not
a like-for-like comparison, and the report must say so next to its figures.

Design note. Each position is a hash `<prefix>:<sku>:<location>` with fields on_hand
and held. The script gets the request's positions (lines naming the same position
already summed) and, as Redis runs one script at a time, checks and holds without
anyone else in between: if on_hand - held covers every position it raises held on
each and returns a new reservation number from a counter key; otherwise it changes
nothing and returns what each position had. It is registered once and called with
EVALSHA (redis.asyncio's register_script loads it again if Redis lost it). A batch
sends its reserves' script calls in one pipeline: one round trip, each call still
atomic on its own. A sku may not contain ':', which would make two positions share
a key.

Expected: the script is a few microseconds inside Redis; a Reserve costs a gRPC call
(~0.5 ms, see noop.py) and one loopback round trip to Redis (~0.1 ms with the Python
client), so one client in a closed loop sees about 1,500 to 2,500 per second, some
80% of the noop baseline.

Known shortcomings, beyond those of every baseline (benchmarks/baselines/common.py):
no reservation record is kept beside the held counts, so nothing could release a
hold; and the script touches several keys, which Redis Cluster would refuse unless
they shared a hash slot. Neither matters to the figure measured.

Run: python -m benchmarks.baselines.redis_lua --listen 127.0.0.1:50063
    --redis-url redis://127.0.0.1:6379/0 --key-prefix bench [--drop-on-exit]
Clean up after a run: drop_keys(redis_url, key_prefix), or --drop-on-exit.
"""

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import redis.asyncio as redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError

from benchmarks.baselines import common
from benchmarks.baselines.common import Context, Line, Position
from server.api.errors import status_of
from server.engine.errors import EngineError, InvalidArgument, Unavailable
from stockward.v1 import inventory_pb2

log = logging.getLogger(__name__)

REDIS_URL_DEFAULT = "redis://127.0.0.1:6379/0"
KEY_PREFIX_DEFAULT = "bench"
# Redis runs commands one at a time, so connections beyond a few dozen only queue in
# its socket buffers; this many keep it busy while the gRPC side waits on answers.
# More concurrent calls than this wait for a connection (up to the budget).
CONNECTIONS_MAX = 32
# A call is tens of microseconds in Redis; one that takes five seconds means Redis
# has stalled, and the caller is better off with UNAVAILABLE than with a longer wait.
REDIS_BUDGET_S = 5.0
# Keys per SCAN step and per UNLINK when dropping a prefix: one step stays a
# sub-millisecond command for Redis while a million keys take a thousand steps.
DROP_KEYS_PER_STEP = 1_000

# KEYS[1..n]: the stock hash of each position; KEYS[n + 1]: the reservation counter.
# ARGV[1..n]: units wanted at each position, each position once.
# Reply: {reservation number} when every position was held, else {0, available...}.
HOLD_SCRIPT = """
local n = #ARGV
local available = {}
local fits = true
for i = 1, n do
  local stock = redis.call('HMGET', KEYS[i], 'on_hand', 'held')
  available[i] = (tonumber(stock[1]) or 0) - (tonumber(stock[2]) or 0)
  if available[i] < tonumber(ARGV[i]) then
    fits = false
  end
end
if not fits then
  local reply = {0}
  for i = 1, n do
    reply[i + 1] = available[i]
  end
  return reply
end
for i = 1, n do
  redis.call('HINCRBY', KEYS[i], 'held', ARGV[i])
end
return {redis.call('INCR', KEYS[n + 1])}
"""

# What a call to Redis can fail with: its own errors (a lost connection, a timeout,
# a script error), the socket, or our budget running out.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)


@dataclasses.dataclass(frozen=True)
class RedisLuaConfig:
    # host:port to serve gRPC on.
    listen: str
    # The Redis to keep stock in.
    redis_url: str
    # Every key this baseline makes starts with "<key_prefix>:", so runs (and tests)
    # sharing one Redis do not see each other's stock.
    key_prefix: str
    # Delete every key under the prefix when the process stops.
    drop_on_exit: bool


class RedisLuaStore:
    def __init__(self, config: RedisLuaConfig) -> None:
        self._config = config
        self._redis: redis.Redis | None = None
        self._hold: AsyncScript | None = None

    @property
    def client(self) -> redis.Redis:
        assert self._redis is not None, "open() first"
        return self._redis

    @property
    def hold(self) -> AsyncScript:
        assert self._hold is not None, "open() first"
        return self._hold

    async def open(self) -> None:
        pool = redis.BlockingConnectionPool.from_url(
            self._config.redis_url,
            max_connections=CONNECTIONS_MAX,
            timeout=REDIS_BUDGET_S,
            socket_timeout=REDIS_BUDGET_S,
            socket_connect_timeout=REDIS_BUDGET_S,
            decode_responses=True,
        )
        self._redis = redis.Redis(connection_pool=pool)
        self._hold = self._redis.register_script(HOLD_SCRIPT)
        async with asyncio.timeout(REDIS_BUDGET_S):
            await self._redis.script_load(HOLD_SCRIPT)
            await self._log_persistence()
            existing = await self._first_key()
        if existing is not None:
            log.warning(
                "key prefix in use: prefix=%s key=%r (earlier holds still count)",
                self._config.key_prefix,
                existing,
            )
        log.info("redis_lua ready: prefix=%s", self._config.key_prefix)

    async def _log_persistence(self) -> None:
        try:
            settings: dict[str, str] = {}
            for name in ("appendonly", "appendfsync", "save"):
                reply = await self.client.config_get(name)
                settings.update((str(key), str(value)) for key, value in reply.items())
        except ResponseError:
            # A managed Redis may refuse CONFIG; the figures hold either way.
            log.info("redis persistence: unknown (CONFIG refused)")
            return
        log.info(
            "redis persistence: appendonly=%s appendfsync=%s save=%r holds=%s",
            settings.get("appendonly"),
            settings.get("appendfsync"),
            settings.get("save"),
            _durability(settings),
        )

    async def _first_key(self) -> str | None:
        # One SCAN step: enough for a warning about a reused prefix, not a guarantee.
        _, keys = await self.client.scan(
            0, match=_glob_escaped(self._config.key_prefix) + ":*", count=100
        )
        return str(keys[0]) if keys else None

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
        if self._config.drop_on_exit:
            await drop_keys(self._config.redis_url, self._config.key_prefix)

    async def reserve(self, lines: Sequence[Line]) -> inventory_pb2.ReserveResponse:
        want = common.wanted(lines)
        async with _redis_call("reserve"):
            reply = await self.hold(
                keys=self._hold_keys(want), args=list(want.values())
            )
        return self._answer(lines, want, reply)

    async def reserve_many(
        self, batch: Sequence[Sequence[Line]]
    ) -> list[inventory_pb2.ReserveResponse | EngineError]:
        """One pipeline, one script call per reserve; each answered on its own.

        redis-py checks with SCRIPT EXISTS before it sends a pipeline that calls a
        script: two round trips per batch, however large.
        """
        if not batch:
            return []
        wants = [common.wanted(lines) for lines in batch]
        async with (
            _redis_call("reserve_many"),
            self.client.pipeline(transaction=False) as pipe,
        ):
            for want in wants:
                keys = self._hold_keys(want)
                await self.hold(keys=keys, args=list(want.values()), client=pipe)
            replies = await pipe.execute(raise_on_error=False)
        answers: list[inventory_pb2.ReserveResponse | EngineError] = []
        for lines, want, reply in zip(batch, wants, replies, strict=True):
            if isinstance(reply, BaseException):
                answers.append(_unavailable("reserve_many", reply))
            else:
                answers.append(self._answer(lines, want, reply))
        return answers

    def _answer(
        self, lines: Sequence[Line], want: Mapping[Position, int], reply: list[int]
    ) -> inventory_pb2.ReserveResponse:
        if reply[0] == 0:
            return common.rejected(lines, dict(zip(want, reply[1:], strict=True)))
        return common.reserved(lines, f"rl-{reply[0]}")

    def _hold_keys(self, want: Mapping[Position, int]) -> list[str]:
        return [*(self._key(position) for position in want), self._counter_key()]

    def _key(self, position: Position) -> str:
        sku, location = position
        return f"{self._config.key_prefix}:{sku}:{location}"

    def _counter_key(self) -> str:
        # Never a position's key: those have a ':' between a sku and a location.
        return f"{self._config.key_prefix}:reservation-counter"

    async def set_on_hand(
        self, counts: Mapping[Position, int]
    ) -> list[tuple[str, str, int, int]]:
        """All counts in one MULTI/EXEC, so no hold lands between them."""
        async with (
            _redis_call("set_on_hand"),
            self.client.pipeline(transaction=True) as pipe,
        ):
            for position, on_hand in counts.items():
                key = self._key(position)
                pipe.hset(key, "on_hand", on_hand)
                pipe.hsetnx(key, "held", 0)
                pipe.hget(key, "held")
            replies = await pipe.execute()
        helds = replies[2::3]
        return [
            (sku, location, on_hand, int(held))
            for ((sku, location), on_hand), held in zip(
                counts.items(), helds, strict=True
            )
        ]


def _durability(settings: Mapping[str, str]) -> str:
    """Where an acknowledged hold is, in words for the log."""
    if settings.get("appendonly") == "yes":
        if settings.get("appendfsync") == "always":
            return "on-disk-before-reply"
        return "on-disk-within-a-second-or-so"
    if settings.get("save"):
        return "on-disk-at-the-next-snapshot"
    return "in-memory-only"


def _checked_skus(lines: Sequence[Line]) -> Sequence[Line]:
    for line in lines:
        if ":" in line.sku:
            raise InvalidArgument(
                "UNSUPPORTED_BY_BASELINE",
                f"lines[{line.index}].sku contains ':', which this baseline's keys "
                "cannot tell apart",
                field=f"lines[{line.index}].sku",
            )
    return lines


def _glob_escaped(text: str) -> str:
    """text matched literally by SCAN MATCH."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


def _unavailable(what: str, error: BaseException) -> Unavailable:
    log.warning("redis call failed: call=%s error=%r", what, error)
    return Unavailable("REDIS_UNAVAILABLE", f"redis failed: {type(error).__name__}")


@contextlib.asynccontextmanager
async def _redis_call(what: str) -> AsyncIterator[None]:
    """One budget for a whole call; every Redis failure becomes UNAVAILABLE here."""
    try:
        async with asyncio.timeout(REDIS_BUDGET_S):
            yield
    except REDIS_ERRORS as error:
        raise _unavailable(what, error) from error


async def drop_keys(redis_url: str, key_prefix: str) -> int:
    """Delete every key under "<key_prefix>:"; for the benchmark runner. Returns how
    many went."""
    client = redis.Redis.from_url(
        redis_url,
        socket_timeout=REDIS_BUDGET_S,
        socket_connect_timeout=REDIS_BUDGET_S,
    )
    dropped = 0
    try:
        async for batch in _key_batches(client, key_prefix):
            dropped += await client.unlink(*batch)
    finally:
        await client.aclose()
    log.info("keys dropped: prefix=%s keys=%d", key_prefix, dropped)
    return dropped


async def _key_batches(
    client: redis.Redis, key_prefix: str
) -> AsyncIterator[list[Any]]:
    # SCAN's cursor survives keys deleted between steps; it may repeat a key, and
    # UNLINK of a key already gone does nothing.
    cursor = 0
    while True:
        cursor, keys = await client.scan(
            cursor, match=_glob_escaped(key_prefix) + ":*", count=DROP_KEYS_PER_STEP
        )
        if keys:
            yield keys
        if cursor == 0:
            return


class RedisLuaInventory:
    def __init__(self, store: RedisLuaStore) -> None:
        self._store = store

    @common.answering
    async def Reserve(
        self, request: inventory_pb2.ReserveRequest, context: Context
    ) -> inventory_pb2.ReserveResponse:
        lines = _checked_skus(common.reserve_lines(request))
        return await self._store.reserve(lines)

    @common.answering
    async def ExecuteBatch(
        self, request: inventory_pb2.ExecuteBatchRequest, context: Context
    ) -> inventory_pb2.ExecuteBatchResponse:
        items = [_checked_item(item) for item in common.batch_items(request)]
        reserves = [item for item in items if isinstance(item, tuple)]
        answers = iter(await self._store.reserve_many(reserves))
        # Back in command order: each reserve takes the next answer.
        results = [
            item
            if isinstance(item, inventory_pb2.CommandResult)
            else _command_result(next(answers))
            for item in items
        ]
        return inventory_pb2.ExecuteBatchResponse(results=results)


def _checked_item(item: common.BatchItem) -> common.BatchItem:
    if isinstance(item, inventory_pb2.CommandResult):
        return item
    try:
        return tuple(_checked_skus(item))
    except EngineError as error:
        return inventory_pb2.CommandResult(error=status_of(error))


def _command_result(
    answer: inventory_pb2.ReserveResponse | EngineError,
) -> inventory_pb2.CommandResult:
    if isinstance(answer, EngineError):
        return inventory_pb2.CommandResult(error=status_of(answer))
    return inventory_pb2.CommandResult(reserve=answer)


def parse_config(argv: Sequence[str] | None = None) -> RedisLuaConfig:
    parser = common.argument_parser(
        "stockward benchmark baseline: Redis and a Lua script, not durable"
    )
    parser.add_argument("--redis-url", default=REDIS_URL_DEFAULT)
    parser.add_argument("--key-prefix", default=KEY_PREFIX_DEFAULT)
    parser.add_argument(
        "--drop-on-exit",
        action="store_true",
        help="delete every key under the prefix when the process stops",
    )
    options = parser.parse_args(argv)
    if not options.key_prefix:
        parser.error("--key-prefix must not be empty")
    return RedisLuaConfig(
        listen=options.listen,
        redis_url=options.redis_url,
        key_prefix=options.key_prefix,
        drop_on_exit=options.drop_on_exit,
    )


def run() -> None:
    config = parse_config()
    store = RedisLuaStore(config)
    inventory = RedisLuaInventory(store)
    baseline = common.StoreBaseline(
        store, {"Reserve": inventory.Reserve, "ExecuteBatch": inventory.ExecuteBatch}
    )
    common.main(baseline, listen=config.listen)


if __name__ == "__main__":
    run()
