"""The worker process: hosts exactly one wasm module instance.

Started by WorkerProcess (host.py) as `python -m appliance.runtime.worker` with three inherited
file descriptors: a SOCK_SEQPACKET socket to the supervisor, a memfd holding the window
buffer (shared memory), and a memfd holding the validated module bytes.

Protocol (one datagram per message):
  supervisor -> worker  JSON {"op": "load", ...}          -> JSON {"ok": true, "logs": [...]}
                        b"W" + u32 window_bytes            -> a window reply (REPLY below)
                        b"Q"                                -> exit 0
  A window reply is binary, since JSON of a hundred features costs more than a small module's
  whole window: REPLY (b"R", rc, ns, logs dropped, feature count F, names bytes N, JSON bytes J),
  then F float64 feature values, then N bytes of feature names joined by "\n" (sent only when
  they differ from the previous reply's; the supervisor keeps the last ones), then J bytes of JSON
  {"e": events, "l": logs, "s": state} holding only the keys that are not empty (J = 0: none).
  WorkerProcess._receive (host.py) turns it back into {"rc", "f", "e", "l", "ld", "ns"[, "s"]}.
  On a fault the worker answers {"fault": kind, "error": text} and exits: after a trap or an
  ABI violation the instance's state is not to be trusted, so the supervisor starts afresh.

Only the standard library and the engine are imported here: start-up stays in milliseconds and
no lock inherited from a threaded parent exists (we exec, never fork).
"""
from __future__ import annotations

import base64
import ctypes
import json
import math
import mmap
import os
import re
import resource
import signal
import socket
import struct
import sys
import time

from appliance import malloc
from appliance.runtime.backend import BACKENDS
from appliance.runtime.validate import ModuleRejected, check_module

MAX_LOG_BYTES = 512
MAX_LOGS_PER_CALL = 64
MAX_FEATURES = 256
MAX_EVENTS = 16
MAX_STATE_BYTES = 256 << 10
MAX_FFT = 1 << 16
MAX_SIGNAL = 1 << 24   # values per call of a batched ap.dsp_* kernel
MAX_BANDS = 256
FEATURE_NAME = re.compile(rb"[A-Za-z0-9_.:\-]{1,64}")
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
SOCKET_BUFFER = 1 << 20   # > the largest reply the limits above allow (~170 KB)
# Control characters would be escaped 6 bytes each in JSON: replace them, keep replies small.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# Window reply header: b"R", rc, ns, logs dropped, features, names bytes, JSON bytes.
REPLY = struct.Struct("<1siqIIII")


# Host imports the worker itself serves to every module; the kernels' classes list theirs.
CORE_IMPORTS = ("log", "feature", "features", "event", "state_changed")


class AbiViolation(Exception):
    """The module broke the ABI in a host call (bad pointer, name, count)."""


