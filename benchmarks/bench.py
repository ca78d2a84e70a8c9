"""`make bench`: throughput and start-up of the statistics module, side by side.

  pipeline   replay source -> windower -> worker (memfd + socket) -> wasm3 -> vibstats, the real
             supervisor; CPU of the supervisor and the worker together, so "per core" is honest
  worker     the same module fed directly through one WorkerProcess (no source, no windower)
  wasm3      in-process wasm3 calls, no worker boundary
  native     the same C source compiled with gcc -O2
  numpy      the same statistics in numpy
  cold start spawn worker + validate + load + first window result

Figures are samples (frames x channels) per second of CPU time on one core.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.modbuild import build_module  # noqa: E402
from common import cpu_of, self_cpu  # noqa: E402
from appliance.runtime.backend import Wasm3Backend  # noqa: E402
from appliance.runtime.host import HEADER, pack_header, WorkerProcess, load_message  # noqa: E402
from appliance.runtime.validate import read_module  # noqa: E402

CHANNELS, FRAMES = 3, 4096
PARAMS = "baseline.windows=10\nthreshold=6\n"




def windows(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.standard_normal((CHANNELS, FRAMES)).astype(np.float32) for _ in range(n)]


def header(seq: int) -> bytes:
    return pack_header(CHANNELS, FRAMES, 12800.0, seq)


def bench_pipeline(wasm: Path, seconds_of_data: float = 300.0) -> dict:
    """The real supervisor on a fast (non-real-time) replay of synthetic vibration."""
    import yaml
    from appliance.config import load_config
    from appliance.supervisor import Supervisor

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fs = 12800
        data = np.random.default_rng(2).standard_normal((int(fs * seconds_of_data), CHANNELS)).astype(np.float32)
        np.save(tmp / "vib.npy", data)
        (tmp / "cfg.yaml").write_text(yaml.safe_dump({
            "gateway": {"name": "bench", "data_dir": str(tmp / "var")},
            "metrics": {"enabled": False},
            "sources": {"vib": {"type": "replay", "realtime": False, "block_frames": 2048,
                                "segments": [{"path": str(tmp / "vib.npy"), "sample_rate": fs}]}},
            "modules": {"stats": {"wasm": str(wasm), "source": "vib", "window": {"size": FRAMES},
                                  "overflow": "block", "queue": 8, "params": {"baseline": {"windows": 10}}}},
        }))
        sup = Supervisor(load_config(tmp / "cfg.yaml"))
        host = sup.modules["stats"]
        sup.start()
        # Steady state: start the clocks once the worker is up and has answered a window, so
        # interpreter start-up and file loading (reported under cold start) do not count.
        while host.processed < 1:
            time.sleep(0.001)
        worker = host._worker
        first, cpu0, wcpu0, t0 = host.processed, self_cpu(), cpu_of(worker.pid), time.perf_counter()
        assert sup.wait_until_done(600)
        wall = time.perf_counter() - t0
        cpu = self_cpu() - cpu0 + cpu_of(worker.pid) - wcpu0
        processed = host.processed - first
        sup.stop()
    samples = processed * FRAMES * CHANNELS
    return {"samples_per_cpu_s": samples / cpu, "samples_per_wall_s": samples / wall, "windows": processed}


def bench_worker(wasm: bytes, wins: list[np.ndarray]) -> dict:
    worker = WorkerProcess("bench", wasm, HEADER.size + wins[0].nbytes, load_message("vibstats.wasm", PARAMS))
    try:
        cpu0, wcpu0, t0 = self_cpu(), cpu_of(worker.pid), time.perf_counter()
        lat = []
        for seq, w in enumerate(wins):
            t = time.perf_counter()
            worker.process(header(seq), w, 5.0)
            lat.append(time.perf_counter() - t)
        wall = time.perf_counter() - t0
        cpu = self_cpu() - cpu0 + cpu_of(worker.pid) - wcpu0
    finally:
        worker.stop()
    samples = len(wins) * FRAMES * CHANNELS
    return {"samples_per_cpu_s": samples / cpu, "samples_per_wall_s": samples / wall,
            "p50_ms": 1e3 * float(np.median(lat)), "p99_ms": 1e3 * float(np.percentile(lat, 99))}


def bench_wasm3_inprocess(wasm: bytes, wins: list[np.ndarray]) -> dict:
    inst = Wasm3Backend().instantiate(wasm, 128 << 10, {
        ("ap", "log"): lambda *a: None, ("ap", "feature"): lambda *a: None, ("ap", "event"): lambda *a: None})
    p = inst.call("ap_buffer", 0, len(PARAMS))
    inst.memory()[p:p + len(PARAMS)] = PARAMS.encode()
    inst.call("ap_init", p, len(PARAMS))
    n = HEADER.size + wins[0].nbytes
    wp = inst.call("ap_buffer", 1, n)
    cpu0 = self_cpu()
    for seq, w in enumerate(wins):
        inst.memory()[wp:wp + n] = header(seq) + w.tobytes()
        inst.call("ap_process", wp, n)
    cpu = self_cpu() - cpu0
    return {"samples_per_cpu_s": len(wins) * FRAMES * CHANNELS / cpu}


def bench_native(n_windows: int) -> dict:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return {"error": "no C compiler"}
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "vibstats_native"
        subprocess.run([cc, "-O2", f"-I{REPO / 'modules' / 'sdk'}", str(REPO / "modules/src/vibstats/vibstats.c"),
                        str(REPO / "benchmarks/native/native_host.c"), "-lm", "-o", str(exe)], check=True)
        out = subprocess.run([str(exe), str(CHANNELS), str(FRAMES), str(n_windows)], capture_output=True,
                             text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return {"samples_per_cpu_s": result["samples_per_s"]}


def bench_numpy(wins: list[np.ndarray]) -> dict:
    cpu0 = self_cpu()
    for w in wins:
        x = w.astype(np.float64)
        d = x - x.mean(axis=1, keepdims=True)
        m2 = (d * d).mean(axis=1)
        m4 = ((d * d) ** 2).mean(axis=1)
        rms = np.sqrt(m2)
        peak = np.abs(d).max(axis=1)
        _ = (rms, peak, peak / rms, m4 / (m2 * m2))
    cpu = self_cpu() - cpu0
    return {"samples_per_cpu_s": len(wins) * FRAMES * CHANNELS / cpu}


def bench_cold_start(path: Path, repeats: int = 10) -> dict:
    w = windows(1)[0]
    totals, loads = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        wasm = read_module(path)   # the worker validates (wasm-validate + ABI) before loading
        worker = WorkerProcess("cold", wasm, HEADER.size + w.nbytes, load_message("vibstats.wasm", PARAMS))
        t1 = time.perf_counter()
        worker.process(header(0), w, 5.0)
        t2 = time.perf_counter()
        worker.stop()
        loads.append(t1 - t0)
        totals.append(t2 - t0)
    inproc = []
    wasm = path.read_bytes()
    for _ in range(repeats):
        t0 = time.perf_counter()
        bench_wasm3_inprocess(wasm, windows(1))
        inproc.append(time.perf_counter() - t0)
    return {"worker_ms": 1e3 * float(np.median(totals)), "spawn_validate_load_ms": 1e3 * float(np.median(loads)),
            "in_process_ms": 1e3 * float(np.median(inproc))}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        built = build_module(REPO / "modules" / "src" / "vibstats", Path(tmp) / "vibstats.wasm")
        wasm_path = Path(tmp) / "vibstats.wasm"
        wasm = built.out.read_bytes()
        wins = windows(300)
        print(f"vibstats ({len(wasm)} bytes), windows of {CHANNELS} ch x {FRAMES} frames float32; "
              f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}\n")
        rows = [
            ("pipeline: replay -> supervisor -> worker -> wasm3", bench_pipeline(wasm_path)),
            ("worker round trip (memfd + socket) -> wasm3", bench_worker(wasm, wins)),
            ("wasm3 in-process (no isolation)", bench_wasm3_inprocess(wasm, wins)),
            ("native C (gcc -O2), same source", bench_native(len(wins) * 10)),
            ("numpy reference", bench_numpy(wins)),
        ]
        native = rows[3][1].get("samples_per_cpu_s")
        print(f"{'path':<52} {'Msamples/s/core':>16} {'vs native':>10}  notes")
        for label, r in rows:
            if "error" in r:
                print(f"{label:<52} {'-':>16} {'-':>10}  {r['error']}")
                continue
            rate = r["samples_per_cpu_s"]
            notes = []
            if "samples_per_wall_s" in r:
                notes.append(f"wall {r['samples_per_wall_s'] / 1e6:.1f} Ms/s")
            if "p50_ms" in r:
                notes.append(f"round trip p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms")
            print(f"{label:<52} {rate / 1e6:>16.1f} {native / rate if native else float('nan'):>9.1f}x  "
                  f"{', '.join(notes)}")
        cold = bench_cold_start(wasm_path)
        print(f"\ncold start, load -> first result: worker {cold['worker_ms']:.1f} ms "
              f"(spawn + validate + load {cold['spawn_validate_load_ms']:.1f} ms); "
              f"in-process wasm3 {cold['in_process_ms']:.2f} ms")
        at_12k8 = rows[0][1]["samples_per_cpu_s"] / (12800 * 3)
        print(f"=> one core handles about {at_12k8:.0f} three-axis accelerometers at 12.8 kHz through the pipeline")


if __name__ == "__main__":
    main()
