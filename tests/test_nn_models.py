"""The two trained models (modules/models): the committed files are what their reports say, and
their compiled modules compute what onnxruntime computes on the real held-out windows and frames,
in wasm3 and through the host's native twin (ap.nn_run). Float: within 1e-4 relative (absolute
1e-6 for probabilities near zero, where a relative figure means nothing); int8: within one step
of the output's quantization (1 LSB)."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from appliance_tools.evaluation import nn as evaluation_nn
from conftest import REPO, SHARED_DATA, shared_file

MODELS = REPO / "modules" / "models"
sys.path.insert(0, str(MODELS))
import nn_data  # noqa: E402

RTOL, ATOL = 1e-4, 1e-6


def _report(model: str) -> dict:
    return json.loads((MODELS / model / "report.json").read_text())


def ort_outputs(path: Path, inputs: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[None]})[0] for x in inputs])


def output_lsb(path: Path) -> float:
    """The step of an int8 model's output: the scale of the DequantizeLinear that produces it."""
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(path))
    node = next(n for n in m.graph.node if m.graph.output[0].name in n.output)
    assert node.op_type == "DequantizeLinear", f"{path.name}: output made by {node.op_type}"
    scale = next(i for i in m.graph.initializer if i.name == node.input[1])
    return float(numpy_helper.to_array(scale))


def agree(kind: str, got: np.ndarray, want: np.ndarray, lsb: float) -> tuple[bool, str]:
    """Within tolerance, and the worst element for the message."""
    if kind == "float":
        excess = np.abs(got - want) - (RTOL * np.abs(want) + ATOL)
    else:
        excess = np.abs(got - want) - lsb * (1 + 1e-6)
    i = np.unravel_index(np.argmax(excess), excess.shape)
    return bool(excess.max() <= 0), f"worst at {i}: module {got[i]!r}, onnxruntime {want[i]!r}"


def run_module(wasm: Path, inputs, host_nn: bool = False) -> tuple[np.ndarray, list[dict]]:
    from appliance_tools.nn.run import ModelModule
    m = ModelModule(wasm, host_nn=host_nn)
    outs, feats = [], []
    for x in inputs:
        r = m.process(x)
        assert r.rc == 0, r.logs
        outs.append(r.outputs)
        feats.append(dict(r.features))
    return np.stack(outs), feats


@pytest.fixture(scope="module")
def modules(tmp_path_factory) -> dict[str, Path]:
    return evaluation_nn.build(tmp_path_factory.mktemp("nn-models"))


@pytest.fixture(scope="module")
def held_out_windows() -> list[tuple[nn_data.Recording, np.ndarray]]:
    shared_file("bearing", "cwru", "normal_0hp_48k.mat")
    return [(r, nn_data.windows(r.signal[r.split:], nn_data.WINDOW)) for r in nn_data.recordings()]


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return nn_data.read_frames(shared_file("video", "vtest.avi"))


@pytest.mark.parametrize("model", ["bearing_cnn", "people_cnn"])
def test_committed_models_are_what_their_reports_say(model):
    import onnx
    report = _report(model)
    sizes = {}
    for kind, info in report["files"].items():
        path = MODELS / model / info["file"]
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"], f"{path} is not the file its report scored"
        sizes[kind] = len(data)
        m = onnx.load_from_string(data)
        onnx.checker.check_model(m, full_check=True)
        opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
        assert 13 <= opset <= 17, f"{path.name}: opset {opset}"
        (inp,) = m.graph.input
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
        assert dims == report["input"]["shape"] and dims[0] == 1, f"{path.name}: input {dims}"
        ops = {n.op_type for n in m.graph.node}
        if kind == "int8":
            assert "QLinearConv" in ops and "Conv" not in ops, f"{path.name}: not quantized: {sorted(ops)}"
        else:
            assert not any(op.startswith("QLinear") or op.endswith("QuantizeLinear") for op in ops), sorted(ops)
    assert sizes["int8"] < 0.6 * sizes["float"], sizes


