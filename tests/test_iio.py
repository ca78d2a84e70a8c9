"""IIO buffered capture against a faithful sysfs tree and a FIFO standing in for /dev/iio:deviceN."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from hal.sources.iio import IioConfig, IioSource, ScanElement, decode_scans, parse_type, scan_layout
from hal.source import Health

SCALE = 0.000038245   # ADXL355: m/s^2 per LSB at +-2 g (its driver's in_accel_scale)


def make_device(root, name="adxl355", rate="1000", with_timestamp=True):
    sysfs, dev = root / "sys", root / "dev"
    d = sysfs / "iio:device0"
    (d / "scan_elements").mkdir(parents=True)
    (d / "buffer").mkdir()
    dev.mkdir()
    (d / "name").write_text(name + "\n")
    (d / "sampling_frequency").write_text(rate + "\n")
    (d / "in_accel_scale").write_text(f"{SCALE}\n")
    for i, axis in enumerate("xyz"):
        for attr, value in (("en", "0"), ("index", str(i)), ("type", "be:s20/32>>4")):
            (d / "scan_elements" / f"in_accel_{axis}_{attr}").write_text(value + "\n")
    if with_timestamp:
        for attr, value in (("en", "0"), ("index", "3"), ("type", "le:s64/64>>0")):
            (d / "scan_elements" / f"in_timestamp_{attr}").write_text(value + "\n")
    (d / "buffer" / "length").write_text("0\n")
    (d / "buffer" / "enable").write_text("0\n")
    os.mkfifo(dev / "iio:device0")
    return sysfs, dev, d


def pack(samples: np.ndarray) -> bytes:
    """(3, n) signed 20-bit counts -> big-endian 32-bit words, value in bits 31..12 (>>4 of the
    24-bit left-justified register, as the ADXL355 driver describes it: be:s20/32>>4)."""
    out = bytearray()
    for x, y, z in samples.T:
        for v in (x, y, z):
            out += struct.pack(">I", ((int(v) & 0xFFFFF) << 4))
    return bytes(out)


class Writer:
    """The kernel side: writes scans into the FIFO."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDWR)   # RDWR: never blocks, never EOF while open

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def close(self) -> None:
        os.close(self.fd)


def config(sysfs, dev, **kw):
    return IioConfig(type="iio", device="adxl355", sysfs_root=sysfs, dev_root=dev, block_scans=100,
                     timeout_s=0.5, **kw)


def test_parse_type():
    assert parse_type("be:s20/32>>4", "x") == (True, True, 20, 32, 4)
    assert parse_type("le:u12/16>>4\n", "x") == (False, False, 12, 16, 4)
    with pytest.raises(ValueError, match="cannot read scan type 'le:q'"):
        parse_type("le:q", "dev x")


def test_scan_layout_aligns_each_element_to_its_size():
    e16 = ScanElement("a", 0, False, True, 16, 16, 0, 1, 0)
    e64 = ScanElement("t", 1, False, True, 64, 64, 0, 1, 0)
    offsets, size = scan_layout([e16, e16, e16, e64])
    assert offsets == [0, 2, 4, 8] and size == 16
    offsets, size = scan_layout([e16, e16, e16])
    assert offsets == [0, 2, 4] and size == 6


def test_decode_signed_shifted_values():
    e = ScanElement("x", 0, True, True, 20, 32, 4, 2.0, 1.0)
    raw = struct.pack(">I", (0xFFFFF & -5) << 4) + struct.pack(">I", 7 << 4)
    np.testing.assert_allclose(decode_scans(raw, [e], [0], 4)[0], [(-5 + 1) * 2.0, (7 + 1) * 2.0])


def test_capture_configures_sysfs_and_decodes_scans(tmp_path):
    sysfs, dev, d = make_device(tmp_path)
    src = IioSource("acc", config(sysfs, dev, buffer_length=512))
    writer = Writer(dev / "iio:device0")
    try:
        src.open()
        assert (d / "buffer" / "enable").read_text() == "1"
        assert (d / "buffer" / "length").read_text() == "512"
        assert [(d / "scan_elements" / f"in_accel_{a}_en").read_text() for a in "xyz"] == ["1"] * 3
        assert (d / "scan_elements" / "in_timestamp_en").read_text() == "0"
        assert src.info.sample_rate == 1000 and src.info.channels == ("accel_x", "accel_y", "accel_z")
        counts = np.stack([np.arange(150) - 75, np.full(150, 26148), np.full(150, -524288)])
        writer.write(pack(counts))
        b1, b2 = src.read(), src.read()
        assert (b1.index, b1.frames, b2.index, b2.frames) == (0, 100, 100, 50)
        got = np.concatenate([b1.data, b2.data], axis=1)
        np.testing.assert_allclose(got, counts * SCALE / 9.80665, rtol=1e-6)
        assert abs(got[1, 0] - 0.1019) < 1e-3          # 26148 LSB is about 0.1 g
        assert b2.start_ns - b1.start_ns == 100_000_000  # 100 scans at 1 kHz
    finally:
        src.close()
        writer.close()
    assert (d / "buffer" / "enable").read_text() == "0"


def test_device_removed_then_back(tmp_path):
    sysfs, dev, d = make_device(tmp_path)
    src = IioSource("acc", config(sysfs, dev))
    writer = Writer(dev / "iio:device0")
    src.open()
    writer.write(pack(np.zeros((3, 100), dtype=int)))
    assert src.read().frames == 100
    writer.close()                                    # the device goes away
    with pytest.raises(OSError, match="device node closed|no data"):
        src.read()
    src.close()
    writer = Writer(dev / "iio:device0")              # it is back: the supervisor reopens
    src.open()
    writer.write(pack(np.ones((3, 100), dtype=int)))
    block = src.read()
    assert block.index == 0 and block.frames == 100 and src.health[0] is Health.OK
    src.close()
    writer.close()


def test_clear_errors(tmp_path, monkeypatch):
    sysfs, dev, d = make_device(tmp_path)
    with pytest.raises(OSError, match=r"IIO device 'lsm6ds' not found .* \(present: iio:device0 \(adxl355\)\)"):
        IioSource("a", config(sysfs, dev).model_copy(update={"device": "lsm6ds"})).open()
    with pytest.raises(OSError, match="has no scan element 'anglvel_x' .*accel_x, accel_y, accel_z"):
        IioSource("a", config(sysfs, dev, channels=["anglvel_x"])).open()
    # A driver rounds rates to what the chip supports: emulate sysfs keeping 800 when 1000 is
    # written, and expect the source to say so rather than mis-time every sample.
    import pathlib
    real_write = pathlib.Path.write_text

    def rounding_write(self, text, *args, **kwargs):
        return real_write(self, "800\n" if self.name == "sampling_frequency" else text, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", rounding_write)
    src = IioSource("a", config(sysfs, dev, sample_rate=1000))
    with pytest.raises(OSError, match="asked for 1000 Hz, the driver set 800 Hz"):
        src.open()
    src.close()
