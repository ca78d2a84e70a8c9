"""The two data sets, read exactly as the appliance reads them (hal's replay and camera code).

No torch here: the training scripts use it, and so does anything that wants the same windows,
frames or labels without the training stack. The splits are in time: the model is trained on
the first part of each recording and judged on the rest, never on a window or frame that
overlaps the training part.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:      # run as a script from the training venv: hal is not installed there
    sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data"

# ---------------------------------------------------------------- vibration (CWRU)

FS = 12000                      # every recording is used at 12 kHz (the 48 kHz ones decimated by 4)
WINDOW = 1024                   # samples: 85 ms, about 2.5 shaft turns at 1797 rpm
TRAIN_FRACTION = 0.7            # first 70 % of each fault recording trains, the last 30 % is held out
CLASSES = ("normal", "inner", "outer", "ball")

# (file, class). The two 48 kHz fault recordings are decimated like the healthy one, so that
# "was decimated" cannot stand in for "is healthy".
RECORDINGS = (
    ("normal_0hp_48k.mat", "normal"),
    ("inner_race_007_0hp_12k.mat", "inner"),
    ("outer_race_007_at6_0hp_12k.mat", "outer"),
    ("ball_007_0hp_12k.mat", "ball"),
    ("inner_race_007_0hp_48k.mat", "inner"),
    ("ball_007_0hp_48k.mat", "ball"),
)


def file_rate(name: str) -> int:
    if name.endswith("_48k.mat"):
        return 48000
    if name.endswith("_12k.mat"):
        return 12000
    raise ValueError(f"{name}: cannot tell the sample rate (CWRU names end in _12k.mat or _48k.mat)")


def segment(path: Path, start_s: float = 0.0, duration_s: float | None = None) -> dict:
    """The replay source's segment for this recording at 12 kHz (also what the evaluation plays)."""
    rate = file_rate(path.name)
    seg = {"path": str(path), "sample_rate": rate, "decimate": rate // FS}
    if start_s:
        seg["start_s"] = start_s
    if duration_s is not None:
        seg["duration_s"] = duration_s
    return seg


def load_recording(path: Path) -> np.ndarray:
    """The drive-end signal at 12 kHz, float32, through hal's replay code (same filter, same samples)."""
    from hal.sources.replay import SegmentConfig, load_segment
    data, rate = load_segment(SegmentConfig(**segment(path)))
    if rate != FS:
        raise ValueError(f"{path}: {rate} Hz after decimation, expected {FS}")
    return data[0]


# The healthy recording trains on its first half only: `appliance eval bearing` learns its
# baseline there and requires silence on the second half, which the model must not have seen.
HEALTHY_TRAIN_FRACTION = 0.5

# Recordings of the same faults at other loads (1-3 hp: other speeds, other load zones), never
# trained on: the model's accuracy on them is by recording, not by window (issue 18).
UNSEEN = tuple((f"{kind}_007{at}_{hp}hp_12k.mat", label)
               for hp in (1, 2, 3)
               for kind, at, label in (("inner_race", "", "inner"), ("outer_race", "_at6", "outer"), ("ball", "", "ball")))


def split_sample(n: int, label: str = "") -> int:
    """First held-out sample of a recording of n samples (at 12 kHz)."""
    return int(n * (HEALTHY_TRAIN_FRACTION if label == "normal" else TRAIN_FRACTION))


@dataclass
class Recording:
    name: str
    label: str
    signal: np.ndarray           # whole recording, 12 kHz
    split: int                   # first held-out sample

    @property
    def split_s(self) -> float:
        return self.split / FS


def recordings(data_dir: Path = DATA / "bearing" / "cwru") -> list[Recording]:
    out = []
    for name, label in RECORDINGS:
        path = data_dir / name
        if not path.exists():
            raise FileNotFoundError(f"recording not found: {path}")
        x = load_recording(path)
        out.append(Recording(name, label, x, split_sample(len(x), label)))
    return out


def unseen_recordings(data_dir: Path = DATA / "bearing" / "cwru") -> list[Recording]:
    """The recordings the model never trains on, whole (split = 0: every sample is held out)."""
    out = []
    for name, label in UNSEEN:
        path = data_dir / name
        if not path.exists():
            raise FileNotFoundError(f"recording not found: {path}")
        out.append(Recording(name, label, load_recording(path), 0))
    return out


def windows(x: np.ndarray, hop: int, size: int = WINDOW) -> np.ndarray:
    """(n, size) windows of x every hop samples (the last partial one dropped), a copy."""
    if len(x) < size:
        return np.zeros((0, size), np.float32)
    n = (len(x) - size) // hop + 1
    idx = np.arange(size)[None, :] + hop * np.arange(n)[:, None]
    return np.ascontiguousarray(x[idx], dtype=np.float32)


# ---------------------------------------------------------------- camera (vtest.avi)

VIDEO = DATA / "video" / "vtest.avi"
FRAME = (96, 96)                # [width, height] the camera source resizes to (INTER_AREA, on the host)
TRAIN_FRAMES = 536              # frames 0..535 train
TEST_FROM = 556                 # frames 556.. are held out; the 2 s between are in neither (near-duplicates)

# The label procedure (see docs/modules/nn-camera.md): on the full-resolution gray frames, the
# per-pixel median of all frames is the empty scene; a pixel is foreground where it differs by
# more than DIFF levels; a 3x3 opening drops speckle, two 5x5 dilations join a person's parts;
# every 8-connected blob of at least MIN_AREA pixels and MIN_HEIGHT rows is one pedestrian.
DIFF = 30
MIN_AREA = 800
MIN_HEIGHT = 40


def camera_config(video: Path = VIDEO, resize: tuple[int, int] | None = FRAME) -> dict:
    """The camera source section the appliance runs (and the training reads through)."""
    cfg = {"type": "camera", "url": str(video), "realtime": False, "gray": True}
    if resize is not None:
        cfg["resize"] = list(resize)
    return cfg


def read_frames(video: Path = VIDEO, resize: tuple[int, int] | None = FRAME) -> np.ndarray:
    """Every frame as the camera source delivers it: (n, height, width) uint8."""
    from hal.sources.camera import CameraConfig, CameraSource
    if not video.exists():
        raise FileNotFoundError(f"video not found: {video}")
    src = CameraSource("train", CameraConfig(**camera_config(video, resize)))
    src.open()
    frames = []
    try:
        while (block := src.read()) is not None:
            h, w = block.image
            frames.append(block.data[0].reshape(h, w))
    finally:
        src.close()
    return np.stack(frames)


def pedestrian_blobs(full: np.ndarray) -> list[list[tuple[int, int, int, int, int]]]:
    """Per frame of full-resolution gray frames (n, h, w): the pedestrian blobs (x, y, w, h, area)."""
    import cv2
    background = np.median(full, axis=0).astype(np.uint8)
    open_k = np.ones((3, 3), np.uint8)
    dilate_k = np.ones((5, 5), np.uint8)
    out = []
    for frame in full:
        mask = (cv2.absdiff(frame, background) > DIFF).astype(np.uint8) * 255
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, open_k)
        mask = cv2.dilate(mask, dilate_k, iterations=2)
        _, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8, ltype=cv2.CV_32S)
        out.append([tuple(int(v) for v in s) for s in stats[1:] if s[4] >= MIN_AREA and s[3] >= MIN_HEIGHT])
    return out


def people_labels(video: Path = VIDEO) -> np.ndarray:
    """The number of pedestrians in each frame, by the label procedure above (int)."""
    return np.array([len(b) for b in pedestrian_blobs(read_frames(video, resize=None))], np.int64)

