"""A blocking wrapper for backends without an event loop (Django views, Celery
tasks, scripts).

The async client runs on an event loop in one background thread; each blocking call
hands its coroutine to that loop and waits for the answer. Calls from many threads
share the one client, so auto-batching still coalesces them.
"""

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

from clients.batching import BatchStats
from clients.client import StockwardClient

P = ParamSpec("P")
R = TypeVar("R")

# How long closing waits for the loop thread to finish sending what is pending.
_CLOSE_TIMEOUT_S = 10.0


def _blocking(
    method: Callable[Concatenate[StockwardClient, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate["SyncStockwardClient", P], R]:
    def call(self: "SyncStockwardClient", /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._run(method(self._client, *args, **kwargs))

    call.__name__ = method.__name__
    call.__doc__ = method.__doc__
    return call


class SyncStockwardClient:
    """The same calls as StockwardClient, blocking; takes the same options."""

    def __init__(self, target: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="stockward-client", daemon=True
        )
        self._thread.start()

        async def make() -> StockwardClient:
            # The channel must be made on the loop that will use it.
            return StockwardClient(target, **options)

        self._client = self._run(make())

    def _run(self, coroutine: Coroutine[Any, Any, R]) -> R:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.is_running():
            return
        future = asyncio.run_coroutine_threadsafe(self._client.close(), self._loop)
        future.result(timeout=_CLOSE_TIMEOUT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=_CLOSE_TIMEOUT_S)
        self._loop.close()

    @property
    def batch_stats(self) -> BatchStats | None:
        return self._client.batch_stats

    reserve = _blocking(StockwardClient.reserve)
    confirm = _blocking(StockwardClient.confirm)
    release = _blocking(StockwardClient.release)
    fulfill = _blocking(StockwardClient.fulfill)
    extend = _blocking(StockwardClient.extend)
    move = _blocking(StockwardClient.move)
    execute_batch = _blocking(StockwardClient.execute_batch)
    get_reservation = _blocking(StockwardClient.get_reservation)
    list_reservations = _blocking(StockwardClient.list_reservations)
    get_availability = _blocking(StockwardClient.get_availability)
    adjust_stock = _blocking(StockwardClient.adjust_stock)
    set_on_hand = _blocking(StockwardClient.set_on_hand)
    set_safety_stock = _blocking(StockwardClient.set_safety_stock)
    set_channel_buffer = _blocking(StockwardClient.set_channel_buffer)
    set_location_group = _blocking(StockwardClient.set_location_group)
    set_channel_sourcing = _blocking(StockwardClient.set_channel_sourcing)
    set_channel_allocation = _blocking(StockwardClient.set_channel_allocation)
    set_continuity_control = _blocking(StockwardClient.set_continuity_control)
    lift_continuity_control = _blocking(StockwardClient.lift_continuity_control)
    set_inbound_supply = _blocking(StockwardClient.set_inbound_supply)
    set_channel_preorders = _blocking(StockwardClient.set_channel_preorders)
    set_channels = _blocking(StockwardClient.set_channels)
    list_at_risk_reservations = _blocking(StockwardClient.list_at_risk_reservations)
    get_policies = _blocking(StockwardClient.get_policies)
