"""Recorded data played back as a source: .mat (e.g. the CWRU bearing data), .npy, .csv, .wav.

All segments are loaded at open() (the files are small), converted to float32 planar
(channels, frames) and joined end to end into one stream. Blocks have block_frames frames but
never span two segments: the first block of each later segment is marked as a gap (its samples
do not continue the previous ones), so no analysis window mixes two recordings. With loop: true
the stream starts over after the last segment (again a gap) and the sample index keeps counting
up, so timestamps never go backwards.
"""
from __future__ import annotations

import threading
import wave
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from pydantic import Field, field_validator, model_validator

from hal.registry import register_source
from hal.schema import ChannelNames, ExistingFile, StrictModel
from hal.source import Block, Health, SampleClock, Source, SourceInfo

SUPPORTED = (".mat", ".npy", ".csv", ".wav")
_NUMERIC_MAT_CLASSES = {"double", "single", "int8", "uint8", "int16", "uint16",
                        "int32", "uint32", "int64", "uint64"}


class SegmentConfig(StrictModel):
    path: ExistingFile
    variable: Optional[str] = Field(None, description=".mat only: the variable; default *_DE_time or the only array")
    columns: Optional[list[int]] = Field(None, min_length=1, description="columns/channels to take; default all")
    sample_rate: Optional[float] = Field(None, gt=0, description="Hz; required except for .wav")
    decimate: int = Field(1, ge=1, description="keep every n-th sample after a zero-phase FIR anti-alias filter")
    start_s: float = Field(0.0, ge=0)
    duration_s: Optional[float] = Field(None, gt=0)
    scale: float = 1.0

    @field_validator("columns")
    @classmethod
    def _columns_ok(cls, columns: Optional[list[int]]) -> Optional[list[int]]:
        if columns is not None and any(c < 0 for c in columns):
            raise ValueError(f"columns must be non-negative indices, got {columns}")
        return columns

    @model_validator(mode="after")
    def _format_known(self):
        ext = self.path.suffix.lower()
        if ext not in SUPPORTED:
            raise ValueError(f"{self.path}: unsupported file type {ext or '(no extension)'!r}; "
                             f"supported: {', '.join(SUPPORTED)}")
        if ext != ".wav" and self.sample_rate is None:
            raise ValueError(f"{self.path}: sample_rate is required for {ext} files (only .wav carries its own)")
        if self.variable is not None and ext != ".mat":
            raise ValueError(f"{self.path}: 'variable' only applies to .mat files")
        return self


class ReplayConfig(StrictModel):
    type: Literal["replay"]
    segments: list[SegmentConfig] = Field(min_length=1)
    channels: Optional[ChannelNames] = Field(None, min_length=1, description="channel names; default ch0..chN-1")
    units: str = "g"
    realtime: bool = False
    loop: bool = False
    block_frames: int = Field(1024, ge=1)


def _scipy(what: str, where: object):
    """scipy, which .mat files and decimation need; the gateway's card goes without it."""
    try:
        import scipy.io
        import scipy.signal
    except ImportError:
        raise ValueError(f"{where}: {what} needs scipy, which this installation does not have (the gateway "
                         "image leaves it out): use a .npy, .csv or .wav recording, or install "
                         "factory-gateway-appliance[mat]") from None
    return scipy


# ---------------------------------------------------------------- file readers
# Each returns (data as float64 (frames, channels), the file's own sample rate or None).

def _pick_mat_variable(path: Path, wanted: Optional[str]) -> str:
    whosmat = _scipy("reading a .mat file", path).io.whosmat

    try:
        entries = whosmat(str(path))
    except NotImplementedError as exc:  # MATLAB v7.3 files are HDF5, which scipy.io cannot read
        raise ValueError(f"{path}: cannot read this .mat file ({exc}); save it with -v7 or older") from None
    names = [name for name, _, _ in entries]
    listing = ", ".join(f"{n} {tuple(s)} {c}" for n, s, c in entries) or "(none)"
    if wanted is not None:
        if wanted not in names:
            raise ValueError(f"{path}: no variable {wanted!r}; available: {listing}")
        return wanted
    drive_end = [n for n in names if n.endswith("_DE_time")]
    if len(drive_end) == 1:
        return drive_end[0]
    if len(drive_end) > 1:
        raise ValueError(f"{path}: several *_DE_time variables ({', '.join(drive_end)}); "
                         f"set 'variable' to one of them")
    # Scalars such as X097RPM are metadata, not signals.
    arrays = [n for n, shape, cls in entries
              if cls in _NUMERIC_MAT_CLASSES and len(shape) <= 2 and int(np.prod(shape)) > 1]
    if len(arrays) == 1:
        return arrays[0]
    raise ValueError(f"{path}: cannot choose a variable automatically ("
                     f"{'no' if not arrays else 'several'} numeric 1-D/2-D arrays); "
                     f"set 'variable'. Available: {listing}")


