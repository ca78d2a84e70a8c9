"""The two trained models (modules/models) compiled to modules and run on real recordings through
the real pipeline: `appliance eval nn-bearing` and `appliance eval nn-camera`.

nn-bearing: for each CWRU recording the model was trained on, one supervisor run replays only
its held-out last 30 % (the split in modules/models/bearing_cnn/report.json) at 12 kHz through
the replay source (the 48 kHz ones decimated by 4, as in training), cut into the model's 1024-
sample windows without overlap, to both compiled modules (float and int8) in their workers.
Tallied per recording, in the module's own words (its p.<label> features, the class its events
name): windows, the windows of each class, and the events (a fault class with p >= 0.8 for 3
windows in a row). Then
`appliance eval bearing`'s table for the same recordings, side by side: the classical module
sees the whole recording after its baseline, not only the held-out part.

nn-camera: one supervisor run of configs/nn-camera.yaml (vtest.avi through the camera source:
gray, INTER_AREA to 96x96 on the host) with both compiled people counters; every frame's count
against the labels (modules/models/people_cnn/labels.csv), on the held-out frames and, for
reference, the training ones.

Modules are compiled from the committed .onnx files into a temporary folder for each run
(`--build DIR` keeps them); `python -m appliance_tools.evaluation.nn build` compiles them into
modules/build/ for the configs.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[3]
MODELS = REPO / "modules" / "models"
BUILD = REPO / "modules" / "build"
DATA = REPO.parent / "shared" / "data"
DEFAULT_CWRU = DATA / "bearing" / "cwru"
DEFAULT_VIDEO = DATA / "video" / "vtest.avi"
CAMERA_CONFIG = REPO / "configs" / "nn-camera.yaml"
KINDS = ("float", "int8")

# The event rules compiled into the modules (each is a param the YAML may override).
BEARING_RULE = {"rule": "classifier", "normal": ["normal"], "threshold": 0.8, "consecutive": 3, "clear": 3,
                "severity": 2}
PEOPLE_RULE = {"rule": "score", "threshold": 6.5, "clear_threshold": 5.5, "consecutive": 5, "clear": 10,
               "severity": 1}
EVENT_CLASS = re.compile(r"class '([^']+)'|back to '([^']+)'")


# ---------------------------------------------------------------- the models and their modules

@dataclass(frozen=True)
class ModelSpec:
    module: str        # module (and .wasm) name
    model: str         # modules/models/<model>/
    kind: str          # float or int8

    @property
    def onnx(self) -> Path:
        return MODELS / self.model / (f"{self.model}.onnx" if self.kind == "float" else f"{self.model}.int8.onnx")

    @property
    def report(self) -> dict:
        return json.loads((MODELS / self.model / "report.json").read_text())

    def compile_options(self) -> dict:
        """The same for `appliance model compile` (docs/modules/nn-*.md give the command lines)."""
        report = self.report
        if self.model == "bearing_cnn":
            return {"window": (1, report["input"]["shape"][-1]), "labels": report["output"]["labels"],
                    **BEARING_RULE}
        h, w = report["input"]["shape"][-2:]
        return {"frame": (w, h, 1), "scale": report["input"]["scale"], "offset": report["input"]["offset"],
                "feature_names": [report["output"]["name"]], **PEOPLE_RULE}


SPECS = {s.module: s for s in (ModelSpec("bearing_cnn", "bearing_cnn", "float"),
                               ModelSpec("bearing_cnn_int8", "bearing_cnn", "int8"),
                               ModelSpec("people_cnn", "people_cnn", "float"),
                               ModelSpec("people_cnn_int8", "people_cnn", "int8"))}


def build(out_dir: Path = BUILD, modules: list[str] | None = None, native: bool = True) -> dict[str, Path]:
    """Compile the modules into out_dir (native: with their native twins for ap.nn_run)."""
    from appliance_tools.nn import compile_model
    out = {}
    for name in modules or list(SPECS):
        spec = SPECS[name]
        result = compile_model(spec.onnx, out_dir / f"{name}.wasm", native=native, **spec.compile_options())
        out[name] = result.wasm
    return out


def _modules_for(model: str, build_dir: Path | None, workdir: Path) -> dict[str, Path]:
    """kind -> .wasm of this model: from build_dir if given (compiled there if missing), else fresh."""
    names = [f"{model}" if kind == "float" else f"{model}_int8" for kind in KINDS]
    folder = build_dir or workdir / "modules"
    missing = [n for n in names if not (folder / f"{n}.wasm").exists()] if build_dir else names
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        build(folder, missing)
    return {kind: folder / f"{n}.wasm" for kind, n in zip(KINDS, names)}


def _run(doc: dict, workdir: Path, on_result, timeout_s: float = 1800) -> float:
    """One supervisor run of doc to the end of its (finite) source; on_result(module, window, result)
    sees every result. Returns the wall time."""
    from appliance.config.schema import load_config
    from appliance.core.supervisor import Supervisor
    workdir.mkdir(parents=True, exist_ok=True)
    doc = {**doc, "gateway": {**doc.get("gateway", {}), "data_dir": str(workdir / "var")}}
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    sup = Supervisor(load_config(path))
    sup.subscribe(on_result)
    t0 = time.monotonic()
    sup.start()
    try:
        if not sup.wait_until_done(timeout_s):
            raise RuntimeError(f"the run of {path} did not finish in {timeout_s:.0f} s")
        faults = {n: m["last_fault"] or m["reason"] for n, m in sup.status()["modules"].items() if m["last_fault"]}
    finally:
        sup.stop()
    if faults:
        raise RuntimeError(f"the run of {path}: module faults: "
                           + "; ".join(f"{n}: {why}" for n, why in faults.items()))
    return time.monotonic() - t0


# ---------------------------------------------------------------- nn-bearing

@dataclass
class BearingResult:
    recording: str
    label: str                        # the recording's class
    kind: str                         # float or int8
    windows: int = 0
    classes: collections.Counter = field(default_factory=collections.Counter)
    events: list[tuple[int, int, str, str]] = field(default_factory=list)   # (seq, severity, class, message)
    host_windows: int = 0             # windows the host's native twin computed (nn.host = 1)

    @property
    def accuracy(self) -> float:
        return self.classes[self.label] / self.windows if self.windows else 0.0

    @property
    def flagged(self) -> float:
        """Share of windows in a fault class."""
        return 1 - self.classes["normal"] / self.windows if self.windows else 0.0

    @property
    def alarms(self) -> list[tuple[int, int, str, str]]:
        return [e for e in self.events if e[1] > 0]

    @property
    def diagnosis(self) -> str:
        if not self.alarms:
            return "-"
        return collections.Counter(e[2] for e in self.alarms).most_common(1)[0][0]

    @property
    def verdict(self) -> str:
        if self.label == "normal":
            return "ok" if not self.alarms else "FALSE ALARM"
        if not self.alarms:
            return "MISSED"
        return "ok" if self.diagnosis == self.label else "WRONG DIAGNOSIS"


def bearing_recordings(data_dir: Path = DEFAULT_CWRU) -> list[tuple[Path, str, float]]:
    """(file, class, first held-out second) of every recording in the model's report."""
    report = SPECS["bearing_cnn"].report
    out = []
    for name, r in report["split"]["recordings"].items():
        path = data_dir / name
        if not path.exists():
            raise FileNotFoundError(f"recording not found: {path} (the model was trained on it)")
        out.append((path, r["label"], float(r["split_s"])))
    return out


