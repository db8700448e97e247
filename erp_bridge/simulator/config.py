"""Settings of the ERP simulator: one frozen dataclass, read from flags in one place."""

import argparse
import dataclasses
import ipaddress
import re

# A fault rate is a probability; the two rates share one draw, so together they too
# must stay a probability.
RATE_MAX = 1.0
# A minute per request is already far slower than any ERP the bridge will meet; more is
# a typo that would make a test hang until its own timeout.
LATENCY_MS_MAX = 60_000


@dataclasses.dataclass(frozen=True)
class Faults:
    """What goes wrong on purpose; tests change it at run time via the admin API."""

    # Share of valid batch requests answered 503 without applying anything.
    error_rate: float = 0.0
    # Share of valid batch requests that are applied and then answered 500, as an ERP
    # does when it commits and then times out before replying.
    applied_then_error_rate: float = 0.0
    # Time every admitted batch request spends in progress before it is answered.
    latency_ms: int = 20

    def __post_init__(self) -> None:
        for name in ("error_rate", "applied_then_error_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= RATE_MAX:
                raise ValueError(f"{name} must be within 0..1, got {value}")
        if self.error_rate + self.applied_then_error_rate > RATE_MAX:
            raise ValueError("error_rate + applied_then_error_rate must not exceed 1")
        if not 0 <= self.latency_ms <= LATENCY_MS_MAX:
            raise ValueError(f"latency_ms must be within 0..{LATENCY_MS_MAX}")


@dataclasses.dataclass(frozen=True)
class SimulatorConfig:
    """Limits and behaviour of one simulated ERP."""

    # Loopback address to serve on; `port` 0 lets the OS pick a free one.
    host: str = "127.0.0.1"
    port: int = 0
    # Bearer token callers must present; empty means no authentication.
    token: str = ""
    # Batch requests admitted in any one-second window.
    requests_per_s: int = 20
    # Lines in one batch request.
    lines_per_request: int = 500
    # Lines admitted in any one-second window, summed over batch requests.
    lines_per_s: int = 5_000
    # Batch requests in progress at once.
    concurrent_max: int = 4
    faults: Faults = Faults()
    # Seed of the fault dice, so that a failing run can be replayed.
    seed: int = 1
    # The item numbers this ERP can store, as a regular expression a sku must match in
    # full; a batch with any other is refused whole (400 naming the line), as ERPs
    # with a fixed item-number format do. Empty: any sku.
    sku_pattern: str = ""

    def __post_init__(self) -> None:
        if not is_loopback(self.host):
            raise ValueError(
                f"the simulator serves loopback only, got host {self.host}"
            )
        for name in (
            "requests_per_s",
            "lines_per_request",
            "lines_per_s",
            "concurrent_max",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        # A batch larger than a whole second's line budget could never be admitted, so
        # the bridge would retry it forever.
        if self.lines_per_request > self.lines_per_s:
            raise ValueError("lines_per_request must not exceed lines_per_s")
        try:
            re.compile(self.sku_pattern)
        except re.error as error:
            raise ValueError(
                f"sku_pattern is not a regular expression: {error}"
            ) from error


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: list[str] | None = None) -> SimulatorConfig:
    """The command line of `python -m erp_bridge.simulator`."""
    parser = argparse.ArgumentParser(prog="python -m erp_bridge.simulator")
    parser.add_argument(
        "--listen", default="127.0.0.1:8089", help="HOST:PORT, loopback"
    )
    parser.add_argument("--token", default="", help="bearer token; empty disables auth")
    parser.add_argument("--requests-per-s", type=int, default=20)
    parser.add_argument("--lines-per-request", type=int, default=500)
    parser.add_argument("--lines-per-s", type=int, default=5_000)
    parser.add_argument("--concurrent-max", type=int, default=4)
    parser.add_argument("--latency-ms", type=int, default=20)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--applied-then-error-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--listen must be HOST:PORT, got {args.listen!r}")
    try:
        return SimulatorConfig(
            host=host,
            port=int(port),
            token=args.token,
            requests_per_s=args.requests_per_s,
            lines_per_request=args.lines_per_request,
            lines_per_s=args.lines_per_s,
            concurrent_max=args.concurrent_max,
            faults=Faults(
                error_rate=args.error_rate,
                applied_then_error_rate=args.applied_then_error_rate,
                latency_ms=args.latency_ms,
            ),
            seed=args.seed,
        )
    except ValueError as error:
        parser.error(str(error))
