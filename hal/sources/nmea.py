"""NMEA 0183 source: a GPS/GNSS receiver (or any talker of NMEA sentences) on a serial line.

Each position fix (one epoch: the GGA and RMC, and VTG if sent, that share a UTC time; see
hal.drivers.serial.nmea.FixAssembler) becomes one sample with the configured channels:

    fix_quality  GGA quality: 0 none, 1 GPS, 2 DGPS, 4 RTK fixed, 5 RTK float, 6 dead reckoning
                 (from RMC alone: 1 if status A, else 0)
    satellites   satellites used
    latitude     decimal degrees, south negative
    longitude    decimal degrees, west negative
    altitude     m above mean sea level
    speed        m/s over ground (RMC/VTG knots * 1852/3600)
    course       degrees true
    hdop         horizontal dilution of precision      (not in the default channels)
    north, east  m from `origin` (default: the first fix after open), a local flat-earth offset
                 (not in the default channels)

Samples are float32 (the Block contract), which resolves latitude/longitude to 4e-6 degrees
(about 0.4 m) below 64 degrees and 1.5e-5 degrees (about 1.7 m) between 128 and 180 degrees of
longitude; use north/east for cm-level (RTK) work. A value the receiver left empty is NaN.

Timing: this source is *irregular*. A sample is delivered when its epoch is complete, and its
Block.start_ns is the arrival time of the epoch's last sentence (wall clock at open + monotonic
time since, so it never goes backwards), not index / sample_rate. sample_rate is the nominal fix
rate from the config (what windows and modules are told); Block.index counts fixes since open.
A pause longer than gap_s between fixes (receiver silent, sentences lost), or the receiver's own
UTC time going backwards or standing still (a receiver reset, a replayed log starting over),
marks the next block as a gap so no analysis window spans it. read() blocks until the next fix; close() wakes it.

Robustness: every line is checked: `$`/`!`, printable ASCII, at most max_line bytes, a `*hh`
checksum (required unless require_checksum: false) that matches, and well-formed fields.
Checksum mismatches are counted in `bad_checksums`, every other rejected line in `bad_lines`;
valid sentences the fix does not use (GSA, GSV, proprietary) in `ignored`. Garbage, binary
noise and endless lines are dropped, never raised. No bytes for timeout_s counts one `timeouts`
(the source stays up: a receiver may just be quiet). Only a port failure (the device unplugged:
SerialException) raises from read(), so the supervisor marks it FAILED and reopens it.

The port is injected: NmeaSource(name, config, port_factory=...) (default: pyserial from device
and the line settings); open() calls the factory again on every reopen.

simulate: true starts, at open(), a writer thread on a pseudo-terminal that replays an NMEA log
(the built-in two-minute one of a vehicle crossing a yard, or sim_log) in a loop, one epoch per
1/sample_rate seconds, bytes paced at the configured baud rate (10 bits per byte); the source
reads the pty's path through the same port and parser as on hardware.
"""
from __future__ import annotations

import collections
import logging
import math
import threading
import time
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from hal.registry import register_source
from hal.schema import ExistingFile, StrictModel
from hal.drivers.serial.nmea import (
    FIX_UNITS,
    BadChecksum,
    Fix,
    FixAssembler,
    LineSplitter,
    NmeaError,
    decode,
    parse_sentence,
)
from hal.drivers.serial.port import PortFactory, SerialLine, open_serial, port_io
from hal.source import Block, Health, Source, SourceInfo

log = logging.getLogger("hal.nmea")

Channel = Literal["fix_quality", "satellites", "latitude", "longitude", "altitude", "speed", "course", "hdop",
                  "north", "east"]
DEFAULT_CHANNELS = ["fix_quality", "satellites", "latitude", "longitude", "altitude", "speed", "course"]
EARTH_RADIUS_M = 6_371_008.8     # mean radius; north/east are local offsets, metres-accurate over km


class Origin(StrictModel):
    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)


