"""Bearing fault frequencies, the simulated vibration source and the replay source."""
from __future__ import annotations

import time
import wave
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import signal

from hal.sim.bearing import CWRU_DRIVE_END, BearingGeometry
from hal.registry import SOURCE_TYPES, load_builtin_sources, open_source
from hal.source import Health
from hal.sources.replay import ReplayConfig, ReplaySource
from hal.sources.sim_vibration import SimVibrationConfig, SimVibrationSource

from conftest import shared_file


# ------------------------------------------------------------------ helpers / fixtures

def sim(**overrides) -> SimVibrationSource:
    cfg = SimVibrationConfig.model_validate({"type": "sim_vibration", "realtime": False, **overrides})
    src = SimVibrationSource("spindle", cfg)
    src.open()
    return src


def take_seconds(src, seconds: float) -> np.ndarray:
    frames = round(seconds * src.info.sample_rate)
    parts, have = [], 0
    while have < frames:
        block = src.read()
        parts.append(block.data)
        have += block.frames
    return np.concatenate(parts, axis=1)[:, :frames]


def replay(**overrides) -> ReplaySource:
    cfg = ReplayConfig.model_validate({"type": "replay", **overrides})
    return ReplaySource("rec", cfg)


def read_all(src) -> list:
    blocks = []
    while (block := src.read()) is not None:
        blocks.append(block)
        assert len(blocks) < 100_000
    return blocks


def write_wav(path: Path, ints: np.ndarray, width: int, rate: int) -> None:
    """ints: (frames, channels) integers in the range of `width` bytes."""
    frames, channels = ints.shape
    if width == 3:
        u = ints.astype(np.int64) & 0xFFFFFF
        raw = np.stack([u & 0xFF, (u >> 8) & 0xFF, (u >> 16) & 0xFF], axis=-1).astype(np.uint8).tobytes()
    else:
        raw = ints.astype({2: "<i2", 4: "<i4"}[width]).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)


@pytest.fixture
def ramp_npy(tmp_path) -> tuple[Path, np.ndarray]:
    data = np.stack([np.arange(5000, dtype=np.float64), -np.arange(5000, dtype=np.float64)], axis=1) / 1000
    path = tmp_path / "ramp.npy"
    np.save(path, data)
    return path, data


# ------------------------------------------------------------------ bearing

def test_cwru_drive_end_fault_orders():
    orders = BearingGeometry(balls=9, ball_diameter=0.3126, pitch_diameter=1.537).fault_orders()
    # The multiples CWRU publishes for the 6205-2RS JEM drive-end bearing.
    assert orders["BPFI"] == pytest.approx(5.4152, rel=1e-4)
    assert orders["BPFO"] == pytest.approx(3.5848, rel=1e-4)
    assert orders["FTF"] == pytest.approx(0.39828, rel=2e-4)
    assert orders["BSF"] == pytest.approx(2.3568, rel=2e-4)
    assert CWRU_DRIVE_END.fault_orders() == orders


def test_fault_frequencies_in_hz_and_contact_angle():
    hz = CWRU_DRIVE_END.fault_frequencies(1797 / 60)
    assert hz["BPFO"] == pytest.approx(3.5848 * 29.95, rel=1e-4)
    assert hz["BPFI"] + hz["BPFO"] == pytest.approx(9 * 29.95)  # n * fr whatever the geometry
    tilted = BearingGeometry(balls=9, ball_diameter=0.3126, pitch_diameter=1.537, contact_angle_deg=40)
    assert tilted.fault_orders()["BPFO"] > CWRU_DRIVE_END.fault_orders()["BPFO"]
    with pytest.raises(ValueError):
        CWRU_DRIVE_END.fault_frequencies(0)


@pytest.mark.parametrize("bad", [
    dict(balls=0, ball_diameter=1, pitch_diameter=5),
    dict(balls=9, ball_diameter=2, pitch_diameter=1),
    dict(balls=9, ball_diameter=1, pitch_diameter=5, contact_angle_deg=90),
    dict(balls=9, ball_diameter=1, pitch_diameter=5, extra=1),
])
def test_bearing_geometry_rejects(bad):
    with pytest.raises(ValidationError):
        BearingGeometry(**bad)


