"""The two trained models (modules/models), float and int8: latency per inference (p50, p99) and
inferences per CPU-second on one core, four ways side by side:

  wasm3            the compiled module's own code in wasm3 (host_nn off; x.wasm, no SIMD)
  wasm3 + nn_run   the same module, the network run by its native twin through ap.nn_run (host_nn on)
  wasmtime         the SIMD128 build beside it (x.simd.wasm) in wasmtime, its own code (host_nn off)
  onnxruntime      the .onnx file itself, CPU provider, one thread
  native alone     the native twin's forward pass called directly on the input onnxruntime gets,
                   measured as onnxruntime is (the network alone): the twin against onnxruntime
                   like for like (the two module columns include the module's own per-call work)

wasmtime is the appliance's engine (appliance.runtime.engines.WasmtimeBackend, without a
deadline), compiled once before the timing; its row says so when wasmtime is not installed. wasm3, wasm3 + nn_run and wasmtime run the module in this process (appliance_tools.nn.run.ModelModule: the same
module and engine a worker runs, without the process boundary), so a call is what ap_process
costs: the window copied in, the input scaling, the network, the features and the rule. CPU time
is this process's (user + system); onnxruntime's figure is for session.run alone. Inputs: the
held-out windows and frames from ../shared/data when there, else random ones of the same shape.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance_tools.evaluation import nn as evaluation_nn  # noqa: E402
from appliance_tools.nn.run import ModelModule  # noqa: E402
from common import self_cpu  # noqa: E402

MODELS = REPO / "modules" / "models"
CALLS = {"bearing_cnn": 400, "people_cnn": 150}
TARGET_FPS = 10.0          # issue 9: the 2-D CNN in pure wasm3, frames per second per core


def inputs(model: str, count: int) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """(what the module gets, what onnxruntime gets, where they came from)."""
    report = json.loads((MODELS / model / "report.json").read_text())
    sys.path.insert(0, str(MODELS))
    import nn_data
    rng = np.random.default_rng(0)
    if model == "bearing_cnn":
        try:
            recs = nn_data.recordings()
            xs = np.concatenate([nn_data.windows(r.signal[r.split:], nn_data.WINDOW) for r in recs])
            where = f"{len(xs)} held-out CWRU windows, cycled"
        except FileNotFoundError:
            xs = rng.normal(0, 0.3, (64, nn_data.WINDOW)).astype(np.float32)
            where = "random windows (no CWRU data found)"
        xs = [xs[i % len(xs)][None] for i in range(count)]
        return xs, [x[None] for x in xs], where
    try:
        frames = nn_data.read_frames()[slice(*report["split"]["held_out"])]
        where = f"{len(frames)} held-out frames of vtest.avi, cycled"
    except FileNotFoundError:
        frames = rng.integers(0, 256, (32, 96, 96), dtype=np.uint8)
        where = "random frames (no video found)"
    frames = [frames[i % len(frames)] for i in range(count)]
    scale, offset = np.float32(report["input"]["scale"]), np.float32(report["input"]["offset"])
    return frames, [(f.astype(np.float32) * scale + offset)[None, None] for f in frames], where


def native_alone(wasm: Path, ort_in: list[np.ndarray]) -> tuple[float, float, float] | None:
    """The native twin for this machine beside `wasm`, its forward pass alone (None: no twin here)."""
    import ctypes
    from appliance.deploy.bundle import native_twins
    from appliance.runtime.hostcalls.nn import bind_native, machine_arch
    names = [n for n in native_twins(wasm, wasm.read_bytes()) if n.endswith(f"-{machine_arch()}.so")]
    if not names:
        return None
    twin = bind_native(ctypes.CDLL(str(wasm.with_name(names[0]))), names[0])
    out = np.empty(twin.out_bytes // 4, np.float32)
    inputs = [np.ascontiguousarray(x, np.float32) for x in ort_in]
    assert inputs[0].nbytes == twin.in_bytes, (inputs[0].nbytes, twin.in_bytes)

    def run(x: np.ndarray) -> None:
        if twin.run(x.ctypes.data, x.nbytes, out.ctypes.data, out.nbytes) != 0:
            raise SystemExit(f"{names[0]}: the native twin refused its input")
    return measure(run, inputs)


def measure(call, items) -> tuple[float, float, float]:
    """p50 and p99 latency (ms) and calls per CPU-second, after a few warm-up calls."""
    for x in items[:5]:
        call(x)
    lat = []
    cpu0 = self_cpu()
    for x in items:
        t = time.perf_counter()
        call(x)
        lat.append(time.perf_counter() - t)
    cpu = self_cpu() - cpu0
    return float(np.percentile(lat, 50) * 1e3), float(np.percentile(lat, 99) * 1e3), len(items) / cpu


def wasmtime_missing() -> str:
    """Why wasmtime cannot run here ('' when it can)."""
    try:
        import wasmtime  # noqa: F401
    except ImportError as exc:
        return f"wasmtime is not installed ({exc})"
    return ""


def main() -> int:
    import onnxruntime as ort
    rows = []
    notes = []
    wt_missing = wasmtime_missing()
    if wt_missing:
        notes.append(f"wasmtime: {wt_missing}: no figures in its column")
    with tempfile.TemporaryDirectory(prefix="bench-nn-") as tmp:
        built = evaluation_nn.build(Path(tmp))
        for model in ("bearing_cnn", "people_cnn"):
            module_in, ort_in, where = inputs(model, CALLS[model])
            notes.append(f"{model}: {where}")
            report = json.loads((MODELS / model / "report.json").read_text())
            for kind in ("float", "int8"):
                wasm = built[model if kind == "float" else f"{model}_int8"]
                figures = {}
                for path_name, host in (("wasm3", False), ("wasm3 + nn_run", True)):
                    m = ModelModule(wasm, host_nn=host)
                    figures[path_name] = measure(m.process, module_in)
                    if host and m.process(module_in[0]).features.get("nn.host") != 1:
                        figures[path_name] = None        # the twin did not run here: no figure
                figures["wasmtime"] = None
                if not wt_missing:
                    # The compiler ran wasm-validate on x.simd.wasm (SIMD allowed) when it built it.
                    m = ModelModule(wasm.with_suffix(".simd.wasm"), host_nn=False, engine="wasmtime",
                                    validated=True)
                    ref = ModelModule(wasm, host_nn=False).process(module_in[0]).outputs
                    if m.process(module_in[0]).outputs.tobytes() != ref.tobytes():
                        raise SystemExit(f"{model} {kind}: the SIMD128 build in wasmtime differs from wasm3")
                    figures["wasmtime"] = measure(m.process, module_in)
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 1
                opts.inter_op_num_threads = 1
                sess = ort.InferenceSession(str(MODELS / model / report["files"][kind]["file"]), opts,
                                            providers=["CPUExecutionProvider"])
                name = sess.get_inputs()[0].name
                figures["onnxruntime"] = measure(lambda x, s=sess, n=name: s.run(None, {n: x}), ort_in)
                figures["native alone"] = native_alone(wasm, ort_in)
                rows.append((model, kind, figures, wasm.stat().st_size))
    unit = {"bearing_cnn": "windows", "people_cnn": "frames"}
    print("\nnn: the trained models, latency per inference and inferences per CPU-second on one core")
    cols = (("wasm3", "wasm3 p50/p99 ms", 17, 6), ("wasm3 + nn_run", "+nn_run p50/p99 ms", 18, 7),
            ("wasmtime", "wasmtime p50/p99 ms", 19, 7), ("onnxruntime", "onnxruntime p50/p99 ms", 22, 7),
            ("native alone", "native alone p50/p99", 20, 7))
    head = f"{'model':<12} {'kind':<5} {'module':>8}  | " + " | ".join(f"{t:>{w}} {'/s':>{n}}" for _, t, w, n in cols) \
        + " | vs onnxruntime: nn_run, wasmtime, native alone"
    print(head)
    print("-" * len(head))
    for model, kind, f, size in rows:
        cells = []
        for key, _, w, n in cols:
            v = f[key]
            if v is None:
                why = "not installed" if key == "wasmtime" and wt_missing else "n/a"
                cells.append(f"{why:>{w}} {'':>{n}}")
            else:
                cells.append(f"{f'{v[0]:.3f}/{v[1]:.3f}':>{w}} {v[2]:>{n}.0f}")
        ratios = ", ".join("-" if f[k] is None else f"{f[k][2] / f['onnxruntime'][2]:.2f}x"
                           for k in ("wasm3 + nn_run", "wasmtime", "native alone"))
        print(f"{model:<12} {kind:<5} {size:>7}B  | " + " | ".join(cells) + f" | {ratios}")
    for n in notes:
        what = n.split(":")[0]
        print(f"  {n}; /s = {unit[what]} per CPU-second" if what in unit else f"  {n}")
    worst = min(f["wasm3"][2] for model, _, f, _ in rows if model == "people_cnn")
    print(f"target (issue 9): the 2-D CNN >= {TARGET_FPS:.0f} frames/s per core in pure wasm3: "
          f"{worst:.0f} frames/s (slower of float and int8): {'ok' if worst >= TARGET_FPS else 'BELOW'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
