"""I2C sensor drivers: chip logic above a thin injected transport (an smbus2 SMBus on hardware,
the register-map emulator of hal/sim/i2c_chips.py in tests and demos).

    bus.py        transport (LazySMBus), i2c_msg helpers, errors, the read-back register discipline
    adxl345.py    Analog Devices ADXL345
    lis3dh.py     STMicroelectronics LIS3DH
    emulated.py   register-map emulators of both chips, with fault injection

hal/sources/i2c_accel.py turns a driver into a Source.
"""
from hal.drivers.i2c.bus import BusUnavailable, ChipNotFound, FifoRead, I2cError, LazySMBus, RegisterMismatch

__all__ = ["BusUnavailable", "ChipNotFound", "FifoRead", "I2cError", "LazySMBus", "RegisterMismatch"]
