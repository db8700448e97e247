"""CPU time and memory of the processes a benchmark runs, read from Linux's /proc.

CPU time comes from /proc/<pid>/stat (user plus system time, in clock ticks), so each
reading is exact only to one tick, 10 ms on usual kernels: measure intervals of a
second or more. The current process's CPU time comes from getrusage, which is finer.
Memory comes from /proc/<pid>/status: VmRSS is resident memory now, VmHWM its peak
since the process started. Children's usage is not included: measure each process of
interest (a server, its Postgres backends) by its own pid.

A process that has exited cannot be read: every reading (and construction) raises
ProcessExited rather than returning a stale figure, because a benchmark whose server
died has nothing to report. Read peaks before stopping the processes they describe.
"""

import contextlib
import os
import resource
from collections.abc import Iterable, Iterator
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
BYTES_PER_KIB = 1024
PROC = Path("/proc")

# Fields of /proc/<pid>/stat counted after the closing parenthesis of the command name
# (which may itself hold spaces and parentheses): state is 0, utime 11, stime 12 and
# starttime 19 (fields 3, 14, 15 and 22 of proc(5)).
_STAT_STATE = 0
_STAT_UTIME = 11
_STAT_STIME = 12
_STAT_STARTTIME = 19
# Zombie and dead: the process has exited but its parent has not yet reaped it.
_STATES_EXITED = frozenset({"Z", "X"})


class ProcessExited(RuntimeError):
    """The process is gone (or a zombie, or its pid now belongs to another process)."""

    def __init__(self, pid: int, detail: str) -> None:
        super().__init__(f"process {pid} has exited: {detail}")
        self.pid = pid


class ProcessUsage:
    """Readings of one process's CPU time and memory, by pid.

    The pid's start time is noted on construction, so that a later reading of a pid
    reused by another process raises ProcessExited instead of measuring a stranger.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._dir = PROC / str(pid)
        self._started_ticks = int(self._stat_fields()[_STAT_STARTTIME])

    @classmethod
    def current(cls) -> "ProcessUsage":
        """This process, read with getrusage where that is finer than /proc."""
        return CurrentProcessUsage()

    def cpu_s(self) -> float:
        """User plus system CPU seconds used since the process started, all threads."""
        fields = self._stat_fields()
        if int(fields[_STAT_STARTTIME]) != self._started_ticks:
            raise ProcessExited(self.pid, "its pid now names another process")
        ticks = int(fields[_STAT_UTIME]) + int(fields[_STAT_STIME])
        return ticks / CLOCK_TICKS_PER_S

    def rss_bytes(self) -> int:
        """Resident memory now."""
        return self._status_kib("VmRSS") * BYTES_PER_KIB

    def peak_rss_bytes(self) -> int:
        """The most resident memory the process has held since it started."""
        return self._status_kib("VmHWM") * BYTES_PER_KIB

    def _stat_fields(self) -> list[str]:
        try:
            text = (self._dir / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError) as error:
            raise ProcessExited(self.pid, "no /proc entry") from error

        fields = text.rpartition(")")[2].split()
        if fields[_STAT_STATE] in _STATES_EXITED:
            raise ProcessExited(self.pid, f"state {fields[_STAT_STATE]}")
        return fields

    def _status_kib(self, key: str) -> int:
        try:
            text = (self._dir / "status").read_text()
        except (FileNotFoundError, ProcessLookupError) as error:
            raise ProcessExited(self.pid, "no /proc entry") from error

        for line in text.splitlines():
            label, _, value = line.partition(":")
            if label == key:
                return int(value.split()[0])
        # A zombie keeps its /proc entry but has no memory left to describe.
        raise ProcessExited(self.pid, f"{key} missing from /proc/{self.pid}/status")


class CurrentProcessUsage(ProcessUsage):
    """The calling process: CPU time from getrusage, memory from /proc like the rest.

    getrusage's ru_maxrss is not used for the peak: the kernel updates it lazily, so it
    can read below the current RSS, whereas VmHWM is brought up to date on every read.
    """

    def __init__(self) -> None:
        super().__init__(os.getpid())

    def cpu_s(self) -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime


def usage_of(pid: int) -> ProcessUsage:
    """Readings for `pid`, using the finer getrusage when it is this process."""
    return CurrentProcessUsage() if pid == os.getpid() else ProcessUsage(pid)


@contextlib.contextmanager
def measure_cpu(pids: Iterable[int]) -> Iterator[dict[int, float]]:
    """CPU seconds each process spends inside the block.

    Yields an empty dict that is filled, pid -> seconds, when the block ends normally;
    a block that raises leaves it empty. Raises ProcessExited if a process is gone at
    either end of the block.
    """
    usages = {pid: usage_of(pid) for pid in pids}
    before_s = {pid: usage.cpu_s() for pid, usage in usages.items()}
    spent_s: dict[int, float] = {}

    yield spent_s

    for pid, usage in usages.items():
        spent_s[pid] = usage.cpu_s() - before_s[pid]
