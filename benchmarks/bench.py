"""`make bench`: throughput and start-up of the statistics module, side by side.

  pipeline   replay source -> windower -> worker (memfd + socket) -> wasm3 -> vibstats, the real
             supervisor; CPU of the supervisor and the worker together, so "per core" is honest
  worker     the same module fed directly through one WorkerProcess (no source, no windower)
  wasm3      in-process wasm3 calls, no worker boundary
  wasmtime   the same two on wasmtime, running vibstats.simd.wasm (docs/engines.md)
  native     the same C source compiled with gcc -O2, fed the same windows and params
  numpy      the same statistics in numpy
  cold start spawn worker + validate + load + first window result; on wasmtime with the compiled
             artifact cached (a restart) and without (the worker compiles)
  worker PSS one running vibstats worker on each engine (proportional set size: shared pages split)
  real time  how many 3-axis accelerometers at 12.8 kHz (each its own source and vibstats
             module) one core keeps up with: supervisor and workers pinned to one CPU, the
             sources replaying at their real rate, no window dropped and the core at most 90 % busy

Figures are samples (frames x channels) per second of CPU time on one core, measured the same way
on every row: the same 300 windows, the same params, CPU time of every process involved.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance_tools.modbuild import build_module  # noqa: E402
from common import cpu_of, native_rate, self_cpu  # noqa: E402
from appliance.runtime.artifacts import ArtifactCache  # noqa: E402
from appliance.runtime.engines import Wasm3Backend, WasmtimeBackend  # noqa: E402
from appliance.runtime.wire import HEADER, load_message, pack_header  # noqa: E402
from appliance.runtime.process import WorkerProcess  # noqa: E402
from appliance.runtime.validate import read_module  # noqa: E402

CHANNELS, FRAMES = 3, 4096
# host.dsp=1 as the appliance sets it by default: vibstats then reports a window's statistics in
# one ap.features call (every row provides it: the worker, the in-process rows, native_host.c).
PARAMS = "baseline.windows=10\nthreshold=6\nhost.dsp=1\n"




def windows(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.standard_normal((CHANNELS, FRAMES)).astype(np.float32) for _ in range(n)]


def header(seq: int) -> bytes:
    return pack_header(CHANNELS, FRAMES, 12800.0, seq)


def bench_pipeline(wasm: Path, seconds_of_data: float = 300.0) -> dict:
    """The real supervisor on a fast (non-real-time) replay of synthetic vibration."""
    import yaml
    from appliance.config.schema import load_config
    from appliance.core.supervisor import Supervisor

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
        worker_pid = host.worker_pid
        first, cpu0, wcpu0, t0 = host.processed, self_cpu(), cpu_of(worker_pid), time.perf_counter()
        assert sup.wait_until_done(600)
        wall = time.perf_counter() - t0
        cpu = self_cpu() - cpu0 + cpu_of(worker_pid) - wcpu0
        processed = host.processed - first
        sup.stop()
    samples = processed * FRAMES * CHANNELS
    return {"samples_per_cpu_s": samples / cpu, "samples_per_wall_s": samples / wall, "windows": processed}


def bench_worker(wasm: bytes, wins: list[np.ndarray], engine: str = "wasm3", simd: bool = False) -> dict:
    worker = WorkerProcess("bench", wasm, HEADER.size + wins[0].nbytes, load_message("vibstats.wasm", PARAMS,
                                                                                      backend=engine, simd=simd))
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


def bench_wasm3_inprocess(wasm: bytes, wins: list[np.ndarray], backend=None) -> dict:
    inst = (backend or Wasm3Backend()).instantiate(wasm, 128 << 10, {
        ("ap", "log"): lambda *a: None, ("ap", "feature"): lambda *a: None, ("ap", "features"): lambda *a: None,
        ("ap", "event"): lambda *a: None})
    p = inst.call("ap_buffer", 0, len(PARAMS))
    inst.memory()[p:p + len(PARAMS)] = PARAMS.encode()
    inst.call("ap_init", p, len(PARAMS))
    n = HEADER.size + wins[0].nbytes
    wp = inst.call("ap_buffer", 1, n)
    # Each window's bytes made before the clock, as the native harness reads its windows first:
    # then both sides copy a window into the module's memory and call it, nothing more.
    payloads = [header(seq) + w.tobytes() for seq, w in enumerate(wins)]
    cpu0 = self_cpu()
    for payload in payloads:
        inst.memory()[wp:wp + n] = payload
        inst.call("ap_process", wp, n)
    cpu = self_cpu() - cpu0
    return {"samples_per_cpu_s": len(wins) * FRAMES * CHANNELS / cpu}


def bench_native(wins: list[np.ndarray]) -> dict:
    return native_rate([REPO / "modules/src/vibstats/vibstats.c"], PARAMS, wins, 12800.0, warmup=0, count=len(wins))


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


def bench_cold_start(path: Path, repeats: int = 31, params: str = PARAMS, engine: str = "wasm3",
                     cache: str = "", window: tuple[bytes, np.ndarray] | None = None) -> dict:
    """Request -> first result for a fresh worker: the zygote forks it, it enters its sandbox,
    checks and instantiates the module, and answers its first window. The first start of a
    module also runs wasm-validate (a process); later ones (restarts, reloads) find its verdict.
    wasmtime: cache "warm" (the artifact of the first start is loaded by the others) or "none"
    (every start compiles in its worker)."""
    from appliance.runtime import zygote
    zygote.shared().ensure_started()   # the supervisor's zygote is up before any module starts
    head, w = window or (header(0), windows(1)[0])
    totals, loads, seconds = [], [], []
    simd = path.name.endswith(".simd.wasm")
    tmp = tempfile.TemporaryDirectory()
    artifacts = ArtifactCache(Path(tmp.name)) if cache == "warm" else None
    for _ in range(repeats):
        t0 = time.perf_counter()
        wasm = read_module(path)
        worker = WorkerProcess("cold", wasm, HEADER.size + w.nbytes, load_message(path.name, params, backend=engine,
                                                                                   simd=simd),
                               artifact_cache=artifacts)
        t1 = time.perf_counter()
        assert worker.process(head, w, 5.0)["rc"] == 0
        t2 = time.perf_counter()
        time.sleep(0.02)   # the next spare (made after the first window) is ready
        t3 = time.perf_counter()
        worker.process(head, w, 5.0)   # the window's own cost, once started
        seconds.append(time.perf_counter() - t3)
        worker.stop()
        loads.append(t1 - t0)
        totals.append(t2 - t0)
        # The zygote has its next spare forked, sandboxed and warmed up, as for a restart (it
        # follows a backoff of 0.5 s or more).
        time.sleep(0.05)
    tmp.cleanup()
    inproc = []
    wasm = path.read_bytes()
    for _ in range(repeats if params == PARAMS and engine == "wasm3" else 0):   # vibstats only: its imports are linked here
        t0 = time.perf_counter()
        bench_wasm3_inprocess(wasm, windows(1))
        inproc.append(time.perf_counter() - t0)
    return {"first_ms": 1e3 * totals[0], "worker_ms": 1e3 * float(np.median(totals[1:])),
            "p90_ms": 1e3 * float(np.percentile(totals[1:], 90)),
            "second_window_ms": 1e3 * float(np.median(seconds[1:])),
            "spawn_validate_load_ms": 1e3 * float(np.median(loads[1:])),
            "in_process_ms": 1e3 * float(np.median(inproc)) if inproc else float("nan")}


def worker_pss(wasm: bytes, engine: str, simd: bool = False) -> float:
    """PSS (MB) of one running vibstats worker after 50 windows (the zygote's spare and the
    others idle: shared library pages are split between the processes that map them)."""
    from footprint import pss_kb
    wins = windows(4)
    worker = WorkerProcess("pss", wasm, HEADER.size + wins[0].nbytes, load_message("vibstats.wasm", PARAMS,
                                                                                    backend=engine, simd=simd))
    try:
        for seq in range(50):
            worker.process(header(seq), wins[seq % 4], 5.0)
        return pss_kb(worker.pid) / 1024
    finally:
        worker.stop()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        built = build_module(REPO / "modules" / "src" / "vibstats", Path(tmp) / "vibstats.wasm")
        wasm_path = Path(tmp) / "vibstats.wasm"
        wasm = built.out.read_bytes()
        simd_path = Path(tmp) / "vibstats.simd.wasm"
        simd = build_module(REPO / "modules" / "src" / "vibstats", simd_path, simd=True).out.read_bytes()
        wins = windows(300)
        print(f"vibstats ({len(wasm)} bytes), windows of {CHANNELS} ch x {FRAMES} frames float32; "
              f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}\n")
        rows = [
            ("pipeline: replay -> supervisor -> worker -> wasm3", bench_pipeline(wasm_path)),
            ("worker round trip (memfd + socket) -> wasm3", bench_worker(wasm, wins)),
            ("wasm3 in-process (no isolation)", bench_wasm3_inprocess(wasm, wins)),
            ("worker round trip -> wasmtime (vibstats.simd.wasm)", bench_worker(simd, wins, "wasmtime", True)),
            ("wasmtime in-process (no isolation)", bench_wasm3_inprocess(simd, wins, WasmtimeBackend(simd=True))),
            ("native C (gcc -O2), same source and windows", bench_native(wins)),
            ("numpy reference", bench_numpy(wins)),
        ]
        native = rows[5][1].get("samples_per_cpu_s")
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
            print(f"{label:<52} {rate / 1e6:>16.1f} {native / rate if native else float('nan'):>9.2f}x  "
                  f"{', '.join(notes)}")
        print("(vs native: how many times native C is faster; issue 19's target for wasmtime: at most 2x)")
        cold = bench_cold_start(wasm_path)
        print(f"\ncold start, request -> first result ({len(wasm) // 1024} KB module): sandboxed worker forked by "
              f"the zygote {cold['worker_ms']:.1f} ms median, p90 {cold['p90_ms']:.1f} ms (fork + sandbox + check + load {cold['spawn_validate_load_ms']:.1f}"
              f" ms; a module's first start, with wasm-validate: {cold['first_ms']:.1f} ms; a second window's round trip:"
              f" {cold['second_window_ms']:.1f} ms); "
              f"in-process wasm3 {cold['in_process_ms']:.2f} ms")
        for label, cache in (("artifact cached (a restart)", "warm"), ("no artifact: compiled in the worker", "none")):
            cold = bench_cold_start(simd_path, repeats=21, engine="wasmtime", cache=cache)
            print(f"cold start on wasmtime, {label}: {cold['worker_ms']:.1f} ms median, p90 {cold['p90_ms']:.1f} ms "
                  f"(fork + sandbox + check + engine + load {cold['spawn_validate_load_ms']:.1f} ms)")
        print(f"worker PSS, vibstats running: wasm3 {worker_pss(wasm, 'wasm3'):.1f} MB, "
              f"wasmtime {worker_pss(simd, 'wasmtime', True):.1f} MB")
        from bench_bearing import params_text as bearing_params
        # Modules either side of issue 15's 30 KB: motion (a 320x240 frame) and process (PLC rules).
        frame = np.random.default_rng(3).integers(0, 256, (1, 320 * 240), dtype=np.uint8)
        others = [
            ("motion", "", (pack_header(1, 320 * 240, 10.0, 0, sample_format=2, width=320, height=240), frame)),
            ("process", "signal.0.name=temp\nsignal.0.min=0\nsignal.0.max=10\n",
             (pack_header(1, 64, 10.0, 0), np.full((1, 64), 5.0, np.float32))),
            ("bearing", bearing_params(True), None),
        ]
        for name, params, window in others:
            path = REPO / "modules" / "build" / f"{name}.wasm"
            cold = bench_cold_start(path, params=params, window=window)
            print(f"cold start, the same for {name} ({path.stat().st_size // 1024} KB): {cold['worker_ms']:.1f} ms "
                  f"median, p90 {cold['p90_ms']:.1f} ms (a second window's round trip: {cold['second_window_ms']:.1f} ms)")
        from footprint import measure
        mem = measure(REPO, 20.0)
        print(f"memory, default config after 20 s: {mem['processes']} processes (supervisor, zygote, its spare "
              f"worker, a worker per module): PSS {mem['pss_mb']:.0f} MB (supervisor {mem['supervisor_mb']:.0f} MB, "
              f"the rest {', '.join(f'{mb:.0f}' for _, mb in mem['others'])} MB)")
        extrapolated = rows[0][1]["samples_per_cpu_s"] / (12800 * 3)
        capacity = realtime_capacity(wasm_path)
        print(f"\nreal time, one core (supervisor and workers pinned to CPU {capacity['cpu']}), 3-axis "
              f"accelerometers at 12.8 kHz, each its own source and vibstats module (4096-frame windows, hop 2048):")
        for n, t in sorted(capacity["trials"].items()):
            print(f"  {n:>4} accelerometers: {'keeps up' if t['ok'] else 'falls behind'}: core {t['busy']:.0%} busy, "
                  f"{t['processed']}/{t['expected']} windows, {t['dropped']} dropped"
                  + (f" ({', '.join(f'{v} {r}' for r, v in t['reasons'].items())})" if t["reasons"] else "")
                  + (f"; {t['dropped_while_starting']} while the workers started" if t["dropped_while_starting"]
                     else "")
                  + (", a worker restarted" if t["restarted"] else ""))
        print(f"=> one core keeps up with {capacity['max_ok']} three-axis accelerometers at 12.8 kHz in real time "
              f"(throughput alone would suggest {extrapolated:.0f}: per-source and per-worker costs are real)")


# ---- real time: N accelerometers on one core -------------------------------------------------------

REALTIME_S = 15.0


def realtime_trial(wasm: Path, n: int, seconds: float, cpu: int) -> dict:
    """Run in a child process (pinned to `cpu` with everything it starts): N replayed 3-axis
    sources at their real rate, one vibstats module each."""
    import yaml
    from appliance.config.schema import load_config
    from appliance.core.supervisor import Supervisor

    os.sched_setaffinity(0, {cpu})   # workers inherit it
    fs, hop = 12800, FRAMES // 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = np.random.default_rng(5).standard_normal((int(fs * (seconds + 15)), CHANNELS)).astype(np.float32)
        np.save(tmp / "vib.npy", data)
        sources = {f"acc{i}": {"type": "replay", "realtime": True, "block_frames": 640,
                               "segments": [{"path": str(tmp / "vib.npy"), "sample_rate": fs}]} for i in range(n)}
        modules = {f"stats{i}": {"wasm": str(wasm), "source": f"acc{i}", "window": {"size": FRAMES, "hop": hop},
                                 "params": {"baseline": {"windows": 10}, "threshold": 6}} for i in range(n)}
        (tmp / "cfg.yaml").write_text(yaml.safe_dump({
            "gateway": {"name": "bench", "data_dir": str(tmp / "var")}, "metrics": {"enabled": False},
            "sources": sources, "modules": modules}))
        sup = Supervisor(load_config(tmp / "cfg.yaml"))
        sup.start()
        try:
            hosts = list(sup.modules.values())
            deadline = time.monotonic() + 60
            while min(h.processed for h in hosts) < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            pids = [h.worker_pid for h in hosts]

            def cpu_now() -> float | None:   # None once a worker is gone (a fault: not keeping up)
                try:
                    return self_cpu() + sum(cpu_of(p) for p in pids if p)
                except OSError:
                    return None

            def drops() -> dict[str, float]:
                return {r: sum(sup.metrics.registry.get_sample_value("appliance_module_windows_dropped_total",
                                                                    {"module": h.name, "reason": r}) or 0
                               for h in hosts) for r in ("overflow", "unavailable", "fault")}

            # Windows lost while the workers were still starting (one core starting N of them while N
            # sources already replay) are counted apart: the trial is about keeping up once running.
            at_start = drops()
            first = sum(h.processed for h in hosts)
            cpu0 = cpu_now()
            t0 = time.monotonic()
            time.sleep(seconds)
            wall = time.monotonic() - t0
            cpu1 = cpu_now()
            busy = (cpu1 - cpu0) / wall if cpu0 is not None and cpu1 is not None else float("inf")
            processed = sum(h.processed for h in hosts) - first
            reasons = {r: v - at_start[r] for r, v in drops().items()}
            dropped = sum(reasons.values())
            same_workers = [h.worker_pid for h in hosts] == pids
        finally:
            sup.stop()
    expected = int(n * wall * fs / hop)
    ok = dropped == 0 and same_workers and processed >= 0.97 * expected and busy <= 0.9
    return {"ok": ok, "busy": busy, "processed": processed, "expected": expected, "dropped": int(dropped),
            "restarted": not same_workers, "reasons": {r: int(v) for r, v in reasons.items() if v},
            "dropped_while_starting": int(sum(at_start.values()))}


def realtime_capacity(wasm: Path, limit: int = 256) -> dict:
    """Double N while one core keeps up, then bisect: each trial a child process."""
    cpu = max(os.sched_getaffinity(0))
    trials: dict[int, dict] = {}

    def trial(n: int) -> bool:
        out = subprocess.run([sys.executable, __file__, "--realtime-trial", str(n), str(wasm), str(cpu)],
                             capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"real-time trial with {n} accelerometers failed: {out.stderr[-2000:]}")
        trials[n] = json.loads(out.stdout.strip().splitlines()[-1])
        return trials[n]["ok"]

    good, bad = 0, None
    n = 1
    while n <= limit:
        if not trial(n):
            bad = n
            break
        good, n = n, n * 2
    while bad is not None and bad - good > 1 and bad - good > good // 8:
        mid = (good + bad) // 2
        if trial(mid):
            good = mid
        else:
            bad = mid
    return {"cpu": cpu, "trials": trials, "max_ok": good}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--realtime-trial"]:
        print(json.dumps(realtime_trial(Path(sys.argv[3]), int(sys.argv[2]), REALTIME_S, int(sys.argv[4]))))
    else:
        main()
