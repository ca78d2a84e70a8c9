"""Simulated multi-axis accelerometer on a shaft with a rolling-element bearing.

Per axis: shaft harmonics (1x, 2x, 3x, ...) with seed-dependent phases, gaussian sensor noise
and, once a fault has started, a train of impulses at the bearing's BPFO (outer race) or BPFI
(inner race) rate. Each impulse rings the structure's resonance down as
a*exp(-zeta*w*t)*sin(w_d*t); inner-race impulses are amplitude-modulated by shaft rotation
because the defect moves in and out of the load zone.

Every sample is a pure function of (seed, absolute sample index): noise and impulse jitter come
from generators keyed by fixed-size chunks of a counter, never from "the next draws". So the
signal is continuous across blocks, identical for any block size, and reproducible.
"""
from __future__ import annotations

import math
import threading
from typing import Literal, Optional

import numpy as np
from pydantic import Field, ValidationInfo, field_validator, model_validator

from hal.sim.bearing import CWRU_DRIVE_END, BearingGeometry
from hal.registry import register_source
from hal.schema import ChannelNames, StrictModel
from hal.source import Block, Health, SampleClock, Source, SourceInfo

_DEFAULT_GAINS = (1.0, 0.8, 0.5)
# Ring-down is cut where the envelope is 80 dB down; below any realistic noise floor.
_RINGDOWN_LEVEL = 1e-4
# Counter chunk sizes: big enough to amortise generator set-up, small enough to stay cheap.
_NOISE_CHUNK = 4096
_JITTER_CHUNK = 1024
# Stream ids keep the independent random streams of one seed apart.
_STREAM_NOISE, _STREAM_JITTER, _STREAM_PHASE = 1, 2, 3


class FaultConfig(StrictModel):
    type: Literal["outer_race", "inner_race"]
    start_s: float = Field(0.0, ge=0, description="seconds after open() when the defect appears")
    amplitude_g: float = Field(0.6, gt=0, description="peak of one impulse's ring-down")
    resonance_hz: float = Field(3000.0, gt=0, description="structural resonance the impulses excite")
    damping_ratio: float = Field(0.05, gt=0, lt=1)
    jitter: float = Field(0.01, ge=0, lt=0.5,
                          description="std. dev. of impulse timing as a fraction of the period (slip)")


class SimVibrationConfig(StrictModel):
    type: Literal["sim_vibration"]
    sample_rate: float = Field(12800.0, gt=0, description="Hz")
    block_s: float = Field(0.05, gt=0, description="seconds per block")
    realtime: bool = True
    seed: int = 0
    shaft_rpm: float = Field(1797.0, gt=0)
    axes: ChannelNames = Field(default_factory=lambda: ["x", "y", "z"], min_length=1, max_length=8)
    harmonics_g: list[float] = Field(default_factory=lambda: [0.04, 0.015, 0.008],
                                     description="amplitudes of the 1x, 2x, 3x... shaft harmonics")
    axis_gain: Optional[list[float]] = Field(None, description="per-axis gain; default 1, 0.8, 0.5, ...")
    noise_g: float = Field(0.01, ge=0, description="std. dev. of the gaussian noise")
    bearing: BearingGeometry = CWRU_DRIVE_END
    fault: Optional[FaultConfig] = None

    # Field validators (not a model validator) so that a YAML error points at the offending key.
    @field_validator("axis_gain")
    @classmethod
    def _gain_per_axis(cls, gains: Optional[list[float]], info: ValidationInfo) -> Optional[list[float]]:
        axes = info.data.get("axes")
        if gains is not None and axes is not None and len(gains) != len(axes):
            raise ValueError(f"axis_gain has {len(gains)} entries but there are {len(axes)} axes ({', '.join(axes)})")
        return gains

    @field_validator("fault")
    @classmethod
    def _resonance_below_nyquist(cls, fault: Optional[FaultConfig], info: ValidationInfo) -> Optional[FaultConfig]:
        rate = info.data.get("sample_rate")
        if fault is not None and rate is not None and fault.resonance_hz >= rate / 2:
            raise ValueError(f"fault.resonance_hz ({fault.resonance_hz:g} Hz) must be below the Nyquist "
                             f"frequency sample_rate/2 ({rate / 2:g} Hz)")
        return fault

    @model_validator(mode="after")
    def _harmonics_below_nyquist(self):
        top = len(self.harmonics_g) * self.shaft_rpm / 60
        if self.harmonics_g and top >= self.sample_rate / 2:
            raise ValueError(f"the {len(self.harmonics_g)}x shaft harmonic ({top:g} Hz) is not below the "
                             f"Nyquist frequency sample_rate/2 ({self.sample_rate / 2:g} Hz)")
        return self

    @property
    def frames_per_block(self) -> int:
        return max(1, round(self.block_s * self.sample_rate))

    @property
    def gains(self) -> np.ndarray:
        if self.axis_gain is not None:
            return np.asarray(self.axis_gain, dtype=np.float64)
        return np.array([_DEFAULT_GAINS[i % len(_DEFAULT_GAINS)] for i in range(len(self.axes))])