class NmeaConfig(SerialLine):
    type: Literal["nmea"]
    baudrate: int = Field(4800, gt=0, le=4_000_000, description="bits per second (NMEA 0183: 4800; many "
                          "receivers: 9600 or more)")
    sample_rate: float = Field(1.0, gt=0, le=50, description="nominal fixes per second (the receiver's "
                               "navigation rate); samples arrive when fixes do")
    channels: list[Channel] = Field(default_factory=lambda: list(DEFAULT_CHANNELS), min_length=1,
                                    description="fix values to deliver, in this order")
    origin: Origin | None = Field(None, description="reference for north/east (default: the first fix)")
    require_checksum: bool = Field(True, description="reject sentences without *hh")
    max_line: int = Field(200, ge=82, le=4096, description="longer lines are dropped (NMEA allows 82 bytes)")
    timeout_s: float = Field(5.0, gt=0, le=3600, description="no bytes for this long counts a timeout")
    gap_s: float | None = Field(None, gt=0, description="fixes further apart mark a gap "
                                   "(default 3 / sample_rate)")
    sim_log: ExistingFile | None = Field(None, description="simulate: true only: the NMEA log to replay "
                                            "(default: a built-in one)")

    @field_validator("channels")
    @classmethod
    def _unique(cls, channels: list[str]) -> list[str]:
        if len(set(channels)) != len(channels):
            raise ValueError(f"channels must be unique, got {channels}")
        return channels


