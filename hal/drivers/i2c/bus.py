"""The thin transport under the I2C chip drivers, and the register discipline they share.

Drivers never open a bus themselves: they are handed an object with the smbus2 ``SMBus`` methods
they use (``read_byte_data``, ``write_byte_data``, ``read_i2c_block_data``, ``i2c_rdwr`` with
``smbus2.i2c_msg`` messages, ``close``). On hardware that is a real ``smbus2.SMBus`` on
/dev/i2c-N (opened lazily by :class:`LazySMBus`); in tests and demos it is the register-map
emulator of hal/sim/i2c_chips.py. smbus2 is imported only here, inside hal/.
"""
from __future__ import annotations

import ctypes
import errno as _errno
import functools
import os
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

STANDARD_GRAVITY = 9.80665   # m/s^2 per g (CGPM 1901)


# ---- errors ----------------------------------------------------------------------------------
# OSError subclasses: a bus or chip problem is an I/O problem, and callers that handle the raw
# OSError of an smbus2 transfer handle these the same way. str(exc) is the whole message.

class I2cError(OSError):
    """An I2C transfer or chip problem, with the bus, the address and the likely cause."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class ChipNotFound(I2cError):
    """Nothing answered at the address, or the identification register holds another value."""


class RegisterMismatch(I2cError):
    """A configuration register did not read back what was written."""


class BusUnavailable(I2cError):
    """/dev/i2c-N cannot be opened."""


# ---- transport -------------------------------------------------------------------------------

class Transport(Protocol):
    """The part of smbus2.SMBus the drivers use."""

    def read_byte_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int: ...
    def write_byte_data(self, i2c_addr: int, register: int, value: int, force: bool | None = None) -> None: ...
    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int,
                            force: bool | None = None) -> list[int]: ...
    def i2c_rdwr(self, *i2c_msgs: Any) -> None: ...
    def close(self) -> None: ...
    # A transport may also say `plain_i2c` (bool): False for SMBus-only adapters (no I2C_FUNC_I2C,
    # e.g. i2c-stub, some SoC controllers), which refuse I2C_RDWR. Absent means True.


SMBUS_BLOCK_MAX = 32   # I2C_SMBUS_BLOCK_MAX: the longest SMBus "I2C block read"
I2C_FUNC_I2C = 0x00000001   # linux/i2c.h: the adapter does plain I2C transfers (I2C_RDWR)


def _smbus2():
    import smbus2   # only here: the rest of the code base never touches smbus2 directly
    return smbus2


@functools.cache
def _buffer_type(length: int) -> type:
    # smbus2 makes each message's buffer with ctypes.create_string_buffer, i.e. a c_char * length
    # type, which ctypes caches only weakly: every message made a new type that died as a
    # reference cycle, freed only by a full collection (hours apart in a quiet supervisor: the
    # real-time soak saw ~5 such types a minute pile up). Holding the few lengths a driver uses
    # keeps one type per length alive, found again by ctypes.
    return ctypes.c_char * length


def write_msg(address: int, data: Sequence[int] | bytes) -> Any:
    """An I2C write message (START, address+W, data...) for i2c_rdwr."""
    data = bytes(data)
    _buffer_type(len(data))
    return _smbus2().i2c_msg.write(address, data)


def read_msg(address: int, length: int) -> Any:
    """An I2C read message (repeated START, address+R, `length` bytes) for i2c_rdwr."""
    _buffer_type(length)
    return _smbus2().i2c_msg.read(address, length)


def msg_bytes(msg: Any) -> bytes:
    return bytes(msg)


class LazySMBus:
    """smbus2.SMBus(bus_number), opened at the first transfer rather than at construction, so a
    source can be built (and its config checked) on a machine without /dev/i2c-N. A failed open
    says what to check; after close() the next transfer reopens."""

    def __init__(self, bus_number: int) -> None:
        self.bus_number = bus_number
        self._bus = None

    @property
    def path(self) -> str:
        return f"/dev/i2c-{self.bus_number}"

    def _get(self):
        if self._bus is None:
            try:
                self._bus = _smbus2().SMBus(self.bus_number)
            except FileNotFoundError:
                raise BusUnavailable(
                    f"I2C bus {self.bus_number}: {self.path} does not exist. Is the I2C controller enabled "
                    f"(e.g. dtparam=i2c_arm=on on a Raspberry Pi) and the i2c-dev module loaded "
                    f"(modprobe i2c-dev)? `i2cdetect -l` lists the buses.", _errno.ENOENT) from None
            except PermissionError:
                raise BusUnavailable(
                    f"I2C bus {self.bus_number}: no permission to open {self.path}; run as a member of its "
                    f"group (usually 'i2c').", _errno.EACCES) from None
        return self._bus

    def read_byte_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int:
        return self._get().read_byte_data(i2c_addr, register, force)

    def write_byte_data(self, i2c_addr: int, register: int, value: int, force: bool | None = None) -> None:
        self._get().write_byte_data(i2c_addr, register, value, force)

    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int,
                            force: bool | None = None) -> list[int]:
        return self._get().read_i2c_block_data(i2c_addr, register, length, force)

    def i2c_rdwr(self, *i2c_msgs: Any) -> None:
        self._get().i2c_rdwr(*i2c_msgs)

    @property
    def plain_i2c(self) -> bool:
        """What the adapter reported (I2C_FUNCS ioctl) when the bus was opened."""
        return bool(int(self._get().funcs) & I2C_FUNC_I2C)

    def close(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            bus.close()


@dataclass(frozen=True)
class FifoRead:
    """What one drain of a chip's FIFO gave."""

    data: np.ndarray    # float32 (3, k): x, y, z in the configured units, oldest sample first
    overrun: bool       # samples were (or, with the FIFO full, were about to be) lost before these