def _segment(path: Path, start_s: float) -> dict:
    rate = 48000 if path.stem.endswith("_48k") else 12000 if path.stem.endswith("_12k") else None
    if rate is None:
        raise ValueError(f"{path.name}: cannot tell the sample rate (CWRU names end in _12k or _48k)")
    sample_rate = SPECS["bearing_cnn"].report["input"]["sample_rate"]
    return {"path": str(path), "sample_rate": rate, "decimate": rate // sample_rate, "start_s": start_s}


def evaluate_bearing(data_dir: Path = DEFAULT_CWRU, build_dir: Path | None = None, host_nn: bool = False,
                     only: list[str] | None = None, modules: dict[str, Path] | None = None) -> list[BearingResult]:
    """Both modules on the held-out part of each recording (only: names of recordings to keep).
    modules: kind -> .wasm to evaluate instead of the committed models' modules."""
    report = SPECS["bearing_cnn"].report
    size = report["input"]["shape"][-1]
    results = []
    with tempfile.TemporaryDirectory(prefix="eval-nn-bearing-") as tmp:
        workdir = Path(tmp)
        wasm = modules or _modules_for("bearing_cnn", build_dir, workdir)
        for path, label, start_s in bearing_recordings(data_dir):
            if only and path.name not in only:
                continue
            doc = {"gateway": {"name": "eval-nn-bearing"}, "metrics": {"enabled": False},
                   "sources": {"drive_end": {"type": "replay", "realtime": False, "block_frames": 4096,
                                             "segments": [_segment(path, start_s)]}},
                   "modules": {kind: {"wasm": str(w), "source": "drive_end", "window": {"size": size, "hop": size},
                                      "overflow": "block", "queue": 8, "deadline_ms": 5000, **_host_nn(host_nn)}
                               for kind, w in wasm.items()}}
            per_kind = {kind: BearingResult(path.name, label, kind) for kind in wasm}

            def tally(module, window, res, per_kind=per_kind):
                r = per_kind[module]
                if res.rc != 0:
                    raise RuntimeError(f"{r.recording}: module {module} failed on window {window.seq} (rc {res.rc})")
                # In the module's own words: its p.<label> features and its events' class.
                probs = {k[2:]: v for k, v in res.features.items() if k.startswith("p.")}
                if not probs:
                    raise RuntimeError(f"{r.recording}: module {module} reports no p.<label> features")
                r.windows += 1
                r.classes[max(probs, key=probs.get)] += 1
                r.host_windows += int(res.features.get("nn.host", 0))
                for sev, _, msg in res.events:
                    m = EVENT_CLASS.search(msg)
                    r.events.append((window.seq, sev, (m.group(1) or m.group(2)) if m else "?", msg))

            _run(doc, workdir / path.stem, tally)
            held = report["split"]["recordings"][path.name]
            expected = (held["samples"] - held["split_sample"] - size) // size + 1
            for r in per_kind.values():
                if r.windows != expected:
                    raise RuntimeError(f"{path.name}: module {r.kind} analysed {r.windows} of the {expected} "
                                       f"held-out windows (see the log: did it fail to start?)")
            results += per_kind.values()
    return results


def _host_nn(on: bool) -> dict:
    """The module's host_nn switch, where this appliance's config has it."""
    from appliance.config.schema import ModuleSection
    if "host_nn" in ModuleSection.model_fields:
        return {"host_nn": on}
    if on:
        raise RuntimeError("this appliance's config has no host_nn switch: ap.nn_run cannot be offered")
    return {}


def bearing_table(nn: list[BearingResult], classical=None) -> str:
    """One row per recording: the float and int8 modules on its held-out part, then the classical
    bearing module (appliance eval bearing) on the whole recording."""
    by_file: dict[str, dict[str, BearingResult]] = collections.defaultdict(dict)
    for r in nn:
        by_file[r.recording][r.kind] = r
    classic = {}
    for c in classical or []:
        key = c.name.split(" ")[0] + ".mat"
        if c.expected is None and "at 12k" not in c.name:
            continue      # the healthy 2nd half at 48k: the models see 12 kHz only
        classic[key] = c
    head = (f"{'recording':<31} {'class':<6}| {'float: win':>10} {'acc':>5} {'events':>6} {'diagnosis':<9} "
            f"{'verdict':<8}| {'int8: win':>9} {'acc':>5} {'events':>6} {'diagnosis':<9} {'verdict':<8}"
            + (f"| {'bearing: win':>12} {'anomaly':>7} {'events':>6} {'diagnosis':<12} verdict" if classic else ""))
    lines = [head, "-" * len(head)]
    for name, kinds in by_file.items():
        row = f"{name[:-4]:<31} {next(iter(kinds.values())).label:<6}"
        for kind, width in zip(KINDS, (10, 9)):
            r = kinds.get(kind)
            row += (f"| {r.windows:>{width}} {r.accuracy:>5.0%} {len(r.alarms):>6} {r.diagnosis:<9} {r.verdict:<8}"
                    if r else f"| {'-':>{width}} {'':>5} {'':>6} {'':<9} {'':<8}")
        c = classic.get(name)
        if c is not None:
            row += f"| {c.windows:>12} {c.anomaly_rate:>7.0%} {len(c.alarms):>6} {c.diagnosis:<12} {c.verdict}"
        lines.append(row)
    return "\n".join(lines)


def bearing_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="appliance eval nn-bearing", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_CWRU, help="folder of the CWRU .mat files")
    p.add_argument("--build", type=Path, help="use (and keep) the modules in this folder, compiled if missing")
    p.add_argument("--host-nn", action="store_true", help="offer the host's native twin (ap.nn_run)")
    p.add_argument("--no-classical", action="store_true", help="skip the classical bearing module's run")
    args = p.parse_args(argv)
    if not args.data.is_dir():
        print(f"appliance eval nn-bearing: no recordings at {args.data} (pass --data DIR); nothing evaluated",
              file=sys.stderr)
        return 2
    t0 = time.monotonic()
    try:
        results = evaluate_bearing(args.data, args.build, args.host_nn)
    except FileNotFoundError as exc:
        print(f"appliance eval nn-bearing: {exc}; nothing evaluated", file=sys.stderr)
        return 2
    t_nn = time.monotonic() - t0
    classical = None
    if not args.no_classical:
        from appliance_tools.evaluation import bearing as evaluation
        classical = evaluation.evaluate(args.data)
    report = SPECS["bearing_cnn"].report
    print(f"bearing_cnn (1-D CNN, {report['input']['shape'][-1]} samples at {report['input']['sample_rate']} Hz) "
          f"on the held-out last {1 - report['split']['train_fraction']:.0%} of each recording, through "
          f"replay -> worker -> wasm3{' (+ ap.nn_run)' if args.host_nn else ''}; windows without overlap; "
          f"acc = windows of the recording's class; events: a fault class at p >= {BEARING_RULE['threshold']} "
          f"for {BEARING_RULE['consecutive']} windows in a row. The classical bearing module (last columns, "
          f"`appliance eval bearing`) sees the whole recording after its baseline, in 4096-sample windows.\n")
    print(bearing_table(results, classical))
    for kind in KINDS:
        rs = [r for r in results if r.kind == kind]
        right = sum(r.classes[r.label] for r in rs)
        total = sum(r.windows for r in rs)
        onnx = report["held_out"][kind]
        print(f"\n{kind}: {right}/{total} held-out windows right ({right / total:.1%}) through the pipeline; "
              f"onnxruntime on the same windows at training: {onnx['accuracy']:.1%} of {onnx['windows']}; "
              f"host-computed windows {sum(r.host_windows for r in rs)}")
        for r in rs:
            mix = ", ".join(f"{c} {n}" for c, n in r.classes.most_common())
            print(f"  {r.recording:<32} {mix}")
    print(f"\n(nn runs {t_nn:.1f} s)")
    bad = [r for r in results if r.verdict != "ok"]
    print(f"{len(results) - len(bad)} of {len(results)} (recording, model) pairs as expected")
    return 1 if bad else 0


