"""`python -m erp_bridge.simulator`: serve one simulated ERP until interrupted."""

import asyncio
import logging
import signal

from erp_bridge.simulator.app import ErpSimulator
from erp_bridge.simulator.config import SimulatorConfig, parse_args

logger = logging.getLogger(__name__)


async def serve(config: SimulatorConfig) -> None:
    simulator = ErpSimulator(config)
    await simulator.start()

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    try:
        await stopping.wait()
    finally:
        await simulator.stop()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = parse_args(argv)
    logger.info(
        "erp simulator starting: requests_per_s=%d lines_per_s=%d "
        "concurrent_max=%d seed=%d",
        config.requests_per_s,
        config.lines_per_s,
        config.concurrent_max,
        config.seed,
    )
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