# ------------------------------------------------------------------ sim_vibration: config

def test_sim_registered_and_defaults():
    load_builtin_sources()
    assert SOURCE_TYPES["sim_vibration"] == (SimVibrationSource, SimVibrationConfig)
    cfg = SimVibrationConfig(type="sim_vibration")
    src = open_source("spindle", cfg)
    assert isinstance(src, SimVibrationSource)
    info = src.info
    assert (info.kind, info.units, info.channels, info.sample_rate) == ("vibration", "g", ("x", "y", "z"), 12800)
    assert src.health[0] is Health.STARTING
    src.open()
    assert src.health[0] is Health.OK


@pytest.mark.parametrize("bad, words", [
    ({"fault": {"type": "outer_race", "resonance_hz": 7000}}, "Nyquist"),
    ({"axes": ["x", "x"]}, "unique"),
    ({"axes": []}, "at least 1"),
    ({"axes": list("abcdefghi")}, "at most 8"),
    ({"axis_gain": [1.0, 2.0]}, "axis_gain"),
    ({"fault": {"type": "cage"}}, "outer_race"),
    ({"fault": {"type": "inner_race", "damping_ratio": 1.0}}, "less than 1"),
    ({"noise_g": -1}, "greater than or equal"),
    ({"sample_rat": 100}, "extra"),
])
def test_sim_config_rejects(bad, words):
    with pytest.raises(ValidationError) as exc:
        SimVibrationConfig.model_validate({"type": "sim_vibration", **bad})
    assert words.lower() in str(exc.value).lower()


# ------------------------------------------------------------------ sim_vibration: signal

def test_sim_blocks_shape_dtype_and_timestamps():
    src = sim(sample_rate=12800, block_s=0.05)
    blocks = [src.read() for _ in range(20)]
    assert all(b.data.shape == (3, 640) and b.data.dtype == np.float32 for b in blocks)
    assert [b.index for b in blocks] == [640 * i for i in range(20)]
    starts = np.array([b.start_ns for b in blocks])
    assert np.all(np.diff(starts) > 0)
    assert np.abs(np.diff(starts) - 640 * 1e9 / 12800).max() <= 1
    assert abs(starts[0] - time.time_ns()) < 5e9  # Unix epoch, not a monotonic origin


def test_sim_deterministic_for_a_seed():
    a = take_seconds(sim(seed=7, fault={"type": "inner_race"}), 0.3)
    b = take_seconds(sim(seed=7, fault={"type": "inner_race"}), 0.3)
    c = take_seconds(sim(seed=8, fault={"type": "inner_race"}), 0.3)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("fault", [None, {"type": "outer_race", "start_s": 0.13}, {"type": "inner_race"}])
def test_sim_independent_of_block_size(fault):
    # Noise, jitter and ring-downs are functions of the sample index, so cutting the stream
    # differently must not change a single sample (that is what "continuous" means here).
    a = take_seconds(sim(block_s=0.05, fault=fault), 1.0)
    b = take_seconds(sim(block_s=0.1, fault=fault), 1.0)
    c = take_seconds(sim(block_s=0.0123, fault=fault), 1.0)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a, c, rtol=0, atol=1e-6)


def test_sim_no_spike_at_block_boundaries():
    x = take_seconds(sim(noise_g=0.0, block_s=0.05), 1.0)
    step = np.abs(np.diff(x.astype(np.float64), axis=1))
    boundaries = np.arange(640, x.shape[1], 640) - 1
    interior = np.delete(step, boundaries, axis=1)
    assert np.all(step[:, boundaries].max(axis=1) <= interior.max(axis=1))
    # A 1x..3x harmonic sum changes by at most 2*pi*f*A/fs per sample.
    assert step.max() < 2 * np.pi * 3 * 30 * 0.063 / 12800 * 3


