"""The host DSP kernels of ABI v1 (modules/ABI.md, "Host DSP"): each kernel's C fallback in
modules/sdk/ap_dsp.h against the worker's numpy twin (appliance/runtime/worker.py, HostDsp) on the
same inputs in the same linear memory, edge cases included; their bounds checks; and ap.features
through a real worker.

The kernels run inside a small test module (KERNELS_C below) under wasm3: t_host(0) makes the SDK
dispatchers take the C path, t_host(1) the host's. Tolerances, against float64 numpy and between
the paths (measured worst of these cases in parentheses):
  ap_moments       mean, m2, m4 relative 1e-12, m3 1e-12 of max(|m3|, m2^1.5) (6.5e-15: the same
                   float64 sums in another order); max/min equal but for the mean's last bits; the
                   mean-removed float32 signal within 1 ulp
  ap_rfft_batch    1e-6 of the largest |X_k| (C radix-2 1.9e-7, pocketfft 4.5e-8: float32 both)
  ap_band_power    relative 1e-12 on the same float32 spectrum (float64 sums)
  ap_envelope      1e-6 of the largest envelope value (C 1.9e-7 with two float32 inverse real
                   FFTs, host 2.0e-7 with one complex64 inverse FFT, 2.5e-7 between them)
  ap_envelope_ex   the same, of the largest value of what it computes (|z| or |z|^2, whitened or
                   not): 1e-6 (squared 1e-5: a square doubles the relative error of each value)
  ap_band_kurtosis relative 1e-4 on SK + 3 (float32 FFTs on both paths, float64 sums)
  ap_median_rows   equal
  ap_features      equal (one batch against one ap.feature call per name)
"""
from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from appliance.runtime.engines import IMPORT_SIGNATURES
from appliance.runtime.wire import HEADER, load_message, pack_header
from appliance.runtime.process import ModuleFault, WorkerProcess
from appliance.runtime.hostcalls.abi import AbiViolation, MAX_FEATURES
from appliance.runtime.hostcalls.dsp import HostDsp

from support import build_inline_module

