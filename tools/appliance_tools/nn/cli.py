"""`appliance model compile`: the command line of appliance_tools.nn.compile_model (docs/models.md)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

SEVERITIES = {"info": 0, "warning": 1, "alarm": 2, "critical": 3}


def _dims(text: str, n: tuple[int, ...], what: str) -> tuple[int, ...]:
    parts = text.lower().replace("*", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        example = "x".join("4" * k for k in n)
        raise argparse.ArgumentTypeError(f"{what} {text!r}: numbers separated by x, e.g. {example}") from None
    if len(dims) not in n or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"{what} {text!r}: {' or '.join(str(k) for k in n)} positive numbers "
                                         f"separated by x")
    return dims


def _shape(text: str) -> tuple[int, ...]:
    return _dims(text, tuple(range(1, 7)), "shape")


def _window(text: str) -> tuple[int, int]:
    return _dims(text, (2,), "window")


def _frame(text: str) -> tuple[int, int, int]:
    d = _dims(text, (2, 3), "frame")
    return d if len(d) == 3 else (d[0], d[1], 1)


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number or a comma list of numbers") from None


def _names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of names")
    return names


def _severity(text: str) -> int:
    if text.lower() in SEVERITIES:
        return SEVERITIES[text.lower()]
    if text in ("0", "1", "2", "3"):
        return int(text)
    raise argparse.ArgumentTypeError(f"severity {text!r}: info, warning, alarm, critical (or 0..3)")


def add_parser(sub) -> None:
    model = sub.add_parser("model", help="compile ONNX models into analytics modules (docs/models.md)")
    msub = model.add_subparsers(dest="model_command", required=True)
    c = msub.add_parser(
        "compile", help="compile an ONNX model into an ABI v1 wasm module",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile MODEL.onnx into an ABI v1 module: the network as C (weights as constants, one function "
                    "per operator), built with the pinned zig toolchain into wasm32, plus native libraries of the "
                    "same C for the optional host import ap.nn_run. The module fills the model input from each "
                    "window (x*scale+offset), reports the outputs as features and raises events by its rule.",
        epilog="examples:\n"
               "  appliance model compile bearing.onnx -o modules/build/nn-bearing.wasm --window 1x2048 \\\n"
               "      --labels normal,inner,outer,ball --normal normal --threshold 0.8 --consecutive 3\n"
               "  appliance model compile people.onnx -o modules/build/people.wasm --frame 96x96 \\\n"
               "      --scale 0.00392157 --rule score --threshold 0.5\n"
               "Every option that sets a rule's number is also a module param, overridable in the YAML "
               "(threshold, consecutive, clear, severity, normal, clear_threshold, input.scale, input.offset).")
    c.add_argument("model", help="the ONNX model (.onnx)")
    c.add_argument("-o", "--output", required=True, help="the module to write (.wasm); native libraries go beside it")
    g = c.add_argument_group("input")
    g.add_argument("--input", metavar="NAME", help="the graph input the window fills (default: the only one)")
    g.add_argument("--input-shape", type=_shape, metavar="DxDx..",
                   help="fix the input's shape where the model leaves dimensions open, e.g. 1x1x2048 (batch 1)")
    g.add_argument("--window", type=_window, metavar="CxN",
                   help="fill it from sample windows of C channels x N float32 samples (default for 1-3-D inputs)")
    g.add_argument("--frame", type=_frame, metavar="WxH[xP]",
                   help="fill it from camera frames of W x H uint8 pixels, P planes (default for 4-D inputs)")
    g.add_argument("--layout", choices=["channels_first", "channels_last"], default="channels_first",
                   help="the input's layout: channels_first (NCL, NCHW; default) or channels_last (NLC, NHWC)")
    g.add_argument("--scale", type=_floats, default=[1.0], metavar="S[,S..]",
                   help="input = value * scale + offset, one value or one per channel (default 1)")
    g.add_argument("--offset", type=_floats, default=[0.0], metavar="O[,O..]", help="see --scale (default 0)")
    g = c.add_argument_group("outputs and features")
    g.add_argument("--output-name", dest="outputs", action="append", metavar="NAME",
                   help="a graph output to compute (repeatable; default all); the first one drives the rule")
    g.add_argument("--labels", type=_names, metavar="A,B,..", help="class labels of the first output (classifier)")
    g.add_argument("--feature-names", type=_names, metavar="A,B,..",
                   help="feature names of the first output's values (score/none rules)")
    g.add_argument("--no-output-features", action="store_true",
                   help="report only what the rule derives, not one feature per output value")
    g = c.add_argument_group("event rule")
    g.add_argument("--rule", choices=["auto", "classifier", "score", "none"], default="auto",
                   help="classifier: an event when the top class is not normal with p >= threshold for --consecutive "
                        "windows; score: when the first output > threshold for --consecutive windows; "
                        "auto: classifier with --labels, score for a single value, else none")
    g.add_argument("--softmax", choices=["auto", "yes", "no"], default="auto",
                   help="classifier on logits: apply softmax first (auto: unless the model ends in Softmax)")
    g.add_argument("--normal", type=_names, metavar="A,B,..",
                   help="labels that raise no event (default: a label named normal, ok, healthy, none or background)")
    g.add_argument("--threshold", type=float, help="classifier: least probability (default 0.5); score: the limit")
    g.add_argument("--clear-threshold", type=float,
                   help="score: the episode ends below this (default: the threshold; lower = hysteresis)")
    g.add_argument("--consecutive", type=int, default=3, help="windows in a row before an event (default 3)")
    g.add_argument("--clear", type=int, default=3, help="calm windows in a row that end an episode (default 3)")
    g.add_argument("--severity", type=_severity, default=2, help="info, warning, alarm (default) or critical")
    g = c.add_argument_group("build")
    g.add_argument("--memory-mb", type=float, default=64,
                   help="module memory budget in MiB (default 64, the runtime's max_memory_mb)")
    g.add_argument("--no-native", action="store_true", help="no native libraries (and no ap.nn_run import)")
    g.add_argument("--arch", type=_names, default=["x86_64", "aarch64"], metavar="A,B",
                   help="native library architectures (default x86_64,aarch64)")
    g.add_argument("--keep-c", metavar="DIR", help="also write the generated C (net.c, module.c) to DIR")
    g.add_argument("-q", "--quiet", action="store_true", help="print only the output path")
    c.set_defaults(func=cmd_compile)


def cmd_compile(args) -> int:
    from appliance_tools.nn import ModelError, compile_model
    try:
        result = compile_model(
            args.model, args.output, input=args.input, input_shape=args.input_shape, window=args.window,
            frame=args.frame, layout=args.layout, scale=args.scale, offset=args.offset, outputs=args.outputs,
            labels=args.labels, feature_names=args.feature_names, rule=args.rule, softmax=args.softmax,
            normal=args.normal, threshold=args.threshold, clear_threshold=args.clear_threshold,
            consecutive=args.consecutive, clear=args.clear, severity=args.severity, memory_mb=args.memory_mb,
            native=not args.no_native, arches=args.arch, report_outputs=not args.no_output_features,
            keep_c=Path(args.keep_c) if args.keep_c else None)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.wasm if args.quiet else result.summary())
    return 0
