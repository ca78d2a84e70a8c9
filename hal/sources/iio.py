"""Linux IIO buffered capture: how many industrial accelerometers (ADXL355, ADIS16xxx, LSM6DS…)
appear on Linux. The kernel driver does the bus work; we configure the buffer through sysfs and
read packed scans from /dev/iio:deviceN.

sysfs (per device, /sys/bus/iio/devices/iio:deviceN):
  name                                  the driver's name for the chip
  scan_elements/in_<ch>_en|_index|_type which channels are captured, their order and format
  in_<ch>_scale, in_<ch>_offset         raw -> SI units: (raw + offset) * scale (also shared
                                        in_<type>_scale / in_<type>_offset)
  sampling_frequency                    Hz (or in_<type>_sampling_frequency)
  buffer/length, buffer/enable          the kernel FIFO
A scan holds the enabled channels in index order, each aligned to its own storage size, the
whole scan padded to its largest element. A type reads like "le:s12/16>>4": endianness, sign,
real bits / storage bits, right shift.
"""
from __future__ import annotations

import os
import re
import select
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from hal.registry import register_source
from hal.schema import ChannelNames, StrictModel
from hal.source import Block, Health, SampleClock, Source, SourceInfo

STANDARD_GRAVITY = 9.80665
TYPE_RE = re.compile(r"^(?P<endian>be|le):(?P<sign>[su])(?P<bits>\d+)/(?P<storage>\d+)(?:X(?P<repeat>\d+))?>>(?P<shift>\d+)$")


class IioConfig(StrictModel):
    type: Literal["iio"]
    device: str = Field(description="the IIO device: its name (as in .../name, e.g. adxl355), or iio:deviceN")
    channels: ChannelNames = Field(["accel_x", "accel_y", "accel_z"], min_length=1, max_length=16,
                                description="scan elements to capture, without in_ and _en")
    sample_rate: float | None = Field(None, gt=0, description="Hz to set; default: keep the device's")
    buffer_length: int = Field(1024, ge=2, le=1 << 20, description="scans the kernel buffer holds")
    block_scans: int = Field(256, ge=1, le=1 << 16, description="scans per block read")
    units: Literal["g", "si"] = Field("g", description="g, or the driver's SI unit (m/s^2 for accel)")
    timeout_s: float = Field(2.0, gt=0, description="no data for this long is a failure")
    sysfs_root: Path = Field(Path("/sys/bus/iio/devices"), description="where IIO devices appear")
    dev_root: Path = Field(Path("/dev"), description="where iio:deviceN nodes appear")

    @field_validator("channels")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        bad = [c for c in value if not re.fullmatch(r"[a-z0-9_]+", c)]
        if bad:
            raise ValueError(f"channel names are like accel_x (lower case, digits, _): {bad}")
        return value


@dataclass(frozen=True)
class ScanElement:
    name: str
    index: int
    big_endian: bool
    signed: bool
    bits: int
    storage: int          # bits
    shift: int
    scale: float
    offset: float

    @property
    def nbytes(self) -> int:
        return self.storage // 8


def parse_type(text: str, where: str) -> tuple[bool, bool, int, int, int]:
    m = TYPE_RE.match(text.strip())
    if not m:
        raise ValueError(f"{where}: cannot read scan type {text.strip()!r} (expected e.g. le:s16/16>>0)")
    if m.group("repeat"):
        raise ValueError(f"{where}: repeated scan elements ({text.strip()}) are not supported")
    storage = int(m.group("storage"))
    if storage not in (8, 16, 32, 64):
        raise ValueError(f"{where}: storage of {storage} bits is not supported")
    return m.group("endian") == "be", m.group("sign") == "s", int(m.group("bits")), storage, int(m.group("shift"))


