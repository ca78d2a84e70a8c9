"""ONNX model -> compiler graph (appliance.nn.ir).

Steps: read the model with the `onnx` package; pick the input the window fills and fix its
shape (a dynamic dimension must be fixed by the caller, batch 1); run ONNX shape inference
(its complaints are the model's errors); fuse QDQ patterns (DequantizeLinear -> op ->
QuantizeLinear) into the integer operators onnxruntime runs for them; fold constant
subgraphs (Shape, Gather, Concat of shapes, DequantizeLinear of weights, ...) with ONNX's
reference evaluator; lower every other node to one operator of the graph with its static
shapes, refusing what the kernels cannot run with the node's index, name and type.
"""
from __future__ import annotations

import math
from math import prod
from pathlib import Path

import numpy as np

from appliance.nn.ir import Graph, ModelError, Op, Q_RANGE, QuantSource, Tensor

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


def _onnx():
    try:
        import onnx
    except ImportError:   # pragma: no cover - a runtime dependency
        raise ModelError("the 'onnx' package is not installed (pip install onnx); it reads the model") from None
    return onnx


def _attrs(node) -> dict:
    from onnx import helper
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        out[a.name] = v
    return out


def _f32(x) -> np.float32:
    return np.float32(np.asarray(x, dtype=np.float32).reshape(-1)[0])


class _Node:
    """A node of the model after the QDQ pass (possibly one we made)."""

    def __init__(self, index: int, name: str, op_type: str, domain: str, inputs: list[str], outputs: list[str],
                 attrs: dict) -> None:
        self.index, self.name, self.op_type, self.domain = index, name, op_type, domain
        self.inputs, self.outputs, self.attrs = inputs, outputs, attrs

    @property
    def where(self) -> str:
        op = f"{self.domain}:{self.op_type}" if self.domain not in ("", "ai.onnx") else self.op_type
        return f"node {self.index} '{self.name}' ({op})"


