"""How many CPU cores this process may use."""

from __future__ import annotations

import os


def cpu_count() -> int:
    """Cores this process may run on: its affinity mask where the OS has one (Linux: taskset,
    cgroup cpusets, a batch scheduler's allocation), else every core of the machine."""
    if hasattr(os, "process_cpu_count"):  # Python 3.13+: affinity-aware
        return os.process_cpu_count() or 1
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
