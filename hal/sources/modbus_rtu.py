"""Modbus RTU polling source: process values from one or more slaves on one RS-485 bus.

Every poll_s the source reads its points (registers or coils) and delivers one Block with one
frame: one sample per point (channel), sample_rate = 1/poll_s, timestamps from the sample
index (SampleClock), so they are regular. Reading:

- One port, one master (hal.drivers.serial.modbus.RtuMaster): requests go out one at a time, so several
  slaves on one RS-485 line are polled in turn.
- Points of one slave and function whose addresses are contiguous (or at most max_gap apart) are
  read with one request (up to 125 registers / 2000 bits), unless group: false.
- A point's raw value (int16/uint16/int32/uint32/float32 from registers with the configured byte
  and word order, or a bit from functions 1/2) becomes raw * scale + offset.
- A point may be polled more slowly than the source (its poll_s a whole multiple of the
  source's); between its polls its channel repeats the last value read (sample and hold).

Errors on the bus do not stop the source. Each request ends as OK, TIMEOUT, CRC_ERROR,
EXCEPTION (with the slave's exception code) or INVALID; failures are counted in total per
transaction (`timeouts`, `crc_errors`, `exceptions`, `invalid_responses`, `exception_codes` by
name) and per point (`point_stats[name]`: every point served by the failed request counts it).
A point whose read failed gives NaN for that sample (on_error: nan, the default: analytics see
the hole) or repeats its last good value (on_error: hold; NaN until it was read once). A
point's failures and recoveries are logged when they start and end, not per poll. Only a port failure (the adapter
unplugged, the device path gone: SerialException) raises from read(), so the supervisor
marks the source FAILED, backs off and reopens it.

A cycle that overruns its period (e.g. many slaves timing out) skips the cycles it missed: the
next block's index jumps and it is marked as a gap, so no window spans the hole; `overruns`
counts skipped cycles. Leave room in poll_s for the timeouts you expect.

The port is injected: ModbusRtuSource(name, config, port_factory=...) (default: a pyserial
Serial from device and the line settings, hal.drivers.serial.port.open_serial); open() calls the factory
again on every reopen.

simulate: true starts, at open(), an in-process bus: a pymodbus RTU server on a pseudo-terminal
pair (hal.drivers.serial.port.NullModem) that serves every configured slave and point with slowly
varying values (a sine per point: the point's `sim` profile, or about 1000 raw counts +-10 %),
and reads it through the same port and master as on hardware.
"""
from __future__ import annotations

import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from hal.registry import register_source
from hal.schema import StrictModel
from hal.drivers.serial.modbus import (
    BIT_FUNCTIONS,
    MAX_READ_COUNT,
    REGISTER_COUNT,
    BusCounters,
    DataType,
    Order,
    Outcome,
    Reply,
    RtuMaster,
    decode_value,
)
from hal.drivers.serial.port import PortFactory, SerialLine, open_serial
from hal.source import Block, Health, SampleClock, Source, SourceInfo

log = logging.getLogger("hal.modbus_rtu")

_CHANNEL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,47}$")


class SimProfile(StrictModel):
    """How simulate: true varies a point: mean + amplitude * sin(2 pi t / period_s)."""

    mean: float = Field(description="engineering value (after scale/offset) at the middle of the swing")
    amplitude: float = Field(0.0, ge=0, description="half the swing, engineering units")
    period_s: float = Field(60.0, gt=0, description="seconds per swing")


class ModbusPoint(StrictModel):
    name: str = Field(description="the channel name")
    slave: int = Field(ge=1, le=247, description="slave (unit) id on the bus")
    function: Literal[1, 2, 3, 4] = Field(3, description="3 holding registers, 4 input registers, "
                                          "1 coils, 2 discrete inputs")
    address: int = Field(ge=0, le=65535, description="register or bit address as sent on the wire (0-based)")
    data_type: DataType | None = Field(None, description="int16, uint16, int32, uint32, float32 "
                                          "(default uint16); bool for functions 1/2 (the default there)")
    byte_order: Order = Field("big", description="byte order within each register (little: swapped bytes)")
    word_order: Order = Field("big", description="32-bit types: big = first register holds the high word")
    scale: float = Field(1.0, description="value = raw * scale + offset")
    offset: float = 0.0
    unit: str = Field("", description="unit of the scaled value, for display")
    poll_s: float | None = Field(None, gt=0, description="poll this point more slowly: a whole multiple "
                                    "of the source's poll_s (default: every cycle)")
    sim: SimProfile | None = Field(None, description="simulate: true only: how the value varies")

    @field_validator("name")
    @classmethod
    def _channel_name(cls, value: str) -> str:
        if not _CHANNEL_RE.match(value):
            raise ValueError("channel names start with a letter and use letters, digits, _ . - (at most 48)")
        return value

    @model_validator(mode="after")
    def _type_fits_function(self):
        if self.function in BIT_FUNCTIONS and self.data_type not in (None, "bool"):
            raise ValueError(f"function {self.function} reads bits: data_type must be bool, not {self.data_type}")
        if self.function not in BIT_FUNCTIONS and self.data_type == "bool":
            raise ValueError(f"data_type bool needs function 1 (coils) or 2 (discrete inputs), not {self.function}")
        if self.address + self.count > 0x10000:
            raise ValueError(f"a {self.dtype} at address {self.address} runs past 65535")
        return self

    @property
    def dtype(self) -> str:
        if self.data_type is not None:
            return self.data_type
        return "bool" if self.function in BIT_FUNCTIONS else "uint16"

    @property
    def count(self) -> int:
        """Registers (or bits) this point occupies."""
        return REGISTER_COUNT[self.dtype]


