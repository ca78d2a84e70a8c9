"""`appliance eval bearing`: the bearing module on real recordings, through the real pipeline.

CWRU-style folders (`--format cwru`, the default): for each MATLAB file with a `*_DE_time`
drive-end signal (the sample rate from the `_12k` / `_48k` in the name, as CWRU names them), one
run of the supervisor replays [first half of the healthy recording (the baseline), then the
recording] through the replay source, the worker and wasm3, and tallies what the module said about
the recording's windows. The module's params come from configs/cwru-eval.yaml, one set for every
file: no per-file tuning (`--param KEY=VALUE` changes one for the whole run, to compare methods).
The healthy recording is at 48 kHz: decimated by 4 for the 12 kHz files, and used as it is for
the 48 kHz ones. Its second half is evaluated too, and must stay quiet.

What a maintenance planner cares about, per recording: was it flagged, and which part did the
events name. A recording is "named wrong" when any of its alarms names a part other than the
damaged one (a crew would be sent to change it), "named right" when an alarm names the damaged
part and none names another, else "unspecified". The confusion table crosses the damaged part
with the named one; the exit status is non-zero on any wrong name, any false alarm and any
fault not flagged. Every file must say what it holds (CWRU's names: IR014_0_12k, B021_1_12k,
OR007@6_0_12k, Normal_0, or words: inner, outer, ball, normal): a file the tool cannot label is
refused, since a missed fault would pass for a quiet healthy recording.

The headline is the envelope signature alone (configs/cwru-eval.yaml: no second opinion). When a
learned method votes (`--param diagnosis.second_opinion=bearing_cnn`), the recordings it was
trained on (modules/models/bearing_cnn/report.json) are marked and left out of every count.

IMS-style folders (`--format ims`): run-to-failure snapshots, one tab-separated text file per
snapshot (a column per channel, `--fs` 20 kHz), in file-name (time) order; `--channels` picks the
bearing's column(s). The bearing's geometry and speed are required (`--geometry`, `--rpm` or
`--rpm-range`: an IMS rig is not the CWRU one) and printed. The first `--baseline-snapshots` files
teach the baseline, then every file is replayed in turn; the report says when the module first
flagged the run and which parts its alarms named (`--expect PART` checks them).
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from appliance.config.schema import load_config

REPO = Path(__file__).resolve().parents[3]
EVAL_CONFIG = REPO / "configs" / "cwru-eval.yaml"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "bearing" / "cwru"
DIAGNOSES = {0: "unspecified", 1: "outer race", 2: "inner race", 3: "ball", 4: "cage"}
PARTS = ("outer race", "inner race", "ball", "cage")
METHODS = {0: "-", 1: "signature", 2: "bearing_cnn"}
ZONES = "ABCD"
CNN_REPORT = REPO / "modules" / "models" / "bearing_cnn" / "report.json"
LEARNED = ("bearing_cnn",)        # second opinions that learnt from recordings


@dataclass
class FileResult:
    name: str
    fs: int
    expected: str | None            # None: healthy, or unknown (IMS without --expect)
    windows: int = 0
    anomalous: int = 0
    zones: collections.Counter = field(default_factory=collections.Counter)
    events: list[dict] = field(default_factory=list)
    healthy: bool = True            # False: a fault recording (expected may still be unknown)
    first_flagged: str = ""         # IMS: the snapshot of the first alarm
    window_named: collections.Counter = field(default_factory=collections.Counter)   # per diagnosed window
    conf_damaged: list = field(default_factory=list)    # per diagnosed window: the damaged part's confidence
    conf_others: list = field(default_factory=list)     # ... and the largest of the other parts'
    trained: bool = False           # a learned method voting was trained on this recording: not counted

    @property
    def anomaly_rate(self) -> float:
        return self.anomalous / self.windows if self.windows else 0.0

    @property
    def alarms(self) -> list[dict]:
        return [e for e in self.events if e["severity"] != "info"]

    @property
    def named_parts(self) -> list[tuple[str, str]]:
        """(part, method) of every alarm that named a part, in order."""
        out = []
        for e in self.alarms:
            code = int(e["features"].get("diagnosis", 0))
            if code:
                out.append((DIAGNOSES.get(code, "?"), METHODS.get(int(e["features"].get("diagnosis.method", 1)), "?")))
        return out

    @property
    def diagnosis(self) -> str:
        """The part the recording's alarms named, as a planner would read them: a wrong part if any
        alarm named one, else the damaged part if an alarm named it, else unspecified ("-": no
        alarm)."""
        if not self.alarms:
            return "-"
        parts = [p for p, _ in self.named_parts]
        if self.expected is not None:
            wrong = [p for p in parts if p != self.expected]
            if wrong:
                return wrong[0]
            if self.expected in parts:
                return self.expected
            return "unspecified"
        return collections.Counter(parts).most_common(1)[0][0] if parts else "unspecified"

    @property
    def method(self) -> str:
        """Which method named the part the verdict rests on (several: joined)."""
        d = self.diagnosis
        methods = sorted({m for p, m in self.named_parts if p == d})
        return "+".join(methods) if methods else "-"

    @property
    def zone(self) -> str:
        return ZONES[self.zones.most_common(1)[0][0]] if self.zones else "-"

    @property
    def verdict(self) -> str:
        if self.trained:
            return "(trained on)"
        if self.healthy:
            return "ok" if not self.alarms else "FALSE ALARM"
        if not self.alarms:
            return "MISSED"
        if self.expected is None:
            return "flagged"
        if self.diagnosis == self.expected:
            return "ok"
        return "flagged" if self.diagnosis == "unspecified" else "WRONG PART"


def sample_rate_of(path: Path) -> int:
    m = re.search(r"_(\d+)k\b", path.stem)
    if not m:
        raise ValueError(f"{path.name}: cannot tell the sample rate (CWRU names end in _12k or _48k)")
    return int(m.group(1)) * 1000


def expected_of(path: Path) -> str | None:
    """The damaged part a CWRU-style file name says (None: healthy). CWRU's own codes (IR014_0_12k,
    OR007@6_0_12k, B021_1_12k, Normal_0) or words (inner_race_..., outer_race_..., ball_...,
    normal_...). ValueError for a name that says neither: a fault must not pass for healthy."""
    stem = path.stem.lower()
    codes = (("ir", "inner race"), ("or", "outer race"), ("b", "ball"))
    for code, part in codes:
        if re.match(rf"{code}\d", stem):
            return part
    words = set(re.split(r"[^a-z]+", stem))
    found = [part for word, part in (("inner", "inner race"), ("outer", "outer race"), ("ball", "ball"))
             if word in words]
    healthy = bool(words & {"normal", "healthy"})
    if len(found) + healthy == 1:
        return found[0] if found else None
    raise ValueError(f"{path.name}: cannot tell what it holds; name CWRU files by their code (IR014_0_12k, "
                     f"OR007@6_0_12k, B021_1_12k, Normal_0_12k) or with one of inner, outer, ball, normal")


def training_recordings() -> dict[str, float]:
    """The recordings bearing_cnn trained on, with the seconds of each it trained on (from its
    start): modules/models/bearing_cnn/report.json."""
    report = json.loads(CNN_REPORT.read_text())
    return {name: float(r["split_s"]) for name, r in report["split"]["recordings"].items()}


def set_param(module: dict, key: str, value: str) -> None:
    """module params are nested YAML; KEY is the flattened name (diagnosis.band). An empty value
    removes the param (shaft.rpm_min= shaft.rpm_max= shaft.rpm=1797: a fixed speed instead)."""
    node = module.setdefault("params", {})
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"--param {key}: {p} is a value in the config, not a section")
    if value == "":
        node.pop(leaf, None)
    else:
        node[leaf] = yaml.safe_load(value)


def _supervise(doc: dict, workdir: Path, cfg_name: str, first_target_segment: int, result: FileResult,
               snapshot_of=None) -> FileResult:
    """Runs one config to the end and tallies the windows and events of the segments from
    first_target_segment on."""
    from appliance.core.supervisor import Supervisor
    from appliance.events.spool import Spool

    workdir.mkdir(parents=True, exist_ok=True)
    doc["gateway"]["data_dir"] = str(workdir / "var")
    cfg_path = workdir / cfg_name
    cfg_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    cfg = load_config(cfg_path)
    (module_name, _), = doc["modules"].items()
    (source_name, _), = doc["sources"].items()
    sup = Supervisor(cfg)
    size, hop = cfg.modules[module_name].window.size, cfg.modules[module_name].window.hop_frames
    threshold = float(cfg.modules[module_name].params.get("threshold", 0))
    src = sup.sources[source_name]

    def target_from() -> int:
        # Windows restart at each segment (a gap): the segments before give this many.
        starts = list(src.segment_starts) + [src.frames_total]
        return sum(max(0, (b - a - size) // hop + 1) for a, b in zip(starts[:first_target_segment],
                                                                      starts[1:first_target_segment + 1]))

    def tally(module, window, res):
        if module == module_name and window.seq >= target_from():
            result.windows += 1
            result.anomalous += res.features.get("score", 0.0) > threshold
            if "iso_zone" in res.features:
                result.zones[int(res.features["iso_zone"])] += 1
            f = res.features
            if f.get("diagnosis.windows", 0) > 0:
                result.window_named[DIAGNOSES.get(int(f.get("diagnosis", 0)), "?")] += 1
                conf = {p: f.get(f"conf.{k}", 0.0) for p, k in zip(PARTS, ("outer", "inner", "ball", "cage"))}
                if result.expected in conf:
                    result.conf_damaged.append(conf[result.expected])
                result.conf_others.append(max(v for p, v in conf.items() if p != result.expected))

    sup.subscribe(tally)
    sup.start()
    try:
        if not sup.wait_until_done(3600):
            raise RuntimeError(f"{cfg_name}: the replay did not finish")
    finally:
        sup.stop()
    boundary = target_from()
    spool = Spool(cfg.gateway.data_dir / "spool.db", 1 << 26)
    result.events = [e for e in spool.tail(100_000) if e["window"].get("seq", -1) >= boundary]
    spool.close()
    if snapshot_of and result.alarms:
        result.first_flagged = snapshot_of(result.alarms[0]["window"]["seq"], src, size, hop)
    return result


def run_one(template: dict, healthy: Path, target: Path, start_s: float | None, fs: int, workdir: Path,
            wasm: Path | None = None) -> FileResult:
    """One supervisor run: baseline segment, then the target; tally the target's windows."""
    healthy_fs = sample_rate_of(healthy)
    decimate = healthy_fs // fs
    if decimate < 1 or healthy_fs % fs:
        raise ValueError(f"{target.name}: {fs} Hz does not divide the healthy recording's {healthy_fs} Hz")
    doc = yaml.safe_load(yaml.safe_dump(template))
    (name, source), = doc["sources"].items()
    half_s = _duration_s(healthy) / 2
    source["segments"] = [
        {"path": str(healthy), "sample_rate": healthy_fs, "decimate": decimate, "duration_s": half_s},
        {"path": str(target), "sample_rate": fs} if start_s is None else
        {"path": str(target), "sample_rate": healthy_fs, "decimate": decimate, "start_s": start_s},
    ]
    (module_name, module), = doc["modules"].items()
    module["wasm"] = str(wasm or (EVAL_CONFIG.parent / module["wasm"]).resolve())   # the copy lives elsewhere
    module["window"]["size"] = _window_for(fs, module["window"]["size"])
    module["window"]["hop"] = module["window"]["size"] // 2
    healthy_half = start_s is not None
    result = FileResult(f"{target.stem} (2nd half at {fs // 1000}k)" if healthy_half else target.stem, fs,
                        None if healthy_half else expected_of(target), healthy=healthy_half or
                        expected_of(target) is None)
    params = module.get("params", {})
    if (params.get("diagnosis") or {}).get("second_opinion", "none") in LEARNED:
        trained = training_recordings()
        # the replayed stretch overlaps what the CNN trained on (a healthy half starts at start_s)
        result.trained = target.name in trained and (start_s or 0.0) < trained[target.name]
    return _supervise(doc, workdir, f"{target.stem}.yaml", 1, result)


