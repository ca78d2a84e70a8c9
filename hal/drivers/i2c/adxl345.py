"""Analog Devices ADXL345 3-axis accelerometer over I2C (register map and behaviour from the
ADXL345 datasheet, Rev. E).

What the driver does:

* probe: DEVID (0x00) must read 0xE5;
* configure, every write read back: POWER_CTL standby, BW_RATE (output data rate code, normal
  power), DATA_FORMAT (range +-2/4/8/16 g, FULL_RES, right-justified), INT_ENABLE 0 (polled),
  FIFO_CTL bypass (clears the FIFO) then stream mode with a watermark, POWER_CTL measure;
* read: INT_SOURCE (Overrun bit) and FIFO_STATUS (Entries), then one 6-byte burst of
  DATAX0..DATAZ1 per entry: the chip pops one FIFO entry per data-register read, so entries
  cannot be fetched in one long burst (reading on would reach FIFO_CTL and FIFO_STATUS, not the
  next entry). Several entries can share one I2C_RDWR ioctl as (write 0x32, read 6) pairs with
  repeated STARTs (`entries_per_transfer`); 1 is the plain combined transaction every adapter
  supports;
* scale: FULL_RES keeps 3.9 mg/LSB at every range; otherwise 10 bits over the range (3.9, 7.8,
  15.6, 31.2 mg/LSB at +-2, 4, 8, 16 g), optionally times g0 for m/s^2;
* overrun: the Overrun bit is set when the FIFO has filled (in stream mode the oldest samples are
  then being overwritten); it is counted in `overruns` and reported with the data.

Datasheet notes: over I2C the 1600 and 3200 Hz rates need more bus bandwidth than 400 kHz gives
(the datasheet recommends them with SPI at >= 2 MHz); 800 Hz needs 400 kHz fast mode.
"""
from __future__ import annotations

import numpy as np

from hal.drivers.i2c.bus import STANDARD_GRAVITY, FifoRead, I2cChip, Transport, msg_bytes, read_msg, write_msg

# Registers (datasheet Table 19)
DEVID = 0x00
BW_RATE = 0x2C
POWER_CTL = 0x2D
INT_ENABLE = 0x2E
INT_MAP = 0x2F
INT_SOURCE = 0x30
DATA_FORMAT = 0x31
DATAX0 = 0x32
FIFO_CTL = 0x38
FIFO_STATUS = 0x39

DEVID_VALUE = 0xE5
ADDRESSES = (0x53, 0x1D)   # SDO/ALT ADDRESS low, high

# POWER_CTL bits
MEASURE = 0x08
# INT_SOURCE bits
INT_DATA_READY, INT_WATERMARK, INT_OVERRUN = 0x80, 0x02, 0x01
# DATA_FORMAT bits
FULL_RES = 0x08
RANGE_CODES = {2: 0b00, 4: 0b01, 8: 0b10, 16: 0b11}
# FIFO_CTL: FIFO_MODE in bits 7:6, Samples (watermark) in bits 4:0
FIFO_BYPASS, FIFO_FIFO, FIFO_STREAM, FIFO_TRIGGER = 0b00, 0b01, 0b10, 0b11
FIFO_DEPTH = 32
ENTRIES_MASK = 0x3F

# Output data rates (BW_RATE Rate bits, datasheet Table 7): code n gives 3200 / 2**(15 - n) Hz.
# The datasheet prints them rounded; both the printed and the exact value are accepted.
RATE_CODES: dict[float, int] = {3200.0 / 2 ** (15 - code): code for code in range(16)}
RATE_LABELS = ("0.10", "0.20", "0.39", "0.78", "1.56", "3.13", "6.25", "12.5", "25", "50", "100", "200",
               "400", "800", "1600", "3200")

# Scale factor: 3.9 mg/LSB in full resolution (every range) and at +-2 g 10-bit; doubling per
# range step in 10-bit mode (datasheet Table 1, typical).
FULL_RES_G_PER_LSB = 0.0039
REGISTER_NAMES = {DEVID: "DEVID", BW_RATE: "BW_RATE", POWER_CTL: "POWER_CTL", INT_ENABLE: "INT_ENABLE",
                  INT_MAP: "INT_MAP", INT_SOURCE: "INT_SOURCE", DATA_FORMAT: "DATA_FORMAT",
                  DATAX0: "DATAX0", FIFO_CTL: "FIFO_CTL", FIFO_STATUS: "FIFO_STATUS"}

MAX_RDWR_MSGS = 42   # Linux I2C_RDWR_IOCTL_MAX_MSGS


def rate_code(rate: float) -> tuple[int, float]:
    """(BW_RATE code, exact rate in Hz) for a configured rate; ValueError lists the valid ones."""
    for exact, code in RATE_CODES.items():
        if abs(rate - exact) <= 0.01 * exact:
            return code, exact
    raise ValueError(f"{rate:g} Hz is not an ADXL345 output data rate; choose one of "
                     f"{', '.join(RATE_LABELS)} Hz")


