"""STMicroelectronics LIS3DH 3-axis accelerometer over I2C (register map and behaviour from the
LIS3DH datasheet, DocID17530).

What the driver does:

* probe: WHO_AM_I (0x0F) must read 0x33;
* configure, every write read back: CTRL_REG1 power-down with X/Y/Z enabled, CTRL_REG2 0 (no
  high-pass filter on the output), CTRL_REG3 0 (polled), CTRL_REG4 BDU + full scale (+-2/4/8/16 g) +
  HR (high resolution, 12 bit) or normal mode (10 bit), CTRL_REG5 FIFO_EN, FIFO_CTRL_REG bypass
  (empties the FIFO) then stream mode with the watermark in FTH, CTRL_REG1 output data rate
  (1, 10, 25, 50, 100, 200, 400, 1344 Hz in HR/normal mode; LPen 0);
* read: FIFO_SRC_REG (WTM, OVRN_FIFO, EMPTY, FSS), then all waiting samples in one burst from
  OUT_X_L with the auto-increment bit (0x80) set on the register address: with the FIFO
  enabled the address pointer wraps from OUT_Z_H back to OUT_X_L and each 6-byte slot read pops
  one sample, so k samples are one write + one read of 6k bytes;
* scale: the outputs are left-justified 16-bit two's complement; 12 bits in HR mode (1, 2, 4,
  12 mg/digit at +-2, 4, 8, 16 g), 10 bits in normal mode (4, 8, 16, 48 mg/digit), optionally
  times g0 for m/s^2;
* overrun: OVRN_FIFO (a slot was overwritten in stream mode) is counted in `overruns` and
  reported with the data. FSS is a 5-bit field, so a full FIFO (32 samples) is known by OVRN.
"""
from __future__ import annotations

import numpy as np

from hal.drivers.i2c.bus import STANDARD_GRAVITY, FifoRead, I2cChip, Transport, msg_bytes, read_msg, write_msg

# Registers (datasheet section 7, register mapping)
WHO_AM_I = 0x0F
CTRL_REG1 = 0x20
CTRL_REG2 = 0x21
CTRL_REG3 = 0x22
CTRL_REG4 = 0x23
CTRL_REG5 = 0x24
STATUS_REG = 0x27
OUT_X_L = 0x28
FIFO_CTRL_REG = 0x2E
FIFO_SRC_REG = 0x2F

WHO_AM_I_VALUE = 0x33
ADDRESSES = (0x18, 0x19)   # SDO/SA0 low, high
AUTO_INCREMENT = 0x80      # MSB of the register address: successive reads/writes advance it

# CTRL_REG1: ODR in bits 7:4, LPen bit 3, Zen/Yen/Xen bits 2:0
XYZ_ENABLE = 0x07
ODR_CODES: dict[float, int] = {1.0: 1, 10.0: 2, 25.0: 3, 50.0: 4, 100.0: 5, 200.0: 6, 400.0: 7, 1344.0: 9}
# CTRL_REG4
BDU, HR = 0x80, 0x08
FS_CODES = {2: 0b00, 4: 0b01, 8: 0b10, 16: 0b11}
# CTRL_REG5
FIFO_EN = 0x40
# FIFO_CTRL_REG: FM in bits 7:6, TR bit 5, FTH bits 4:0
FM_BYPASS, FM_FIFO, FM_STREAM, FM_STREAM_TO_FIFO = 0b00, 0b01, 0b10, 0b11
# FIFO_SRC_REG
SRC_WTM, SRC_OVRN, SRC_EMPTY, SRC_FSS = 0x80, 0x40, 0x20, 0x1F
FIFO_DEPTH = 32

# Sensitivity in g/digit (datasheet, mechanical characteristics / sensitivity per operating mode)
HR_G_PER_DIGIT = {2: 0.001, 4: 0.002, 8: 0.004, 16: 0.012}       # 12-bit
NORMAL_G_PER_DIGIT = {2: 0.004, 4: 0.008, 8: 0.016, 16: 0.048}   # 10-bit

REGISTER_NAMES = {WHO_AM_I: "WHO_AM_I", CTRL_REG1: "CTRL_REG1", CTRL_REG2: "CTRL_REG2", CTRL_REG3: "CTRL_REG3",
                  CTRL_REG4: "CTRL_REG4", CTRL_REG5: "CTRL_REG5", STATUS_REG: "STATUS_REG", OUT_X_L: "OUT_X_L",
                  FIFO_CTRL_REG: "FIFO_CTRL_REG", FIFO_SRC_REG: "FIFO_SRC_REG"}


def odr_code(rate: float) -> tuple[int, float]:
    """(CTRL_REG1 ODR code, rate in Hz); ValueError lists the valid rates."""
    for exact, code in ODR_CODES.items():
        if abs(rate - exact) <= 0.01 * exact:
            return code, exact
    raise ValueError(f"{rate:g} Hz is not a LIS3DH output data rate in normal/high-resolution mode; choose "
                     f"one of {', '.join(f'{r:g}' for r in ODR_CODES)} Hz")