def _generator(seed: int, stream: int, chunk: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed % 2**64, stream, chunk])))


class _CounterNormals:
    """Standard normals addressed by position: rows x positions, drawn chunk by chunk from
    generators keyed by (seed, stream, chunk number), so any slice can be fetched in any order."""

    def __init__(self, seed: int, stream: int, rows: int, chunk: int) -> None:
        self.seed, self.stream, self.rows, self.chunk = seed, stream, rows, chunk
        self._cache: dict[int, np.ndarray] = {}

    def _chunk(self, c: int) -> np.ndarray:
        block = self._cache.get(c)
        if block is None:
            block = _generator(self.seed, self.stream, c).standard_normal((self.rows, self.chunk))
            # Reads move forward, so only the newest couple of chunks are ever needed again.
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[c] = block
        return block

    def take(self, start: int, count: int) -> np.ndarray:
        first, last = start // self.chunk, (start + count - 1) // self.chunk
        if first == last:
            off = start - first * self.chunk
            return self._chunk(first)[:, off:off + count]
        parts = [self._chunk(c) for c in range(first, last + 1)]
        off = start - first * self.chunk
        return np.concatenate(parts, axis=1)[:, off:off + count]


@register_source("sim_vibration", SimVibrationConfig)
class SimVibrationSource(Source):
    def __init__(self, name: str, config: SimVibrationConfig) -> None:
        super().__init__(name, config)
        cfg = config
        self._fs = float(cfg.sample_rate)
        self._frames = cfg.frames_per_block
        self._shaft_hz = cfg.shaft_rpm / 60.0
        self._stop = threading.Event()
        self._clock: SampleClock | None = None
        self._index = 0

        gains = cfg.gains
        n_axes, n_harm = len(cfg.axes), len(cfg.harmonics_g)
        # Each axis sees every harmonic with its own phase. sin(th + ph) = cos(ph) sin(th) + sin(ph) cos(th),
        # so one (axes, 2*harmonics) matrix times [sin; cos] of the harmonic phases gives all axes at once.
        phases = _generator(cfg.seed, _STREAM_PHASE, 0).uniform(0, 2 * np.pi, (n_axes, n_harm))
        amp = gains[:, None] * np.asarray(cfg.harmonics_g, dtype=np.float64)[None, :]
        self._mix = np.concatenate([amp * np.cos(phases), amp * np.sin(phases)], axis=1)
        # Cycles per sample of each harmonic: phase is computed from the absolute index, never accumulated.
        self._cycles_per_sample = np.arange(1, n_harm + 1, dtype=np.float64) * self._shaft_hz / self._fs
        self._gains = gains
        self._noise = _CounterNormals(cfg.seed, _STREAM_NOISE, n_axes, _NOISE_CHUNK)

        fault = cfg.fault
        if fault is not None:
            orders = cfg.bearing.fault_orders()
            self._fault_hz = (orders["BPFO"] if fault.type == "outer_race" else orders["BPFI"]) * self._shaft_hz
            self._period = 1.0 / self._fault_hz
            w = 2 * np.pi * fault.resonance_hz
            self._decay = fault.damping_ratio * w
            self._wd = w * math.sqrt(1 - fault.damping_ratio ** 2)
            self._ringdown_s = math.log(1 / _RINGDOWN_LEVEL) / self._decay
            self._jitter = _CounterNormals(cfg.seed, _STREAM_JITTER, 1, _JITTER_CHUNK)

    @property
    def info(self) -> SourceInfo:
        return SourceInfo(name=self.name, kind="vibration", sample_rate=self._fs,
                          channels=tuple(self.config.axes), units="g")

    @property
    def fault_hz(self) -> float | None:
        """Impulse rate of the configured fault (BPFO or BPFI in Hz), None without a fault."""
        return self._fault_hz if self.config.fault is not None else None

    def open(self) -> None:
        self._stop.clear()
        self._index = 0
        self._clock = SampleClock(self._fs)
        self.set_health(Health.OK)

    def close(self) -> None:
        # Wakes a read() that is pacing, so a supervisor can stop the source promptly.
        self._stop.set()

    def read(self) -> Block | None:
        if self._clock is None:
            raise RuntimeError(f"source {self.name!r}: read() before open()")
        start, n = self._index, self._frames
        data = self.generate(start, n)
        self._index = start + n
        if self.config.realtime:
            # A block is ready once its last sample has been "acquired".
            self._clock.wait_until(start + n, self._stop)
        return Block(data=data, start_ns=self._clock.timestamp_ns(start), index=start)

    def generate(self, start: int, frames: int) -> np.ndarray:
        """Samples [start, start+frames) of every axis, float32 (axes, frames). Pure function
        of the config and the indices; read() is this plus the clock."""
        idx = np.arange(start, start + frames, dtype=np.float64)
        # Wrap to [0, 1) cycles before scaling, so long runs keep full phase precision.
        cycles = np.mod(np.multiply.outer(self._cycles_per_sample, idx), 1.0)
        theta = 2 * np.pi * cycles
        out = self._mix @ np.concatenate([np.sin(theta), np.cos(theta)], axis=0)
        if self.config.noise_g > 0:
            out += self.config.noise_g * self._noise.take(start, frames)
        if self.config.fault is not None:
            impulses = self._impulses(idx)
            if impulses is not None:
                out += self._gains[:, None] * impulses[None, :]
        return out.astype(np.float32)

    def _impulses(self, idx: np.ndarray) -> np.ndarray | None:
        fault = self.config.fault
        t = idx / self._fs
        t0, t1 = t[0], t[-1]
        if t1 < fault.start_s:
            return None
        # Impulse k nominally at start_s + (k + 1/2) T; jitter (clipped) keeps them ordered and after start_s.
        T, s0 = self._period, fault.start_s
        k_lo = max(0, math.floor((t0 - self._ringdown_s - s0) / T) - 1)
        k_hi = math.ceil((t1 - s0) / T) + 1
        if k_hi < 0 or k_hi < k_lo:
            return None
        k = np.arange(k_lo, k_hi + 1)
        jitter = np.clip(fault.jitter * self._jitter.take(k_lo, k.size)[0], -0.45, 0.45)
        tk = s0 + (k + 0.5 + jitter) * T
        amp = np.full(k.size, fault.amplitude_g)
        if fault.type == "inner_race":
            amp *= 0.5 * (1 + np.cos(2 * np.pi * self._shaft_hz * tk))
        dt = t[None, :] - tk[:, None]
        # Outside [0, ringdown) an impulse contributes exactly nothing, so which impulses a block
        # happens to consider cannot change its samples.
        live = (dt >= 0) & (dt < self._ringdown_s)
        dt = np.where(live, dt, 0.0)
        ring = np.exp(-self._decay * dt) * np.sin(self._wd * dt)
        ring *= live
        return amp @ ring
