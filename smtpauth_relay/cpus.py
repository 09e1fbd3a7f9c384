"""
How many CPUs this process may use.
"""

from __future__ import annotations

import os


def usableCpus() -> int:
    """
    The number of CPUs this process may run on: its affinity mask where
    the system has one (C{taskset}, systemd's C{CPUAffinity=}, a container's
    cpuset), else the machine's count; at least 1.
    """
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
