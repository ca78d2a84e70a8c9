"""Serial-line drivers' building blocks: ports (pyserial underneath), Modbus RTU, NMEA 0183.

The sources that use them are hal/sources/modbus_rtu.py and hal/sources/nmea.py.
"""