def test_sim_levels_gains_and_harmonics():
    x = take_seconds(sim(noise_g=0.0), 2.0).astype(np.float64)
    rms = np.sqrt((x ** 2).mean(axis=1))
    expected = np.sqrt(0.5 * (0.04 ** 2 + 0.015 ** 2 + 0.008 ** 2)) * np.array([1, 0.8, 0.5])
    np.testing.assert_allclose(rms, expected, rtol=0.02)
    spec = np.abs(np.fft.rfft(x[0] * np.hanning(x.shape[1])))
    f = np.fft.rfftfreq(x.shape[1], 1 / 12800)
    assert abs(f[np.argmax(spec)] - 1797 / 60) < 1.0
    noisy = take_seconds(sim(harmonics_g=[], noise_g=0.05), 1.0)
    assert noisy.std(axis=1) == pytest.approx([0.05] * 3, rel=0.05)


def test_sim_fault_starts_at_start_s():
    x = take_seconds(sim(noise_g=0.0, harmonics_g=[], fault={"type": "outer_race", "start_s": 0.5}), 1.0)
    assert np.abs(x[:, :6400]).max() == 0
    assert np.abs(x[0, 6400:]).max() > 0.3


def envelope_peak_hz(x: np.ndarray, fs: float, band: tuple[float, float]) -> float:
    sos = signal.butter(4, band, btype="bandpass", fs=fs, output="sos")
    env = np.abs(signal.hilbert(signal.sosfiltfilt(sos, x.astype(np.float64))))
    env -= env.mean()
    spec = np.abs(np.fft.rfft(env * np.hanning(env.size)))
    f = np.fft.rfftfreq(env.size, 1 / fs)
    keep = (f > 5) & (f < 500)
    return float(f[keep][np.argmax(spec[keep])])


@pytest.mark.parametrize("kind, order", [("outer_race", "BPFO"), ("inner_race", "BPFI")])
def test_sim_fault_envelope_spectrum_peaks_at_fault_frequency(kind, order):
    src = sim(noise_g=0.01, fault={"type": kind})
    x = take_seconds(src, 2.0)
    expected = CWRU_DRIVE_END.fault_frequencies(1797 / 60)[order]
    assert src.fault_hz == pytest.approx(expected)
    peak = envelope_peak_hz(x[0], 12800, (2000, 4000))
    assert abs(peak - expected) <= 0.01 * expected


def test_sim_realtime_is_paced():
    src = sim(realtime=True, block_s=0.05)
    t0 = time.monotonic()
    for _ in range(10):  # 0.5 s of data
        src.read()
    elapsed = time.monotonic() - t0
    assert 0.4 <= elapsed <= 0.8


def test_sim_close_wakes_a_paced_read():
    src = sim(realtime=True, block_s=2.0)
    src.close()
    t0 = time.monotonic()
    assert src.read() is not None
    assert time.monotonic() - t0 < 0.5


def test_sim_read_before_open():
    cfg = SimVibrationConfig(type="sim_vibration")
    with pytest.raises(RuntimeError):
        SimVibrationSource("s", cfg).read()


# ------------------------------------------------------------------ replay

def test_replay_registered():
    load_builtin_sources()
    assert SOURCE_TYPES["replay"] == (ReplaySource, ReplayConfig)


def test_replay_npy_round_trip_and_end(ramp_npy):
    path, data = ramp_npy
    src = replay(segments=[{"path": str(path), "sample_rate": 1000}], block_frames=1024)
    src.open()
    assert src.health[0] is Health.OK
    assert src.frames_total == 5000
    info = src.info
    assert (info.sample_rate, info.channels, info.units) == (1000, ("ch0", "ch1"), "g")
    blocks = read_all(src)
    assert [b.frames for b in blocks] == [1024] * 4 + [904]
    assert [b.index for b in blocks] == [0, 1024, 2048, 3072, 4096]
    assert all(b.data.dtype == np.float32 and b.data.flags.c_contiguous for b in blocks)
    np.testing.assert_allclose(np.concatenate([b.data for b in blocks], axis=1), data.T, rtol=1e-6)
    assert src.health[0] is Health.ENDED
    assert src.read() is None
    starts = np.diff([b.start_ns for b in blocks])
    assert np.all(starts == 1024 * 10 ** 6)