def _read_mat(seg: SegmentConfig) -> tuple[np.ndarray, Optional[float]]:
    loadmat = _scipy("reading a .mat file", seg.path).io.loadmat

    name = _pick_mat_variable(seg.path, seg.variable)
    value = loadmat(str(seg.path), variable_names=[name])[name]
    if not np.issubdtype(value.dtype, np.number) or value.ndim > 2:
        raise ValueError(f"{seg.path}: variable {name!r} is not a numeric 1-D/2-D array "
                         f"(dtype {value.dtype}, shape {value.shape})")
    # MATLAB has no 1-D arrays: a row vector (1, N) is one channel, not N channels.
    if value.ndim == 2 and value.shape[0] == 1:
        value = value.reshape(-1, 1)
    return value, None


def _read_npy(seg: SegmentConfig) -> tuple[np.ndarray, Optional[float]]:
    value = np.load(seg.path, allow_pickle=False)
    if value.ndim not in (1, 2) or not np.issubdtype(value.dtype, np.number):
        raise ValueError(f"{seg.path}: expected a numeric 1-D or 2-D (frames, channels) array, "
                         f"got dtype {value.dtype}, shape {value.shape}")
    return value, None


def _read_csv(seg: SegmentConfig) -> tuple[np.ndarray, Optional[float]]:
    with open(seg.path, newline="") as fh:
        first = ""
        for line in fh:
            if line.strip():
                first = line
                break
    skip = 0
    try:
        [float(field) for field in first.split(",")]
    except ValueError:
        skip = 1  # a header row of names
    try:
        value = np.loadtxt(seg.path, delimiter=",", skiprows=skip, ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"{seg.path}: not a comma-separated table of numbers ({exc})") from None
    return value, None


def _read_wav(seg: SegmentConfig) -> tuple[np.ndarray, Optional[float]]:
    try:
        with wave.open(str(seg.path), "rb") as w:
            width, n_ch, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{seg.path}: not a PCM .wav file the wave module can read ({exc})") from None
    if width == 1:  # 8-bit WAV is unsigned
        value = (np.frombuffer(raw, np.uint8).astype(np.float64) - 128) / 128
    elif width == 2:
        value = np.frombuffer(raw, "<i2") / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        ints = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)  # sign-extend
        value = ints / float(1 << 23)
    elif width == 4:
        value = np.frombuffer(raw, "<i4") / float(1 << 31)
    else:
        raise ValueError(f"{seg.path}: unsupported sample width of {width} bytes")
    return value.reshape(-1, n_ch), float(rate)


_READERS = {".mat": _read_mat, ".npy": _read_npy, ".csv": _read_csv, ".wav": _read_wav}


def load_segment(seg: SegmentConfig, index: int = 0) -> tuple[np.ndarray, float]:
    """One segment as float32 planar (channels, frames) and its sample rate after decimation."""
    ext = seg.path.suffix.lower()
    reader = _READERS.get(ext)
    if reader is None:
        raise ValueError(f"segment {index} ({seg.path}): unsupported file type {ext!r}; "
                         f"supported: {', '.join(SUPPORTED)}")
    frames_ch, file_rate = reader(seg)
    where = f"segment {index} ({seg.path})"
    if file_rate is not None and seg.sample_rate is not None and abs(seg.sample_rate - file_rate) > 1e-9 * file_rate:
        raise ValueError(f"{where}: sample_rate {seg.sample_rate:g} Hz is given but the file says {file_rate:g} Hz")
    rate = file_rate if file_rate is not None else float(seg.sample_rate)

    if frames_ch.ndim == 1:
        frames_ch = frames_ch[:, None]
    n_cols = frames_ch.shape[1]
    if seg.columns is not None:
        bad = [c for c in seg.columns if c >= n_cols]
        if bad:
            raise ValueError(f"{where}: columns {bad} do not exist; the data has {n_cols} column(s)")
        frames_ch = frames_ch[:, seg.columns]
    data = np.ascontiguousarray(frames_ch.T, dtype=np.float64)

    if seg.decimate > 1:
        decimate = _scipy("decimate", where).signal.decimate

        if data.shape[1] <= 1:
            raise ValueError(f"{where}: too few samples ({data.shape[1]}) to decimate")
        data = decimate(data, seg.decimate, ftype="fir", zero_phase=True, axis=1)
        rate /= seg.decimate

    # Cropped after decimation so the anti-alias filter sees real data, not a cut edge.
    total = data.shape[1]
    first = int(round(seg.start_s * rate))
    if first >= total:
        raise ValueError(f"{where}: start_s {seg.start_s:g} s is past the end of the data ({total / rate:g} s)")
    last = total if seg.duration_s is None else min(total, first + int(round(seg.duration_s * rate)))
    data = data[:, first:last]
    if seg.scale != 1.0:
        data = data * seg.scale
    return np.ascontiguousarray(data, dtype=np.float32), rate


