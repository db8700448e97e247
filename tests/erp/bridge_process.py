"""A bridge run as a child process, so that a test can kill it for real."""

import asyncio
import dataclasses
import os
import pathlib
import signal
import sys

from erp_bridge.config import BridgeConfig
from tests.reliability.server_process import REPO_ROOT

# SIGTERM ends the streams at once; a planned batch is resent by the next start.
EXIT_WAIT_S = 15.0
# Start-up imports grpc, asyncpg and aiohttp and connects: seconds on a slow machine.
START_WAIT_S = 30.0
_POLL_S = 0.05
LOG_TAIL_CHARS = 4_000


def bridge_args(config: BridgeConfig) -> list[str]:
    """Flags that give a child exactly this configuration."""
    args = []
    for field in dataclasses.fields(config):
        args += ["--" + field.name.replace("_", "-"), str(getattr(config, field.name))]
    return args


class BridgeProcess:
    def __init__(self, config: BridgeConfig, *, log_path: pathlib.Path) -> None:
        self._args = bridge_args(config)
        self._log_path = log_path
        self._child: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        assert self._child is None or self._child.returncode is not None
        with self._log_path.open("ab") as log:
            log.write(f"--- start {self.starts + 1}\n".encode())
            log.flush()
            self._child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "erp_bridge",
                *self._args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=os.environ.copy(),
            )
        self.starts += 1

    async def wait_started(self) -> None:
        """Until this start has logged that its streams run; fails if it exits."""
        marker = f"--- start {self.starts}\n"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_WAIT_S
        while True:
            text = self._log_path.read_text(errors="replace")
            if "bridge started:" in text.rpartition(marker)[2]:
                return
            assert self.is_running, f"bridge exited at start:\n{self.log_tail()}"
            assert loop.time() < deadline, f"bridge not started:\n{self.log_tail()}"
            await asyncio.sleep(_POLL_S)

    async def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self._child is not None
        if self._child.returncode is None:
            self._child.send_signal(signal.SIGKILL)
        await self._child.wait()

    async def stop(self) -> int:
        """SIGTERM and wait; the exit code."""
        assert self._child is not None
        if self._child.returncode is None:
            self._child.send_signal(signal.SIGTERM)
        async with asyncio.timeout(EXIT_WAIT_S):
            return await self._child.wait()

    @property
    def is_running(self) -> bool:
        return self._child is not None and self._child.returncode is None

    def log_tail(self) -> str:
        try:
            return self._log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError as error:
            return f"<no log: {error}>"
