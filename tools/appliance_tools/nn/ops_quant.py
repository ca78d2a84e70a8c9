"""Lowering of the integer (QOperator) operators and QuantizeLinear/DequantizeLinear, matching onnxruntime."""
from __future__ import annotations

import math
from math import prod

import numpy as np

from appliance_tools.nn.ir import Q_RANGE, Tensor
from appliance_tools.nn.graph import Node, f32


class QuantOps:
    """Mixed into Importer (onnx_import.py): self is the importer, with its tensors and helpers."""

    def _op_QLinearConv(self, node: Node, ins) -> None:
        x = self._act(node, ins[0], "input x", ("uint8", "int8"))
        xs = self._scalar(node, ins[1], "x_scale")
        xz = self._scalar(node, ins[2], "x_zero_point")
        w = self._const(node, ins[3], "weight w")
        ws = np.asarray(self._const(node, ins[4], "w_scale"), np.float32).reshape(-1)
        wz = np.asarray(self._const(node, ins[5], "w_zero_point")).reshape(-1)
        ys = self._scalar(node, ins[6], "y_scale")
        yz_t = ins[7] if len(ins) > 7 else None
        yz = self._scalar(node, yz_t, "y_zero_point")
        b = self._const(node, ins[8] if len(ins) > 8 else None, "bias B", optional=True)
        if w.dtype not in (np.uint8, np.int8):
            raise self.fail(f"weights are {w.dtype}; uint8 or int8 expected", node)
        M = w.shape[0]
        if ws.size not in (1, M) or wz.size not in (1, M):
            raise self.fail(f"w_scale/w_zero_point must be per tensor or per output channel ({M})", node)
        if b is not None and (b.dtype != np.int32 or b.shape != (M,)):
            raise self.fail(f"bias is {b.dtype} {b.shape}; QLinearConv takes int32 ({M},)", node)
        ws = np.broadcast_to(ws, (M,)).astype(np.float32)
        scales = (np.float32(xs) * ws) / np.float32(ys)   # float32 arithmetic, as onnxruntime
        quant = dict(xz=int(xz), wz=np.broadcast_to(wz.astype(np.int32), (M,)).copy(), yz=int(yz),
                     ytype=str(np.asarray(self._const(node, yz_t, "y_zero_point")).dtype),
                     scales=scales.astype(np.float32), bias=None if b is None else b.astype(np.int32))
        self._conv(node, x, w, None, quant)

    def _qgemm(self, node: Node, a: Tensor, az: int, as_: np.float32, bq: np.ndarray, bs: np.ndarray, bz: np.ndarray,
               bias: np.ndarray | None, ys, yz, ytype: str | None, alpha: float, batch: int, M: int, K: int, N: int,
               out_shape: tuple, a_strides: tuple) -> None:
        """Integer GEMM with a constant B (K, N): int32 accumulation, then requantization (or float output)."""
        if bq.dtype not in (np.uint8, np.int8):
            raise self.fail(f"B is {bq.dtype}; uint8 or int8 expected", node)
        if np.asarray(bs).size not in (1, N) or np.asarray(bz).size not in (1, N):
            raise self.fail(f"B's scale and zero point must be per tensor or per output column ({N})", node)
        bs = np.broadcast_to(np.asarray(bs, np.float32).reshape(-1), (N,)).astype(np.float32)
        bz = np.broadcast_to(np.asarray(bz).reshape(-1).astype(np.int32), (N,)).copy()
        scales = np.float32(alpha) * np.float32(as_) * bs
        if ys is not None:
            scales = scales / np.float32(ys)
        bt = np.ascontiguousarray(bq.reshape(K, N).T)              # (N, K) raw integers
        bsum = bt.astype(np.int64).sum(axis=1).astype(np.int32)    # per output column
        y = self._out(node, out_shape, ytype or "float32")
        self._emit("qgemm", node, [a.name], [y], batch=batch, M=M, K=K, N=N, a_strides=a_strides, a_batch=M * K,
                   az=int(az), bt=bt, bz=bz, bsum=bsum, bias=bias, scales=scales.astype(np.float32),
                   yz=None if yz is None else int(yz), ytype=ytype, atype=a.dtype)

    def _op_QLinearMatMul(self, node: Node, ins) -> None:
        a = self._act(node, ins[0], "input a", ("uint8", "int8"))
        as_ = self._scalar(node, ins[1], "a_scale")
        az = self._scalar(node, ins[2], "a_zero_point")
        b = self._const(node, ins[3], "input b")
        bs = self._const(node, ins[4], "b_scale")
        bz = self._const(node, ins[5], "b_zero_point")
        ys = self._scalar(node, ins[6], "y_scale")
        yz_t = ins[7]
        yz = self._scalar(node, yz_t, "y_zero_point")
        batch, M, K, N, out, b_stride = self._matmul_shapes(node, a.shape, b.shape, True)
        if b_stride or b.ndim != 2:
            raise self.fail("QLinearMatMul: B must be a 2-D constant", node)
        if np.asarray(bs).size not in (1, N) or np.asarray(bz).size not in (1, N):
            raise self.fail(f"b_scale/b_zero_point must be per tensor or per column ({N})", node)
        self._qgemm(node, a, az, as_, b, bs, bz, None, ys, yz, str(yz_t.const.dtype), 1.0, batch, M, K, N, out,
                    (K, 1))

    def _op_QGemm(self, node: Node, ins) -> None:
        a = self._act(node, ins[0], "input A", ("uint8", "int8"))
        as_ = self._scalar(node, ins[1], "a_scale")
        az = self._scalar(node, ins[2], "a_zero_point")
        b = self._const(node, ins[3], "input B")
        bs = self._const(node, ins[4], "b_scale")
        bz = self._const(node, ins[5], "b_zero_point")
        c = self._const(node, ins[6] if len(ins) > 6 else None, "input C", optional=True)
        ys_t = ins[7] if len(ins) > 7 else None
        yz_t = ins[8] if len(ins) > 8 else None
        at = node.attrs
        alpha = float(at.get("alpha", 1.0))
        ta, tb = int(at.get("transA", 0)), int(at.get("transB", 0))
        if len(a.shape) != 2 or b.ndim != 2:
            raise self.fail("QGemm takes 2-D A and B", node)
        M, K = (a.shape[1], a.shape[0]) if ta else a.shape
        bkn = b.T if tb else b
        if bkn.shape[0] != K:
            raise self.fail(f"A {a.shape} (transA={ta}) and B {b.shape} (transB={tb}) do not multiply", node)
        N = bkn.shape[1]
        bias = None
        if c is not None:
            if c.dtype != np.int32:
                raise self.fail(f"C is {c.dtype}; QGemm takes int32", node)
            try:
                bias = np.ascontiguousarray(np.broadcast_to(c, (M, N)))
            except ValueError:
                raise self.fail(f"C {c.shape} does not broadcast to ({M}, {N})", node) from None
        ys = None if ys_t is None else self._scalar(node, ys_t, "y_scale")
        yz = None if ys_t is None else self._scalar(node, yz_t, "y_zero_point")
        ytype = None if ys_t is None else str(yz_t.const.dtype)
        self._qgemm(node, a, az, as_, np.ascontiguousarray(bkn), bs, bz, bias, ys, yz, ytype, alpha, 1, M, K, N,
                    (M, N), (1, M) if ta else (K, 1))

    def _qbinary(self, node: Node, ins, fn: str) -> None:
        a = ins[0]
        b = ins[3] if len(ins) > 3 else None
        if a is None or b is None:
            raise self.fail("needs inputs A and B", node)
        for t, what in ((a, "A"), (b, "B")):
            if t.dtype not in ("uint8", "int8"):
                raise self.fail(f"input {what} {t.name!r} is {t.dtype}; uint8 or int8 expected", node)
        as_ = self._scalar(node, ins[1], "A_scale")
        az = self._scalar(node, ins[2], "A_zero_point", default=0)
        bs = self._scalar(node, ins[4], "B_scale")
        bz = self._scalar(node, ins[5] if len(ins) > 5 else None, "B_zero_point", default=0)
        cs = self._scalar(node, ins[6] if len(ins) > 6 else None, "C_scale")
        cz_t = ins[7] if len(ins) > 7 else None
        cz = self._scalar(node, cz_t, "C_zero_point", default=0)
        out = self._broadcast(node, a, b)
        ytype = str(cz_t.const.dtype) if cz_t is not None else a.dtype
        y = self._out(node, out, ytype)
        acts = [t.name for t in (a, b) if not t.is_const]
        self._emit("qbinary", node, acts, [y], fn=fn, a=a.name, b=b.name, shape=out, a_shape=a.shape, b_shape=b.shape,
                   a_const=a.const, b_const=b.const, as_=f32(as_), az=int(az), bs=f32(bs), bz=int(bz),
                   cs=f32(cs), cz=int(cz), atype=a.dtype, btype=b.dtype, ytype=ytype)

    def _op_QLinearAdd(self, node, ins): self._qbinary(node, ins, "add")
    def _op_QLinearMul(self, node, ins): self._qbinary(node, ins, "mul")

    def _lut(self, node: Node, x: Tensor, xs, xz, ys, yz, ytype: str, fn: str, params: dict) -> None:
        """An elementwise function of a quantized tensor: a 256-entry table, as dequantize -> f -> quantize."""
        self._act(node, x, "input X", ("uint8", "int8"))
        q = np.arange(256, dtype=np.int32) if x.dtype == "uint8" else np.arange(-128, 128, dtype=np.int32)
        v = np.float32(xs) * (q - int(xz)).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            if fn == "relu":
                f = np.maximum(v, np.float32(0))
            elif fn == "clip":
                f = np.minimum(np.maximum(v, np.float32(params["lo"])), np.float32(params["hi"]))
            elif fn == "leakyrelu":
                f = np.where(v >= 0, v, v * np.float32(params["alpha"])).astype(np.float32)
            elif fn == "sigmoid":
                f = (np.float32(1) / (np.float32(1) + np.exp(-v.astype(np.float64)))).astype(np.float32)
            elif fn == "tanh":
                f = np.tanh(v.astype(np.float64)).astype(np.float32)
            else:
                raise self.fail(f"no table for {fn}", node)
            lo, hi = Q_RANGE[ytype]
            s = f / np.float32(ys)
            s = np.where(np.isnan(s), np.float32(lo - int(yz)), s)
            s = np.clip(s, np.float32(lo - int(yz)), np.float32(hi - int(yz)))
            table = (np.rint(s).astype(np.int32) + int(yz)).astype(ytype)
        y = self._out(node, x.shape, ytype)
        # Index by the byte: uint8 directly, int8 through its two's complement byte.
        order = np.argsort(q.astype(np.uint8), kind="stable")
        self._emit("lut", node, [x.name], [y], n=x.size, table=table[order], xtype=x.dtype, ytype=ytype,
                   label=f"{node.op_type}(lut)")

    def _op_QLinearLeakyRelu(self, node, ins):
        x = ins[0]
        self._lut(node, x, self._scalar(node, ins[1], "X_scale"), self._scalar(node, ins[2], "X_zero_point", 0),
                  self._scalar(node, ins[3], "Y_scale"), self._scalar(node, ins[4], "Y_zero_point", 0),
                  str(ins[4].const.dtype) if len(ins) > 4 and ins[4] is not None else x.dtype, "leakyrelu",
                  {"alpha": float(node.attrs.get("alpha", 0.01))})

    def _op_QLinearSigmoid(self, node, ins):
        x = ins[0]
        self._lut(node, x, self._scalar(node, ins[1], "X_scale"), self._scalar(node, ins[2], "X_zero_point", 0),
                  self._scalar(node, ins[3], "Y_scale"), self._scalar(node, ins[4], "Y_zero_point", 0),
                  str(ins[4].const.dtype) if len(ins) > 4 and ins[4] is not None else x.dtype, "sigmoid", {})

    def _op_QLut(self, node, ins):
        """Made by the QDQ pass: DequantizeLinear -> Relu/Clip/... -> QuantizeLinear as a table."""
        a = node.attrs
        self._lut(node, ins[0], a["xs"], a["xz"], a["ys"], a["yz"], a["ytype"], a["fn"],
                  {k: a[k] for k in ("lo", "hi", "alpha") if k in a})

    def _op_QLinearAveragePool(self, node, ins):
        x = self._act(node, ins[0], "input X", ("uint8", "int8"))
        if int(node.attrs.get("channels_last", 0)):
            raise self.fail("channels_last=1 is not supported", node)
        yz_t = ins[4] if len(ins) > 4 else None
        quant = dict(xs=f32(self._scalar(node, ins[1], "x_scale")),
                     xz=int(self._scalar(node, ins[2], "x_zero_point", 0)),
                     ys=f32(self._scalar(node, ins[3], "y_scale")),
                     yz=int(self._scalar(node, yz_t, "y_zero_point", 0)),
                     ytype=str(yz_t.const.dtype) if yz_t is not None else x.dtype)
        self._pool(node, x, "avg", quant)

    def _op_QLinearGlobalAveragePool(self, node, ins):
        x = self._act(node, ins[0], "input X", ("uint8", "int8"))
        if int(node.attrs.get("channels_last", 0)):
            raise self.fail("channels_last=1 is not supported", node)
        yz_t = ins[4] if len(ins) > 4 else None
        xs = f32(self._scalar(node, ins[1], "x_scale"))
        ys = f32(self._scalar(node, ins[3], "y_scale"))
        n = prod(x.shape[2:])
        scale = xs / (ys * np.float32(n))   # as MLAS: ScaleInput / (ScaleOutput * ImageSize)
        quant = dict(xz=int(self._scalar(node, ins[2], "x_zero_point", 0)), scale=np.float32(scale),
                     yz=int(self._scalar(node, yz_t, "y_zero_point", 0)),
                     ytype=str(yz_t.const.dtype) if yz_t is not None else x.dtype)
        self._global_pool(node, x, "avg", quant)

    def _op_QLinearSoftmax(self, node, ins):
        x = self._act(node, ins[0], "input X", ("uint8", "int8"))
        opset = int(node.attrs.get("opset", self.opset))
        save = self.opset
        self.opset = opset
        try:
            outer, n, inner = self._softmax_dims(node, x.shape)
        finally:
            self.opset = save
        xs = f32(self._scalar(node, ins[1], "X_scale"))
        ys = f32(self._scalar(node, ins[3], "Y_scale"))
        yz_t = ins[4] if len(ins) > 4 else None
        yz = int(self._scalar(node, yz_t, "Y_zero_point", 0))
        # onnxruntime's table: exp((i - 255 + shift) * x_scale) in double, stored as float, with a
        # shift that keeps the sum of n of them finite; the output is rint(e * floor(1/y_scale) / sum).
        shift = max(0.0, math.log(float(np.finfo(np.float32).max) / n) - 5.0) / float(xs)
        table = np.array([math.exp((i - 255 + shift) * float(xs)) for i in range(256)], np.float64).astype(np.float32)
        ytype = str(yz_t.const.dtype) if yz_t is not None else x.dtype
        y = self._out(node, x.shape, ytype)
        self._emit("qsoftmax", node, [x.name], [y], outer=outer, n=n, inner=inner, table=table,
                   yscale=np.float32(math.floor(np.float32(1.0) / ys)), yz=yz, xtype=x.dtype, ytype=ytype)

    def _op_QuantizeLinear(self, node, ins):
        x = self._act(node, ins[0], "input x", ("float32",))
        scale = np.asarray(self._const(node, ins[1], "y_scale"), np.float32).reshape(-1)
        zp_t = ins[2] if len(ins) > 2 else None
        zp = np.zeros(1, np.uint8) if zp_t is None else np.asarray(self._const(node, zp_t, "y_zero_point"))
        if "block_size" in node.attrs and node.attrs["block_size"]:
            raise self.fail("blocked quantization is not supported", node)
        ytype = str(zp.dtype)
        if ytype not in ("uint8", "int8"):
            raise self.fail(f"quantizing to {ytype} is not supported (uint8, int8)", node)
        zp = zp.reshape(-1)
        if zp.size not in (1, scale.size):
            raise self.fail(f"y_zero_point has {zp.size} values for {scale.size} scale(s)", node)
        if zp.size != scale.size:
            zp = np.broadcast_to(zp, scale.shape)
        outer, n, inner = self._axis_split(node, x.shape, int(node.attrs.get("axis", 1)), scale.size)
        y = self._out(node, x.shape, ytype)
        self._emit("quantize", node, [x.name], [y], outer=outer, n=n, inner=inner, scale=scale,
                   zp=zp.astype(np.int32), ytype=ytype)

    def _op_DequantizeLinear(self, node, ins):
        x = self._act(node, ins[0], "input x", ("uint8", "int8"))
        scale = np.asarray(self._const(node, ins[1], "x_scale"), np.float32).reshape(-1)
        zp_t = ins[2] if len(ins) > 2 else None
        zp = np.zeros(scale.shape, np.int32) if zp_t is None else \
            np.asarray(self._const(node, zp_t, "x_zero_point")).reshape(-1).astype(np.int32)
        if zp.size not in (1, scale.size):
            raise self.fail(f"x_zero_point has {zp.size} values for {scale.size} scale(s)", node)
        if zp.size != scale.size:
            zp = np.broadcast_to(zp, scale.shape).copy()
        outer, n, inner = self._axis_split(node, x.shape, int(node.attrs.get("axis", 1)), scale.size)
        y = self._out(node, x.shape, "float32")
        self._emit("dequantize", node, [x.name], [y], outer=outer, n=n, inner=inner, scale=scale, zp=zp,
                   xtype=x.dtype)
