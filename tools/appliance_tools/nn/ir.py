"""The compiler's graph: tensors with static shapes and a list of operators in execution order.

Everything the C generator needs is here, already normalised (padding resolved, weights as
numpy arrays in the layout the kernels read, quantization parameters as numbers), so the
generator never looks at ONNX.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import numpy as np

from appliance_tools.nn.errors import ModelError

__all__ = ["ModelError", "Tensor", "Op", "Graph", "QuantSource"]


C_TYPES = {"float32": "float", "uint8": "uint8_t", "int8": "int8_t", "int16": "int16_t", "int32": "int32_t", "uint64": "uint64_t"}
ITEM_BYTES = {"float32": 4, "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "uint64": 8}
Q_RANGE = {"uint8": (0, 255), "int8": (-128, 127)}


@dataclass
class QuantSource:
    """Where a folded float constant came from: DequantizeLinear of an integer constant."""
    q: np.ndarray            # the integers (uint8, int8 or int32)
    scale: np.ndarray        # float32, scalar or per `axis`
    zero_point: np.ndarray   # same shape as scale
    axis: int


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str                              # numpy name: float32, uint8, int8, int32 (int64/bool: constants only)
    const: np.ndarray | None = None
    qsource: QuantSource | None = None

    @property
    def size(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * ITEM_BYTES[self.dtype]

    @property
    def is_const(self) -> bool:
        return self.const is not None


@dataclass
class Op:
    kind: str                 # conv, gemm, binary, unary, lut, pool, gpool, softmax, quantize, ...
    inputs: list[str]         # tensors read (constants that are parameters live in attrs)
    outputs: list[str]
    attrs: dict
    where: str                # "node 3 'conv1' (Conv)", for messages and C comments


@dataclass
class Graph:
    model: str                          # the model file, for messages
    tensors: dict[str, Tensor]
    ops: list[Op]
    input: str                          # the tensor the window fills (float32)
    outputs: list[str]
    aliases: dict[str, str] = field(default_factory=dict)   # tensor -> tensor whose storage it shares
    opset: int = 0
    producer: str = ""

    def storage(self, name: str) -> str:
        while name in self.aliases:
            name = self.aliases[name]
        return name

    def op_types(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for op in self.ops:
            label = op.attrs.get("label", op.kind)
            out[label] = out.get(label, 0) + 1
        return out
