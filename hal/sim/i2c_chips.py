"""Register-map emulators of the ADXL345 and LIS3DH behind the smbus2 interface.

Used by the drivers' tests and, through `emulate: true`, as the simulated I2C accelerometer for
demos and CI: the driver code path is exactly the one that runs against hardware, only the
object under it differs.

:class:`EmulatedBus` offers the smbus2 ``SMBus`` methods the drivers use and routes each message
to the chip emulator at its address; an address with nothing attached (or an unplugged chip)
NACKs, which Linux reports as ``OSError(121, 'Remote I/O error')``. Each chip emulates, from
its datasheet:

* the register file: reset values, read-only registers (writes ignored, as the chips do),
  reserved bits (read as 0 whatever was written), reserved registers (read 0, writes ignored),
  the register address pointer and its auto-increment rules;
* sampling: from the moment the chip is measuring, sample n exists at t0 + (n + 1) / ODR on an
  injectable clock (`clock`, default time.monotonic), its value a function of (time, index)
  (`generator`, default a sine per axis plus noise), quantised like the chip at the configured
  range and resolution;
* the 32-level FIFO: bypass, FIFO (stops when full) and stream mode (keeps the newest 32),
  watermark and overrun flags, one entry popped per data read as the datasheet describes.
  `lost` counts samples the FIFO dropped; trigger / stream-to-FIFO modes run as stream mode.

Fault injection: ``fail_next(n)`` makes the next n transactions fail with OSError 121;
``id_override`` makes the identification register read another value; ``corrupt_readback(reg,
xor)`` flips bits of one register when it is read (a stuck bit, a bad bus); ``unplug()`` makes
the chip vanish from the bus, ``replug()`` brings it back powered up from reset (its
configuration is gone, as after a real power cycle).

Simplifications: the ADXL345's extra entry in its output registers (33 readable entries) is not
modelled (32), sleep/auto-sleep, tap/activity/free-fall functions, self-test and interrupt pins
are not emulated (their registers exist and hold values).
"""
from __future__ import annotations

import ctypes
import errno
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable

Generator = Callable[[float, int], tuple[float, float, float]]
Clock = Callable[[], float]

FIFO_DEPTH = 32
EREMOTEIO = errno.EREMOTEIO   # 121: what the kernel reports for a NACK


def remote_io_error(code: int = EREMOTEIO) -> OSError:
    return OSError(code, os.strerror(code))


# ---- sample generators -----------------------------------------------------------------------

def _hash01(seed: int, index: int, axis: int) -> float:
    """A uniform number in [0, 1) addressed by (seed, index, axis): splitmix64 of the three."""
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + axis * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return (z >> 11) / float(1 << 53)


@dataclass(frozen=True)
class SineNoise:
    """Default generator: per axis offset + amplitude * sin(2 pi f t) + uniform noise with std.
    dev. noise_g; z carries 1 g of gravity. A pure function of (t, index)."""

    freqs_hz: tuple[float, float, float] = (50.0, 120.0, 50.0)
    amplitudes_g: tuple[float, float, float] = (0.25, 0.1, 0.05)
    offsets_g: tuple[float, float, float] = (0.0, 0.0, 1.0)
    noise_g: float = 0.005
    seed: int = 0

    def __call__(self, t: float, index: int) -> tuple[float, float, float]:
        out = []
        for axis in range(3):
            v = self.offsets_g[axis] + self.amplitudes_g[axis] * math.sin(2 * math.pi * self.freqs_hz[axis] * t)
            if self.noise_g:
                v += self.noise_g * math.sqrt(3) * (2 * _hash01(self.seed, index, axis) - 1)
            out.append(v)
        return out[0], out[1], out[2]


def constant(x: float, y: float, z: float) -> Generator:
    return lambda t, index: (x, y, z)


