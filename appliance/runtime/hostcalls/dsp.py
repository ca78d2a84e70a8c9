"""ap.dsp_*: numpy kernels on views of the module's linear memory (modules/ABI.md, "Host DSP")."""
from __future__ import annotations

import math
import os
import struct

from appliance.core import malloc

# Libraries that start thread pools read these when they load. A worker is one core's worth of
# work, and the zygote that forks workers must stay single-threaded.
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

MAX_FFT = 1 << 16
MAX_SIGNAL = 1 << 24   # values per call of a batched ap.dsp_* kernel
MAX_BANDS = 256
KURT_CHUNK = 1 << 18   # ap.dsp_band_kurtosis: values transformed at once (a few MB of temporaries)


def one_thread_libraries() -> None:
    """Before numpy or OpenCV load, unless the environment already decided."""
    for var, value in ONE_THREAD.items():
        os.environ.setdefault(var, value)


KEEP_MMAP_THRESHOLD, KEEP_TRIM_THRESHOLD = 16 << 20, 64 << 20


def keep_heap() -> None:
    """Keep freed memory in the heap. The kernels' numpy temporaries are hundreds of KB; glibc
    would hand them back to the kernel after each call and fault them in again on the next
    (measured: a dozen brk calls and ~0.6 ms of system time per 4-channel window). The process
    stays under its memory cap whatever is kept, and a worker has one thread (one arena).
    A module's linear memory is the exception (worker.py maps it fresh)."""
    malloc.tune(mmap_threshold=KEEP_MMAP_THRESHOLD, trim_threshold=KEEP_TRIM_THRESHOLD)


