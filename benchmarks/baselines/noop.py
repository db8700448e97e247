"""The transport ceiling: a server that answers without deciding anything.

Every Reserve is RESERVED at once with a made-up id, every reserve command of a batch
likewise, and SetOnHand echoes the counts back with nothing held. No state, no checks,
no store. What it costs is what the gRPC stack, protobuf and the event loop cost on
this machine, so no system behind the same contract can answer faster than this;
stockward and the other baselines are read as a fraction of it.

Expected: a Python gRPC unary call on loopback spends roughly 150 to 300 us of CPU on
each side (HTTP/2 framing, protobuf, the event loop), and one client in a closed loop
waits for both sides in turn: about 1,500 to 3,000 Reserves per second, less on a
machine whose cores are busy with something else.

Run: python -m benchmarks.baselines.noop --listen 127.0.0.1:50061
"""

import itertools
import logging
from collections.abc import Sequence

import grpc

from benchmarks.baselines import common
from benchmarks.baselines.common import Context
from stockward.v1 import admin_pb2, inventory_pb2

log = logging.getLogger(__name__)


class NoopInventory:
    def __init__(self) -> None:
        # Unique within the process, which is all a made-up id needs to be.
        self._ids = itertools.count(1)

    async def Reserve(
        self, request: inventory_pb2.ReserveRequest, context: Context
    ) -> inventory_pb2.ReserveResponse:
        return self._reserved(request)

    async def ExecuteBatch(
        self, request: inventory_pb2.ExecuteBatchRequest, context: Context
    ) -> inventory_pb2.ExecuteBatchResponse:
        return inventory_pb2.ExecuteBatchResponse(
            results=[self._result(command) for command in request.commands]
        )

    def _result(self, command: inventory_pb2.Command) -> inventory_pb2.CommandResult:
        kind = command.WhichOneof("command")
        if kind == "reserve":
            return inventory_pb2.CommandResult(reserve=self._reserved(command.reserve))
        # Same answer as the stateful baselines give, so a mixed batch reads alike.
        return common.unimplemented_result(str(kind))

    def _reserved(
        self, request: inventory_pb2.ReserveRequest
    ) -> inventory_pb2.ReserveResponse:
        lines = common.unchecked_lines(request)
        return common.reserved(lines, f"noop-{next(self._ids)}")


class NoopAdmin:
    async def SetOnHand(
        self, request: admin_pb2.SetOnHandRequest, context: Context
    ) -> admin_pb2.SetOnHandResponse:
        rows: Sequence[tuple[str, str, int, int]] = [
            (count.sku, count.location, count.on_hand, 0) for count in request.counts
        ]
        return common.positions_response(rows)


class NoopBaseline:
    async def open(self) -> None:
        log.info("noop ready: store=none answer=RESERVED")

    def add_services(self, server: grpc.aio.Server) -> None:
        inventory = NoopInventory()
        common.add_rpcs(
            server,
            common.INVENTORY_SERVICE,
            {"Reserve": inventory.Reserve, "ExecuteBatch": inventory.ExecuteBatch},
        )
        admin = NoopAdmin()
        common.add_rpcs(server, common.ADMIN_SERVICE, {"SetOnHand": admin.SetOnHand})

    async def close(self) -> None:
        return None


def run() -> None:
    options = common.argument_parser("stockward benchmark baseline: no-op").parse_args()
    common.main(NoopBaseline(), listen=options.listen)


if __name__ == "__main__":
    run()
