"""Modbus RTU: CRC-16/MODBUS, frame codec, register decoding and a polling master (client).

Our own master rather than pymodbus's client, because the gateway must *count* what goes
wrong on the bus, precisely and per request: pymodbus's client drops a frame with a bad CRC as
"garbage" and then reports a timeout. Here each transaction ends in exactly one outcome:

    OK         a well-formed reply with the expected slave, function and length
    TIMEOUT    nothing arrived within timeout_s
    CRC_ERROR  bytes arrived but the frame's CRC is wrong (also a frame cut short: a frame ends
               after a silence of frame_gap_s, and a truncated frame cannot pass the CRC)
    EXCEPTION  the slave answered with an exception response (code and name kept)
    INVALID    a frame with a good CRC that is not the answer to our request (wrong slave,
               function or length: another master on the bus, a confused slave)

Framing: a reply ends when its expected length is in (known from the request and the reply's
function/byte-count header), or after a silence of frame_gap_s (default the larger of RTU's 3.5
character times and 30 ms, since USB adapters deliver a frame in pieces up to ~16 ms apart).
Before each request stale input is discarded and the bus is left silent for 3.5 characters
(1.75 ms above 19200 baud), as the RTU spec asks.

Only a failure of the port itself propagates, always as SerialException (hal.drivers.serial.port.port_io).

Data types and byte/word order. A 32-bit value's bytes, most significant first, are A B C D.
word_order says which register carries the high word; byte_order says how each register holds
its two bytes:

    word_order  byte_order  registers on the wire   common name
    big         big         [AB] [CD]               ABCD (the Modbus standard, big-endian)
    little      big         [CD] [AB]               CDAB (word swap; many PLCs and meters)
    big         little      [BA] [DC]               BADC (byte swap)
    little      little      [DC] [BA]               DCBA (little-endian)

16-bit types use byte_order only.
"""
from __future__ import annotations

import enum
import struct
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from hal.drivers.serial.port import Port, SerialLine, char_time_s, port_io

# ---------------------------------------------------------------- CRC-16/MODBUS

def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc_table()


def crc16(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF). Sent low byte first."""
    crc = 0xFFFF
    for byte in bytes(data):
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc


def with_crc(body: bytes) -> bytes:
    return bytes(body) + crc16(body).to_bytes(2, "little")


def crc_ok(frame: bytes) -> bool:
    return len(frame) >= 4 and crc16(frame[:-2]) == int.from_bytes(frame[-2:], "little")


# ---------------------------------------------------------------- protocol constants

EXCEPTION_NAMES = {
    1: "ILLEGAL_FUNCTION",
    2: "ILLEGAL_DATA_ADDRESS",
    3: "ILLEGAL_DATA_VALUE",
    4: "SERVER_DEVICE_FAILURE",
    5: "ACKNOWLEDGE",
    6: "SERVER_DEVICE_BUSY",
    7: "NEGATIVE_ACKNOWLEDGE",
    8: "MEMORY_PARITY_ERROR",
    10: "GATEWAY_PATH_UNAVAILABLE",
    11: "GATEWAY_TARGET_NO_RESPONSE",
}


def exception_name(code: int) -> str:
    return EXCEPTION_NAMES.get(code, f"EXCEPTION_0x{code:02X}")


READ_FUNCTIONS = {1: "coils", 2: "discrete inputs", 3: "holding registers", 4: "input registers"}
BIT_FUNCTIONS = (1, 2)
MAX_READ_COUNT = {1: 2000, 2: 2000, 3: 125, 4: 125}   # per request, from the spec (PDU <= 253 bytes)


class ModbusFrameError(ValueError):
    """A frame that cannot be decoded (too short, wrong length for its function)."""


def read_request(slave: int, function: int, address: int, count: int) -> bytes:
    """A read request (functions 1-4), CRC included."""
    if function not in READ_FUNCTIONS:
        raise ValueError(f"function {function} is not a read function (1-4)")
    if not 1 <= slave <= 247:
        raise ValueError(f"slave id {slave} is outside 1..247")
    if not 1 <= count <= MAX_READ_COUNT[function]:
        raise ValueError(f"count {count} is outside 1..{MAX_READ_COUNT[function]} for function {function}")
    if not 0 <= address <= 0xFFFF or address + count > 0x10000:
        raise ValueError(f"addresses {address}..{address + count - 1} are outside 0..65535")
    return with_crc(struct.pack(">BBHH", slave, function, address, count))


def read_response_length(function: int, count: int) -> int:
    """Bytes in a normal reply to a read of `count` registers/bits: slave, function, byte count,
    data, CRC."""
    nbytes = (count + 7) // 8 if function in BIT_FUNCTIONS else 2 * count
    return 5 + nbytes


@dataclass(frozen=True)
class Frame:
    """One decoded RTU frame. Fields not carried by the frame's kind are None."""

    slave: int
    function: int                        # without the exception bit
    crc_ok: bool
    is_request: bool
    exception: int | None = None      # exception code of an exception response
    address: int | None = None
    count: int | None = None
    value: int | None = None          # functions 5/6: the value written
    registers: tuple[int, ...] | None = None
    bits: tuple[bool, ...] | None = None

    @property
    def exception_name(self) -> str | None:
        return None if self.exception is None else exception_name(self.exception)


