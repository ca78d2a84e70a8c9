"""The QDQ pass: DequantizeLinear -> op -> QuantizeLinear patterns fused into the integer
operators onnxruntime runs for them (a model quantized in QDQ format runs as onnxruntime runs it)."""
from __future__ import annotations

import math

import numpy as np

from appliance_tools.nn.ir import Tensor
from appliance_tools.nn.graph import MS, OURS, Node


def const_value(tensors: dict[str, Tensor], consts: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    if not name:
        return None
    if name in consts:
        return consts[name]
    t = tensors.get(name)
    return t.const if t is not None and t.is_const else None


def fuse_qdq(nodes: list[Node], tensors: dict[str, Tensor], graph_outputs: set[str], opset: int) -> list[Node]:
    """DequantizeLinear -> op -> QuantizeLinear as the integer operator onnxruntime fuses it into
    (QLinearConv, QLinearMatMul, QGemm, QLinearAdd/Mul, QLinearAveragePool,
    QLinearGlobalAveragePool, QLinearSoftmax), or the op on the integers themselves when it only
    moves them (MaxPool, Reshape, Flatten, Transpose, ... with equal parameters on both sides), or
    a 256-entry table for an elementwise function (Relu, Clip, LeakyRelu, Sigmoid, Tanh).
    Whatever matches no pattern runs as written: dequantize, float operator, quantize."""
    consts: dict[str, np.ndarray] = {}
    for n in nodes:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and "value" in n.attrs:
            from onnx import numpy_helper
            consts[n.outputs[0]] = numpy_helper.to_array(n.attrs["value"])
    producer = {o: n for n in nodes for o in n.outputs}
    consumers: dict[str, list[Node]] = {}
    for n in nodes:
        for i in n.inputs:
            consumers.setdefault(i, []).append(n)

    def dq(name: str, per_tensor: bool = True):
        """(quantized input, scale, zero point, axis) if `name` is made by a DequantizeLinear with constant params."""
        n = producer.get(name)
        if n is None or n.op_type != "DequantizeLinear" or n.domain not in ("", "ai.onnx"):
            return None
        scale = const_value(tensors, consts, n.inputs[1])
        zp = const_value(tensors, consts, n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2] else None
        if scale is None or (len(n.inputs) > 2 and n.inputs[2] and zp is None):
            return None
        if per_tensor and np.asarray(scale).size != 1:
            return None
        return n.inputs[0], n.inputs[1], (n.inputs[2] if len(n.inputs) > 2 else ""), n.attrs.get("axis", 1), scale, zp

    def q_after(name: str):
        """The QuantizeLinear that is the only consumer of `name` (per tensor, constant params)."""
        if name in graph_outputs:
            return None
        users = consumers.get(name, [])
        if len(users) != 1:
            return None
        n = users[0]
        if n.op_type != "QuantizeLinear" or n.domain not in ("", "ai.onnx") or n.inputs[0] != name:
            return None
        scale = const_value(tensors, consts, n.inputs[1])
        if scale is None or np.asarray(scale).size != 1 or len(n.inputs) < 3 or not n.inputs[2]:
            return None
        zp = const_value(tensors, consts, n.inputs[2])
        if zp is None or zp.dtype not in (np.uint8, np.int8):
            return None
        return n, scale, zp

    def act_type(entry) -> str | None:
        t = tensors.get(entry[0])
        if t is not None:
            return t.dtype
        zp = entry[5]
        return str(zp.dtype) if zp is not None else "uint8"

    def same_q(d, q) -> bool:
        return (d[5] is not None and np.asarray(d[4]).reshape(-1)[0] == np.asarray(q[1]).reshape(-1)[0]
                and np.asarray(d[5]).reshape(-1)[0] == np.asarray(q[2]).reshape(-1)[0] and d[5].dtype == q[2].dtype)

    out: list[Node] = []
    removed: set[int] = set()
    for n in nodes:
        if id(n) in removed:
            continue
        if n.domain not in ("", "ai.onnx") or n.op_type in ("DequantizeLinear", "QuantizeLinear") or not n.outputs:
            out.append(n)
            continue
        y = n.outputs[0]
        qa = q_after(y)
        fused = None
        if qa is not None:
            qn, ys, yz = qa
            xq = dq(n.inputs[0]) if n.inputs else None
            if n.op_type == "Conv" and xq is not None and len(n.inputs) >= 2:
                wq = dq(n.inputs[1], per_tensor=False)
                bq = dq(n.inputs[2], per_tensor=False) if len(n.inputs) > 2 and n.inputs[2] else None
                wv = const_value(tensors, consts, wq[0]) if wq else None
                bv = const_value(tensors, consts, bq[0]) if bq else None
                bias_ok = (len(n.inputs) < 3 or not n.inputs[2]) or (bv is not None and bv.dtype == np.int32)
                if wv is not None and wv.dtype in (np.uint8, np.int8) and (np.asarray(wq[4]).size == 1 or wq[3] == 0) \
                        and bias_ok and xq[5] is not None:
                    ins = [xq[0], xq[1], xq[2], wq[0], wq[1], wq[2], qn.inputs[1], qn.inputs[2]]
                    if bq is not None:
                        ins.append(bq[0])
                    fused = Node(n.index, n.name, "QLinearConv", "", ins, [qn.outputs[0]], dict(n.attrs))
            elif n.op_type == "MatMul" and xq is not None and xq[5] is not None:
                wq = dq(n.inputs[1], per_tensor=False)
                wv = const_value(tensors, consts, wq[0]) if wq else None
                if wv is not None and wv.ndim == 2 and wv.dtype in (np.uint8, np.int8) and \
                        (np.asarray(wq[4]).size == 1 or wq[3] in (1, -1)):
                    fused = Node(n.index, n.name, "QLinearMatMul", "",
                                  [xq[0], xq[1], xq[2], wq[0], wq[1], wq[2], qn.inputs[1], qn.inputs[2]],
                                  [qn.outputs[0]], {})
            elif n.op_type == "Gemm" and xq is not None and xq[5] is not None and \
                    float(n.attrs.get("beta", 1.0)) == 1.0:
                wq = dq(n.inputs[1], per_tensor=False)
                bq = dq(n.inputs[2], per_tensor=False) if len(n.inputs) > 2 and n.inputs[2] else None
                wv = const_value(tensors, consts, wq[0]) if wq else None
                bv = const_value(tensors, consts, bq[0]) if bq else None
                bias_ok = (len(n.inputs) < 3 or not n.inputs[2]) or (bv is not None and bv.dtype == np.int32)
                n_axis = 0 if int(n.attrs.get("transB", 0)) else 1   # per-channel scales must follow N
                per_n = wq is not None and (np.asarray(wq[4]).size == 1 or wq[3] in (n_axis, n_axis - 2))
                if wv is not None and wv.ndim == 2 and wv.dtype in (np.uint8, np.int8) and bias_ok and per_n:
                    ins = [xq[0], xq[1], xq[2], wq[0], wq[1], wq[2], bq[0] if bq else "", qn.inputs[1], qn.inputs[2]]
                    attrs = {k: n.attrs[k] for k in ("alpha", "transA", "transB") if k in n.attrs}
                    fused = Node(n.index, n.name, "QGemm", MS, ins, [qn.outputs[0]], attrs)
            elif n.op_type in ("Add", "Mul") and len(n.inputs) == 2:
                aq, bq = dq(n.inputs[0]), dq(n.inputs[1])
                if aq and bq and aq[5] is not None and bq[5] is not None and act_type(aq) == act_type(bq) \
                        == str(yz.dtype):
                    fused = Node(n.index, n.name, f"QLinear{n.op_type}", MS,
                                  [aq[0], aq[1], aq[2], bq[0], bq[1], bq[2], qn.inputs[1], qn.inputs[2]],
                                  [qn.outputs[0]], {})
            elif n.op_type == "AveragePool" and xq is not None and xq[5] is not None:
                fused = Node(n.index, n.name, "QLinearAveragePool", MS,
                              [xq[0], xq[1], xq[2], qn.inputs[1], qn.inputs[2]], [qn.outputs[0]], dict(n.attrs))
            elif n.op_type == "GlobalAveragePool" and xq is not None and xq[5] is not None:
                fused = Node(n.index, n.name, "QLinearGlobalAveragePool", MS,
                              [xq[0], xq[1], xq[2], qn.inputs[1], qn.inputs[2]], [qn.outputs[0]], {"channels_last": 0})
            elif n.op_type == "Softmax" and xq is not None and xq[5] is not None:
                attrs = {"axis": int(n.attrs.get("axis", -1 if opset >= 13 else 1)), "opset": opset}
                fused = Node(n.index, n.name, "QLinearSoftmax", MS,
                              [xq[0], xq[1], xq[2], qn.inputs[1], qn.inputs[2]], [qn.outputs[0]], attrs)
            elif n.op_type in ("MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity",
                               "Dropout") and xq is not None and same_q(xq, qa):
                fused = Node(n.index, n.name, n.op_type, n.domain, [xq[0]] + n.inputs[1:], [qn.outputs[0]],
                              dict(n.attrs))
            elif n.op_type in ("Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh") and xq is not None and \
                    xq[5] is not None:
                attrs = {"fn": n.op_type.lower(), "xs": float(np.asarray(xq[4]).reshape(-1)[0]),
                         "xz": int(np.asarray(xq[5]).reshape(-1)[0]), "ys": float(np.asarray(ys).reshape(-1)[0]),
                         "yz": int(np.asarray(yz).reshape(-1)[0]), "ytype": str(yz.dtype)}
                ok = True
                if n.op_type == "Clip":
                    if opset < 11:
                        attrs["lo"], attrs["hi"] = n.attrs.get("min", -math.inf), n.attrs.get("max", math.inf)
                    else:
                        lo = const_value(tensors, consts, n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1] else None
                        hi = const_value(tensors, consts, n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2] else None
                        ok = (len(n.inputs) < 2 or not n.inputs[1] or lo is not None) and \
                             (len(n.inputs) < 3 or not n.inputs[2] or hi is not None)
                        attrs["lo"] = float(lo.reshape(-1)[0]) if lo is not None else -math.inf
                        attrs["hi"] = float(hi.reshape(-1)[0]) if hi is not None else math.inf
                elif n.op_type == "LeakyRelu":
                    attrs["alpha"] = float(n.attrs.get("alpha", 0.01))
                if ok:
                    fused = Node(n.index, n.name, "QLut", OURS, [xq[0]], [qn.outputs[0]], attrs)
        if fused is not None:
            removed.add(id(qa[0]))
            out.append(fused)
        else:
            out.append(n)
    return out