class Importer:
    def __init__(self, path: Path, input_name: str | None = None, input_shape: tuple[int, ...] | None = None,
                 outputs: list[str] | None = None) -> None:
        self.path = Path(path)
        self.label = self.path.name
        self.input_name = input_name
        self.input_shape = tuple(input_shape) if input_shape else None
        self.want_outputs = outputs
        self.tensors: dict[str, Tensor] = {}
        self.ops: list[Op] = []
        self.aliases: dict[str, str] = {}
        self.opset = 0
        self.inference_diverged = False

    # ---- errors -----------------------------------------------------------------------------

    def fail(self, msg: str, node: _Node | None = None) -> ModelError:
        where = f" {node.where}" if node else ""
        return ModelError(f"{self.label}:{where}: {msg}")

    # ---- reading ----------------------------------------------------------------------------

    def run(self) -> Graph:
        onnx = _onnx()
        if not self.path.is_file():
            raise ModelError(f"{self.path}: no such model file")
        try:
            model = onnx.load(str(self.path))
        except Exception as exc:   # protobuf's DecodeError and friends
            raise ModelError(f"{self.label}: not an ONNX model ({type(exc).__name__}: {exc})") from None
        graph = model.graph
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                self.opset = imp.version
            elif imp.domain not in (MS, OURS):
                pass   # checked per node: only its operators matter
        if not self.opset:
            raise ModelError(f"{self.label}: the model imports no ai.onnx opset")
        if self.opset < 7 or self.opset > 22:
            raise ModelError(f"{self.label}: opset {self.opset} is outside the supported 7..22")

        initializers = {t.name: t for t in graph.initializer}
        real_inputs = [i for i in graph.input if i.name not in initializers]
        if not real_inputs:
            raise ModelError(f"{self.label}: the model has no input")
        if self.input_name is None:
            if len(real_inputs) > 1:
                names = ", ".join(i.name for i in real_inputs)
                raise ModelError(f"{self.label}: the model has {len(real_inputs)} inputs ({names}); choose the one the "
                                 f"window fills with --input")
            chosen = real_inputs[0]
        else:
            found = [i for i in real_inputs if i.name == self.input_name]
            if not found:
                names = ", ".join(i.name for i in real_inputs)
                raise ModelError(f"{self.label}: no input named {self.input_name!r} (inputs: {names})")
            chosen = found[0]
            others = [i.name for i in real_inputs if i.name != self.input_name]
            if others:
                raise ModelError(f"{self.label}: inputs {', '.join(others)} would have nothing to fill them; only "
                                 f"models with one input (besides initializers) can be compiled")
        self._fix_input(model, chosen)

        try:
            inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        except Exception as exc:
            text = str(exc).strip().splitlines()
            raise ModelError(f"{self.label}: ONNX shape inference refuses the model: {text[-1] if text else exc}") \
                from None
        self.inferred = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            tt = vi.type.tensor_type
            if tt.HasField("shape"):
                self.inferred[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)

        for name, t in initializers.items():
            arr = onnx.numpy_helper.to_array(t)
            self.tensors[name] = Tensor(name, tuple(arr.shape), str(arr.dtype), const=np.ascontiguousarray(arr))
        dtype = ELEM_TYPES.get(chosen.type.tensor_type.elem_type, "?")
        if dtype != "float32":
            raise ModelError(f"{self.label}: input {chosen.name!r} is {dtype}; the window fills float32 inputs only")
        self.tensors[chosen.name] = Tensor(chosen.name, self.input_shape, "float32")

        nodes = []
        for i, n in enumerate(graph.node):
            if n.op_type in ("If", "Loop", "Scan") or any(a.type in (5, 10) for a in n.attribute):
                nodes.append(_Node(i, n.name, n.op_type, n.domain, list(n.input), list(n.output), {}))
                raise self.fail("control flow and subgraphs are not supported", nodes[-1])
            nodes.append(_Node(i, n.name or f"#{i}", n.op_type, n.domain, list(n.input), list(n.output), _attrs(n)))
        nodes = self._toposort(nodes)

        graph_outputs = [o.name for o in graph.output]
        if self.want_outputs:
            missing = [o for o in self.want_outputs if o not in graph_outputs]
            if missing:
                raise ModelError(f"{self.label}: no output named {', '.join(map(repr, missing))} "
                                 f"(outputs: {', '.join(graph_outputs)})")
            graph_outputs = list(self.want_outputs)
        nodes = self._live(nodes, graph_outputs)
        nodes = fuse_qdq(nodes, self.tensors, set(graph_outputs), self.opset)
        nodes = self._live(nodes, graph_outputs)

        for node in nodes:
            self._lower(node)

        for out in graph_outputs:
            t = self.tensors.get(out)
            if t is None:
                raise ModelError(f"{self.label}: output {out!r} is produced by no node")
            if t.is_const:
                raise ModelError(f"{self.label}: output {out!r} is a constant; there is nothing to compute")
            if t.dtype not in ACTIVATION_TYPES:
                raise ModelError(f"{self.label}: output {out!r} is {t.dtype}; outputs must be float32, uint8 or int8")
        return Graph(model=self.label, tensors=self.tensors, ops=self.ops, input=chosen.name, outputs=graph_outputs,
                     aliases=self.aliases, opset=self.opset, producer=f"{model.producer_name} {model.producer_version}")

    def _fix_input(self, model, chosen) -> None:
        dims = chosen.type.tensor_type.shape.dim
        declared = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else
                    (d.dim_param or "?") for d in dims]
        if self.input_shape is None:
            unknown = [i for i, d in enumerate(declared) if not isinstance(d, int)]
            if not chosen.type.tensor_type.HasField("shape"):
                raise ModelError(f"{self.label}: input {chosen.name!r} has no shape; give it with --input-shape")
            if unknown:
                shown = "x".join(str(d) for d in declared)
                hint = "x".join("1" if i == 0 and not isinstance(d, int) else str(d) if isinstance(d, int) else "N"
                                for i, d in enumerate(declared))
                raise ModelError(f"{self.label}: input {chosen.name!r} has dynamic dimension(s) ({shown}); fix them "
                                 f"with --input-shape, e.g. --input-shape "
                                 f"{hint}")
            self.input_shape = tuple(declared)
        else:
            if len(declared) and len(declared) != len(self.input_shape):
                raise ModelError(f"{self.label}: --input-shape {'x'.join(map(str, self.input_shape))} has "
                                 f"{len(self.input_shape)} dimensions; input {chosen.name!r} has {len(declared)}")
            for i, (d, s) in enumerate(zip(declared, self.input_shape)):
                if isinstance(d, int) and d != s:
                    raise ModelError(f"{self.label}: --input-shape gives dimension {i} as {s}; the model fixes it "
                                     f"at {d}")
        if any(s < 1 for s in self.input_shape):
            raise ModelError(f"{self.label}: input shape {self.input_shape} has a dimension below 1")
        if len(self.input_shape) >= 2 and self.input_shape[0] != 1:
            raise ModelError(f"{self.label}: input {chosen.name!r} has batch dimension {self.input_shape[0]}; a module "
                             f"runs one window at a time (batch 1)")
        # Write the fixed shape into the model so shape inference sees it.
        tt = chosen.type.tensor_type
        del tt.shape.dim[:]
        for s in self.input_shape:
            tt.shape.dim.add().dim_value = s

    def _toposort(self, nodes: list[_Node]) -> list[_Node]:
        have = set(self.tensors) | {""}
        done: list[_Node] = []
        pending = list(nodes)
        while pending:
            progressed = False
            rest = []
            for n in pending:
                if all(i in have for i in n.inputs):
                    done.append(n)
                    have.update(n.outputs)
                    progressed = True
                else:
                    rest.append(n)
            if not progressed:
                n = rest[0]
                missing = [i for i in n.inputs if i not in have]
                raise self.fail(f"input(s) {', '.join(map(repr, missing))} come from no node, initializer or "
                                f"graph input (or the graph has a cycle)", n)
            pending = rest
        return done

    def _live(self, nodes: list[_Node], outputs: list[str]) -> list[_Node]:
        """Only the nodes the outputs depend on."""
        need = set(outputs)
        keep = []
        for n in reversed(nodes):
            if any(o in need for o in n.outputs):
                keep.append(n)
                need.update(i for i in n.inputs if i)
        return list(reversed(keep))

    # ---- lowering ---------------------------------------------------------------------------

    def _lower(self, node: _Node) -> None:
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        ins = []
        for name in node.inputs:
            if not name:
                ins.append(None)
                continue
            ins.append(self.tensors[name])
        if node.op_type == "Constant" and domain == "":
            self._constant(node)
            return
        if node.op_type in ("Shape", "Size") and domain == "" and ins and ins[0] is not None:
            shape = ins[0].shape
            if node.op_type == "Size":
                value = np.array(prod(shape), np.int64)
            else:
                start = node.attrs.get("start", 0)
                end = node.attrs.get("end", len(shape))
                value = np.array(shape[slice(start, end)], np.int64)
            self._define_const(node.outputs[0], value)
            return
        if domain == "" and ins and all(t is None or t.is_const for t in ins) and node.op_type not in ("Dropout",):
            self._fold(node, ins)
            return
        if domain == OURS:
            method = getattr(self, f"_op_{node.op_type}", None)
        elif domain in ("", MS) and node.op_type in SUPPORTED[domain]:
            method = getattr(self, f"_op_{node.op_type}")
        else:
            method = None
        if method is None:
            op = f"{domain}:{node.op_type}" if domain else node.op_type
            raise self.fail(f"operator {op} is not supported (supported: {', '.join(supported_operators())})", node)
        method(node, ins)
        for out in node.outputs:
            if out and out in self.tensors:
                self._check_inferred(node, self.tensors[out])

    def _check_inferred(self, node: _Node, t: Tensor) -> None:
        if self.inference_diverged:
            return
        shape = self.inferred.get(t.name)
        if shape is None or None in shape or not shape and t.shape == ():
            return
        if tuple(shape) != tuple(t.shape):
            raise self.fail(f"output {t.name!r}: computed shape {t.shape} but ONNX shape inference says {shape}", node)

    def _constant(self, node: _Node) -> None:
        from onnx import numpy_helper
        a = node.attrs
        if "value" in a:
            value = numpy_helper.to_array(a["value"])
        elif "value_float" in a:
            value = np.array(a["value_float"], np.float32)
        elif "value_floats" in a:
            value = np.array(a["value_floats"], np.float32)
        elif "value_int" in a:
            value = np.array(a["value_int"], np.int64)
        elif "value_ints" in a:
            value = np.array(a["value_ints"], np.int64)
        else:
            raise self.fail("a Constant without a numeric value is not supported", node)
        self._define_const(node.outputs[0], value)

    def _define_const(self, name: str, value: np.ndarray, qsource: QuantSource | None = None) -> None:
        value = np.ascontiguousarray(value)
        self.tensors[name] = Tensor(name, tuple(value.shape), str(value.dtype), const=value, qsource=qsource)

    def _fold(self, node: _Node, ins: list[Tensor | None]) -> None:
        """Evaluate a node whose inputs are all constants, with ONNX's reference implementation."""
        from onnx import helper
        from onnx.reference import ReferenceEvaluator
        for name in node.outputs:
            shape = self.inferred.get(name)
            # Evaluating ConstantOfShape/Expand/Tile of a crafted shape would allocate it here.
            if shape and None not in shape and prod(shape) > MAX_FOLD_VALUES:
                raise self.fail(f"constant {name!r} of shape {tuple(shape)} has {prod(shape)} values (at most "
                                f"{MAX_FOLD_VALUES})", node)
        proto = helper.make_node(node.op_type, node.inputs, node.outputs, domain=node.domain or "", **node.attrs)
        feeds = {t.name: t.const for t in ins if t is not None}
        try:
            ev = ReferenceEvaluator(proto, opsets={"": self.opset})
            results = ev.run(None, feeds)
        except Exception as exc:
            raise self.fail(f"cannot evaluate this constant subgraph ({type(exc).__name__}: {exc})", node) from None
        qsource = None
        if node.op_type == "DequantizeLinear":
            x, scale = ins[0].const, np.asarray(ins[1].const, np.float32)
            zp = ins[2].const if len(ins) > 2 and ins[2] is not None else np.zeros_like(scale, dtype=x.dtype)
            qsource = QuantSource(x, scale, np.asarray(zp), node.attrs.get("axis", 1))
        for name, value in zip(node.outputs, results):
            if name:
                self._define_const(name, np.asarray(value), qsource)

    # ---- helpers for the operators ---------------------------------------------------------

    def _act(self, node: _Node, t: Tensor | None, what: str, dtypes=ACTIVATION_TYPES) -> Tensor:
        if t is None:
            raise self.fail(f"{what} is missing", node)
        if t.dtype not in dtypes:
            raise self.fail(f"{what} {t.name!r} is {t.dtype}; this operator takes {'/'.join(dtypes)}", node)
        return t

    def _const(self, node: _Node, t: Tensor | None, what: str, optional: bool = False):
        if t is None:
            if optional:
                return None
            raise self.fail(f"{what} is missing", node)
        if not t.is_const:
            raise self.fail(f"{what} {t.name!r} must be a constant (an initializer); it is computed at run time", node)
        return t.const

    def _scalar(self, node: _Node, t: Tensor | None, what: str, default=None):
        if t is None:
            if default is None:
                raise self.fail(f"{what} is missing", node)
            return default
        v = self._const(node, t, what)
        if v.size != 1:
            raise self.fail(f"{what} must be a single value (per-tensor), not shape {v.shape}", node)
        return v.reshape(-1)[0]

    def _out(self, node: _Node, shape, dtype: str, index: int = 0) -> str:
        name = node.outputs[index]
        shape = tuple(int(s) for s in shape)
        if any(s < 1 for s in shape):
            raise self.fail(f"output {name!r} would have shape {shape} (a dimension below 1)", node)
        self.tensors[name] = Tensor(name, shape, dtype)
        return name

    def _alias(self, node: _Node, x: Tensor, shape) -> None:
        out = self._out(node, shape, x.dtype)
        if prod(self.tensors[out].shape) != x.size:
            raise self.fail(f"cannot view {x.shape} as {tuple(shape)}", node)
        self.aliases[out] = x.name

    def _emit(self, kind: str, node: _Node, inputs: list[str], outputs: list[str], **attrs) -> Op:
        attrs.setdefault("label", node.op_type)
        op = Op(kind, inputs, outputs, attrs, node.where)
        self.ops.append(op)
        return op

    def _unused_extra_outputs(self, node: _Node, keep: int = 1) -> None:
        extra = [o for o in node.outputs[keep:] if o]
        if extra:
            raise self.fail(f"output(s) {', '.join(map(repr, extra))} are not supported (only the first)", node)

    # ---- spatial geometry --------------------------------------------------------------------

    def _spatial(self, node: _Node, x: Tensor, kernel: list[int], what: str, dilations_ok: bool = True,
                 ceil_ok: bool = False) -> dict:
        """Strides, dilations and explicit begin/end pads for a 1-D or 2-D window op on NC(H)W."""
        rank = len(x.shape) - 2
        if len(x.shape) not in (3, 4) or x.shape[0] != 1:
            raise self.fail(f"{what} input {x.name!r} has shape {x.shape}; 1-D (1,C,L) and 2-D (1,C,H,W) with "
                            f"batch 1 are supported", node)
        if len(kernel) != rank:
            raise self.fail(f"kernel has {len(kernel)} dimensions for a {rank}-D input", node)
        a = node.attrs
        strides = list(a.get("strides", [1] * rank))
        dil = list(a.get("dilations", [1] * rank))
        if len(strides) != rank or len(dil) != rank or min(strides) < 1 or min(dil) < 1:
            raise self.fail(f"strides {strides} / dilations {dil} do not fit a {rank}-D input", node)
        if not dilations_ok and any(d != 1 for d in dil):
            raise self.fail(f"dilations {dil} are not supported for {node.op_type}", node)
        ceil = int(a.get("ceil_mode", 0))
        if ceil and not ceil_ok:
            raise self.fail("ceil_mode=1 is not supported for this operator", node)
        spatial = list(x.shape[2:])
        eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
        auto = a.get("auto_pad", "NOTSET")
        if auto in ("NOTSET", ""):
            pads = list(a.get("pads", [0] * (2 * rank)))
            if len(pads) != 2 * rank or min(pads) < 0:
                raise self.fail(f"pads {pads} do not fit a {rank}-D input", node)
            begin, end = pads[:rank], pads[rank:]
        elif auto == "VALID":
            begin, end = [0] * rank, [0] * rank
        elif auto in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for n, s, e in zip(spatial, strides, eff):
                out = -(-n // s)
                total = max(0, (out - 1) * s + e - n)
                small, big = total // 2, total - total // 2
                begin.append(small if auto == "SAME_UPPER" else big)
                end.append(big if auto == "SAME_UPPER" else small)
        else:
            raise self.fail(f"auto_pad {auto!r} is not one of NOTSET, SAME_UPPER, SAME_LOWER, VALID", node)
        outs = []
        for n, s, e, b, en in zip(spatial, strides, eff, begin, end):
            span = n + b + en - e
            if span < 0:
                raise self.fail(f"the kernel ({e} wide with dilation) is larger than the padded input ({n + b + en})",
                                node)
            o = (-(-span // s) if ceil else span // s) + 1
            if ceil and (o - 1) * s >= n + b:   # the last window would start in the end padding
                o -= 1
                # onnxruntime and ONNX's reference drop that window; ONNX shape inference (1.23)
                # does not, so from here on its shapes are one too large: stop comparing.
                self.inference_diverged = True
            outs.append(o)
        if rank == 1:   # 1-D as 2-D with height 1
            return dict(H=1, W=spatial[0], OH=1, OW=outs[0], KH=1, KW=kernel[0], sh=1, sw=strides[0], dh=1,
                        dw=dil[0], pt=0, pl=begin[0], pb=0, pr=end[0], rank=1)
        return dict(H=spatial[0], W=spatial[1], OH=outs[0], OW=outs[1], KH=kernel[0], KW=kernel[1], sh=strides[0],
                    sw=strides[1], dh=dil[0], dw=dil[1], pt=begin[0], pl=begin[1], pb=end[0], pr=end[1], rank=2)

    def _out_spatial(self, x: Tensor, channels: int, g: dict) -> tuple:
        return (1, channels, g["OW"]) if g["rank"] == 1 else (1, channels, g["OH"], g["OW"])

    # ---- operators ---------------------------------------------------------------------------

    def _op_Conv(self, node: _Node, ins) -> None:
        x = self._act(node, ins[0], "input X", ("float32",))
        w = self._const(node, ins[1] if len(ins) > 1 else None, "weight W")
        b = self._const(node, ins[2] if len(ins) > 2 else None, "bias B", optional=True)
        self._conv(node, x, w, b, None)

    def _conv(self, node: _Node, x: Tensor, w: np.ndarray, b, quant: dict | None) -> None:
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

    def _op_QLinearConv(self, node: _Node, ins) -> None:
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

    def _op_Gemm(self, node: _Node, ins) -> None:
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

    def _matmul_shapes(self, node: _Node, a_shape: tuple, b_shape: tuple, b_const: bool):
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

    def _op_MatMul(self, node: _Node, ins) -> None:
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

    def _qgemm(self, node: _Node, a: Tensor, az: int, as_: np.float32, bq: np.ndarray, bs: np.ndarray, bz: np.ndarray,
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

    def _op_QLinearMatMul(self, node: _Node, ins) -> None:
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

    def _op_QGemm(self, node: _Node, ins) -> None:
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

    def _broadcast(self, node: _Node, a: Tensor, b: Tensor) -> tuple:
        try:
            out = np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            raise self.fail(f"shapes {a.shape} and {b.shape} do not broadcast", node) from None
        return tuple(out)

    def _binary(self, node: _Node, ins, fn: str) -> None:
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

    def _qbinary(self, node: _Node, ins, fn: str) -> None:
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
                   a_const=a.const, b_const=b.const, as_=_f32(as_), az=int(az), bs=_f32(bs), bz=int(bz),
                   cs=_f32(cs), cz=int(cz), atype=a.dtype, btype=b.dtype, ytype=ytype)

    def _op_QLinearAdd(self, node, ins): self._qbinary(node, ins, "add")
    def _op_QLinearMul(self, node, ins): self._qbinary(node, ins, "mul")

    def _unary(self, node: _Node, x: Tensor, fn: str, **params) -> None:
        self._act(node, x, "input X", ("float32",))
        self._unused_extra_outputs(node)
        y = self._out(node, x.shape, "float32")
        self._emit("unary", node, [x.name], [y], fn=fn, n=x.size, **params)

    def _op_Relu(self, node, ins): self._unary(node, ins[0], "relu")
    def _op_Sigmoid(self, node, ins): self._unary(node, ins[0], "sigmoid")
    def _op_Tanh(self, node, ins): self._unary(node, ins[0], "tanh")

    def _op_LeakyRelu(self, node, ins):
        self._unary(node, ins[0], "leakyrelu", alpha=float(np.float32(node.attrs.get("alpha", 0.01))))

    def _clip_bounds(self, node: _Node, ins) -> tuple[float, float]:
        if self.opset < 11:
            lo, hi = node.attrs.get("min", -math.inf), node.attrs.get("max", math.inf)
        else:
            lo = self._scalar(node, ins[1], "min", default=-math.inf) if len(ins) > 1 else -math.inf
            hi = self._scalar(node, ins[2], "max", default=math.inf) if len(ins) > 2 else math.inf
        return float(np.float32(lo)), float(np.float32(hi))

    def _op_Clip(self, node, ins):
        lo, hi = self._clip_bounds(node, ins)
        self._unary(node, ins[0], "clip", lo=lo, hi=hi)

    def _lut(self, node: _Node, x: Tensor, xs, xz, ys, yz, ytype: str, fn: str, params: dict) -> None:
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

    def _pool(self, node: _Node, x: Tensor, kind: str, quant: dict | None = None) -> None:
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

    def _op_QLinearAveragePool(self, node, ins):
        x = self._act(node, ins[0], "input X", ("uint8", "int8"))
        if int(node.attrs.get("channels_last", 0)):
            raise self.fail("channels_last=1 is not supported", node)
        yz_t = ins[4] if len(ins) > 4 else None
        quant = dict(xs=_f32(self._scalar(node, ins[1], "x_scale")),
                     xz=int(self._scalar(node, ins[2], "x_zero_point", 0)),
                     ys=_f32(self._scalar(node, ins[3], "y_scale")),
                     yz=int(self._scalar(node, yz_t, "y_zero_point", 0)),
                     ytype=str(yz_t.const.dtype) if yz_t is not None else x.dtype)
        self._pool(node, x, "avg", quant)

    def _global_pool(self, node: _Node, x: Tensor, kind: str, quant: dict | None = None) -> None:
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

    def _op_QLinearGlobalAveragePool(self, node, ins):
        x = self._act(node, ins[0], "input X", ("uint8", "int8"))
        if int(node.attrs.get("channels_last", 0)):
            raise self.fail("channels_last=1 is not supported", node)
        yz_t = ins[4] if len(ins) > 4 else None
        xs = _f32(self._scalar(node, ins[1], "x_scale"))
        ys = _f32(self._scalar(node, ins[3], "y_scale"))
        n = prod(x.shape[2:])
        scale = xs / (ys * np.float32(n))   # as MLAS: ScaleInput / (ScaleOutput * ImageSize)
        quant = dict(xz=int(self._scalar(node, ins[2], "x_zero_point", 0)), scale=np.float32(scale),
                     yz=int(self._scalar(node, yz_t, "y_zero_point", 0)),
                     ytype=str(yz_t.const.dtype) if yz_t is not None else x.dtype)
        self._global_pool(node, x, "avg", quant)

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

    def _axes(self, node: _Node, ins, rank: int) -> list[int] | None:
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

    def _softmax_dims(self, node: _Node, shape: tuple) -> tuple[int, int, int]:
        r = len(shape)
        axis = int(node.attrs.get("axis", -1 if self.opset >= 13 else 1))
        if axis < 0:
            axis += r
        if not 0 <= axis < r:
            raise self.fail(f"axis {node.attrs.get('axis')} is outside the rank {r}", node)
        if self.opset >= 13:
            return prod(shape[:axis]), shape[axis], prod(shape[axis + 1:])
        return prod(shape[:axis]), prod(shape[axis:]), 1

    def _reduce(self, node: _Node, ins, fn: str) -> None:
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

    def _op_QLinearSoftmax(self, node, ins):
        x = self._act(node, ins[0], "input X", ("uint8", "int8"))
        opset = int(node.attrs.get("opset", self.opset))
        save = self.opset
        self.opset = opset
        try:
            outer, n, inner = self._softmax_dims(node, x.shape)
        finally:
            self.opset = save
        xs = _f32(self._scalar(node, ins[1], "X_scale"))
        ys = _f32(self._scalar(node, ins[3], "Y_scale"))
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

    def _axis_split(self, node: _Node, shape: tuple, axis: int, nvals: int) -> tuple[int, int, int]:
        if nvals == 1:
            return prod(shape), 1, 1
        r = len(shape)
        if axis < 0:
            axis += r
        if not 0 <= axis < r or shape[axis] != nvals:
            raise self.fail(f"per-axis parameters of {nvals} values do not fit axis {axis} of {shape}", node)
        return prod(shape[:axis]), nvals, prod(shape[axis + 1:])

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


# ---- QDQ fusion ------------------------------------------------------------------------------

def _cval(tensors: dict[str, Tensor], consts: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    if not name:
        return None
    if name in consts:
        return consts[name]
    t = tensors.get(name)
    return t.const if t is not None and t.is_const else None


def fuse_qdq(nodes: list[_Node], tensors: dict[str, Tensor], graph_outputs: set[str], opset: int) -> list[_Node]:
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
    consumers: dict[str, list[_Node]] = {}
    for n in nodes:
        for i in n.inputs:
            consumers.setdefault(i, []).append(n)

    def dq(name: str, per_tensor: bool = True):
        """(quantized input, scale, zero point, axis) if `name` is made by a DequantizeLinear with constant params."""
        n = producer.get(name)
        if n is None or n.op_type != "DequantizeLinear" or n.domain not in ("", "ai.onnx"):
            return None
        scale = _cval(tensors, consts, n.inputs[1])
        zp = _cval(tensors, consts, n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2] else None
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
        scale = _cval(tensors, consts, n.inputs[1])
        if scale is None or np.asarray(scale).size != 1 or len(n.inputs) < 3 or not n.inputs[2]:
            return None
        zp = _cval(tensors, consts, n.inputs[2])
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

    out: list[_Node] = []
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
                wv = _cval(tensors, consts, wq[0]) if wq else None
                bv = _cval(tensors, consts, bq[0]) if bq else None
                bias_ok = (len(n.inputs) < 3 or not n.inputs[2]) or (bv is not None and bv.dtype == np.int32)
                if wv is not None and wv.dtype in (np.uint8, np.int8) and (np.asarray(wq[4]).size == 1 or wq[3] == 0) \
                        and bias_ok and xq[5] is not None:
                    ins = [xq[0], xq[1], xq[2], wq[0], wq[1], wq[2], qn.inputs[1], qn.inputs[2]]
                    if bq is not None:
                        ins.append(bq[0])
                    fused = _Node(n.index, n.name, "QLinearConv", "", ins, [qn.outputs[0]], dict(n.attrs))
            elif n.op_type == "MatMul" and xq is not None and xq[5] is not None:
                wq = dq(n.inputs[1], per_tensor=False)
                wv = _cval(tensors, consts, wq[0]) if wq else None
                if wv is not None and wv.ndim == 2 and wv.dtype in (np.uint8, np.int8) and \
                        (np.asarray(wq[4]).size == 1 or wq[3] in (1, -1)):
                    fused = _Node(n.index, n.name, "QLinearMatMul", "",
                                  [xq[0], xq[1], xq[2], wq[0], wq[1], wq[2], qn.inputs[1], qn.inputs[2]],
                                  [qn.outputs[0]], {})
            elif n.op_type == "Gemm" and xq is not None and xq[5] is not None and \
                    float(n.attrs.get("beta", 1.0)) == 1.0:
                wq = dq(n.inputs[1], per_tensor=False)
                bq = dq(n.inputs[2], per_tensor=False) if len(n.inputs) > 2 and n.inputs[2] else None
                wv = _cval(tensors, consts, wq[0]) if wq else None
                bv = _cval(tensors, consts, bq[0]) if bq else None
                bias_ok = (len(n.inputs) < 3 or not n.inputs[2]) or (bv is not None and bv.dtype == np.int32)
                n_axis = 0 if int(n.attrs.get("transB", 0)) else 1   # per-channel scales must follow N
                per_n = wq is not None and (np.asarray(wq[4]).size == 1 or wq[3] in (n_axis, n_axis - 2))
                if wv is not None and wv.ndim == 2 and wv.dtype in (np.uint8, np.int8) and bias_ok and per_n:
                    ins = [xq[0], xq[1], xq[2], wq[0], wq[1], wq[2], bq[0] if bq else "", qn.inputs[1], qn.inputs[2]]
                    attrs = {k: n.attrs[k] for k in ("alpha", "transA", "transB") if k in n.attrs}
                    fused = _Node(n.index, n.name, "QGemm", MS, ins, [qn.outputs[0]], attrs)
            elif n.op_type in ("Add", "Mul") and len(n.inputs) == 2:
                aq, bq = dq(n.inputs[0]), dq(n.inputs[1])
                if aq and bq and aq[5] is not None and bq[5] is not None and act_type(aq) == act_type(bq) \
                        == str(yz.dtype):
                    fused = _Node(n.index, n.name, f"QLinear{n.op_type}", MS,
                                  [aq[0], aq[1], aq[2], bq[0], bq[1], bq[2], qn.inputs[1], qn.inputs[2]],
                                  [qn.outputs[0]], {})
            elif n.op_type == "AveragePool" and xq is not None and xq[5] is not None:
                fused = _Node(n.index, n.name, "QLinearAveragePool", MS,
                              [xq[0], xq[1], xq[2], qn.inputs[1], qn.inputs[2]], [qn.outputs[0]], dict(n.attrs))
            elif n.op_type == "GlobalAveragePool" and xq is not None and xq[5] is not None:
                fused = _Node(n.index, n.name, "QLinearGlobalAveragePool", MS,
                              [xq[0], xq[1], xq[2], qn.inputs[1], qn.inputs[2]], [qn.outputs[0]], {"channels_last": 0})
            elif n.op_type == "Softmax" and xq is not None and xq[5] is not None:
                attrs = {"axis": int(n.attrs.get("axis", -1 if opset >= 13 else 1)), "opset": opset}
                fused = _Node(n.index, n.name, "QLinearSoftmax", MS,
                              [xq[0], xq[1], xq[2], qn.inputs[1], qn.inputs[2]], [qn.outputs[0]], attrs)
            elif n.op_type in ("MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity",
                               "Dropout") and xq is not None and same_q(xq, qa):
                fused = _Node(n.index, n.name, n.op_type, n.domain, [xq[0]] + n.inputs[1:], [qn.outputs[0]],
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
                        lo = _cval(tensors, consts, n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1] else None
                        hi = _cval(tensors, consts, n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2] else None
                        ok = (len(n.inputs) < 2 or not n.inputs[1] or lo is not None) and \
                             (len(n.inputs) < 3 or not n.inputs[2] or hi is not None)
                        attrs["lo"] = float(lo.reshape(-1)[0]) if lo is not None else -math.inf
                        attrs["hi"] = float(hi.reshape(-1)[0]) if hi is not None else math.inf
                elif n.op_type == "LeakyRelu":
                    attrs["alpha"] = float(n.attrs.get("alpha", 0.01))
                if ok:
                    fused = _Node(n.index, n.name, "QLut", OURS, [xq[0]], [qn.outputs[0]], attrs)
        if fused is not None:
            removed.add(id(qa[0]))
            out.append(fused)
        else:
            out.append(n)
    return out


def import_model(path: Path, input_name: str | None = None, input_shape: tuple[int, ...] | None = None,
                 outputs: list[str] | None = None) -> Graph:
    return Importer(path, input_name, input_shape, outputs).run()