def g_per_lsb(range_g: int, full_resolution: bool) -> float:
    if full_resolution:
        return FULL_RES_G_PER_LSB
    return FULL_RES_G_PER_LSB * range_g / 2


class ADXL345(I2cChip):
    NAME = "ADXL345"
    ID_REGISTER, ID_REGISTER_NAME, ID_VALUE = DEVID, "DEVID", DEVID_VALUE
    ADDRESS_HINT = "the ADXL345 answers at 0x53 with SDO/ALT ADDRESS low, 0x1D with SDO high"
    REGISTER_NAMES = REGISTER_NAMES
    DEFAULT_ADDRESS = ADDRESSES[0]

    def __init__(self, bus: Transport, address: int = DEFAULT_ADDRESS, *, bus_number: int | None = None,
                 sample_rate: float = 800.0, range_g: int = 16, full_resolution: bool = True,
                 watermark: int = 16, units: str = "g", entries_per_transfer: int = 1) -> None:
        super().__init__(bus, address, bus_number=bus_number)
        if range_g not in RANGE_CODES:
            raise ValueError(f"range_g must be one of {', '.join(map(str, RANGE_CODES))}, not {range_g}")
        if not 1 <= watermark <= 31:
            raise ValueError(f"watermark must be 1..31 samples, not {watermark}")
        if not 1 <= entries_per_transfer <= MAX_RDWR_MSGS // 2:
            raise ValueError(f"entries_per_transfer must be 1..{MAX_RDWR_MSGS // 2}")
        self.rate_code, self.sample_rate = rate_code(sample_rate)
        self.range_g = range_g
        self.full_resolution = full_resolution
        self.watermark = watermark
        self.entries_per_transfer = entries_per_transfer
        self.scale = g_per_lsb(range_g, full_resolution) * (STANDARD_GRAVITY if units == "m/s2" else 1.0)
        self.overruns = 0

    # ---- set-up ----

    def configure(self) -> None:
        """Probe, then program the chip from standby into measuring with the FIFO streaming."""
        self.probe()
        self.write_register(POWER_CTL, 0x00)                       # standby while configuring
        self.write_register(BW_RATE, self.rate_code)               # LOW_POWER = 0
        fmt = (FULL_RES if self.full_resolution else 0) | RANGE_CODES[self.range_g]
        self.write_register(DATA_FORMAT, fmt)                      # right-justified, no self-test, I2C
        self.write_register(INT_ENABLE, 0x00)                      # polled: INT_SOURCE is set regardless
        self.write_register(FIFO_CTL, FIFO_BYPASS << 6)            # bypass empties the FIFO
        self.write_register(FIFO_CTL, (FIFO_STREAM << 6) | self.watermark)
        self.write_register(POWER_CTL, MEASURE)

    def standby(self) -> None:
        self.bus.write_byte_data(self.address, POWER_CTL, 0x00)

    # ---- data ----

    def fifo_status(self) -> tuple[int, bool]:
        """(entries waiting, overrun). INT_SOURCE is read first: reading the data clears Overrun."""
        source = self.read_register(INT_SOURCE)
        entries = self.read_register(FIFO_STATUS) & ENTRIES_MASK
        # A full FIFO is an overrun whether or not the bit has been seen yet.
        return entries, bool(source & INT_OVERRUN) or entries >= FIFO_DEPTH

    def read_entries(self, count: int) -> np.ndarray:
        """Pop `count` FIFO entries; raw int16 counts, shape (count, 3)."""
        out = bytearray()
        done = 0
        if not self.plain_i2c:        # SMBus-only adapter: one block read per entry (it pops one)
            for _ in range(count):
                out += self.block_read(DATAX0, 6, what="reading a FIFO entry (DATAX0..DATAZ1, SMBus block read)")
            return np.frombuffer(bytes(out), dtype="<i2").reshape(count, 3)
        while done < count:
            n = min(self.entries_per_transfer, count - done)
            msgs = []
            for _ in range(n):
                msgs += [write_msg(self.address, [DATAX0]), read_msg(self.address, 6)]
            self.transfer(*msgs, what=f"reading FIFO entries (DATAX0..DATAZ1, {n} x 6 bytes)")
            for m in msgs[1::2]:
                out += msg_bytes(m)
            done += n
        return np.frombuffer(bytes(out), dtype="<i2").reshape(count, 3)

    def read_fifo(self) -> FifoRead:
        """Drain what the FIFO holds now, scaled to the configured units."""
        entries, overrun = self.fifo_status()
        if overrun:
            self.overruns += 1
        raw = self.read_entries(entries) if entries else np.zeros((0, 3), dtype=np.int16)
        data = (raw.T.astype(np.float64) * self.scale).astype(np.float32)
        return FifoRead(np.ascontiguousarray(data), overrun)
