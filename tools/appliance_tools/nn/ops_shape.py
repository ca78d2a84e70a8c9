"""Lowering of the operators that move data without arithmetic of their own, and reductions."""
from __future__ import annotations

from math import prod


from appliance_tools.nn.graph import ACTIVATION_TYPES, Node


class ShapeOps:
    """Mixed into Importer (onnx_import.py): self is the importer, with its tensors and helpers."""

    def _op_Flatten(self, node, ins):
        x = self._act(node, ins[0], "input")
        axis = int(node.attrs.get("axis", 1))
        r = len(x.shape)
        if axis < 0:
            axis += r
        if not 0 <= axis <= r:
            raise self.fail(f"axis {node.attrs.get('axis')} is outside 0..{r}", node)
        self._alias(node, x, (prod(x.shape[:axis]), prod(x.shape[axis:])))

    def _op_Reshape(self, node, ins):
        x = self._act(node, ins[0], "input data")
        shape = self._const(node, ins[1] if len(ins) > 1 else None, "shape")
        allowzero = int(node.attrs.get("allowzero", 0))
        dims = [int(s) for s in shape.reshape(-1)]
        out = []
        for i, d in enumerate(dims):
            if d == 0 and not allowzero:
                if i >= len(x.shape):
                    raise self.fail(f"shape {dims}: 0 at {i} copies a dimension the input lacks", node)
                out.append(x.shape[i])
            else:
                out.append(d)
        if out.count(-1) > 1:
            raise self.fail(f"shape {dims} has more than one -1", node)
        if -1 in out:
            known = prod(d for d in out if d != -1)
            if known == 0 or x.size % known:
                raise self.fail(f"cannot reshape {x.shape} to {dims}", node)
            out[out.index(-1)] = x.size // known
        if prod(out) != x.size:
            raise self.fail(f"cannot reshape {x.shape} ({x.size} values) to {dims}", node)
        self._alias(node, x, out)

    def _axes(self, node: Node, ins, rank: int) -> list[int] | None:
        if self.opset >= 13 and len(ins) > 1 and ins[1] is not None:
            axes = [int(a) for a in self._const(node, ins[1], "axes").reshape(-1)]
        elif "axes" in node.attrs:
            axes = [int(a) for a in node.attrs["axes"]]
        else:
            return None
        return sorted(a + rank if a < 0 else a for a in axes)

    def _op_Squeeze(self, node, ins):
        x = self._act(node, ins[0], "input data")
        axes = self._axes(node, ins, len(x.shape))
        if axes is None:
            out = [d for d in x.shape if d != 1]
        else:
            if any(not 0 <= a < len(x.shape) or x.shape[a] != 1 for a in axes):
                raise self.fail(f"axes {axes}: can only squeeze dimensions of size 1 of {x.shape}", node)
            out = [d for i, d in enumerate(x.shape) if i not in axes]
        self._alias(node, x, out)

    def _op_Unsqueeze(self, node, ins):
        x = self._act(node, ins[0], "input data")
        if self.opset >= 13 and len(ins) > 1 and ins[1] is not None:
            axes = [int(a) for a in self._const(node, ins[1], "axes").reshape(-1)]
        else:
            axes = [int(a) for a in node.attrs.get("axes", [])]
        if not axes:
            raise self.fail("axes are missing", node)
        rank = len(x.shape) + len(axes)
        axes = sorted(a + rank if a < 0 else a for a in axes)
        if any(not 0 <= a < rank for a in axes) or len(set(axes)) != len(axes):
            raise self.fail(f"axes {axes} do not fit an output of rank {rank}", node)
        out = list(x.shape)
        for a in axes:
            out.insert(a, 1)
        self._alias(node, x, out)

    def _op_Identity(self, node, ins):
        x = self._act(node, ins[0], "input")
        self._alias(node, x, x.shape)

    def _op_Dropout(self, node, ins):
        x = self._act(node, ins[0], "input data")
        self._unused_extra_outputs(node)
        self._alias(node, x, x.shape)

    def _op_Transpose(self, node, ins):
        x = self._act(node, ins[0], "input data")
        r = len(x.shape)
        perm = [int(p) for p in node.attrs.get("perm", list(range(r))[::-1])]
        if sorted(perm) != list(range(r)):
            raise self.fail(f"perm {perm} is not a permutation of 0..{r - 1}", node)
        out = tuple(x.shape[p] for p in perm)
        moved = [p for p in perm if x.shape[p] != 1]
        if moved == sorted(moved):   # only size-1 axes move: the bytes stay in order
            self._alias(node, x, out)
            return
        y = self._out(node, out, x.dtype)
        self._emit("transpose", node, [x.name], [y], perm=perm, in_shape=x.shape, dtype=x.dtype)

    def _op_Slice(self, node, ins):
        x = self._act(node, ins[0], "input data")
        r = len(x.shape)
        if self.opset < 10:
            starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
            axes, steps = node.attrs.get("axes"), None
            if starts is None or ends is None:
                raise self.fail("starts and ends are missing", node)
        else:
            starts = self._const(node, ins[1] if len(ins) > 1 else None, "starts").reshape(-1).tolist()
            ends = self._const(node, ins[2] if len(ins) > 2 else None, "ends").reshape(-1).tolist()
            a = self._const(node, ins[3] if len(ins) > 3 else None, "axes", optional=True)
            st = self._const(node, ins[4] if len(ins) > 4 else None, "steps", optional=True)
            axes = None if a is None else a.reshape(-1).tolist()
            steps = None if st is None else st.reshape(-1).tolist()
        axes = list(range(len(starts))) if axes is None else [int(v) + r if v < 0 else int(v) for v in axes]
        steps = [1] * len(starts) if steps is None else [int(v) for v in steps]
        if not len(starts) == len(ends) == len(axes) == len(steps) or any(not 0 <= v < r for v in axes) \
                or len(set(axes)) != len(axes) or 0 in steps:
            raise self.fail(f"starts {starts}, ends {ends}, axes {axes}, steps {steps} do not fit rank {r}", node)
        first, step, out = [0] * r, [1] * r, list(x.shape)
        for s0, e0, ax, sp in zip(starts, ends, axes, steps):
            dim = x.shape[ax]
            s0 = max(min(int(s0), 2 ** 62), -2 ** 62)
            e0 = max(min(int(e0), 2 ** 62), -2 ** 62)
            rng = range(*slice(s0, e0, sp).indices(dim))   # ONNX clamps like Python slicing
            if len(rng) == 0:
                raise self.fail(f"slice {s0}:{e0}:{sp} of axis {ax} (size {dim}) is empty", node)
            first[ax], step[ax], out[ax] = rng.start, sp, len(rng)
        y = self._out(node, out, x.dtype)
        self._emit("slice", node, [x.name], [y], in_shape=x.shape, first=first, step=step, shape=tuple(out),
                   dtype=x.dtype)

    def _op_Concat(self, node, ins):
        if not ins or any(t is None for t in ins):
            raise self.fail("Concat needs at least one input", node)
        dtype = ins[0].dtype
        r = len(ins[0].shape)
        axis = int(node.attrs.get("axis", 0))
        if axis < 0:
            axis += r
        if not 0 <= axis < r:
            raise self.fail(f"axis {node.attrs.get('axis')} is outside the rank {r}", node)
        for t in ins:
            if t.dtype != dtype or len(t.shape) != r or any(
                    t.shape[i] != ins[0].shape[i] for i in range(r) if i != axis):
                raise self.fail(f"inputs {[t.shape for t in ins]} ({[t.dtype for t in ins]}) do not concatenate "
                                f"along axis {axis}", node)
        if dtype not in ACTIVATION_TYPES:
            raise self.fail(f"inputs are {dtype}", node)
        out = list(ins[0].shape)
        out[axis] = sum(t.shape[axis] for t in ins)
        y = self._out(node, out, dtype)
        outer, inner = prod(out[:axis]), prod(out[axis + 1:])
        parts = [(t.name, t.shape[axis] * inner, t.const) for t in ins]
        self._emit("concat", node, [t.name for t in ins if not t.is_const], [y], outer=outer, parts=parts,
                   total=out[axis] * inner, dtype=dtype)

    def _softmax_dims(self, node: Node, shape: tuple) -> tuple[int, int, int]:
        r = len(shape)
        axis = int(node.attrs.get("axis", -1 if self.opset >= 13 else 1))
        if axis < 0:
            axis += r
        if not 0 <= axis < r:
            raise self.fail(f"axis {node.attrs.get('axis')} is outside the rank {r}", node)
        if self.opset >= 13:
            return prod(shape[:axis]), shape[axis], prod(shape[axis + 1:])
        return prod(shape[:axis]), prod(shape[axis:]), 1

    def _reduce(self, node: Node, ins, fn: str) -> None:
        x = self._act(node, ins[0], "input data", ("float32",))
        r = len(x.shape)
        if self.opset < (13 if node.op_type == "ReduceSum" else 18):   # axes became an input then
            axes = node.attrs.get("axes")
        else:
            a = self._const(node, ins[1] if len(ins) > 1 else None, "axes", optional=True)
            axes = None if a is None else a.reshape(-1).tolist()
        keep = int(node.attrs.get("keepdims", 1))
        if not axes:
            if int(node.attrs.get("noop_with_empty_axes", 0)):
                self._alias(node, x, x.shape)
                return
            axes = list(range(r))
        axes = sorted({int(v) + r if v < 0 else int(v) for v in axes})
        if any(not 0 <= v < r for v in axes):
            raise self.fail(f"axes {axes} do not fit rank {r}", node)
        if axes != list(range(axes[0], axes[-1] + 1)):
            raise self.fail(f"reducing over axes {axes} that are not adjacent is not supported", node)
        outer, n, inner = prod(x.shape[:axes[0]]), prod(x.shape[axes[0]:axes[-1] + 1]), prod(x.shape[axes[-1] + 1:])
        out = [1 if i in axes else d for i, d in enumerate(x.shape)] if keep else \
            [d for i, d in enumerate(x.shape) if i not in axes]
        y = self._out(node, out, "float32")
        self._emit("reduce", node, [x.name], [y], fn=fn, outer=outer, n=n, inner=inner)

    def _op_ReduceMean(self, node, ins): self._reduce(node, ins, "mean")
    def _op_ReduceMax(self, node, ins): self._reduce(node, ins, "max")
    def _op_ReduceSum(self, node, ins): self._reduce(node, ins, "sum")

    def _op_Softmax(self, node, ins):
        x = self._act(node, ins[0], "input", ("float32",))
        outer, n, inner = self._softmax_dims(node, x.shape)
        y = self._out(node, x.shape, "float32")
        self._emit("softmax", node, [x.name], [y], outer=outer, n=n, inner=inner)

    def _axis_split(self, node: Node, shape: tuple, axis: int, nvals: int) -> tuple[int, int, int]:
        if nvals == 1:
            return prod(shape), 1, 1
        r = len(shape)
        if axis < 0:
            axis += r
        if not 0 <= axis < r or shape[axis] != nvals:
            raise self.fail(f"per-axis parameters of {nvals} values do not fit axis {axis} of {shape}", node)
        return prod(shape[:axis]), nvals, prod(shape[axis + 1:])
