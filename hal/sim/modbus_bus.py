"""A simulated Modbus RTU bus (`simulate: true` on a modbus_rtu source): a pymodbus RTU server on
one end of a pseudo-terminal pair, serving every configured slave and point with slowly varying
values (a sine per point: the point's `sim` profile, or about 1000 raw counts +-10 %)."""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time

from hal.drivers.serial.modbus import RAW_RANGE, encode_value
from hal.drivers.serial.port import NullModem
from hal.sources.modbus_rtu import ModbusPoint, ModbusRtuConfig, SimProfile

log = logging.getLogger("hal.modbus_rtu")


def sim_profile(i: int, p: ModbusPoint) -> SimProfile:
    if p.sim is not None:
        return p.sim
    mean = 1000 * p.scale + p.offset
    return SimProfile(mean=mean, amplitude=abs(mean) * 0.1 or 1.0, period_s=60.0 + 7.0 * i)


def sim_raw_value(p: ModbusPoint, profile: SimProfile, t: float) -> float | int | bool:
    """The raw value a simulated device holds for point p at time t (s)."""
    wave = math.sin(2 * math.pi * t / profile.period_s)
    if p.dtype == "bool":
        return wave >= 0
    eng = profile.mean + profile.amplitude * wave
    raw = (eng - p.offset) / p.scale if p.scale else 0.0
    if p.dtype == "float32":
        return raw
    lo, hi = RAW_RANGE[p.dtype]
    return int(min(hi, max(lo, round(raw))))


class SimulatedBus:
    """A pymodbus RTU server on one end of a NullModem, serving every configured point, in its
    own thread and event loop. client_path is the other end, for the source's port."""

    UPDATE_S = 0.2

    def __init__(self, cfg: ModbusRtuConfig) -> None:
        from pymodbus.server import ModbusSerialServer
        from pymodbus.simulator import DataType as SimType
        from pymodbus.simulator import SimData, SimDevice

        self.cfg = cfg
        self.points = list(cfg.points)
        self.profiles = [sim_profile(i, p) for i, p in enumerate(self.points)]
        self.t0 = time.monotonic()
        self.modem = NullModem()
        self.client_path = self.modem.b.path
        tables = ("c", "d", "h", "i")   # pymodbus's order: coils, discrete inputs, holding, input
        fn_table = {1: "c", 2: "d", 3: "h", 4: "i"}

        def blocks_for(slave: int) -> tuple:
            out = []
            for table in tables:
                pts = [p for p in self.points if p.slave == slave and fn_table[p.function] == table]
                bits = table in ("c", "d")
                if not pts:
                    out.append([SimData(0, values=[False] * 16 if bits else [0],
                                        datatype=SimType.BITS if bits else SimType.REGISTERS)])
                    continue
                lo = min(p.address for p in pts)
                hi = max(p.address + p.count for p in pts)
                out.append([SimData(lo, values=[False] * (hi - lo) if bits else [0] * (hi - lo),
                                    datatype=SimType.BITS if bits else SimType.REGISTERS)])
            return tuple(out)

        slaves = sorted({p.slave for p in self.points})
        devices = [SimDevice(id=s, simdata=blocks_for(s)) for s in slaves]
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="modbus-sim", daemon=True)
        self._thread.start()
        self.server = None

        async def start():
            self.server = ModbusSerialServer(devices, port=self.modem.a.path, baudrate=cfg.baudrate,
                                             parity=cfg.parity, stopbits=cfg.stopbits, bytesize=cfg.bytesize)
            await self._update()
            await self.server.serve_forever(background=True)
            self._updater = asyncio.ensure_future(self._run_updates())

        try:
            asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        except BaseException:
            self.close()
            raise

    async def _update(self) -> None:
        t = time.monotonic() - self.t0
        for p, profile in zip(self.points, self.profiles):
            raw = sim_raw_value(p, profile, t)
            if p.dtype == "bool":
                values = [bool(raw)]
            else:
                values = encode_value(raw, p.dtype, p.byte_order, p.word_order)
            await self.server.async_setValues(p.slave, p.function, p.address, values)

    async def _run_updates(self) -> None:
        while True:
            await asyncio.sleep(self.UPDATE_S)
            await self._update()

    def close(self) -> None:
        async def stop():
            updater = getattr(self, "_updater", None)
            if updater is not None:
                updater.cancel()
            if self.server is not None:
                await self.server.shutdown()

        if self.loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
            except Exception:
                log.debug("modbus simulator: shutdown", exc_info=True)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
        if not self.loop.is_running():
            self.loop.close()
        self.modem.close()
