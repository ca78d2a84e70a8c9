"""Whole small models through `appliance model compile` (float, and int8 quantized by
onnxruntime.quantization in both of its formats) against onnxruntime; the module's params,
rules and events; refusals with their messages; reproducible bytes; the memory budget."""
from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

import onnx  # noqa: E402
import onnxruntime  # noqa: E402,F401
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static  # noqa: E402

from appliance.runtime.inspect import check_module_file  # noqa: E402
from appliance.runtime.validate import wasm_validate  # noqa: E402
from appliance_tools.nn import ModelError, compile_model  # noqa: E402
from appliance_tools.nn.parity import float_mismatch, ort_session, quant_mismatch  # noqa: E402
from appliance_tools.nn.run import ModelModule, ModuleCallError  # noqa: E402

SEED = 7


def _init(name, arr, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(arr, dtype), name)


def _save(tmp_path, name, nodes, inits, in_shape, out_shape, opset=13, in_name="x"):
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, in_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    path = tmp_path / f"{name}.onnx"
    onnx.save(m, str(path))
    return path


def cnn2d(tmp_path, residual: bool = True):
    """Three conv layers on a 32x32 gray frame (with a residual Add), pools, GAP, Gemm, Softmax."""
    rng = np.random.default_rng(SEED)
    n, i, c = [], [], 1
    x = "x"
    for k, m in enumerate([6, 8, 8]):
        n += [helper.make_node("Conv", [x, f"w{k}", f"b{k}"], [f"c{k}"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", [f"c{k}"], [f"r{k}"])]
        i += [_init(f"w{k}", rng.normal(size=(m, c, 3, 3)) * np.sqrt(2 / (9 * c))),
              _init(f"b{k}", rng.normal(size=m) * .1)]
        x = f"r{k}"
        if k == 0:
            n.append(helper.make_node("MaxPool", [x], ["p0"], kernel_shape=[2, 2], strides=[2, 2]))
            x = "p0"
        c = m
    if residual:
        n.append(helper.make_node("Add", ["r2", "r1"], ["a"]))
        x = "a"
    n += [helper.make_node("AveragePool", [x], ["ap"], kernel_shape=[2, 2], strides=[2, 2]),
          helper.make_node("GlobalAveragePool", ["ap"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
          helper.make_node("Gemm", ["f", "wf", "bf"], ["l"], transB=1),
          helper.make_node("Softmax", ["l"], ["y"], axis=1)]
    i += [_init("wf", rng.normal(size=(3, 8)) * 2), _init("bf", rng.normal(size=3) * .1)]
    return _save(tmp_path, "cnn2d" + ("_res" if residual else ""), n, i, [1, 1, 32, 32], [1, 3])


def cnn1d(tmp_path):
    """A 1-D CNN on 2 channels x 256 samples: conv k7 stride 2, conv k5, maxpool, GAP, Gemm, Softmax."""
    rng = np.random.default_rng(SEED + 1)
    n = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], strides=[2], pads=[3, 3]),
         helper.make_node("Relu", ["c0"], ["r0"]),
         helper.make_node("MaxPool", ["r0"], ["p0"], kernel_shape=[4], strides=[4]),
         helper.make_node("Conv", ["p0", "w1", "b1"], ["c1"], pads=[2, 2]),
         helper.make_node("Relu", ["c1"], ["r1"]),
         helper.make_node("GlobalAveragePool", ["r1"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
         helper.make_node("Gemm", ["f", "wf", "bf"], ["l"], transB=1),
         helper.make_node("Softmax", ["l"], ["y"], axis=1)]
    i = [_init("w0", rng.normal(size=(8, 2, 7)) * .3), _init("b0", rng.normal(size=8) * .1),
         _init("w1", rng.normal(size=(12, 8, 5)) * .2), _init("b1", rng.normal(size=12) * .1),
         _init("wf", rng.normal(size=(4, 12)) * 2), _init("bf", rng.normal(size=4) * .1)]
    return _save(tmp_path, "cnn1d", n, i, [1, 2, 256], [1, 4])


def mlp(tmp_path):
    """MatMul + Add + Relu, Gemm, Sigmoid: one score."""
    rng = np.random.default_rng(SEED + 2)
    n = [helper.make_node("MatMul", ["x", "w0"], ["m"]), helper.make_node("Add", ["m", "b0"], ["a"]),
         helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Gemm", ["r", "w1", "b1"], ["l"]),
         helper.make_node("Sigmoid", ["l"], ["y"])]
    i = [_init("w0", rng.normal(size=(64, 16)) * .2), _init("b0", rng.normal(size=16) * .1),
         _init("w1", rng.normal(size=(16, 1))), _init("b1", [0.1])]
    return _save(tmp_path, "mlp", n, i, [1, 64], [1, 1])


class Calibration(CalibrationDataReader):
    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self.it = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self.it, None)


def quantize(path, fmt: str, act: QuantType, samples: list[np.ndarray], per_channel: bool):
    """reduce_range: 7-bit weights, as onnxruntime advises for x86-64 CPUs without VNNI. There
    (AVX2 alone: this machine's AMD Zen 3) its u8 x s8 kernel adds pairs of products in saturating
    16-bit lanes, so with full-range weights onnxruntime, the reference, was 3 to 79 LSB off on
    these networks; our kernels sum exactly in int32 either way."""
    out = path.with_name(f"{path.stem}_{fmt}_{act.name}.onnx")
    quantize_static(str(path), str(out), Calibration("x", samples),
                    quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                    activation_type=act, weight_type=QuantType.QInt8, per_channel=per_channel, reduce_range=True)
    return out


def output_lsb(path) -> float:
    """The quantization step of the model's output (its last DequantizeLinear)."""
    m = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    last = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "y"]
    assert last, "the quantized model should end in DequantizeLinear"
    return float(inits[last[0].input[1]])


def frames(rng, n, shape):
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for _ in range(n)]


def _compare(module: ModelModule, sess, inputs, to_model, lsb: float | None):
    worst = ""
    for x in inputs:
        ref = sess.run(None, {"x": to_model(x)})[0]
        res = module.process(x)
        assert res.rc == 0, res.logs
        why = quant_mismatch(res.outputs, ref, lsb) if lsb else float_mismatch(res.outputs, ref)
        worst = worst or why
    return worst


CASES = [
    ("float", None, None),
    ("qoperator", QuantType.QUInt8, False),
    ("qoperator", QuantType.QInt8, False),
    ("qdq", QuantType.QUInt8, True),
    ("qdq", QuantType.QInt8, True),
]


@pytest.mark.parametrize("fmt,act,per_channel", CASES,
                         ids=["float", "qop-u8", "qop-s8", "qdq-u8-perchannel", "qdq-s8-perchannel"])
def test_2d_cnn_on_frames_matches_onnxruntime(tmp_path, fmt, act, per_channel):
    """int8 within 1 LSB of the output, although onnxruntime runs int8 QDQ Add (and the
    convolution beside it) in float where the compiler fuses them into integer kernels."""
    rng = np.random.default_rng(SEED)
    path = cnn2d(tmp_path, residual=True)
    scale = np.float32(1 / 255)
    to_model = lambda f: (f.astype(np.float32) * scale)[None, None]  # noqa: E731 - the module's own formula
    if fmt != "float":
        path = quantize(path, fmt, act, [to_model(f) for f in frames(rng, 8, (32, 32))], per_channel)
    r = compile_model(path, tmp_path / "m.wasm", scale=float(scale), labels=["none", "a", "b"], native=False)
    assert r.source.startswith("32x32 frame")
    module = ModelModule(r.wasm)
    why = _compare(module, ort_session(path), frames(rng, 6, (32, 32)), to_model,
                   output_lsb(path) if fmt != "float" else None)
    assert why == "", why


@pytest.mark.parametrize("fmt,act,per_channel", [("float", None, None), ("qoperator", QuantType.QUInt8, False),
                                                 ("qdq", QuantType.QInt8, True)],
                         ids=["float", "qop-u8", "qdq-s8"])
def test_1d_cnn_on_sample_windows_matches_onnxruntime(tmp_path, fmt, act, per_channel):
    rng = np.random.default_rng(SEED)
    path = cnn1d(tmp_path)
    to_model = lambda w: (w * np.float32(2.0) - np.float32(0.5))[None]  # noqa: E731 - scale 2, offset -0.5
    windows = [rng.normal(size=(2, 256)).astype(np.float32) for _ in range(6)]
    if fmt != "float":
        path = quantize(path, fmt, act, [to_model(w) for w in windows[:3]], per_channel)
    r = compile_model(path, tmp_path / "m.wasm", scale=2.0, offset=-0.5, labels=["ok", "x", "y", "z"], native=False)
    assert r.source == "window of 2x256 float32 samples"
    module = ModelModule(r.wasm)
    why = _compare(module, ort_session(path), windows[3:], to_model, output_lsb(path) if fmt != "float" else None)
    assert why == "", why


def test_mlp_score_matches_onnxruntime(tmp_path):
    rng = np.random.default_rng(SEED)
    path = mlp(tmp_path)
    r = compile_model(path, tmp_path / "m.wasm", rule="score", threshold=0.9, native=False)
    assert r.features == ["score"]
    module = ModelModule(r.wasm)
    why = _compare(module, ort_session(path), [rng.normal(size=(1, 64)).astype(np.float32) for _ in range(5)],
                   lambda w: w, None)
    assert why == ""


# ---- the module: params, rules, events -------------------------------------------------------

def argmax_model(tmp_path):
    """y = softmax(10 x): the window's three samples pick the class."""
    n = [helper.make_node("Mul", ["x", "k"], ["l"]), helper.make_node("Softmax", ["l"], ["y"], axis=-1)]
    return _save(tmp_path, "argmax", n, [_init("k", [10.0])], [1, 3], [1, 3])


def test_classifier_rule_one_event_per_episode_with_hysteresis(tmp_path):
    r = compile_model(argmax_model(tmp_path), tmp_path / "c.wasm", labels=["normal", "inner", "outer"],
                      consecutive=3, clear=2, threshold=0.9, severity=2, native=False)
    assert r.rule == "classifier" and r.labels == ["normal", "inner", "outer"]
    m = ModelModule(r.wasm)
    normal, inner, outer, weak = ([1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0.1, 0])
    seq = [normal, inner, inner, inner, inner, outer, inner, normal, inner, normal, normal, inner, inner, inner, weak]
    events = []
    for k, s in enumerate(seq):
        res = m.process(np.array([s], np.float32))
        assert res.features["class"] == int(np.argmax(s))
        assert abs(res.features["p.inner"] - res.outputs[1]) == 0.0
        events += [(k, e) for e in res.events]
    # inner x3 -> alarm at window 3; outer/inner keep the episode; one normal is not enough to
    # clear (clear=2), two are (window 10); inner x3 again -> a new alarm at window 13.
    assert [(k, e[0]) for k, e in events] == [(3, 2), (10, 0), (13, 2)], events
    assert "class 'inner'" in events[0][1][2] and "for 3 windows in a row" in events[0][1][2]
    assert "back to 'normal'" in events[1][1][2]
    assert events[0][1][1] == pytest.approx(1.0, abs=1e-4)   # the score is the class probability


def test_params_override_the_compiled_rule(tmp_path):
    r = compile_model(argmax_model(tmp_path), tmp_path / "c.wasm", labels=["normal", "inner", "outer"],
                      consecutive=3, native=False)
    m = ModelModule(r.wasm, {"consecutive": 1, "severity": 1, "normal": ["normal", "outer"],
                             "severity.inner": 3})
    assert m.process(np.array([[0, 0, 1]], np.float32)).events == []            # outer is normal now
    ev = m.process(np.array([[0, 1, 0]], np.float32)).events
    assert len(ev) == 1 and ev[0][0] == 3                                       # per-label severity
    m2 = ModelModule(r.wasm, {"consecutive": 1, "input": {"scale": 0.0, "offset": 0.0}})
    res = m2.process(np.array([[0, 1, 0]], np.float32))
    assert res.features["p.normal"] == pytest.approx(1 / 3) and res.events == []   # all-zero input


@pytest.mark.parametrize("params,message", [
    ({"threshhold": 0.5}, "unknown param 'threshhold'"),
    ({"normal": "sideways"}, "no label 'sideways'"),
    ({"consecutive": 0}, "param consecutive: not a number in 1"),
    ({"severity": 7}, "param severity: not a number in 0"),
    ({"input": {"scale": "1,2"}}, "give one value or one per channel"),
])
def test_bad_params_are_refused_by_the_module(tmp_path, params, message):
    r = compile_model(argmax_model(tmp_path), tmp_path / "c.wasm", labels=["normal", "inner", "outer"], native=False)
    with pytest.raises(ModuleCallError) as info:
        ModelModule(r.wasm, params)
    assert message in str(info.value)


def test_score_rule_threshold_and_clear_threshold(tmp_path):
    n = [helper.make_node("GlobalAveragePool", ["x"], ["g"]), helper.make_node("Flatten", ["g"], ["y"])]
    path = _save(tmp_path, "mean", n, [], [1, 1, 8], [1, 1])
    r = compile_model(path, tmp_path / "s.wasm", rule="score", threshold=1.0, clear_threshold=0.5, consecutive=2,
                      clear=1, feature_names=["level"], native=False)
    m = ModelModule(r.wasm)
    levels = [0.2, 1.5, 1.6, 1.7, 0.8, 0.7, 0.4, 1.2, 1.3]
    got = []
    for k, v in enumerate(levels):
        res = m.process(np.full((1, 8), v, np.float32))
        assert res.features["level"] == pytest.approx(v)
        got += [(k, e[0]) for e in res.events]
    # above 1.0 twice -> event at 2; 0.8 and 0.7 are between the thresholds: no clear; 0.4 clears.
    assert got == [(2, 2), (6, 0), (8, 2)]


def test_window_of_the_wrong_shape_is_rejected(tmp_path):
    r = compile_model(argmax_model(tmp_path), tmp_path / "c.wasm", labels=["normal", "inner", "outer"], native=False)
    m = ModelModule(r.wasm)
    res = m.process(np.zeros((2, 3), np.float32))
    assert res.rc == -1
    assert "expected 1 channel(s) x 3 float32 samples, got 2 x 3" in res.logs[-1][1]
    assert m.process(np.zeros((4, 4), np.uint8)).rc == -1


def test_a_gap_breaks_a_run(tmp_path):
    r = compile_model(argmax_model(tmp_path), tmp_path / "c.wasm", labels=["normal", "inner", "outer"],
                      consecutive=3, native=False)
    m = ModelModule(r.wasm)
    inner = np.array([[0, 1, 0]], np.float32)
    assert m.process(inner).events == [] and m.process(inner).events == []
    assert m.process(inner, dropped=2).events == []   # windows were lost: the run starts again
    assert m.process(inner).events == []
    assert len(m.process(inner).events) == 1


# ---- refusals -----------------------------------------------------------------------------------

def test_unsupported_operator_is_named_with_node_and_file(tmp_path):
    n = [helper.make_node("Relu", ["x"], ["r"], name="act"), helper.make_node("Erf", ["r"], ["y"], name="odd_one")]
    path = _save(tmp_path, "erf", n, [], [1, 8], [1, 8])
    with pytest.raises(ModelError) as info:
        compile_model(path, tmp_path / "e.wasm", native=False)
    msg = str(info.value)
    assert msg.startswith("erf.onnx: node 1 'odd_one' (Erf): operator Erf is not supported (supported: ")


def test_dynamic_dimension_needs_a_shape_and_batch_must_be_one(tmp_path):
    n = [helper.make_node("Relu", ["x"], ["y"])]
    path = _save(tmp_path, "dyn", n, [], ["batch", 16], ["batch", 16])
    with pytest.raises(ModelError, match=r"dyn.onnx: input 'x' has dynamic dimension\(s\) \(batchx16\); fix them "
                                         r"with --input-shape"):
        compile_model(path, tmp_path / "d.wasm", native=False)
    with pytest.raises(ModelError, match="batch dimension 4; a module runs one window at a time"):
        compile_model(path, tmp_path / "d.wasm", input_shape=(4, 16), native=False)
    r = compile_model(path, tmp_path / "d.wasm", input_shape=(1, 16), native=False)
    assert r.input_shape == (1, 16)


def test_runtime_weights_and_unknown_shapes_in_the_graph_are_refused(tmp_path):
    n = [helper.make_node("Conv", ["x", "x"], ["y"], name="selfconv")]
    g = helper.make_graph(n, "w", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 3, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "w.onnx"))
    with pytest.raises(ModelError, match=r"w.onnx: node 0 'selfconv' \(Conv\): weight W 'x' must be a constant"):
        compile_model(tmp_path / "w.onnx", tmp_path / "w.wasm", native=False)


