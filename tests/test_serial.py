"""Serial drivers against real peers: Modbus RTU (our master polling a pymodbus RTU server on a
pty pair), NMEA 0183 (recorded GPS logs written into a pty at baud pacing), the recorded Modbus
frames through the decoder, faults (CRC errors, exceptions, timeouts, unplug and replug), and
the simulated sources."""
from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from pymodbus.client.mixin import ModbusClientMixin as PM

from hal.drivers.serial import modbus as mb
from hal.drivers.serial import nmea
from hal.drivers.serial.port import SerialException, open_serial
from hal.source import Health
from hal.sources.modbus_rtu import ModbusRtuConfig, ModbusRtuSource, plan_requests
from hal.sim.nmea_receiver import split_epochs
from hal.sources.nmea import NmeaConfig, NmeaSource
from tests.conftest import shared_file
from tests.serialpeers import ModbusPeer, NmeaWriter, PtyCable, repoint
from tests.support import metric, sim_source, wait_for, write_config

BAUD = 115200


# ------------------------------------------------------------------ helpers

def modbus_source(device: str, points: list[dict], **cfg) -> ModbusRtuSource:
    doc = {"type": "modbus_rtu", "device": device, "baudrate": BAUD, "timeout_s": 0.15, "poll_s": 0.02,
           "points": points, **cfg}
    return ModbusRtuSource("plc", ModbusRtuConfig.model_validate(doc))


def nmea_source(device: str, **cfg) -> NmeaSource:
    doc = {"type": "nmea", "device": device, "baudrate": BAUD, **cfg}
    return NmeaSource("gps", NmeaConfig.model_validate(doc))


def read_blocks(src, n: int, timeout_s: float = 10.0) -> list:
    """n blocks from src; a watchdog closes the source (so read() raises) if they take too long."""
    dog = threading.Timer(timeout_s, src.close)
    dog.start()
    try:
        return [src.read() for _ in range(n)]
    finally:
        dog.cancel()


def regs(value, kind: str, byte_order: str = "big", word_order: str = "big") -> list[int]:
    """Registers a device holds for `value`, built with pymodbus's converter (plus a byte swap,
    which pymodbus does not offer), not with the code under test."""
    words = PM.convert_to_registers(value, getattr(PM.DATATYPE, kind.upper()), word_order=word_order)
    if byte_order == "little":
        words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
    return words


def table(start: int, words: list[int]) -> dict[int, int]:
    return {start + i: w for i, w in enumerate(words)}


@pytest.fixture
def peers():
    made = []
    yield made
    for p in reversed(made):
        p.close()


# ------------------------------------------------------------------ CRC, codec, recorded frames

def test_crc16_modbus_check_value_and_frames():
    assert mb.crc16(b"123456789") == 0x4B37                # the CRC-16/MODBUS catalogue check value
    frame = mb.read_request(1, 3, 1000, 2)
    assert frame.hex() == "010303e80002447b"                # as captured on a real bus
    assert mb.crc_ok(frame) and not mb.crc_ok(frame[:-1] + bytes([frame[-1] ^ 1]))
    req = mb.decode_request(frame)
    assert (req.slave, req.function, req.address, req.count, req.crc_ok) == (1, 3, 1000, 2, True)
    exc = mb.decode_response(mb.with_crc(bytes([7, 0x84, 2])))
    assert (exc.slave, exc.function, exc.exception, exc.exception_name) == (7, 4, 2, "ILLEGAL_DATA_ADDRESS")
    bits = mb.decode_response(mb.with_crc(bytes([1, 1, 2, 0b10100101, 0b1])), count=9)
    assert bits.bits == (True, False, True, False, False, True, False, True, True)
    with pytest.raises(ValueError):
        mb.read_request(0, 3, 0, 1)
    with pytest.raises(ValueError):
        mb.read_request(1, 3, 0, 126)


@pytest.mark.parametrize("kind,value", [("int16", -12345), ("uint16", 54321), ("int32", -123456789),
                                        ("uint32", 3_000_000_000), ("float32", -1234.5)])
@pytest.mark.parametrize("byte_order", ["big", "little"])
@pytest.mark.parametrize("word_order", ["big", "little"])
def test_register_decoding_matches_pymodbus_encoding(kind, value, byte_order, word_order):
    words = regs(value, kind, byte_order, word_order)
    assert mb.decode_value(words, kind, byte_order, word_order) == value
    assert mb.encode_value(value, kind, byte_order, word_order) == words