def bits_from_bytes(data: bytes, count: int | None = None) -> tuple[bool, ...]:
    """Coil/discrete-input bytes -> bits, LSB of the first byte first."""
    bits = tuple(bool(b >> i & 1) for b in data for i in range(8))
    return bits if count is None else bits[:count]


def decode_request(frame: bytes) -> Frame:
    """A request as a master sends it (functions 1-6, 15, 16)."""
    if len(frame) < 4:
        raise ModbusFrameError(f"{len(frame)} bytes is too short for an RTU frame")
    ok = crc_ok(frame)
    slave, fn = frame[0], frame[1]
    body = frame[2:-2]
    if fn in (1, 2, 3, 4, 5, 6):
        if len(body) != 4:
            raise ModbusFrameError(f"function {fn} request has {len(body)} data bytes, expected 4")
        address, second = struct.unpack(">HH", body)
        if fn in (5, 6):
            return Frame(slave, fn, ok, True, address=address, count=1, value=second)
        return Frame(slave, fn, ok, True, address=address, count=second)
    if fn in (15, 16):
        if len(body) < 5 or len(body) != 5 + body[4]:
            raise ModbusFrameError(f"function {fn} request length does not match its byte count")
        address, count = struct.unpack(">HH", body[:4])
        data = body[5:]
        if fn == 16:
            regs = tuple(struct.unpack(f">{len(data) // 2}H", data))
            return Frame(slave, fn, ok, True, address=address, count=count, registers=regs)
        return Frame(slave, fn, ok, True, address=address, count=count, bits=bits_from_bytes(data, count))
    raise ModbusFrameError(f"function {fn} is not supported by the decoder")


def decode_response(frame: bytes, count: int | None = None) -> Frame:
    """A slave's reply. `count` (the request's bit count) trims the padding of a coil/discrete
    reply; register replies carry their own length."""
    if len(frame) < 4:
        raise ModbusFrameError(f"{len(frame)} bytes is too short for an RTU frame")
    ok = crc_ok(frame)
    slave, fn = frame[0], frame[1]
    body = frame[2:-2]
    if fn & 0x80:
        if len(body) != 1:
            raise ModbusFrameError(f"exception response with {len(body)} data bytes, expected 1")
        return Frame(slave, fn & 0x7F, ok, False, exception=body[0])
    if fn in READ_FUNCTIONS:
        if not body or len(body) != 1 + body[0]:
            raise ModbusFrameError(f"function {fn} reply length does not match its byte count")
        data = body[1:]
        if fn in BIT_FUNCTIONS:
            return Frame(slave, fn, ok, False, bits=bits_from_bytes(data, count))
        if len(data) % 2:
            raise ModbusFrameError(f"function {fn} reply has an odd byte count ({len(data)})")
        regs = tuple(struct.unpack(f">{len(data) // 2}H", data))
        return Frame(slave, fn, ok, False, count=len(regs), registers=regs)
    if fn in (5, 6, 15, 16):
        if len(body) != 4:
            raise ModbusFrameError(f"function {fn} reply has {len(body)} data bytes, expected 4")
        address, second = struct.unpack(">HH", body)
        if fn in (5, 6):
            return Frame(slave, fn, ok, False, address=address, count=1, value=second)
        return Frame(slave, fn, ok, False, address=address, count=second)
    raise ModbusFrameError(f"function {fn} is not supported by the decoder")