def test_replay_npy_1d_columns_scale_and_names(tmp_path, ramp_npy):
    path, data = ramp_npy
    one = tmp_path / "one.npy"
    np.save(one, data[:, 0])
    src = replay(segments=[{"path": str(path), "sample_rate": 1000, "columns": [1], "scale": 2.0}],
                 channels=["spindle_de"], units="m/s^2")
    src.open()
    assert src.info.channels == ("spindle_de",) and src.info.units == "m/s^2"
    got = np.concatenate([b.data for b in read_all(src)], axis=1)
    np.testing.assert_allclose(got[0], 2 * data[:, 1], rtol=1e-6)
    src = replay(segments=[{"path": str(one), "sample_rate": 1000}])
    src.open()
    assert src.info.channels == ("ch0",) and src.frames_total == 5000


def test_replay_csv_with_header(tmp_path):
    data = np.round(np.random.default_rng(1).normal(size=(300, 3)), 6)
    path = tmp_path / "log.csv"
    lines = ["ax,ay,az"] + [",".join(f"{v:.6f}" for v in row) for row in data]
    path.write_text("\n".join(lines) + "\n")
    src = replay(segments=[{"path": str(path), "sample_rate": 500}], block_frames=128)
    src.open()
    got = np.concatenate([b.data for b in read_all(src)], axis=1)
    np.testing.assert_allclose(got, data.T, atol=1e-6)
    bare = tmp_path / "bare.csv"
    bare.write_text("\n".join(lines[1:]) + "\n")
    src = replay(segments=[{"path": str(bare), "sample_rate": 500}])
    src.open()
    assert src.frames_total == 300  # no header: the first row is data


@pytest.mark.parametrize("width", [2, 3, 4])
def test_replay_wav_round_trip(tmp_path, width):
    full = 1 << (8 * width - 1)
    rng = np.random.default_rng(width)
    ints = rng.integers(-full, full, size=(2000, 2))
    ints[0] = [-full, full - 1]
    path = tmp_path / f"rec{width}.wav"
    write_wav(path, ints, width, 8000)
    src = replay(segments=[{"path": str(path), "scale": 0.5}])
    src.open()
    assert src.info.sample_rate == 8000 and src.info.channels == ("ch0", "ch1")
    got = np.concatenate([b.data for b in read_all(src)], axis=1)
    np.testing.assert_allclose(got, 0.5 * ints.T / full, rtol=1e-6, atol=1e-9)
    # [-1, 1) before scaling; float32 rounds the top 32-bit code up to exactly 1.
    assert got.min() == -0.5 and got.max() <= 0.5


def test_replay_wav_rate_must_match(tmp_path):
    path = tmp_path / "rec.wav"
    write_wav(path, np.zeros((100, 1), dtype=np.int64), 2, 8000)
    src = replay(segments=[{"path": str(path), "sample_rate": 16000}])
    with pytest.raises(ValueError, match="16000.*8000"):
        src.open()


def test_replay_decimate(tmp_path):
    fs = 4000
    t = np.arange(8000) / fs
    tone = np.sin(2 * np.pi * 50 * t)
    alias = 0.5 * np.sin(2 * np.pi * 900 * t)  # above the new Nyquist (500 Hz): must be filtered out
    path = tmp_path / "x.npy"
    np.save(path, tone + alias)
    src = replay(segments=[{"path": str(path), "sample_rate": fs, "decimate": 4}])
    src.open()
    assert src.info.sample_rate == 1000
    assert src.frames_total == 2000
    got = np.concatenate([b.data for b in read_all(src)], axis=1)[0]
    inner = slice(100, -100)  # away from the filter's edges
    np.testing.assert_allclose(got[inner], tone[::4][inner], atol=0.02)


def test_replay_start_and_duration(ramp_npy):
    path, data = ramp_npy
    src = replay(segments=[{"path": str(path), "sample_rate": 1000, "start_s": 1.5, "duration_s": 2.0}])
    src.open()
    assert src.frames_total == 2000
    got = np.concatenate([b.data for b in read_all(src)], axis=1)
    np.testing.assert_allclose(got, data[1500:3500].T, rtol=1e-6)
    src = replay(segments=[{"path": str(path), "sample_rate": 1000, "start_s": 4.0, "duration_s": 9.0}])
    src.open()
    assert src.frames_total == 1000  # the duration is cut at the end of the data
    src = replay(segments=[{"path": str(path), "sample_rate": 1000, "start_s": 5.0}])
    with pytest.raises(ValueError, match="past the end"):
        src.open()


