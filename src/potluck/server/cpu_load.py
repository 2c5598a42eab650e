"""What the machine's CPUs did lately, from Linux's ``/proc/stat``: idle cores (for the thread count of small steps)
and time stolen by a hypervisor (so a benchmark can say its figures came from a contended VM).

Where the file does not exist (not Linux), nothing is known: no core counts as idle, no time as stolen.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

PROC_STAT = "/proc/stat"
IDLE_WINDOW_S = 0.5  # how often IdleCores samples the machine (its answer covers the last window)


@dataclass(frozen=True)
class CpuTicks:
    """Ticks all CPUs spent since boot (first line of ``/proc/stat``); only differences between two mean anything."""

    idle: float  # idle + iowait
    steal: float  # taken by the hypervisor for other guests
    total: float  # user nice system idle iowait irq softirq steal

    def share_since(self, earlier: CpuTicks) -> tuple[float, float]:
        """(idle, steal) as fractions of all CPUs' time between ``earlier`` and this sample."""
        total = self.total - earlier.total
        if total <= 0:
            return 0.0, 0.0
        return (self.idle - earlier.idle) / total, (self.steal - earlier.steal) / total


def read_cpu_ticks(path: str = PROC_STAT) -> CpuTicks | None:
    try:
        with open(path, encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    try:
        user, nice, system, idle, iowait, irq, softirq, steal = (float(x) for x in fields[1:9])
    except ValueError:
        return None
    return CpuTicks(
        idle=idle + iowait, steal=steal, total=user + nice + system + idle + iowait + irq + softirq + steal
    )


def steal_share(before: CpuTicks | None, after: CpuTicks | None) -> float | None:
    """Share of all cores' time the hypervisor gave to other guests between two samples (None: not known)."""
    if before is None or after is None:
        return None
    return after.share_since(before)[1]


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class IdleCores:
    """How many cores were idle, on average, over the last window (``IdleCores()()`` -> e.g. 0.9).

    Samples at most once a window, so asking at every step costs a clock read. Thread-safe.
    """

    def __init__(
        self, path: str = PROC_STAT, cores: int | None = None, window: float = IDLE_WINDOW_S
    ) -> None:
        self.path, self.window = path, window
        self.cores = cores or usable_cores()
        self._last: tuple[float, CpuTicks] | None = None  # (monotonic time, sample)
        self._idle = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._last[0] < self.window:
                return self._idle
            sample = read_cpu_ticks(self.path)
            if sample is None:
                return 0.0
            if self._last is not None:
                self._idle = self.cores * sample.share_since(self._last[1])[0]
            self._last = (now, sample)
            return self._idle