# ---------------------------------------------------------------- register values

DataType = Literal["bool", "int16", "uint16", "int32", "uint32", "float32"]
Order = Literal["big", "little"]
REGISTER_COUNT: dict[str, int] = {"bool": 1, "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}
_STRUCT = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f"}
RAW_RANGE = {"int16": (-(1 << 15), (1 << 15) - 1), "uint16": (0, (1 << 16) - 1),
             "int32": (-(1 << 31), (1 << 31) - 1), "uint32": (0, (1 << 32) - 1)}


def registers_to_bytes(registers: Sequence[int], byte_order: Order = "big", word_order: Order = "big") -> bytes:
    """Registers as received -> the value's bytes, most significant first."""
    regs = list(registers)
    if word_order == "little":
        regs.reverse()
    out = bytearray()
    for reg in regs:
        pair = (reg & 0xFFFF).to_bytes(2, "big")
        out += pair[::-1] if byte_order == "little" else pair
    return bytes(out)


def bytes_to_registers(data: bytes, byte_order: Order = "big", word_order: Order = "big") -> list[int]:
    """The inverse of registers_to_bytes."""
    regs = []
    for i in range(0, len(data), 2):
        pair = data[i:i + 2]
        regs.append(int.from_bytes(pair[::-1] if byte_order == "little" else pair, "big"))
    if word_order == "little":
        regs.reverse()
    return regs


def decode_value(registers: Sequence[int], data_type: str, byte_order: Order = "big",
                 word_order: Order = "big") -> float | int:
    """The raw value (before scale/offset) of one point from its registers."""
    n = REGISTER_COUNT[data_type]
    if data_type == "bool":
        raise ValueError("bool points are read with functions 1/2, not from registers")
    if len(registers) != n:
        raise ValueError(f"{data_type} takes {n} register(s), got {len(registers)}")
    return struct.unpack(_STRUCT[data_type], registers_to_bytes(registers, byte_order, word_order))[0]


def encode_value(raw: float, data_type: str, byte_order: Order = "big", word_order: Order = "big") -> list[int]:
    """Raw value -> registers in wire order (what a device holds). Integers must fit the type."""
    if data_type == "float32":
        data = struct.pack(">f", float(raw))
    else:
        data = struct.pack(_STRUCT[data_type], int(raw))
    return bytes_to_registers(data, byte_order, word_order)


# ---------------------------------------------------------------- the master

class Outcome(enum.Enum):
    OK = "ok"
    TIMEOUT = "timeout"
    CRC_ERROR = "crc_error"
    EXCEPTION = "exception"
    INVALID = "invalid"


@dataclass(frozen=True)
class Reply:
    outcome: Outcome
    registers: tuple[int, ...] = ()
    bits: tuple[bool, ...] = ()
    exception: int | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    @property
    def exception_name(self) -> str | None:
        return None if self.exception is None else exception_name(self.exception)


@dataclass
class BusCounters:
    requests: int = 0
    ok: int = 0
    timeouts: int = 0
    crc_errors: int = 0
    exceptions: int = 0
    invalid: int = 0
    exception_codes: Counter = field(default_factory=Counter)   # name -> count

    def count(self, reply: Reply) -> None:
        self.requests += 1
        if reply.outcome is Outcome.OK:
            self.ok += 1
        elif reply.outcome is Outcome.TIMEOUT:
            self.timeouts += 1
        elif reply.outcome is Outcome.CRC_ERROR:
            self.crc_errors += 1
        elif reply.outcome is Outcome.EXCEPTION:
            self.exceptions += 1
            self.exception_codes[reply.exception_name] += 1
        else:
            self.invalid += 1


class RtuMaster:
    """Modbus RTU master on one port: one transaction at a time (the bus is half duplex), so
    several slaves on one RS-485 line are simply polled in turn."""

    READ_SLICE_S = 0.01   # the port's read timeout: how often a waiting read looks at the clock

    def __init__(self, port: Port, line: SerialLine, timeout_s: float, frame_gap_s: float | None = None) -> None:
        self.port = port
        self.timeout_s = timeout_s
        self.char_s = char_time_s(line)
        self.silence_s = 3.5 * self.char_s if line.baudrate <= 19200 else 0.00175
        self.frame_gap_s = frame_gap_s if frame_gap_s is not None else max(self.silence_s, 0.03)
        self.counters = BusCounters()
        self._last_activity = 0.0
        port.timeout = self.READ_SLICE_S

    def read(self, slave: int, function: int, address: int, count: int) -> Reply:
        """One read transaction (functions 1-4). Raises only when the port fails."""
        request = read_request(slave, function, address, count)
        reply = self._transact(request, slave, function, count)
        self.counters.count(reply)
        return reply

    def _transact(self, request: bytes, slave: int, function: int, count: int) -> Reply:
        with port_io("discarding input"):
            self.port.reset_input_buffer()  # a late reply to an earlier request must not be taken for this one
        wait = self._last_activity + self.silence_s - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        with port_io("writing the request"):
            self.port.write(request)
        # write() may return before the bytes are on the wire: the reply cannot start earlier.
        deadline = time.monotonic() + len(request) * self.char_s + self.timeout_s
        expected = read_response_length(function, count)
        frame = self._receive(function, expected, deadline)
        self._last_activity = time.monotonic()
        return self._classify(frame, slave, function, count, expected)

    def _target_length(self, buf: bytearray, function: int, expected: int) -> int:
        if len(buf) < 2:
            return 5                    # the shortest frame (an exception response); never over-reads
        if buf[1] == function | 0x80:
            return 5
        if buf[1] == function:
            return expected
        return 256                      # not ours: take whatever comes until the line falls silent

    def _receive(self, function: int, expected: int, deadline: float) -> bytes:
        buf = bytearray()
        last_rx = 0.0
        while True:
            need = self._target_length(buf, function, expected) - len(buf)
            if need <= 0:
                return bytes(buf)
            with port_io("reading the reply"):
                chunk = self.port.read(need)
            now = time.monotonic()
            if chunk:
                buf += chunk
                last_rx = now
            elif not buf:
                if now >= deadline:
                    return b""
            elif now - last_rx >= self.frame_gap_s:
                return bytes(buf)       # the frame ended early: truncated or garbled

    def _classify(self, frame: bytes, slave: int, function: int, count: int, expected: int) -> Reply:
        if not frame:
            return Reply(Outcome.TIMEOUT, detail=f"no reply within {self.timeout_s:g} s")
        if not crc_ok(frame):
            return Reply(Outcome.CRC_ERROR, detail=f"bad CRC in {len(frame)}-byte frame {frame.hex()}")
        if frame[0] != slave:
            return Reply(Outcome.INVALID, detail=f"reply from slave {frame[0]}, expected {slave}")
        if frame[1] == function | 0x80 and len(frame) == 5:
            code = frame[2]
            return Reply(Outcome.EXCEPTION, exception=code, detail=f"exception {code} ({exception_name(code)})")
        if frame[1] != function or len(frame) != expected or frame[2] != expected - 5:
            return Reply(Outcome.INVALID, detail=f"unexpected reply {frame.hex()} to function {function}")
        resp = decode_response(frame, count)
        if function in BIT_FUNCTIONS:
            return Reply(Outcome.OK, bits=resp.bits)
        return Reply(Outcome.OK, registers=resp.registers)
