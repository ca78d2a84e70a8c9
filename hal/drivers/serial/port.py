"""Serial ports: line settings shared by the serial drivers, the default pyserial port, and the
pseudo-terminal plumbing that the simulated peers use.

Drivers never open a port themselves: they get a *port factory* (by default `open_serial`, a
pyserial `Serial` opened from the config's device path and line settings). Tests and simulations
inject their own. A port only needs what pyserial offers:

    read(n) -> bytes      up to n bytes; returns early (possibly b"") after port.timeout seconds
    write(data) -> int
    reset_input_buffer()
    close()
    timeout               read timeout in seconds (a float), settable

Failure semantics, the same for every serial driver: a *timeout* (nothing arrived) is a normal
event that drivers count; the port itself failing (adapter unplugged, pty closed, the path
gone) raises `SerialException` out of open/read/write (port_io turns OSError and termios.error
into it), and the driver lets it propagate, so the supervisor marks the source FAILED, closes
it, backs off and reopens it.

pyserial is imported here and nowhere outside hal/.
"""
from __future__ import annotations

import contextlib
import os
import select
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from typing import Literal, Protocol

import serial
from pydantic import Field, model_validator
from serial import SerialException

from hal.schema import StrictModel

__all__ = [
    "NullModem",
    "Port",
    "PortFactory",
    "RawPty",
    "SerialException",
    "SerialLine",
    "char_time_s",
    "open_serial",
    "port_io",
]


class SerialLine(StrictModel):
    """Line settings of a serial source (mixed into each serial driver's config)."""

    type: str    # each driver narrows it to its Literal; declared here so that it stays the first key
    device: str | None = Field(None, description="serial device path, e.g. /dev/ttyUSB0 or "
                                  "/dev/serial/by-id/...; not needed with simulate: true")
    baudrate: int = Field(9600, gt=0, le=4_000_000, description="bits per second")
    parity: Literal["N", "E", "O"] = Field("N", description="N (none), E (even) or O (odd)")
    stopbits: Literal[1, 2] = Field(1, description="stop bits")
    bytesize: Literal[7, 8] = Field(8, description="data bits")
    simulate: bool = Field(False, description="run an in-process simulated device on a pseudo-terminal "
                           "and read it through the same driver path as hardware (device is then ignored)")

    @model_validator(mode="after")
    def _device_or_simulate(self):
        if self.device is None and not self.simulate:
            raise ValueError("'device' is required (the serial port's path), unless simulate: true")
        return self


class Port(Protocol):
    timeout: float | None

    def read(self, size: int = 1) -> bytes: ...
    def write(self, data: bytes) -> int | None: ...
    def reset_input_buffer(self) -> None: ...
    def close(self) -> None: ...


# (device path, line settings, read timeout in s) -> an open port
PortFactory = Callable[[str, SerialLine, float], Port]


def open_serial(device: str, line: SerialLine, timeout: float) -> Port:
    """The default port: pyserial, raw 8-bit, no flow control. exclusive=True takes an advisory
    lock so that two processes cannot poll one bus at the same time."""
    return serial.Serial(port=device, baudrate=line.baudrate, bytesize=line.bytesize, parity=line.parity,
                         stopbits=line.stopbits, timeout=timeout, xonxoff=False, rtscts=False,
                         dsrdtr=False, exclusive=True)


@contextlib.contextmanager
def port_io(what: str) -> Iterator[None]:
    """Port operations fail in several ways (SerialException, OSError, termios.error from a
    flush on a vanished tty); drivers see one: SerialException, naming what failed."""
    try:
        yield
    except SerialException:
        raise
    except (OSError, termios.error) as exc:
        raise SerialException(f"{what}: {exc}") from exc


def char_time_s(line: SerialLine) -> float:
    """Seconds one character takes on the wire: start + data + parity + stop bits."""
    bits = 1 + line.bytesize + (0 if line.parity == "N" else 1) + line.stopbits
    return bits / line.baudrate


# ---------------------------------------------------------------- pseudo-terminals (simulation)

class RawPty:
    """A pseudo-terminal pair in raw mode. `path` (the slave, /dev/pts/N) is what a driver opens
    like a real serial device; the peer reads and writes `master`. The slave fd is kept open by
    this object so that its raw settings stick and the master never sees EIO before the driver
    has opened the path. close() makes the path vanish: an open driver then gets an error from
    read(), exactly as when a USB adapter is unplugged."""

    def __init__(self) -> None:
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)

    def close(self) -> None:
        for fd in (self.master, self._slave):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.master = self._slave = -1


class NullModem:
    """Two pseudo-terminals joined by a relay thread, like `socat pty pty` or a null-modem cable:
    whatever is written to a.path comes out of b.path and back. Lets two programs that both open
    a device *path* (a pymodbus server and our Modbus client) talk. `tamper(direction, data)`
    ("ab" or "ba") may alter bytes in flight (tests inject corruption this way)."""

    def __init__(self, tamper: Callable[[str, bytes], bytes] | None = None) -> None:
        self.a, self.b = RawPty(), RawPty()
        self.tamper = tamper
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False
        self._thread = threading.Thread(target=self._relay, name="null-modem", daemon=True)
        self._thread.start()

    def _relay(self) -> None:
        a, b = self.a.master, self.b.master
        try:
            poller = select.poll()   # not select(): it refuses descriptors past 1023
            for fd in (a, b, self._wake_r):
                poller.register(fd, select.POLLIN)
            while True:
                ready = [fd for fd, _ in poller.poll()]
                if self._wake_r in ready:
                    return
                for src in ready:
                    data = os.read(src, 4096)
                    if not data:
                        continue
                    direction, dst = ("ab", b) if src == a else ("ba", a)
                    if self.tamper is not None:
                        data = self.tamper(direction, data)
                    view = memoryview(data)
                    while view:
                        n = os.write(dst, view)
                        view = view[n:]
        except OSError:
            return   # a side was closed under us: the cable is cut

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.write(self._wake_w, b"x")
        self._thread.join(2.0)
        self.a.close()
        self.b.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
