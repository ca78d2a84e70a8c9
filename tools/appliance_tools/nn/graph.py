"""What the importer works with: the ONNX node as the passes see it, attribute and constant
readers, the operator tables (appliance_tools/nn/onnx_import.py puts the steps together)."""
from __future__ import annotations


import numpy as np

from appliance_tools.nn.ir import ModelError

MS = "com.microsoft"
OURS = "appliance.nn"   # operators the QDQ pass creates that neither ONNX nor onnxruntime has
ELEM_TYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
              10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}
ACTIVATION_TYPES = ("float32", "uint8", "int8")
MAX_FOLD_VALUES = 1 << 26   # a folded constant larger than this could never fit a module's memory anyway

SUPPORTED = {
    "": ["Conv", "QLinearConv", "Gemm", "MatMul", "QLinearMatMul", "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu",
         "Clip", "Sigmoid", "Tanh", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten",
         "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Slice", "Softmax", "QuantizeLinear",
         "DequantizeLinear",
         "BatchNormalization", "Identity", "Dropout", "ReduceMean", "ReduceMax", "ReduceSum"],
    MS: ["QGemm", "QLinearAdd", "QLinearMul", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSoftmax",
         "QLinearLeakyRelu", "QLinearSigmoid"],
}


def supported_operators() -> list[str]:
    return sorted(SUPPORTED[""]) + sorted(f"{MS}:{op}" for op in SUPPORTED[MS])


def onnx_module():
    try:
        import onnx
    except ImportError:   # pragma: no cover - a runtime dependency
        raise ModelError("the 'onnx' package is not installed (pip install onnx); it reads the model") from None
    return onnx


def attributes(node) -> dict:
    from onnx import helper
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        out[a.name] = v
    return out


def f32(x) -> np.float32:
    return np.float32(np.asarray(x, dtype=np.float32).reshape(-1)[0])


class Node:
    """A node of the model after the QDQ pass (possibly one we made)."""

    def __init__(self, index: int, name: str, op_type: str, domain: str, inputs: list[str], outputs: list[str],
                 attrs: dict) -> None:
        self.index, self.name, self.op_type, self.domain = index, name, op_type, domain
        self.inputs, self.outputs, self.attrs = inputs, outputs, attrs

    @property
    def where(self) -> str:
        op = f"{self.domain}:{self.op_type}" if self.domain not in ("", "ai.onnx") else self.op_type
        return f"node {self.index} '{self.name}' ({op})"