class Calls:
    """What the module reported during the current export call."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.features: dict[str, float] = {}
        self.events: list[list] = []
        self.logs: list[list] = []
        self.logs_dropped = 0
        self.state_changed = False


def private_memory_bytes() -> int:
    """VmData: the private writable memory the kernel charges against RLIMIT_DATA (heap, anonymous
    mappings, thread stacks; not code, not read-only or PROT_NONE reservations)."""
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmData:"):
                return int(line.split()[1]) << 10
    raise RuntimeError("no VmData in /proc/self/status")


def cap_memory(budget: int, final: bool) -> tuple[int, int]:
    """RLIMIT_DATA = what the worker holds now + budget: (footprint, cap).

    The cap bounds what the module and the host calls it makes can add, not what the libraries
    reserve when they load: numpy's and OpenCV's reservations differ by version (measured: import
    cv2 takes VmSize from 140 to 453 MB with OpenCV 4.14, 467 MB with 5.1), so a fixed
    address-space cap let a library update starve a healthy worker. A provisional cap covers the
    checks of the untrusted bytes; the final one, set once the kernels are imported and warmed
    up, is the hard limit too, so nothing in the worker can lift it afterwards."""
    footprint = private_memory_bytes()
    cap = footprint + budget
    hard = cap if final else resource.getrlimit(resource.RLIMIT_DATA)[1]
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    return footprint, cap


def _keep_heap() -> None:
    """Keep freed memory in the heap. The kernels' numpy temporaries are hundreds of KB; glibc
    would hand them back to the kernel after each call and fault them in again on the next
    (measured: a dozen brk calls and ~0.6 ms of system time per 4-channel window). The process
    stays under its memory cap whatever is kept, and a worker has one thread (one arena)."""
    malloc.tune(mmap_threshold=16 << 20, trim_threshold=64 << 20)


class HostDsp:
    """Native kernels for ap.dsp_*: numpy on views of the module's linear memory, reading the
    input in place and writing the output in place (no copy crosses the boundary but the
    kernels' own). Layouts, limits and the C twins are in ap_dsp.h; every pointer and length is
    checked against linear memory first (AbiViolation, like any other host call)."""

    IMPORTS = ("dsp_rfft", "dsp_irfft", "dsp_rfft_batch", "dsp_moments", "dsp_band_power", "dsp_envelope",
               "dsp_median")

    def __init__(self, memory, violation) -> None:
        # One thread: a worker is one core's worth of work. numpy's OpenBLAS would otherwise start
        # a pool whose threads spin ~0.1 s after start-up (measured: 90 ms of CPU per new worker).
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")
        import numpy as np   # imported only by workers whose module uses host DSP
        self.np, self.memory, self.violation = np, memory, violation
        self._weights: dict[tuple[int, int], object] = {}   # (n, p) -> k^p, each twice (re, im)
        self._buffers: dict[tuple, object] = {}              # work arrays, reused across calls
        self._env_bands: dict[tuple, tuple[int, int]] = {}   # env.z shape -> its bins that are not 0
        # numpy >= 2 keeps float32 as float32 (complex64) and takes out=; 1.26 returns float64.
        self._fft_out = int(np.__version__.split(".")[0]) >= 2
        _keep_heap()

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
        np, what = self.np, "ap.dsp_envelope"
        self._fft_size(what, n)
        self._batch(what, n, count)
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
        self._env_bands[(count, n)] = (k0, k1)
        if self._fft_out:
            analytic = np.fft.ifft(z, out=self._buffer("env.a", (count, n), np.complex64))
        else:
            analytic = np.fft.ifft(z)
        e = np.abs(analytic, out=self._buffer("env.e", (count, n), np.float32))
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


class HostImage:
    """Native kernels for ap.img_* (modules/ABI.md, "Host image kernels"): OpenCV through
    hal/imaging.py on numpy views of the module's linear memory, in place like HostDsp. Every
    pointer, size and argument is checked first (AbiViolation); the C twins are in ap_image.h."""

    IMPORTS = ("img_downscale", "img_blur", "img_bg_subtract", "img_dilate", "img_blobs")
    MAX_SIDE = 16384
    MAX_PIXELS = 1 << 24
    MAX_BLOBS_OUT = 4096

    def __init__(self, memory, violation) -> None:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")
        import numpy as np
        from hal import imaging   # OpenCV: imported only by workers whose module uses these kernels
        imaging.configure(threads=1)
        imaging.warm_up()
        self.np, self.memory, self.violation = np, memory, violation
        self.kernels = imaging.ImageKernels()
        self.blur_kernels = imaging.BLUR_KERNELS
        self.alpha_one = imaging.ALPHA_ONE
        _keep_heap()

    def _size(self, what: str, w: int, h: int) -> None:
        if not (1 <= w <= self.MAX_SIDE and 1 <= h <= self.MAX_SIDE and w * h <= self.MAX_PIXELS):
            raise self.violation(f"{what}: image {w}x{h} (1..{self.MAX_SIDE} each, at most {self.MAX_PIXELS} pixels)")

    def _u8(self, what: str, mem, ptr: int, nbytes: int, shape: tuple | None = None):
        if ptr < 0 or nbytes < 0 or ptr + nbytes > len(mem):
            raise self.violation(f"{what}: pointer {ptr}+{nbytes} is outside linear memory ({len(mem)} bytes)")
        a = self.np.frombuffer(mem, self.np.uint8, nbytes, ptr)
        return a.reshape(shape) if shape else a

    def downscale(self, src: int, w: int, h: int, factor: int, dst: int) -> int:
        what = "ap.img_downscale"
        self._size(what, w, h)
        if not (1 <= factor <= 16 and factor <= w and factor <= h):
            raise self.violation(f"{what}: factor={factor} (1..16, at most the width {w} and height {h})")
        mem = self.memory()
        ow, oh = w // factor, h // factor
        self.kernels.downscale(self._u8(what, mem, src, w * h, (h, w)), factor,
                               self._u8(what, mem, dst, ow * oh, (oh, ow)))
        return 0

    def blur(self, src: int, dst: int, w: int, h: int, kernel: int) -> int:
        what = "ap.img_blur"
        self._size(what, w, h)
        if kernel not in self.blur_kernels:
            raise self.violation(f"{what}: kernel={kernel} (1 box, 3 or 5 binomial)")
        mem = self.memory()
        self.kernels.blur(self._u8(what, mem, src, w * h, (h, w)), self._u8(what, mem, dst, w * h, (h, w)), kernel)
        return 0

    def bg_subtract(self, frame: int, bg: int, valid: int, mask: int, n: int, threshold: int, alpha: int) -> int:
        what = "ap.img_bg_subtract"
        if not 1 <= n <= self.MAX_PIXELS or not 0 <= threshold <= 255 or not 0 <= alpha <= self.alpha_one:
            raise self.violation(f"{what}: n={n}, threshold={threshold}, alpha={alpha} (n 1..{self.MAX_PIXELS}, "
                                 f"threshold 0..255, alpha 0..{self.alpha_one})")
        mem = self.memory()
        bg_view = self._u8(what, mem, bg, 2 * n).view(self.np.uint16)
        return self.kernels.bg_subtract(self._u8(what, mem, frame, n), bg_view, self._u8(what, mem, valid, n),
                                        self._u8(what, mem, mask, n), threshold, alpha)

    def dilate(self, src: int, dst: int, w: int, h: int, iterations: int) -> int:
        what = "ap.img_dilate"
        self._size(what, w, h)
        if not 0 <= iterations <= 16:
            raise self.violation(f"{what}: iterations={iterations} (0..16)")
        mem = self.memory()
        self.kernels.dilate(self._u8(what, mem, src, w * h, (h, w)), self._u8(what, mem, dst, w * h, (h, w)),
                            iterations)
        return 0

    def blobs(self, mask: int, w: int, h: int, min_area: int, out: int, max_out: int) -> int:
        what = "ap.img_blobs"
        self._size(what, w, h)
        if min_area < 1 or not 0 <= max_out <= self.MAX_BLOBS_OUT:
            raise self.violation(f"{what}: min_area={min_area}, max_out={max_out} (min_area >= 1, "
                                 f"max_out 0..{self.MAX_BLOBS_OUT})")
        mem = self.memory()
        image = self._u8(what, mem, mask, w * h, (h, w))
        out_view = self._u8(what, mem, out, 20 * max_out)
        count, rows = self.kernels.blobs(image, min_area, max_out)
        out_view[:rows.nbytes] = rows.view(self.np.uint8).ravel()
        return count

    def imports(self) -> dict:
        return {("ap", name): getattr(self, name[4:]) for name in self.IMPORTS}


def _text(raw: bytes) -> str:
    return CONTROL.sub("?", raw.decode("utf-8", "replace"))


def _harden(expected_parent: int) -> None:
    """Die with the supervisor; never gain privileges (setuid binaries) from here on."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != expected_parent:   # the parent died before prctl took effect
        os._exit(1)


def main() -> int:
    sock_fd, shm_fd, wasm_fd = (int(x) for x in os.environ["AP_WORKER_FDS"].split(","))
    _harden(int(os.environ["AP_WORKER_PARENT"]))
    # Ctrl-C and a service stop reach the whole process group; stopping workers is the
    # supervisor's job (it asks, then kills), and PDEATHSIG covers a supervisor that died.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=sock_fd)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    shm = mmap.mmap(shm_fd, 0)
    shm_view = memoryview(shm)   # windows are copied from it into linear memory without a bytes copy
    with os.fdopen(wasm_fd, "rb") as f:
        wasm = f.read()

    load = json.loads(sock.recv(SOCKET_BUFFER))
    # Cap the process before it parses untrusted bytes; the final cap follows the imports.
    budget = int(load["memory_budget_bytes"])
    footprint, cap = cap_memory(budget, final=False)

    def capped() -> str:
        return f"worker capped at {budget >> 20} MiB above its own {footprint >> 20} MiB"

    calls = Calls()
    inst = None

    def read_guest(ptr: int, length: int, what: str) -> bytes:
        mem = inst.memory()
        if length < 0 or ptr < 0 or ptr + length > len(mem):
            raise AbiViolation(f"{what}: pointer {ptr}+{length} is outside linear memory ({len(mem)} bytes)")
        return bytes(mem[ptr:ptr + length])

    def host_log(level: int, ptr: int, length: int) -> None:
        text = read_guest(ptr, min(length, MAX_LOG_BYTES), "ap.log")
        if len(calls.logs) >= MAX_LOGS_PER_CALL:
            calls.logs_dropped += 1
            return
        calls.logs.append([int(level), _text(text)])

    valid_names: dict[bytes, str] = {}   # names already checked: modules repeat theirs every window

    def host_feature(ptr: int, length: int, value: float) -> None:
        if length > 64:
            raise AbiViolation(f"ap.feature: name of {length} bytes (max 64)")
        raw = read_guest(ptr, length, "ap.feature")
        name = valid_names.get(raw)
        if name is None:
            if not FEATURE_NAME.fullmatch(raw):
                raise AbiViolation(f"ap.feature: invalid name {raw[:64]!r}")
            name = raw.decode()
            if len(valid_names) < 4 * MAX_FEATURES:
                valid_names[raw] = name
        if len(calls.features) >= MAX_FEATURES and name not in calls.features:
            raise AbiViolation(f"ap.feature: more than {MAX_FEATURES} features in one window")
        calls.features[name] = float(value)

    batch_names: dict[bytes, tuple[str, ...]] = {}   # packed name lists already checked

    def host_features(names_ptr: int, names_len: int, values_ptr: int, count: int) -> None:
        """ap.features: count names, each ended by a 0 byte, and count float64 values."""
        if not 1 <= count <= MAX_FEATURES:
            raise AbiViolation(f"ap.features: count={count} (1..{MAX_FEATURES})")
        if not 0 <= names_len <= 65 * count:
            raise AbiViolation(f"ap.features: {names_len} bytes of names for {count} names (max 65 each)")
        raw = read_guest(names_ptr, names_len, "ap.features")
        names = batch_names.get(raw)
        if names is None:
            parts = raw.split(b"\0")
            if len(parts) != count + 1 or parts[-1]:
                raise AbiViolation(f"ap.features: {names_len} bytes of names do not hold {count} names, "
                                   "each ended by a 0 byte")
            for part in parts[:-1]:
                if not FEATURE_NAME.fullmatch(part):
                    raise AbiViolation(f"ap.features: invalid name {part[:64]!r}")
            names = tuple(part.decode() for part in parts[:-1])
            if len(batch_names) < 64:
                batch_names[raw] = names
        values = struct.unpack(f"<{count}d", read_guest(values_ptr, 8 * count, "ap.features"))
        calls.features.update(zip(names, values))
        if len(calls.features) > MAX_FEATURES:
            raise AbiViolation(f"ap.features: more than {MAX_FEATURES} features in one window")

    def host_event(severity: int, score: float, ptr: int, length: int) -> None:
        if not 0 <= severity <= 3:
            raise AbiViolation(f"ap.event: severity {severity} (must be 0..3)")
        if len(calls.events) >= MAX_EVENTS:
            raise AbiViolation(f"ap.event: more than {MAX_EVENTS} events in one window")
        msg = _text(read_guest(ptr, min(length, MAX_LOG_BYTES), "ap.event"))
        calls.events.append([int(severity), float(score), msg])

    def host_state_changed() -> None:
        calls.state_changed = True

    def state_blob() -> bytes:
        size = inst.call("ap_state_size")
        if not 0 < size <= MAX_STATE_BYTES:
            raise AbiViolation(f"ap_state_size() returned {size} (1..{MAX_STATE_BYTES} bytes allowed)")
        return read_guest(inst.call("ap_state_ptr"), size, "ap_state_ptr")

    def restore_state(blob: bytes) -> str:
        size = inst.call("ap_state_size")
        if size != len(blob):
            return f"refused: saved state is {len(blob)} bytes, the module's is {size}"
        ptr = inst.call("ap_state_ptr")
        read_guest(ptr, size, "ap_state_ptr")   # bounds check
        inst.memory()[ptr:ptr + size] = blob
        rc = inst.call("ap_state_loaded")
        return "accepted" if rc == 0 else f"refused by the module (ap_state_loaded returned {rc})"

    def fault(kind: str, error: str) -> int:
        sock.send(json.dumps({"fault": kind, "error": _text(error.encode())[:1000], "l": calls.logs},
                             ensure_ascii=False).encode())
        return 3

    def guest_buffer(kind: int, size: int) -> int:
        ptr = inst.call("ap_buffer", kind, size)
        if ptr == 0:
            raise AbiViolation(f"ap_buffer({kind}, {size}) returned 0: the module has no buffer that large")
        if ptr < 0 or ptr + size > len(inst.memory()):
            raise AbiViolation(f"ap_buffer({kind}, {size}) returned {ptr}, outside linear memory")
        return ptr

    try:
        info = check_module(wasm, load["label"], int(load["max_memory_bytes"]))
    except ModuleRejected as exc:
        return fault("load", str(exc))
    except MemoryError:
        return fault("memory", f"out of memory while checking the module ({capped()})")

    try:
        backend = BACKENDS[load["backend"]]()
        core = {"log": host_log, "feature": host_feature, "event": host_event,
                "state_changed": host_state_changed, "features": host_features}
        imports = {("ap", name): core[name] for name in CORE_IMPORTS}
        wanted = {(i.module, i.name) for i in info.imports}
        if wanted & {("ap", name) for name in HostDsp.IMPORTS}:
            imports.update(HostDsp(lambda: inst.memory(), AbiViolation).imports())   # numpy only if used
        if wanted & {("ap", name) for name in HostImage.IMPORTS}:
            imports.update(HostImage(lambda: inst.memory(), AbiViolation).imports())   # OpenCV only if used
        if ("ap", "nn_run") in wanted:
            from appliance.nn.host import HostNN

            def nn_log(level: int, text: str) -> None:
                if len(calls.logs) < MAX_LOGS_PER_CALL:
                    calls.logs.append([level, _text(text.encode())[:MAX_LOG_BYTES]])

            # Native code only when the module's host_nn switch is on (host.nn=1 in its params).
            imports.update(HostNN(lambda: inst.memory(), AbiViolation, load.get("module_dir") or None,
                                  "host.nn=1" in load["params"].splitlines(), nn_log).imports())
        # Everything this worker will import is in now: the budget starts from here.
        footprint, cap = cap_memory(budget, final=True)

        def start_instance() -> tuple[str, str] | None:
            """Instantiate and ap_init; a (fault kind, reason) if the module cannot start."""
            nonlocal inst
            inst = backend.instantiate(wasm, int(load["stack_bytes"]), imports)
            version = inst.call("ap_abi_version")
            if version != 1:
                return "load", f"module speaks ABI version {version}; this host implements version 1"
            params = load["params"].encode()
            ptr = guest_buffer(0, max(len(params), 1))
            inst.memory()[ptr:ptr + len(params)] = params
            rc = inst.call("ap_init", ptr, len(params))
            if rc != 0:
                errors = [m for lvl, m in calls.logs if lvl >= 3]
                return "params", f"module rejected its params: {errors[-1] if errors else f'ap_init returned {rc}'}"
            return None

        problem = start_instance()
        if problem:
            return fault(*problem)
        has_state = all(info.export(n) is not None for n in ("ap_state_size", "ap_state_ptr", "ap_state_loaded"))
        state_note = ""
        if load.get("state") and has_state:
            state_note = restore_state(base64.b64decode(load["state"]))
            if state_note != "accepted":
                # The refused blob now sits in the instance's memory: start a clean instance.
                problem = start_instance()
                if problem:
                    return fault(*problem)
    except AbiViolation as exc:
        return fault("abi", str(exc))
    except MemoryError:
        return fault("memory", f"out of memory while loading ({capped()})")
    except RuntimeError as exc:
        if "allocation failed" in str(exc):
            return fault("memory", f"{exc} ({capped()})")
        return fault("trap" if "[trap]" in str(exc) else "load", str(exc))
    sock.send(json.dumps({"ok": True, "l": calls.logs, "st": state_note, "mem": [footprint, cap]}).encode())

    window_ptrs: dict[int, int] = {}
    sent_names: tuple[str, ...] = ()   # the feature names the supervisor holds
    while True:
        msg = sock.recv(65536)
        if not msg or msg[:1] == b"Q":
            return 0
        if msg[:1] != b"W":
            return fault("protocol", f"unexpected message {msg[:16]!r}")
        (nbytes,) = struct.unpack_from("<I", msg, 1)
        calls.reset()
        try:
            ptr = window_ptrs.get(nbytes)
            if ptr is None:
                ptr = window_ptrs[nbytes] = guest_buffer(1, nbytes)
            inst.memory()[ptr:ptr + nbytes] = shm_view[:nbytes]
            t0 = time.perf_counter_ns()
            rc = inst.call("ap_process", ptr, nbytes)
            elapsed = time.perf_counter_ns() - t0
        except AbiViolation as exc:
            return fault("abi", str(exc))
        except MemoryError:
            return fault("memory", f"out of memory ({capped()})")
        except RuntimeError as exc:
            return fault("trap" if "[trap]" in str(exc) else "engine", str(exc))
        extra: dict = {}
        if calls.events:
            extra["e"] = calls.events
        if calls.logs:
            extra["l"] = calls.logs
        if calls.state_changed and has_state:
            try:
                extra["s"] = base64.b64encode(state_blob()).decode()
            except AbiViolation as exc:
                return fault("abi", str(exc))
        names = tuple(calls.features)
        packed_names = b""
        if names != sent_names:
            packed_names = "\n".join(names).encode()
            sent_names = names
        text = json.dumps(extra, ensure_ascii=False).encode() if extra else b""
        sock.send(b"".join((REPLY.pack(b"R", rc, elapsed, calls.logs_dropped, len(names), len(packed_names), len(text)),
                            struct.pack(f"<{len(names)}d", *calls.features.values()), packed_names, text)))


if __name__ == "__main__":
    sys.exit(main())