class ModbusRtuConfig(SerialLine):
    type: Literal["modbus_rtu"]
    timeout_s: float = Field(0.5, gt=0, le=30, description="longest wait for a slave's reply to one request")
    poll_s: float = Field(1.0, ge=0.01, le=86400, description="poll period: one sample per point per cycle")
    points: list[ModbusPoint] = Field(min_length=1, max_length=512, description="what to read, one channel each")
    group: bool = Field(True, description="read contiguous registers of one slave and function in one request")
    max_gap: int = Field(0, ge=0, le=100, description="with group: also merge points up to this many unused "
                         "registers/bits apart (they are read and discarded; the device must allow it)")
    on_error: Literal["nan", "hold"] = Field("nan", description="a failed read gives NaN, or repeats the "
                                             "point's last good value")
    frame_gap_s: float | None = Field(None, gt=0, le=1, description="silence that ends a reply early "
                                         "(default max(3.5 characters, 30 ms))")

    @field_validator("points")
    @classmethod
    def _unique_names(cls, points: list[ModbusPoint]) -> list[ModbusPoint]:
        names = [p.name for p in points]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"point names must be unique; repeated: {', '.join(dupes)}")
        return points

    @model_validator(mode="after")
    def _point_periods(self):
        for p in self.points:
            if p.poll_s is not None:
                ratio = p.poll_s / self.poll_s
                if ratio < 1 - 1e-9 or abs(ratio - round(ratio)) > 1e-6 * ratio:
                    raise ValueError(f"point {p.name!r}: poll_s {p.poll_s:g} must be a whole multiple of the "
                                     f"source's poll_s {self.poll_s:g}")
        return self

    @property
    def channels(self) -> list[str]:
        return [p.name for p in self.points]


@dataclass
class PointStats:
    polls: int = 0
    ok: int = 0
    timeouts: int = 0
    crc_errors: int = 0
    exceptions: int = 0
    invalid: int = 0
    last_error: str = ""
    exception_codes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Request:
    slave: int
    function: int
    address: int
    count: int
    points: tuple[int, ...]     # indices into config.points


def plan_requests(points: list[ModbusPoint], due: list[int], group: bool = True, max_gap: int = 0) -> list[_Request]:
    """The requests that read the due points: per slave and function in address order, merged
    while the span stays within one request's limit and the hole between points <= max_gap."""
    keyed = sorted(due, key=lambda i: (points[i].slave, points[i].function, points[i].address))
    out: list[_Request] = []
    cur: list[int] = []
    start = end = 0

    def flush():
        if cur:
            p0 = points[cur[0]]
            out.append(_Request(p0.slave, p0.function, start, end - start, tuple(cur)))

    for i in keyed:
        p = points[i]
        p_end = p.address + p.count
        if (group and cur and (points[cur[0]].slave, points[cur[0]].function) == (p.slave, p.function)
                and p.address <= end + max_gap and max(end, p_end) - start <= MAX_READ_COUNT[p.function]):
            cur.append(i)
            end = max(end, p_end)
            continue
        flush()
        cur, start, end = [i], p.address, p_end
    flush()
    return out


