"""numpy reference of the `bearing` module (bearing.c): the same analysis, in float64.

`analyze(x, fs, params, state)` returns, for one window, every feature the module reports for it
except the baseline ones ("score", "baseline.progress"); `state` (a `State`) carries what the
module carries from window to window (the speed track), so a sequence of windows needs one State
passed to every call; `Baseline` replays the learned baseline and the score; `fault_frequencies`
gives the bearing defect frequencies. tests/test_bearing_module.py holds
the module to this file within documented tolerances, so keep the two in step.

params is the module's flattened params mapping ({"bearing.balls": 9, ...}; values may be text).
"""
from __future__ import annotations

import math

import numpy as np

G_TO_MM_S2 = 9806.65          # standard gravity in mm/s^2
KINDS = ("outer", "inner", "ball", "cage")
DIAGNOSIS_CODE = {"unspecified": 0, "outer": 1, "inner": 2, "ball": 3, "cage": 4}
HARMONICS = 3
MAX_BASELINE_FEATURES = 64
LOG_TINY = 1e-12              # ln(x + LOG_TINY): amplitudes can be exactly 0

# ISO 20816-3:2022 Annex A, Tables A.1 (group 1) / A.2 (group 2), same values as ISO 10816-3:2009:
# zone boundaries A/B, B/C, C/D of broadband velocity RMS in mm/s.
ISO_20816_3 = {
    (1, "rigid"): (2.3, 4.5, 7.1),
    (1, "flexible"): (3.5, 7.1, 11.0),
    (2, "rigid"): (1.4, 2.8, 4.5),
    (2, "flexible"): (2.3, 4.5, 7.1),
}


def _f(params: dict, key: str, default):
    v = params.get(key, default)
    return default if v is None else float(v)


def fault_frequencies(fr: float, balls: int, ball_d: float, pitch_d: float, angle_deg: float = 0.0) -> dict:
    """Bearing defect frequencies in Hz for shaft frequency fr (Hz). "ball" is 2 x BSF, where a
    rolling-element defect shows in the envelope (it strikes both races once per spin)."""
    r = ball_d / pitch_d * math.cos(math.radians(angle_deg))
    ftf = fr / 2 * (1 - r)
    bpfo = balls * fr / 2 * (1 - r)
    bpfi = balls * fr / 2 * (1 + r)
    bsf = pitch_d * fr / (2 * ball_d) * (1 - r * r)
    return {"ftf": ftf, "bpfo": bpfo, "bpfi": bpfi, "bsf": bsf, "ball": 2 * bsf,
            "outer": bpfo, "inner": bpfi, "cage": ftf}


def _jacobsen(X: np.ndarray, k: int) -> float:
    """Fractional peak offset from the complex bins k-1, k, k+1, clamped to half a bin."""
    den = 2 * X[k] - X[k - 1] - X[k + 1]
    if not abs(den) > 0:
        return 0.0
    return min(max(float(np.real((X[k - 1] - X[k + 1]) / den)), -0.5), 0.5)


