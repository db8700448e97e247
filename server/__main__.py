"""`python -m server`: run the stockward reservation server until SIGTERM or SIGINT."""

import asyncio
import gc
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


# Python's cyclic garbage collector runs a young-generation pass every 700 net
# allocations by default. A busy server allocates that many in well under a
# millisecond, and every pass, and the older-generation passes they trigger, costs
# more the more reservations are held: under load that doubled the CPU spent per
# reservation. The engine's objects hold no reference cycles (reference counting
# frees them), so collecting a hundred times less often loses nothing.
GC_YOUNG_THRESHOLD = 100_000


def main() -> None:
    logs.configure()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    uvloop.run(serve())


if __name__ == "__main__":
    main()