@register_source("modbus_rtu", ModbusRtuConfig)
class ModbusRtuSource(Source):
    COUNTERS = ("timeouts", "crc_errors", "exceptions", "invalid_responses", "overruns")
    def __init__(self, name: str, config: ModbusRtuConfig, port_factory: PortFactory = open_serial) -> None:
        super().__init__(name, config)
        self._port_factory = port_factory
        self._points = list(config.points)
        self._every = [1 if p.poll_s is None else max(1, round(p.poll_s / config.poll_s)) for p in self._points]
        self._plans: dict[tuple[int, ...], list[_Request]] = {}
        self._stop = threading.Event()
        self._port = None
        self._master: RtuMaster | None = None
        self._clock: SampleClock | None = None
        self._sim = None   # hal.sim.modbus_bus.SimulatedBus with simulate: true
        self._index = 0
        self._gap = False
        self._last = np.full(len(self._points), np.nan, dtype=np.float64)
        self._failing = [False] * len(self._points)
        # Cumulative over the life of the source (reopens included).
        self.bus = BusCounters()
        self.point_stats: dict[str, PointStats] = {p.name: PointStats() for p in self._points}
        self.overruns = 0

    # Totals, per transaction.
    @property
    def timeouts(self) -> int:
        return self.bus.timeouts

    @property
    def crc_errors(self) -> int:
        return self.bus.crc_errors

    @property
    def exceptions(self) -> int:
        return self.bus.exceptions

    @property
    def invalid_responses(self) -> int:
        return self.bus.invalid

    @property
    def exception_codes(self) -> dict[str, int]:
        return dict(self.bus.exception_codes)

    @property
    def requests(self) -> int:
        return self.bus.requests

    @property
    def info(self) -> SourceInfo:
        units = {p.unit for p in self._points}
        return SourceInfo(name=self.name, kind="process", sample_rate=1.0 / self.config.poll_s,
                          channels=tuple(p.name for p in self._points),
                          units=units.pop() if len(units) == 1 else "mixed")

    @property
    def channel_units(self) -> dict[str, str]:
        return {p.name: p.unit for p in self._points}

    @property
    def device_path(self) -> str | None:
        """The path the port was opened from (the simulated bus's pty with simulate: true)."""
        return self._sim.client_path if self._sim is not None else self.config.device

    def open(self) -> None:
        self.close()
        self._stop.clear()
        cfg = self.config
        path = cfg.device
        if cfg.simulate:
            from hal.sim.modbus_bus import SimulatedBus   # pymodbus's server: only when simulating
            self._sim = SimulatedBus(cfg)
            path = self._sim.client_path
        port = self._port_factory(path, cfg, RtuMaster.READ_SLICE_S)
        self._port = port
        self._master = RtuMaster(port, cfg, cfg.timeout_s, cfg.frame_gap_s)
        self._index = 0
        self._gap = False
        self._clock = SampleClock(1.0 / cfg.poll_s)
        self.set_health(Health.OK)

    def close(self) -> None:
        self._stop.set()
        port, self._port, self._master = self._port, None, None
        if port is not None:
            cancel = getattr(port, "cancel_read", None)
            try:
                if cancel is not None:
                    cancel()
                port.close()
            except Exception:   # closing after a failure: the port may be half gone
                log.debug("modbus %s: closing the port", self.name, exc_info=True)
        if self._sim is not None:
            self._sim.close()
            self._sim = None

    def read(self) -> Block:
        clock, master = self._clock, self._master
        if clock is None or master is None:
            raise RuntimeError(f"source {self.name!r} is not open")
        idx = self._index
        clock.wait_until(idx, self._stop)
        if self._stop.is_set():
            raise RuntimeError(f"source {self.name!r} was closed")
        values = self.poll_cycle(idx, master)
        block = Block(data=values.astype(np.float32)[:, None], start_ns=clock.timestamp_ns(idx),
                      index=idx, gap=self._gap)
        # The next cycle, or the current one if polling overran whole cycles.
        due_now = math.floor((time.monotonic() - clock.mono0) * clock.sample_rate)
        nxt = max(idx + 1, due_now)
        overran = nxt > idx + 1
        if overran:
            self.overruns += nxt - idx - 1
            if not self._gap:        # say it when it starts, not every cycle
                log.warning("modbus %s: polling overran the %g s cycle; skipped %d cycle(s) (%d so far)",
                            self.name, self.config.poll_s, nxt - idx - 1, self.overruns)
        self._gap = overran
        self._index = nxt
        return block

    def poll_cycle(self, idx: int, master: RtuMaster) -> np.ndarray:
        """Poll the points due in cycle idx; the others hold their last value."""
        due = tuple(i for i, every in enumerate(self._every) if idx % every == 0)
        plan = self._plans.get(due)
        if plan is None:
            plan = self._plans[due] = plan_requests(self._points, list(due), self.config.group, self.config.max_gap)
        for req in plan:
            reply = master.read(req.slave, req.function, req.address, req.count)
            self.bus.count(reply)
            for i in req.points:
                self._apply(i, req, reply)
        return self._last.copy()

    def _apply(self, i: int, req: _Request, reply: Reply) -> None:
        p = self._points[i]
        st = self.point_stats[p.name]
        st.polls += 1
        if reply.ok:
            off = p.address - req.address
            if p.dtype == "bool":
                raw = float(reply.bits[off])
            else:
                raw = decode_value(reply.registers[off:off + p.count], p.dtype, p.byte_order, p.word_order)
            self._last[i] = raw * p.scale + p.offset
            st.ok += 1
            if self._failing[i]:
                self._failing[i] = False
                log.info("modbus %s: point %s (slave %d) reads again", self.name, p.name, p.slave)
            return
        if reply.outcome is Outcome.TIMEOUT:
            st.timeouts += 1
        elif reply.outcome is Outcome.CRC_ERROR:
            st.crc_errors += 1
        elif reply.outcome is Outcome.EXCEPTION:
            st.exceptions += 1
            st.exception_codes[reply.exception_name] = st.exception_codes.get(reply.exception_name, 0) + 1
        else:
            st.invalid += 1
        st.last_error = f"{reply.outcome.value}: {reply.detail}"
        if self.config.on_error == "nan":
            self._last[i] = np.nan
        if not self._failing[i]:
            self._failing[i] = True
            log.warning("modbus %s: point %s (slave %d, function %d, address %d): %s", self.name, p.name,
                        p.slave, p.function, p.address, st.last_error)
