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
    """What the module keeps between windows besides the baseline: the last speed estimates, and
    the diagnosis's ring of spectra over the event's windows."""

    def __init__(self) -> None:
        self.speeds: list[float] = []
        self.diag_ring: list[tuple[np.ndarray, float, float]] = []   # (power (channels, bins) f32, speed, start s)
        self.diag_shape: tuple | None = None
        self.diag_bands: list = []
        self.diag_band_age = 0
        self.diag_band_confirmed = False
        self.diag_last: dict | None = None                            # the last diagnosed window's features

    def track(self, fr: float, windows: int) -> float:
        """The median of the last `windows` estimates, this one included, restarted from the last
        two when the track is full and both lie on one side of its median by more than 3 robust
        spreads (at least 0.5 %): bearing.c track_shaft."""
        if len(self.speeds) >= 3 and len(self.speeds) == windows:
            med = float(np.median(self.speeds))
            step = max(3 * 1.4826 * float(np.median(np.abs(np.array(self.speeds) - med))), 0.005 * med)
            prev = self.speeds[-1]
            if (fr - med > step and prev - med > step) or (med - fr > step and med - prev > step):
                self.speeds = [prev]
        self.speeds = (self.speeds + [fr])[-windows:]
        return float(np.median(self.speeds))

    def diag_reset(self) -> None:
        self.diag_ring = []
        self.diag_last = None


def iso_zone(velocity_rms: float, group: int = 2, foundation: str = "rigid") -> int:
    ab, bc, cd = ISO_20816_3[(int(group), foundation)]
    return 0 if velocity_rms < ab else 1 if velocity_rms < bc else 2 if velocity_rms < cd else 3


