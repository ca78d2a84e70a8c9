"""What the console reads about the machine and the process around the appliance."""
from __future__ import annotations

import os
import shutil
import subprocess


def run_quietly(cmd: list[str]) -> str | None:
    """A read-only system command's output, or None where it is absent or fails (a dev machine)."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def process_uptime_s() -> float | None:
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def process_usage() -> dict[str, float]:
    """CPU seconds (self and reaped children) and resident memory of the supervisor process."""
    import resource
    own = resource.getrusage(resource.RUSAGE_SELF)
    out = {"cpu_seconds": own.ru_utime + own.ru_stime}
    try:
        with open("/proc/self/statm") as f:
            out["rss_bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    return out