# ---- the register discipline shared by the chip drivers --------------------------------------

def _describe_oserror(exc: OSError) -> str:
    if exc.errno is not None:
        text = exc.strerror or os.strerror(exc.errno)
        return f"OSError {exc.errno}: {text}"
    return f"{type(exc).__name__}: {exc}"


class I2cChip:
    """Register access for one chip at one address, with the errors an operator can act on.

    Subclasses set NAME, ID_REGISTER/ID_REGISTER_NAME/ID_VALUE, ADDRESS_HINT (which addresses the
    chip answers at and why) and REGISTER_NAMES (for messages)."""

    NAME = "chip"
    ID_REGISTER = 0x00
    ID_REGISTER_NAME = "ID"
    ID_VALUE = 0x00
    ADDRESS_HINT = ""
    REGISTER_NAMES: dict[int, str] = {}

    def __init__(self, bus: Transport, address: int, *, bus_number: int | None = None) -> None:
        self.bus = bus
        self.address = address
        self.bus_number = bus_number if bus_number is not None else getattr(bus, "bus_number", "?")

    @property
    def where(self) -> str:
        return f"bus {self.bus_number} address 0x{self.address:02X}"

    def register_name(self, register: int) -> str:
        name = self.REGISTER_NAMES.get(register)
        return f"{name} (0x{register:02X})" if name else f"0x{register:02X}"

    def _failed(self, what: str, exc: OSError) -> I2cError:
        return I2cError(f"{self.NAME} at {self.where}: {what} failed ({_describe_oserror(exc)}); "
                        f"device unplugged or the bus disturbed? Check wiring and pull-ups.",
                        exc.errno if exc.errno is not None else _errno.EIO)

    def read_register(self, register: int) -> int:
        try:
            return self.bus.read_byte_data(self.address, register)
        except I2cError:
            raise
        except OSError as exc:
            raise self._failed(f"reading {self.register_name(register)}", exc) from exc

    def write_register(self, register: int, value: int) -> None:
        """Write one register and read it back; a difference is an error naming both values."""
        try:
            self.bus.write_byte_data(self.address, register, value)
        except I2cError:
            raise
        except OSError as exc:
            raise self._failed(f"writing 0x{value:02X} to {self.register_name(register)}", exc) from exc
        got = self.read_register(register)
        if got != value:
            raise RegisterMismatch(
                f"{self.NAME} at {self.where}: register {self.register_name(register)} reads back 0x{got:02X} "
                f"after writing 0x{value:02X}. Likely cause: a different chip at this address (bits it does "
                f"not implement read 0), an unreliable bus (loose wire, missing pull-ups, a long cable), or "
                f"another master reconfiguring it.")

    def transfer(self, *msgs: Any, what: str = "burst read") -> None:
        """One combined I2C_RDWR transaction (repeated STARTs between messages)."""
        try:
            self.bus.i2c_rdwr(*msgs)
        except I2cError:
            raise
        except OSError as exc:
            raise self._failed(what, exc) from exc

    @property
    def plain_i2c(self) -> bool:
        try:
            return bool(getattr(self.bus, "plain_i2c", True))
        except OSError as exc:
            raise self._failed("asking the adapter what it supports (I2C_FUNCS)", exc) from exc

    def block_read(self, register: int, length: int, *, what: str) -> bytes:
        """`length` bytes from `register` on, in SMBus "I2C block read"s of up to 32 bytes: on the
        wire the same write-register, repeated-START, read as an I2C_RDWR pair, so it serves the
        SMBus-only adapters that refuse I2C_RDWR. Each chunk starts again at `register`, which for
        a FIFO data register pops the next entries."""
        out = bytearray()
        try:
            while len(out) < length:
                n = min(SMBUS_BLOCK_MAX, length - len(out))
                got = self.bus.read_i2c_block_data(self.address, register, n)
                if len(got) != n:
                    raise OSError(_errno.EIO, f"short block read: {len(got)} of {n} bytes")
                out += bytes(got)
        except I2cError:
            raise
        except OSError as exc:
            raise self._failed(what, exc) from exc
        return bytes(out)

    def probe(self) -> int:
        """Read the identification register; raise ChipNotFound with the likely cause."""
        try:
            got = self.bus.read_byte_data(self.address, self.ID_REGISTER)
        except I2cError:
            raise                      # the bus itself could not be opened: that message says why
        except OSError as exc:
            if exc.errno == _errno.EBUSY:
                raise ChipNotFound(
                    f"{self.NAME} at {self.where}: the address is in use by a kernel driver "
                    f"({_describe_oserror(exc)}); a device-tree overlay has probably bound the chip to its "
                    f"IIO driver. Read it through the iio source, or unbind that driver.", exc.errno) from exc
            raise ChipNotFound(
                f"{self.NAME} not found: no device answered at {self.where} ({_describe_oserror(exc)}). "
                f"Check wiring, power and pull-ups, and the address with `i2cdetect -y {self.bus_number}` "
                f"({self.ADDRESS_HINT}).", exc.errno if exc.errno is not None else _errno.EIO) from exc
        if got != self.ID_VALUE:
            raise ChipNotFound(
                f"{self.NAME} not found: {self.ID_REGISTER_NAME} (register 0x{self.ID_REGISTER:02X}) expected "
                f"0x{self.ID_VALUE:02X}, got 0x{got:02X}, at {self.where}. Likely cause: wrong address "
                f"({self.ADDRESS_HINT}), wiring, or a different chip at this address.", _errno.ENODEV)
        return got