def _duration_s(path: Path) -> float:
    import scipy.io
    data = scipy.io.loadmat(path)
    signal = next(v for k, v in data.items() if k.endswith("_DE_time"))
    return len(signal) / sample_rate_of(path)


def _window_for(fs: int, size_at_12k: int) -> int:
    """The same duration at every rate, as a power of two."""
    size = size_at_12k * fs // 12000
    return 1 << (size.bit_length() - 1)


def template_with(params: list[str] | None) -> dict:
    template = yaml.safe_load(EVAL_CONFIG.read_text())
    (_, module), = template["modules"].items()
    for item in params or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param {item!r}: give KEY=VALUE (e.g. diagnosis.band=fixed)")
        set_param(module, key.strip(), value.strip())
    return template


def evaluate(data_dir: Path, healthy_name: str = "normal_0hp_48k.mat", wasm: Path | None = None,
             params: list[str] | None = None) -> list[FileResult]:
    healthy = data_dir / healthy_name
    if not healthy.exists():
        raise FileNotFoundError(f"healthy recording not found: {healthy}")
    template = template_with(params)
    results = []
    with tempfile.TemporaryDirectory(prefix="eval-bearing-") as tmp:
        workdir = Path(tmp)
        targets = sorted(p for p in data_dir.glob("*.mat") if p != healthy)
        for p in targets:                 # every file labelled before anything runs
            expected_of(p)
            sample_rate_of(p)
        for fs in sorted({sample_rate_of(p) for p in targets}):
            results.append(run_one(template, healthy, healthy, _duration_s(healthy) / 2, fs, workdir / f"h{fs}", wasm))
        for target in targets:
            results.append(run_one(template, healthy, target, None, sample_rate_of(target), workdir / target.stem,
                                   wasm))
    return results