def test_not_a_model_and_missing_file(tmp_path):
    bad = tmp_path / "junk.onnx"
    bad.write_bytes(b"\x00\x01 not protobuf at all \xff" * 10)
    with pytest.raises(ModelError, match="junk.onnx: not an ONNX model"):
        compile_model(bad, tmp_path / "j.wasm", native=False)
    with pytest.raises(ModelError, match="no such model file"):
        compile_model(tmp_path / "missing.onnx", tmp_path / "j.wasm", native=False)


def test_memory_budget_is_enforced_with_the_figures(tmp_path):
    rng = np.random.default_rng(1)
    n = [helper.make_node("Gemm", ["x", "w"], ["y"])]
    path = _save(tmp_path, "big", n, [_init("w", rng.normal(size=(1024, 1024)))], [1, 1024], [1, 1024])
    with pytest.raises(ModelError) as info:
        compile_model(path, tmp_path / "b.wasm", memory_mb=2, rule="none", report_outputs=False, native=False)
    msg = str(info.value)
    assert "big.onnx: the module needs 5.2 MiB of memory (weights 4.00 MiB" in msg and "the budget is 2 MiB" in msg


def test_activation_buffers_are_reused(tmp_path):
    """Liveness: the arena is smaller than all activations together."""
    path = cnn2d(tmp_path, residual=False)
    r = compile_model(path, tmp_path / "m.wasm", scale=1 / 255, labels=["none", "a", "b"], native=False)
    total = 4 * (32 * 32 + 6 * 32 * 32 + 6 * 16 * 16 + 8 * 16 * 16 * 2)   # input and the conv outputs alone
    assert r.arena_bytes < total * 0.7, (r.arena_bytes, total)