@register_source("replay", ReplayConfig)
class ReplaySource(Source):
    def __init__(self, name: str, config: ReplayConfig) -> None:
        super().__init__(name, config)
        self._data: np.ndarray | None = None
        self._rate: float | None = None
        self._clock: SampleClock | None = None
        self._stop = threading.Event()
        self._pos = 0      # frame within the joined segments
        self._index = 0    # frames delivered since open
        self.segment_starts: tuple[int, ...] = ()

    # --------------------------------------------------------------- loading
    def _load(self) -> None:
        parts: list[np.ndarray] = []
        starts: list[int] = []
        rate0 = n0 = None
        offset = 0
        for i, seg in enumerate(self.config.segments):
            data, rate = load_segment(seg, i)
            if i == 0:
                rate0, n0 = rate, data.shape[0]
            else:
                first = self.config.segments[0].path
                if abs(rate - rate0) > 1e-9 * rate0:
                    raise ValueError(f"segment {i} ({seg.path}) has sample rate {rate:g} Hz (after decimation) "
                                     f"but segment 0 ({first}) has {rate0:g} Hz; all segments must match")
                if data.shape[0] != n0:
                    raise ValueError(f"segment {i} ({seg.path}) has {data.shape[0]} channel(s) "
                                     f"but segment 0 ({first}) has {n0}; all segments must match")
            parts.append(data)
            starts.append(offset)
            offset += data.shape[1]
        names = self.config.channels
        if names is not None and len(names) != n0:
            raise ValueError(f"replay {self.name!r}: {len(names)} channel names given ({', '.join(names)}) "
                             f"but the data has {n0} channel(s)")
        self._data = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        self._rate = rate0
        self.segment_starts = tuple(starts)

    @property
    def frames_total(self) -> int:
        """Frames in one pass over all segments (after decimation and cropping); needs open()."""
        if self._data is None:
            raise RuntimeError(f"replay {self.name!r}: frames_total is known after open()")
        return int(self._data.shape[1])

    @property
    def info(self) -> SourceInfo:
        if self._data is None:
            # info may be asked before open (e.g. to wire up modules); that needs the files.
            self._load()
        n = self._data.shape[0]
        names = tuple(self.config.channels) if self.config.channels else tuple(f"ch{i}" for i in range(n))
        return SourceInfo(name=self.name, kind="vibration", sample_rate=self._rate,
                          channels=names, units=self.config.units)

    # --------------------------------------------------------------- streaming
    def open(self) -> None:
        self._stop.clear()
        self._load()
        if self.frames_total == 0:
            raise ValueError(f"replay {self.name!r}: the segments hold no samples")
        self._pos = 0
        self._index = 0
        self._clock = SampleClock(self._rate)
        self.set_health(Health.OK)

    def close(self) -> None:
        self._stop.set()

    def read(self) -> Block | None:
        if self._clock is None or self._data is None:
            raise RuntimeError(f"source {self.name!r}: read() before open()")
        total, want = self._data.shape[1], self.config.block_frames
        gap = self._pos in self.segment_starts[1:]
        if self._pos >= total:
            if not self.config.loop:
                if self.health[0] is not Health.ENDED:
                    self.set_health(Health.ENDED, f"replayed all {total} frames")
                return None
            self._pos, gap = 0, True
        next_start = next((s for s in self.segment_starts[1:] if s > self._pos), total)
        data = self._data[:, self._pos:min(self._pos + want, next_start)]
        self._pos += data.shape[1]
        data = np.array(data, dtype=np.float32, copy=True)  # consumers may keep or modify blocks
        start = self._index
        self._index += data.shape[1]
        if self.config.realtime:
            self._clock.wait_until(self._index, self._stop)
        return Block(data=data, start_ns=self._clock.timestamp_ns(start), index=start, gap=gap)
