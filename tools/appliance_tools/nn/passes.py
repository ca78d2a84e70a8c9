"""Graph rewrites before code generation: fold a BatchNormalization into the convolution before
it, and fuse Relu/Clip into the convolution or GEMM that feeds them (one pass over the output
instead of two). Each rewrite keeps the arithmetic of the model, up to float rounding."""
from __future__ import annotations

import numpy as np

from appliance_tools.nn.ir import Graph


def _readers(graph: Graph) -> dict[str, list[int]]:
    """storage tensor -> indices of the ops that read it (through aliases too)."""
    out: dict[str, list[int]] = {}
    for i, op in enumerate(graph.ops):
        for name in op.inputs:
            out.setdefault(graph.storage(name), []).append(i)
    return out


def _sole_reader(graph: Graph, readers: dict[str, list[int]], name: str) -> int | None:
    if name in graph.outputs or any(graph.storage(o) == name for o in graph.outputs):
        return None
    if any(v == name for v in graph.aliases.values()):
        return None   # viewed under another name: someone else may read it
    users = readers.get(name, [])
    return users[0] if len(users) == 1 else None


def fold_batchnorm(graph: Graph) -> None:
    readers = _readers(graph)
    drop = set()
    for op in graph.ops:
        if op.kind != "conv" or op.attrs["quant"] is not None or op.attrs["act"] is not None:
            continue
        j = _sole_reader(graph, readers, op.outputs[0])
        if j is None or graph.ops[j].kind != "affine":
            continue
        bn = graph.ops[j]
        s, t = bn.attrs["s"].astype(np.float64), bn.attrs["t"].astype(np.float64)
        w = op.attrs["w"].astype(np.float64) * s[:, None, None, None]
        b = op.attrs["b"].astype(np.float64) if op.attrs["b"] is not None else np.zeros(len(s))
        op.attrs["w"] = w.astype(np.float32)
        op.attrs["b"] = (b * s + t).astype(np.float32)
        op.attrs["label"] = "Conv+BatchNormalization"
        op.outputs = bn.outputs
        drop.add(j)
    graph.ops = [op for k, op in enumerate(graph.ops) if k not in drop]


def fuse_activations(graph: Graph) -> None:
    readers = _readers(graph)
    drop = set()
    for op in graph.ops:
        if op.kind not in ("conv", "gemm") or op.attrs.get("quant") is not None or op.attrs.get("act") is not None:
            continue
        j = _sole_reader(graph, readers, op.outputs[0])
        if j is None:
            continue
        nxt = graph.ops[j]
        if nxt.kind != "unary" or nxt.attrs["fn"] not in ("relu", "clip"):
            continue
        op.attrs["act"] = ("relu",) if nxt.attrs["fn"] == "relu" else ("clip", nxt.attrs["lo"], nxt.attrs["hi"])
        op.attrs["label"] = f"{op.attrs.get('label', op.kind)}+{'Relu' if nxt.attrs['fn'] == 'relu' else 'Clip'}"
        op.outputs = nxt.outputs
        drop.add(j)
    graph.ops = [op for k, op in enumerate(graph.ops) if k not in drop]


def optimize(graph: Graph) -> Graph:
    fold_batchnorm(graph)
    fuse_activations(graph)
    return graph