def g_per_digit(range_g: int, high_resolution: bool) -> tuple[float, int]:
    """(g per digit, right shift of the left-justified 16-bit output)."""
    if high_resolution:
        return HR_G_PER_DIGIT[range_g], 4
    return NORMAL_G_PER_DIGIT[range_g], 6


class LIS3DH(I2cChip):
    NAME = "LIS3DH"
    ID_REGISTER, ID_REGISTER_NAME, ID_VALUE = WHO_AM_I, "WHO_AM_I", WHO_AM_I_VALUE
    ADDRESS_HINT = "the LIS3DH answers at 0x18 with SDO/SA0 low, 0x19 with SDO/SA0 high"
    REGISTER_NAMES = REGISTER_NAMES
    DEFAULT_ADDRESS = ADDRESSES[0]

    def __init__(self, bus: Transport, address: int = DEFAULT_ADDRESS, *, bus_number: int | None = None,
                 sample_rate: float = 400.0, range_g: int = 4, high_resolution: bool = True,
                 watermark: int = 16, units: str = "g") -> None:
        super().__init__(bus, address, bus_number=bus_number)
        if range_g not in FS_CODES:
            raise ValueError(f"range_g must be one of {', '.join(map(str, FS_CODES))}, not {range_g}")
        if not 1 <= watermark <= 31:
            raise ValueError(f"watermark must be 1..31 samples, not {watermark}")
        self.odr_code, self.sample_rate = odr_code(sample_rate)
        self.range_g = range_g
        self.high_resolution = high_resolution
        self.watermark = watermark
        per_digit, self.shift = g_per_digit(range_g, high_resolution)
        self.scale = per_digit * (STANDARD_GRAVITY if units == "m/s2" else 1.0)
        self.overruns = 0

    # ---- set-up ----

    def configure(self) -> None:
        self.probe()
        self.write_register(CTRL_REG1, XYZ_ENABLE)                 # ODR 0: power-down while configuring
        self.write_register(CTRL_REG2, 0x00)                       # high-pass filter bypassed
        self.write_register(CTRL_REG3, 0x00)                       # no interrupts on INT1: polled
        ctrl4 = BDU | (FS_CODES[self.range_g] << 4) | (HR if self.high_resolution else 0)
        self.write_register(CTRL_REG4, ctrl4)                      # little-endian, no self-test
        self.write_register(CTRL_REG5, FIFO_EN)
        self.write_register(FIFO_CTRL_REG, FM_BYPASS << 6)         # bypass resets the FIFO
        self.write_register(FIFO_CTRL_REG, (FM_STREAM << 6) | self.watermark)
        self.write_register(CTRL_REG1, (self.odr_code << 4) | XYZ_ENABLE)   # LPen 0: normal/HR

    def standby(self) -> None:
        self.bus.write_byte_data(self.address, CTRL_REG1, XYZ_ENABLE)   # ODR 0: power-down

    # ---- data ----

    def fifo_status(self) -> tuple[int, bool]:
        """(samples waiting, overrun)."""
        src = self.read_register(FIFO_SRC_REG)
        if src & SRC_OVRN:
            return FIFO_DEPTH, True
        if src & SRC_EMPTY:
            return 0, False
        return src & SRC_FSS, False

    def read_samples(self, count: int) -> np.ndarray:
        """Pop `count` samples in one burst; raw left-justified int16, shape (count, 3)."""
        if not self.plain_i2c:        # SMBus-only adapter: 5 samples (30 bytes) per block read
            data = bytearray()
            for first in range(0, count, 5):
                n = min(5, count - first)
                data += self.block_read(OUT_X_L | AUTO_INCREMENT, 6 * n,
                                        what=f"reading the FIFO (OUT_X_L..OUT_Z_H, {n} x 6 bytes, SMBus block read)")
            return np.frombuffer(bytes(data), dtype="<i2").reshape(count, 3)
        rd = read_msg(self.address, 6 * count)
        self.transfer(write_msg(self.address, [OUT_X_L | AUTO_INCREMENT]), rd,
                      what=f"reading the FIFO (OUT_X_L..OUT_Z_H, {count} x 6 bytes)")
        return np.frombuffer(msg_bytes(rd), dtype="<i2").reshape(count, 3)

    def read_fifo(self) -> FifoRead:
        count, overrun = self.fifo_status()
        if overrun:
            self.overruns += 1
        raw = self.read_samples(count) if count else np.zeros((0, 3), dtype=np.int16)
        digits = raw.T.astype(np.int32) >> self.shift          # arithmetic shift keeps the sign
        data = (digits * self.scale).astype(np.float32)
        return FifoRead(np.ascontiguousarray(data), overrun)
