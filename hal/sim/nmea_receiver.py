"""A simulated GPS receiver (`simulate: true` on an nmea source): a thread replays an NMEA log
into a pseudo-terminal, as a receiver transmits."""
from __future__ import annotations

import os
import threading
import time

from hal.drivers.serial.port import RawPty
from hal.sources.nmea import NmeaConfig


def _sentence(body: str) -> str:
    checksum = 0
    for c in body.encode("ascii"):
        checksum ^= c
    return f"${body}*{checksum:02X}"


def builtin_log(east_s: int = 60, north_s: int = 60) -> str:
    """A vehicle crossing a yard at walking pace (1.4 m/s east), then turning north (1.2 m/s):
    GGA, GSA, RMC per one-second epoch. Two minutes long, so a looped replay restarts (a gap for
    the modules) far less often than any window of a few dozen fixes fills."""
    lines = []
    lat, lon = 26.49600, 28.18200     # minutes of 51 N, 5 E
    for t in range(east_s + north_s):
        if t:
            if t <= east_s:
                lon += 0.00121
            else:
                lat += 0.000645
        hhmmss = f"09{30 + t // 60:02d}{t % 60:02d}.00"
        sats = "10" if t % 4 == 0 else "09"
        speed, course = ("2.72", "90.0") if t < east_s else ("2.33", "0.0")
        pos = f"51{lat:08.5f},N,005{lon:08.5f},E"
        lines.append(_sentence(f"GPGGA,{hhmmss},{pos},1,{sats},0.9,21.{3 + t % 3},M,46.1,M,,"))
        lines.append(_sentence("GPGSA,A,3,02,05,12,13,15,18,20,25,29,,,,1.6,0.9,1.3"))
        lines.append(_sentence(f"GPRMC,{hhmmss},A,{pos},{speed},{course},150624,,,A"))
    return "\n".join(lines) + "\n"


BUILTIN_LOG = builtin_log()


def split_epochs(text: str) -> list[list[bytes]]:
    """An NMEA log -> epochs (lists of CR LF terminated lines); a new epoch starts at each line
    whose GGA/RMC time differs from the current one. '#' comment lines are skipped."""
    epochs: list[list[bytes]] = []
    current: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(",")
        kind = parts[0][3:6] if len(parts[0]) >= 6 else ""
        if kind in ("GGA", "RMC") and len(parts) > 1 and parts[1] != current:
            current = parts[1]
            epochs.append([])
        if not epochs:
            epochs.append([])
        epochs[-1].append(line.encode("ascii", "replace") + b"\r\n")
    return epochs


class NmeaSimulator:
    """Replays an NMEA log into a pty master in a loop: one epoch per 1/sample_rate seconds,
    bytes paced at 10 bits per byte at the configured baud. Like a real receiver it transmits
    whether or not anyone listens: what the pty cannot take is lost."""

    def __init__(self, cfg: NmeaConfig) -> None:
        text = cfg.sim_log.read_text(errors="replace") if cfg.sim_log is not None else BUILTIN_LOG
        self.epochs = split_epochs(text)
        if not self.epochs:
            raise ValueError(f"{cfg.sim_log}: no NMEA sentences to replay")
        self.byte_s = 10.0 / cfg.baudrate
        self.period = 1.0 / cfg.sample_rate
        self.pty = RawPty()
        self.path = self.pty.path
        os.set_blocking(self.pty.master, False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nmea-sim", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        n = 0
        while not self._stop.is_set():
            for line in self.epochs[n % len(self.epochs)]:
                try:
                    os.write(self.pty.master, line)
                except BlockingIOError:
                    pass                          # nobody reads: the bytes go nowhere, as on a wire
                except OSError:
                    return
                if self._stop.wait(len(line) * self.byte_s):
                    return
            n += 1
            delay = t0 + n * self.period - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self.pty.close()
