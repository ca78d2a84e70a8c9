"""compile_model(): ONNX model -> ABI v1 wasm module (+ native twins for ap.nn_run).

docs/models.md describes the options, the module's params, features and events, and the errors.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

from appliance.config.params import SIMD_OF_SECTION, Manifest as ParamsManifest
from appliance.runtime.wasm_binary import custom_section
from appliance_tools.modbuild import SDK_DIR, with_manifest
from appliance_tools.nn import codegen, passes, toolchain
from appliance.runtime.hostcalls.nn import pack_descriptor, library_name
from appliance_tools.nn.ir import Graph, ModelError
from appliance_tools.nn.onnx_import import import_model

FEATURE_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
MAX_FEATURES = 256
MAX_CHANNELS = 64
MAX_LABELS = 256
PARAMS_BYTES = 4096
DEFAULT_ARCHES = ("x86_64", "aarch64")
DEFAULT_MEMORY_MB = 64     # the runtime's default runtime.max_memory_mb
WINDOW_SLACK_BYTES = (1 << 20) + 64


@dataclass
class NativeLibrary:
    arch: str
    path: Path
    sha256: str
    size: int


@dataclass
class CompileResult:
    wasm: Path
    size: int
    sha256: str
    model_hash: str                       # names the native libraries; embedded in the module
    native: list[NativeLibrary]
    memory_kb: int
    arena_bytes: int                      # activations and scratch, after reuse (x.wasm)
    weight_bytes: int                     # constants
    input_name: str
    input_shape: tuple[int, ...]
    source: str                           # "window CxF float32" or "frame WxH, P plane(s) uint8"
    features: list[str]                   # per window, in order (the rule adds p.*/class, nn.host)
    rule: str
    labels: list[str]
    operators: list[str]                  # one line per generated operator
    seconds: dict[str, float] = field(default_factory=dict)
    simd_wasm: Path | None = None         # x.simd.wasm beside x.wasm: the SIMD128 build (wasmtime)

    def summary(self) -> str:
        lines = [f"{self.wasm}  {self.size} bytes  sha256 {self.sha256[:16]}"
                 + (f"  (and {self.simd_wasm.name} for SIMD128)" if self.simd_wasm else ""),
                 f"  model hash {self.model_hash[:16]}; input {self.input_name} "
                 f"{'x'.join(map(str, self.input_shape))} from a {self.source}",
                 f"  memory {self.memory_kb} KiB (weights {self.weight_bytes} B, activations {self.arena_bytes} B)",
                 f"  rule {self.rule}" + (f"; labels {', '.join(self.labels)}" if self.labels else ""),
                 f"  features: {', '.join(self.features)}"]
        for lib in self.native:
            lines.append(f"  native {lib.arch}: {lib.path.name}  {lib.size} bytes  sha256 {lib.sha256[:16]}")
        lines.append("  operators:")
        lines += [f"    {op}" for op in self.operators]
        lines.append("  time: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def _channels_list(values, channels: int, what: str) -> list[float]:
    if isinstance(values, (int, float)):
        values = [values]
    values = [float(v) for v in values]
    if len(values) not in (1, channels):
        raise ModelError(f"{what}: give one value or one per channel ({channels}), not {len(values)}")
    if not all(v == v and abs(v) != float("inf") for v in values):
        raise ModelError(f"{what}: values must be finite numbers")
    return values * channels if len(values) == 1 else values


def _source(shape: tuple[int, ...], window, frame, layout: str, label: str) -> dict:
    """How the window fills the input: format, channels, frames (and width, height)."""
    n = prod(shape)
    last = layout == "channels_last"
    if window is not None and frame is not None:
        raise ModelError("give --window or --frame, not both")
    if window is None and frame is None:
        dims = shape[1:] if len(shape) >= 2 else shape
        if len(dims) == 3:    # (C, H, W) or (H, W, C): a camera frame
            c, h, w = (dims[2], dims[0], dims[1]) if last else dims
            frame = (w, h, c)
        elif len(dims) == 2:
            c, f = (dims[1], dims[0]) if last else dims
            window = (c, f)
        elif len(dims) == 1:
            window = (1, dims[0])
        else:
            raise ModelError(f"{label}: input shape {shape}: say what fills it with --window CxN or --frame WxH[xP]")
    if frame is not None:
        w, h, c = frame
        if w * h * c != n:
            raise ModelError(f"{label}: a {w}x{h} frame with {c} plane(s) has {w * h * c} values; the input "
                             f"{'x'.join(map(str, shape))} takes {n}")
        if c > MAX_CHANNELS:
            raise ModelError(f"{label}: {c} planes (at most {MAX_CHANNELS})")
        return dict(format=2, channels=c, frames=w * h, width=w, height=h,
                    text=f"{w}x{h} frame, {c} plane(s) of uint8")
    c, f = window
    if c * f != n:
        raise ModelError(f"{label}: a window of {c} channel(s) x {f} samples has {c * f} values; the input "
                         f"{'x'.join(map(str, shape))} takes {n}")
    if c > MAX_CHANNELS:
        raise ModelError(f"{label}: {c} channels (at most {MAX_CHANNELS})")
    return dict(format=1, channels=c, frames=f, width=0, height=0, text=f"window of {c}x{f} float32 samples")


def _producer_kind(graph: Graph, name: str) -> str | None:
    root = graph.storage(name)
    for op in graph.ops:
        if any(graph.storage(o) == root for o in op.outputs):
            if op.kind == "dequantize":
                return _producer_kind(graph, op.inputs[0])
            return op.kind
    return None


def _sanitize(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.:\-]", "_", name)[:48]
    return s or "out"


def _c_str(s: str) -> str:
    s = "".join(c if " " <= c <= "~" else "?" for c in s)
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def params_manifest(name: str, label: str, rule: str, labels: list[str], threshold, clear_threshold,
                    consecutive: int, clear: int, severity: int) -> ParamsManifest:
    """The params a compiled module accepts (what ap_nn_init parses), as its manifest: the host
    checks a YAML against it before any worker starts."""
    p: dict[str, dict] = {
        "input.scale": {"type": "list", "description": "input = value x scale + offset: one value or one per channel "
                                                        "(overrides the compiled one)"},
        "input.offset": {"type": "list", "description": "input = value x scale + offset: one value or one per channel"},
    }
    if rule != "none":
        p["threshold"] = {"type": "number", "default": threshold,
                          "description": "the rule's threshold (a class probability, or the score)"}
        p["consecutive"] = {"type": "integer", "default": consecutive, "min": 1, "max": 100000, "unit": "windows",
                            "description": "windows over the threshold in a row before the event"}
        p["clear"] = {"type": "integer", "default": clear, "min": 1, "max": 100000, "unit": "windows",
                      "description": "windows back under before the anomaly is over"}
        p["severity"] = {"type": "integer", "default": severity, "min": 0, "max": 3,
                         "description": "severity of the event (0 info .. 3 critical)"}
    if rule == "score":
        p["clear_threshold"] = {"type": "number", "default": clear_threshold,
                                "description": "the score must fall below this to clear (hysteresis, <= threshold)"}
    if rule == "classifier":
        p["severity.<name>"] = {"type": "integer", "min": 0, "max": 3,
                                "description": f"severity for one label ({', '.join(labels)})"}
        p["normal"] = {"type": "list", "description": f"the labels that are not anomalies ({', '.join(labels)})"}
    safe = re.sub(r"[^a-z0-9_-]", "-", name.lower())[:48] or "model"
    return ParamsManifest(name=safe if safe[0].isalpha() else f"m{safe}", version="1.0.0",
                          description=f"compiled from {label}", params=p)


def compile_model(model, output, *, input: str | None = None, input_shape=None, window=None, frame=None,
                  layout: str = "channels_first", scale=1.0, offset=0.0, outputs: list[str] | None = None,
                  labels: list[str] | None = None, feature_names: list[str] | None = None, rule: str = "auto",
                  softmax: str = "auto", normal: list[str] | None = None, threshold: float | None = None,
                  clear_threshold: float | None = None, consecutive: int = 3, clear: int = 3, severity: int = 2,
                  memory_mb: float = DEFAULT_MEMORY_MB, native: bool = True, arches=DEFAULT_ARCHES,
                  report_outputs: bool = True, keep_c: Path | None = None, simd: bool = True) -> CompileResult:
    """Compile `model` (.onnx) into the ABI v1 module `output` (.wasm); see docs/models.md.

    input / input_shape: which graph input the window fills, and its shape when the model leaves
    dimensions open (batch must be 1). window=(channels, frames) for float32 sample windows or
    frame=(width, height, planes) for uint8 camera frames; by default from the input shape.
    layout: channels_first (NCL / NCHW) or channels_last (NLC / NHWC). scale, offset: x*scale+offset
    per channel (one value or one per channel). outputs: graph outputs to compute (default all).
    rule: classifier (labels, normal, threshold, consecutive, clear, severity), score (threshold,
    clear_threshold, ...), none, or auto. native: also build ap.nn_run libraries for `arches`.
    report_outputs: one feature per output value (False: only what the rule reports; the outputs
    stay readable through the module's ap_nn_output_ptr export). keep_c: write the C there.
    simd: also write the SIMD128 build beside the module (x.simd.wasm, for engines that have it;
    the same outputs to the bit).
    Raises ModelError with the model file (and node) in the message.
    """
    t0 = time.monotonic()
    model, output = Path(model), Path(output)
    label = model.name
    if output.suffix != ".wasm":
        raise ModelError(f"output {output} must end in .wasm")
    if layout not in ("channels_first", "channels_last"):
        raise ModelError(f"layout {layout!r}: channels_first or channels_last")
    if rule not in ("auto", "classifier", "score", "none"):
        raise ModelError(f"rule {rule!r}: auto, classifier, score or none")
    if softmax not in ("auto", "yes", "no"):
        raise ModelError(f"softmax {softmax!r}: auto, yes or no")
    if not 0 <= int(severity) <= 3:
        raise ModelError(f"severity {severity}: 0 info, 1 warning, 2 alarm, 3 critical")
    if consecutive < 1 or clear < 1:
        raise ModelError("consecutive and clear count windows: at least 1")
    arches = list(arches) if native else []
    for arch in arches:
        if arch not in toolchain.NATIVE_ARCHES:
            raise ModelError(f"architecture {arch!r}: one of {', '.join(toolchain.NATIVE_ARCHES)}")
    if not (SDK_DIR / "ap_nn.h").is_file():
        raise ModelError(f"{SDK_DIR / 'ap_nn.h'} is missing: the SDK is incomplete")

    graph = import_model(model, input, tuple(input_shape) if input_shape else None, outputs)
    passes.optimize(graph)
    t_import = time.monotonic()
    in_shape = graph.tensors[graph.input].shape
    src = _source(in_shape, window, frame, layout, label)
    src["channels_last"] = layout == "channels_last"
    C = src["channels"]
    scales = _channels_list(scale, C, "scale")
    offsets = _channels_list(offset, C, "offset")

    # Features: one per output value; the rule's output named by its labels.
    out_tensors = [(o, graph.tensors[o].size) for o in graph.outputs]
    rule_out, rule_len = out_tensors[0]
    if rule == "auto":
        rule = "classifier" if labels else "score" if rule_len == 1 else "none"
    apply_softmax = False
    names: list[str] = []
    if rule == "classifier":
        labels = list(labels) if labels else [f"class{i}" for i in range(rule_len)]
        if len(labels) != rule_len:
            raise ModelError(f"{label}: {len(labels)} labels for output {rule_out!r} of {rule_len} values")
        if len(labels) > MAX_LABELS:
            raise ModelError(f"{label}: {len(labels)} labels (at most {MAX_LABELS})")
        if len(set(labels)) != len(labels):
            raise ModelError(f"{label}: labels repeat: {labels}")
        for lab in labels:
            if not FEATURE_NAME.fullmatch("p." + lab) or len(lab) > 60:
                raise ModelError(f"{label}: label {lab!r} may hold only letters, digits and _ . : - (at most 60)")
        if normal is None:
            normal = [lab for lab in labels if lab.lower() in ("normal", "ok", "healthy", "none", "background")]
            if not normal:
                raise ModelError(f"{label}: which labels are normal? give --normal (labels: {', '.join(labels)})")
        for lab in normal:
            if lab not in labels:
                raise ModelError(f"{label}: normal label {lab!r} is not one of {', '.join(labels)}")
        kind = _producer_kind(graph, rule_out)
        apply_softmax = softmax == "yes" or (softmax == "auto" and kind not in ("softmax", "qsoftmax"))
        names += [f"{'logit' if apply_softmax else 'p'}.{lab}" for lab in labels]
        threshold = 0.5 if threshold is None else float(threshold)
    else:
        if labels:
            raise ModelError(f"{label}: labels only go with the classifier rule")
        if feature_names:
            if len(feature_names) != rule_len:
                raise ModelError(f"{label}: {len(feature_names)} feature names for output {rule_out!r} of "
                                 f"{rule_len} values")
            names += list(feature_names)
        elif rule == "score" or rule_len == 1:
            names += ["score"] if rule_len == 1 else [f"score.{i}" for i in range(rule_len)]
        else:
            base = _sanitize(rule_out)
            names += [f"{base}.{i}" for i in range(rule_len)] if rule_len > 1 else [base]
        if rule == "score":
            if rule_len != 1 and not feature_names:
                raise ModelError(f"{label}: the score rule watches one value; output {rule_out!r} has {rule_len}")
            if threshold is None:
                raise ModelError(f"{label}: the score rule needs --threshold")
            threshold = float(threshold)
    for o, n in out_tensors[1:]:
        base = _sanitize(o)
        names += [f"{base}.{i}" for i in range(n)] if n > 1 else [base]
    clear_threshold = threshold if clear_threshold is None else float(clear_threshold)
    if rule == "score" and clear_threshold > threshold:
        raise ModelError(f"clear_threshold {clear_threshold} must not exceed threshold {threshold} (hysteresis)")
    for n in names:
        if not FEATURE_NAME.fullmatch(n):
            raise ModelError(f"{label}: feature name {n!r} may hold only letters, digits and _ . : - (1..64)")
    if len(set(names)) != len(names):
        raise ModelError(f"{label}: feature names repeat: {names}")
    extra = (len(labels) + 1 if rule == "classifier" and apply_softmax else 1 if rule == "classifier" else 0) + 1
    if report_outputs and len(names) + extra > MAX_FEATURES:
        raise ModelError(f"{label}: {len(names) + extra} features per window; a module reports at most "
                         f"{MAX_FEATURES}: choose fewer outputs with --output")

    header = (f"/* Generated by `appliance model compile` from {codegen.c_comment(label)}; do not edit.\n"
              f" * {len(graph.ops)} operators, input {codegen.c_comment(graph.input)} "
              f"{'x'.join(map(str, in_shape))}. */")
    program = codegen.generate(graph, header)
    t_gen = time.monotonic()

    sdk_header = (SDK_DIR / "ap_nn.h").read_bytes()
    hasher = hashlib.sha256()
    for part in (b"appliance-nn-1", program.net_c.encode(), sdk_header, toolchain.toolchain_id().encode(),
                 " ".join(toolchain.COMMON_FLAGS + toolchain.NATIVE_FLAGS).encode()):
        hasher.update(len(part).to_bytes(8, "little") + part)
    model_hash = hasher.digest()
    mh = model_hash.hex()

    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    libs: list[NativeLibrary] = []
    seconds = {"import": t_import - t0, "generate": t_gen - t_import}
    with tempfile.TemporaryDirectory(prefix="apnn-") as tmp:
        work = Path(tmp)
        (work / "net.c").write_text(program.net_c)
        lib_bytes: list[tuple[str, bytes]] = []
        t = time.monotonic()
        for arch in arches:
            data = toolchain.compile_native(work, "net.c", arch, label)
            lib_bytes.append((arch, data))
        seconds["native"] = time.monotonic() - t
        descriptor = pack_descriptor(model_hash, [(a, hashlib.sha256(d).digest()) for a, d in lib_bytes]) \
            if arches else b""
        expected = 64 + (4 if src["format"] == 1 else 1) * C * src["frames"]
        # Room for windows of another shape too: they reach ap_process and are rejected with a
        # message saying what was expected (a misconfigured window size), not an ABI fault.
        window_bytes = max(2 * expected, WINDOW_SLACK_BYTES)
        module_c = _module_source(graph, program, src, scales, offsets, names, report_outputs, rule, labels or [],
                                  normal or [],
                                  apply_softmax, threshold, clear_threshold, consecutive, clear, int(severity),
                                  descriptor, label, window_bytes)
        (work / "module.c").write_text(module_c)
        if keep_c:
            keep_c = Path(keep_c)
            keep_c.mkdir(parents=True, exist_ok=True)
            (keep_c / "net.c").write_text(program.net_c)
            (keep_c / "module.c").write_text(module_c)
        # Linear memory: stack, constants, arena, window and params buffers, the runtime's state.
        need = (toolchain.STACK_BYTES + program.const_bytes + program.arena_bytes + window_bytes + PARAMS_BYTES
                + 4 * program.output_floats + len(descriptor) + 16 * 1024 + 64 * len(names) + 64 * len(labels or []))
        memory = -(-need // 65536) * 65536 + 65536
        budget = int(memory_mb * 1024 * 1024)
        if memory > budget:
            rest = memory - program.const_bytes - program.arena_bytes - window_bytes
            raise ModelError(
                f"{label}: the module needs {memory / 1048576:.1f} MiB of memory (weights "
                f"{program.const_bytes / 1048576:.2f} MiB, activations {program.arena_bytes / 1048576:.2f} MiB, "
                f"window {window_bytes / 1048576:.2f} MiB, stack and buffers {rest / 1048576:.2f} MiB); "
                f"the budget is {memory_mb} MiB (--memory-mb, and the runtime's max_memory_mb)")
        t = time.monotonic()
        manifest = params_manifest(output.stem, label, rule, labels or [], threshold, clear_threshold,
                                   consecutive, clear, int(severity))
        wasm, memory = _compile_wasm(work, memory, budget, memory_mb, label, simd=False)
        wasm = with_manifest(wasm, manifest)
        seconds["wasm"] = time.monotonic() - t
        simd_bytes = None
        # The SIMD128 build's arena holds the im2col matrices too; a model whose vector build would
        # not fit the memory budget gets none (engines then run x.wasm).
        simd_memory = memory + -(-max(0, program.arena_bytes_vector - program.arena_bytes) // 65536) * 65536
        if simd and simd_memory <= budget:
            t = time.monotonic()
            simd_bytes = with_manifest(_compile_wasm(work, simd_memory, budget, memory_mb, label, simd=True)[0],
                                       manifest)
            complaint = _validate_simd(simd_bytes, output.name)
            if complaint:
                raise ModelError(f"{label}: the generated SIMD128 module fails wasm-validate: {complaint}")
            seconds["wasm simd"] = time.monotonic() - t

        from appliance.runtime.validate import ModuleRejected, check_module
        try:
            check_module(wasm, output.name, budget)
        except ModuleRejected as exc:
            raise ModelError(f"{label}: the generated module fails the module checks: {exc}") from None

        for arch, data in lib_bytes:
            path = output.parent / library_name(mh, arch)
            _write_atomic(path, data, 0o644)
            libs.append(NativeLibrary(arch, path, hashlib.sha256(data).hexdigest(), len(data)))
        simd_path = output.with_suffix(".simd.wasm")
        if simd_bytes is not None:
            # Bound to this x.wasm (as make modules binds every SIMD build): the runtime runs a
            # SIMD build only beside the plain module it names.
            _write_atomic(simd_path, simd_bytes + custom_section(SIMD_OF_SECTION, hashlib.sha256(wasm).hexdigest()
                                                                 .encode()), 0o644)
        elif simd_path.exists():
            simd_path.unlink()      # a stale SIMD build must not stand beside a new module
        _write_atomic(output, wasm, 0o644)
    seconds["total"] = time.monotonic() - t0
    return CompileResult(
        wasm=output, size=len(wasm), sha256=hashlib.sha256(wasm).hexdigest(), model_hash=mh, native=libs,
        memory_kb=memory // 1024, arena_bytes=program.arena_bytes, weight_bytes=program.const_bytes,
        input_name=graph.input, input_shape=in_shape, source=src["text"], features=names if report_outputs else [],
        rule=rule,
        labels=list(labels or []), operators=program.op_summary, seconds=seconds,
        simd_wasm=simd_path if simd_bytes is not None else None)


def _compile_wasm(work: Path, memory: int, budget: int, memory_mb: float, label: str, simd: bool) -> tuple[bytes, int]:
    """(wasm bytes, linear memory): grown to what the linker says it needs when the estimate was short."""
    for _ in range(3):
        try:
            return toolchain.compile_wasm(work, "module.c", memory, label, simd=simd), memory
        except toolchain.MemoryShort as short:
            if short.need > budget:
                raise ModelError(f"{label}: the module needs {short.need / 1048576:.1f} MiB of memory; the budget "
                                 f"is {memory_mb} MiB (--memory-mb)") from None
            memory = short.need
    raise ModelError(f"{label}: the linker kept asking for more memory")


def _validate_simd(wasm: bytes, label: str) -> str | None:
    """wasm-validate's complaint about the SIMD128 build (SIMD allowed, nothing else wasm3 lacks)."""
    import shutil
    import subprocess
    from appliance.runtime.validate import WASM_VALIDATE_FLAGS
    tool = shutil.which("wasm-validate")
    if tool is None:
        return "wasm-validate (Debian package 'wabt') is not installed"
    flags = [f for f in WASM_VALIDATE_FLAGS if f != "--disable-simd"]
    proc = subprocess.run([tool, *flags, "-"], input=wasm, capture_output=True, timeout=60)
    if proc.returncode == 0:
        return None
    return (proc.stderr or proc.stdout).decode("utf-8", "replace").strip().replace("-:", f"{label}:", 1) or \
        f"exit status {proc.returncode}"


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _module_source(graph: Graph, program: codegen.Program, src: dict, scales, offsets, names, report, rule, labels,
                   normal, apply_softmax, threshold, clear_threshold, consecutive, clear, severity, descriptor,
                   label, window_bytes) -> str:
    C = src["channels"]
    rules = {"none": "AP_NN_RULE_NONE", "classifier": "AP_NN_RULE_CLASSIFIER", "score": "AP_NN_RULE_SCORE"}
    rule_len = len(labels) if rule == "classifier" else 1 if rule == "score" else 0
    fl = codegen.c_float
    lines = [
        f"/* Generated by `appliance model compile` from {codegen.c_comment(label)}; do not edit. */",
        f"#define AP_WINDOW_BYTES {window_bytes}",
        f"#define AP_PARAMS_BYTES {PARAMS_BYTES}",
    ]
    if descriptor:
        lines.append("#define AP_NN_HOST_IMPORT 1")
    lines += [
        '#include "ap_module.h"',
        '#include "net.c"',
        "",
        "static const char *const NN_FEATURES[" + str(max(1, len(names))) + "] = {"
        + ", ".join(_c_str(n) if report else "0" for n in names) + "};",
        "static const char *const NN_LABELS[" + str(max(1, len(labels))) + "] = {"
        + (", ".join(_c_str(x) for x in labels) if labels else "0") + "};",
    ]
    if descriptor:
        lines.append(f"static const uint8_t NN_DESCRIPTOR[{len(descriptor)}] = {{"
                     + ",".join(str(b) for b in descriptor) + "};")
    normal_idx = sorted(labels.index(n) for n in normal) if rule == "classifier" else []
    lines += [
        "static float nn_out[NN_OUTPUT_FLOATS];",
        "",
        "static const ap_nn_module NN = {",
        f"  .model = {_c_str(label)},",
        f"  .format = {src['format']}, .channels = {C}, .frames = {src['frames']},",
        f"  .width = {src['width']}, .height = {src['height']},",
        f"  .channels_last = {1 if src['channels_last'] else 0},",
        "  .scale = {" + ", ".join(fl(s) for s in scales) + "},",
        "  .offset = {" + ", ".join(fl(o) for o in offsets) + "},",
        "  .outputs_len = NN_OUTPUT_FLOATS,",
        "  .feature_names = NN_FEATURES,",
        f"  .rule = {rules[rule]}, .rule_offset = 0, .rule_len = {rule_len},",
        f"  .apply_softmax = {1 if apply_softmax else 0},",
        "  .labels = NN_LABELS,",
        "  .normal_default = {" + ", ".join(f"[{i}] = 1" for i in normal_idx) + "},",
        f"  .threshold = {float(threshold) if threshold is not None else 0.0!r},",
        f"  .clear_threshold = {float(clear_threshold) if clear_threshold is not None else 0.0!r},",
        f"  .severity = {severity}, .consecutive = {consecutive}, .clear = {clear},",
        f"  .descriptor = {'NN_DESCRIPTOR' if descriptor else '0'}, .descriptor_len = {len(descriptor)},",
        "};",
        "",
        "int32_t ap_init(const char *params, int32_t len) { return ap_nn_init(&NN, params, len); }",
        "",
        "/* Where the last window's outputs are (float32, in output order): for tests and tools. */",
        "AP_EXPORT(ap_nn_output_ptr) int32_t ap_nn_output_ptr(void) { return (int32_t)(uintptr_t)nn_out; }",
        "AP_EXPORT(ap_nn_output_len) int32_t ap_nn_output_len(void) { return NN_OUTPUT_FLOATS; }",
        "",
        "int32_t ap_process(const uint8_t *window, int32_t len) {",
        "  float *in = nn_input();",
        "  int32_t gap = ap_nn_fill(&NN, window, len, in);",
        "  if (gap < 0) return -1;",
        "  int32_t host = 0;",
    ]
    if descriptor:
        lines += [
            "  /* The host's native twin when the host offers it (host.nn=1) and accepts it; else our own code. */",
            "  if (ap_nn_st.use_host && ap_host_nn_run(NN_DESCRIPTOR, (int32_t)sizeof NN_DESCRIPTOR, in,",
            "                                          4 * NN_INPUT_FLOATS, nn_out, (int32_t)sizeof nn_out) == 0)",
            "    host = 1;",
        ]
    lines += [
        "  if (!host) {",
        "    nn_forward();",
        "    nn_collect(nn_out);",
        "  }",
        "  ap_nn_report(&NN, nn_out, gap, host);",
        "  return 0;",
        "}",
        "",
    ]
    return "\n".join(lines)
