"""Test peers for the serial drivers, on pseudo-terminals (no hardware, no socat).

- PtyCable: two ptys joined by a relay thread (a null-modem cable). Each end has a device path;
  `tamper` can corrupt bytes in flight; close() cuts the cable (the paths vanish, an open port
  gets EIO like an unplugged USB adapter).
- ModbusPeer: a real pymodbus RTU server (ModbusSerialServer) on one end of a cable, serving
  several slaves; the driver under test opens the other end. Slaves not configured stay silent,
  as absent devices on an RS-485 line do.
- NmeaWriter: writes NMEA lines into a pty master at real baud pacing (10 bits per byte).
- repoint(): atomically (re)points a symlink, so a test can "plug in" a new device at the same
  path.
"""
from __future__ import annotations

import asyncio
import os
import select
import threading
import time
import tty
from collections.abc import Callable, Iterable
from pathlib import Path


def repoint(link: Path, target: str) -> None:
    tmp = link.with_name(link.name + ".new")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


class Pty:
    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)

    def close(self) -> None:
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


class PtyCable:
    """a.path <-> b.path. tamper(direction, data) -> data, direction "ab" or "ba"."""

    def __init__(self, tamper: Callable[[str, bytes], bytes] | None = None) -> None:
        self.a, self.b = Pty(), Pty()
        self.tamper = tamper
        self.bytes = {"ab": 0, "ba": 0}
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False
        self._thread = threading.Thread(target=self._relay, daemon=True, name="pty-cable")
        self._thread.start()

    def _relay(self) -> None:
        ends = {self.a.master: ("ab", self.b.master), self.b.master: ("ba", self.a.master)}
        try:
            while True:
                ready, _, _ = select.select([*ends, self._wake_r], [], [])
                if self._wake_r in ready:
                    return
                for fd in ready:
                    data = os.read(fd, 4096)
                    direction, dst = ends[fd]
                    self.bytes[direction] += len(data)
                    if self.tamper is not None:
                        data = self.tamper(direction, data)
                    if data:
                        os.write(dst, data)
        except OSError:
            return

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.write(self._wake_w, b"x")
        self._thread.join(2)
        self.a.close()
        self.b.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class ModbusPeer:
    """pymodbus RTU server on cable.a. `slaves`: {slave id: {table: {address: value}}} with
    tables "h" (holding, function 3), "i" (input, 4), "c" (coils, 1), "d" (discrete inputs, 2);
    register values are 16-bit ints, bits are bools. Each table is one block from its lowest to
    its highest address (addresses in between hold 0); outside it the server answers
    ILLEGAL_DATA_ADDRESS."""

    TABLES = ("c", "d", "h", "i")

    def __init__(self, slaves: dict[int, dict[str, dict[int, int | bool]]], baudrate: int = 115200,
                 cable: PtyCable | None = None) -> None:
        from pymodbus.server import ModbusSerialServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        self.cable = cable or PtyCable()
        self.path = self.cable.b.path            # the driver under test opens this
        self.slaves = set(slaves)
        self.served: dict[int, int] = {}          # slave id -> requests answered
        devices = []
        for sid, tables in slaves.items():
            blocks = []
            for table in self.TABLES:
                values = tables.get(table, {})
                bits = table in ("c", "d")
                dtype = DataType.BITS if bits else DataType.REGISTERS
                if not values:
                    blocks.append([SimData(0, values=[False] * 16 if bits else [0], datatype=dtype)])
                    continue
                lo, hi = min(values), max(values)
                seq = [values.get(a, False if bits else 0) for a in range(lo, hi + 1)]
                blocks.append([SimData(lo, values=[bool(v) for v in seq] if bits else [int(v) for v in seq],
                                       datatype=dtype)])
            devices.append(SimDevice(id=sid, simdata=tuple(blocks)))

        def trace_pdu(sending: bool, pdu):
            if sending:
                return pdu
            if pdu.dev_id not in self.slaves:
                return None                          # nobody with that id on the line: silence
            self.served[pdu.dev_id] = self.served.get(pdu.dev_id, 0) + 1
            return pdu

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="modbus-peer")
        self._thread.start()

        async def start():
            self.server = ModbusSerialServer(devices, port=self.cable.a.path, baudrate=baudrate,
                                             trace_pdu=trace_pdu)
            await self.server.serve_forever(background=True)

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def set(self, slave: int, function: int, address: int, values: list[int] | list[bool]) -> None:
        """Change values in the server's datastore (function 1-4 picks the table)."""
        fut = asyncio.run_coroutine_threadsafe(self.server.async_setValues(slave, function, address, values),
                                               self.loop)
        fut.result(5)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()
            self.cable.close()


