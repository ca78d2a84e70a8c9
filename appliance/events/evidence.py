"""What travels with an event as its evidence: the camera frame with the module's boxes drawn
(cameras), or the samples of the triggering window (sensors), within the size limit; and for a
bearing diagnosis, the envelope spectrum of the triggering window as a picture (envelope.png)."""
from __future__ import annotations

import io
import logging
import math

import numpy as np

from appliance.events.record import Attachment

log = logging.getLogger("appliance.evidence")

# A module that diagnoses bearings says so with these features (the bearing module does): the band
# it demodulated, the speed its fault frequencies are of, and those frequencies at the window's
# speed (their ratios to shaft_hz are the bearing's geometry).
ENVELOPE_FEATURES = ("diagnosis.band_lo_hz", "diagnosis.band_hi_hz", "diagnosis.shaft_hz", "shaft_hz", "bpfo_hz",
                     "bpfi_hz", "bsf_hz", "ftf_hz")
PART_WORDS = {1: "outer race", 2: "inner race", 3: "rolling element", 4: "cage"}
METHOD_WORDS = {1: "envelope signature", 2: "bearing_cnn"}


def boxes_from_features(features: dict[str, float], limit: int = 16) -> list[tuple[int, int, int, int]]:
    """The module's boxes by the ABI's naming: box<i>.x, .y, .w, .h (pixels of its frame)."""
    boxes = []
    for i in range(limit):
        keys = [f"box{i}.{k}" for k in "xywh"]
        if not all(k in features for k in keys):
            break
        x, y, w, h = (features[k] for k in keys)
        if all(v == v for v in (x, y, w, h)) and w > 0 and h > 0:
            boxes.append((int(x), int(y), int(w), int(h)))
    return boxes


def attachments(data: np.ndarray, image: tuple[int, int] | None, features: dict[str, float], *, max_bytes: int,
                attach_window: bool, sample_rate: float = 0.0, dropped=None) -> list[Attachment]:
    """data: the window as the module got it (channels, frames), image: its (height, width) for
    a camera frame. A snapshot for a frame; the middle of the window as window.npy otherwise, and
    envelope.png where the features hold a bearing diagnosis (ENVELOPE_FEATURES). dropped(name,
    reason), if given, is told of a picture the event goes without (the supervisor counts it)."""
    if image is not None:
        from hal.drivers.camera.jpeg import jpeg_snapshot   # OpenCV stays in hal/
        jpg = jpeg_snapshot(data, image, boxes_from_features(features), max_bytes=max_bytes)
        return [Attachment("snapshot.jpg", "image/jpeg", jpg)]
    out = []
    if attach_window:
        window = data
        frames = max(1, (max_bytes - 256) // (data.shape[0] * data.itemsize))
        if window.shape[1] > frames:   # keep the middle of the window: around what triggered it
            start = (window.shape[1] - frames) // 2
            window = window[:, start:start + frames]
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(window), allow_pickle=False)
        out.append(Attachment("window.npy", "application/x-npy", buf.getvalue()))
    if all(features.get(k, 0) > 0 for k in ENVELOPE_FEATURES) and sample_rate:
        try:   # the picture must never cost the event its samples
            png = envelope_png(data, sample_rate, features)
            if len(png) <= max_bytes:
                out.append(Attachment("envelope.png", "image/png", png))
            else:
                log.warning("envelope.png is %d bytes, over the attachment limit of %d; the event goes without it",
                            len(png), max_bytes)
                if dropped:
                    dropped("envelope.png", "too_large")
        except Exception as exc:
            log.error("envelope.png could not be drawn (%s: %s); the event goes without it", type(exc).__name__, exc)
            if dropped:
                dropped("envelope.png", "failed")
    return out