def analyze(x: np.ndarray, fs: float, params: dict, state: State | None = None, diagnose: bool = False,
            seq: int = 0, start_ns: int = 0) -> dict:
    """Features of one window x (channels, frames), as bearing.c reports them.
    diagnose: the module's baseline is learned and this window is anomalous or its event story
    open (the module decides that from its score): the diagnosis features of the scoring phase
    ("diagnosis", "diagnosis.*", "conf.*") come from the ring's mean in `state`; otherwise they
    are those of a window the module does not diagnose (zeros) and the ring restarts.
    seq, start_ns: the window header's (when the windows overlap, see diagnosis_dof)."""
    state = state or State()
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
        fr = fr_window = _f(params, "shaft.rpm", 0) / 60
    else:
        fr_window = estimate_shaft_hz(spectra[0], fs, n, _f(params, "shaft.rpm_min", 0) / 60,
                                      _f(params, "shaft.rpm_max", 0) / 60)
        fr = state.track(fr_window, int(_f(params, "shaft.track_windows", 8)))
    ff = fault_frequencies(fr, balls, ball_d, pitch_d, angle)
    out.update({"shaft_hz": fr, "bpfo_hz": ff["bpfo"], "bpfi_hz": ff["bpfi"], "bsf_hz": ff["bsf"],
                "ftf_hz": ff["ftf"]})

    k = np.arange(n // 2 + 1)
    vel_band = (k >= 1) & (k < n // 2) & (f >= vel_lo) & (f <= vel_hi)
    env_band = (f >= env_lo) & (f <= env_hi)
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
        for kind in KINDS:
            ratios = []
            for h in range(1, HARMONICS + 1):
                t = h * ff[kind]
                tol = max(bw, 0.01 * t)
                sel = np.nonzero((k >= 1) & (np.abs(f - t) <= tol))[0]
                amp = float(A[sel].max()) if sel.size else 0.0
                ratio = amp / floor if floor > 0 else 0.0
                ratios.append(ratio)
                if h == 1:
                    out[p + f"env.{kind}"] = amp
            out[p + f"env.{kind}.ratio"] = float(np.mean(ratios))
    out["iso_zone"] = iso_zone(vmax, group, foundation)

    if diagnose:
        out.update(diagnosis(spectra, x.shape, fs, params, fr_window, state, env_lo, env_hi, ff, seq, start_ns, x))
    else:
        state.diag_reset()
        out.update({"diagnosis": 0, "diagnosis.confidence": 0.0, "diagnosis.peak_hz": 0.0, "diagnosis.method": 0,
                    "diagnosis.windows": 0, "diagnosis.dof": 0, "diagnosis.band_lo_hz": 0.0, "diagnosis.band_hi_hz": 0.0,
                    "diagnosis.channel": 0, "diagnosis.shaft_hz": 0.0,
                    "diagnosis.squared": int(params.get("diagnosis.envelope", "magnitude") == "squared"),
                    "diagnosis.whitened": int(params.get("diagnosis.prewhiten", "none") == "cepstrum"),
                    "diagnosis.signature_p": 0.0,
                    **{f"conf.{k}": 0.0 for k in KINDS}})
    return out


# ---- diagnosis (diagnosis.h: "the part's signature in the envelope spectrum") ------------------

TOL_RACE, TOL_ELEMENT = 0.01, 0.02
MAX_HARMONICS = 16        # of a race's line (up to 5 x BPFI: 5 to 7 for common bearings)
ELEMENT_HARMONICS = 3     # of the ball's and the cage's
SIDEBAND_LOCAL = 32       # bins each side of a sideband for its local continuum, at most
SIGNATURE_LIKELY = 0.5    # a part is named only if its signature is more likely there than not
MODULATION = {"outer": ("fr",), "inner": ("fr", "2fr"), "ball": ("ftf",), "cage": ()}
KURT_LOW_EDGE = 6.0       # x BPFI: a candidate band starts one BPFI above the highest analysed line (5 BPFI)
SK_SIGMAS = 5.0           # the best band's SK must exceed 5 x its noise std (2 / sqrt(bins)), else the fixed band
KURT_ABOVE_FLOOR = 4.0    # a candidate band's mean power: at least 4 x (6 dB over) the noise floor (judgement, see bearing.md)
KURT_TAPER = 20           # the kurtogram's window: cosine ramps over n/20 (5 %) of it at each end
RING_FLOATS = 1 << 18     # the ring of spectra (diagnosis.h's pool): at most this many floats


def _bins_in(lo: float, hi: float, bw: float, kmin: int, kmax: int) -> np.ndarray:
    k = np.arange(kmin, kmax + 1)
    return k[(k * bw >= lo) & (k * bw <= hi)]


def noise_tail(r2: float, k: int) -> float:
    """P(a K-window mean of one noise bin >= r2 x its median): the Gamma(K, 1/K) upper tail at r2 m_K,
    e^-x sum_{j<K} x^j/j!. 0 beyond x = K + 40 sqrt(K), where the tail is below e^-40 (Chernoff;
    e^-205 at K = 64): there, and only there, the sum would overflow and e^-x underflow."""
    mk = math.log(2) if k == 1 else 1 - 1 / (3 * k)
    x = k * r2 * mk
    if x > k + 40 * math.sqrt(k):
        return 0.0
    term, total = 1.0, 0.0
    for j in range(k):
        total += term
        term *= x / (j + 1)
    return math.exp(-x) * total


def presence(r2: float, bins: int, k: int) -> float:
    """1 - (bins) x the noise tail, at least 0: the strongest of `bins` bins is not noise."""
    return max(0.0, 1 - bins * noise_tail(r2, k))


def diagnosis_dof(times: list[float], window_s: float) -> int:
    """Degrees of freedom of the mean of the ring's spectra: K^2 / sum_ij rho_ij, rho_ij the
    squared overlap fraction of windows i and j (rectangular windows: the correlation of their
    periodograms), floored to a whole number >= 1 (a Gamma(K_eff) with the same variance)."""
    k = len(times)
    s = sum(max(0.0, 1 - abs(a - b) / window_s) ** 2 for a in times for b in times)
    return max(1, int(math.floor(k * k / s + 1e-9)))


def diag_carriers(ff: dict, bw: float, top: int) -> list[dict]:
    """Every tested carrier: kind, harmonic, frequency, half-width, excluded. A race's harmonics
    up to the analysed top (5 x BPFI); the ball's and the cage's first ELEMENT_HARMONICS (their
    2 % slip tolerance widens a window with h: at h = 3 the ball's is nearly as wide as its FTF
    sideband spacing, and the cage's comb is dense). A carrier is excluded when a line another part
    predicts (its carriers) is within both windows: evidence for neither."""
    lines, predicted = [], []
    for kind in KINDS:
        tol = TOL_RACE if kind in ("outer", "inner") else TOL_ELEMENT
        hmax = MAX_HARMONICS if kind in ("outer", "inner") else ELEMENT_HARMONICS
        for h in range(1, hmax + 1):
            f = h * ff[kind]
            if h > 1 and f > top * bw:
                break
            hw = bw / 2 + tol * f
            lines.append({"kind": kind, "h": h, "f": f, "hw": hw, "tol": tol})
            predicted.append((kind, f, hw))
    for ln in lines:
        ln["excluded"] = _predicted_by_other(predicted, ln["kind"], ln["f"], ln["hw"])
    return lines, predicted


def _predicted_by_other(predicted: list, kind: str, f: float, hw: float) -> bool:
    return any(k != kind and abs(g - f) <= w + hw for k, g, w in predicted)


def kurtogram_bands(n: int, bw: float, fs: float, bpfi: float) -> list[tuple[int, int]]:
    """The 1/3-binary tree of the fast kurtogram: bands >= 4 BPFI wide, below fs/2.56, starting at
    or above KURT_LOW_EDGE x BPFI."""
    half, bands = n // 2, []
    for level in range(24):
        count = 1 if level == 0 else 1 << ((level + 1) // 2) if level & 1 else 3 << (level // 2 - 1)
        if count > half or half / count * bw < 4 * bpfi:
            break
        for i in range(count):
            k0, k1 = max(1, i * half // count), (i + 1) * half // count - 1
            if k1 > half - 1 or (k1 + 1) * bw > fs / 2.56 or k1 < k0 or k0 * bw < KURT_LOW_EDGE * bpfi:
                continue
            bands.append((k0, k1))
    return bands[:255]


def tukey(n: int) -> tuple[np.ndarray, float]:
    """The kurtogram's taper (cosine ramps over n // KURT_TAPER samples at each end), float32, and
    r = n sum w^4 / (sum w^2)^2 of it (in float64): complex Gaussian noise so tapered has SK 2r - 2."""
    length = n // KURT_TAPER
    w = np.ones(n)
    j = np.arange(length)
    w[:length] = 0.5 * (1 - np.cos(np.pi * j / length))
    w[n - length:] = w[:length][::-1]
    return w.astype(np.float32), float(n * np.sum(w ** 4) / np.sum(w ** 2) ** 2)


def tapered_spectrum(x: np.ndarray) -> np.ndarray:
    """The spectrum the kurtogram reads: the mean-removed window, tapered (a rectangular window's
    edges make loud low-frequency vibration leak into the bands above it as one impulse per
    window, at the wrap: a high SK that is no bearing's)."""
    w, _ = tukey(len(x))
    d = np.asarray(x, np.float64)
    return np.fft.rfft(((d - d.mean()) * w.astype(np.float64)).astype(np.float32).astype(np.float64))


def kurtogram_band(X: np.ndarray, n: int, bw: float, fs: float, bpfi: float, whiten: bool,
                   fixed: tuple[int, int]) -> tuple[int, int]:
    """bearing.c kurtogram_bands for one channel: among the candidate bands whose mean power is at
    least KURT_ABOVE_FLOOR x the noise floor (the median bin power from KURT_LOW_EDGE x BPFI to
    fs/2.56: a resonance that impacts ring stands above it), the one of
    largest SK, if that SK is significant (over the taper's 2r - 2 by SK_SIGMAS noise std); else
    the fixed band. X: the tapered window's spectrum (tapered_spectrum)."""
    cands = kurtogram_bands(n, bw, fs, bpfi)
    ku = min(math.floor(fs / 2.56 / bw) - 1, n // 2 - 1)
    kl = max(1, math.ceil(KURT_LOW_EDGE * bpfi / bw))
    if not cands or ku < kl:
        return fixed
    X32 = X.astype(np.complex64)
    p = X32.real.astype(np.float64) ** 2 + X32.imag.astype(np.float64) ** 2
    floor = float(np.median(p[kl:ku + 1].astype(np.float32).astype(np.float64)))
    best, best_sk = None, 0.0
    for k0, k1 in cands:
        b = k1 - k0 + 1
        if p[k0:k1 + 1].sum() / b < KURT_ABOVE_FLOOR * floor:
            continue
        sk = band_kurtosis(X, k0, k1, whiten)
        if sk < 2 * tukey(n)[1] - 2 + SK_SIGMAS * 2 / math.sqrt(b):
            continue
        if best is None or sk > best_sk:
            best, best_sk = (k0, k1), sk
    return best or fixed


def band_kurtosis(X: np.ndarray, k0: int, k1: int, whiten: bool) -> float:
    m = max(4, 1 << (k1 - k0).bit_length())
    z = np.zeros(m, np.complex128)
    z[:k1 - k0 + 1] = X[k0:k1 + 1]
    if whiten:
        mag = np.abs(z)
        z = np.where(mag > 0, z / np.where(mag > 0, mag, 1), 0)
    p = np.abs(np.fft.ifft(z)) ** 2
    s2 = p.sum()
    return float(m * (p * p).sum() / (s2 * s2) - 2) if s2 > 0 else 0.0


def diag_spectrum(X: np.ndarray, n: int, k0: int, k1: int, squared: bool, whiten: bool) -> np.ndarray:
    """|E_k|^2 (2/n)^2 of the band's (squared) envelope, bins 0..n/2."""
    band = X[k0:k1 + 1].astype(np.complex128)
    if whiten:
        mag = np.abs(band)
        band = np.where(mag > 0, band / np.where(mag > 0, mag, 1), 0)
    z = np.zeros(n, np.complex128)
    z[k0:k1 + 1] = 2 * band
    a = np.fft.ifft(z)
    e = np.abs(a) ** 2 if squared else np.abs(a)
    E = np.fft.rfft(e - e.mean())
    return np.abs(E) ** 2 * (2.0 / n) ** 2


def _peak(p: np.ndarray, shaft: np.ndarray, bw: float, top: int, centre: float, hw: float) -> tuple[int, int]:
    """(bin, bins looked at) of the largest p within hw of centre (bins 2..top, shaft harmonics
    aside); bin -1 when there is none."""
    ks = _bins_in(centre - hw, centre + hw, bw, 2, top)
    ks = ks[~shaft[ks]]
    return (int(ks[np.argmax(p[ks])]) if ks.size else -1), int(ks.size)


def _sideband(p: np.ndarray, shaft: np.ndarray, floor2: float, bw: float, top: int, centre: float,
              hw: float, spacing: float) -> tuple[float, float, int]:
    """(r2 over the floor, r2 over the local continuum, bins) of a sideband: its window's peak,
    counted only if it is a local maximum of the spectrum that stands above its local continuum
    (the median of the bins within spacing/2 of it, at most SIDEBAND_LOCAL each side, and at least
    the floor): a bump on a carrier's skirt is not a line."""
    at, w = _peak(p, shaft, bw, top, centre, hw)
    if at < 0 or not floor2 > 0:
        return 0.0, 0.0, w
    if not (p[at] > p[at - 1] and (at + 1 >= len(p) or p[at] >= p[at + 1])):
        return 0.0, 0.0, w
    half = min(int(math.floor(spacing / 2 / bw)), SIDEBAND_LOCAL)
    ref2 = floor2
    if half >= 1 and at - half >= 1 and at + half < len(p):
        ref2 = max(ref2, float(np.median(p[at - half:at + half + 1])))
    return float(p[at] / floor2), float(p[at] / ref2), w


def channel_confidences(p: np.ndarray, top: int, bw: float, ff: dict, lines: list[dict], predicted: list,
                        k: int) -> dict:
    """bearing.c diag_channel_eval: per kind (confidence, strongest carrier's Hz, its amplitude ratio)."""
    floor2 = float(np.median(p[2:top + 1]))
    f = np.arange(top + 1) * bw
    h = np.floor(f / ff["fr"] + 0.5)
    shaft = (h >= 1) & (np.abs(f - h * ff["fr"]) <= bw / 2 + TOL_RACE * h * ff["fr"])   # the machine's lines
    r2 = p[2:top + 1] / floor2 if floor2 > 0 else np.zeros(top - 1)
    shared = np.zeros(top + 1, bool)         # lines two parts predict: evidence for neither, nor against
    for ln in lines:
        if ln["excluded"]:
            shared[_bins_in(ln["f"] - ln["hw"], ln["f"] + ln["hw"], bw, 0, top)] = True
    total = float(np.sum(np.where(~shaft[2:] & ~shared[2:] & (r2 > 1), r2 - 1, 0.0)))
    mods_of = {"fr": ff["fr"], "2fr": 2 * ff["fr"], "ftf": ff["ftf"]}
    out = {}
    for kind in KINDS:
        carriers = []                            # (h, r2, bins, at, tol, excluded)
        for ln in lines:
            if ln["kind"] != kind or (ln["excluded"] and kind != "inner"):
                continue
            at, w = _peak(p, shaft, bw, top, ln["f"], ln["hw"])
            if at >= 0:
                carriers.append((ln["h"], float(p[at] / floor2) if floor2 > 0 else 0.0, w, at, ln["tol"],
                                 ln["excluded"]))
        own = [c for c in carriers if not c[5]]
        if not own:
            out[kind] = (0.0, 0.0, 0.0, 0.0)
            continue
        _, rb, _, atb, _, _ = max(own, key=lambda c: (c[1], -c[0]))
        if not total > 0:
            out[kind] = (0.0, atb * bw, math.sqrt(rb) if rb > 0 else 0.0, 0.0)
            continue
        c_bins = sum(c[2] for c in own)
        c_max = max(c[1] for c in own)
        acc = sum(max(r - 1, 0.0) * presence(r, w, k) for _, r, w, _, _, _ in own)
        # sidebands at the measured carrier +- each modulation (a comb of spacing mods[0]); one on
        # a line another part predicts is not tested; the inner race's also around its shared carriers
        mods = [mods_of[m] for m in MODULATION[kind]]
        tested = []                              # (carrier index, side, r2, local r2, bins)
        for ci, (hh, rc, _, at, tol, _) in enumerate(carriers):
            for m in mods:
                hw = min(bw + tol * m, mods[0] / 2 - bw)
                if hw < bw / 2:
                    continue                     # the comb is not resolved at this bin width
                for side in (-1, 1):
                    if _predicted_by_other(predicted, kind, hh * ff[kind] + side * m, hw):
                        continue
                    r, loc, w = _sideband(p, shaft, floor2, bw, top, at * bw + side * m, hw, mods[0])
                    if w:
                        tested.append((ci, side, m, r, loc, w))
        n_sb = len(tested)                       # the look-elsewhere of the sideband test: every window tried
        pres = [presence(loc, w * n_sb, k) for _, _, _, _, loc, w in tested]
        evidence = 0.0
        if kind == "inner":                      # load-zone modulation: a sideband (often one-sided)
            evidence = max(pres, default=0.0)
            acc += sum(max(t[3] - 1, 0.0) * pr for t, pr in zip(tested, pres))
        elif kind == "ball":                     # FTF sidebands a few bins off the carrier: both, at one harmonic
            for i, ti in enumerate(tested):
                for j, tj in enumerate(tested):
                    if ti[0] == tj[0] and ti[2] == tj[2] and ti[1] < tj[1]:
                        evidence = max(evidence, min(pres[i], pres[j]))
            acc += sum(max(t[3] - 1, 0.0) * pr for t, pr in zip(tested, pres))
        elif kind == "outer":                    # shaft-rate AM: a -/+ pair's presence x depth ((a_lo + a_hi) / a_carrier)
            for i, ti in enumerate(tested):
                for j, tj in enumerate(tested):
                    if ti[0] == tj[0] and ti[2] == tj[2] and ti[1] < tj[1]:
                        ac = math.sqrt(max(carriers[ti[0]][1] - 1, 0.0))
                        amp = math.sqrt(max(ti[3] - 1, 0.0)) + math.sqrt(max(tj[3] - 1, 0.0))
                        depth = 1.0 if not ac > 0 else min(1.0, amp / ac)
                        evidence = max(evidence, min(pres[i], pres[j]) * depth)
        factor = evidence if kind in ("inner", "ball") else 1.0 - evidence if kind == "outer" else 1.0
        signature = presence(c_max, c_bins, k) * factor          # how likely the signature is there
        conf = signature * (0.5 if kind == "cage" else 1.0) * acc / total
        out[kind] = (min(conf, 1.0), atb * bw, math.sqrt(rb) if rb > 0 else 0.0, signature)
    return out


def diagnosis(spectra: list, shape: tuple, fs: float, params: dict, fr_window: float, state: State,
              env_lo: float, env_hi: float, ff_track: dict, seq: int = 0, start_ns: int = 0,
              x: np.ndarray | None = None) -> dict:
    """The diagnosis features of a diagnosed window (bearing.c diag_update and the naming rule)."""
    channels, n = shape
    bw = fs / n
    geom = (int(_f(params, "bearing.balls", 0)), _f(params, "bearing.ball_diameter", 0),
            _f(params, "bearing.pitch_diameter", 0), _f(params, "bearing.contact_angle_deg", 0.0))
    windows = int(_f(params, "diagnosis.windows", 8))
    squared = params.get("diagnosis.envelope", "magnitude") == "squared"
    whiten = params.get("diagnosis.prewhiten", "none") == "cepstrum"
    kurtogram = params.get("diagnosis.band", "kurtogram") == "kurtogram"
    fixed = "shaft.rpm" in params
    k = np.arange(n // 2 + 1)
    sel = np.nonzero((k * bw >= env_lo) & (k * bw <= env_hi))[0]
    band0 = (int(sel[0]), int(sel[-1])) if sel.size else (1, 0)

    def top_of(bpfi: float) -> int:
        return int(min(max(math.floor(5 * bpfi / bw), 2), n // 2 - 1))
    rpm_top = _f(params, "shaft.rpm", 0) if fixed else _f(params, "shaft.rpm_max", 0)
    mtop = top_of(fault_frequencies(rpm_top / 60, *geom)["bpfi"])
    capacity = max(1, min(windows, RING_FLOATS // (channels * (mtop + 1))))
    if state.diag_shape != (n, fs, channels):
        state.diag_ring, state.diag_shape, state.diag_bands = [], (n, fs, channels), []
    window_s = n / fs
    t = start_ns / 1e9 if start_ns > 0 else seq * window_s     # no start times: windows taken as not overlapping
    if state.diag_ring and state.diag_last and 0 <= t - state.diag_ring[-1][2] < window_s - 0.5 / fs:   # whole-ns times
        return dict(state.diag_last)    # overlaps the last diagnosed window: its verdict stands
    if kurtogram:   # chosen when the ring starts and each time it has turned over until two choices agree;
        # a new band restarts the ring
        if not state.diag_ring or len(state.diag_bands) != channels or \
                (not state.diag_band_confirmed and state.diag_band_age >= capacity):
            turnover = bool(state.diag_ring)
            tapered = [tapered_spectrum(x[c]) for c in range(channels)]
            bands = [kurtogram_band(tapered[c], n, bw, fs, ff_track["bpfi"], whiten, band0) for c in range(channels)]
            changed = bands != state.diag_bands
            if changed:
                state.diag_ring = []
            state.diag_band_confirmed = turnover and not changed
            state.diag_bands, state.diag_band_age = bands, 0
        state.diag_band_age += 1
        bands = state.diag_bands
    else:
        bands = [band0] * channels
    power = np.stack([diag_spectrum(spectra[c], n, *bands[c], squared, whiten)[:mtop + 1]
                      for c in range(channels)]).astype(np.float32)
    state.diag_ring = (state.diag_ring + [(power, fr_window, t)])[-capacity:]
    cnt = len(state.diag_ring)
    fr = fr_window if fixed else float(np.median([s for _, s, _ in state.diag_ring]))
    ff = fault_frequencies(fr, *geom)
    ff["fr"] = fr
    top = min(top_of(ff["bpfi"]), mtop)
    mean = (np.sum([p.astype(np.float64) for p, _, _ in state.diag_ring], axis=0) / cnt).astype(np.float32)
    dof = diagnosis_dof([tt for _, _, tt in state.diag_ring], window_s)
    lines, predicted = diag_carriers(ff, bw, top)
    per = [channel_confidences(mean[c].astype(np.float64), top, bw, ff, lines, predicted, dof)
           for c in range(channels)]
    conf = {kd: max(pc[kd][0] for pc in per) for kd in KINDS}
    best = max(KINDS, key=lambda kd: (conf[kd], -KINDS.index(kd)))
    runner = max((kd for kd in KINDS if kd != best), key=lambda kd: (conf[kd], -KINDS.index(kd)))
    best_c = max(range(channels), key=lambda c: (per[c][best][0], -c))
    signature = per[best_c][best][3]
    named = signature >= SIGNATURE_LIKELY and conf[best] >= _f(params, "diagnosis.min_confidence", 0.3) and \
        conf[best] - conf[runner] >= _f(params, "diagnosis.margin", 0.1)
    show, show_c = best, best_c            # the line the event shows: the named part's, else the most prominent
    if not named:
        for c in range(channels):
            for kd in KINDS:
                if per[c][kd][2] > per[show_c][show][2]:
                    show, show_c = kd, c
    state.diag_last = {"diagnosis": DIAGNOSIS_CODE[best] if named else 0, "diagnosis.confidence": conf[best],
            "diagnosis.peak_hz": per[show_c][show][1], "diagnosis.method": 1 if named else 0,
            "diagnosis.windows": cnt, "diagnosis.dof": dof, "diagnosis.band_lo_hz": bands[show_c][0] * bw,
            "diagnosis.band_hi_hz": (bands[show_c][1] + 1) * bw, **{f"conf.{kd}": conf[kd] for kd in KINDS},
            "diagnosis.channel": show_c, "diagnosis.shaft_hz": fr, "diagnosis.squared": int(squared),
            "diagnosis.whitened": int(whiten), "diagnosis.signature_p": signature}
    return dict(state.diag_last)


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