class NmeaWriter:
    """Writes lines into a pty master, paced like a UART: 10 bits per byte at `baud`. The
    reader opens `path`. Start the driver first: pyserial flushes input when it opens."""

    @staticmethod
    def device_lines(log: Path) -> list[bytes]:
        """What the receiver sent, from a gpsd-style log: every line but the '#' comments, each
        ending in CR LF as on the wire."""
        return [line.rstrip(b"\r") + b"\r\n" for line in log.read_bytes().split(b"\n")
                if line.strip() and not line.startswith(b"#")]

    def __init__(self, baud: int = 115200) -> None:
        self.pty = Pty()
        self.path = self.pty.path
        self.baud = baud
        self.sent = 0
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, chunks: Iterable[bytes], loop: bool = False) -> None:
        """Write the chunks in order (each one paced: the next starts when the previous would
        have left the UART), once or over and over."""
        items = list(chunks)

        def run():
            t0 = time.monotonic()
            try:
                while not self._stop.is_set():
                    for data in items:
                        view = memoryview(data)
                        while view:
                            _, writable, _ = select.select([], [self.pty.master], [], 0.1)
                            if self._stop.is_set():
                                return
                            if writable:
                                n = os.write(self.pty.master, view)
                                view = view[n:]
                                self.sent += n
                        # Real pacing: the bytes take 10 bits each on the wire.
                        delay = t0 + self.sent * 10 / self.baud - time.monotonic()
                        if delay > 0 and self._stop.wait(delay):
                            return
                    if not loop:
                        return
            except OSError:
                return
            finally:
                self.done.set()

        self._thread = threading.Thread(target=run, daemon=True, name="nmea-writer")
        self._thread.start()

    def close(self) -> None:
        """Unplug: stop writing and close the pty (its path vanishes)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        self.pty.close()


class RegisterDriver:
    """Drives one register of a ModbusPeer from a function of time, like a live process value:
    every period_s a thread writes round(profile(t)) (t = seconds since the profile was set, the
    raw 16-bit register value) when it changed. set_profile() switches the function; silence()
    makes the whole slave stop answering (as if unplugged from the bus), answer() brings it back."""

    def __init__(self, peer: ModbusPeer, slave: int, address: int, profile: Callable[[float], float],
                 period_s: float = 0.01, function: int = 3) -> None:
        self.peer, self.slave, self.address, self.function = peer, slave, address, function
        self.period_s = period_s
        self.writes = 0
        self._lock = threading.Lock()
        self._profile = profile
        self._t0 = time.monotonic()
        self._last: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="register-driver")
        self._thread.start()

    def set_profile(self, profile: Callable[[float], float]) -> None:
        with self._lock:
            self._profile, self._t0 = profile, time.monotonic()

    def value(self) -> int | None:
        """The raw value last written."""
        return self._last

    def silence(self) -> None:
        self.peer.slaves.discard(self.slave)

    def answer(self) -> None:
        self.peer.slaves.add(self.slave)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                raw = int(round(self._profile(time.monotonic() - self._t0))) & 0xFFFF
            if raw != self._last:
                try:
                    self.peer.set(self.slave, self.function, self.address, [raw])
                except Exception:   # the peer is shutting down
                    return
                self._last = raw
                self.writes += 1
            self._stop.wait(self.period_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