def envelope_spectrum(x: np.ndarray, fs: float, lo_hz: float, hi_hz: float, squared: bool = False,
                      whitened: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The envelope spectrum of the band [lo, hi) Hz of x as the bearing module computes its
    diagnostic one (the analytic signal of the band, whitened or not; |z| or |z|^2, mean removed):
    (Hz, amplitude)."""
    n = len(x)
    X = np.fft.rfft(np.asarray(x, np.float64) - np.mean(x))
    bw = fs / n
    k0, k1 = max(1, int(round(lo_hz / bw))), min(n // 2 - 1, int(round(hi_hz / bw)) - 1)
    band = X[k0:k1 + 1]
    if whitened:
        mag = np.abs(band)
        band = np.where(mag > 0, band / np.where(mag > 0, mag, 1), 0)
    z = np.zeros(n, np.complex128)
    z[k0:k1 + 1] = 2 * band
    e = np.abs(np.fft.ifft(z))
    if squared:
        e = e * e
    E = np.abs(np.fft.rfft(e - e.mean())) * 2 / n
    return np.arange(len(E)) * bw, E


MAX_SHAFT_TICKS = 64          # shaft-rate ticks drawn at most (5.5 x BPFI is about 30 for common bearings)


def check_drawable(features: dict[str, float], fs: float) -> None:
    """The module's numbers, before the host draws with them: they come from the sandbox, and the
    drawing runs in the supervisor, outside the worker's deadline and memory cap. ValueError with
    what is wrong (the event then goes without the picture)."""
    names = ("diagnosis.band_lo_hz", "diagnosis.band_hi_hz", "diagnosis.shaft_hz", "shaft_hz", "bpfo_hz",
             "bpfi_hz", "bsf_hz", "ftf_hz")
    for name in names:
        value = features.get(name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"feature {name} is {value!r}, not a finite number")
    nyquist = fs / 2
    for name in ("diagnosis.shaft_hz", "shaft_hz"):
        if not 0 < features[name] <= nyquist:
            raise ValueError(f"feature {name} = {features[name]:g} Hz is outside (0, {nyquist:g}]")
    if not 0.5 <= features["diagnosis.shaft_hz"] / features["shaft_hz"] <= 2:   # a tracked speed, not another machine
        raise ValueError(f"feature diagnosis.shaft_hz = {features['diagnosis.shaft_hz']:g} Hz is far from the "
                         f"window's shaft_hz = {features['shaft_hz']:g} Hz")
    for name in ("bpfo_hz", "bpfi_hz", "bsf_hz", "ftf_hz"):   # geometry allows 0.05..50 x shaft for any bearing
        ratio = features[name] / features["shaft_hz"]
        if not 0.05 <= ratio <= 50:
            raise ValueError(f"feature {name} is {ratio:g} x the shaft rate (0.05..50 expected)")
    if not 0 < features["diagnosis.band_lo_hz"] < features["diagnosis.band_hi_hz"] <= nyquist:
        raise ValueError(f"band {features['diagnosis.band_lo_hz']:g}-{features['diagnosis.band_hi_hz']:g} Hz "
                         f"is not inside (0, {nyquist:g}]")


def envelope_png(data: np.ndarray, fs: float, features: dict[str, float]) -> bytes:
    """envelope.png: the triggering window's envelope spectrum as the module made its diagnostic
    one (band, squared or not, whitened or not), with the fault-frequency families at the
    diagnosis's speed and the named line."""
    from hal.drivers.vibration.spectrum_png import render_png   # OpenCV stays in hal/
    return render_png(envelope_plot(data, fs, features))


def envelope_plot(data: np.ndarray, fs: float, features: dict[str, float]):
    """What envelope.png draws (hal.drivers.vibration.spectrum_png.EnvelopePlot)."""
    from hal.drivers.vibration.spectrum_png import EnvelopePlot, Marker
    check_drawable(features, fs)
    ch = int(features.get("diagnosis.channel", 0))
    ch = ch if 0 <= ch < data.shape[0] else 0
    lo, hi = features["diagnosis.band_lo_hz"], features["diagnosis.band_hi_hz"]
    squared, whitened = bool(features.get("diagnosis.squared", 0)), bool(features.get("diagnosis.whitened", 0))
    freqs, amp = envelope_spectrum(data[ch], fs, lo, hi, squared, whitened)
    fr = features["diagnosis.shaft_hz"]
    scale = fr / features["shaft_hz"]                     # the module's frequencies at the diagnosis's speed
    f = {"BPFO": features["bpfo_hz"] * scale, "BPFI": features["bpfi_hz"] * scale,
         "2xBSF": 2 * features["bsf_hz"] * scale, "FTF": features["ftf_hz"] * scale}
    top = min(5.5 * f["BPFI"], freqs[-1])
    keep = (freqs <= top)
    bw = freqs[1] - freqs[0]
    floor_bins = (freqs >= 2 * bw) & (freqs <= 5 * f["BPFI"])
    floor = float(np.median(amp[floor_bins])) if floor_bins.any() else float(np.median(amp[1:]))
    db = 20 * np.log10(np.maximum(amp[keep], 1e-30) / max(floor, 1e-30))
    # the lines the diagnosis tests: a race's harmonics up to 5 x BPFI, the ball's and the cage's first three
    markers = []
    for name, base in f.items():
        hmax = max(1, int(5 * f["BPFI"] / base)) if name in ("BPFO", "BPFI") else 3
        for h in range(1, hmax + 1):
            markers.append(Marker(name, h * base, name if h == 1 else "" if name == "FTF" else f"{h}x"))
    code = int(features.get("diagnosis", 0))
    if code == 2:      # the named part's sidebands, for the eye to check: +-fr and +-2 fr at each harmonic
        markers += [Marker("BPFI", m.hz + s * k * fr, "", sideband=True) for m in list(markers) if m.family == "BPFI"
                    for k in (1, 2) for s in (-1, 1)]
    elif code == 3:
        markers += [Marker("2xBSF", h * f["2xBSF"] + s * f["FTF"], "", sideband=True) for h in (1, 2, 3)
                    for s in (-1, 1)]
    elif code == 1:    # an outer-race fault has none: show where they would be
        markers += [Marker("BPFO", m.hz + s * fr, "", sideband=True) for m in list(markers) if m.family == "BPFO"
                    for s in (-1, 1)]
    markers += [Marker("shaft", h * fr, "") for h in range(1, min(int(top / fr), MAX_SHAFT_TICKS) + 1)]
    part = PART_WORDS.get(code, "unspecified")
    method = METHOD_WORDS.get(int(features.get("diagnosis.method", 0)), "")
    conf = features.get("diagnosis.confidence", 0.0)
    kind = ("squared envelope" if squared else "envelope") + (" (cepstrum pre-whitened)" if whitened else "")
    title = f"bearing {kind} spectrum, ch{ch}: {part}" + (f" ({method}, {conf:.2f})" if code else "")
    confs = ", ".join(f"{k} {features[f'conf.{k}']:.2f}" for k in ("outer", "inner", "ball", "cage")
                      if f"conf.{k}" in features)
    windows = int(features.get("diagnosis.windows", 1))
    averaged = "" if windows <= 1 else f"; the verdict rests on the mean of {windows} windows' spectra, not drawn"
    lines = [f"this window's spectrum alone ({data.shape[1]} samples at {fs:g} Hz{averaged}), "
             f"band {lo:.0f}-{hi:.0f} Hz, shaft {fr:.2f} Hz ({fr * 60:.0f} rpm); 0 dB: median up to 5 x BPFI",
             f"BPFO {f['BPFO']:.1f}  BPFI {f['BPFI']:.1f}  2xBSF {f['2xBSF']:.1f}  FTF {f['FTF']:.2f} Hz;  "
             f"signature confidences: {confs}"]
    if "cnn.slices" in features and features.get("cnn.slices", 0) > 0:
        lines.append("bearing_cnn: " + ", ".join(f"{k} {features.get(f'cnn.{k}', 0):.2f}"
                                                  for k in ("normal", "inner", "outer", "ball")))
    peak = features.get("diagnosis.peak_hz", 0.0)
    label = f"{peak:.1f} Hz" if peak > 0 else ""
    if not math.isfinite(peak):
        peak = 0.0
    return EnvelopePlot(freqs[keep], db, markers, title, lines, peak or None, label)
