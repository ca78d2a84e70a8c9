"""CPU accounting shared by the benchmarks: a figure per core counts every process involved."""
from __future__ import annotations

import os
import resource
from pathlib import Path


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of another process (a worker)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime
