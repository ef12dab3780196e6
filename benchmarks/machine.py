"""How busy the rest of the machine was while a benchmark timed something.

The uncached aiosqlite baseline hands every query to a worker thread and back. On an idle
2-core machine each hand-off wakes a sleeping core; when another process keeps that core
busy, the hand-offs are much quicker and the baseline gets faster, so every cached/uncached
ratio is lower. Reporting the other processes' CPU share tells the two situations apart.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import TracebackType

BUSY_SHARE = 0.25
"""Other processes' share of one core above which a run is reported as contended."""


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle (every process on the machine)."""
    fields = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` used so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """``with OtherLoad() as load:`` measures the CPU share (of one core) that processes
    other than this one used during the block: ``load.share`` afterwards."""

    def __enter__(self) -> OtherLoad:
        self.share = 0.0
        self._start = (time.perf_counter(), machine_busy_seconds(), cpu_seconds(os.getpid()))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        began, busy, own = self._start
        elapsed = time.perf_counter() - began
        others = (machine_busy_seconds() - busy) - (cpu_seconds(os.getpid()) - own)
        self.share = max(0.0, others) / elapsed if elapsed > 0 else 0.0

    def report(self) -> str:
        """One line for the benchmark's output; a warning when the machine was contended."""
        line = f"other processes used {self.share:.0%} of a core while timing"
        if self.share >= BUSY_SHARE:
            line += (
                " -- contended: the uncached aiosqlite baseline is faster than on an idle "
                "machine (its thread hand-offs wake no idle core), so ratios are lower"
            )
        return line