KERNELS_C = r"""
#define AP_WINDOW_BYTES (64 + 4 * 1024)
#include "ap_module.h"
#include "ap_dsp.h"

static float buf[(1 << 20) / 4];          /* the test's scratch: 1 MiB at t_buf() */
static float median_scratch[16384];

AP_EXPORT(t_buf) float *t_buf(void) { return buf; }
AP_EXPORT(t_host) void t_host(int32_t on) { ap_dsp_use_host = on; ap_dsp_host_features = on; }
AP_EXPORT(t_dsp_init) int32_t t_dsp_init(const char *params, int32_t len) {
    ap_dsp_init(params, len);
    return ap_dsp_use_host | ap_dsp_host_features << 1;
}
AP_EXPORT(t_rfft) int32_t t_rfft(const float *in, float *out, int32_t n) { return ap_rfft(in, out, n); }
AP_EXPORT(t_irfft) int32_t t_irfft(const float *in, float *out, int32_t n) { return ap_irfft(in, out, n); }
AP_EXPORT(t_rfft_batch) int32_t t_rfft_batch(const float *in, float *out, int32_t n, int32_t count) {
    return ap_rfft_batch(in, out, n, count);
}
AP_EXPORT(t_moments) int32_t t_moments(const float *in, float *out, int32_t n, int32_t count, double *stats) {
    return ap_moments(in, out, n, count, stats);
}
AP_EXPORT(t_band_power) int32_t t_band_power(const float *spec, int32_t n, int32_t count, const ap_band *bands,
                                             int32_t nbands, double *out) {
    return ap_band_power(spec, n, count, bands, nbands, out);
}
AP_EXPORT(t_envelope) int32_t t_envelope(const float *spec, float *out, int32_t n, int32_t count, int32_t k0,
                                         int32_t k1) {
    return ap_envelope(spec, out, n, count, k0, k1);
}
AP_EXPORT(t_envelope_ex) int32_t t_envelope_ex(const float *spec, float *out, int32_t n, int32_t count, int32_t k0,
                                               int32_t k1, int32_t flags) {
    return ap_envelope_ex(spec, out, n, count, k0, k1, flags);
}
AP_EXPORT(t_band_kurtosis) int32_t t_band_kurtosis(const float *spec, int32_t n, int32_t count, const ap_band *bands,
                                                   int32_t nbands, int32_t flags, double *out) {
    return ap_band_kurtosis(spec, n, count, bands, nbands, flags, out);
}
AP_EXPORT(t_median) int32_t t_median(const float *in, int32_t n, int32_t count, int32_t stride, double *out) {
    return ap_median_rows(in, n, count, stride, out, median_scratch);
}
AP_EXPORT(t_features) void t_features(const char *names, int32_t len, const double *values, int32_t count) {
    ap_features(names, len, values, count);
}

/* In a worker: ap_process calls the kernel the `case` param names, with arguments that break
 * its limits, or reports features in batches. */
static int32_t which;

int32_t ap_init(const char *params, int32_t len) {
    ap_dsp_init(params, len);
    which = (int32_t)ap_param_f64(params, len, "case", 0, 0);
    return 0;
}

int32_t ap_process(const uint8_t *window, int32_t len) {
    (void)window; (void)len;
    static ap_band band = {1, 2000, 0};                /* beyond bin n/2 = 32 */
    static const char names[] = "a.x\0b.y\0";
    static const char bad_name[] = "a x\0";
    static const char no_end[] = "a.x";
    static double values[300];
    static char many[300 * 8];
    switch (which) {
        case 1: return ap_moments((const float *)0x7ffffff0, buf, 64, 1, (double *)buf);
        case 2: return ap_moments(buf, buf, 64, 1, (double *)0x7ffffff0);
        case 3: return ap_rfft_batch(buf, buf + 100000, 48, 1);
        case 4: return ap_band_power(buf, 64, 1, &band, 1, (double *)(buf + 1000));
        case 5: return ap_envelope(buf, buf + 1000, 64, 1, 0, 10);
        case 6: return ap_median_rows(buf, 10, 2, 5, (double *)(buf + 1000), median_scratch);
        case 7: return ap_envelope(buf, buf + 1000, 64, 1 << 20, 1, 10);
        case 8: return ap_envelope_ex(buf, buf + 1000, 64, 1, 1, 10, 4);
        case 9: { static ap_band kb = {1, 32, 0}; return ap_band_kurtosis(buf, 64, 1, &kb, 1, 0, (double *)(buf + 1000)); }
        case 10: values[0] = 1.5; values[1] = -2; ap_features(names, 8, values, 2); return 0;
        case 11: ap_features(bad_name, 4, values, 1); return 0;
        case 12: ap_features(no_end, 3, values, 1); return 0;
        case 13: ap_features(names, 8, values, 3); return 0;
        case 14: {                                     /* 300 distinct names: above 256 */
            int32_t at = 0;
            for (int32_t i = 0; i < 300; i++) {
                many[at++] = 'f';
                for (int32_t d = 100; d > 0; d /= 10) many[at++] = (char)('0' + i / d % 10);
                many[at++] = 0;
            }
            ap_features(many, at, values, 300);
            return 0;
        }
        case 15: ap_features(names, 8, (const double *)0x7ffffff0, 2); return 0;
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def kernels_wasm(tmp_path_factory) -> bytes:
    return build_inline_module(tmp_path_factory, "kernels", KERNELS_C, memory_kb=2048)


class Kernels:
    """The test module under wasm3 with the worker's HostDsp linked in."""

    def __init__(self, wasm: bytes):
        import wasm3
        self.env = wasm3.Environment()
        self.rt = self.env.new_runtime(64 << 10)
        self.mod = self.env.parse_module(wasm)
        self.rt.load(self.mod)
        self.features: list[tuple[str, float]] = []
        self.batches = 0
        self.dsp = HostDsp(self.mem, AbiViolation)
        for (module, name), fn in self.dsp.imports().items():
            self.mod.link_function(module, name, IMPORT_SIGNATURES[(module, name)], fn)
        self.mod.link_function("ap", "log", "v(iii)", lambda level, ptr, n: None)
        self.mod.link_function("ap", "feature", "v(iiF)", self._feature)
        self.mod.link_function("ap", "features", "v(iiii)", self._features)
        self.buf = self.call("t_buf")
        self.top = self.buf + (1 << 20)

    def call(self, name: str, *args):
        return self.rt.find_function(name)(*args)

    def mem(self) -> memoryview:
        return self.rt.get_memory(0)

    def _feature(self, ptr, n, value):
        self.features.append((bytes(self.mem()[ptr:ptr + n]).decode(), value))

    def _features(self, names_ptr, names_len, values_ptr, count):
        self.batches += 1
        names = bytes(self.mem()[names_ptr:names_ptr + names_len]).split(b"\0")[:-1]
        values = struct.unpack_from(f"<{count}d", self.mem(), values_ptr)
        self.features += [(name.decode(), value) for name, value in zip(names, values)]

    def put(self, offset: int, array) -> int:
        """Copies array into the scratch buffer at byte offset; returns its address."""
        data = np.ascontiguousarray(array).tobytes()
        self.mem()[self.buf + offset:self.buf + offset + len(data)] = data
        return self.buf + offset

    def get(self, address: int, dtype, count: int) -> np.ndarray:
        return np.frombuffer(self.mem(), dtype, count, address).copy()

    def both(self, name: str, *args):
        """Calls kernel t_<name> on the C path, then on the host path; both return codes."""
        self.call("t_host", 0)
        rc_c = self.call(f"t_{name}", *args)
        self.call("t_host", 1)
        rc_h = self.call(f"t_{name}", *args)
        return rc_c, rc_h


@pytest.fixture
def k(kernels_wasm) -> Kernels:
    return Kernels(kernels_wasm)


IN, OUT_C, OUT_H, AUX = 0, 1 << 18, 2 << 18, 3 << 18     # byte offsets in the 1 MiB buffer


def run_both(k: Kernels, name: str, out_offset_arg: int, args: list, out_dtype, out_count: int):
    """The kernel's output on each path (args[out_offset_arg] is replaced by each path's output)."""
    outs = []
    for host, off in ((0, OUT_C), (1, OUT_H)):
        a = list(args)
        a[out_offset_arg] = k.buf + off
        k.call("t_host", host)
        assert k.call(f"t_{name}", *a) == 0
        outs.append(k.get(k.buf + off, out_dtype, out_count))
    return outs


# ---- ap_moments -------------------------------------------------------------------------------

def moments_ref(x: np.ndarray) -> np.ndarray:
    d = x.astype(np.float64) - x.astype(np.float64).mean()
    return np.array([x.astype(np.float64).mean(), (d ** 2).mean(), (d ** 3).mean(), (d ** 4).mean(), d.max(), d.min()])