def test_recorded_modbus_frames_decode_as_captured():
    path = shared_file("serial", "modbus", "wizmodbus.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(records) >= 80
    for r in records:                                       # CRC verdicts as recorded
        assert mb.crc_ok(bytes.fromhex(r["hex"])) == r["crc_ok"], r
    floats, singles, writes = [], {}, []
    for req_rec, resp_rec in zip(records[::2], records[1::2]):
        assert (req_rec["channel"], resp_rec["channel"]) == ("RX", "TX")
        req = mb.decode_request(bytes.fromhex(req_rec["hex"]))
        raw = bytes.fromhex(resp_rec["hex"])
        resp = mb.decode_response(raw, req.count)
        assert (resp.slave, resp.function) == (req.slave, req.function) == (1, req.function)
        if req.function == 3:
            # The decoded registers are exactly the data bytes on the wire, big-endian words.
            assert resp.registers == tuple(int.from_bytes(raw[3 + 2 * i:5 + 2 * i], "big") for i in range(req.count))
            if req.count == 2 and 1002 <= req.address <= 1024:
                floats.append(mb.decode_value(resp.registers, "float32", "big", "little"))
            elif req.count == 1:
                singles.setdefault(req.address, []).append(resp.registers[0])
        else:
            assert req.function == 6 and (resp.address, resp.value) == (req.address, req.value)
            writes.append((req.address, req.value))
    # The device serves float32 in CDAB order (word swap): at 1002..1024, in both polls of the
    # capture, 11049.11, 22160.11, 33271.11, 44382.11, then the same + 0.11, + 0.22.
    assert len(floats) == 24
    expected = [11049 + 11111 * (k % 4) + 0.11 * (1 + k // 4) for k in range(12)] * 2
    assert floats == pytest.approx(expected, abs=0.005)
    assert singles[0x0406] == [44, 48] and singles[0x0402] == [2, 2] and singles[0x0405] == [0, 0]
    assert writes == [(0x0404, 1), (0x0405, 0)] * 2


# ------------------------------------------------------------------ Modbus against pymodbus

def test_modbus_polls_several_slaves_every_type_and_order(peers):
    s1_h = {**table(0, regs(1234, "uint16")),
            **table(1, regs(-1234, "int16", byte_order="little")),
            **table(2, regs(-123456789, "int32")),
            **table(4, regs(3_000_000_000, "uint32", word_order="little")),
            **table(6, regs(3.14159, "float32", byte_order="little")),
            **table(8, regs(-2500.0, "float32", "little", "little"))}
    s1_i = {**table(100, regs(98.25, "float32")), **table(102, regs(-30, "int16"))}
    s2_h = {**table(10, regs(4_000_000_000, "uint32", "little", "big")), **table(20, regs(-7, "int32", "big", "little"))}
    peer = ModbusPeer({1: {"h": s1_h, "i": s1_i},
                       2: {"h": s2_h, "c": {5: True, 6: False}, "d": {0: True}},
                       3: {"i": {0: 777}}}, baudrate=BAUD)
    peers.append(peer)
    points = [
        {"name": "u16", "slave": 1, "address": 0, "data_type": "uint16", "scale": 0.1},
        {"name": "i16_swapped", "slave": 1, "address": 1, "data_type": "int16", "byte_order": "little"},
        {"name": "i32", "slave": 1, "address": 2, "data_type": "int32"},
        {"name": "u32_cdab", "slave": 1, "address": 4, "data_type": "uint32", "word_order": "little", "scale": 1e-3},
        {"name": "f32_badc", "slave": 1, "address": 6, "data_type": "float32", "byte_order": "little"},
        {"name": "f32_dcba", "slave": 1, "address": 8, "data_type": "float32", "byte_order": "little",
         "word_order": "little", "scale": 2, "offset": 1},
        {"name": "in_f32", "slave": 1, "function": 4, "address": 100, "data_type": "float32"},
        {"name": "in_temp", "slave": 1, "function": 4, "address": 102, "data_type": "int16", "scale": 0.5,
         "offset": -40},
        {"name": "s2_u32", "slave": 2, "address": 10, "data_type": "uint32", "byte_order": "little"},
        {"name": "s2_i32", "slave": 2, "address": 20, "data_type": "int32", "word_order": "little"},
        {"name": "coil5", "slave": 2, "function": 1, "address": 5},
        {"name": "coil6", "slave": 2, "function": 1, "address": 6},
        {"name": "di0", "slave": 2, "function": 2, "address": 0},
        {"name": "s3", "slave": 3, "function": 4, "address": 0},
    ]
    src = modbus_source(peer.path, points)
    src.open()
    try:
        assert src.info.channels == tuple(p["name"] for p in points)
        assert src.info.sample_rate == pytest.approx(50.0)
        block = read_blocks(src, 1)[0]
        assert block.data.shape == (len(points), 1) and block.data.dtype == np.float32
        got = dict(zip(src.info.channels, block.data[:, 0].astype(float)))
        want = {"u16": 123.4, "i16_swapped": -1234, "i32": -123456789, "u32_cdab": 3_000_000.0,
                "f32_badc": 3.14159, "f32_dcba": -4999.0, "in_f32": 98.25, "in_temp": -55.0,
                "s2_u32": 4_000_000_000, "s2_i32": -7, "coil5": 1, "coil6": 0, "di0": 1, "s3": 777}
        for name, value in want.items():
            assert got[name] == pytest.approx(value, rel=1e-6), name
        # Contiguous registers of one slave and function go in one request: slave 1 holding 0-9,
        # slave 1 input 100-102, slave 2 holding 10-11 and 20-21 (not contiguous), coils, inputs, slave 3.
        assert src.requests == 7
        assert peer.served == {1: 2, 2: 4, 3: 1}
        # A value changed in the device shows up in the next samples.
        peer.set(1, 3, 0, [4321])
        peer.set(2, 1, 5, [False])
        block = read_blocks(src, 1)[0]
        got = dict(zip(src.info.channels, block.data[:, 0].astype(float)))
        assert got["u16"] == pytest.approx(432.1) and got["coil5"] == 0
        assert (src.timeouts, src.crc_errors, src.exceptions, src.invalid_responses) == (0, 0, 0, 0)
        assert src.health[0] is Health.OK
    finally:
        src.close()


def test_modbus_exception_responses_are_counted_with_their_code(peers):
    peer = ModbusPeer({1: {"h": {0: 11, 1: 22}}}, baudrate=BAUD)
    peers.append(peer)
    src = modbus_source(peer.path, [{"name": "good", "slave": 1, "address": 0},
                                    {"name": "missing", "slave": 1, "address": 500}])
    src.open()
    try:
        blocks = read_blocks(src, 3)
    finally:
        src.close()
    for b in blocks:
        assert b.data[0, 0] == 11 and math.isnan(b.data[1, 0])
    assert src.exceptions == 3 and src.exception_codes == {"ILLEGAL_DATA_ADDRESS": 3}
    st = src.point_stats["missing"]
    assert (st.polls, st.exceptions, st.exception_codes) == (3, 3, {"ILLEGAL_DATA_ADDRESS": 3})
    assert "ILLEGAL_DATA_ADDRESS" in st.last_error
    assert src.point_stats["good"].ok == 3 and src.timeouts == 0


def test_modbus_timeouts_counted_and_source_stays_up(peers):
    peer = ModbusPeer({1: {"h": {0: 5}}}, baudrate=BAUD)
    peers.append(peer)
    src = modbus_source(peer.path, [{"name": "present", "slave": 1, "address": 0},
                                    {"name": "ghost", "slave": 9, "address": 0}], timeout_s=0.1, poll_s=0.05)
    src.open()
    try:
        t0 = time.monotonic()
        blocks = read_blocks(src, 3)
        elapsed = time.monotonic() - t0
    finally:
        src.close()
    assert [b.data[0, 0] for b in blocks] == [5, 5, 5]
    assert all(math.isnan(b.data[1, 0]) for b in blocks)
    assert src.timeouts == 3 and src.point_stats["ghost"].timeouts == 3 and src.point_stats["present"].ok == 3
    assert elapsed < 1.5                                   # each timeout costs about timeout_s, no more
    # The cycle (0.05 s) is shorter than a timeout: cycles are skipped and marked as gaps.
    assert src.overruns >= 1 and any(b.gap for b in blocks[1:])
    assert [b.index for b in blocks] == sorted({b.index for b in blocks})
    assert src.health[0] is Health.OK


@pytest.mark.parametrize("on_error", ["nan", "hold"])
def test_modbus_crc_errors_counted(peers, on_error):
    corrupt = threading.Event()

    def tamper(direction: str, data: bytes) -> bytes:
        if direction == "ab" and corrupt.is_set() and data:   # server -> client: flip a bit of one reply
            corrupt.clear()
            data = bytearray(data)
            data[len(data) // 2] ^= 0x10
        return bytes(data)

    cable = PtyCable(tamper)
    peer = ModbusPeer({1: {"h": {0: 100, 1: 200}}}, baudrate=BAUD, cable=cable)
    peers.append(peer)
    src = modbus_source(peer.path, [{"name": "a", "slave": 1, "address": 0},
                                    {"name": "b", "slave": 1, "address": 1}], on_error=on_error)
    src.open()
    try:
        first = read_blocks(src, 1)[0]
        corrupt.set()
        bad = read_blocks(src, 1)[0]
        after = read_blocks(src, 1)[0]
    finally:
        src.close()
    assert list(first.data[:, 0]) == [100, 200] and list(after.data[:, 0]) == [100, 200]
    if on_error == "nan":
        assert np.isnan(bad.data[:, 0]).all()
    else:
        assert list(bad.data[:, 0]) == [100, 200]
    assert src.crc_errors == 1 and src.timeouts == 0 and src.exceptions == 0
    assert src.point_stats["a"].crc_errors == 1 and src.point_stats["b"].crc_errors == 1   # one request, two points


def test_modbus_reply_from_wrong_slave_is_invalid(peers):
    def tamper(direction: str, data: bytes) -> bytes:
        if direction == "ab" and len(data) >= 5 and mb.crc_ok(data):
            return mb.with_crc(bytes([data[0] + 1]) + data[1:-2])   # well-formed, but someone else's
        return data

    peer = ModbusPeer({1: {"h": {0: 1}}}, baudrate=BAUD, cable=PtyCable(tamper))
    peers.append(peer)
    src = modbus_source(peer.path, [{"name": "a", "slave": 1, "address": 0}])
    src.open()
    try:
        block = read_blocks(src, 1)[0]
    finally:
        src.close()
    assert math.isnan(block.data[0, 0])
    assert src.invalid_responses == 1 and src.crc_errors == 0 and "slave 2" in src.point_stats["a"].last_error


def test_modbus_slow_points_hold_between_polls(peers):
    peer = ModbusPeer({1: {"h": {0: 1, 1: 2}}}, baudrate=BAUD)
    peers.append(peer)
    src = modbus_source(peer.path, [{"name": "fast", "slave": 1, "address": 0},
                                    {"name": "slow", "slave": 1, "address": 1, "poll_s": 0.06}], poll_s=0.02)
    src.open()
    try:
        blocks = read_blocks(src, 6)
    finally:
        src.close()
    assert all(b.data[1, 0] == 2 for b in blocks)
    polled = [b.index for b in blocks if b.index % 3 == 0]
    assert src.point_stats["slow"].polls == len(polled) and src.point_stats["fast"].polls == 6


def test_modbus_unplug_raises_and_replug_recovers(peers, tmp_path):
    link = tmp_path / "ttyRS485"
    peer = ModbusPeer({1: {"h": {0: 42}}}, baudrate=BAUD)
    repoint(link, peer.path)
    opened = []

    def factory(path, line, timeout):                     # the port is injected; here: pyserial, recorded
        opened.append(path)
        return open_serial(path, line, timeout)

    cfg = ModbusRtuConfig.model_validate({"type": "modbus_rtu", "device": str(link), "baudrate": BAUD,
                                          "timeout_s": 0.15, "poll_s": 0.02,
                                          "points": [{"name": "v", "slave": 1, "address": 0}]})
    src = ModbusRtuSource("plc", cfg, port_factory=factory)
    src.open()
    try:
        assert read_blocks(src, 1)[0].data[0, 0] == 42
        peer.close()                                        # the adapter is pulled
        with pytest.raises(SerialException):
            read_blocks(src, 5)
        src.close()                                         # as the supervisor does, then backs off
        with pytest.raises(SerialException):
            src.open()                                      # still gone: the path dangles
        peer2 = ModbusPeer({1: {"h": {0: 43}}}, baudrate=BAUD)
        peers.append(peer2)
        repoint(link, peer2.path)                           # plugged in again
        src.open()
        assert read_blocks(src, 1)[0].data[0, 0] == 43
        assert opened == [str(link)] * 3
    finally:
        src.close()


def test_request_planning_groups_contiguous_points_only():
    cfg = ModbusRtuConfig.model_validate({"type": "modbus_rtu", "device": "/dev/null", "points": [
        {"name": "a", "slave": 1, "address": 10, "data_type": "float32"},
        {"name": "b", "slave": 1, "address": 12},
        {"name": "c", "slave": 1, "address": 14},
        {"name": "d", "slave": 2, "address": 13},
        {"name": "e", "slave": 1, "function": 4, "address": 13},
        {"name": "f", "slave": 1, "address": 200}]})
    pts = cfg.points
    plan = plan_requests(pts, list(range(len(pts))))
    assert [(r.slave, r.function, r.address, r.count) for r in plan] == [
        (1, 3, 10, 3), (1, 3, 14, 1), (1, 3, 200, 1), (1, 4, 13, 1), (2, 3, 13, 1)]
    plan = plan_requests(pts, list(range(len(pts))), max_gap=1)
    assert (1, 3, 10, 5) in [(r.slave, r.function, r.address, r.count) for r in plan]
    assert len(plan_requests(pts, list(range(len(pts))), group=False)) == 6
    big = [mb_point(i) for i in range(130)]
    assert [r.count for r in plan_requests(big, list(range(130)))] == [125, 5]


def mb_point(i: int):
    from hal.sources.modbus_rtu import ModbusPoint
    return ModbusPoint(name=f"p{i}", slave=1, address=i)


def test_modbus_config_is_checked():
    base = {"type": "modbus_rtu", "device": "/dev/ttyUSB0"}
    ok = ModbusRtuConfig.model_validate({**base, "points": [{"name": "x", "slave": 1, "address": 0}]})
    assert ok.baudrate == 9600 and ok.channels == ["x"] and ok.points[0].dtype == "uint16"
    bad_points = [
        [{"name": "x", "slave": 0, "address": 0}],                                  # slave id
        [{"name": "x", "slave": 248, "address": 0}],
        [{"name": "x", "slave": 1, "function": 1, "address": 0, "data_type": "float32"}],
        [{"name": "x", "slave": 1, "address": 0, "data_type": "bool"}],
        [{"name": "x", "slave": 1, "address": 65535, "data_type": "int32"}],
        [{"name": "x", "slave": 1, "address": 0}, {"name": "x", "slave": 2, "address": 0}],
        [{"name": "x", "slave": 1, "address": 0, "poll_s": 1.5}],                   # not a multiple of 1 s
        [{"name": "x", "slave": 1, "address": 0, "bogus": 1}],
    ]
    for points in bad_points:
        with pytest.raises(ValidationError):
            ModbusRtuConfig.model_validate({**base, "points": points})
    with pytest.raises(ValidationError, match="device"):
        ModbusRtuConfig.model_validate({"type": "modbus_rtu", "points": [{"name": "x", "slave": 1, "address": 0}]})
    with pytest.raises(ValidationError):
        ModbusRtuConfig.model_validate({**base, "parity": "X", "points": [{"name": "x", "slave": 1, "address": 0}]})


# ------------------------------------------------------------------ NMEA

def test_nmea_sentence_parsing():
    s = nmea.parse_sentence(b"$GPGGA,030719.000,3747.0873,S,17518.8938,E,1,08,1.1,59.9,M,23.7,M,,0000*7D")
    gga = nmea.decode(s)
    assert (s.talker, s.kind) == ("GP", "GGA")
    assert gga["latitude"] == pytest.approx(-(37 + 47.0873 / 60)) and gga["longitude"] == pytest.approx(175 + 18.8938 / 60)
    assert (gga["fix_quality"], gga["satellites"], gga["altitude"], gga["hdop"]) == (1, 8, 59.9, 1.1)
    rmc = nmea.decode(nmea.parse_sentence(b"$GPRMC,202640.000,A,4404.1306,N,12118.8515,W,0.03,225.97,130415,,,D*73"))
    assert rmc["speed"] == pytest.approx(0.03 * 1852 / 3600) and rmc["course"] == 225.97
    assert rmc["longitude"] == pytest.approx(-(121 + 18.8515 / 60))
    vtg = nmea.decode(nmea.parse_sentence(b"$GNVTG,,T,,M,0.025,N,0.045,K,A*3B"))
    assert vtg["course"] is None and vtg["speed"] == pytest.approx(0.025 * 1852 / 3600)
    with pytest.raises(nmea.BadChecksum):
        nmea.parse_sentence(b"$GPGGA,030719.000,3747.0873,S,17518.8938,E,1,08,1.1,59.9,M,23.7,M,,0000*7E")
    for junk in (b"", b"hello", b"$GPGGA,1,2*ZZ", b"$\xff\x00GGA*00", b"$GPGGA,no checksum",
                 nmea.make_sentence("GPGGA,1,abc,N,17518.8938,E,1,08,1.1,59.9,M").encode(),
                 nmea.make_sentence("GPGGA,1,9947.0,N,17518.8938,E,1,08,1.1,59.9,M").encode(),
                 nmea.make_sentence("GPRMC,1,A,3747.0873").encode()):
        with pytest.raises(nmea.NmeaError):
            nmea.decode(nmea.parse_sentence(junk))


def _log_expectations(path: Path) -> tuple[int, int]:
    """(sentences, epochs) counted from the log itself: every $ line, and the distinct
    consecutive times of its GGA/RMC sentences."""
    sentences, times = 0, []
    for line in path.read_text().splitlines():
        if line.startswith("$"):
            sentences += 1
            fields = line.split(",")
            if fields[0][3:6] in ("GGA", "RMC") and (not times or times[-1] != fields[1]):
                times.append(fields[1])
    return sentences, len(times)


# A few known sentences per log -> the second fix's values (the first is complete only once the
# receiver's epoch pattern is known; it is still delivered).
KNOWN = {
    "bu353s4.log": {"index": 1, "fix_quality": 1, "satellites": 8, "latitude": -(37 + 47.0875 / 60),
                    "longitude": 175 + 18.8938 / 60, "altitude": 59.8, "speed": 1.15 * 1852 / 3600,
                    "course": 181.39},
    "mt3339.log": {"index": 1, "fix_quality": 2, "satellites": 11, "latitude": 44 + 4.1305 / 60,
                   "longitude": -(121 + 18.8515 / 60), "altitude": 1127.7, "speed": 0.01 * 1852 / 3600,
                   "course": 201.71},
    # RMC with an empty course field: course is NaN; speed 0.061 knots.
    "ublox-zed-f9p-nmea.log": {"index": 1, "fix_quality": 1, "satellites": 12, "latitude": -(45 + 52.65403 / 60),
                               "longitude": 170 + 30.00673 / 60, "altitude": 14.2, "speed": 0.061 * 1852 / 3600,
                               "course": math.nan},
}


# One more complete epoch after a log: once it is out, every line of the log has been read.
SENTINEL = [(nmea.make_sentence(body) + "\r\n").encode() for body in (
    "GPGGA,235959.00,0000.000,N,00000.000,E,0,00,,,M,,M,,",
    "GPRMC,235959.00,V,0000.000,N,00000.000,E,,,010100,,,N")]


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_nmea_logs_through_a_pty_at_baud_pacing(name):
    path = shared_file("serial", "nmea", name)
    sentences, epochs = _log_expectations(path)
    baud = 460800 if path.stat().st_size > 20000 else BAUD
    writer = NmeaWriter(baud)
    src = nmea_source(writer.path, baudrate=baud, channels=["fix_quality", "satellites", "latitude", "longitude",
                                                            "altitude", "speed", "course", "hdop"])
    src.open()
    try:
        t0 = time.monotonic()
        lines = NmeaWriter.device_lines(path)
        writer.start(lines + SENTINEL)
        blocks = read_blocks(src, epochs + 1, timeout_s=15)[:-1]
        elapsed = time.monotonic() - t0
    finally:
        src.close()
        writer.close()
    # The bytes took (at least) their time on the wire: the last fix is complete only when
    # the last line is in.
    assert elapsed >= sum(map(len, lines)) * 10 / baud * 0.95
    assert src.sentences == sentences + len(SENTINEL) and src.bad_lines == 0 and src.bad_checksums == 0
    assert src.fixes == epochs + 1 and [b.index for b in blocks] == list(range(epochs))
    assert all(b.data.shape == (8, 1) for b in blocks)
    starts = [b.start_ns for b in blocks]
    assert starts == sorted(starts)                       # arrival timestamps never go backwards
    known = KNOWN[name]
    got = dict(zip(src.info.channels, blocks[known["index"]].data[:, 0].astype(float)))
    for key in ("fix_quality", "satellites", "latitude", "longitude", "altitude", "speed", "course"):
        # float32 samples: ~1e-5 degrees near 180 (about a metre); the rest to 1e-4.
        tol = 2e-5 if key in ("latitude", "longitude") else 1e-4
        assert got[key] == pytest.approx(known[key], abs=tol, nan_ok=True), key


def test_nmea_garbage_is_counted_never_raised():
    log = shared_file("serial", "nmea", "bu353s4.log")
    good = NmeaWriter.device_lines(log)[:30]
    bad_sum = good[0].replace(b"*7D", b"*7E")
    bad_field = nmea.make_sentence("GPGGA,030730.000,37xx.0873,S,17518.8938,E,1,08,1.1,59.9,M,23.7,M,,0000")
    no_sum = "$GPGGA,030730.000,3747.0873,S,17518.8938,E,1,08,1.1,59.9,M,23.7,M,,0000"
    junk = [b"\x00\xff\xfe garbage \x80\x81\r\n",        # binary
            b"X" * 5000 + b"\r\n",                         # overlong
            b"no dollar sign\r\n",
            bad_field.encode() + b"\r\n",                  # checksum right, latitude garbled
            no_sum.encode() + b"\r\n",                     # no *hh
            bytes(range(256)) + b"\n",                     # every byte value (a \n inside: two lines)
            b"\r\n"]                                       # blank: not counted
    chunks = good[:5] + [bad_sum] + junk + good[5:]
    writer = NmeaWriter(BAUD)
    src = nmea_source(writer.path)
    src.open()
    try:
        writer.start(chunks)
        blocks = read_blocks(src, 8)
        wait_for(lambda: writer.done.is_set(), 5, "the writer")
    finally:
        src.close()
        writer.close()
    assert src.bad_checksums == 1
    assert src.bad_lines == 7
    assert src.sentences == len(good)
    assert all(b.data.shape == (7, 1) for b in blocks)
    assert not np.isnan(blocks[-1].data[2:4, 0]).any()     # positions keep coming after the garbage


def test_nmea_unplug_and_replug_through_the_supervisor(tmp_path):
    """The real supervisor reads the source: pulling the device fails it (counted in
    appliance_source_errors_total), a device at the same path again recovers it."""
    from appliance.core.supervisor import Supervisor

    log = shared_file("serial", "nmea", "bu353s4.log")
    text = NmeaWriter.device_lines(log)
    link = tmp_path / "ttyGPS"
    writer = NmeaWriter(BAUD)
    repoint(link, writer.path)
    base = write_config(tmp_path, {"spindle": sim_source(realtime=False)}, {})
    gps = NmeaConfig.model_validate({"type": "nmea", "device": str(link), "baudrate": BAUD, "sample_rate": 1})
    # Build the config around the driver's own model (the YAML union may not list it yet).
    sup = Supervisor(base.model_copy(update={"sources": {"gps": gps}}))
    src = sup.sources["gps"]
    writer2 = None
    sup.start()
    try:
        wait_for(lambda: src.health[0] is Health.OK, 5, "the source to open")
        writer.start(text, loop=True)
        wait_for(lambda: src.fixes >= 3, 10, "fixes")
        assert metric(sup, "appliance_source_errors_total", source="gps") == 0
        assert metric(sup, "appliance_source_up", source="gps") == 1
        writer.close()                                      # unplugged mid-stream
        wait_for(lambda: metric(sup, "appliance_source_errors_total", source="gps") >= 1
                 and src.health[0] is Health.FAILED, 5, "the failure")
        assert metric(sup, "appliance_source_up", source="gps") == 0 and "SerialException" in src.health[1]
        writer2 = NmeaWriter(BAUD)
        repoint(link, writer2.path)                          # a device at the same path again
        wait_for(lambda: src.health[0] is Health.OK, 10, "the reopen")
        fixes = src.fixes
        writer2.start(text, loop=True)
        wait_for(lambda: src.fixes >= fixes + 3, 10, "fixes after the reopen")
        assert metric(sup, "appliance_source_up", source="gps") == 1
        assert metric(sup, "appliance_source_samples_total", source="gps") >= 6 * len(src.info.channels)
    finally:
        sup.stop(drain_s=0.1)
        writer.close()
        if writer2 is not None:
            writer2.close()


def test_nmea_config_is_checked():
    cfg = NmeaConfig.model_validate({"type": "nmea", "device": "/dev/ttyUSB1"})
    assert cfg.baudrate == 4800 and cfg.channels[0] == "fix_quality"
    for bad in ({"channels": ["latitude", "latitude"]}, {"channels": ["altitud"]}, {"max_line": 10},
                {"sample_rate": 0}, {"bogus": 1}):
        with pytest.raises(ValidationError):
            NmeaConfig.model_validate({"type": "nmea", "device": "/dev/ttyUSB1", **bad})
    with pytest.raises(ValidationError, match="device"):
        NmeaConfig.model_validate({"type": "nmea"})


def test_fix_assembly_waits_for_every_sentence_of_an_epoch():
    asm = nmea.FixAssembler()
    gga = lambda t: {"time": t, "latitude": 1.0, "longitude": 2.0, "fix_quality": 1, "satellites": 7,
                     "hdop": 1.0, "altitude": 3.0}
    rmc = lambda t: {"time": t, "status": "A", "latitude": 1.0, "longitude": 2.0, "speed": 0.5, "course": 9.0}
    assert asm.add("GGA", gga("1"), 1) == []
    assert asm.add("RMC", rmc("1"), 2) == []                 # still learning what an epoch holds
    first = asm.add("GGA", gga("2"), 3)
    assert [f.time for f in first] == ["1"] and first[0].speed == 0.5
    done = asm.add("RMC", rmc("2"), 4)                       # known pattern: complete at once
    assert [f.time for f in done] == ["2"] and done[0].satellites == 7
    assert asm.add("GGA", gga("3"), 5) == []
    late = asm.add("GGA", gga("4"), 6)                       # epoch 3 lost its RMC: out when 4 starts
    assert [f.time for f in late] == ["3"] and late[0].speed is None


# ------------------------------------------------------------------ simulated sources

def test_simulated_modbus_source_serves_through_pymodbus():
    cfg = ModbusRtuConfig.model_validate({"type": "modbus_rtu", "simulate": True, "poll_s": 0.05, "baudrate": 38400,
                                          "points": [
        {"name": "temperature", "slave": 1, "address": 0, "data_type": "int16", "scale": 0.1, "unit": "degC",
         "sim": {"mean": 45.0, "amplitude": 5.0, "period_s": 1.0}},
        {"name": "flow", "slave": 1, "address": 1, "data_type": "float32", "word_order": "little"},
        {"name": "running", "slave": 2, "function": 1, "address": 3},
        {"name": "energy", "slave": 2, "function": 4, "address": 10, "data_type": "uint32", "scale": 0.01}]})
    src = ModbusRtuSource("plant", cfg)
    src.open()
    try:
        assert src.device_path.startswith("/dev/pts/")     # a real tty, opened with pyserial
        blocks = read_blocks(src, 12)
    finally:
        src.close()
    data = np.concatenate([b.data for b in blocks], axis=1)
    assert np.isfinite(data).all()
    assert 39.9 <= data[0].min() and data[0].max() <= 50.1 and np.ptp(data[0]) > 0.5   # it varies
    assert data[1] == pytest.approx(1000, rel=0.11) and set(np.unique(data[2])) <= {0.0, 1.0}
    assert data[3] == pytest.approx(10, rel=0.11)
    assert src.requests >= 36 and src.timeouts == src.crc_errors == src.exceptions == 0


def test_simulated_nmea_source_replays_its_log():
    cfg = NmeaConfig.model_validate({"type": "nmea", "simulate": True, "sample_rate": 10, "baudrate": 115200,
                                     "channels": ["latitude", "longitude", "speed", "north", "east"]})
    src = NmeaSource("gps", cfg)
    src.open()
    try:
        assert src.device_path.startswith("/dev/pts/")
        blocks = read_blocks(src, 6)
    finally:
        src.close()
    data = np.concatenate([b.data for b in blocks], axis=1)
    assert data[0] == pytest.approx(51.4416, abs=1e-3) and data[1] == pytest.approx(5.4697, abs=1e-3)
    assert np.nanmax(data[2]) == pytest.approx(1.4, abs=0.01)
    assert np.ptp(data[4]) > 1.0                               # the vehicle moves east
    assert src.bad_lines == src.bad_checksums == 0
    assert len(split_epochs(Path(shared_file("serial", "nmea", "mt3339.log")).read_text())) == 30


def test_a_replayed_log_starting_over_reaches_modules_as_a_gap(tmp_path):
    """The simulator loops its log. Where it starts over, the receiver's clock goes back and the
    position jumps back: a gap, not a 'position jump' (found on a gpsd Garmin log: 189 m in 1 s)."""
    from hal.sim.nmea_receiver import BUILTIN_LOG
    short = tmp_path / "short.log"
    short.write_text("".join(BUILTIN_LOG.splitlines(keepends=True)[:36]))   # 12 epochs
    cfg = NmeaConfig.model_validate({"type": "nmea", "simulate": True, "sample_rate": 20, "baudrate": 115200,
                                     "sim_log": str(short)})
    src = NmeaSource("gps", cfg)
    src.open()
    try:
        blocks = read_blocks(src, 30)
    finally:
        src.close()
    gaps = [i for i, b in enumerate(blocks) if b.gap]
    assert len(gaps) >= 2 and all(b - a == 12 for a, b in zip(gaps, gaps[1:])), gaps


def test_the_built_in_log_outlasts_a_window():
    """Two minutes of fixes: the default config's GPS windows (16 fixes) fill many times before
    the simulator starts over."""
    from hal.sim.nmea_receiver import BUILTIN_LOG
    assert len(split_epochs(BUILTIN_LOG)) == 120


def test_simulated_sources_through_the_registry():
    from hal.registry import SOURCE_TYPES
    assert SOURCE_TYPES["modbus_rtu"][0] is ModbusRtuSource and SOURCE_TYPES["nmea"][0] is NmeaSource
