"""`python -m server`: run the stockward reservation server until SIGTERM or SIGINT."""

import asyncio
import logging
import signal
import sys

import uvloop

from server import logs
from server.app import App
from server.config import from_args

log = logging.getLogger("server")


async def serve() -> None:
    config = from_args(sys.argv[1:])
    app = App(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await app.start()
    if config.demo_catalogue:
        log.info(
            'try it: grpcurl -plaintext -d \'{"request_id": "demo-1", '
            '"channel": "web", "lines": [{"sku": "SNEAKER-42", '
            '"quantity": 1, "location": "DC-EAST"}]}\' %s '
            "stockward.v1.InventoryService/Reserve",
            config.listen,
        )
    await stop.wait()
    await app.stop()


def main() -> None:
    logs.configure()
    uvloop.run(serve())


if __name__ == "__main__":
    main()