@pytest.mark.parametrize("n,count,kind", [
    (1, 1, "noise"), (3, 2, "noise"), (4, 1, "constant"), (7, 3, "offset"), (4096, 1, "noise"),
    (4096, 4, "noise"), (16384, 2, "offset"), (1000, 4, "impulses"),
])
def test_moments_host_matches_c(k, n, count, kind):
    rng = np.random.default_rng(n * 10 + count)
    x = rng.standard_normal((count, n))
    if kind == "constant":
        x[:] = 0.25
    elif kind == "offset":
        x = 1e4 + 0.01 * x                              # a large mean: cancellation in the moments
    elif kind == "impulses":
        x = 0.01 * x
        x[:, ::97] = 5.0
    x = x.astype(np.float32)
    p_in = k.put(IN, x)
    for host, off in ((0, OUT_C), (1, OUT_H)):
        k.call("t_host", host)
        assert k.call("t_moments", p_in, k.buf + off, n, count, k.buf + AUX + 64 * host * count) == 0
    stats_c = k.get(k.buf + AUX, np.float64, 6 * count).reshape(count, 6)
    stats_h = k.get(k.buf + AUX + 64 * count, np.float64, 6 * count).reshape(count, 6)
    out_c = k.get(k.buf + OUT_C, np.float32, n * count).reshape(count, n)
    out_h = k.get(k.buf + OUT_H, np.float32, n * count).reshape(count, n)
    for i in range(count):
        want = moments_ref(x[i])
        for j in range(4):   # mean, m2, m3, m4: the same sums in another order
            scale = abs(want[j]) if j != 2 else max(abs(want[2]), want[1] ** 1.5)
            assert abs(stats_c[i, j] - want[j]) <= 1e-12 * scale + 1e-300, (i, j, stats_c[i], want)
            assert abs(stats_h[i, j] - want[j]) <= 1e-12 * scale + 1e-300, (i, j, stats_h[i], want)
        # max/min of x - mean: the same element, so equal but for the mean's last bits
        np.testing.assert_allclose(stats_h[i, 4:], stats_c[i, 4:], rtol=0, atol=1e-12 * abs(want[0]) + 1e-300)
        ulp = np.spacing(np.float32(max(abs(out_c[i]).max(), 1e-30)))
        assert np.abs(out_h[i].astype(np.float64) - out_c[i]).max() <= ulp, i


def test_moments_non_finite_sample_flags_the_mean(k):
    for bad in (np.nan, np.inf, -np.inf):
        x = np.ones((2, 64), np.float32)
        x[1, 17] = bad
        p_in = k.put(IN, x)
        for host in (0, 1):
            k.call("t_host", host)
            assert k.call("t_moments", p_in, k.buf + OUT_C, 64, 2, k.buf + AUX) == 0
            stats = k.get(k.buf + AUX, np.float64, 12).reshape(2, 6)
            assert stats[0, 0] == 1.0 and stats[0, 1] == 0.0
            assert not math.isfinite(stats[1, 0]), (host, bad, stats[1])


