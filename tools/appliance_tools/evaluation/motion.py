"""`appliance eval motion`: the motion module on a real video, through the real pipeline, against
OpenCV's MOG2 background subtractor as the reference.

One supervisor run replays the video through the camera source (a file, `realtime: false`, gray,
resized on the host), the frame windower, the worker and wasm3 with the motion module at its
DEFAULT params (modules/src/motion/motion.c; `overflow: block`, so no frame is dropped), and
records each frame's features and events. The reference reads the same frames through the same
camera source code and runs cv2.createBackgroundSubtractorMOG2 (history 500, varThreshold 16,
shadows off) on the host, then a 3x3 opening (speckle), two 3x3 dilations and the same blob rule
as the module: "motion present" when an 8-connected blob has at least `min_area` pixels of the
frame (the module's default, 200). Both start from nothing, so the first WARMUP frames (1 s at
10 fps: MOG2 calls its whole first frame foreground, the module uses it as its background) are
left out of the comparison.

Printed: frame agreement, precision, recall and F1 of the module's per-frame `motion` against the
reference; object-level figures (how many of the reference's blobs, the 8 largest per frame, have
their centre inside a module box; how many module boxes overlap a reference blob), and the
module's events (start and end frame, duration, zones). Two zones, the left and right halves of
the frame, are configured to show zones end to end; zones do not change the motion decisions.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]
DEFAULT_VIDEO = REPO.parent / "shared" / "data" / "video" / "vtest.avi"
MODULE_SRC = REPO / "modules" / "src" / "motion"
RESIZE = (384, 288)
WARMUP = 10            # frames left out at the start (see the docstring)
MIN_AREA = 200         # the module's default min_area (pixels of the frame it receives)
MAX_BOXES = 8          # the module reports the 8 largest blobs


@dataclass
class Frame:
    motion: bool = False
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    zones: list[str] = field(default_factory=list)
    lighting: bool = False


@dataclass
class MotionEvent:
    start: int                    # frame index of the start event
    message: str
    end: int | None = None        # frame index of the end event; None: still open at the end
    end_message: str = ""
    zones: list[str] = field(default_factory=list)


@dataclass
class Result:
    frames: int
    compared: int
    tp: int
    fp: int
    fn: int
    tn: int
    object_recall: float
    box_precision: float
    events: list[MotionEvent]
    fps: float
    seconds: float
    host_dsp: bool
    zones: dict[str, list[int]]        # per zone: tp, fp, fn, tn of "motion in this zone"

    @property
    def agreement(self) -> float:
        return (self.tp + self.tn) / self.compared if self.compared else 0.0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def zones_for(width: int, height: int) -> dict[str, list[list[int]]]:
    """The four quadrants of the frame, as polygons in frame pixels."""
    hw, hh = width // 2, height // 2
    return {name: [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
            for name, (x0, y0, x1, y1) in (("top_left", (0, 0, hw, hh)), ("top_right", (hw, 0, width, hh)),
                                           ("bottom_left", (0, hh, hw, height)),
                                           ("bottom_right", (hw, hh, width, height)))}


def camera_section(video: Path) -> dict:
    return {"type": "camera", "url": str(video), "realtime": False, "gray": True, "resize": list(RESIZE)}


def run_module(video: Path, wasm: Path, workdir: Path, host_dsp: bool = True,
               params: dict | None = None) -> tuple[dict[int, Frame], list[tuple[int, int, str]], float]:
    """The real pipeline: per-frame results (by window sequence = frame index), the events as
    (frame, severity, message), and the wall time of the replay."""
    from appliance.config.schema import load_config
    from appliance.core.supervisor import Supervisor

    module_params = {"zone": zones_for(*RESIZE)}
    module_params.update(params or {})
    doc = {"gateway": {"name": "eval-motion", "data_dir": str(workdir / "var")},
           "metrics": {"enabled": False},
           "sources": {"cam": camera_section(video)},
           "modules": {"motion": {"wasm": str(wasm), "source": "cam", "overflow": "block", "queue": 16,
                                  "deadline_ms": 5000, "host_dsp": host_dsp, "params": module_params}}}
    cfg_path = workdir / "eval-motion.yaml"
    cfg_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    sup = Supervisor(load_config(cfg_path))
    frames: dict[int, Frame] = {}
    events: list[tuple[int, int, str]] = []
    zone_names = list(module_params.get("zone", {}))

    def record(module, window, res):
        f = res.features
        boxes = []
        for i in range(MAX_BOXES):
            if f"box{i}.x" not in f:
                break
            boxes.append(tuple(int(f[f"box{i}.{k}"]) for k in "xywh"))
        frames[window.seq] = Frame(bool(f.get("motion", 0)), boxes,
                                   [z for z in zone_names if f.get(f"zone.{z}", 0)], bool(f.get("lighting", 0)))
        events.extend((window.seq, sev, msg) for sev, _, msg in res.events)

    sup.subscribe(record)
    t0 = time.monotonic()
    sup.start()
    try:
        if not sup.wait_until_done(1800):
            raise RuntimeError("the replay did not finish in 30 minutes")
    finally:
        sup.stop()
    return frames, events, time.monotonic() - t0


@dataclass
class RefFrame:
    blobs: list[tuple[int, int, int, int, int]]   # (x, y, w, h, area), area >= min_area, largest first
    zones: set[str]                               # zones holding pixels of the 8 largest of them


def reference_frames(video: Path, min_area: int = MIN_AREA) -> list[RefFrame]:
    """MOG2 on the frames the camera source gives (the same code, the same config)."""
    import cv2
    import numpy as np

    from hal.sources.camera import CameraConfig, CameraSource

    src = CameraSource("ref", CameraConfig(**camera_section(video)))
    src.open()
    mog = cv2.createBackgroundSubtractorMOG2(history=500, varThreshold=16, detectShadows=False)
    k = np.ones((3, 3), np.uint8)
    quadrants = {name: (pts[0][0], pts[0][1], pts[2][0], pts[2][1]) for name, pts in zones_for(*RESIZE).items()}
    out = []
    try:
        while (block := src.read()) is not None:
            h, w = block.image
            fg = mog.apply(block.data[0].reshape(h, w))
            fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, k)
            fg = cv2.dilate(fg, k, iterations=2)
            _, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8, ltype=cv2.CV_32S)
            big = sorted((i for i in range(1, len(stats)) if stats[i, 4] >= min_area), key=lambda i: -stats[i, 4])
            shown = np.isin(labels, big[:MAX_BOXES])
            zones = {name for name, (x0, y0, x1, y1) in quadrants.items() if shown[y0:y1, x0:x1].any()}
            out.append(RefFrame([tuple(int(v) for v in stats[i]) for i in big], zones))
    finally:
        src.close()
    return out


def pair_events(events: list[tuple[int, int, str]]) -> list[MotionEvent]:
    out: list[MotionEvent] = []
    for seq, severity, message in events:
        if severity > 0:
            m = re.match(r"motion in zones? ([^:]+):", message)
            out.append(MotionEvent(seq, message, zones=m.group(1).split(", ") if m else []))
        elif out and out[-1].end is None:
            out[-1].end, out[-1].end_message = seq, message
            m = re.search(r"; zones? ([^)]+)\)", message)
            if m:
                out[-1].zones = m.group(1).split(", ")
    return out


def compare(frames: dict[int, Frame], ref: list[RefFrame], warmup: int = WARMUP) -> tuple[int, int, int, int,
                                                                                        float, float, dict]:
    tp = fp = fn = tn = 0
    covered = total = overlapping = boxes = 0
    zone_counts = {name: [0, 0, 0, 0] for name in zones_for(*RESIZE)}   # tp, fp, fn, tn
    for i in range(warmup, len(ref)):
        mod, blobs = frames[i], ref[i].blobs
        m, r = mod.motion, bool(blobs)
        tp += m and r
        fp += m and not r
        fn += r and not m
        tn += not m and not r
        for x, y, w, h, _ in blobs[:MAX_BOXES]:
            cx, cy = x + w / 2, y + h / 2
            total += 1
            covered += any(bx <= cx < bx + bw and by <= cy < by + bh for bx, by, bw, bh in mod.boxes)
        for bx, by, bw, bh in mod.boxes:
            boxes += 1
            overlapping += any(x < bx + bw and bx < x + w and y < by + bh and by < y + h for x, y, w, h, _ in blobs)
        for name, c in zone_counts.items():
            zm, zr = name in mod.zones, name in ref[i].zones
            c[0 if zm and zr else 1 if zm else 2 if zr else 3] += 1
    return tp, fp, fn, tn, covered / total if total else 1.0, overlapping / boxes if boxes else 1.0, zone_counts


def evaluate(video: Path = DEFAULT_VIDEO, wasm: Path | None = None, host_dsp: bool = True) -> Result:
    if not video.exists():
        raise FileNotFoundError(f"video not found: {video}")
    with tempfile.TemporaryDirectory(prefix="eval-motion-") as tmp:
        workdir = Path(tmp)
        if wasm is None:
            from appliance_tools.modbuild import build_module
            built = build_module(MODULE_SRC, workdir / "motion.wasm")
            if not built.ok:
                raise RuntimeError(f"motion module does not build: {built.problems}")
            wasm = built.out
        frames, events, seconds = run_module(video, wasm, workdir, host_dsp)
    ref = reference_frames(video)
    missing = [i for i in range(len(ref)) if i not in frames]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(ref)} frames have no module result (first: {missing[0]})")
    tp, fp, fn, tn, obj_recall, box_prec, zones = compare(frames, ref)
    return Result(len(ref), tp + fp + fn + tn, tp, fp, fn, tn, obj_recall, box_prec, pair_events(events),
                  len(frames) / seconds if seconds else 0.0, seconds, host_dsp, zones)


def report(r: Result, fps: float = 10.0) -> str:
    zone_head = f"  {'zone':<13} {'agreement':>9} {'precision':>9} {'recall':>6}   " \
                f"{'TP':>4} {'FP':>4} {'FN':>4} {'TN':>4}"
    lines = [(f"motion module vs MOG2 reference: {r.frames} frames at {RESIZE[0]}x{RESIZE[1]}, "
              f"first {WARMUP} left out (warm-up), min_area {MIN_AREA} px, host kernels "
              f"{'on' if r.host_dsp else 'off (wasm C path)'}"),
             "",
             (f"{'frames':>7} {'agreement':>9} {'precision':>9} {'recall':>6} {'F1':>6}   "
              f"{'TP':>4} {'FP':>4} {'FN':>4} {'TN':>4}"),
             (f"{r.compared:>7} {r.agreement:>9.1%} {r.precision:>9.1%} {r.recall:>6.1%} {r.f1:>6.3f}   "
              f"{r.tp:>4} {r.fp:>4} {r.fn:>4} {r.tn:>4}"),
             "",
             (f"objects: {r.object_recall:.1%} of the reference's blobs (8 largest per frame) have their centre "
              f"in a module box; {r.box_precision:.1%} of the module's boxes overlap a reference blob"),
             "",
             "per zone (quadrants; module: zone.<name>, reference: pixels of its 8 largest blobs in the zone):",
             zone_head]
    for name, (ztp, zfp, zfn, ztn) in r.zones.items():
        n = ztp + zfp + zfn + ztn
        lines.append(f"  {name:<13} {(ztp + ztn) / n if n else 0:>9.1%} {ztp / (ztp + zfp) if ztp + zfp else 1:>9.1%} "
                     f"{ztp / (ztp + zfn) if ztp + zfn else 1:>6.1%}   {ztp:>4} {zfp:>4} {zfn:>4} {ztn:>4}")
    lines += ["",
             f"pipeline: {r.frames} frames in {r.seconds:.1f} s ({r.fps:.0f} frames/s, camera decode included)",
             "",
             f"events ({len(r.events)}):",
             f"  {'start':>5} {'end':>5} {'duration':>9}  zones          message"]
    for e in r.events:
        end = str(e.end) if e.end is not None else "open"
        last = e.end if e.end is not None else r.frames - 1
        duration = f"{(last - e.start) / fps:.1f} s" + ("" if e.end is not None else "+")
        lines.append(f"  {e.start:>5} {end:>5} {duration:>9}  {', '.join(e.zones) or '-':<14} {e.message}")
        if e.end_message:
            lines.append(f"  {'':>5} {'':>5} {'':>9}  {'':<14} {e.end_message}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="appliance eval motion", description=__doc__.splitlines()[0])
    p.add_argument("--video", type=Path, default=DEFAULT_VIDEO, help="the video to replay (default: %(default)s)")
    p.add_argument("--wasm", type=Path, help="the module to evaluate (default: build modules/src/motion)")
    p.add_argument("--no-host-dsp", action="store_true", help="run the module's own wasm kernels (host_dsp: false)")
    args = p.parse_args(argv)
    if not args.video.exists():
        print(f"appliance eval motion: video not found: {args.video} (pass --video FILE); nothing evaluated",
              file=sys.stderr)
        return 2
    r = evaluate(args.video, args.wasm, not args.no_host_dsp)
    print(report(r))
    target = 0.95
    print(f"\nframe agreement {r.agreement:.1%} (target >= {target:.0%}): {'ok' if r.agreement >= target else 'BELOW'}")
    return 0 if r.agreement >= target else 1


if __name__ == "__main__":
    sys.exit(main())