# ---- the build ------------------------------------------------------------------------------------

def test_reproducible_bytes_and_the_module_checks(tmp_path):
    path = cnn1d(tmp_path)
    a = compile_model(path, tmp_path / "one" / "m.wasm", labels=["ok", "x", "y", "z"])
    b = compile_model(path, tmp_path / "two" / "m.wasm", labels=["ok", "x", "y", "z"])
    assert a.sha256 == b.sha256 and a.model_hash == b.model_hash
    # The SIMD128 sibling: reproducible too, and SIMD indeed (wasm3's validation refuses it).
    assert a.simd_wasm.read_bytes() == b.simd_wasm.read_bytes()
    assert wasm_validate(a.simd_wasm.read_bytes(), "m.simd.wasm")
    assert [(x.arch, x.sha256) for x in a.native] == [(x.arch, x.sha256) for x in b.native]
    assert {x.arch for x in a.native} == {"x86_64", "aarch64"}
    for lib in a.native:
        assert lib.path.name == f"nn-{a.model_hash[:16]}-{lib.arch}.so"
        assert hashlib.sha256(lib.path.read_bytes()).hexdigest() == lib.sha256
    assert check_module_file(a.wasm) == []
    wasm = a.wasm.read_bytes()
    assert a.model_hash.encode() not in wasm and bytes.fromhex(a.model_hash) in wasm   # the descriptor holds it
    assert str(tmp_path).encode() not in wasm