def test_moments_in_place(k):
    x = np.random.default_rng(1).standard_normal(256).astype(np.float32)
    for host in (0, 1):
        p = k.put(IN, x)
        k.call("t_host", host)
        assert k.call("t_moments", p, p, 256, 1, k.buf + AUX) == 0
        stats = k.get(k.buf + AUX, np.float64, 6)
        np.testing.assert_allclose(stats, moments_ref(x), rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(k.get(p, np.float32, 256), (x.astype(np.float64) - stats[0]).astype(np.float32))


# ---- ap_rfft_batch ----------------------------------------------------------------------------

@pytest.mark.parametrize("n,count", [(4, 1), (8, 3), (4096, 1), (4096, 4), (16384, 2)])
def test_rfft_batch_host_matches_c(k, n, count):
    x = np.random.default_rng(n + count).standard_normal((count, n)).astype(np.float32)
    c, h = run_both(k, "rfft_batch", 1, [k.put(IN, x), 0, n, count], np.float32, (n + 2) * count)
    c = c.view(np.complex64).reshape(count, n // 2 + 1)
    h = h.view(np.complex64).reshape(count, n // 2 + 1)
    want = np.fft.rfft(x.astype(np.float64))
    for i in range(count):
        scale = np.abs(want[i]).max()
        assert np.abs(c[i] - want[i]).max() <= 1e-6 * scale
        assert np.abs(h[i] - want[i]).max() <= 1e-6 * scale
        assert np.abs(h[i] - c[i]).max() <= 1e-6 * scale


@pytest.mark.parametrize("n", [4, 64, 4096, 16384])
def test_rfft_and_irfft_host_match_c(k, n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    c, h = run_both(k, "rfft", 1, [k.put(IN, x), 0, n], np.float32, n + 2)
    want = np.fft.rfft(x.astype(np.float64))
    scale = np.abs(want).max()
    assert np.abs(c.view(np.complex64) - want).max() <= 1e-6 * scale
    assert np.abs(h.view(np.complex64) - want).max() <= 1e-6 * scale
    spec = want.astype(np.complex64)
    c, h = run_both(k, "irfft", 1, [k.put(IN, spec), 0, n], np.float32, n)
    scale = np.abs(x).max()
    assert np.abs(c - x).max() <= 1e-6 * scale and np.abs(h - x).max() <= 1e-6 * scale
    assert (k.get(k.buf + IN, np.complex64, n // 2 + 1) == spec).all()   # the input is left alone


# ---- ap_band_power ----------------------------------------------------------------------------

def band_power_ref(spec: np.ndarray, bands: list[tuple[int, int, int]]) -> np.ndarray:
    power = np.abs(spec.astype(np.complex128)) ** 2
    k = np.arange(spec.shape[-1], dtype=np.float64)
    out = np.zeros((spec.shape[0], len(bands)))
    for j, (k0, k1, p) in enumerate(bands):
        if k1 >= k0:
            out[:, j] = (power[:, k0:k1 + 1] * k[k0:k1 + 1] ** p).sum(axis=1)
    return out


@pytest.mark.parametrize("n,count", [(4, 1), (64, 2), (4096, 1), (4096, 4), (16384, 1)])
def test_band_power_host_matches_c(k, n, count):
    rng = np.random.default_rng(n * 3 + count)
    m = n // 2
    x = rng.standard_normal((count, n)).astype(np.float32)
    spec = np.fft.rfft(x).astype(np.complex64)
    bands = [(0, m, 0), (1, m, -2), (0, 0, 0), (m, m, 0), (1, 1, -4), (m, m, 4), (3, 2, 0),   # edges, empty
             (m + 5, -7, -9)]                                                              # empty: not checked
    for _ in range(20):
        a, b = sorted(rng.integers(0, m + 1, 2).tolist())
        p = int(rng.integers(-4, 5))
        bands.append((max(a, 1) if p < 0 else a, b, p))
    if n >= 64:   # the bearing module's layout: 8 bands over [1, n/2) and a velocity band
        bands += [((b * n + 15) // 16 if b else 1, ((b + 1) * n + 15) // 16 - 1, 0) for b in range(8)]
        bands.append((4, m // 3, -2))
    rec = np.array(bands, np.int32)
    c, h = run_both(k, "band_power", 5, [k.put(IN, spec), n, count, k.put(AUX, rec), len(bands), 0],
                    np.float64, count * len(bands))
    want = band_power_ref(spec, bands)
    c, h = c.reshape(count, -1), h.reshape(count, -1)
    np.testing.assert_allclose(c, want, rtol=1e-12, atol=0)   # same float32 spectrum: float64 sums
    np.testing.assert_allclose(h, want, rtol=1e-12, atol=0)
    assert (c[:, 6] == 0).all() and (h[:, 6:8] == 0).all()


# ---- ap_envelope ------------------------------------------------------------------------------

def envelope_ref(spec: np.ndarray, n: int, k0: int, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean-removed envelope in float64, and the envelope's largest value per signal."""
    z = np.zeros((spec.shape[0], n), np.complex128)
    z[:, k0:k1 + 1] = 2 * spec[:, k0:k1 + 1]
    e = np.abs(np.fft.ifft(z))
    return e - e.mean(axis=1, keepdims=True), e.max(axis=1)


@pytest.mark.parametrize("n,count,k0,k1", [
    (4, 1, 1, 1), (64, 2, 1, 31), (64, 1, 10, 10), (4096, 1, 512, 1535), (4096, 4, 700, 1900),
    (16384, 2, 1, 8191), (4096, 2, 900, 100),   # the last: an empty band gives zeros
])
def test_envelope_host_matches_c(k, n, count, k0, k1):
    rng = np.random.default_rng(n + k0)
    x = rng.standard_normal((count, n)).astype(np.float32)
    spec = np.fft.rfft(x).astype(np.complex64)
    p_spec = k.put(IN, spec)
    c, h = run_both(k, "envelope", 1, [p_spec, 0, n, count, k0, k1], np.float32, n * count)
    c, h = c.reshape(count, n), h.reshape(count, n)
    assert (k.get(p_spec, np.complex64, count * (n // 2 + 1)).reshape(count, -1) == spec).all()   # unchanged
    if k1 < k0:
        assert (c == 0).all() and (h == 0).all()
        return
    want, top = envelope_ref(spec, n, k0, k1)
    for i in range(count):
        assert np.abs(c[i] - want[i]).max() <= 1e-6 * top[i], i
        assert np.abs(h[i] - want[i]).max() <= 1e-6 * top[i], i
        assert np.abs(h[i] - c[i]).max() <= 1e-6 * top[i], i


def test_envelope_after_other_bands_and_shapes(k):
    """Both paths keep work buffers between calls: a band or shape used before must not leak into
    the next call."""
    rng = np.random.default_rng(5)
    calls = [(64, 1, 1, 31), (64, 1, 20, 25), (64, 2, 3, 9), (64, 1, 5, 6), (128, 1, 10, 60), (64, 1, 2, 4),
             (64, 1, 7, 3), (64, 1, 1, 1)]
    for n, count, k0, k1 in calls:
        spec = np.fft.rfft(rng.standard_normal((count, n)).astype(np.float32)).astype(np.complex64)
        c, h = run_both(k, "envelope", 1, [k.put(IN, spec), 0, n, count, k0, k1], np.float32, n * count)
        if k1 < k0:
            assert (c == 0).all() and (h == 0).all()
            continue
        want, top = envelope_ref(spec, n, k0, k1)
        assert np.abs(c.reshape(count, n) - want).max() <= 1e-6 * top.max(), (n, count, k0, k1)
        assert np.abs(h.reshape(count, n) - want).max() <= 1e-6 * top.max(), (n, count, k0, k1)


def test_envelope_of_an_am_tone_is_its_modulation(k):
    """A 1 kHz carrier modulated at 50 Hz: the envelope is the modulation, on both paths."""
    n, fs = 4096, 12800.0
    t = np.arange(n) / fs
    x = ((1 + 0.5 * np.cos(2 * np.pi * 50 * t)) * np.cos(2 * np.pi * 1000 * t)).astype(np.float32)
    spec = np.fft.rfft(x).astype(np.complex64)
    c, h = run_both(k, "envelope", 1, [k.put(IN, spec), 0, n, 1, 200, 440], np.float32, n)
    want = 0.5 * np.cos(2 * np.pi * 50 * t)
    assert np.abs(c - want)[200:-200].max() < 1e-3 and np.abs(h - want)[200:-200].max() < 1e-3


# ---- ap_envelope_ex: squared, whitened ------------------------------------------------------------

def envelope_ex_ref(spec: np.ndarray, n: int, k0: int, k1: int, flags: int) -> tuple[np.ndarray, np.ndarray]:
    """What ap_envelope_ex computes, in float64: (mean-removed output, largest value per signal)."""
    band = spec[:, k0:k1 + 1].astype(np.complex128)
    if flags & 2:
        mag = np.abs(band)
        band = np.where(mag > 0, band / np.where(mag > 0, mag, 1), 0)
    z = np.zeros((spec.shape[0], n), np.complex128)
    z[:, k0:k1 + 1] = 2 * band
    a = np.fft.ifft(z)
    e = np.abs(a) ** 2 if flags & 1 else np.abs(a)
    return e - e.mean(axis=1, keepdims=True), e.max(axis=1)


@pytest.mark.parametrize("flags", [0, 1, 2, 3])
@pytest.mark.parametrize("n,count,k0,k1", [(64, 2, 1, 31), (4096, 3, 512, 1535), (4096, 1, 1200, 1100)])
def test_envelope_ex_host_matches_c(k, flags, n, count, k0, k1):
    rng = np.random.default_rng(n + k0 + flags)
    x = rng.standard_normal((count, n)).astype(np.float32)
    spec = np.fft.rfft(x).astype(np.complex64)
    spec[0, (k0 + k1) // 2] = 0                  # a zero bin stays zero when whitened
    c, h = run_both(k, "envelope_ex", 1, [k.put(IN, spec), 0, n, count, k0, k1, flags], np.float32, n * count)
    c, h = c.reshape(count, n), h.reshape(count, n)
    if k1 < k0:
        assert (c == 0).all() and (h == 0).all()
        return
    want, top = envelope_ex_ref(spec, n, k0, k1, flags)
    tol = 1e-5 if flags & 1 else 1e-6
    for i in range(count):
        assert np.abs(c[i] - want[i]).max() <= tol * top[i], (i, np.abs(c[i] - want[i]).max() / top[i])
        assert np.abs(h[i] - want[i]).max() <= tol * top[i], (i, np.abs(h[i] - want[i]).max() / top[i])
    if flags == 0:   # ap_envelope_ex(..., 0) is ap_envelope
        c0, _ = run_both(k, "envelope", 1, [k.put(IN, spec), 0, n, count, k0, k1], np.float32, n * count)
        assert (c0.reshape(count, n) == c).all()


def test_envelope_ex_squared_and_whitened_do_what_they_say(k):
    """An AM tone: the squared envelope is (1 + m cos)^2; whitened, a tone in white-ish noise
    loses its level (every bin magnitude 1)."""
    n, fs = 4096, 12800.0
    t = np.arange(n) / fs
    x = ((1 + 0.5 * np.cos(2 * np.pi * 50 * t)) * np.cos(2 * np.pi * 1000 * t)).astype(np.float32)
    spec = np.fft.rfft(x).astype(np.complex64)
    c, h = run_both(k, "envelope_ex", 1, [k.put(IN, spec), 0, n, 1, 200, 440, 1], np.float32, n)
    sq = (1 + 0.5 * np.cos(2 * np.pi * 50 * t)) ** 2
    want = sq - sq.mean()
    assert np.abs(c - want)[200:-200].max() < 2e-3 and np.abs(h - want)[200:-200].max() < 2e-3
    big = (spec * 1000).astype(np.complex64)
    w1, _ = run_both(k, "envelope_ex", 1, [k.put(IN, spec), 0, n, 1, 200, 440, 2], np.float32, n)
    w2, _ = run_both(k, "envelope_ex", 1, [k.put(IN, big), 0, n, 1, 200, 440, 2], np.float32, n)
    assert np.abs(w1 - w2).max() < 1e-5 * np.abs(w1).max()   # whitened: the level is gone


# ---- ap_band_kurtosis -----------------------------------------------------------------------------

def band_kurtosis_ref(spec: np.ndarray, bands: list[tuple[int, int]], flags: int) -> np.ndarray:
    out = np.zeros((spec.shape[0], len(bands)))
    for j, (k0, k1) in enumerate(bands):
        if k1 < k0:
            continue
        m = max(4, 1 << (k1 - k0).bit_length())
        z = np.zeros((spec.shape[0], m), np.complex128)
        z[:, :k1 - k0 + 1] = spec[:, k0:k1 + 1]
        if flags & 2:
            mag = np.abs(z)
            z = np.where(mag > 0, z / np.where(mag > 0, mag, 1), 0)
        p = np.abs(np.fft.ifft(z)) ** 2
        s2, s4 = p.sum(axis=1), (p * p).sum(axis=1)
        out[:, j] = np.where(s2 > 0, m * s4 / np.where(s2 > 0, s2 * s2, 1) - 2, 0)
    return out


@pytest.mark.parametrize("flags", [0, 2])
@pytest.mark.parametrize("n,count", [(8, 1), (64, 2), (4096, 4)])
def test_band_kurtosis_host_matches_c(k, flags, n, count):
    rng = np.random.default_rng(n + flags)
    x = rng.standard_normal((count, n))
    x[:, ::97] += 8                                   # impulses: some bands get a large SK
    spec = np.fft.rfft(x.astype(np.float32)).astype(np.complex64)
    m = n // 2
    bands = [(1, m - 1), (1, 1), (m // 2, m - 1), (3, 2), (1, max(1, m // 3)), (max(1, m // 4), max(1, m // 4 + 2))]
    p_bands = k.put(AUX, np.array([[a, b, 0] for a, b in bands], np.int32))
    c, h = run_both(k, "band_kurtosis", 6, [k.put(IN, spec), n, count, p_bands, len(bands), flags, 0],
                    np.float64, count * len(bands))
    want = band_kurtosis_ref(spec, bands, flags)
    for got in (c.reshape(count, -1), h.reshape(count, -1)):
        np.testing.assert_allclose(got + 3, want + 3, rtol=1e-4)
        assert (got[:, 3] == 0).all()                 # the empty band


def test_band_kurtosis_of_noise_tone_and_impulses(k):
    """SK about 0 for Gaussian noise, -1 for a tone, large where impulses ring a resonance (three
    signals in one batch, one band: 2.5-3.5 kHz)."""
    n, fs = 4096, 12000.0
    rng = np.random.default_rng(1)
    t = np.arange(n) / fs
    ring = np.zeros(n)
    for t0 in np.arange(0.003, t[-1], 1 / 100):
        m = t >= t0
        ring[m] += np.exp(-(t[m] - t0) * 800) * np.sin(2 * np.pi * 3000 * (t[m] - t0))
    x = np.stack([rng.standard_normal(n), np.sin(2 * np.pi * 3001 * t), 0.05 * rng.standard_normal(n) + ring])
    spec = np.fft.rfft(x.astype(np.float32)).astype(np.complex64)
    bw = fs / n
    p_bands = k.put(AUX, np.array([[int(2500 / bw), int(3500 / bw), 0]], np.int32))
    c, h = run_both(k, "band_kurtosis", 6, [k.put(IN, spec), n, 3, p_bands, 1, 0, 0], np.float64, 3)
    for sk in (c, h):
        assert abs(sk[0]) < 0.3 and abs(sk[1] + 1) < 0.1 and sk[2] > 3, sk


# ---- ap_median_rows ---------------------------------------------------------------------------

@pytest.mark.parametrize("n,count,stride", [(0, 2, 3), (1, 1, 1), (2, 3, 2), (7, 2, 9), (258, 4, 2049), (1000, 1, 1000)])
def test_median_host_matches_c_and_numpy(k, n, count, stride):
    rng = np.random.default_rng(n + stride)
    rows = rng.integers(0, 5, (count, stride)).astype(np.float32)   # many ties
    if n > 100:
        rows = rng.standard_normal((count, stride)).astype(np.float32)
    p_in = k.put(IN, rows)
    c, h = run_both(k, "median", 4, [p_in, n, count, stride, 0], np.float64, count)
    want = [np.median(r[:n].astype(np.float64)) if n else 0.0 for r in rows]
    assert c.tolist() == want and h.tolist() == want
    assert (k.get(p_in, np.float32, rows.size).reshape(rows.shape) == rows).all()   # rows unchanged


# ---- ap_features (C path: one ap.feature per name) -------------------------------------------

def test_feature_batch_equals_single_features(k):
    names = b"shaft_hz\0ch0.rms\0ch0.env.outer.ratio\0x\0"
    values = np.array([29.95, 0.125, -3.5e-300, float("inf")])
    p_names, p_values = k.put(IN, np.frombuffer(names, np.uint8)), k.put(AUX, values)
    got = []
    for host in (0, 1):
        k.features, k.batches = [], 0
        k.call("t_host", host)
        k.call("t_features", p_names, len(names), p_values, 4)
        got.append(k.features)
        assert k.batches == host
    assert got[0] == got[1] == [("shaft_hz", 29.95), ("ch0.rms", 0.125), ("ch0.env.outer.ratio", -3.5e-300),
                                ("x", float("inf"))]


@pytest.mark.parametrize("params, dsp, batch", [("host.dsp=1\nhost.features=1\n", 1, 1),
                                                ("host.dsp=0\nhost.features=1\n", 0, 1),   # host_dsp: false
                                                ("host.dsp=1\n", 1, 1),      # host.dsp announces ap.features too
                                                ("host.dsp=0\n", 0, 0), ("", 0, 0)])
def test_features_go_in_one_call_whenever_the_host_announces_them(k, params, dsp, batch):
    """The appliance always sets host.features=1 (ABI.md, Host DSP): a module whose host DSP is
    off still reports a window's features in one ap.features call; a host that says nothing gets
    one ap.feature call each."""
    p = k.put(IN, np.frombuffer(params.encode() or b"\0", np.uint8))
    assert k.call("t_dsp_init", p, len(params)) == dsp | batch << 1
    names, values = b"a\0b\0", np.array([1.0, 2.0])
    k.features, k.batches = [], 0
    k.call("t_features", k.put(AUX, np.frombuffer(names, np.uint8)), len(names), k.put(AUX + 64, values), 2)
    assert k.batches == batch and k.features == [("a", 1.0), ("b", 2.0)]


# ---- bounds checks: every bad pointer or length is an AbiViolation -----------------------------

def test_host_kernels_refuse_what_breaks_their_limits(k):
    d, mem_len, b = k.dsp, len(k.mem()), k.buf
    rec, k1_high, k0_low, p_high, p_bin0 = (k.put(AUX + 16 * i, np.array(r, np.int32)) for i, r in enumerate(
        ([1, 10, 0], [1, 33, 0], [-1, 3, 0], [1, 3, 5], [0, 3, -2])))
    bad_calls = {
        "rfft_batch n": lambda: d.rfft_batch(b, b + OUT_C, 48, 1),
        "rfft_batch count": lambda: d.rfft_batch(b, b + OUT_C, 64, 0),
        "rfft_batch in": lambda: d.rfft_batch(mem_len - 100, b + OUT_C, 64, 1),
        "rfft_batch out": lambda: d.rfft_batch(b, mem_len - 4 * 66 + 4, 64, 1),
        "rfft_batch out of a batch": lambda: d.rfft_batch(b, mem_len - 4 * 66 * 3, 64, 4),
        "rfft_batch huge count": lambda: d.rfft_batch(b, b, 64, 1 << 30),
        "moments n": lambda: d.moments(b, b, 0, 1, b + AUX),
        "moments in": lambda: d.moments(-4, b, 64, 1, b + AUX),
        "moments out": lambda: d.moments(b, mem_len - 252, 64, 1, b + AUX),
        "moments stats": lambda: d.moments(b, b, 64, 2, mem_len - 95),
        "moments count": lambda: d.moments(b, b, 64, -1, b + AUX),
        "band_power n": lambda: d.band_power(b, 63, 1, rec, 1, b + OUT_C),
        "band_power nbands": lambda: d.band_power(b, 64, 1, rec, 0, b + OUT_C),
        "band_power too many bands": lambda: d.band_power(b, 64, 1, rec, 257, b + OUT_C),
        "band_power spec": lambda: d.band_power(mem_len - 200, 64, 1, rec, 1, b + OUT_C),
        "band_power bands": lambda: d.band_power(b, 64, 1, mem_len - 8, 1, b + OUT_C),
        "band_power out": lambda: d.band_power(b, 64, 2, rec, 1, mem_len - 12),
        "band_power k1 > n/2": lambda: d.band_power(b, 64, 1, k1_high, 1, b + OUT_C),
        "band_power k0 < 0": lambda: d.band_power(b, 64, 1, k0_low, 1, b + OUT_C),
        "band_power p": lambda: d.band_power(b, 64, 1, p_high, 1, b + OUT_C),
        "band_power bin 0 at p < 0": lambda: d.band_power(b, 64, 1, p_bin0, 1, b + OUT_C),
        "envelope n": lambda: d.envelope(b, b + OUT_C, 100, 1, 1, 10),
        "envelope k0 = 0": lambda: d.envelope(b, b + OUT_C, 64, 1, 0, 10),
        "envelope k1 = n/2": lambda: d.envelope(b, b + OUT_C, 64, 1, 1, 32),
        "envelope spec": lambda: d.envelope(mem_len - 4 * 66 + 4, b + OUT_C, 64, 1, 1, 10),
        "envelope out": lambda: d.envelope(b, mem_len - 4 * 64 + 4, 64, 1, 1, 10),
        "envelope count": lambda: d.envelope(b, b + OUT_C, 64, 0, 1, 10),
        "envelope_ex flags": lambda: d.envelope_ex(b, b + OUT_C, 64, 1, 1, 10, 4),
        "envelope_ex k1 = n/2": lambda: d.envelope_ex(b, b + OUT_C, 64, 1, 1, 32, 1),
        "band_kurtosis n": lambda: d.band_kurtosis(b, 63, 1, rec, 1, 0, b + OUT_C),
        "band_kurtosis flags": lambda: d.band_kurtosis(b, 64, 1, rec, 1, -1, b + OUT_C),
        "band_kurtosis nbands": lambda: d.band_kurtosis(b, 64, 1, rec, 0, 0, b + OUT_C),
        "band_kurtosis k1 = n/2": lambda: d.band_kurtosis(b, 64, 1, k1_high, 1, 0, b + OUT_C),
        "band_kurtosis k0 = 0": lambda: d.band_kurtosis(b, 64, 1, p_bin0, 1, 0, b + OUT_C),
        "band_kurtosis out": lambda: d.band_kurtosis(b, 64, 2, rec, 1, 0, mem_len - 12),
        "band_kurtosis bands": lambda: d.band_kurtosis(b, 64, 1, mem_len - 8, 1, 0, b + OUT_C),
        "band_kurtosis spec": lambda: d.band_kurtosis(mem_len - 200, 64, 1, rec, 1, 0, b + OUT_C),
        "band_kurtosis spec of a batch": lambda: d.band_kurtosis(mem_len - 4 * 66 * 2, 64, 3, rec, 1, 0, b + OUT_C),
        "envelope_ex spec": lambda: d.envelope_ex(mem_len - 4 * 66 + 4, b + OUT_C, 64, 1, 1, 10, 1),
        "envelope_ex out": lambda: d.envelope_ex(b, mem_len - 4 * 64 + 4, 64, 1, 1, 10, 2),
        "envelope_ex spec negative": lambda: d.envelope_ex(-8, b + OUT_C, 64, 1, 1, 10, 0),
        "median n": lambda: d.median(b, -1, 1, 1, b + OUT_C),
        "median count": lambda: d.median(b, 5, 0, 5, b + OUT_C),
        "median stride": lambda: d.median(b, 5, 2, 4, b + OUT_C),
        "median in": lambda: d.median(mem_len - 4 * 9, 5, 2, 5, b + OUT_C),
        "median out": lambda: d.median(b, 5, 2, 5, mem_len - 12),
        "rfft n": lambda: d.rfft(b, b + OUT_C, 2),
        "irfft out": lambda: d.irfft(b, mem_len - 4, 64),
    }
    before = bytes(k.mem())
    for what, call in bad_calls.items():
        with pytest.raises(AbiViolation) as info:
            call()
        assert "ap.dsp_" in str(info.value), what
    assert bytes(k.mem()) == before   # nothing was written by a refused call


def test_band_kurtosis_work_is_bounded(k):
    """ap.dsp_band_kurtosis transforms count x sum(m) values (m: a band's padded size). Like the
    other kernels it refuses more than MAX_SIGNAL per call (review 1, finding 9: 256 full-width
    bands of 16384-point spectra asked for 128 x the limit), and it works in chunks: the largest
    allowed call keeps its temporaries to a few MB."""
    import tracemalloc
    from appliance.runtime.hostcalls.dsp import KURT_CHUNK, MAX_SIGNAL
    n = 16384
    mem = bytearray(8 << 20)
    dsp = HostDsp(lambda: memoryview(mem), AbiViolation)
    spec = np.random.default_rng(0).standard_normal(9 * (n + 2)).astype(np.float32)
    mem[:spec.nbytes] = spec.tobytes()
    bands_at, out_at = 1 << 20, 2 << 20
    full = np.array([[1, n // 2 - 1, 0]] * 256, np.int32)            # 256 bands of 8192 padded bins
    mem[bands_at:bands_at + full.nbytes] = full.tobytes()
    assert 9 * 256 * 8192 > MAX_SIGNAL >= 8 * 256 * 8192
    with pytest.raises(AbiViolation, match="at most"):
        dsp.band_kurtosis(0, n, 9, bands_at, 256, 0, out_at)         # 9 spectra x 2 M values: refused
    tracemalloc.start()
    assert dsp.band_kurtosis(0, n, 1, bands_at, 256, 0, out_at) == 0  # 2 M values: allowed, in chunks
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 48 * KURT_CHUNK, peak         # ~8.5 MB: a chunk's temporaries, not count x nbands x m (~70 MB) at once
    got = np.frombuffer(mem, np.float64, 256, out_at)
    want = ref_band_kurtosis(np.frombuffer(mem, np.complex64, n // 2 + 1, 0), 1, n // 2 - 1)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def ref_band_kurtosis(X, k0, k1):
    m = max(4, 1 << (k1 - k0).bit_length())
    z = np.zeros(m, np.complex128)
    z[:k1 - k0 + 1] = X[k0:k1 + 1]
    p = np.abs(np.fft.ifft(z)) ** 2
    return m * (p * p).sum() / p.sum() ** 2 - 2


def test_host_kernels_accept_their_limits(k):
    """The edges that are allowed: buffers ending exactly at the end of memory, empty bands."""
    d, mem_len, b = k.dsp, len(k.mem()), k.buf
    assert d.moments(b, mem_len - 256, 64, 1, mem_len - 256 - 48) == 0
    assert d.rfft_batch(b, mem_len - 4 * 66 * 2, 64, 2) == 0
    assert d.band_power(b, 64, 1, k.put(AUX, np.array([[5, 4, 99]], np.int32)), 1, mem_len - 8) == 0
    assert np.frombuffer(k.mem(), np.float64, 1, mem_len - 8)[0] == 0
    assert d.envelope(b, mem_len - 256, 64, 1, 10, 9) == 0
    assert d.median(b, 0, 3, 0, mem_len - 24) == 0


# ---- through a worker: faults are ABI faults, feature batches arrive ------------------------------

def worker_for(wasm: bytes, case: int, host_dsp: int = 1) -> WorkerProcess:
    params = f"case={case}\nhost.dsp={host_dsp}\n"
    return WorkerProcess("kernels", wasm, HEADER.size + 4 * 64, load_message("kernels.wasm", params))


def one_window(worker: WorkerProcess) -> dict:
    header = pack_header(1, 64, 1000.0, 0)
    return worker.process(header, np.zeros(64, np.float32), 5.0)


@pytest.mark.parametrize("case,kernel,reason", [
    (1, "ap.dsp_moments", "outside linear memory"),
    (2, "ap.dsp_moments", "outside linear memory"),
    (3, "ap.dsp_rfft_batch", "not a power of two"),
    (4, "ap.dsp_band_power", "not within bins 0..32"),
    (5, "ap.dsp_envelope", "not within 1..31"),
    (6, "ap.dsp_median", "stride=5"),
    (7, "ap.dsp_envelope", "count=1048576"),
    (8, "ap.dsp_envelope_ex", "flags=4"),
    (9, "ap.dsp_band_kurtosis", "not within bins 1..31"),
    (11, "ap.features", "invalid name"),
    (12, "ap.features", "do not hold 1 names"),
    (13, "ap.features", "do not hold 3 names"),
    (14, "ap.features", f"count=300 (1..{MAX_FEATURES})"),
    (15, "ap.features", "outside linear memory"),
])
def test_kernel_abuse_is_an_abi_fault_in_the_worker(kernels_wasm, case, kernel, reason):
    worker = worker_for(kernels_wasm, case)
    try:
        with pytest.raises(ModuleFault) as info:
            one_window(worker)
        assert info.value.kind == "abi", info.value.reason
        assert kernel in info.value.reason and reason in info.value.reason, info.value.reason
        assert worker.returncode is not None   # it exited after the fault, and was reaped
    finally:
        worker.kill()


@pytest.mark.parametrize("host_dsp", [1, 0])
def test_feature_batch_through_the_worker(kernels_wasm, host_dsp):
    worker = worker_for(kernels_wasm, 10, host_dsp)
    try:
        for _ in range(3):   # the names travel once; the replies after carry values only
            reply = one_window(worker)
            assert reply["rc"] == 0 and reply["f"] == {"a.x": 1.5, "b.y": -2.0}
            assert reply["e"] == [] and reply["l"] == [] and reply["ld"] == 0
    finally:
        worker.stop()

