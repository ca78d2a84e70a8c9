"""ONNX model -> compiler graph (appliance_tools.nn.ir).

Steps: read the model with the `onnx` package; pick the input the window fills and fix its
shape (a dynamic dimension must be fixed by the caller, batch 1); run ONNX shape inference
(its complaints are the model's errors); fuse QDQ patterns (DequantizeLinear -> op ->
QuantizeLinear) into the integer operators onnxruntime runs for them; fold constant
subgraphs (Shape, Gather, Concat of shapes, DequantizeLinear of weights, ...) with ONNX's
reference evaluator; lower every other node to one operator of the graph with its static
shapes, refusing what the kernels cannot run with the node's index, name and type.
"""
from __future__ import annotations

from math import prod
from pathlib import Path

import numpy as np

from appliance_tools.nn.fuse_qdq import fuse_qdq
from appliance_tools.nn.graph import ACTIVATION_TYPES, ELEM_TYPES, MAX_FOLD_VALUES, MS, OURS, SUPPORTED, Node, \
    attributes, onnx_module, supported_operators
from appliance_tools.nn.ir import Graph, ModelError, Op, QuantSource, Tensor
from appliance_tools.nn.ops_float import FloatOps
from appliance_tools.nn.ops_quant import QuantOps
from appliance_tools.nn.ops_shape import ShapeOps

__all__ = ["Importer", "import_model", "supported_operators"]


class Importer(FloatOps, ShapeOps, QuantOps):
    """Reads the model, runs the passes and lowers each node by its op_Type method (the ops_*
    mixins); the generic steps and helpers are here."""

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

    def fail(self, msg: str, node: Node | None = None) -> ModelError:
        where = f" {node.where}" if node else ""
        return ModelError(f"{self.label}:{where}: {msg}")

    # ---- reading ----------------------------------------------------------------------------

    def run(self) -> Graph:
        onnx = onnx_module()
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
                nodes.append(Node(i, n.name, n.op_type, n.domain, list(n.input), list(n.output), {}))
                raise self.fail("control flow and subgraphs are not supported", nodes[-1])
            nodes.append(Node(i, n.name or f"#{i}", n.op_type, n.domain, list(n.input), list(n.output), attributes(n)))
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

    def _toposort(self, nodes: list[Node]) -> list[Node]:
        have = set(self.tensors) | {""}
        done: list[Node] = []
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

    def _live(self, nodes: list[Node], outputs: list[str]) -> list[Node]:
        """Only the nodes the outputs depend on."""
        need = set(outputs)
        keep = []
        for n in reversed(nodes):
            if any(o in need for o in n.outputs):
                keep.append(n)
                need.update(i for i in n.inputs if i)
        return list(reversed(keep))

    # ---- lowering ---------------------------------------------------------------------------

    def _lower(self, node: Node) -> None:
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

    def _check_inferred(self, node: Node, t: Tensor) -> None:
        if self.inference_diverged:
            return
        shape = self.inferred.get(t.name)
        if shape is None or None in shape or not shape and t.shape == ():
            return
        if tuple(shape) != tuple(t.shape):
            raise self.fail(f"output {t.name!r}: computed shape {t.shape} but ONNX shape inference says {shape}", node)

    def _constant(self, node: Node) -> None:
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

    def _fold(self, node: Node, ins: list[Tensor | None]) -> None:
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

    def _act(self, node: Node, t: Tensor | None, what: str, dtypes=ACTIVATION_TYPES) -> Tensor:
        if t is None:
            raise self.fail(f"{what} is missing", node)
        if t.dtype not in dtypes:
            raise self.fail(f"{what} {t.name!r} is {t.dtype}; this operator takes {'/'.join(dtypes)}", node)
        return t

    def _const(self, node: Node, t: Tensor | None, what: str, optional: bool = False):
        if t is None:
            if optional:
                return None
            raise self.fail(f"{what} is missing", node)
        if not t.is_const:
            raise self.fail(f"{what} {t.name!r} must be a constant (an initializer); it is computed at run time", node)
        return t.const

    def _scalar(self, node: Node, t: Tensor | None, what: str, default=None):
        if t is None:
            if default is None:
                raise self.fail(f"{what} is missing", node)
            return default
        v = self._const(node, t, what)
        if v.size != 1:
            raise self.fail(f"{what} must be a single value (per-tensor), not shape {v.shape}", node)
        return v.reshape(-1)[0]

    def _out(self, node: Node, shape, dtype: str, index: int = 0) -> str:
        name = node.outputs[index]
        shape = tuple(int(s) for s in shape)
        if any(s < 1 for s in shape):
            raise self.fail(f"output {name!r} would have shape {shape} (a dimension below 1)", node)
        self.tensors[name] = Tensor(name, shape, dtype)
        return name

    def _alias(self, node: Node, x: Tensor, shape) -> None:
        out = self._out(node, shape, x.dtype)
        if prod(self.tensors[out].shape) != x.size:
            raise self.fail(f"cannot view {x.shape} as {tuple(shape)}", node)
        self.aliases[out] = x.name

    def _emit(self, kind: str, node: Node, inputs: list[str], outputs: list[str], **attrs) -> Op:
        attrs.setdefault("label", node.op_type)
        op = Op(kind, inputs, outputs, attrs, node.where)
        self.ops.append(op)
        return op

    def _unused_extra_outputs(self, node: Node, keep: int = 1) -> None:
        extra = [o for o in node.outputs[keep:] if o]
        if extra:
            raise self.fail(f"output(s) {', '.join(map(repr, extra))} are not supported (only the first)", node)

    # ---- spatial geometry --------------------------------------------------------------------

    def _spatial(self, node: Node, x: Tensor, kernel: list[int], what: str, dilations_ok: bool = True,
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


def import_model(path: Path, input_name: str | None = None, input_shape: tuple[int, ...] | None = None,
                 outputs: list[str] | None = None) -> Graph:
    return Importer(path, input_name, input_shape, outputs).run()
