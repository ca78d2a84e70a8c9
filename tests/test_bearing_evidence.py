"""envelope.png, the picture of a bearing event (issue 18, item 4): drawn on the host from the
triggering window and the module's features, beside window.npy; written by `appliance events
--save-attachments`; never at the cost of the event's samples."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml

from appliance.events import evidence

from conftest import REPO, shared_file
from test_bearing_diagnosis import PARAMS, RPM, fault_signal
from test_bearing_module import Bearing, wasm  # noqa: F401

FS, N = 12000.0, 4096


def event_window(wasm_bytes: bytes, kind: str) -> tuple[np.ndarray, dict]:
    """A synthetic fault after a healthy baseline: the window of the first alarm and its features."""
    m = Bearing(wasm_bytes, PARAMS, True)
    seq = 0
    for x in (fault_signal("healthy", FS, 11 * N / FS, seed=1), fault_signal(kind, FS, 8 * N / FS, seed=2)):
        for i in range(0, len(x) - N + 1, N):
            w = x[i:i + N][None].astype(np.float32)
            before = len(m.events)
            assert m.process(w, FS, seq) == 0
            seq += 1
            if len(m.events) > before:
                return w, dict(m.features)
    raise AssertionError("no event")


def test_an_inner_race_event_carries_its_envelope_spectrum(wasm):  # noqa: F811
    import cv2
    w, features = event_window(wasm, "inner")
    assert features["diagnosis"] == 2
    atts = evidence.attachments(w, None, features, max_bytes=256 << 10, attach_window=True, sample_rate=FS)
    assert [a.name for a in atts] == ["window.npy", "envelope.png"]
    png = atts[1]
    assert png.content_type == "image/png" and png.data[:8] == b"\x89PNG\r\n\x1a\n"
    img = cv2.imdecode(np.frombuffer(png.data, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (620, 1100, 3)
    assert (img == (0, 0, 220)).all(axis=2).sum() > 20      # the named line is circled in red
    # What the picture plots: the squared envelope spectrum of the module's band, whose strongest
    # line below 1 kHz is BPFI at the diagnosis's speed.
    freqs, amp = evidence.envelope_spectrum(w[0], FS, features["diagnosis.band_lo_hz"], features["diagnosis.band_hi_hz"],
                                            bool(features["diagnosis.squared"]))
    bpfi = features["bpfi_hz"] * features["diagnosis.shaft_hz"] / features["shaft_hz"]
    sel = (freqs > 20) & (freqs < 1000)
    assert abs(freqs[sel][np.argmax(amp[sel])] - bpfi) < 2 * (freqs[1] - freqs[0])
    assert abs(features["diagnosis.peak_hz"] - bpfi) < 0.02 * bpfi
    assert features["diagnosis.shaft_hz"] * 60 == pytest.approx(RPM, rel=0.01)


def test_no_picture_without_a_diagnosis_and_no_lost_samples_when_it_fails(wasm, monkeypatch):  # noqa: F811
    w, features = event_window(wasm, "outer")
    plain = {k: v for k, v in features.items() if not k.startswith("diagnosis.band")}
    assert [a.name for a in evidence.attachments(w, None, plain, max_bytes=256 << 10, attach_window=True,
                                                 sample_rate=FS)] == ["window.npy"]

    def broken(*args, **kwargs):
        raise RuntimeError("no drawing today")
    monkeypatch.setattr(evidence, "envelope_png", broken)
    atts = evidence.attachments(w, None, features, max_bytes=256 << 10, attach_window=True, sample_rate=FS)
    assert [a.name for a in atts] == ["window.npy"]


@pytest.mark.parametrize("name, value", [("diagnosis.shaft_hz", 1e-9), ("shaft_hz", float("nan")),
                                         ("bpfi_hz", 1e12), ("diagnosis.band_hi_hz", 1e9), ("ftf_hz", -1.0)])
def test_a_module_s_numbers_cannot_make_the_supervisor_draw_forever(wasm, name, value):  # noqa: F811
    """The features come from the sandbox and the picture is drawn in the supervisor: a shaft
    rate of 1e-9 Hz would ask for 1e12 ticks. Refused with the reason; the event keeps its samples."""
    w, features = event_window(wasm, "inner")
    hostile = {**features, name: value}
    with pytest.raises(ValueError, match=name.replace(".", r"\.") if name != "diagnosis.band_hi_hz" else "band"):
        evidence.check_drawable(hostile, FS)
    atts = evidence.attachments(w, None, hostile, max_bytes=256 << 10, attach_window=True, sample_rate=FS)
    assert [a.name for a in atts] == ["window.npy"]


def test_appliance_events_saves_the_picture(tmp_path):
    """The CWRU config as it ships (baseline on the healthy recording, then the inner-race fault)
    through `appliance run`, then `appliance events --save-attachments`."""
    shared_file("bearing", "cwru", "inner_race_007_0hp_12k.mat")
    doc = yaml.safe_load((REPO / "configs" / "cwru-eval.yaml").read_text())
    data = REPO.parent / "shared" / "data" / "bearing" / "cwru"
    for seg in doc["sources"]["drive_end"]["segments"]:
        seg["path"] = str(data / seg["path"].rsplit("/", 1)[-1])
    doc["modules"]["bearing"]["wasm"] = str(REPO / "modules" / "build" / "bearing.wasm")
    doc["gateway"]["data_dir"] = str(tmp_path / "var")
    cfg = tmp_path / "cwru.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    run = [sys.executable, "-m", "appliance"]
    subprocess.run(run + ["run", "--config", str(cfg), "--until-end"], check=True, capture_output=True, timeout=300)
    out = subprocess.run(run + ["events", "--config", str(cfg), "--save-attachments", str(tmp_path / "ev")],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    saved = sorted(p.name.split("-", 5)[-1] for p in (tmp_path / "ev").iterdir())
    assert saved == ["envelope.png", "window.npy"], out
    assert "inner race" in out


def test_the_picture_marks_what_the_diagnosis_tests_and_says_what_it_shows(wasm):  # noqa: F811
    """Review 1, finding 11: for an inner race the +-2 fr sidebands the rule uses are drawn too
    (the strongest one, BPFI - 2 fr, sat unmarked 5 Hz from the BPFO marker); the races' harmonics
    up to 5 x BPFI, as the rule tests them; the labels each on their family's row, FTF's harmonics
    unlabelled (they overlapped); the picture says it shows one window while the verdict rests on
    the mean of several."""
    w, features = event_window(wasm, "inner")
    plot = evidence.envelope_plot(w, FS, features)
    fr = features["diagnosis.shaft_hz"]
    bpfi = features["bpfi_hz"] * fr / features["shaft_hz"]
    sidebands = sorted(m.hz for m in plot.markers if m.sideband and m.family == "BPFI")
    for h in range(1, 6):
        for k in (-2, -1, 1, 2):
            assert any(abs(hz - (h * bpfi + k * fr)) < 1e-6 for hz in sidebands), (h, k)
    assert [m.label for m in plot.markers if m.family == "BPFI" and not m.sideband] == ["BPFI", "2x", "3x", "4x", "5x"]
    assert [m.label for m in plot.markers if m.family == "FTF"] == ["FTF", "", ""]
    assert all(not m.label for m in plot.markers if m.family == "shaft")
    several = {**features, "diagnosis.windows": 8}
    assert "the verdict rests on the mean of 8 windows' spectra, not drawn" in evidence.envelope_plot(w, FS, several).lines[0]
    assert "spectrum alone" in plot.lines[0]


def test_a_picture_over_the_size_limit_is_said_and_counted(wasm, caplog):  # noqa: F811
    """Review 1, finding 11: a PNG over the attachment limit was dropped without a word."""
    w, features = event_window(wasm, "inner")
    told = []
    atts = evidence.attachments(w, None, features, max_bytes=32 << 10, attach_window=False, sample_rate=FS,
                                dropped=lambda name, why: told.append((name, why)))
    assert atts == [] and told == [("envelope.png", "too_large")]
    assert "over the attachment limit" in caplog.text
