"""Side by side with onnxruntime: build small ONNX graphs, run them in onnxruntime (CPU) and as
compiled modules in wasm3, and compare (tests, the trained models' checks, benchmarks).

Tolerances (docs/models.md, "Accuracy"): float outputs within 1e-4 relative, with an absolute
floor of 1e-5 of the output's largest magnitude (values near zero come out of cancellations of
much larger terms, whose rounding is what both sides differ by); quantized outputs within one
step of the output's quantization (1 LSB).

onnx and onnxruntime are imported on use (onnxruntime is a test dependency).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

RTOL = 1e-4
ATOL_OF_MAX = 1e-5


def float_mismatch(got: np.ndarray, ref: np.ndarray, rtol: float = RTOL, atol_of_max: float = ATOL_OF_MAX) -> str:
    """'' when got matches ref within the float tolerance, else what differs."""
    got = np.asarray(got, np.float64).reshape(-1)
    ref = np.asarray(ref, np.float64).reshape(-1)
    if got.shape != ref.shape:
        return f"{got.size} values, expected {ref.size}"
    # NaN and inf must sit where the reference has them (same sign); a NaN difference compares
    # false against any tolerance, so without this a NaN or inf output would pass.
    nonfinite = ~np.isfinite(got) | ~np.isfinite(ref)
    if nonfinite.any():
        same = (np.isnan(got) & np.isnan(ref)) | (got == ref)
        if not same[nonfinite].all():
            i = int(np.flatnonzero(nonfinite & ~same)[0])
            return f"{int((nonfinite & ~same).sum())} of {ref.size} values off; worst at {i}: {got[i]!r} vs {ref[i]!r}"
    got, ref = np.where(nonfinite, 0.0, got), np.where(nonfinite, 0.0, ref)   # matched above
    atol = atol_of_max * max(float(np.max(np.abs(ref), initial=0.0)), 1e-30)
    err = np.abs(got - ref)
    bad = err > rtol * np.abs(ref) + atol
    if not bad.any():
        return ""
    i = int(np.argmax(err - (rtol * np.abs(ref) + atol)))
    return (f"{int(bad.sum())} of {ref.size} values off; worst at {i}: {got[i]!r} vs {ref[i]!r} "
            f"(|diff| {err[i]:.3g}, allowed {rtol * abs(ref[i]) + atol:.3g})")


def quant_mismatch(got: np.ndarray, ref: np.ndarray, lsb: float = 1.0) -> str:
    """'' when every value is within one quantization step `lsb` (raw integers: 1)."""
    got = np.asarray(got, np.float64).reshape(-1)
    ref = np.asarray(ref, np.float64).reshape(-1)
    if got.shape != ref.shape:
        return f"{got.size} values, expected {ref.size}"
    steps = np.abs(got - ref) / lsb
    if steps.max(initial=0) <= 1 + 1e-6:
        return ""
    i = int(np.argmax(steps))
    return f"{int((steps > 1 + 1e-6).sum())} of {ref.size} values off by more than 1 LSB; worst at {i}: " \
           f"{got[i]!r} vs {ref[i]!r} ({steps[i]:.2f} LSB)"


def ort_session(path, optimize: bool = True):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@dataclass
class Case:
    name: str
    output: str
    quantized: bool           # compare raw integers within 1 LSB
    dtype: type | None = None  # the output's type where ONNX cannot infer it (com.microsoft operators)


@dataclass
class GraphBuilder:
    """Many small cases in one graph (one compile): every case reshapes the shared float input
    to its own shape and ends in a graph output named after it."""
    size: int = 720
    opset: int = 13
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    cases: list[Case] = field(default_factory=list)
    _n: int = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, value, dtype=None, base: str = "k") -> str:
        """An initializer: numpy integers keep their type; floats and Python numbers become float32."""
        from onnx import numpy_helper
        name = self.name(base)
        if dtype is None:
            is_np = isinstance(value, (np.ndarray, np.generic))
            dtype = value.dtype if is_np and not np.issubdtype(value.dtype, np.floating) else np.float32
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs) -> str | list[str]:
        from onnx import helper
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op), domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def input(self, shape) -> str:
        """The shared input (its first prod(shape) values) in this shape."""
        n = int(np.prod(shape))
        if n > self.size:
            raise ValueError(f"shape {shape} needs {n} values; the shared input has {self.size}")
        src = "x"
        if n < self.size:
            src = self.node("Slice", ["x", self.const([0], np.int64), self.const([n], np.int64),
                                      self.const([1], np.int64)])
        return self.node("Reshape", [src, self.const(list(shape), np.int64)])

    def case(self, name: str, output: str, quantized: bool = False, dtype=None) -> None:
        self.cases.append(Case(name, output, quantized, dtype))
        self.outputs.append(output)

    def model(self):
        from onnx import TensorProto, helper
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, self.size])
        g = helper.make_graph(self.nodes, "cases", [x],
                              [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in self.outputs],
                              self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset),
                                                helper.make_opsetid("com.microsoft", 1)])
        m.ir_version = 8
        import onnx
        inferred = onnx.shape_inference.infer_shapes(m)
        # Declare each output's type from inference (onnxruntime wants typed outputs).
        types = {v.name: v.type.tensor_type.elem_type
                 for v in list(inferred.graph.value_info) + list(inferred.graph.output)
                 if v.type.tensor_type.elem_type}
        declared = {c.output: c.dtype for c in self.cases if c.dtype is not None}
        elem = {np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8,
                np.dtype(np.float32): TensorProto.FLOAT}
        for o in m.graph.output:
            if o.name in declared:
                o.type.tensor_type.elem_type = elem[np.dtype(declared[o.name])]
            else:
                o.type.tensor_type.elem_type = types.get(o.name, TensorProto.FLOAT)
        return m