def test_replay_multiple_segments(tmp_path, ramp_npy):
    path, data = ramp_npy
    csv = tmp_path / "b.csv"
    csv.write_text("a,b\n" + "\n".join(f"{i},{-i}" for i in range(700)) + "\n")
    src = replay(segments=[{"path": str(path), "sample_rate": 2000, "decimate": 2, "duration_s": 1.0},
                           {"path": str(csv), "sample_rate": 1000}], block_frames=256)
    src.open()
    assert src.frames_total == 1000 + 700
    assert src.segment_starts == (0, 1000)
    blocks = read_all(src)
    # Blocks stop at the segment boundary; the next recording starts with a gap.
    assert [b.index for b in blocks] == [0, 256, 512, 768, 1000, 1256, 1512]
    assert [b.gap for b in blocks] == [False, False, False, False, True, False, False]
    got = np.concatenate([b.data for b in blocks], axis=1)
    np.testing.assert_allclose(got[:, 1000:], np.stack([np.arange(700), -np.arange(700)]))
    assert src.health[0] is Health.ENDED


def test_replay_segment_rate_mismatch_is_clear(tmp_path, ramp_npy):
    path, _ = ramp_npy
    other = tmp_path / "other.npy"
    np.save(other, np.zeros((100, 2)))
    src = replay(segments=[{"path": str(path), "sample_rate": 1000},
                           {"path": str(other), "sample_rate": 2000}])
    with pytest.raises(ValueError) as exc:
        src.open()
    msg = str(exc.value)
    assert "segment 1" in msg and str(other) in msg and "2000" in msg and "1000" in msg


def test_replay_segment_channel_mismatch_is_clear(tmp_path, ramp_npy):
    path, _ = ramp_npy
    other = tmp_path / "mono.npy"
    np.save(other, np.zeros(100))
    src = replay(segments=[{"path": str(path), "sample_rate": 1000},
                           {"path": str(other), "sample_rate": 1000}])
    with pytest.raises(ValueError, match=r"segment 1 .*mono\.npy.* 1 channel.*has 2"):
        src.open()


def test_replay_config_errors(tmp_path, ramp_npy):
    path, _ = ramp_npy
    bad = tmp_path / "data.txt"
    bad.write_text("1,2\n")
    with pytest.raises(ValueError) as exc:
        ReplayConfig.model_validate({"type": "replay", "segments": [{"path": str(bad), "sample_rate": 10}]})
    assert "data.txt" in str(exc.value) and ".mat, .npy, .csv, .wav" in str(exc.value)
    with pytest.raises(ValueError, match="sample_rate is required"):
        ReplayConfig.model_validate({"type": "replay", "segments": [{"path": str(path)}]})
    with pytest.raises(ValueError, match="file not found"):
        ReplayConfig.model_validate({"type": "replay", "segments": [{"path": str(tmp_path / "nope.npy")}]})
    with pytest.raises(ValueError):
        ReplayConfig.model_validate({"type": "replay", "segments": []})
    with pytest.raises(ValueError, match="columns"):
        src = replay(segments=[{"path": str(path), "sample_rate": 1, "columns": [5]}])
        src.open()
    with pytest.raises(ValueError, match="3 channel names"):
        replay(segments=[{"path": str(path), "sample_rate": 1}], channels=["a", "b", "c"]).open()


def test_replay_relative_path_uses_base_dir(ramp_npy):
    path, _ = ramp_npy
    cfg = ReplayConfig.model_validate({"type": "replay", "segments": [{"path": path.name, "sample_rate": 1}]},
                                      context={"base_dir": path.parent})
    assert cfg.segments[0].path == path


