"""Shared by the benchmarks: CPU accounting (a figure per core counts every process involved)
and the native rows, run on exactly the windows and params the wasm rows get."""
from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NATIVE_HOST = REPO / "benchmarks" / "native" / "native_host.c"


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of another process (a worker)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def native_rate(sources: list[Path], params: str, windows: list[np.ndarray], rate: float, warmup: int, count: int,
                runs: int = 5, defines: tuple[str, ...] = (), image: tuple[int, int] | None = None) -> dict:
    """The module's C source built with gcc -O2 and fed the same params text and the same
    windows as the wasm rows (benchmarks/native/native_host.c): `warmup` windows untimed, then
    `count` under the process CPU clock, cycling through `windows`. The median of `runs`
    separate processes (each starts from ap_init, as a worker does). Samples per CPU-second.
    image: (width, height) for camera frames (uint8 windows of one channel; `rate` is fps)."""
    cc = shutil.which("gcc")
    if cc is None:
        return {"error": "no C compiler (gcc)"}
    channels, frames = windows[0].shape
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        exe = tmp / "native"
        subprocess.run([cc, "-O2", f"-I{REPO / 'modules' / 'sdk'}", *defines, *map(str, sources), str(NATIVE_HOST),
                        "-lm", "-o", str(exe)], check=True)
        (tmp / "params").write_text(params)
        np.stack([w.astype(np.uint8 if image else np.float32) for w in windows]).tofile(tmp / "windows")
        rates = []
        for _ in range(runs):
            out = subprocess.run([str(exe), str(tmp / "params"), str(tmp / "windows"), str(channels), str(frames),
                                  repr(rate), str(warmup), str(count), *map(str, image or ())],
                                 capture_output=True, text=True, check=True)
            rates.append(json.loads(out.stdout.strip().splitlines()[-1])["samples_per_cpu_s"])
    return {"samples_per_cpu_s": statistics.median(rates)}