# ---- IMS-style run-to-failure folders ------------------------------------------------------------

def ims_snapshots(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no snapshot files in {folder}")
    return files


def evaluate_ims(folder: Path, channels: list[int], fs: float = 20000.0, baseline_snapshots: int = 10,
                 expect: str | None = None, wasm: Path | None = None, params: list[str] | None = None) -> FileResult:
    """One run: the first baseline_snapshots files teach the baseline, then every file in turn."""
    import numpy as np

    files = ims_snapshots(folder)
    if len(files) <= baseline_snapshots:
        raise ValueError(f"{folder}: {len(files)} snapshots, but the baseline takes {baseline_snapshots}")
    template = template_with(params)
    with tempfile.TemporaryDirectory(prefix="eval-bearing-ims-") as tmp:
        tmp = Path(tmp)
        segments = []
        for i, f in enumerate(files):
            data = np.loadtxt(f, dtype=np.float32, ndmin=2)   # tab-separated: a row per sample
            bad = [c for c in channels if c >= data.shape[1]]
            if bad:
                raise ValueError(f"{f.name}: channels {bad} do not exist; it has {data.shape[1]} column(s)")
            npy = tmp / f"{i:06d}.npy"
            np.save(npy, np.ascontiguousarray(data[:, channels]))
            segments.append({"path": str(npy), "sample_rate": float(fs)})
        doc = yaml.safe_load(yaml.safe_dump(template))
        (_, source), = doc["sources"].items()
        source["segments"] = segments
        (_, module), = doc["modules"].items()
        module["wasm"] = str(wasm or (EVAL_CONFIG.parent / module["wasm"]).resolve())
        module["window"]["size"] = _window_for(int(fs), module["window"]["size"])
        module["window"]["hop"] = module["window"]["size"] // 2

        def snapshot_of(seq: int, src, size: int, hop: int) -> str:
            starts = list(src.segment_starts) + [src.frames_total]
            before = 0
            for i, (a, b) in enumerate(zip(starts, starts[1:])):
                k = max(0, (b - a - size) // hop + 1)
                if seq < before + k:
                    return files[i].name
                before += k
            return files[-1].name

        result = FileResult(f"{folder.name} ch{','.join(map(str, channels))}", int(fs), expect, healthy=False)
        return _supervise(doc, tmp / "run", "ims.yaml", baseline_snapshots, result, snapshot_of)


def ims_params(geometry: str | None, rpm: float | None, rpm_range: str | None) -> list[str]:
    """--param items for an IMS run's bearing and speed. Both are required: the eval config's are
    the CWRU rig's (a 6205 at 1700-1850 rpm), not an IMS rig's."""
    if not geometry:
        raise ValueError("--format ims needs the bearing: --geometry BALLS,BALL_D,PITCH_D[,ANGLE] "
                         "(e.g. 16,0.331,2.815,15.17 for the IMS rig's Rexnord ZA-2115)")
    if (rpm is None) == (rpm_range is None):
        raise ValueError("--format ims needs the shaft speed: --rpm RPM or --rpm-range MIN,MAX (e.g. --rpm 2000)")
    parts = [v.strip() for v in geometry.split(",")]
    if len(parts) not in (3, 4):
        raise ValueError(f"--geometry {geometry!r}: give BALLS,BALL_D,PITCH_D[,ANGLE]")
    keys = ("bearing.balls", "bearing.ball_diameter", "bearing.pitch_diameter", "bearing.contact_angle_deg")
    out = [f"{k}={v}" for k, v in zip(keys, parts + ["0"] * (4 - len(parts)))]
    if rpm is not None:
        return out + [f"shaft.rpm={rpm:g}", "shaft.rpm_min=", "shaft.rpm_max="]
    lo, _, hi = rpm_range.partition(",")
    return out + ["shaft.rpm=", f"shaft.rpm_min={lo.strip()}", f"shaft.rpm_max={hi.strip()}"]


def describe_ims(params: list[str]) -> str:
    p = dict(item.partition("=")[::2] for item in params)
    speed = f"{p['shaft.rpm']} rpm" if p.get("shaft.rpm") else f"{p['shaft.rpm_min']}-{p['shaft.rpm_max']} rpm (estimated)"
    return (f"IMS run: bearing of {p['bearing.balls']} rolling elements, diameter {p['bearing.ball_diameter']}, pitch "
            f"{p['bearing.pitch_diameter']}, contact angle {p['bearing.contact_angle_deg']} deg; shaft {speed}\n")


# ---- report ----------------------------------------------------------------------------------------

def table(results: list[FileResult]) -> str:
    head = f"{'recording':<34} {'fs':>6} {'windows':>7} {'anomaly':>8} {'zone':>4} {'events':>6}  " \
           f"{'named':<12} {'by':<11} {'expected':<11} verdict"
    lines = [head, "-" * len(head)]
    for r in results:
        expected = "healthy" if r.healthy else r.expected or "?"
        lines.append(f"{r.name:<34} {r.fs // 1000:>5}k {r.windows:>7} {r.anomaly_rate:>7.0%} {r.zone:>4} "
                     f"{len(r.alarms):>6}  {r.diagnosis:<12} {r.method:<11} {expected:<11} {r.verdict}")
    return "\n".join(lines)


def confusion(results: list[FileResult]) -> str:
    """Damaged part (rows) x the part the alarms named (columns), recordings counted."""
    cols = list(PARTS) + ["unspecified", "not flagged"]
    rows = [p for p in PARTS if any(r.expected == p and not r.trained for r in results)]
    width = max(len(c) for c in cols) + 1
    corner = "damaged / named"
    lines = [f"{corner:<16}" + "".join(f"{c:>{width}}" for c in cols)]
    for part in rows:
        counts = collections.Counter("not flagged" if not r.alarms else r.diagnosis
                                     for r in results if r.expected == part and not r.healthy and not r.trained)
        lines.append(f"{part:<16}" + "".join(f"{counts.get(c, 0):>{width}}" for c in cols))
    return "\n".join(lines)


def totals(results: list[FileResult]) -> dict:
    faults = [r for r in results if not r.healthy and not r.trained]
    healthy = [r for r in results if r.healthy and not r.trained]
    return {"fault recordings": len(faults), "flagged": sum(bool(r.alarms) for r in faults),
            "named right": sum(r.verdict == "ok" for r in faults),
            "named wrong": sum(r.verdict == "WRONG PART" for r in faults),
            "healthy recordings": len(healthy), "false alarms": sum(r.verdict == "FALSE ALARM" for r in healthy)}


def window_summary(results: list[FileResult]) -> str:
    """Every diagnosed window (anomalous, or its story open) on its own: how often the running
    diagnosis named the damaged part, another part, or none; the damaged part's lowest confidence
    and the other parts' highest, per damaged part (how far from the naming rule's threshold)."""
    lines = []
    for part in PARTS:
        rs = [r for r in results if r.expected == part and not r.healthy and not r.trained]
        if not rs:
            continue
        named = sum((r.window_named for r in rs), collections.Counter())
        n = sum(named.values())
        if not n:
            continue
        right = named.get(part, 0)
        wrong = n - right - named.get("unspecified", 0)
        damaged = [c for r in rs for c in r.conf_damaged]
        others = [c for r in rs for c in r.conf_others]
        lines.append(f"  {part:<11} {n:>4} windows: named right {right / n:>4.0%}, wrong {wrong / n:>4.0%}, "
                     f"unspecified {named.get('unspecified', 0) / n:>4.0%}; its confidence min {min(damaged):.2f} "
                     f"median {sorted(damaged)[len(damaged) // 2]:.2f}, other parts' max {max(others):.2f}")
    return "diagnosed windows (each on the mean of its ring of spectra):\n" + "\n".join(lines) if lines else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="appliance eval bearing", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of CWRU-style .mat files (or IMS snapshots)")
    p.add_argument("--format", choices=("cwru", "ims"), default="cwru", help="what the folder holds")
    p.add_argument("--healthy", default="normal_0hp_48k.mat", help="cwru: the healthy recording in that folder")
    p.add_argument("--channels", default="0", help="ims: the bearing's column(s), comma-separated (default 0)")
    p.add_argument("--fs", type=float, default=20000.0, help="ims: sample rate in Hz (default 20000)")
    p.add_argument("--baseline-snapshots", type=int, default=10, help="ims: snapshots that teach the baseline")
    p.add_argument("--expect", choices=PARTS, help="ims: the part that failed in this run (checks the names)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a module param for every recording (repeatable), e.g. diagnosis.band=fixed")
    p.add_argument("--wasm", type=Path, help="the module to evaluate (default: the one configs/cwru-eval.yaml names)")
    p.add_argument("--geometry", metavar="BALLS,BALL_D,PITCH_D[,ANGLE]",
                   help="ims (required): the bearing's rolling elements, their and the pitch diameter, contact angle")
    p.add_argument("--rpm", type=float, help="ims: the shaft's fixed speed (or --rpm-range)")
    p.add_argument("--rpm-range", metavar="MIN,MAX", help="ims: the range the speed is estimated in")
    args = p.parse_args(argv)
    try:
        if args.format == "ims":
            channels = [int(c) for c in args.channels.split(",") if c.strip()]
            params = args.param + ims_params(args.geometry, args.rpm, args.rpm_range)
            print(describe_ims(params))
            results = [evaluate_ims(args.data, channels, args.fs, args.baseline_snapshots, args.expect, args.wasm,
                                    params)]
        else:
            results = evaluate(args.data, args.healthy, args.wasm, args.param)
    except ValueError as exc:
        print(f"appliance eval bearing: {exc}", file=sys.stderr)
        return 2
    if args.param:
        print("params changed for this run: " + ", ".join(args.param) + "\n")
    if any(r.trained for r in results):
        print("a learned method votes: the recordings it was trained on (modules/models/bearing_cnn/report.json) "
              "are marked (trained on) and left out of every count\n")
    print(table(results))
    for r in results:
        for e in r.alarms[:3]:
            print(f"  {r.name}: {e['severity']}: {e['message']}")
        if r.first_flagged:
            print(f"  {r.name}: first flagged at snapshot {r.first_flagged}")
    if any(r.expected for r in results):
        print("\n" + confusion(results))
    summary = window_summary(results)
    if summary:
        print("\n" + summary)
    t = totals(results)
    print(f"\nfault recordings {t['fault recordings']}: flagged {t['flagged']}, named right {t['named right']}, "
          f"named wrong {t['named wrong']}; healthy recordings {t['healthy recordings']}: "
          f"false alarms {t['false alarms']}")
    bad = [r for r in results if r.verdict in ("FALSE ALARM", "WRONG PART", "MISSED")]
    for r in bad:
        print(f"FAILED: {r.name}: {r.verdict}" + (f" ({r.diagnosis})" if r.verdict == "WRONG PART" else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
