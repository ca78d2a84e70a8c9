"""The lines a bearing diagnosis looks for, over a whole recording: `python -m
appliance_tools.evaluation.bearing_lines [FILE.mat ...]` (default: the shared CWRU ball recordings and
one of each race). Every window of the recording (4096 samples at 12 kHz, the same duration at 48
kHz, not overlapping) is diagnosed by the numpy reference of the bearing module
(modules/src/bearing/reference.py) with configs/cwru-eval.yaml's params; the table gives, for the
mean of all their diagnostic spectra (in the band the module chose), 2xBSF h = 1..3, its -/+FTF
sidebands at h = 1, BPFO, BPFI, FTF and the shaft line, each the largest bin in its window in dB
over the floor (the median up to 5 x BPFI). docs/modules/bearing.md uses it to show what the ball
recordings hold."""
from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import numpy as np

from appliance_tools.evaluation.bearing import DEFAULT_DATA, EVAL_CONFIG, REPO


def reference():
    spec = importlib.util.spec_from_file_location("bearing_reference", REPO / "modules/src/bearing/reference.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    return ref


def eval_params() -> dict:
    import yaml
    from appliance.config import params as schema
    module = next(iter(yaml.safe_load(EVAL_CONFIG.read_text())["modules"].values()))
    return {".".join(k): v for k, v in schema.leaves(module["params"])}


def lines_of(path: Path, ref, params: dict) -> str:
    import scipy.io
    x = next(v for k, v in scipy.io.loadmat(path).items() if k.endswith("_DE_time")).ravel().astype(np.float64)
    fs = int(re.search(r"_(\d+)k", path.stem).group(1)) * 1000
    n = 4096 * fs // 12000
    bw = fs / n
    state, spectra, speeds, band = ref.State(), [], [], ""
    for seq, i in enumerate(range(0, len(x) - n + 1, n)):
        f = ref.analyze(x[i:i + n][None].astype(np.float32), fs, params, state, True, seq=seq)
        power, speed, _ = state.diag_ring[-1]
        spectra.append(power[0].astype(np.float64))
        speeds.append(speed)
        band = f"{f['diagnosis.band_lo_hz']:.0f}-{f['diagnosis.band_hi_hz']:.0f} Hz"
    p = np.mean(spectra, axis=0)
    fr = float(np.median(speeds))
    g = (params["bearing.balls"], params["bearing.ball_diameter"], params["bearing.pitch_diameter"],
         params.get("bearing.contact_angle_deg", 0))
    ff = ref.fault_frequencies(fr, *g)
    top = min(int(5 * ff["bpfi"] / bw), len(p) - 1)
    floor = float(np.median(p[2:top + 1]))

    def db(hz: float, tol: float) -> float:
        k0, k1 = max(2, int((hz - tol) / bw)), min(len(p) - 1, int((hz + tol) / bw) + 1)
        return 10 * math.log10(float(p[k0:k1 + 1].max()) / floor)
    ball = ", ".join(f"{db(h * ff['ball'], bw / 2 + 0.02 * h * ff['ball']):+.1f}" for h in (1, 2, 3))
    side = f"{db(ff['ball'] - ff['ftf'], bw):+.1f} / {db(ff['ball'] + ff['ftf'], bw):+.1f}"
    rest = " | ".join(f"{db(hz, bw / 2 + 0.01 * hz):+.1f}" for hz in (ff["bpfo"], ff["bpfi"])) + \
        f" | {db(ff['ftf'], bw):+.1f} | {db(fr, bw):+.1f}"
    return f"| {path.stem} | {len(spectra)} windows, {band} | {ball} | {side} | {rest} |"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    files = [Path(a) for a in argv] or (sorted(DEFAULT_DATA.glob("ball_*.mat")) +
                                         [DEFAULT_DATA / "inner_race_007_1hp_12k.mat",
                                          DEFAULT_DATA / "outer_race_007_at6_1hp_12k.mat"])
    ref, params = reference(), eval_params()
    params.pop("diagnosis.second_opinion", None)
    print("| recording | spectra averaged | 2xBSF (h = 1, 2, 3) | its -/+FTF sidebands at h = 1 | BPFO | BPFI | FTF | fr |")
    print("|---|---|---|---|---|---|---|---|")
    for f in files:
        print(lines_of(f, ref, params))
    return 0


if __name__ == "__main__":
    sys.exit(main())
