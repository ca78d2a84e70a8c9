"""The envelope spectrum of a bearing event as a PNG, drawn with OpenCV (the gateway has it for the
cameras; no plotting stack): the spectrum in dB over its noise floor, the fault-frequency families
as marked lines (BPFO, BPFI, 2xBSF, FTF and their harmonics; the named part's sidebands), the
line the diagnosis rests on circled, and the band, speed and verdict written out, so that a
vibration analyst can check the diagnosis from the picture alone."""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

WIDTH, HEIGHT = 1100, 620
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 118, 60
DB_LO, DB_HI = -10.0, 40.0
# BGR colours of the families (colour-blind-safe hues), the spectrum, the grid
COLORS = {"BPFO": (178, 114, 0), "BPFI": (0, 94, 213), "2xBSF": (115, 158, 0), "FTF": (167, 121, 204),
          "shaft": (140, 140, 140)}
INK, GRID, SPECTRUM = (30, 30, 30), (225, 225, 225), (60, 60, 60)
FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass
class Marker:
    family: str                 # BPFO, BPFI, 2xBSF, FTF, shaft
    hz: float
    label: str
    sideband: bool = False


@dataclass
class EnvelopePlot:
    freqs: np.ndarray           # Hz
    db: np.ndarray              # amplitude over the floor, dB
    markers: list[Marker]
    title: str
    lines: list[str] = field(default_factory=list)    # written under the title
    peak_hz: float | None = None
    peak_label: str = ""


def render_png(plot: EnvelopePlot) -> bytes:
    img = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM
    fmax = float(plot.freqs[-1]) if len(plot.freqs) else 1.0

    def px(hz: float) -> int:
        return int(round(x0 + (x1 - x0) * hz / fmax))

    def py(db: float) -> int:
        db = min(max(db, DB_LO), DB_HI)
        return int(round(y1 - (y1 - y0) * (db - DB_LO) / (DB_HI - DB_LO)))

    for db in range(int(DB_LO), int(DB_HI) + 1, 10):               # grid and dB axis
        cv2.line(img, (x0, py(db)), (x1, py(db)), GRID, 1)
        cv2.putText(img, f"{db:+d}", (x0 - 44, py(db) + 5), FONT, 0.45, INK, 1, cv2.LINE_AA)
    step = _nice_step(fmax / 10)
    hz = 0.0
    while hz <= fmax + 1e-9:                                        # frequency axis
        cv2.line(img, (px(hz), y1), (px(hz), y1 + 5), INK, 1)
        text = f"{hz:g}"
        cv2.putText(img, text, (px(hz) - 4 * len(text), y1 + 20), FONT, 0.45, INK, 1, cv2.LINE_AA)
        hz += step
    cv2.putText(img, "frequency (Hz)", ((x0 + x1) // 2 - 60, HEIGHT - 16), FONT, 0.5, INK, 1, cv2.LINE_AA)
    cv2.putText(img, "dB over floor", (6, y0 - 8), FONT, 0.42, INK, 1, cv2.LINE_AA)
    cv2.rectangle(img, (x0, y0), (x1, y1), INK, 1)

    for m in plot.markers:                                          # fault-frequency markers
        if not 0 < m.hz <= fmax:
            continue
        color = COLORS.get(m.family, INK)
        x = px(m.hz)
        if m.family == "shaft":                                     # shaft harmonics: ticks on the axis
            cv2.line(img, (x, y1 - 12), (x, y1), color, 2)
            if m.label:
                cv2.putText(img, m.label, (x - 6, y1 - 16), FONT, 0.4, color, 1, cv2.LINE_AA)
        elif m.sideband:
            for y in range(y0, y1, 10):
                cv2.line(img, (x, y), (x, min(y + 4, y1)), color, 1)
        else:
            for y in range(y0, y1, 6):
                cv2.line(img, (x, y), (x, min(y + 3, y1)), color, 2)
            row = {"BPFO": 0, "BPFI": 1, "2xBSF": 2, "FTF": 3}.get(m.family, 0)   # a row each: labels never overlap
            cv2.putText(img, m.label, (x + 3, y0 + 14 + 14 * row), FONT, 0.42, color, 1, cv2.LINE_AA)

    pts = np.stack([[px(f) for f in plot.freqs], [py(d) for d in plot.db]], axis=1).astype(np.int32)
    cv2.polylines(img, [pts], False, SPECTRUM, 1, cv2.LINE_AA)     # the spectrum

    if plot.peak_hz and 0 < plot.peak_hz <= fmax:                   # the line the verdict rests on
        i = int(np.argmin(np.abs(plot.freqs - plot.peak_hz)))
        c = (px(plot.freqs[i]), py(plot.db[i]))
        cv2.circle(img, c, 9, (0, 0, 220), 2, cv2.LINE_AA)
        cv2.putText(img, plot.peak_label, (min(c[0] + 12, x1 - 8 * len(plot.peak_label)), max(c[1] - 10, y0 + 14)),
                    FONT, 0.5, (0, 0, 220), 1, cv2.LINE_AA)

    cv2.putText(img, plot.title, (x0, 26), FONT, 0.6, INK, 1, cv2.LINE_AA)
    for i, text in enumerate(plot.lines[:3]):
        cv2.putText(img, text, (x0, 46 + 16 * i), FONT, 0.43, INK, 1, cv2.LINE_AA)
    legend_x = x1 - 420
    for i, (family, color) in enumerate(list(COLORS.items()) + [("sidebands", INK)]):
        lx = legend_x + 70 * i
        if family == "sidebands":
            for k in range(0, 16, 6):
                cv2.line(img, (lx + k, y0 - 12), (lx + k + 3, y0 - 12), color, 1)
        else:
            cv2.line(img, (lx, y0 - 12), (lx + 14, y0 - 12), color, 2)
        cv2.putText(img, family, (lx + 17, y0 - 8), FONT, 0.38, color, 1, cv2.LINE_AA)
    ok, png = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise ValueError("PNG encoding failed")
    return png.tobytes()


def _nice_step(raw: float) -> float:
    if raw <= 0:
        return 1.0
    exp = 10 ** np.floor(np.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * exp:
            return float(m * exp)
    return float(10 * exp)