class ManualClock:
    """A clock for deterministic tests: time moves only when advance() says so."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---- the chip emulator base ------------------------------------------------------------------

@dataclass(frozen=True)
class Reg:
    reset: int = 0x00
    writable: int = 0xFF      # bits a write can change; the others read as in `fixed`
    fixed: int = 0x00
    readonly: bool = False


class EmulatedChip:
    """Register file, address pointer, sampling clock and 32-level FIFO shared by both chips.
    Subclasses describe their registers and flags; all public methods are thread-safe."""

    NAME = "chip"
    REGISTERS: dict[int, Reg] = {}
    ID_REGISTER = 0x00

    def __init__(self, *, generator: Generator | None = None, clock: Clock | None = None) -> None:
        self.generator: Generator = generator or SineNoise()
        self.clock: Clock = clock or time.monotonic
        self.lock = threading.RLock()
        self.plugged = True
        self.id_override: int | None = None
        self.corrupt: dict[int, int] = {}
        self.transactions = 0     # transactions addressed to this chip (failed ones included)
        self.lost = 0             # samples the FIFO dropped (overwritten, or not collected when full)
        self.sample_index = 0     # samples produced since the emulator was created (survives power cycles)
        self._fail_next = 0
        self._fail_errno = EREMOTEIO
        self.power_on()

    # -- fault injection --

    def fail_next(self, transactions: int, code: int = EREMOTEIO) -> None:
        with self.lock:
            self._fail_next, self._fail_errno = transactions, code

    def corrupt_readback(self, register: int, xor: int = 0x01) -> None:
        """Reads of `register` return its value XOR `xor` (0 removes the fault)."""
        with self.lock:
            if xor:
                self.corrupt[register] = xor
            else:
                self.corrupt.pop(register, None)

    def unplug(self) -> None:
        with self.lock:
            self.plugged = False

    def replug(self) -> None:
        """Back on the bus after a power cycle: registers at their reset values, FIFO empty."""
        with self.lock:
            self.power_on()
            self.plugged = True

    # -- state --

    def power_on(self) -> None:
        self.regs = bytearray(256)
        for reg, spec in self.REGISTERS.items():
            self.regs[reg] = spec.reset
        self.pointer = 0
        self.fifo: deque[bytes] = deque()
        self.latest = bytes(6)        # the most recent sample (bypass mode output)
        self.output = bytes(6)        # what the data registers show once the FIFO is empty
        self.unread = False           # bypass: a sample nobody has read yet
        self.overrun = False
        self._rate = 0.0
        self._t0 = 0.0
        self._produced = 0

    def register(self, reg: int) -> int:
        """The stored value of a register, without side effects (for tests)."""
        with self.lock:
            return self.regs[reg]

    # -- sampling --

    def rate(self) -> float:
        """Samples per second now; 0 when not measuring."""
        raise NotImplementedError

    def fifo_mode(self) -> str:
        """'bypass', 'fifo' or 'stream'."""
        raise NotImplementedError

    def encode(self, sample_g: tuple[float, float, float]) -> bytes:
        raise NotImplementedError

    def _restart_sampling(self) -> None:
        """Called after a write that may change the rate or start/stop measuring."""
        rate = self.rate()
        if rate != self._rate:
            self._rate, self._t0, self._produced = rate, self.clock(), 0

    def advance(self) -> None:
        """Produce every sample that is due by now."""
        rate = self._rate
        if rate <= 0:
            return
        due = math.floor((self.clock() - self._t0) * rate + 1e-9)
        new = due - self._produced
        if new <= 0:
            return
        first, last = self._produced, due        # samples [first, last) of this run are due
        mode = self.fifo_mode()
        if mode == "stream" and new > FIFO_DEPTH:
            # All but the newest 32 would be overwritten before anyone could read them.
            skipped = new - FIFO_DEPTH
            self.lost += len(self.fifo) + skipped
            self.fifo.clear()
            self._on_loss()
            first += skipped
        elif mode == "fifo" and len(self.fifo) + new > FIFO_DEPTH:
            room = FIFO_DEPTH - len(self.fifo)   # the FIFO stops collecting when full
            self.lost += new - room
            self._on_loss()
            last = first + room
        elif mode == "bypass" and new > 1:
            self._on_bypass_overwrite()          # only the newest matters; the others went unread
            first = due - 1
        for n in range(first, last):
            self._ingest(n)
        self.sample_index += new
        self._produced = due

    def _ingest(self, n: int) -> None:
        t = self._t0 + (n + 1) / self._rate
        data = self.encode(self.generator(t, self.sample_index + (n - self._produced)))
        self.latest = data
        mode = self.fifo_mode()
        if mode == "bypass":
            if self.unread:
                self._on_bypass_overwrite()
            self.unread = True
            return
        if len(self.fifo) >= FIFO_DEPTH:
            self.lost += 1
            self._on_loss()
            if mode == "fifo":
                return
            self.fifo.popleft()
        self.fifo.append(data)
        self._on_stored()

    def _on_loss(self) -> None:
        self.overrun = True

    def _on_stored(self) -> None:
        pass

    def _on_bypass_overwrite(self) -> None:
        self.overrun = True

    def clear_fifo(self) -> None:
        self.fifo.clear()
        self.overrun = False

    def pop(self) -> None:
        """One FIFO entry (or, in bypass, the current sample) has been read."""
        if self.fifo_mode() == "bypass":
            self.unread = False
            self.overrun = False
            return
        if self.fifo:
            self.output = self.fifo.popleft()
            self.overrun = False

    def current_sample(self) -> bytes:
        if self.fifo_mode() == "bypass":
            return self.latest
        return self.fifo[0] if self.fifo else self.output

    # -- register access (the bus calls these inside one transaction) --

    def begin(self) -> None:
        """Start of a transaction addressed to this chip: fault injection, time advances."""
        self.transactions += 1
        if self._fail_next > 0:
            self._fail_next -= 1
            raise remote_io_error(self._fail_errno)
        self.advance()

    def write(self, data: bytes) -> None:
        """A write message: register address, then data bytes."""
        if not data:
            return
        self.set_pointer(data[0])
        for value in data[1:]:
            self.write_register(self.pointer, value)
            self.pointer = self.next_pointer(self.pointer, reading=False)

    def read(self, length: int) -> bytes:
        out = bytearray()
        for _ in range(length):
            out.append(self.read_register(self.pointer))
            self.after_read_byte(self.pointer)
            self.pointer = self.next_pointer(self.pointer, reading=True)
        self.after_read_message()
        return bytes(out)

    def set_pointer(self, byte: int) -> None:
        self.pointer = byte

    def next_pointer(self, pointer: int, reading: bool) -> int:
        return (pointer + 1) & 0xFF

    def after_read_byte(self, reg: int) -> None:
        pass

    def after_read_message(self) -> None:
        pass

    def write_register(self, reg: int, value: int) -> None:
        spec = self.REGISTERS.get(reg)
        if spec is None or spec.readonly:
            return                       # reserved or read-only: the chip ignores the write
        old = self.regs[reg]
        self.regs[reg] = (value & spec.writable) | (spec.fixed & ~spec.writable & 0xFF)
        self.on_write(reg, old, self.regs[reg])

    def on_write(self, reg: int, old: int, new: int) -> None:
        pass

    def read_register(self, reg: int) -> int:
        if reg == self.ID_REGISTER and self.id_override is not None:
            value = self.id_override
        else:
            value = self.dynamic(reg)
            if value is None:
                value = self.regs[reg] if reg in self.REGISTERS else 0x00
        return value ^ self.corrupt.get(reg, 0)

    def dynamic(self, reg: int) -> int | None:
        """Value of a status or data register, None for a plain stored register."""
        return None


def _clip(v: int, bits: int) -> int:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return lo if v < lo else hi if v > hi else v


# ---- ADXL345 ---------------------------------------------------------------------------------

_ADXL_RW = {**{r: Reg() for r in range(0x1D, 0x2B)},
            0x2A: Reg(writable=0x0F),                   # TAP_AXES: bits 7:4 are 0
            0x2C: Reg(reset=0x0A, writable=0x1F),      # BW_RATE: LOW_POWER, Rate
            0x2D: Reg(writable=0x3F),                  # POWER_CTL: Link, AUTO_SLEEP, Measure, Sleep, Wakeup
            0x2E: Reg(), 0x2F: Reg(),                  # INT_ENABLE, INT_MAP
            0x31: Reg(writable=0xEF),                  # DATA_FORMAT: bit 4 is 0
            0x38: Reg()}                               # FIFO_CTL
_ADXL_RO = {0x00: Reg(reset=0xE5, readonly=True), 0x2B: Reg(readonly=True), 0x30: Reg(reset=0x02, readonly=True),
            **{r: Reg(readonly=True) for r in range(0x32, 0x38)}, 0x39: Reg(readonly=True)}


class EmulatedADXL345(EmulatedChip):
    """ADXL345 register map and FIFO (datasheet Rev. E). The register pointer auto-increments on
    every multi-byte access; any read that touches DATAX0..DATAZ1 pops one FIFO entry when it
    ends; INT_SOURCE's Overrun bit is set when the FIFO fills (in bypass: when a sample replaces
    an unread one) and cleared when data is read; Watermark is set while Entries >= Samples."""

    NAME = "ADXL345"
    REGISTERS = {**_ADXL_RW, **_ADXL_RO}
    ID_REGISTER = 0x00
    G_PER_LSB = 0.0039          # typical; full resolution, and +-2 g in 10-bit mode
    OFFSET_G_PER_LSB = 0.0156   # OFSX/OFSY/OFSZ

    def power_on(self) -> None:
        super().power_on()
        self._touched_data = False

    def rate(self) -> float:
        if not self.regs[0x2D] & 0x08:        # Measure
            return 0.0
        return 3200.0 / 2 ** (15 - (self.regs[0x2C] & 0x0F))

    def fifo_mode(self) -> str:
        return ("bypass", "fifo", "stream", "stream")[self.regs[0x38] >> 6]

    def encode(self, sample_g: tuple[float, float, float]) -> bytes:
        fmt = self.regs[0x31]
        range_g = 2 << (fmt & 0x03)
        full_res = bool(fmt & 0x08)
        bits = 10 + (fmt & 0x03) if full_res else 10
        lsb = self.G_PER_LSB if full_res else self.G_PER_LSB * range_g / 2
        out = bytearray()
        for axis, g in enumerate(sample_g):
            ofs = ctypes.c_int8(self.regs[0x1E + axis]).value * self.OFFSET_G_PER_LSB
            counts = _clip(round((g + ofs) / lsb), bits)
            if fmt & 0x04:                   # Justify: left-justified (MSB first bit)
                counts <<= 16 - bits
            out += (counts & 0xFFFF).to_bytes(2, "little")
        return bytes(out)

    def _on_stored(self) -> None:
        if len(self.fifo) >= FIFO_DEPTH:
            self.overrun = True               # "set when the FIFO is filled"

    def on_write(self, reg: int, old: int, new: int) -> None:
        if reg == 0x38 and (new >> 6 != old >> 6 or new >> 6 == 0):
            self.clear_fifo()                 # a mode change (bypass in particular) empties the FIFO
        if reg in (0x2C, 0x2D):
            self._restart_sampling()

    def dynamic(self, reg: int) -> int | None:
        if reg == 0x30:                       # INT_SOURCE
            samples = self.regs[0x38] & 0x1F
            bypass = self.fifo_mode() == "bypass"
            ready = self.unread if bypass else bool(self.fifo)
            watermark = samples == 0 or (not bypass and len(self.fifo) >= samples)
            return (0x80 if ready else 0) | (0x02 if watermark else 0) | (0x01 if self.overrun else 0)
        if reg == 0x39:                       # FIFO_STATUS
            return 0 if self.fifo_mode() == "bypass" else len(self.fifo) & 0x3F
        if 0x32 <= reg <= 0x37:
            return self.current_sample()[reg - 0x32]
        return None

    def after_read_byte(self, reg: int) -> None:
        if 0x32 <= reg <= 0x37:
            self._touched_data = True

    def after_read_message(self) -> None:
        if self._touched_data:                # the FIFO pops when the data read ends
            self._touched_data = False
            self.pop()


# ---- LIS3DH ----------------------------------------------------------------------------------

_LIS_RO = {0x07: Reg(readonly=True), **{r: Reg(readonly=True) for r in range(0x08, 0x0F)},
           0x0F: Reg(reset=0x33, readonly=True), 0x27: Reg(readonly=True),
           **{r: Reg(readonly=True) for r in range(0x28, 0x2E)}, 0x2F: Reg(reset=0x20, readonly=True),
           0x31: Reg(readonly=True), 0x35: Reg(readonly=True), 0x39: Reg(readonly=True)}
_LIS_RW = {0x1E: Reg(reset=0x10, writable=0x80, fixed=0x10),   # CTRL_REG0: bits 6:0 must stay 0010000
           0x1F: Reg(writable=0xC0),                            # TEMP_CFG_REG
           0x20: Reg(reset=0x07),                               # CTRL_REG1
           0x21: Reg(), 0x22: Reg(writable=0xFE),               # CTRL_REG2, CTRL_REG3 (bit 0 reserved)
           0x23: Reg(), 0x24: Reg(writable=0xCF),               # CTRL_REG4, CTRL_REG5 (bits 5:4 reserved)
           0x25: Reg(writable=0xFA), 0x26: Reg(),               # CTRL_REG6 (bits 2, 0 reserved), REFERENCE
           0x2E: Reg(),                                         # FIFO_CTRL_REG
           0x30: Reg(), 0x32: Reg(writable=0x7F), 0x33: Reg(writable=0x7F),
           0x34: Reg(), 0x36: Reg(writable=0x7F), 0x37: Reg(writable=0x7F),
           0x38: Reg(writable=0x3F), 0x3A: Reg(), 0x3B: Reg(writable=0x7F), 0x3C: Reg(), 0x3D: Reg(),
           0x3E: Reg(writable=0x7F), 0x3F: Reg()}

_LIS_ODR = {1: 1.0, 2: 10.0, 3: 25.0, 4: 50.0, 5: 100.0, 6: 200.0, 7: 400.0, 8: 1600.0}
_LIS_G_PER_DIGIT = {"hr": (12, (0.001, 0.002, 0.004, 0.012)), "normal": (10, (0.004, 0.008, 0.016, 0.048)),
                    "low_power": (8, (0.016, 0.032, 0.064, 0.192))}


class EmulatedLIS3DH(EmulatedChip):
    """LIS3DH register map and FIFO (datasheet DocID17530). The register address auto-increments
    only when its MSB is set; with the FIFO enabled, reading OUT_Z_H completes a slot: the FIFO
    pops and the pointer wraps back to OUT_X_L, so one burst reads many samples. FIFO_SRC_REG: WTM
    while FSS >= FTH, OVRN_FIFO once a sample has been overwritten (stream) or not collected (FIFO
    mode) until a read frees a slot, EMPTY, FSS = unread samples (a 5-bit field: 31 when full)."""

    NAME = "LIS3DH"
    REGISTERS = {**_LIS_RO, **_LIS_RW}
    ID_REGISTER = 0x0F

    def power_on(self) -> None:
        super().power_on()
        self.auto_increment = False

    def rate(self) -> float:
        ctrl1 = self.regs[0x20]
        code = ctrl1 >> 4
        if code == 9:
            return 5376.0 if ctrl1 & 0x08 else 1344.0
        return _LIS_ODR.get(code, 0.0)

    def mode(self) -> str:
        if self.regs[0x20] & 0x08:
            return "low_power"
        return "hr" if self.regs[0x23] & 0x08 else "normal"

    def fifo_enabled(self) -> bool:
        return bool(self.regs[0x24] & 0x40)

    def fifo_mode(self) -> str:
        if not self.fifo_enabled():
            return "bypass"
        return ("bypass", "fifo", "stream", "stream")[self.regs[0x2E] >> 6]

    def encode(self, sample_g: tuple[float, float, float]) -> bytes:
        bits, table = _LIS_G_PER_DIGIT[self.mode()]
        per_digit = table[(self.regs[0x23] >> 4) & 0x03]
        enabled = self.regs[0x20] & 0x07
        out = bytearray()
        for axis, g in enumerate(sample_g):
            digits = _clip(round(g / per_digit), bits) if enabled & (1 << axis) else 0
            raw = (digits << (16 - bits)) & 0xFFFF            # left-justified
            if self.regs[0x23] & 0x40:                        # BLE: MSB at the lower address
                out += raw.to_bytes(2, "big")
            else:
                out += raw.to_bytes(2, "little")
        return bytes(out)

    def on_write(self, reg: int, old: int, new: int) -> None:
        if reg == 0x24 and (old ^ new) & 0x40:
            self.clear_fifo()
        if reg == 0x2E and (new >> 6 != old >> 6 or new >> 6 == 0):
            self.clear_fifo()
        if reg == 0x24 and new & 0x80:
            self.regs[0x24] = new & 0x7F      # BOOT reloads the trimming and clears itself
        if reg in (0x20, 0x23):
            self._restart_sampling()

    def set_pointer(self, byte: int) -> None:
        self.pointer = byte & 0x7F
        self.auto_increment = bool(byte & 0x80)

    def next_pointer(self, pointer: int, reading: bool) -> int:
        if not self.auto_increment:
            return pointer
        if reading and pointer == 0x2D and self.fifo_mode() != "bypass":
            return 0x28                       # FIFO read: wrap to the next slot's OUT_X_L
        return (pointer + 1) & 0x7F

    def after_read_byte(self, reg: int) -> None:
        if reg == 0x2D:
            self.pop()

    def dynamic(self, reg: int) -> int | None:
        if 0x28 <= reg <= 0x2D:
            return self.current_sample()[reg - 0x28]
        if reg == 0x2F:                       # FIFO_SRC_REG
            n = len(self.fifo)
            fss = min(n, 31)
            fth = self.regs[0x2E] & 0x1F
            wtm = self.fifo_mode() != "bypass" and fss >= fth
            return (0x80 if wtm else 0) | (0x40 if self.overrun and self.fifo_mode() != "bypass" else 0) \
                | (0x20 if n == 0 else 0) | fss
        if reg == 0x27:                       # STATUS_REG: ZYXOR, ZYXDA
            bypass = self.fifo_mode() == "bypass"
            ready = self.unread if bypass else bool(self.fifo)
            return (0x80 if bypass and self.overrun else 0) | (0x08 if ready else 0)
        return None


# ---- the bus ---------------------------------------------------------------------------------

class EmulatedBus:
    """The smbus2.SMBus methods the drivers use, routed to emulated chips by address."""

    def __init__(self, devices: dict[int, EmulatedChip] | None = None, bus_number: int = 1,
                 plain_i2c: bool = True) -> None:
        self.bus_number = bus_number
        self.plain_i2c = plain_i2c     # False: an SMBus-only adapter (like i2c-stub), I2C_RDWR refused
        self.devices: dict[int, EmulatedChip] = dict(devices or {})
        self.closed = False

    def attach(self, address: int, chip: EmulatedChip) -> EmulatedChip:
        self.devices[address] = chip
        return chip

    def _chip(self, address: int) -> EmulatedChip:
        chip = self.devices.get(address)
        if chip is None or not chip.plugged:
            raise remote_io_error()           # nobody ACKs the address
        return chip

    def _transaction(self, address: int, steps: Iterable[tuple[str, Any]]) -> list[bytes]:
        chip = self._chip(address)
        with chip.lock:
            if not chip.plugged:
                raise remote_io_error()
            chip.begin()
            out = []
            for kind, arg in steps:
                if kind == "w":
                    chip.write(bytes(arg))
                else:
                    out.append(chip.read(arg))
            return out

    # smbus2.SMBus interface
    def read_byte_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int:
        return self._transaction(i2c_addr, [("w", [register]), ("r", 1)])[0][0]

    def write_byte_data(self, i2c_addr: int, register: int, value: int, force: bool | None = None) -> None:
        self._transaction(i2c_addr, [("w", [register, value & 0xFF])])

    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int,
                            force: bool | None = None) -> list[int]:
        if not 0 < length <= 32:
            raise ValueError("Desired block length over 32 bytes")   # as smbus2 (I2C_SMBUS_BLOCK_MAX)
        return list(self._transaction(i2c_addr, [("w", [register]), ("r", length)])[0])

    def write_i2c_block_data(self, i2c_addr: int, register: int, data: list[int],
                             force: bool | None = None) -> None:
        if len(data) > 32:
            raise ValueError("Data length cannot exceed 32 bytes")
        self._transaction(i2c_addr, [("w", [register, *data])])

    def i2c_rdwr(self, *i2c_msgs: Any) -> None:
        """Combined transaction of smbus2.i2c_msg messages; read buffers are filled in place.
        Consecutive messages to one chip form one transaction for fault injection."""
        if not self.plain_i2c:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))   # what the kernel answers
        i = 0
        while i < len(i2c_msgs):
            address = i2c_msgs[i].addr
            j = i
            while j < len(i2c_msgs) and i2c_msgs[j].addr == address:
                j += 1
            group = i2c_msgs[i:j]
            steps = [("r", m.len) if m.flags & 0x0001 else ("w", bytes(m)) for m in group]
            results = iter(self._transaction(address, steps))
            for m in group:
                if m.flags & 0x0001:      # I2C_M_RD
                    data = next(results)
                    ctypes.memmove(m.buf, data, len(data))
            i = j

    def close(self) -> None:
        self.closed = True      # the emulated chips keep their state, like hardware across a reopen


def emulated_bus(chip: str, address: int, *, bus_number: int = 1, generator: Generator | None = None,
                 clock: Clock | None = None) -> EmulatedBus:
    """A bus with one emulated chip ('adxl345' or 'lis3dh') at `address`."""
    cls = {"adxl345": EmulatedADXL345, "lis3dh": EmulatedLIS3DH}[chip]
    return EmulatedBus({address: cls(generator=generator, clock=clock)}, bus_number=bus_number)