def test_bearing_split_is_in_time(held_out_windows):
    """Held-out windows start at the split and the report's split is the data's 70 % mark (the
    healthy recording's half: the second half is what `appliance eval bearing` must keep quiet)."""
    split = _report("bearing_cnn")["split"]
    for r, xs in held_out_windows:
        entry = split["recordings"][r.name]
        fraction = 0.5 if r.label == "normal" else 0.7
        assert entry["samples"] == len(r.signal) and entry["split_sample"] == int(len(r.signal) * fraction) == r.split
        assert len(xs) == (len(r.signal) - r.split) // nn_data.WINDOW
        np.testing.assert_array_equal(xs[0], r.signal[r.split:r.split + nn_data.WINDOW])


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_bearing_module_computes_what_onnxruntime_computes(held_out_windows, modules, kind):
    report = _report("bearing_cnn")
    labels = report["output"]["labels"]
    onnx_path = MODELS / "bearing_cnn" / report["files"][kind]["file"]
    wasm = modules["bearing_cnn" if kind == "float" else "bearing_cnn_int8"]
    lsb = output_lsb(onnx_path) if kind == "int8" else 0.0
    for r, xs in held_out_windows:
        want = ort_outputs(onnx_path, xs[:, None, :])
        got, feats = run_module(wasm, xs[:, None, :])
        ok, worst = agree(kind, got, want[:, :], lsb)
        assert ok, f"{r.name} ({kind}): {worst}"
        # The features are the outputs; the class is their argmax; the tally is the report's.
        for f, out in zip(feats, got):
            assert [f[f"p.{c}"] for c in labels] == pytest.approx(out.tolist(), rel=1e-6, abs=1e-7)
            assert int(f["class"]) == int(np.argmax(out)) and f["nn.host"] == 0
        classes = np.bincount(got.argmax(1), minlength=len(labels))
        assert dict(zip(labels, classes.tolist())) == report["held_out"][kind]["per_file"][r.name]["predicted"]


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_bearing_host_twin_gives_the_same_outputs(held_out_windows, modules, kind):
    wasm = modules["bearing_cnn" if kind == "float" else "bearing_cnn_int8"]
    xs = np.concatenate([x[::4] for _, x in held_out_windows])[:, None, :]
    own, own_f = run_module(wasm, xs, host_nn=False)
    host, host_f = run_module(wasm, xs, host_nn=True)
    assert all(f["nn.host"] == 1 for f in host_f), "the native twin did not run"
    assert all(f["nn.host"] == 0 for f in own_f)
    np.testing.assert_array_equal(host, own)


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_people_module_computes_what_onnxruntime_computes(frames, modules, kind):
    report = _report("people_cnn")
    onnx_path = MODELS / "people_cnn" / report["files"][kind]["file"]
    wasm = modules["people_cnn" if kind == "float" else "people_cnn_int8"]
    held = frames[slice(*report["split"]["held_out"])]
    x = held.astype(np.float32)[:, None] * np.float32(report["input"]["scale"]) + np.float32(report["input"]["offset"])
    want = ort_outputs(onnx_path, x)
    got, feats = run_module(wasm, held)
    lsb = output_lsb(onnx_path) if kind == "int8" else 0.0
    ok, worst = agree(kind, got, want, lsb)
    assert ok, f"people_cnn ({kind}): {worst}"
    assert [f["people"] for f in feats] == pytest.approx(got[:, 0].tolist(), rel=1e-6)
    labels = evaluation_nn.camera_labels()[slice(*report["split"]["held_out"])]
    mae = float(np.abs(got[:, 0] - labels).mean())
    # The task figure of the report, from the module's own numbers.
    assert mae == pytest.approx(report["held_out"][kind]["mae"], abs=1e-4 if kind == "float" else lsb)


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_people_host_twin_gives_the_same_outputs(frames, modules, kind):
    wasm = modules["people_cnn" if kind == "float" else "people_cnn_int8"]
    some = frames[::16]
    own, _ = run_module(wasm, some, host_nn=False)
    host, host_f = run_module(wasm, some, host_nn=True)
    assert all(f["nn.host"] == 1 for f in host_f), "the native twin did not run"
    np.testing.assert_array_equal(host, own)


def test_parity_check_catches_a_changed_weight(tmp_path, frames):
    """The comparison above is not blind: one weight of the first convolution 2 % off is caught."""
    import onnx
    from onnx import numpy_helper
    from appliance_tools.nn import compile_model
    report = _report("people_cnn")
    path = MODELS / "people_cnn" / report["files"]["float"]["file"]
    m = onnx.load(str(path))
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    w = next(i for i in m.graph.initializer if i.name == conv.input[1])
    arr = numpy_helper.to_array(w).copy()
    arr.flat[4] *= 1.02
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    mutated = tmp_path / "mutated.onnx"
    onnx.save(m, str(mutated))
    spec = evaluation_nn.SPECS["people_cnn"]
    wasm = compile_model(mutated, tmp_path / "mutated.wasm", native=False, **spec.compile_options()).wasm
    some = frames[::40]
    x = some.astype(np.float32)[:, None] * np.float32(report["input"]["scale"])
    got, _ = run_module(wasm, some)
    assert agree("float", got, ort_outputs(mutated, x), 0.0)[0], "the mutated model itself compiles faithfully"
    assert not agree("float", got, ort_outputs(path, x), 0.0)[0], "a 2 % change of one weight went unnoticed"


def test_labels_are_reproducible():
    """labels.csv is what the documented procedure gives on the video today."""
    video = shared_file("video", "vtest.avi")
    committed = evaluation_nn.camera_labels()
    np.testing.assert_array_equal(nn_data.people_labels(video), committed)


def test_data_location_is_the_shared_folder():
    assert nn_data.DATA == SHARED_DATA