class HostDsp:
    """Native kernels for ap.dsp_*: numpy on views of the module's linear memory, reading the
    input in place and writing the output in place (no copy crosses the boundary but the
    kernels' own). Layouts, limits and the C twins are in ap_dsp.h; every pointer and length is
    checked against linear memory first (AbiViolation, like any other host call)."""

    IMPORTS = ("dsp_rfft", "dsp_irfft", "dsp_rfft_batch", "dsp_moments", "dsp_band_power", "dsp_envelope",
               "dsp_envelope_ex", "dsp_band_kurtosis", "dsp_median")

    def __init__(self, memory, violation) -> None:
        # numpy's OpenBLAS would otherwise start a pool whose threads spin ~0.1 s after start-up
        # (measured: 90 ms of CPU per new worker).
        one_thread_libraries()
        import numpy as np   # imported only by workers whose module uses host DSP
        self.np, self.memory, self.violation = np, memory, violation
        self._weights: dict[tuple[int, int], object] = {}   # (n, p) -> k^p, each twice (re, im)
        self._buffers: dict[tuple, object] = {}              # work arrays, reused across calls
        self._env_bands: dict[tuple, tuple[int, int]] = {}   # env.z shape -> its bins that are not 0
        # numpy >= 2 keeps float32 as float32 (complex64) and takes out=; 1.26 returns float64.
        self._fft_out = int(np.__version__.split(".")[0]) >= 2
        keep_heap()

    def _buffer(self, name: str, shape: tuple, dtype):
        """A zeroed work array on first use, then the same one (with what the kernel left in it)."""
        buf = self._buffers.get((name, shape))
        if buf is None:
            if len(self._buffers) > 32:   # a module cycling through many shapes: start over
                self._buffers.clear()
                self._env_bands.clear()
            buf = self._buffers[(name, shape)] = self.np.zeros(shape, dtype)
        return buf

    def _span(self, what: str, mem, ptr: int, nbytes: int) -> None:
        if ptr < 0 or nbytes < 0 or ptr + nbytes > len(mem):
            raise self.violation(f"{what}: pointer {ptr}+{nbytes} is outside linear memory ({len(mem)} bytes)")

    def _fft_size(self, what: str, n: int) -> None:
        if n < 4 or n > MAX_FFT or n & (n - 1):
            raise self.violation(f"{what}: n={n} is not a power of two in 4..{MAX_FFT}")

    def _batch(self, what: str, n: int, count: int) -> None:
        if count < 1 or count * n > MAX_SIGNAL:
            raise self.violation(f"{what}: count={count} signals of {n} (1.., at most {MAX_SIGNAL} samples in all)")

    def _f32(self, what: str, mem, ptr: int, floats: int):
        self._span(what, mem, ptr, 4 * floats)
        return self.np.frombuffer(mem, self.np.float32, floats, ptr)

    def _views(self, what: str, in_ptr: int, in_floats: int, out_ptr: int, out_floats: int, n: int):
        self._fft_size(what, n)
        mem = self.memory()
        return self._f32(what, mem, in_ptr, in_floats), self._f32(what, mem, out_ptr, out_floats)

    def rfft(self, in_ptr: int, out_ptr: int, n: int) -> int:
        x, out = self._views("ap.dsp_rfft", in_ptr, n, out_ptr, n + 2, n)
        out.view(self.np.complex64)[:] = self.np.fft.rfft(x)   # interleaved re, im: one copy
        return 0

    def irfft(self, in_ptr: int, out_ptr: int, n: int) -> int:
        spec, out = self._views("ap.dsp_irfft", in_ptr, n + 2, out_ptr, n, n)
        out[:] = self.np.fft.irfft(spec.view(self.np.complex64), n)
        return 0

    def rfft_batch(self, in_ptr: int, out_ptr: int, n: int, count: int) -> int:
        """count real FFTs: in + 4*n*i -> out + 4*(n+2)*i. numpy transforms the rows together."""
        np, what = self.np, "ap.dsp_rfft_batch"
        self._fft_size(what, n)
        self._batch(what, n, count)
        mem = self.memory()
        x = self._f32(what, mem, in_ptr, n * count).reshape(count, n)
        out = self._f32(what, mem, out_ptr, (n + 2) * count).view(np.complex64).reshape(count, n // 2 + 1)
        if self._fft_out:
            np.fft.rfft(x, out=out)   # straight into the module's memory
        else:
            out[:] = np.fft.rfft(x)
        return 0

    def moments(self, in_ptr: int, out_ptr: int, n: int, count: int, stats_ptr: int) -> int:
        """Per signal: stats = mean, m2, m3, m4, max(x - mean), min(x - mean) (f64); out = x - mean
        (rounded to f32 like the C path; out may be in)."""
        np, what = self.np, "ap.dsp_moments"
        if n < 1:
            raise self.violation(f"{what}: n={n} (at least 1)")
        self._batch(what, n, count)
        mem = self.memory()
        x = self._f32(what, mem, in_ptr, n * count).reshape(count, n)
        out = self._f32(what, mem, out_ptr, n * count).reshape(count, n)
        self._span(what, mem, stats_ptr, 48 * count)
        d = self._buffer("mom.d", (count, n), np.float64)
        d[:] = x
        mean = d.sum(axis=1)
        mean /= n
        means = mean.tolist()
        if not all(map(math.isfinite, means)):   # a NaN or inf sample: the rest is unspecified
            for i, m in enumerate(means):
                struct.pack_into("<d", mem, stats_ptr + 48 * i, m)
            return 0
        # max(x - mean) is max(x) - mean: the rounding of the subtraction keeps the order.
        highs, lows = x.max(axis=1).tolist(), x.min(axis=1).tolist()
        d -= mean[:, None]
        out[:] = d
        powers = self._buffer("mom.p", (3, count, n), np.float64)
        np.multiply(d, d, out=powers[0])
        np.multiply(powers[0], d, out=powers[1])
        np.multiply(powers[0], powers[0], out=powers[2])
        m2, m3, m4 = powers.sum(axis=2).tolist()
        stats = []
        for i, m in enumerate(means):
            stats += (m, m2[i] / n, m3[i] / n, m4[i] / n, highs[i] - m, lows[i] - m)
        struct.pack_into(f"<{6 * count}d", mem, stats_ptr, *stats)
        return 0

    def _weight(self, n: int, p: int):
        w = self._weights.get((n, p))
        if w is None:
            k = self.np.arange(n // 2 + 1, dtype=self.np.float64)
            if p < 0:
                k[0] = 1.0   # bin 0 is never weighted by a negative power (refused below)
            w = self._weights[(n, p)] = self.np.repeat(k ** p, 2)
        return w

    def band_power(self, spec_ptr: int, n: int, count: int, bands_ptr: int, nbands: int, out_ptr: int) -> int:
        """out[i, j] = sum over k0 <= k <= k1 of |X_k|^2 k^p of spectrum i, band j = (k0, k1, p) int32."""
        np, what = self.np, "ap.dsp_band_power"
        self._fft_size(what, n)
        self._batch(what, n, count)
        if nbands < 1 or nbands > MAX_BANDS:
            raise self.violation(f"{what}: nbands={nbands} (1..{MAX_BANDS})")
        mem = self.memory()
        f = self._f32(what, mem, spec_ptr, (n + 2) * count).reshape(count, n + 2)
        self._span(what, mem, bands_ptr, 12 * nbands)
        self._span(what, mem, out_ptr, 8 * count * nbands)
        m = n // 2
        flat, flat_cols, weighted = [], [], []
        rec = struct.unpack_from(f"<{3 * nbands}i", mem, bands_ptr)
        for j in range(nbands):
            k0, k1, p = rec[3 * j:3 * j + 3]
            if k1 < k0:
                continue
            if k0 < 0 or k1 > m or not -4 <= p <= 4 or (p < 0 and k0 < 1):
                raise self.violation(f"{what}: band {j} (k0={k0}, k1={k1}, p={p}) is not within bins 0..{m} "
                                     f"with -4 <= p <= 4 (k0 >= 1 when p < 0)")
            if p == 0:
                flat += (2 * k0, 2 * k1 + 2)
                flat_cols.append(j)
            else:
                weighted.append((j, 2 * k0, 2 * k1 + 2, p))
        # Squares of re and im in float64 (exact, as the C path forms them); two zero columns
        # after the n + 2 give reduceat an end for a band that reaches bin n/2.
        sq = self._buffer("bp.sq", (count, n + 4), np.float64)
        np.multiply(f, f, out=sq[:, :n + 2], dtype=np.float64)
        out = np.zeros((count, nbands))
        if flat:
            out[:, flat_cols] = np.add.reduceat(sq, flat, axis=1)[:, 0::2]
        for j, a, b, p in weighted:
            out[:, j] = (sq[:, a:b] * self._weight(n, p)[a:b]).sum(axis=1)
        np.frombuffer(mem, np.float64, count * nbands, out_ptr)[:] = out.ravel()
        return 0

    def envelope(self, spec_ptr: int, out_ptr: int, n: int, count: int, k0: int, k1: int) -> int:
        """Per spectrum: out = |analytic signal of bins k0..k1| minus its mean (f32), the analytic
        signal being the inverse FFT of 2 X on the band and 0 elsewhere."""
        return self._envelope("ap.dsp_envelope", spec_ptr, out_ptr, n, count, k0, k1, 0)

    def envelope_ex(self, spec_ptr: int, out_ptr: int, n: int, count: int, k0: int, k1: int, flags: int) -> int:
        """envelope() with flags: 1 the squared envelope |z|^2, 2 the band whitened first (X/|X|)."""
        return self._envelope("ap.dsp_envelope_ex", spec_ptr, out_ptr, n, count, k0, k1, flags)

    def _flags(self, what: str, flags: int) -> None:
        if not 0 <= flags <= 3:
            raise self.violation(f"{what}: flags={flags} (0..3: 1 squared, 2 whitened)")

    def _whiten(self, z):
        """X/|X| where |X| > 0, in place (complex64; the C path divides by sqrtf(re^2 + im^2))."""
        np = self.np
        m = np.abs(z)
        np.divide(z, m, out=z, where=m > 0)

    def band_kurtosis(self, spec_ptr: int, n: int, count: int, bands_ptr: int, nbands: int, flags: int,
                      out_ptr: int) -> int:
        """Spectral kurtosis per spectrum and band (k0, k1, p unused) into out (f64), as ap_dsp.h's
        ap_band_kurtosis defines it: the band's bins from baseband, zero-padded to m (a power of two
        >= max(bins, 4)), inverse FFT, m sum|z|^4 / (sum|z|^2)^2 - 2. The work, count x sum(m), is
        bounded like the other kernels' (MAX_SIGNAL values per call: more is an ABI violation) and
        done in chunks of at most KURT_CHUNK values, so the memory it takes stays small."""
        np, what = self.np, "ap.dsp_band_kurtosis"
        self._fft_size(what, n)
        self._batch(what, n, count)
        self._flags(what, flags)
        if nbands < 1 or nbands > MAX_BANDS:
            raise self.violation(f"{what}: nbands={nbands} (1..{MAX_BANDS})")
        mem = self.memory()
        spec = self._f32(what, mem, spec_ptr, (n + 2) * count).view(np.complex64).reshape(count, n // 2 + 1)
        self._span(what, mem, bands_ptr, 12 * nbands)
        self._span(what, mem, out_ptr, 8 * count * nbands)
        rec = struct.unpack_from(f"<{3 * nbands}i", mem, bands_ptr)
        by_size: dict[int, list[tuple[int, int, int]]] = {}
        work = 0
        for j in range(nbands):
            k0, k1 = rec[3 * j], rec[3 * j + 1]
            if k1 < k0:
                continue
            if k0 < 1 or k1 > n // 2 - 1:
                raise self.violation(f"{what}: band {j} (k0={k0}, k1={k1}) is not within bins 1..{n // 2 - 1}")
            m = max(4, 1 << (k1 - k0).bit_length())
            by_size.setdefault(m, []).append((j, k0, k1))
            work += count * m
        if work > MAX_SIGNAL:
            raise self.violation(f"{what}: {count} spectra x the bands' {work // count} padded bins = {work} values "
                                 f"(at most {MAX_SIGNAL} per call)")
        out = np.zeros((count, nbands))
        for m, group in by_size.items():
            per = max(1, KURT_CHUNK // (count * m))      # bands of this size per chunk
            for g0 in range(0, len(group), per):
                chunk = group[g0:g0 + per]
                z = np.zeros((count, len(chunk), m), np.complex64)
                for g, (j, k0, k1) in enumerate(chunk):
                    z[:, g, :k1 - k0 + 1] = spec[:, k0:k1 + 1]
                if flags & 2:
                    self._whiten(z)
                p = np.fft.ifft(z, axis=2)
                p = (p.real.astype(np.float64) ** 2 + p.imag.astype(np.float64) ** 2)
                s2, s4 = p.sum(axis=2), (p * p).sum(axis=2)
                sk = np.zeros_like(s2)
                np.divide(m * s4, s2 * s2, out=sk, where=s2 > 0)
                sk[s2 > 0] -= 2
                for g, (j, _, _) in enumerate(chunk):
                    out[:, j] = sk[:, g]
        np.frombuffer(mem, np.float64, count * nbands, out_ptr)[:] = out.ravel()
        return 0

    def _envelope(self, what: str, spec_ptr: int, out_ptr: int, n: int, count: int, k0: int, k1: int,
                  flags: int) -> int:
        np = self.np
        self._fft_size(what, n)
        self._batch(what, n, count)
        self._flags(what, flags)
        if k1 >= k0 and (k0 < 1 or k1 > n // 2 - 1):
            raise self.violation(f"{what}: bins {k0}..{k1} are not within 1..{n // 2 - 1}")
        mem = self.memory()
        spec = self._f32(what, mem, spec_ptr, (n + 2) * count).view(np.complex64).reshape(count, n // 2 + 1)
        out = self._f32(what, mem, out_ptr, n * count).reshape(count, n)
        if k1 < k0:
            out[:] = 0
            return 0
        z = self._buffer("env.z", (count, n), np.complex64)   # zero but on the last band it held
        last = self._env_bands.get((count, n))
        if last is not None:
            z[:, last[0]:last[1] + 1] = 0
        np.multiply(spec[:, k0:k1 + 1], 2, out=z[:, k0:k1 + 1])
        if flags & 2:                          # 2 X / |2 X|, then the analytic signal's 2 again
            self._whiten(z[:, k0:k1 + 1])
            z[:, k0:k1 + 1] *= 2
        self._env_bands[(count, n)] = (k0, k1)
        if self._fft_out:
            analytic = np.fft.ifft(z, out=self._buffer("env.a", (count, n), np.complex64))
        else:
            analytic = np.fft.ifft(z)
        e = self._buffer("env.e", (count, n), np.float32)
        if flags & 1:
            np.multiply(analytic.real, analytic.real, out=e)
            e += analytic.imag * analytic.imag
        else:
            np.abs(analytic, out=e)
        mean = e.sum(axis=1, dtype=np.float64)
        mean /= n
        np.subtract(e, mean.astype(np.float32)[:, None], out=out)
        return 0

    def median(self, in_ptr: int, n: int, count: int, stride: int, out_ptr: int) -> int:
        """Medians of count rows of n float32 (row i at in + 4*stride*i) into out (f64): the middle
        value, or the mean of the two middle values in f64 for even n; 0 for n = 0."""
        np, what = self.np, "ap.dsp_median"
        if n < 0 or count < 1 or stride < n or count * n > MAX_SIGNAL or stride > MAX_SIGNAL:
            raise self.violation(f"{what}: n={n}, count={count}, stride={stride} (n >= 0, count >= 1, "
                                 f"stride >= n, at most {MAX_SIGNAL} values in all)")
        mem = self.memory()
        self._span(what, mem, out_ptr, 8 * count)
        out = np.frombuffer(mem, np.float64, count, out_ptr)
        if n == 0:
            out[:] = 0.0
            return 0
        self._span(what, mem, in_ptr, 4 * (stride * (count - 1) + n))
        rows = np.ndarray((count, n), np.float32, mem, in_ptr, (4 * stride, 4))
        h = n // 2
        if n & 1:
            out[:] = np.partition(rows, h, axis=1)[:, h]
        else:
            q = np.partition(rows, (h - 1, h), axis=1)
            out[:] = 0.5 * (q[:, h - 1].astype(np.float64) + q[:, h])
        return 0

    def imports(self) -> dict:
        return {("ap", name): getattr(self, name[4:]) for name in self.IMPORTS}
