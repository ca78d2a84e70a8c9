"""The serial console's port: raw, 8N1, no flow control (appliance/ops/console.py uses it).

pyserial stays inside hal/: the console gets a port object with read/write/close and nothing
else. Raw means what a terminal program expects from the far end: no echo, no line editing, no
signals (Ctrl-C arrives as byte 0x03), no CR/LF translation in either direction.
"""
from __future__ import annotations

import serial
from serial import SerialException

__all__ = ["SerialException", "open_console_port"]


def open_console_port(path: str, baudrate: int = 115200, timeout: float = 0.2) -> serial.Serial:
    """Open `path` (/dev/ttyAMA0, /dev/ttyS0, /dev/ttyGS0, a USB adapter, a pty) raw at 8N1.
    read(n) returns early (possibly b"") after `timeout` seconds. exclusive=True: a second
    console (or a getty) on the same line is refused rather than interleaved."""
    port = serial.Serial(port=path, baudrate=baudrate, bytesize=serial.EIGHTBITS, parity=serial.PARITY_NONE,
                         stopbits=serial.STOPBITS_ONE, timeout=timeout, write_timeout=5.0, xonxoff=False,
                         rtscts=False, dsrdtr=False, exclusive=True)
    return port
