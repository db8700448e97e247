"""A bridge run as a child process, so that a test can kill it for real."""

import asyncio
import dataclasses
import pathlib

from erp_bridge.config import BridgeConfig
from tests.reliability.server_process import ChildProcess

# Start-up imports grpc, asyncpg and aiohttp and connects: seconds on a slow machine.
START_WAIT_S = 30.0
_POLL_S = 0.05


def bridge_args(config: BridgeConfig) -> list[str]:
    """Flags that give a child exactly this configuration."""
    args = []
    for field in dataclasses.fields(config):
        args += ["--" + field.name.replace("_", "-"), str(getattr(config, field.name))]
    return args


class BridgeProcess(ChildProcess):
    def __init__(self, config: BridgeConfig, *, log_path: pathlib.Path) -> None:
        super().__init__(("-m", "erp_bridge", *bridge_args(config)), log_path=log_path)

    async def wait_started(self) -> None:
        """Until this start has logged that its streams run; fails if it exits."""
        marker = f"--- start {self.starts}\n"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_WAIT_S
        while True:
            if "bridge started:" in self.log_text().rpartition(marker)[2]:
                return
            assert self.is_running, f"bridge exited at start:\n{self.log_tail()}"
            assert loop.time() < deadline, f"bridge not started:\n{self.log_tail()}"
            await asyncio.sleep(_POLL_S)

    async def stop(self) -> int:
        """SIGTERM and wait; the exit code."""
        if self.is_running:
            self.terminate()
        return await self.wait_exit()