def test_cli_compiles_and_reports_errors(tmp_path):
    path = argmax_model(tmp_path)
    out = tmp_path / "cli" / "argmax.wasm"
    p = subprocess.run([sys.executable, "-m", "appliance", "model", "compile", str(path), "-o", str(out),
                        "--labels", "normal,inner,outer", "--threshold", "0.8", "--severity", "critical",
                        "--no-native"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "rule classifier; labels normal, inner, outer" in p.stdout and out.is_file()
    m = ModelModule(out, {"consecutive": 1})
    assert m.process(np.array([[0, 0, 1]], np.float32)).events[0][0] == 3
    p = subprocess.run([sys.executable, "-m", "appliance", "model", "compile", str(path), "-o", str(out),
                        "--labels", "a,b"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip() == "error: argmax.onnx: 2 labels for output 'y' of 3 values"
    p = subprocess.run([sys.executable, "-m", "appliance", "model", "compile", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "--window CxN" in p.stdout and "--frame WxH[xP]" in p.stdout


def test_names_from_the_model_cannot_break_the_generated_c(tmp_path):
    n = [helper.make_node("Relu", ["x"], ["y"], name='evil */ int x = "\n')]
    path = _save(tmp_path, "names", n, [], [1, 4], [1, 4])
    weird = tmp_path / 'we"ird\\ name.onnx'
    path.rename(weird)
    r = compile_model(weird, tmp_path / "n.wasm", rule="none", native=False, keep_c=tmp_path / "c")
    assert "evil * / int x" in (tmp_path / "c" / "net.c").read_text()
    assert ModelModule(r.wasm).process(np.array([[-1, 2, -3, 4]], np.float32)).outputs.tolist() == [0, 2, 0, 4]


def test_pool_pads_as_wide_as_the_kernel_are_refused(tmp_path):
    """Windows of padding only: an average over zero values (a division by zero in the kernel) or
    the max of nothing (-inf). onnxruntime refuses these too."""
    for op, pads, out in (("AveragePool", [2, 2, 2, 2], [1, 1, 8, 8]), ("MaxPool", [0, 0, 0, 3], [1, 1, 4, 7])):
        n = [helper.make_node(op, ["x"], ["y"], name="pool", kernel_shape=[2, 2], pads=pads)]
        path = _save(tmp_path, op, n, [], [1, 1, 5, 5], out)
        with pytest.raises(ModelError, match=rf"{op}.onnx: node 0 'pool' \({op}\): pads \[.*\] must be smaller than "
                                             r"the kernel \[2, 2\]"):
            compile_model(path, tmp_path / "p.wasm", rule="none", native=False)


def test_per_channel_parameters_of_the_wrong_length_are_refused(tmp_path):
    """The kernels index BatchNormalization's parameters and QLinearConv's bias per channel: a
    shorter array would be read past its end."""
    n = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn")]
    inits = [_init("s", [1.0, 2.0]), _init("b", [0.0, 0.0, 0.0]), _init("m", [0.0, 0.0, 0.0]), _init("v", [1, 1, 1])]
    g = helper.make_graph(n, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "bn.onnx"))
    with pytest.raises(ModelError, match=r"bn.onnx: node 0 'bn' \(BatchNormalization\): scale has shape \(2,\); "
                                         r"the input has 3 channels"):
        compile_model(tmp_path / "bn.onnx", tmp_path / "bn.wasm", rule="none", native=False)
    q = lambda n, v, t=np.uint8: _init(n, v, t)  # noqa: E731
    n = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
         helper.make_node("QLinearConv", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz", "bias"], ["yq"], name="qc"),
         helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    inits = [_init("xs", 0.1), q("xz", 128), q("w", np.ones((4, 1, 1, 1)), np.int8), _init("ws", 0.1),
             q("wz", 0, np.int8), _init("ys", 0.1), q("yz", 128), q("bias", [1, 2], np.int32)]
    path = _save(tmp_path, "qc", n, inits, [1, 1, 3, 3], [1, 4, 3, 3])
    with pytest.raises(ModelError, match=r"qc.onnx: node 1 'qc' \(QLinearConv\): bias is int32 \(2,\); QLinearConv "
                                         r"takes int32 \(4,\)"):
        compile_model(path, tmp_path / "qc.wasm", rule="none", native=False)


def test_a_huge_folded_constant_is_refused_before_it_is_allocated(tmp_path):
    """ConstantOfShape of a crafted shape: refused from the inferred shape, not evaluated (it
    would take 268 MB here, terabytes for a worse shape)."""
    fill = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    n = [helper.make_node("ConstantOfShape", ["shape"], ["big"], name="fill", value=fill),
         helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
         helper.make_node("Add", ["x", "s"], ["y"])]
    path = _save(tmp_path, "fill", n, [_init("shape", [8193, 8192], np.int64)], [1, 4], [1, 4])
    with pytest.raises(ModelError, match=r"fill.onnx: node 0 'fill' \(ConstantOfShape\): constant 'big' of shape "
                                         r"\(8193, 8192\) has 67117056 values \(at most 67108864\)"):
        compile_model(path, tmp_path / "f.wasm", rule="none", native=False)


def test_zero_points_that_do_not_match_the_scales_are_refused(tmp_path):
    """Three per-axis scales with two zero points: a ModelError naming the node, not a numpy
    broadcasting traceback."""
    n = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quant", axis=1),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1)]
    inits = [_init("s", [0.1, 0.2, 0.3]), _init("z", [1, 2], np.uint8)]
    path = _save(tmp_path, "zp", n, inits, [1, 3, 4], [1, 3, 4])
    with pytest.raises(ModelError, match=r"zp.onnx: node 0 'quant' \(QuantizeLinear\): y_zero_point has 2 values "
                                         r"for 3 scale\(s\)"):
        compile_model(path, tmp_path / "zp.wasm", rule="none", native=False)