def scan_layout(elements: list[ScanElement]) -> tuple[list[int], int]:
    """Byte offset of each element (in index order) and the scan size, per the kernel's rules."""
    offsets, pos, largest = [], 0, 1
    for e in elements:
        pos = (pos + e.nbytes - 1) // e.nbytes * e.nbytes
        offsets.append(pos)
        pos += e.nbytes
        largest = max(largest, e.nbytes)
    size = (pos + largest - 1) // largest * largest
    return offsets, size


def decode_scans(raw: bytes, elements: list[ScanElement], offsets: list[int], size: int) -> np.ndarray:
    """Packed scans -> float64 (channels, scans) in SI units."""
    count = len(raw) // size
    buf = np.frombuffer(raw[:count * size], dtype=np.uint8).reshape(count, size)
    out = np.empty((len(elements), count), dtype=np.float64)
    for row, (e, off) in enumerate(zip(elements, offsets)):
        kind = f"{'>' if e.big_endian else '<'}u{e.nbytes}"
        values = buf[:, off:off + e.nbytes].copy().view(kind).reshape(count).astype(np.uint64)
        values = (values >> np.uint64(e.shift)) & np.uint64((1 << e.bits) - 1)
        v = values.astype(np.int64)
        if e.signed:
            v = np.where(v >= (1 << (e.bits - 1)), v - (1 << e.bits), v)
        out[row] = (v + e.offset) * e.scale
    return out


def _read(path: Path) -> str:
    return path.read_text().strip()


def _write(path: Path, value: str) -> None:
    path.write_text(value)
    got = _read(path)
    if got != value:
        # Drivers round rates and lengths; saying what we asked and got saves an afternoon.
        raise OSError(f"{path}: wrote {value}, reads back {got}")


