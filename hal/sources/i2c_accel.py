"""A 3-axis accelerometer on an I2C bus (ADXL345 or LIS3DH), read through its FIFO.

open() probes the chip (its ID register) and configures it (every register write read back);
read() waits about poll_s, drains what the FIFO holds and returns it as one block: planar float32
(3, k), k varying with timing, timestamps from the sample index. A FIFO overrun is counted
(`overruns`) and the next block has gap=True, its index moved on by the time that passed. A chip
that stops delivering samples (reset by a power glitch, reconfigured by someone else) is an
error after a few FIFO periods. Every failure raises: the supervisor counts it, marks the source
FAILED, closes it, backs off and reopens it, which probes and configures the chip afresh.

`emulate: true` puts the register-map emulator of the chip (hal/sim/i2c_chips.py) under the very
same driver: the simulated I2C accelerometer for demos and CI. Tests may instead inject any bus
with the `bus_factory` keyword (not settable from YAML).
"""
from __future__ import annotations

import errno
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

from pydantic import Field, ValidationInfo, field_validator

from hal.drivers.i2c import adxl345, lis3dh
from hal.drivers.i2c.bus import I2cChip, I2cError, LazySMBus, Transport
from hal.sim.i2c_chips import EmulatedBus, EmulatedChip, emulated_bus
from hal.registry import register_source
from hal.schema import ChannelNames, StrictModel
from hal.source import Block, Health, SampleClock, Source, SourceInfo

FIFO_DEPTH = 32
STALL_MIN_S = 1.0          # no samples for this long (or 3 FIFO fills, if longer) is an error


@dataclass(frozen=True)
class ChipSpec:
    name: str
    addresses: tuple[int, ...]
    default_rate: float
    default_range: int
    rate: Callable[[float], tuple[int, float]]    # configured rate -> (code, exact Hz); ValueError lists them


CHIPS = {
    "adxl345": ChipSpec("ADXL345", adxl345.ADDRESSES, 800.0, 16, adxl345.rate_code),
    "lis3dh": ChipSpec("LIS3DH", lis3dh.ADDRESSES, 400.0, 4, lis3dh.odr_code),
}