def test_replay_loop_wraps_and_keeps_counting(ramp_npy):
    path, data = ramp_npy
    src = replay(segments=[{"path": str(path), "sample_rate": 1000}], loop=True, block_frames=3000)
    src.open()
    blocks = [src.read() for _ in range(6)]
    total = data.shape[0]
    # Each pass ends at the end of the recording; the next pass starts with a gap.
    assert [b.index for b in blocks] == [0, 3000, total, total + 3000, 2 * total, 2 * total + 3000]
    assert [b.gap for b in blocks] == [False, False, True, False, True, False]
    got = np.concatenate([b.data for b in blocks], axis=1)
    np.testing.assert_allclose(got, np.tile(data.T, 3)[:, :got.shape[1]], rtol=1e-6)
    assert src.health[0] is Health.OK


def test_replay_realtime_is_paced(ramp_npy):
    path, _ = ramp_npy
    src = replay(segments=[{"path": str(path), "sample_rate": 10000}], realtime=True, block_frames=500)
    src.open()
    t0 = time.monotonic()
    for _ in range(6):  # 0.3 s of data
        src.read()
    assert 0.25 <= time.monotonic() - t0 <= 0.6


def test_replay_real_cwru_file():
    path = shared_file("bearing", "cwru", "normal_0hp_48k.mat")
    src = replay(segments=[{"path": str(path), "sample_rate": 48000, "decimate": 4}], block_frames=4096)
    info = src.info  # available before open (reads the file)
    assert info.sample_rate == 12000 and info.channels == ("ch0",)
    src.open()
    assert src.frames_total in (60984, 60985)
    from scipy.io import loadmat
    raw = loadmat(str(path), variable_names=["X097_DE_time"])["X097_DE_time"][:, 0]
    got = np.concatenate([b.data for b in read_all(src)], axis=1)[0]
    assert got.size == src.frames_total
    # The decimated signal is the drive-end channel (X097_DE_time), not the fan end.
    assert np.corrcoef(got[200:-200], raw[::4][200:-200])[0, 1] > 0.9
    assert src.health[0] is Health.ENDED


def test_replay_mat_variable_choice(tmp_path):
    from scipy.io import savemat
    path = tmp_path / "two.mat"
    savemat(path, {"a": np.zeros((10, 1)), "b": np.ones((10, 1)), "rpm": np.array([[1797]])})
    with pytest.raises(ValueError) as exc:
        replay(segments=[{"path": str(path), "sample_rate": 1}]).open()
    assert "several" in str(exc.value) and "a (10, 1)" in str(exc.value)
    src = replay(segments=[{"path": str(path), "sample_rate": 1, "variable": "b"}])
    src.open()
    assert src.frames_total == 10
    with pytest.raises(ValueError, match="no variable 'c'; available"):
        replay(segments=[{"path": str(path), "sample_rate": 1, "variable": "c"}]).open()
    one = tmp_path / "one.mat"
    savemat(one, {"sig": np.arange(20.0), "rpm": np.array([[1797]])})  # saved as a (1, 20) row
    src = replay(segments=[{"path": str(one), "sample_rate": 1}])
    src.open()
    assert src.frames_total == 20 and src.info.channels == ("ch0",)


def test_replay_without_scipy_says_what_to_do(tmp_path, ramp_npy):
    """The gateway's card leaves scipy out: a .mat recording or decimation then says why, and
    .npy recordings still play."""
    import subprocess
    import sys

    from conftest import REPO
    path, _ = ramp_npy
    mat = tmp_path / "r.mat"
    mat.write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200))
    code = f"""
import sys
sys.modules["scipy"] = None          # as on the image: import scipy fails
sys.path.insert(0, {str(REPO)!r})
from hal.sources.replay import ReplaySource, ReplayConfig
def run(seg):
    src = ReplaySource("rec", ReplayConfig.model_validate({{"type": "replay", "segments": [seg]}}))
    try:
        src.open()
        print("opened", src.frames_total)
    except ValueError as exc:
        print("error", exc)
run({{"path": {str(mat)!r}, "sample_rate": 1000}})
run({{"path": {str(path)!r}, "sample_rate": 1000, "decimate": 2}})
run({{"path": {str(path)!r}, "sample_rate": 1000}})
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert out[0].startswith("error") and "reading a .mat file needs scipy" in out[0] and "[mat]" in out[0]
    assert out[1].startswith("error") and "decimate needs scipy" in out[1]
    assert out[2] == "opened 5000"