@register_source("iio", IioConfig)
class IioSource(Source):
    def __init__(self, name: str, config: IioConfig) -> None:
        super().__init__(name, config)
        self._fd: int | None = None
        self._poller = select.poll()   # not select(): it refuses descriptors past 1023
        self._dir: Path | None = None
        self._elements: list[ScanElement] = []
        self._clock: SampleClock | None = None
        self._index = 0
        self._pending = b""
        self._rate = config.sample_rate or 0.0

    # ---- discovery ----------------------------------------------------------------------------

    def _find_device(self) -> Path:
        root, want = self.config.sysfs_root, self.config.device
        if not root.is_dir():
            raise OSError(f"{root} does not exist: no IIO devices on this system (kernel without IIO?)")
        devices = sorted(p for p in root.iterdir() if p.name.startswith("iio:device"))
        for d in devices:
            if d.name == want or (d / "name").exists() and _read(d / "name") == want:
                return d
        found = ", ".join(f"{d.name} ({_read(d / 'name') if (d / 'name').exists() else '?'})" for d in devices)
        raise OSError(f"IIO device {want!r} not found in {root} (present: {found or 'none'}); "
                      f"is its driver loaded and the device tree / ACPI entry right?")

    def _attribute(self, d: Path, channel: str, attr: str) -> Path | None:
        """in_accel_x_scale, or the shared in_accel_scale."""
        kind = channel.rsplit("_", 1)[0]
        for candidate in (d / f"in_{channel}_{attr}", d / f"in_{kind}_{attr}"):
            if candidate.exists():
                return candidate
        return None

    def _sampling_frequency_file(self, d: Path) -> Path | None:
        kind = self.config.channels[0].rsplit("_", 1)[0]
        for candidate in (d / "sampling_frequency", d / f"in_{kind}_sampling_frequency"):
            if candidate.exists():
                return candidate
        return None

    # ---- Source ---------------------------------------------------------------------------------

    @property
    def info(self) -> SourceInfo:
        units = "g" if self.config.units == "g" else "SI"
        return SourceInfo(self.name, "vibration", self._rate or (self.config.sample_rate or 1.0),
                          tuple(self.config.channels), units)

    def open(self) -> None:
        cfg = self.config
        d = self._dir = self._find_device()
        scan = d / "scan_elements"
        buffer = d / "buffer"
        if (buffer / "enable").exists() and _read(buffer / "enable") == "1":
            _write(buffer / "enable", "0")   # a buffer left running by someone else: reconfigure
        for entry in sorted(scan.glob("*_en")):
            wanted = entry.name[3:-3] in cfg.channels
            _write(entry, "1" if wanted else "0")
        elements = []
        for ch in cfg.channels:
            en = scan / f"in_{ch}_en"
            if not en.exists():
                have = sorted(p.name[3:-3] for p in scan.glob("in_*_en"))
                raise OSError(f"{d.name} has no scan element {ch!r} (it has: {', '.join(have)})")
            big, signed, bits, storage, shift = parse_type(_read(scan / f"in_{ch}_type"), f"{d.name} {ch}")
            scale_file, offset_file = self._attribute(d, ch, "scale"), self._attribute(d, ch, "offset")
            scale = float(_read(scale_file)) if scale_file else 1.0
            offset = float(_read(offset_file)) if offset_file else 0.0
            if cfg.units == "g":
                scale /= STANDARD_GRAVITY
            elements.append(ScanElement(ch, int(_read(scan / f"in_{ch}_index")), big, signed, bits, storage,
                                        shift, scale, offset))
        self._elements = sorted(elements, key=lambda e: e.index)
        self._order = [self._elements.index(next(e for e in self._elements if e.name == ch)) for ch in cfg.channels]
        self._offsets, self._scan_size = scan_layout(self._elements)
        freq = self._sampling_frequency_file(d)
        if cfg.sample_rate is not None:
            if freq is None:
                raise OSError(f"{d.name} has no sampling_frequency attribute; leave sample_rate unset")
            freq.write_text(f"{cfg.sample_rate:g}")
        if freq is None:
            raise OSError(f"{d.name} has no sampling_frequency attribute: cannot time its samples")
        self._rate = float(_read(freq))
        if cfg.sample_rate is not None and abs(self._rate - cfg.sample_rate) > 1e-6 * cfg.sample_rate:
            raise OSError(f"{d.name}: asked for {cfg.sample_rate:g} Hz, the driver set {self._rate:g} Hz "
                          f"(see {freq.name}_available)")
        _write(buffer / "length", str(cfg.buffer_length))
        _write(buffer / "enable", "1")
        node = cfg.dev_root / d.name
        self._fd = os.open(node, os.O_RDONLY | os.O_NONBLOCK)
        self._poller.register(self._fd, select.POLLIN)
        self._clock = SampleClock(self._rate)
        self._index = 0
        self._pending = b""
        self.set_health(Health.OK)

    def read(self) -> Block | None:
        want = self.config.block_scans * self._scan_size
        deadline = time.monotonic() + self.config.timeout_s
        while len(self._pending) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                if self._pending:
                    break
                raise OSError(f"{self._dir.name}: no data for {self.config.timeout_s:g} s (trigger stopped? "
                              f"device gone?)")
            if not self._poller.poll(left * 1000.0):
                continue
            try:
                chunk = os.read(self._fd, want - len(self._pending))
            except BlockingIOError:
                continue
            if not chunk:
                raise OSError(f"{self._dir.name}: the device node closed (device removed?)")
            self._pending += chunk
        whole = len(self._pending) // self._scan_size * self._scan_size
        raw, self._pending = self._pending[:whole], self._pending[whole:]
        values = decode_scans(raw, self._elements, self._offsets, self._scan_size)[self._order]
        start = self._index
        self._index += values.shape[1]
        return Block(values.astype(np.float32), self._clock.timestamp_ns(start), start)

    def close(self) -> None:
        if self._fd is not None:
            self._poller.unregister(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._dir is not None:
            try:
                _write(self._dir / "buffer" / "enable", "0")
            except OSError:
                pass   # the device may be gone; nothing left to stop