class I2cAccelConfig(StrictModel):
    type: Literal["i2c_accel"]
    chip: Literal["adxl345", "lis3dh"] = Field(description="accelerometer model")
    bus: int = Field(1, ge=0, description="I2C bus number: the N of /dev/i2c-N")
    address: Optional[int] = Field(None, description="7-bit address; default 0x53 for the ADXL345 (0x1D with "
                                   "SDO high), 0x18 for the LIS3DH (0x19 with SDO/SA0 high)")
    sample_rate: Optional[float] = Field(None, gt=0, description="output data rate in Hz, one the chip has; "
                                         "default 800 (ADXL345), 400 (LIS3DH)")
    range_g: Optional[Literal[2, 4, 8, 16]] = Field(None, description="full scale +-g; default 16 (ADXL345, "
                                                    "3.9 mg/LSB at every range in full resolution), 4 (LIS3DH)")
    high_resolution: bool = Field(True, description="ADXL345 FULL_RES (3.9 mg/LSB); LIS3DH HR mode (12 bit); "
                                  "false: 10-bit samples")
    watermark: int = Field(16, ge=1, le=31, description="FIFO watermark in samples (stream mode)")
    axes: ChannelNames = Field(default_factory=lambda: ["x", "y", "z"], min_length=3, max_length=3,
                            description="channel names of the X, Y and Z axes")
    units: Literal["g", "m/s2"] = Field("g", description="units of the samples")
    poll_s: Optional[float] = Field(None, gt=0, le=60, description="how often the FIFO is drained; default "
                                    "watermark / sample_rate / 2")
    emulate: bool = Field(False, description="use the built-in register-map emulator of the chip instead of "
                          "/dev/i2c-N: the simulated sensor for demos and CI (same driver code)")

    @field_validator("address", mode="before")
    @classmethod
    def _hex_text(cls, value: Any) -> Any:
        # YAML reads 0x53 as a number already; accept "0x53" written as text too.
        if isinstance(value, str):
            try:
                return int(value, 0)
            except ValueError:
                raise ValueError(f"{value!r} is not an address (write it as 0x53 or 83)") from None
        return value

    @field_validator("address")
    @classmethod
    def _address(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        spec = CHIPS.get(info.data.get("chip", ""))
        if value is None:
            return spec.addresses[0] if spec else None
        if not 0x03 <= value <= 0x77:
            raise ValueError(f"0x{value:02X} is not a 7-bit I2C device address (0x03..0x77)")
        return value

    @field_validator("sample_rate")
    @classmethod
    def _rate(cls, value: Optional[float], info: ValidationInfo) -> Optional[float]:
        spec = CHIPS.get(info.data.get("chip", ""))
        if spec is None:
            return value
        if value is None:
            value = spec.default_rate
        return spec.rate(value)[1]        # ValueError names the rates the chip has

    @field_validator("range_g")
    @classmethod
    def _range(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        spec = CHIPS.get(info.data.get("chip", ""))
        return spec.default_range if value is None and spec else value

    @field_validator("poll_s")
    @classmethod
    def _poll_within_fifo(cls, value: Optional[float], info: ValidationInfo) -> Optional[float]:
        rate = info.data.get("sample_rate")
        if value is not None and rate:
            fill_s = FIFO_DEPTH / rate
            if value >= fill_s:
                raise ValueError(f"the {FIFO_DEPTH}-sample FIFO fills in {fill_s:g} s at {rate:g} Hz; poll_s must be "
                                 f"shorter or samples are lost at every poll")
        return value

    @property
    def poll_interval(self) -> float:
        return self.poll_s if self.poll_s is not None else self.watermark / self.sample_rate / 2


BusFactory = Callable[[I2cAccelConfig], Transport]


@register_source("i2c_accel", I2cAccelConfig)
class I2cAccelSource(Source):
    COUNTERS = ("overruns",)
    def __init__(self, name: str, config: I2cAccelConfig, *, bus_factory: BusFactory | None = None) -> None:
        super().__init__(name, config)
        self.emulated_bus: EmulatedBus | None = None
        if bus_factory is None:
            if config.emulate:
                # One emulated chip for the source's lifetime: like hardware, it outlives reopens.
                self.emulated_bus = emulated_bus(config.chip, config.address, bus_number=config.bus)
                bus_factory = lambda cfg: self.emulated_bus   # noqa: E731
            else:
                bus_factory = lambda cfg: LazySMBus(cfg.bus)  # noqa: E731
        self._bus_factory = bus_factory
        self._rate = float(config.sample_rate)
        self._poll_s = config.poll_interval
        self._stall_s = max(STALL_MIN_S, 3 * FIFO_DEPTH / self._rate)
        self._stop = threading.Event()
        self._bus: Transport | None = None
        self._driver: Any = None
        self._clock: SampleClock | None = None
        self._index = 0
        self._gap = False
        self._next_poll = 0.0
        self._last_data = 0.0
        self.overruns = 0      # FIFO overruns seen, over every open
        self.errors = 0        # open/read failures raised

    @property
    def info(self) -> SourceInfo:
        return SourceInfo(name=self.name, kind="vibration", sample_rate=self._rate,
                          channels=tuple(self.config.axes), units=self.config.units)

    @property
    def emulator(self) -> EmulatedChip | None:
        """The emulated chip under an `emulate: true` source (to unplug it in a demo or test)."""
        if self.emulated_bus is None:
            return None
        return self.emulated_bus.devices[self.config.address]

    def make_driver(self, bus: Transport) -> I2cChip:
        cfg = self.config
        common = dict(bus_number=cfg.bus, sample_rate=cfg.sample_rate, range_g=cfg.range_g,
                      watermark=cfg.watermark, units=cfg.units)
        if cfg.chip == "adxl345":
            return adxl345.ADXL345(bus, cfg.address, full_resolution=cfg.high_resolution, **common)
        return lis3dh.LIS3DH(bus, cfg.address, high_resolution=cfg.high_resolution, **common)

    def open(self) -> None:
        self._close_bus()
        self._stop.clear()
        try:
            self._bus = self._bus_factory(self.config)
            driver = self.make_driver(self._bus)
            driver.configure()                 # probe + configure; raises with the likely cause
        except Exception:
            self.errors += 1
            self._close_bus()
            raise
        self._driver = driver
        # Measuring starts at the last configuration write: sample 0 is due about now.
        self._clock = SampleClock(self._rate)
        self._index = 0
        self._gap = False
        self._next_poll = self._last_data = time.monotonic()
        self.set_health(Health.OK)

    def close(self) -> None:
        # Wakes a read() that is waiting, so a supervisor can stop the source promptly.
        self._stop.set()
        driver, self._driver = self._driver, None
        if driver is not None:
            try:
                driver.standby()
            except OSError:
                pass                           # unplugged: nothing to put to sleep
        self._close_bus()

    def _close_bus(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            try:
                bus.close()
            except OSError:
                pass

    def read(self) -> Block | None:
        driver, clock = self._driver, self._clock
        if driver is None or clock is None:
            raise RuntimeError(f"source {self.name!r}: read() while not open")
        while True:
            self._next_poll += self._poll_s
            delay = self._next_poll - time.monotonic()
            if delay > 0:
                if self._stop.wait(delay):
                    raise RuntimeError(f"source {self.name!r}: closed while reading")
            else:
                self._next_poll = time.monotonic()      # fell behind: poll now, never in a burst
            try:
                fifo = driver.read_fifo()
            except Exception:
                self.errors += 1
                raise
            if fifo.overrun:
                self.overruns += 1
                self._gap = True
            frames = fifo.data.shape[1]
            now = time.monotonic()
            if frames:
                self._last_data = now
                break
            if now - self._last_data > self._stall_s:
                self.errors += 1
                raise I2cError(f"{driver.NAME} at {driver.where}: no samples for {now - self._last_data:.1f} s "
                               f"although it should deliver {self._rate:g} per second; the chip may have been "
                               f"reset (power glitch, loose supply) or reconfigured by another program. "
                               f"Reopening configures it again.", errno.EIO)
        start = self._index
        if self._gap:
            # Samples were lost: place this block by the time that has passed since open.
            elapsed = round((now - clock.mono0) * self._rate)
            start = max(start, elapsed - frames)
        block = Block(data=fifo.data, start_ns=clock.timestamp_ns(start), index=start, gap=self._gap)
        self._index = start + frames
        self._gap = False
        return block
