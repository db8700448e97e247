"""`python -m erp_bridge`: feed stockward's commitments to the ERP until SIGTERM."""

import asyncio
import logging
import signal
import sys

import uvloop

from erp_bridge.admin import BridgeAdminServicer, serve_admin
from erp_bridge.bridge import Bridge
from erp_bridge.config import from_args
from erp_bridge.metrics import serve_metrics
from server import logs

log = logging.getLogger(__name__)

# SIGTERM: the admin server lets calls in progress finish within this long.
ADMIN_GRACE_S = 2.0


async def run() -> None:
    config = from_args(sys.argv[1:])
    bridge = Bridge(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    await bridge.start()
    admin = None
    if config.admin_listen:
        servicer = BridgeAdminServicer(bridge.store, bridge.status)
        admin, port = await serve_admin(servicer, config.admin_listen)
        log.info("admin serving: port=%d", port)
    metrics = None
    if config.metrics_listen:
        metrics, _ = await serve_metrics(bridge.snapshot, config.metrics_listen)

    await stop.wait()
    # A batch cut off mid-send stays planned in its cursor and goes again at start.
    if admin is not None:
        await admin.stop(ADMIN_GRACE_S)
    if metrics is not None:
        await metrics.cleanup()
    await bridge.stop()


def main() -> None:
    logs.configure()
    uvloop.run(run())


if __name__ == "__main__":
    main()
