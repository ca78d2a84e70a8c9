"""The one interface every source implements."""
from __future__ import annotations

import enum
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


class Health(enum.Enum):
    STARTING = "starting"
    OK = "ok"
    FAILED = "failed"      # read or open failed; the supervisor retries with backoff
    ENDED = "ended"        # a finite source (replay) has delivered everything


@dataclass(frozen=True)
class SourceInfo:
    name: str
    kind: str                    # "vibration", ...
    sample_rate: float           # Hz
    channels: tuple[str, ...]    # channel names, e.g. ("x", "y", "z")
    units: str                   # units of the samples, e.g. "g"
    frame_pixels: int = 0        # video: the most pixels a frame (one channel) may have


@dataclass(frozen=True)
class Block:
    """Consecutive samples of every channel.

    data is planar float32, shape (channels, frames). start_ns is the Unix time of the first
    sample; it is derived from the sample index, so it never goes backwards or jitters.
    index is the absolute index of the first frame since the source was opened.
    gap is True when these samples do not continue the previous block's (the next recording
    of a replay, samples lost in a FIFO overrun): windows must not span it.
    """

    data: np.ndarray
    start_ns: int
    index: int
    gap: bool = False
    image: tuple[int, int] | None = None   # (height, width) when each block is one camera frame

    @property
    def frames(self) -> int:
        return int(self.data.shape[1])


class Source(ABC):
    """A sensor stream. read() blocks until the next block (pacing real-time sources itself)
    and returns None once a finite source has ended. Errors are raised as exceptions; the
    supervisor counts them, marks the source FAILED and reopens it with backoff."""

    type_name: str = ""
    # Attributes holding this driver's own event counts (FIFO overruns, CRC errors, bad lines…),
    # exported as appliance_source_driver_events_total{source, event}.
    COUNTERS: tuple[str, ...] = ()

    def __init__(self, name: str, config) -> None:
        self.name = name
        self.config = config
        self._health = Health.STARTING
        self._reason = ""
        self._lock = threading.Lock()

    @property
    @abstractmethod
    def info(self) -> SourceInfo: ...

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def read(self) -> Block | None: ...

    def close(self) -> None:  # noqa: B027  (optional: sources without resources need not override)
        pass

    # Health is written by the source's reader thread and read by metrics and the console.
    @property
    def health(self) -> tuple[Health, str]:
        with self._lock:
            return self._health, self._reason

    def set_health(self, health: Health, reason: str = "") -> None:
        with self._lock:
            self._health, self._reason = health, reason


class SampleClock:
    """Turns sample indices into Unix-ns timestamps and paces real-time sources.

    Anchored once at open on both clocks: wall time gives the Unix epoch, the monotonic clock
    gives pacing that NTP steps cannot disturb."""

    def __init__(self, sample_rate: float) -> None:
        self.sample_rate = float(sample_rate)
        self.wall0_ns = time.time_ns()
        self.mono0 = time.monotonic()

    def timestamp_ns(self, index: int) -> int:
        return self.wall0_ns + round(index * 1e9 / self.sample_rate)

    def wait_until(self, index: int, stop: threading.Event | None = None) -> None:
        """Sleep until sample `index` is due in real time."""
        due = self.mono0 + index / self.sample_rate
        delay = due - time.monotonic()
        if delay > 0:
            if stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)