# ---------------------------------------------------------------- nn-camera

@dataclass
class CameraResult:
    kind: str
    counts: dict[int, float] = field(default_factory=dict)        # frame -> the module's count
    events: list[tuple[int, int, str]] = field(default_factory=list)
    host_frames: int = 0
    seconds: float = 0.0

    def metrics(self, labels: np.ndarray, frames: range) -> dict:
        pred = np.array([self.counts[i] for i in frames])
        truth = labels[list(frames)]
        rounded = np.rint(pred).astype(np.int64)
        return {"frames": len(pred), "mae": float(np.abs(pred - truth).mean()), "bias": float((pred - truth).mean()),
                "exact": float((rounded == truth).mean()), "within_1": float((np.abs(rounded - truth) <= 1).mean())}


def camera_labels() -> np.ndarray:
    path = MODELS / "people_cnn" / "labels.csv"
    rows = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    if len(rows) == 0 or not np.array_equal(rows[:, 0], np.arange(len(rows))):
        raise ValueError(f"{path}: expected rows frame,people for frames 0, 1, 2, ... in order")
    return rows[:, 1]


def camera_doc(video: Path, wasm: dict[str, Path], host_nn: bool = False) -> dict:
    """configs/nn-camera.yaml for an offline run: the video as fast as it decodes, every frame
    analysed, one module per kind with that module's params."""
    doc = yaml.safe_load(CAMERA_CONFIG.read_text())
    (src,) = doc["sources"].values()
    src.update(url=str(video), realtime=False)
    (_, module), = doc["modules"].items()
    doc["modules"] = {kind: {**module, "wasm": str(w), "overflow": "block", "queue": 16, "deadline_ms": 5000,
                             **_host_nn(host_nn)} for kind, w in wasm.items()}
    doc["events"] = {**doc.get("events", {}), "attach_window": False}
    doc["uplink"] = {"transport": "none"}
    return doc


