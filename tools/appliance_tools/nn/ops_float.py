"""Lowering of the float operators: convolution, matrix products, element-wise, pooling, normalisation."""
from __future__ import annotations

import math
from math import prod

import numpy as np

from appliance_tools.nn.ir import Tensor
from appliance_tools.nn.graph import Node


class FloatOps:
    """Mixed into Importer (onnx_import.py): self is the importer, with its tensors and helpers."""

    # ---- operators ---------------------------------------------------------------------------

    def _op_Conv(self, node: Node, ins) -> None:
        x = self._act(node, ins[0], "input X", ("float32",))
        w = self._const(node, ins[1] if len(ins) > 1 else None, "weight W")
        b = self._const(node, ins[2] if len(ins) > 2 else None, "bias B", optional=True)
        self._conv(node, x, w, b, None)

    def _conv(self, node: Node, x: Tensor, w: np.ndarray, b, quant: dict | None) -> None:
        group = int(node.attrs.get("group", 1))
        if w.ndim != len(x.shape):
            raise self.fail(f"weight shape {w.shape} does not fit input shape {x.shape}", node)
        M, Cg = w.shape[0], w.shape[1]
        C = x.shape[1]
        if group < 1 or C % group or M % group or Cg * group != C:
            raise self.fail(f"group={group} does not fit {C} input channels, weight shape {w.shape}", node)
        kernel = list(w.shape[2:])
        if "kernel_shape" in node.attrs and list(node.attrs["kernel_shape"]) != kernel:
            raise self.fail(f"kernel_shape {node.attrs['kernel_shape']} differs from the weight's {kernel}", node)
        g = self._spatial(node, x, kernel, "Conv")
        if b is not None and b.shape != (M,):
            raise self.fail(f"bias shape {b.shape} is not ({M},)", node)
        out_dtype = quant["ytype"] if quant else "float32"
        y = self._out(node, self._out_spatial(x, M, g), out_dtype)
        w4 = w.reshape(M, Cg, g["KH"], g["KW"])
        if quant is None:
            w4 = w4.astype(np.float32)
            b = None if b is None else b.astype(np.float32)
        self._emit("conv", node, [x.name], [y], C=C, M=M, G=group, Cg=Cg, w=np.ascontiguousarray(w4), b=b,
                   act=None, quant=quant, dtype=x.dtype, **g)

    def _op_Gemm(self, node: Node, ins) -> None:
        a = self._act(node, ins[0], "input A", ("float32",))
        b_t = ins[1]
        c = self._const(node, ins[2] if len(ins) > 2 else None, "input C", optional=True)
        at = node.attrs
        alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
        ta, tb = int(at.get("transA", 0)), int(at.get("transB", 0))
        if len(a.shape) != 2:
            raise self.fail(f"input A has shape {a.shape}; Gemm takes 2-D inputs", node)
        M, K = (a.shape[1], a.shape[0]) if ta else a.shape
        if b_t is None or len(b_t.shape) != 2:
            raise self.fail("input B must be 2-D", node)
        K2, N = (b_t.shape[1], b_t.shape[0]) if tb else b_t.shape
        if K2 != K:
            raise self.fail(f"A {a.shape} (transA={ta}) and B {b_t.shape} (transB={tb}) do not multiply", node)
        y = self._out(node, (M, N), "float32")
        cb = None
        if c is not None and beta != 0.0:
            try:
                cb = np.ascontiguousarray(np.broadcast_to(c.astype(np.float32), (M, N)))
            except ValueError:
                raise self.fail(f"C {c.shape} does not broadcast to ({M}, {N})", node) from None
        a_strides = (1, M) if ta else (K, 1)   # (row, k)
        if b_t.is_const:
            bt = b_t.const.astype(np.float32)
            bt = bt if tb else bt.T            # (N, K): a row of B^T per output column
            self._emit("gemm", node, [a.name], [y], batch=1, M=M, K=K, N=N, a_strides=a_strides, a_batch=0,
                       bt=np.ascontiguousarray(bt), b=None, b_strides=None, b_batch=0, alpha=alpha, beta=beta, c=cb)
        else:
            self._act(node, b_t, "input B", ("float32",))
            b_strides = (1, K) if tb else (N, 1)   # (k, n)
            self._emit("gemm", node, [a.name, b_t.name], [y], batch=1, M=M, K=K, N=N, a_strides=a_strides, a_batch=0,
                       bt=None, b=b_t.name, b_strides=b_strides, b_batch=0, alpha=alpha, beta=beta, c=cb)

    def _matmul_shapes(self, node: Node, a_shape: tuple, b_shape: tuple, b_const: bool):
        """numpy matmul of A (..., M, K) by B (K, N) or (..., K, N): batch, M, K, N, out shape, B batch stride."""
        if not a_shape or not b_shape:
            raise self.fail("MatMul of a scalar", node)
        a2 = (1,) + a_shape if len(a_shape) == 1 else a_shape
        b2 = b_shape + (1,) if len(b_shape) == 1 else b_shape
        M, K = a2[-2], a2[-1]
        K2, N = b2[-2], b2[-1]
        if K != K2:
            raise self.fail(f"A {a_shape} and B {b_shape} do not multiply", node)
        a_batch, b_batch = a2[:-2], b2[:-2]
        if b_batch and (prod(b_batch) != 1):
            if tuple(b_batch) != tuple(a_batch[len(a_batch) - len(b_batch):]) or prod(a_batch) != prod(b_batch):
                raise self.fail(f"batched B {b_shape} must have the same batch dimensions as A {a_shape}", node)
            b_stride = K * N
        else:
            b_stride = 0
        batch = prod(a_batch) if a_batch else 1
        out = tuple(a_batch) + (M, N)
        if len(a_shape) == 1:
            out = out[:-2] + (N,)
        if len(b_shape) == 1:
            out = out[:-1]
        return batch, M, K, N, out, b_stride

    def _op_MatMul(self, node: Node, ins) -> None:
        a = self._act(node, ins[0], "input A", ("float32",))
        b_t = ins[1]
        batch, M, K, N, out, b_stride = self._matmul_shapes(node, a.shape, b_t.shape, b_t.is_const)
        y = self._out(node, out, "float32")
        if b_t.is_const:
            if b_stride:
                raise self.fail("a constant batched B is not supported", node)
            bt = b_t.const.astype(np.float32).reshape(K, N).T
            self._emit("gemm", node, [a.name], [y], batch=batch, M=M, K=K, N=N, a_strides=(K, 1), a_batch=M * K,
                       bt=np.ascontiguousarray(bt), b=None, b_strides=None, b_batch=0, alpha=1.0, beta=0.0, c=None)
        else:
            self._act(node, b_t, "input B", ("float32",))
            self._emit("gemm", node, [a.name, b_t.name], [y], batch=batch, M=M, K=K, N=N, a_strides=(K, 1),
                       a_batch=M * K, bt=None, b=b_t.name, b_strides=(N, 1), b_batch=b_stride, alpha=1.0, beta=0.0,
                       c=None)

    def _broadcast(self, node: Node, a: Tensor, b: Tensor) -> tuple:
        try:
            out = np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            raise self.fail(f"shapes {a.shape} and {b.shape} do not broadcast", node) from None
        return tuple(out)

    def _binary(self, node: Node, ins, fn: str) -> None:
        a, b = ins[0], ins[1]
        if a is None or b is None:
            raise self.fail("needs two inputs", node)
        for t, what in ((a, "A"), (b, "B")):
            if t.dtype != "float32":
                raise self.fail(f"input {what} {t.name!r} is {t.dtype}; float32 expected", node)
        out = self._broadcast(node, a, b)
        y = self._out(node, out, "float32")
        acts = [t.name for t in (a, b) if not t.is_const]
        self._emit("binary", node, acts, [y], fn=fn, a=a.name, b=b.name, shape=out,
                   a_shape=a.shape, b_shape=b.shape, a_const=a.const, b_const=b.const)

    def _op_Add(self, node, ins): self._binary(node, ins, "add")
    def _op_Sub(self, node, ins): self._binary(node, ins, "sub")
    def _op_Mul(self, node, ins): self._binary(node, ins, "mul")
    def _op_Div(self, node, ins): self._binary(node, ins, "div")

    def _unary(self, node: Node, x: Tensor, fn: str, **params) -> None:
        self._act(node, x, "input X", ("float32",))
        self._unused_extra_outputs(node)
        y = self._out(node, x.shape, "float32")
        self._emit("unary", node, [x.name], [y], fn=fn, n=x.size, **params)

    def _op_Relu(self, node, ins): self._unary(node, ins[0], "relu")
    def _op_Sigmoid(self, node, ins): self._unary(node, ins[0], "sigmoid")
    def _op_Tanh(self, node, ins): self._unary(node, ins[0], "tanh")

    def _op_LeakyRelu(self, node, ins):
        self._unary(node, ins[0], "leakyrelu", alpha=float(np.float32(node.attrs.get("alpha", 0.01))))

    def _clip_bounds(self, node: Node, ins) -> tuple[float, float]:
        if self.opset < 11:
            lo, hi = node.attrs.get("min", -math.inf), node.attrs.get("max", math.inf)
        else:
            lo = self._scalar(node, ins[1], "min", default=-math.inf) if len(ins) > 1 else -math.inf
            hi = self._scalar(node, ins[2], "max", default=math.inf) if len(ins) > 2 else math.inf
        return float(np.float32(lo)), float(np.float32(hi))

    def _op_Clip(self, node, ins):
        lo, hi = self._clip_bounds(node, ins)
        self._unary(node, ins[0], "clip", lo=lo, hi=hi)

    def _pool(self, node: Node, x: Tensor, kind: str, quant: dict | None = None) -> None:
        a = node.attrs
        if int(a.get("storage_order", 0)) != 0:
            raise self.fail("storage_order=1 is not supported", node)
        self._unused_extra_outputs(node)
        kernel = list(a.get("kernel_shape", []))
        if not kernel:
            raise self.fail("kernel_shape is missing", node)
        g = self._spatial(node, x, kernel, node.op_type, dilations_ok=kind == "max", ceil_ok=True)
        # A pad as wide as the kernel makes windows of padding only (an average over no values, a
        # max of nothing); onnxruntime refuses such pools too.
        if g["pt"] >= g["KH"] or g["pb"] >= g["KH"] or g["pl"] >= g["KW"] or g["pr"] >= g["KW"]:
            pads = [g["pl"], g["pr"]] if g["rank"] == 1 else [g["pt"], g["pl"], g["pb"], g["pr"]]
            raise self.fail(f"pads {pads} must be smaller than the kernel {kernel}", node)
        C = x.shape[1]
        ytype = quant["ytype"] if quant else x.dtype
        y = self._out(node, self._out_spatial(x, C, g), ytype)
        self._emit("pool", node, [x.name], [y], pool=kind, C=C, count_include_pad=int(a.get("count_include_pad", 0)),
                   dtype=x.dtype, quant=quant, **g)

    def _op_MaxPool(self, node, ins):
        self._pool(node, self._act(node, ins[0], "input X"), "max")

    def _op_AveragePool(self, node, ins):
        self._pool(node, self._act(node, ins[0], "input X", ("float32",)), "avg")

    def _global_pool(self, node: Node, x: Tensor, kind: str, quant: dict | None = None) -> None:
        if len(x.shape) < 3 or x.shape[0] != 1:
            raise self.fail(f"input shape {x.shape}: (1, C, ...) expected", node)
        C, n = x.shape[1], prod(x.shape[2:])
        ytype = quant["ytype"] if quant else x.dtype
        y = self._out(node, (1, C) + (1,) * (len(x.shape) - 2), ytype)
        self._emit("gpool", node, [x.name], [y], pool=kind, C=C, n=n, dtype=x.dtype, quant=quant)

    def _op_GlobalAveragePool(self, node, ins):
        self._global_pool(node, self._act(node, ins[0], "input X", ("float32",)), "avg")

    def _op_GlobalMaxPool(self, node, ins):
        self._global_pool(node, self._act(node, ins[0], "input X", ("float32",)), "max")

    def _op_BatchNormalization(self, node, ins):
        x = self._act(node, ins[0], "input X", ("float32",))
        self._unused_extra_outputs(node)
        if int(node.attrs.get("training_mode", 0)):
            raise self.fail("training_mode=1 is not supported", node)
        scale, bias, mean, var = (self._const(node, t, w).astype(np.float64) for t, w in
                                  zip(ins[1:5], ("scale", "B", "input_mean", "input_var")))
        eps = float(node.attrs.get("epsilon", 1e-5))
        if len(x.shape) < 2:
            raise self.fail(f"input shape {x.shape} has no channel dimension", node)
        C = x.shape[1]
        for v, what in ((scale, "scale"), (bias, "B"), (mean, "input_mean"), (var, "input_var")):
            if v.shape != (C,):   # the kernel indexes them per channel
                raise self.fail(f"{what} has shape {v.shape}; the input has {C} channels", node)
        s = scale / np.sqrt(var + eps)
        t = bias - mean * s
        y = self._out(node, x.shape, "float32")
        # outer: the batch (N, C) and (N, C, ...) inputs have too, not only the window's batch 1.
        self._emit("affine", node, [x.name], [y], outer=x.shape[0], C=C, inner=prod(x.shape[2:]),
                   s=s.astype(np.float32), t=t.astype(np.float32))