def estimate_shaft_hz(X: np.ndarray, fs: float, n: int, lo_hz: float, hi_hz: float) -> float:
    """Largest |X_k| with f_k in [lo, hi], refined by parabolic interpolation on the complex
    spectrum (Jacobsen: delta = Re[(X_k-1 - X_k+1) / (2 X_k - X_k-1 - X_k+1)]), which is nearly
    unbiased for a rectangular window where a parabola through |X| is off by up to half a bin."""
    bw = fs / n
    klo = max(1, math.ceil(lo_hz / bw))
    khi = min(n // 2 - 1, math.floor(hi_hz / bw))
    if klo > khi:                          # the range falls between two bins: take the nearest
        k = min(max(math.floor((lo_hz + hi_hz) / 2 / bw + 0.5), 1), n // 2 - 1)
    else:
        k = klo + int(np.argmax(np.abs(X[klo:khi + 1])))
    delta = _jacobsen(X, k)
    return min(max((k + delta) * bw, lo_hz), hi_hz)


def _onesided_rms(bins: np.ndarray, n: int) -> float:
    return math.sqrt(2.0 / (n * n) * float(np.sum(np.abs(bins) ** 2)))


def _median_floor(A: np.ndarray, n: int, bpfi_hz: float, bw: float) -> float:
    hi = min(n // 2, math.floor(5 * bpfi_hz / bw))
    seg = A[2:hi + 1]
    return float(np.median(seg)) if seg.size else 0.0


class State:
    """What the module keeps between windows besides the baseline: the last speed estimates."""

    def __init__(self) -> None:
        self.speeds: list[float] = []

    def track(self, fr: float, windows: int) -> float:
        """The median of the last `windows` estimates, this one included (bearing.c track_shaft)."""
        self.speeds = (self.speeds + [fr])[-windows:]
        return float(np.median(self.speeds))


def iso_zone(velocity_rms: float, group: int = 2, foundation: str = "rigid") -> int:
    ab, bc, cd = ISO_20816_3[(int(group), foundation)]
    return 0 if velocity_rms < ab else 1 if velocity_rms < bc else 2 if velocity_rms < cd else 3


def analyze(x: np.ndarray, fs: float, params: dict, state: State | None = None) -> dict:
    """Features of one window x (channels, frames), as bearing.c reports them (plus the
    diagnosis the module reports only once its baseline is learned), and "_peaks":
    per channel and kind the envelope peak (Hz refined by _jacobsen, amplitude g, h=1 ratio)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    channels, n = x.shape
    bw = fs / n
    f = np.arange(n // 2 + 1) * bw
    vel_lo = _f(params, "velocity.low_hz", 10.0)
    vel_hi = _f(params, "velocity.high_hz", 1000.0)
    env_lo = _f(params, "envelope.low_hz", fs / 8)
    env_hi = _f(params, "envelope.high_hz", 3 * fs / 8)
    balls = int(_f(params, "bearing.balls", 0))
    ball_d = _f(params, "bearing.ball_diameter", 0)
    pitch_d = _f(params, "bearing.pitch_diameter", 0)
    angle = _f(params, "bearing.contact_angle_deg", 0.0)
    min_ratio = _f(params, "diagnosis.min_ratio", 3.0)
    group = int(_f(params, "iso.group", 2))
    foundation = str(params.get("iso.foundation", "rigid"))

    out: dict = {}
    spectra = []
    for c in range(channels):
        d = x[c] - x[c].mean()
        m2, m3, m4 = (d ** 2).mean(), (d ** 3).mean(), (d ** 4).mean()
        rms, peak = math.sqrt(m2), float(np.abs(d).max())
        p = f"ch{c}."
        out[p + "rms"] = rms
        out[p + "peak"] = peak
        out[p + "crest"] = peak / rms if rms > 0 else 0.0
        out[p + "kurtosis"] = m4 / (m2 * m2) if m2 > 0 else 0.0
        out[p + "skewness"] = m3 / m2 ** 1.5 if m2 > 0 else 0.0
        # The module transforms the float32 mean-removed signal; mirror that rounding.
        spectra.append(np.fft.rfft(d.astype(np.float32).astype(np.float64)))

    if "shaft.rpm" in params:
        fr = _f(params, "shaft.rpm", 0) / 60
    else:
        fr = estimate_shaft_hz(spectra[0], fs, n, _f(params, "shaft.rpm_min", 0) / 60,
                               _f(params, "shaft.rpm_max", 0) / 60)
        fr = (state or State()).track(fr, int(_f(params, "shaft.track_windows", 8)))
    ff = fault_frequencies(fr, balls, ball_d, pitch_d, angle)
    out.update({"shaft_hz": fr, "bpfo_hz": ff["bpfo"], "bpfi_hz": ff["bpfi"], "bsf_hz": ff["bsf"],
                "ftf_hz": ff["ftf"]})

    k = np.arange(n // 2 + 1)
    vel_band = (k >= 1) & (k < n // 2) & (f >= vel_lo) & (f <= vel_hi)
    env_band = (f >= env_lo) & (f <= env_hi)
    peaks = []
    vmax = 0.0
    for c, X in enumerate(spectra):
        p = f"ch{c}."
        V = X[vel_band] * G_TO_MM_S2 / (2 * np.pi * f[vel_band])
        out[p + "velocity_rms"] = _onesided_rms(V, n)
        vmax = max(vmax, out[p + "velocity_rms"])
        kb = np.arange(1, n // 2)                  # band b: b n/16 <= k < (b+1) n/16
        for b in range(8):
            out[p + f"band{b}"] = _onesided_rms(X[kb[16 * kb // n == b]], n)
        Xm = np.where(env_band, X, 0)
        xb = np.fft.irfft(Xm, n)
        xh = np.fft.irfft(-1j * Xm, n)
        e = np.sqrt(xb * xb + xh * xh)
        E = np.fft.rfft(e - e.mean())
        A = 2 * np.abs(E) / n
        floor = _median_floor(A, n, ff["bpfi"], bw)
        out[p + "env.floor"] = floor
        chpeaks = {}
        for kind in KINDS:
            ratios = []
            for h in range(1, HARMONICS + 1):
                t = h * ff[kind]
                tol = max(bw, 0.01 * t)
                sel = np.nonzero((k >= 1) & (np.abs(f - t) <= tol))[0]
                if sel.size:
                    kk = int(sel[np.argmax(A[sel])])
                    amp = float(A[kk])
                else:
                    kk, amp = -1, 0.0
                ratio = amp / floor if floor > 0 else 0.0
                ratios.append(ratio)
                if h == 1:
                    out[p + f"env.{kind}"] = amp
                    hz = (kk + _jacobsen(E, kk)) * bw if 1 <= kk < n // 2 else kk * bw
                    chpeaks[kind] = (hz if kk >= 0 else 0.0, amp, ratio)
            out[p + f"env.{kind}.ratio"] = float(np.mean(ratios))
        peaks.append(chpeaks)
    out["iso_zone"] = iso_zone(vmax, group, foundation)

    # Diagnosis: the kind whose mean ratio over channels is largest; evidence from the channel
    # where that kind stands out most. Ties go to the earlier kind (outer, inner, ball, cage).
    means = {kind: float(np.mean([out[f"ch{c}.env.{kind}.ratio"] for c in range(channels)])) for kind in KINDS}
    best = max(KINDS, key=lambda kd: (means[kd], -KINDS.index(kd)))
    best_c = max(range(channels), key=lambda c: (out[f"ch{c}.env.{best}.ratio"], -c))
    out["diagnosis"] = DIAGNOSIS_CODE[best] if means[best] >= min_ratio else 0
    out["diagnosis.ratio"] = means[best]
    out["diagnosis.peak_hz"] = peaks[best_c][best][0]
    out["_peaks"] = peaks
    return out


def per_channel_layout(channels: int) -> tuple[int, int]:
    """(values per channel, band groups) of the baseline vector: 22 values per channel, the 8
    band energies merged into 4 (3 channels) or 2 (4 channels) so the vector fits 64 values."""
    budget = min(22, MAX_BASELINE_FEATURES // channels)
    groups = 8 if budget >= 22 else 4 if budget >= 18 else 2
    return 14 + groups, groups


def baseline_vector(feat: dict, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, is_log) of the baseline feature vector of one window, in bearing.c's order."""
    per, groups = per_channel_layout(channels)
    vals, logs = [], []
    for c in range(channels):
        p = f"ch{c}."

        def ln(v):
            return math.log(v + LOG_TINY)
        row = [(ln(feat[p + "rms"]), 1), (ln(feat[p + "velocity_rms"]), 1), (ln(feat[p + "peak"]), 1),
               (feat[p + "crest"], 0), (feat[p + "kurtosis"], 0), (feat[p + "skewness"], 0)]
        row += [(ln(feat[p + f"env.{kd}"]), 1) for kd in KINDS]
        row += [(feat[p + f"env.{kd}.ratio"], 0) for kd in KINDS]
        width = 8 // groups
        for g in range(groups):
            e2 = sum(feat[p + f"band{b}"] ** 2 for b in range(g * width, (g + 1) * width))
            row.append((ln(math.sqrt(e2)), 1))
        assert len(row) == per
        vals += [v for v, _ in row]
        logs += [lg for _, lg in row]
    return np.array(vals), np.array(logs, dtype=bool)


class Baseline:
    """Median / MAD baseline and the score: the RMS of the robust z-scores,
    score = sqrt(mean_i z_i^2), z_i = (v_i - median_i) / spread_i, spread_i = 1.4826 MAD_i
    floored at min_spread (absolute, for ln features: a relative change) or
    min_spread |median_i| (linear features), and at 1e-9."""

    def __init__(self, channels: int, min_spread: float = 0.05):
        self.channels, self.min_spread = channels, min_spread
        self.rows: list[np.ndarray] = []
        self.median = self.spread = None

    def learn(self, feat: dict) -> None:
        self.rows.append(baseline_vector(feat, self.channels)[0])

    def finish(self) -> None:
        m = np.array(self.rows)
        _, logs = baseline_vector_layout(self.channels)
        self.median = np.median(m, axis=0)
        mad = np.median(np.abs(m - self.median), axis=0) * 1.4826
        floor = np.where(logs, self.min_spread, self.min_spread * np.abs(self.median))
        self.spread = np.maximum(np.maximum(mad, floor), 1e-9)

    def score(self, feat: dict) -> float:
        v, _ = baseline_vector(feat, self.channels)
        z = (v - self.median) / self.spread
        return float(np.sqrt(np.mean(z * z)))


def baseline_vector_layout(channels: int) -> tuple[int, np.ndarray]:
    per, groups = per_channel_layout(channels)
    logs = np.array(([1, 1, 1, 0, 0, 0] + [1] * 4 + [0] * 4 + [1] * groups) * channels, dtype=bool)
    return per * channels, logs
