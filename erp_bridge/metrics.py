"""The bridge's Prometheus page: the same snapshot the status RPC gives, as metrics.

A collector reads the bridge's snapshot at each scrape rather than keeping metric
objects in step with the counters, so a registry per bridge suffices and two bridges
in one process (as in tests) never share a series.
"""

import logging
from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from erp_bridge.status import BreakerState, BridgeStatus

log = logging.getLogger(__name__)

_PREFIX = "stockward_bridge_"

# The counters exported as Prometheus counters: (Counters field, help text).
_COUNTERS = (
    ("batches", "Batches acknowledged by the ERP (or empty after netting)."),
    ("lines_in", "Lines read from write-ahead records."),
    ("lines_out", "Lines sent to the ERP after netting."),
    ("requests", "Batch requests sent to the ERP."),
    ("throttled", "Requests the ERP answered with 429."),
    ("retries", "Attempts that failed with a 5xx, a timeout or garbage."),
    ("duplicates", "Batches the ERP already had (a resend after a crash or timeout)."),
    ("lines_dead_lettered", "Lines the ERP refused, kept as dead letters."),
    ("lines_refused_invalid", "Lines the ERP refused as invalid (a 400 naming them)."),
    ("batches_empty", "Batches whose lines all netted away: no request was needed."),
)


class StatusCollector(Collector):
    def __init__(self, snapshot: Callable[[], BridgeStatus]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        status = self._snapshot()
        labels = ["name"]
        for field, text in _COUNTERS:
            counter = CounterMetricFamily(_PREFIX + field, text, labels=labels)
            counter.add_metric([status.name], getattr(status.counters, field))
            yield counter

        yield from self._streams(status)

        for field, text in (
            ("batches_per_s", "Batches acknowledged per second, last status period."),
            ("lines_per_s", "Lines sent per second, last status period."),
        ):
            rate = GaugeMetricFamily(_PREFIX + field, text, labels=labels)
            rate.add_metric([status.name], getattr(status, field))
            yield rate
        ratio = GaugeMetricFamily(
            _PREFIX + "netting_ratio", "Lines read per line sent.", labels=labels
        )
        ratio.add_metric([status.name], status.counters.netting_ratio)
        yield ratio
        dead = GaugeMetricFamily(
            _PREFIX + "dead_letters",
            "Dead letters by status.",
            labels=["name", "status"],
        )
        for state, count in sorted(status.dead_letters.items()):
            dead.add_metric([status.name, state], count)
        yield dead
        breaker = GaugeMetricFamily(
            _PREFIX + "breaker_open",
            "1 while the endpoint's breaker is open or half open.",
            labels=["endpoint"],
        )
        breaker.add_metric(
            [status.endpoint], 0 if status.breaker is BreakerState.CLOSED else 1
        )
        yield breaker
        divergences = GaugeMetricFamily(
            _PREFIX + "divergences",
            "Positions where stockward and the ERP differ.",
            labels=labels,
        )
        divergences.add_metric([status.name], status.divergences)
        yield divergences
        lag = GaugeMetricFamily(
            _PREFIX + "delivery_lag_seconds",
            "Age of each batch's oldest record when the ERP acknowledged the "
            "batch, over recent batches (an upper bound on the lag of its records).",
            labels=["quantile"],
        )
        lag.add_metric(["0.5"], status.delivery_lag_p50_s)
        lag.add_metric(["0.99"], status.delivery_lag_p99_s)
        yield lag

    @staticmethod
    def _streams(status: BridgeStatus) -> Iterator[Metric]:
        records = GaugeMetricFamily(
            _PREFIX + "lag_records",
            "Records committed but not yet acknowledged by the ERP.",
            labels=["shard"],
        )
        seconds = GaugeMetricFamily(
            _PREFIX + "lag_seconds",
            "Age of the oldest record not yet acknowledged by the ERP.",
            labels=["shard"],
        )
        for stream in status.streams:
            records.add_metric([str(stream.shard)], stream.lag_records)
            seconds.add_metric([str(stream.shard)], stream.lag_s)
        yield records
        yield seconds


async def serve_metrics(
    snapshot: Callable[[], BridgeStatus], listen: str
) -> tuple[web.AppRunner, int]:
    """Serve /metrics on `listen` (host:port, port 0 picks one); returns the port."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(StatusCollector(snapshot))

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    site = web.TCPSite(runner, host, int(port))
    await site.start()
    server = site._server
    assert server is not None
    sockets = getattr(server, "sockets", None) or []
    bound_port = int(sockets[0].getsockname()[1]) if sockets else int(port)
    log.info("metrics serving: listen=%s:%d", host, bound_port)
    return runner, bound_port