def evaluate_camera(video: Path = DEFAULT_VIDEO, build_dir: Path | None = None, host_nn: bool = False,
                    modules: dict[str, Path] | None = None) -> dict[str, CameraResult]:
    if not video.exists():
        raise FileNotFoundError(f"video not found: {video}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="eval-nn-camera-") as tmp:
        workdir = Path(tmp)
        wasm = modules or _modules_for("people_cnn", build_dir, workdir)
        results = {kind: CameraResult(kind) for kind in wasm}
        feature = SPECS["people_cnn"].report["output"]["name"]

        def tally(module, window, res):
            r = results[module]
            if res.rc != 0:
                raise RuntimeError(f"module {module} failed on frame {window.seq} (rc {res.rc})")
            r.counts[window.seq] = res.features[feature]
            r.host_frames += int(res.features.get("nn.host", 0))
            r.events.extend((window.seq, sev, msg) for sev, _, msg in res.events)

        seconds = _run(camera_doc(video, wasm, host_nn), workdir / "run", tally)
        for r in results.values():
            r.seconds = seconds
    return results


def camera_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="appliance eval nn-camera", description=__doc__.splitlines()[0])
    p.add_argument("--video", type=Path, default=DEFAULT_VIDEO, help="the video (default: %(default)s)")
    p.add_argument("--build", type=Path, help="use (and keep) the modules in this folder, compiled if missing")
    p.add_argument("--host-nn", action="store_true", help="offer the host's native twin (ap.nn_run)")
    args = p.parse_args(argv)
    if not args.video.exists():
        print(f"appliance eval nn-camera: video not found: {args.video} (pass --video FILE); nothing evaluated",
              file=sys.stderr)
        return 2
    results = evaluate_camera(args.video, args.build, args.host_nn)
    labels = camera_labels()
    report = SPECS["people_cnn"].report
    train = range(*report["split"]["train"])
    held = range(*report["split"]["held_out"])
    missing = [i for i in range(len(labels)) if any(i not in r.counts for r in results.values())]
    if missing:
        print(f"{len(missing)} of {len(labels)} frames have no result (first: {missing[0]})", file=sys.stderr)
        return 1
    print(f"people_cnn (2-D CNN on 96x96 gray) on {args.video.name}: {len(labels)} frames through camera -> worker "
          f"-> wasm3{' (+ ap.nn_run)' if args.host_nn else ''}; count against labels.csv (median-background blobs "
          f"on the full frames); held out: frames {held.start}..{held.stop - 1}\n")
    head = (f"{'model':<22} {'frames':>6} {'MAE':>6} {'bias':>7} {'exact':>6} {'within 1':>8}   "
            f"onnxruntime MAE (training)")
    lines = [head, "-" * len(head)]
    ok = True
    for kind, r in results.items():
        for part, frames in (("held-out", held), ("training", train)):
            m = r.metrics(labels, frames)
            ref = report["held_out"][kind]["mae"] if part == "held-out" else report["train"]["float"]["mae"] \
                if kind == "float" else None
            lines.append(f"{kind + ' ' + part:<22} {m['frames']:>6} {m['mae']:>6.3f} {m['bias']:>+7.3f} "
                         f"{m['exact']:>6.1%} {m['within_1']:>8.1%}   {'-' if ref is None else f'{ref:.3f}'}")
            if part == "held-out" and ref is not None:
                ok &= abs(m["mae"] - ref) < 0.01
    base = report["held_out_baseline_mean_count"]
    lines.append(f"{'training mean count':<22} {base['frames']:>6} {base['mae']:>6.3f} {base['bias']:>+7.3f} "
                 f"{base['exact']:>6.1%} {base['within_1']:>8.1%}   (a constant guess, for scale)")
    print("\n".join(lines))
    for kind, r in results.items():
        starts = [e for e in r.events if e[1] > 0]
        print(f"\n{kind}: {len(r.counts) / r.seconds:.0f} frames/s through the pipeline (both modules, decode "
              f"included); {r.host_frames} frames by the host's twin; {len(starts)} crowd events "
              f"(people > {PEOPLE_RULE['threshold']} for {PEOPLE_RULE['consecutive']} frames):")
        for seq, sev, msg in r.events[:12]:
            print(f"  frame {seq:>4} ({'start' if sev > 0 else 'end'}): {msg}")
    print(f"\npipeline held-out MAE {'matches' if ok else 'DIFFERS FROM'} onnxruntime's at training")
    return 0 if ok else 1


def build_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m appliance_tools.evaluation.nn build",
                                description="compile the trained models into modules (with native twins)")
    p.add_argument("--out", type=Path, default=BUILD)
    p.add_argument("modules", nargs="*", help=f"some of {', '.join(SPECS)} (default: all)")
    args = p.parse_args(argv)
    unknown = [m for m in args.modules if m not in SPECS]
    if unknown:
        p.error(f"unknown module(s) {', '.join(unknown)}; known: {', '.join(SPECS)}")
    from appliance_tools.nn import ModelError
    try:
        for name, path in build(args.out, args.modules or None).items():
            print(f"{path}  {path.stat().st_size} bytes  ({SPECS[name].onnx.relative_to(REPO)})")
    except ModelError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    commands = {"build": build_main, "nn-bearing": bearing_main, "nn-camera": camera_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(f"usage: python -m appliance_tools.evaluation.nn {{{','.join(commands)}}} [options]", file=sys.stderr)
        sys.exit(2)
    sys.exit(commands[sys.argv[1]](sys.argv[2:]))
