"""The full bearing analysis (modules/src/bearing), samples per CPU-second on one core:

  wasm3, C FFT       the module alone in a worker, its own FFT (host_dsp: false)
  wasm3 + host DSP   the module in a worker, FFTs by the host (numpy on the module's memory)
  wasmtime C FFT     the module on wasmtime (bearing.simd.wasm, docs/engines.md), its own FFT
  wasmtime + host    the same with the host's FFTs
  native C           the same bearing.c, gcc -O2, on the same windows with the same params (its C FFT)
  numpy              modules/src/bearing/reference.py (the tests' reference implementation)

Windows: CHANNELS channels x 4096 frames at 12.8 kHz, after the baseline is learned. The healthy
rows score windows like the baseline's (no diagnosis runs); the "diagnosing" column feeds windows
with an outer-race impulse train after a healthy baseline, so that every window is anomalous and
the diagnosis (envelope of the kurtogram's band, its spectrum into the ring, the signature) runs on
each, as it does for a faulty machine whose windows do not overlap (the headers carry no start
times: taken as not overlapping; at half-overlap the ring takes every other window).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "modules" / "src" / "bearing"))

from appliance_tools.modbuild import build_module  # noqa: E402
from common import cpu_of, native_rate, self_cpu  # noqa: E402
from appliance.runtime.wire import HEADER, load_message, pack_header  # noqa: E402
from appliance.runtime.process import WorkerProcess  # noqa: E402

FRAMES, FS = 4096, 12800.0
PARAMS = {"bearing.balls": 9, "bearing.ball_diameter": 0.3126, "bearing.pitch_diameter": 1.537,
          "shaft.rpm": 1797, "baseline.windows": 10, "threshold": 4}




def params_text(host_dsp: bool) -> str:
    items = dict(PARAMS, **{"host.dsp": int(host_dsp), "host.features": 1})   # as the appliance sets them
    return "".join(f"{k}={v}\n" for k, v in sorted(items.items()))


WARMUP = 12   # windows processed before the clock starts: the baseline is learned first


def bench_windows(channels: int, fault: bool = False) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    wins = [rng.standard_normal((channels, FRAMES)).astype(np.float32) for _ in range(8)]
    if fault:   # impulses at BPFO (1797 rpm) ringing a 3 kHz resonance, 10 x the noise's RMS at their peak
        t = np.arange(FRAMES) / FS
        ring = np.zeros(FRAMES)
        for t0 in np.arange(0.001, t[-1], 1 / 107.36):
            m = t >= t0
            ring[m] += 10 * np.exp(-(t[m] - t0) * 900) * np.sin(2 * np.pi * 3000 * (t[m] - t0))
        wins = [(w + ring).astype(np.float32) for w in wins]
    return wins


def worker_rate(wasm: bytes, host_dsp: bool, channels: int, n: int, fault: bool = False,
                engine: str = "wasm3", simd: bool = False) -> float:
    healthy, wins = bench_windows(channels), bench_windows(channels, fault)
    worker = WorkerProcess("bench", wasm, HEADER.size + wins[0].nbytes, load_message("bearing.wasm" if not simd else "bearing.simd.wasm",
                                                                                      params_text(host_dsp),
                                                                                      backend=engine, simd=simd))
    try:
        def run(count, first, windows):
            for seq in range(first, first + count):
                header = pack_header(channels, FRAMES, FS, seq)
                reply = worker.process(header, windows[seq % 8], 30.0)
                assert reply["rc"] == 0
                if fault and seq >= WARMUP + 2:
                    assert reply["f"].get("diagnosis.windows", 0) > 0, "the fault windows are not diagnosed"
        run(WARMUP, 0, healthy)                      # learn the baseline first: time the steady state
        cpu0, wcpu0 = self_cpu(), cpu_of(worker.pid)
        run(n, WARMUP, wins)
        cpu = self_cpu() - cpu0 + cpu_of(worker.pid) - wcpu0
    finally:
        worker.stop()
    return n * channels * FRAMES / cpu


def native_c_rate(channels: int, n: int) -> float | None:
    """bearing.c natively, with the C FFT row's params (host.dsp=0) and windows."""
    r = native_rate([REPO / "modules/src/bearing/bearing.c", REPO / "benchmarks/native/bearing_stubs.c"],
                    params_text(False), bench_windows(channels), FS, warmup=WARMUP, count=n)
    return r.get("samples_per_cpu_s")


def numpy_rate(channels: int, n: int) -> float:
    import reference
    wins = bench_windows(channels)
    cpu0 = self_cpu()
    for i in range(n):
        reference.analyze(wins[i % 8], FS, PARAMS)
    return n * channels * FRAMES / (self_cpu() - cpu0)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = REPO / "modules" / "src" / "bearing"
        wasm = build_module(src, Path(tmp) / "bearing.wasm").out.read_bytes()
        simd = build_module(src, Path(tmp) / "bearing.simd.wasm", simd=True).out.read_bytes()
    print(f"\nbearing: full analysis (features, velocity, bands, envelope spectrum, baseline score), "
          f"windows of {FRAMES} frames at {FS / 1000:g} kHz; M samples per CPU-second, one core")
    print(f"{'channels':>8}  {'wasm3 C FFT':>12} {'wasm3+host':>11} {'wasmtime C FFT':>15} {'wasmtime+host':>14} "
          f"{'native C':>9} {'numpy':>7}   {'host/native':>11} {'host/C-FFT':>10} {'wasmtime C/native':>17}  "
          f"{'diagnosing, wasm3+host':>22}")
    for channels in (1, 4):
        c = worker_rate(wasm, False, channels, 20)
        host = worker_rate(wasm, True, channels, 200)
        wt_c = worker_rate(simd, False, channels, 400, engine="wasmtime", simd=True)
        wt_host = worker_rate(simd, True, channels, 400, engine="wasmtime", simd=True)
        native = native_c_rate(channels, 2000)
        ref = numpy_rate(channels, 100)
        nat = f"{native / 1e6:9.1f}" if native else f"{'-':>9}"
        ratio = f"{host / native:10.2f}x" if native else f"{'-':>11}"
        wt_ratio = f"{wt_c / native:16.2f}x" if native else f"{'-':>17}"
        diag = worker_rate(wasm, True, channels, 200, fault=True)
        print(f"{channels:>8}  {c / 1e6:>12.2f} {host / 1e6:>11.2f} {wt_c / 1e6:>15.2f} {wt_host / 1e6:>14.2f} "
              f"{nat} {ref / 1e6:>7.2f}   {ratio} {host / c:>9.1f}x {wt_ratio}  {diag / 1e6:>22.2f}")
    print("target (issue 3): wasm3 + host DSP >= 0.5x native and >= 20 M samples/s per core; "
          "(issue 19): wasmtime C FFT >= 0.5x native C")


if __name__ == "__main__":
    main()