@register_source("nmea", NmeaConfig)
class NmeaSource(Source):
    COUNTERS = ("bad_lines", "bad_checksums", "ignored", "timeouts")
    READ_SLICE_S = 0.05

    def __init__(self, name: str, config: NmeaConfig, port_factory: PortFactory = open_serial) -> None:
        super().__init__(name, config)
        self._port_factory = port_factory
        self._channels = tuple(config.channels)
        self._period = 1.0 / config.sample_rate
        self._gap_s = config.gap_s if config.gap_s is not None else 3 * self._period
        self._stop = threading.Event()
        self._port = None
        self._sim = None   # hal.sim.nmea_receiver.NmeaSimulator with simulate: true
        self._splitter = LineSplitter(config.max_line)
        self._fixes = FixAssembler()
        self._ready: collections.deque[Fix] = collections.deque()
        self._origin: tuple[float, float] | None = None
        self._index = 0
        self._last_arrival_ns: int | None = None
        self._last_fix_time: float | None = None   # the receiver's UTC time of the last fix (s of day)
        self._wall0_ns = self._mono0_ns = 0
        self._last_rx = 0.0
        # Cumulative over the life of the source.
        self.lines = 0
        self.sentences = 0
        self.bad_lines = 0
        self.bad_checksums = 0
        self.ignored = 0
        self.fixes = 0
        self.timeouts = 0
        self.last_bad = ""

    @property
    def info(self) -> SourceInfo:
        units = {FIX_UNITS.get(c, "m") for c in self._channels}
        return SourceInfo(name=self.name, kind="gnss", sample_rate=self.config.sample_rate,
                          channels=self._channels, units=units.pop() if len(units) == 1 else "mixed")

    @property
    def channel_units(self) -> dict[str, str]:
        return {c: FIX_UNITS.get(c, "m") for c in self._channels}

    @property
    def device_path(self) -> str | None:
        return self._sim.path if self._sim is not None else self.config.device

    def open(self) -> None:
        self.close()
        self._stop.clear()
        cfg = self.config
        path = cfg.device
        if cfg.simulate:
            from hal.sim.nmea_receiver import NmeaSimulator
            self._sim = NmeaSimulator(cfg)
            path = self._sim.path
        self._port = self._port_factory(path, cfg, self.READ_SLICE_S)
        self._splitter.reset()
        self._fixes = FixAssembler()
        self._ready.clear()
        self._index = 0
        self._last_arrival_ns = None
        self._last_fix_time = None
        self._origin = None if cfg.origin is None else (cfg.origin.latitude, cfg.origin.longitude)
        self._wall0_ns, self._mono0_ns = time.time_ns(), time.monotonic_ns()
        self._last_rx = time.monotonic()
        self.set_health(Health.OK)

    def close(self) -> None:
        self._stop.set()
        port, self._port = self._port, None
        if port is not None:
            cancel = getattr(port, "cancel_read", None)
            try:
                if cancel is not None:
                    cancel()
                port.close()
            except Exception:
                log.debug("nmea %s: closing the port", self.name, exc_info=True)
        if self._sim is not None:
            self._sim.close()
            self._sim = None

    def _now_ns(self) -> int:
        return self._wall0_ns + (time.monotonic_ns() - self._mono0_ns)

    def read(self) -> Block:
        """Blocks until the next fix. Raises on a port failure, or once close() was called."""
        while True:
            if self._ready:
                return self._block(self._ready.popleft())
            port = self._port
            if port is None or self._stop.is_set():
                raise RuntimeError(f"source {self.name!r} is not open")
            with port_io("reading"):
                waiting = getattr(port, "in_waiting", 0) or 0
                chunk = port.read(min(max(1, waiting), 4096))
            now = time.monotonic()
            if chunk:
                self._last_rx = now
                arrival = self._now_ns()
                for line in self._splitter.feed(chunk):
                    self._line(line, arrival)
                continue
            pending = self._fixes.pending_since_ns
            if pending is not None and self._now_ns() - pending > 0.9 * self._period * 1e9:
                self._ready.append(self._fixes.flush())   # an epoch that lacks one of its sentences
            if now - self._last_rx >= self.config.timeout_s:
                self.timeouts += 1
                self._last_rx = now
                log.warning("nmea %s: no data for %g s", self.name, self.config.timeout_s)

    def _line(self, line: bytes | None, arrival_ns: int) -> None:
        self.lines += 1
        if line is None:
            self._bad(f"line longer than {self.config.max_line} bytes")
            return
        if not line.strip():
            self.lines -= 1            # blank lines (CR LF CR LF) are not lines of data
            return
        try:
            sentence = parse_sentence(line, self.config.require_checksum)
            data = decode(sentence)
        except BadChecksum as exc:
            self.bad_checksums += 1
            self.last_bad = f"{exc}: {line[:100]!r}"
            if self.bad_checksums == 1 or self.bad_checksums % 1000 == 0:
                log.warning("nmea %s: %s (%d bad checksums so far)", self.name, self.last_bad, self.bad_checksums)
            return
        except NmeaError as exc:
            self._bad(f"{exc}: {line[:100]!r}")
            return
        self.sentences += 1
        if data is None:
            self.ignored += 1
            return
        self._ready.extend(self._fixes.add(sentence.kind, data, arrival_ns))

    def _bad(self, reason: str) -> None:
        self.bad_lines += 1
        self.last_bad = reason
        if self.bad_lines == 1 or self.bad_lines % 1000 == 0:
            log.warning("nmea %s: bad line: %s (%d so far)", self.name, reason, self.bad_lines)

    def _block(self, fix: Fix) -> Block:
        self.fixes += 1
        values = fix.values(tuple(c for c in self._channels if c not in ("north", "east")))
        named = dict(zip((c for c in self._channels if c not in ("north", "east")), values))
        if "north" in self._channels or "east" in self._channels:
            named.update(zip(("north", "east"), self._local(fix)))
        data = np.array([[named[c]] for c in self._channels], dtype=np.float32)
        gap = self._last_arrival_ns is not None and fix.arrival_ns - self._last_arrival_ns > self._gap_s * 1e9
        gap |= self._time_jumped(fix)
        self._last_arrival_ns = fix.arrival_ns
        block = Block(data=data, start_ns=fix.arrival_ns, index=self._index, gap=gap)
        self._index += 1
        return block

    def _time_jumped(self, fix: Fix) -> bool:
        """The receiver's own clock went backwards or stood still since the last fix: a restart
        (a receiver reset, a replayed log starting over), which no analysis window may span,
        however regularly the sentences kept arriving. (A hole in the data shows in the arrival
        times; a log replayed faster than it was recorded advances its clock by more than the
        time that passed here, and is no gap.)"""
        t, last = fix.seconds_of_day, self._last_fix_time
        self._last_fix_time = t if t is not None else last
        if t is None or last is None:
            return False
        delta = t - last
        if delta < -43200:          # midnight passed
            delta += 86400
        return delta <= 0

    def _local(self, fix: Fix) -> tuple[float, float]:
        if fix.latitude is None or fix.longitude is None:
            return math.nan, math.nan
        if self._origin is None:
            self._origin = (fix.latitude, fix.longitude)
        lat0, lon0 = self._origin
        dlon = (fix.longitude - lon0 + 180.0) % 360.0 - 180.0
        north = math.radians(fix.latitude - lat0) * EARTH_RADIUS_M
        east = math.radians(dlon) * EARTH_RADIUS_M * math.cos(math.radians(lat0))
        return north, east
