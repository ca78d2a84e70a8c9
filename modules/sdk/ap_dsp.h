/*
 * ap_dsp.h: signal processing for modules, in plain C with no libm (freestanding wasm32).
 *
 * Real FFT of power-of-two length, its inverse, and the sine/cosine they need; moments of
 * signals, band powers of spectra, the envelope of a band (plain, squared or pre-whitened), the
 * spectral kurtosis of bands, a median, and features reported in one batch. Each of ap_rfft,
 * ap_irfft, ap_rfft_batch, ap_moments, ap_band_power, ap_envelope, ap_envelope_ex,
 * ap_band_kurtosis, ap_median_rows and ap_features has a host-accelerated twin behind an optional
 * import (`ap.dsp_*`,
 * `ap.features`; see modules/ABI.md, "Host DSP"): it uses the host when the host said so in the
 * params (`host.dsp=1`; for ap_features also `host.features=1`, which the appliance always sets),
 * and the C code here otherwise. Both paths agree within the tolerances documented in ABI.md.
 *
 * Batches: the kernels with a `count` take count signals (or spectra) one after another, signal i
 * at in + i*n floats, spectrum i at spec + i*(n+2) floats, its results likewise one after another.
 * That is a planar window's layout, and the host runs a batch for about the price of one signal.
 *
 * Layout of a spectrum: n/2 + 1 complex bins, interleaved re, im (float32), bin k at k*fs/n.
 * Scaling: forward is unnormalised (X_k = sum x_j e^{-2 pi i jk/n}); inverse divides by n.
 *
 * Include after ap_module.h. Uses AP_DSP_MAX_N (default 16384) for its tables.
 */
#ifndef AP_DSP_H
#define AP_DSP_H

#include "ap_module.h"

#ifndef AP_DSP_MAX_N
#define AP_DSP_MAX_N 16384
#endif

#define AP_PI 3.14159265358979323846

/* ---- host imports (optional: only called when the host announced them) --------------------- */

AP_IMPORT(dsp_rfft) int32_t ap_host_rfft(const float *in, float *out, int32_t n);
AP_IMPORT(dsp_irfft) int32_t ap_host_irfft(const float *in, float *out, int32_t n);

/* A range of spectral bins for ap_band_power: the sum over k0 <= k <= k1 of |X_k|^2 k^p. */
typedef struct { int32_t k0, k1, p; } ap_band;

AP_IMPORT(dsp_rfft_batch) int32_t ap_host_rfft_batch(const float *in, float *out, int32_t n, int32_t count);
AP_IMPORT(dsp_moments) int32_t ap_host_moments(const float *in, float *out, int32_t n, int32_t count, double *stats);
AP_IMPORT(dsp_band_power) int32_t ap_host_band_power(const float *spec, int32_t n, int32_t count,
                                                     const ap_band *bands, int32_t nbands, double *out);
AP_IMPORT(dsp_envelope) int32_t ap_host_envelope(const float *spec, float *out, int32_t n, int32_t count,
                                                 int32_t k0, int32_t k1);
AP_IMPORT(dsp_envelope_ex) int32_t ap_host_envelope_ex(const float *spec, float *out, int32_t n, int32_t count,
                                                       int32_t k0, int32_t k1, int32_t flags);
AP_IMPORT(dsp_band_kurtosis) int32_t ap_host_band_kurtosis(const float *spec, int32_t n, int32_t count,
                                                           const ap_band *bands, int32_t nbands, int32_t flags,
                                                           double *out);
AP_IMPORT(dsp_median) int32_t ap_host_median(const float *in, int32_t n, int32_t count, int32_t stride, double *out);
AP_IMPORT(features) void ap_host_features(const char *names, int32_t names_len, const double *values,
                                          int32_t count);

#if !defined(__wasm__)
/* Native builds (tests, benchmarks) never set host.dsp: stand-ins so they link; a harness that
 * provides the real thing overrides these. */
__attribute__((weak)) int32_t ap_host_rfft_batch(const float *in, float *out, int32_t n, int32_t count) {
    (void)in; (void)out; (void)n; (void)count; return -1;
}
__attribute__((weak)) int32_t ap_host_moments(const float *in, float *out, int32_t n, int32_t count, double *stats) {
    (void)in; (void)out; (void)n; (void)count; (void)stats; return -1;
}
__attribute__((weak)) int32_t ap_host_band_power(const float *spec, int32_t n, int32_t count, const ap_band *bands,
                                                 int32_t nbands, double *out) {
    (void)spec; (void)n; (void)count; (void)bands; (void)nbands; (void)out; return -1;
}
__attribute__((weak)) int32_t ap_host_envelope(const float *spec, float *out, int32_t n, int32_t count, int32_t k0,
                                               int32_t k1) {
    (void)spec; (void)out; (void)n; (void)count; (void)k0; (void)k1; return -1;
}
__attribute__((weak)) int32_t ap_host_envelope_ex(const float *spec, float *out, int32_t n, int32_t count, int32_t k0,
                                                  int32_t k1, int32_t flags) {
    (void)spec; (void)out; (void)n; (void)count; (void)k0; (void)k1; (void)flags; return -1;
}
__attribute__((weak)) int32_t ap_host_band_kurtosis(const float *spec, int32_t n, int32_t count, const ap_band *bands,
                                                    int32_t nbands, int32_t flags, double *out) {
    (void)spec; (void)n; (void)count; (void)bands; (void)nbands; (void)flags; (void)out; return -1;
}
__attribute__((weak)) int32_t ap_host_median(const float *in, int32_t n, int32_t count, int32_t stride, double *out) {
    (void)in; (void)n; (void)count; (void)stride; (void)out; return -1;
}
__attribute__((weak)) void ap_host_features(const char *names, int32_t names_len, const double *values,
                                            int32_t count) {
    (void)names; (void)names_len; (void)values; (void)count;
}
#endif

static int ap_dsp_use_host;   /* set by ap_dsp_init from the params */
static int ap_dsp_host_features;   /* ap.features is there: host.features=1 (or host.dsp=1, which announces it too) */

/* ---- sine and cosine ------------------------------------------------------------------------- */

/* sin on [-pi/4, pi/4]: Taylor to x^15, error < 1e-16 there. */
static inline double ap_sin_kernel(double x) {
    double x2 = x * x;
    return x * (1 + x2 * (-1.0 / 6 + x2 * (1.0 / 120 + x2 * (-1.0 / 5040 + x2 * (1.0 / 362880 +
           x2 * (-1.0 / 39916800 + x2 * (1.0 / 6227020800.0 + x2 * (-1.0 / 1307674368000.0))))))));
}

static inline double ap_cos_kernel(double x) {
    double x2 = x * x;
    return 1 + x2 * (-0.5 + x2 * (1.0 / 24 + x2 * (-1.0 / 720 + x2 * (1.0 / 40320 + x2 * (-1.0 / 3628800 +
           x2 * (1.0 / 479001600 + x2 * (-1.0 / 87178291200.0 + x2 * (1.0 / 20922789888000.0))))))));
}

/* sin(2*pi*k/n) and cos(2*pi*k/n) exactly reduced by octant, so tables are symmetric. */
static inline void ap_sincos_frac(int64_t k, int64_t n, double *s, double *c) {
    k %= n;
    if (k < 0) k += n;
    /* octant o and remainder r: angle = (o*n/8 + r) * 2pi/n, |r*2pi/n| <= pi/4 */
    int64_t k8 = 8 * k;
    int64_t o = (k8 + n / 2) / n;           /* nearest octant boundary */
    double r = (double)(k8 - o * n) / (double)(8 * n) * 2 * AP_PI;
    double sr = ap_sin_kernel(r), cr = ap_cos_kernel(r);
    const double h = 0.70710678118654752440;
    switch (o & 7) {
        case 0: *s = sr; *c = cr; break;
        case 1: *s = h * (sr + cr); *c = h * (cr - sr); break;
        case 2: *s = cr; *c = -sr; break;
        case 3: *s = h * (cr - sr); *c = -h * (sr + cr); break;
        case 4: *s = -sr; *c = -cr; break;
        case 5: *s = -h * (sr + cr); *c = h * (sr - cr); break;
        case 6: *s = -cr; *c = sr; break;
        default: *s = h * (sr - cr); *c = h * (sr + cr); break;
    }
}

/* ---- complex radix-2 FFT on interleaved float pairs ------------------------------------------ */

static float ap_dsp_tw[AP_DSP_MAX_N];       /* cos, sin pairs of e^{-2 pi i k / tw_n}, k < tw_n/2 */
static int32_t ap_dsp_tw_n;

static void ap_dsp_twiddles(int32_t n) {
    if (ap_dsp_tw_n == n) return;
    for (int32_t k = 0; k < n / 2; k++) {
        double s, c;
        ap_sincos_frac(k, n, &s, &c);
        ap_dsp_tw[2 * k] = (float)c;
        ap_dsp_tw[2 * k + 1] = (float)-s;
    }
    ap_dsp_tw_n = n;
}

/* The twiddles again, each stage's side by side: stage len's e^{-2 pi i k / len}, k < len/2, at
 * 2 (len/2 - 1), copied from ap_dsp_tw (the same floats). A stage then reads its twiddles in order
 * (vector loads), not every step-th pair (a gather per butterfly). */
static float ap_dsp_stage_tw[2 * AP_DSP_MAX_N];
static int32_t ap_dsp_stage_tw_n;

static void ap_dsp_stage_twiddles(int32_t tw_n) {
    ap_dsp_twiddles(tw_n);   /* the table this one is copied from, for this tw_n (a no-op when it is) */
    if (ap_dsp_stage_tw_n == tw_n) return;
    for (int32_t len = 2; len <= tw_n; len <<= 1) {
        float *t = ap_dsp_stage_tw + 2 * (len / 2 - 1);
        for (int32_t k = 0; k < len / 2; k++) {
            t[2 * k] = ap_dsp_tw[2 * k * (tw_n / len)];
            t[2 * k + 1] = ap_dsp_tw[2 * k * (tw_n / len) + 1];
        }
    }
    ap_dsp_stage_tw_n = tw_n;
}

/* One butterfly: a, b <- a + w b, a - w b (w = wr + i wi). */
static inline void ap_butterfly(float *a, float *b, float wr, float wi) {
    float xr = b[0] * wr - b[1] * wi, xi = b[0] * wi + b[1] * wr;
    b[0] = a[0] - xr; b[1] = a[1] - xi;
    a[0] += xr; a[1] += xi;
}

/* The butterflies of one group of a stage: a and b are its two halves (restrict: they do not
 * overlap, which lets the compilers run several butterflies in one vector). */
static inline void ap_fft_group(float *restrict a, float *restrict b, const float *restrict tw, int32_t half,
                                int inv) {
    if (inv)
        for (int32_t k = 0; k < half; k++) ap_butterfly(a + 2 * k, b + 2 * k, tw[2 * k], -tw[2 * k + 1]);
    else
        for (int32_t k = 0; k < half; k++) ap_butterfly(a + 2 * k, b + 2 * k, tw[2 * k], tw[2 * k + 1]);
}

/* In-place complex FFT of m points (m a power of two, at most tw_n); inverse if inv
 * (unnormalised). Twiddles come from the tables for tw_n. */
static void ap_cfft(float *z, int32_t m, int inv, int32_t tw_n) {
    ap_dsp_stage_twiddles(tw_n);
    for (int32_t i = 1, j = 0; i < m; i++) {
        int32_t bit = m >> 1;
        for (; j & bit; bit >>= 1) j ^= bit;
        j ^= bit;
        if (i < j) {
            float tr = z[2 * i], ti = z[2 * i + 1];
            z[2 * i] = z[2 * j]; z[2 * i + 1] = z[2 * j + 1];
            z[2 * j] = tr; z[2 * j + 1] = ti;
        }
    }
    for (int32_t len = 2; len <= m; len <<= 1) {
        const int32_t half = len >> 1;
        const float *tw = ap_dsp_stage_tw + 2 * (half - 1);
        if (half < 4) {   /* short stages: one twiddle at a time across the groups (fewer loop turns) */
            for (int32_t k = 0; k < half; k++) {
                const float wr = tw[2 * k], wi = inv ? -tw[2 * k + 1] : tw[2 * k + 1];
                for (int32_t i = k; i < m; i += len) ap_butterfly(z + 2 * i, z + 2 * (i + half), wr, wi);
            }
            continue;
        }
        for (int32_t i = 0; i < m; i += len) ap_fft_group(z + 2 * i, z + 2 * (i + half), tw, half, inv);
    }
}

static inline int ap_is_pow2(int32_t n) { return n >= 4 && (n & (n - 1)) == 0 && n <= AP_DSP_MAX_N; }

/* Real FFT in C: n reals -> n/2+1 complex bins in out (n+2 floats: the packing step works in
 * place on the n floats, then adds the Nyquist pair; nothing beyond out[n+1] is touched). */
static int32_t ap_rfft_c(const float *in, float *out, int32_t n) {
    if (!ap_is_pow2(n)) return -1;
    int32_t m = n / 2;
    ap_dsp_twiddles(n);
    for (int32_t j = 0; j < n; j++) out[j] = in[j];   /* as m complex points z_j = x_2j + i x_2j+1 */
    ap_cfft(out, m, 0, n);
    /* Split: X_k = (Z_k + conj Z_{m-k})/2 - i/2 e^{-2pi i k/n} (Z_k - conj Z_{m-k}) */
    float z0r = out[0], z0i = out[1];
    for (int32_t k = 1; k <= m / 2; k++) {
        int32_t mk = m - k;
        float ar = out[2 * k], ai = out[2 * k + 1], br = out[2 * mk], bi = out[2 * mk + 1];
        float er = 0.5f * (ar + br), ei = 0.5f * (ai - bi);      /* (Z_k + conj Z_mk)/2 */
        float orr = 0.5f * (ai + bi), oi = -0.5f * (ar - br);    /* -i (Z_k - conj Z_mk)/2 */
        float wr = ap_dsp_tw[2 * k], wi = ap_dsp_tw[2 * k + 1];
        float tr = orr * wr - oi * wi, ti = orr * wi + oi * wr;
        out[2 * k] = er + tr; out[2 * k + 1] = ei + ti;
        /* X_{m-k} = conj(E_k) - conj(W_k O_k)... computed from the mirrored pair */
        float wr2 = ap_dsp_tw[2 * mk], wi2 = ap_dsp_tw[2 * mk + 1];
        float er2 = 0.5f * (br + ar), ei2 = 0.5f * (bi - ai);
        float or2 = 0.5f * (bi + ai), oi2 = -0.5f * (br - ar);
        float tr2 = or2 * wr2 - oi2 * wi2, ti2 = or2 * wi2 + oi2 * wr2;
        out[2 * mk] = er2 + tr2; out[2 * mk + 1] = ei2 + ti2;
    }
    out[0] = z0r + z0i; out[1] = 0;
    out[2 * m] = z0r - z0i; out[2 * m + 1] = 0;
    return 0;
}

/* Inverse real FFT in C: n/2+1 bins -> n reals, divided by n. `in` is left unchanged. */
static int32_t ap_irfft_c(const float *in, float *out, int32_t n) {
    if (!ap_is_pow2(n)) return -1;
    int32_t m = n / 2;
    ap_dsp_twiddles(n);
    /* Z_k = E_k + i W_k^-1 O_k with E, O recovered from X_k and conj X_{m-k}. */
    for (int32_t k = 0; k < m; k++) {
        int32_t mk = m - k;
        float ar = in[2 * k], ai = in[2 * k + 1], br = in[2 * mk], bi = -in[2 * mk + 1];
        float er = 0.5f * (ar + br), ei = 0.5f * (ai + bi);
        float dr = 0.5f * (ar - br), di = 0.5f * (ai - bi);
        float wr = ap_dsp_tw[2 * k], wi = -ap_dsp_tw[2 * k + 1];   /* conj twiddle */
        float orr = dr * wr - di * wi, oi = dr * wi + di * wr;
        out[2 * k] = er - oi; out[2 * k + 1] = ei + orr;
    }
    ap_cfft(out, m, 1, n);
    float scale = 1.0f / (float)n;
    for (int32_t j = 0; j < n; j++) out[j] *= scale * 2.0f;
    return 0;
}

/* ---- dispatch ------------------------------------------------------------------------------ */

/* Call from ap_init: the host sets host.dsp=1 in the params when it provides ap.dsp_*. */
static inline void ap_dsp_init(const char *params, int32_t len) {
    ap_dsp_use_host = ap_param_f64(params, len, "host.dsp", 0, 0) != 0;
    ap_dsp_host_features = ap_dsp_use_host || ap_param_f64(params, len, "host.features", 0, 0) != 0;
}

/* out needs room for n + 2 floats. */
static inline int32_t ap_rfft(const float *in, float *out, int32_t n) {
    if (ap_dsp_use_host) return ap_host_rfft(in, out, n);
    return ap_rfft_c(in, out, n);
}

/* out needs room for n floats; in (n/2+1 bins) is not modified. */
static inline int32_t ap_irfft(const float *in, float *out, int32_t n) {
    if (ap_dsp_use_host) return ap_host_irfft(in, out, n);
    return ap_irfft_c(in, out, n);
}

/* count real FFTs of n points: in + i*n -> out + i*(n+2) (the buffers must not overlap). */
static inline int32_t ap_rfft_batch(const float *in, float *out, int32_t n, int32_t count) {
    if (ap_dsp_use_host) return ap_host_rfft_batch(in, out, n, count);
    if (!ap_is_pow2(n) || count < 1) return -1;
    for (int32_t i = 0; i < count; i++) ap_rfft_c(in + (size_t)i * n, out + (size_t)i * (n + 2), n);
    return 0;
}

/* ---- moments of signals ---------------------------------------------------------------------- */

enum { AP_MOM_MEAN, AP_MOM_M2, AP_MOM_M3, AP_MOM_M4, AP_MOM_MAX, AP_MOM_MIN, AP_MOM_COUNT };

/* Moments of the n float32 at x, in float64: stats[0] mean, stats[1..3] the central moments
 * m2, m3, m4 (sum (x - mean)^k / n), stats[4] max(x - mean), stats[5] min(x - mean); out[j] =
 * (float)(x_j - mean), the mean-removed signal (out may be x). A non-finite sample makes
 * stats[0] non-finite; stats[1..5] and out are then left unspecified. */
static void ap_moments1_c(const float *x, float *out, int32_t n, double *stats) {
    /* Unrolled with separate sums: wasm3 interprets every loop step, so fewer steps count. */
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int32_t i = 0;
    for (; i + 4 <= n; i += 4) { s0 += x[i]; s1 += x[i + 1]; s2 += x[i + 2]; s3 += x[i + 3]; }
    for (; i < n; i++) s0 += x[i];
    double mean = ((s0 + s1) + (s2 + s3)) / n;
    stats[AP_MOM_MEAN] = mean;
    if (!ap_isfinite(mean)) return;
    double m2a = 0, m2b = 0, m3a = 0, m3b = 0, m4a = 0, m4b = 0;
    double hi = -__builtin_inf(), lo = __builtin_inf();
    for (i = 0; i + 2 <= n; i += 2) {
        double d = x[i] - mean, e = x[i + 1] - mean, d2 = d * d, e2 = e * e;
        m2a += d2; m2b += e2;
        m3a += d2 * d; m3b += e2 * e;
        m4a += d2 * d2; m4b += e2 * e2;
        hi = d > hi ? d : hi; hi = e > hi ? e : hi;
        lo = d < lo ? d : lo; lo = e < lo ? e : lo;
        out[i] = (float)d;
        out[i + 1] = (float)e;
    }
    if (i < n) {
        double d = x[i] - mean, d2 = d * d;
        m2a += d2; m3a += d2 * d; m4a += d2 * d2;
        hi = d > hi ? d : hi; lo = d < lo ? d : lo;
        out[i] = (float)d;
    }
    stats[AP_MOM_M2] = (m2a + m2b) / n;
    stats[AP_MOM_M3] = (m3a + m3b) / n;
    stats[AP_MOM_M4] = (m4a + m4b) / n;
    stats[AP_MOM_MAX] = hi;
    stats[AP_MOM_MIN] = lo;
}

/* The moments of count signals of n samples (a batch: see the top): signal i's AP_MOM_COUNT
 * values at stats + i*AP_MOM_COUNT, its mean-removed copy at out + i*n. -1 if n < 1 or count < 1. */
static inline int32_t ap_moments(const float *in, float *out, int32_t n, int32_t count, double *stats) {
    if (ap_dsp_use_host) return ap_host_moments(in, out, n, count, stats);
    if (n < 1 || count < 1) return -1;
    for (int32_t i = 0; i < count; i++)
        ap_moments1_c(in + (size_t)i * n, out + (size_t)i * n, n, stats + (size_t)i * AP_MOM_COUNT);
    return 0;
}

/* ---- band powers of spectra -------------------------------------------------------------------- */

#define AP_BANDS_MAX 256

static inline double ap_bin_power(const float *X, int32_t k) {
    return (double)X[2 * k] * X[2 * k] + (double)X[2 * k + 1] * X[2 * k + 1];
}

static int32_t ap_band_power1_c(const float *spec, int32_t n, const ap_band *bands, int32_t nbands, double *out) {
    for (int32_t i = 0; i < nbands; i++) {
        int32_t k0 = bands[i].k0, k1 = bands[i].k1, p = bands[i].p;
        double e = 0;
        if (k1 >= k0) {
            if (k0 < 0 || k1 > n / 2 || p < -4 || p > 4 || (p < 0 && k0 < 1)) return -1;
            if (p == 0) {
                for (int32_t k = k0; k <= k1; k++) e += ap_bin_power(spec, k);
            } else {
                for (int32_t k = k0; k <= k1; k++) {
                    double w = 1;
                    for (int32_t j = 0; j < (p < 0 ? -p : p); j++) w *= (double)k;
                    e += p < 0 ? ap_bin_power(spec, k) / w : ap_bin_power(spec, k) * w;
                }
            }
        }
        out[i] = e;
    }
    return 0;
}

/* For count spectra of n points (n/2+1 bins each, as ap_rfft makes them; a batch) and nbands
 * bands (1..AP_BANDS_MAX): out[i*nbands + j] = sum over k0 <= k <= k1 of |X_k|^2 k^p of spectrum i
 * and band j, in float64. An empty band (k1 < k0) gives 0; otherwise 0 <= k0, k1 <= n/2,
 * -4 <= p <= 4, and k0 >= 1 when p < 0. -1 on bad args. */
static inline int32_t ap_band_power(const float *spec, int32_t n, int32_t count, const ap_band *bands,
                                    int32_t nbands, double *out) {
    if (ap_dsp_use_host) return ap_host_band_power(spec, n, count, bands, nbands, out);
    if (!ap_is_pow2(n) || count < 1 || nbands < 1 || nbands > AP_BANDS_MAX) return -1;
    for (int32_t i = 0; i < count; i++)
        if (ap_band_power1_c(spec + (size_t)i * (n + 2), n, bands, nbands, out + (size_t)i * nbands)) return -1;
    return 0;
}

/* ---- envelope of a band ------------------------------------------------------------------------ */

static float ap_env_band[AP_DSP_MAX_N + 2];   /* X restricted to the band, then -i times it */
static float ap_env_hil[AP_DSP_MAX_N];        /* its Hilbert transform */
static int32_t ap_env_n, ap_env_k0, ap_env_k1 = -1;   /* ap_env_band is zero outside [k0, k1] */

/* flags of ap_envelope_ex and ap_band_kurtosis */
enum { AP_ENV_SQUARED = 1,      /* |z|^2 (the squared envelope) instead of |z| */
       AP_ENV_WHITEN = 2 };     /* each band bin divided by its magnitude first (X_k / |X_k|, 0 stays 0):
                                   cepstrum pre-whitening, the whole real cepstrum but c_0 removed */

static inline void ap_whiten_bin(float *re, float *im) {
    float m = __builtin_sqrtf(*re * *re + *im * *im);
    if (m > 0) { *re /= m; *im /= m; }
}

static void ap_envelope1_c(const float *spec, float *out, int32_t n, int32_t k0, int32_t k1, int32_t flags) {
    float *band = ap_env_band;
    if (ap_env_n != n) {
        for (int32_t k = 0; k < n + 2; k++) band[k] = 0;
        ap_env_n = n;
        ap_env_k1 = -1;
    }
    for (int32_t k = ap_env_k0; k <= ap_env_k1; k++) band[2 * k] = band[2 * k + 1] = 0;
    ap_env_k0 = k0;
    ap_env_k1 = k1;
    for (int32_t k = k0; k <= k1; k++) {
        band[2 * k] = spec[2 * k];
        band[2 * k + 1] = spec[2 * k + 1];
        if (flags & AP_ENV_WHITEN) ap_whiten_bin(&band[2 * k], &band[2 * k + 1]);
    }
    ap_irfft_c(band, out, n);                      /* band-passed signal */
    for (int32_t k = k0; k <= k1; k++) {           /* -i (a + ib) = b - ia: Hilbert transform */
        float re = band[2 * k];
        band[2 * k] = band[2 * k + 1];
        band[2 * k + 1] = -re;
    }
    ap_irfft_c(band, ap_env_hil, n);
    double sum = 0;
    for (int32_t j = 0; j < n; j++) {
        float p = out[j] * out[j] + ap_env_hil[j] * ap_env_hil[j];
        float e = (flags & AP_ENV_SQUARED) ? p : __builtin_sqrtf(p);
        out[j] = e;
        sum += e;
    }
    float mean = (float)(sum / n);
    for (int32_t j = 0; j < n; j++) out[j] -= mean;
}

/* Envelope of the bins k0..k1 of count spectra of n points (a batch; 1 <= k0, k1 <= n/2 - 1, or
 * an empty band, k1 < k0, which gives zeros): the magnitude of the analytic signal
 * z_j = (2/n) sum_k X_k e^{2 pi i jk/n}, i.e. sqrt(b_j^2 + h_j^2) of the band-passed signal b and
 * its Hilbert transform h, minus its mean (float32): n floats per spectrum at out + i*n. spec is not
 * modified and must not overlap out. -1 on bad args. */
static inline int32_t ap_envelope(const float *spec, float *out, int32_t n, int32_t count, int32_t k0, int32_t k1) {
    if (ap_dsp_use_host) return ap_host_envelope(spec, out, n, count, k0, k1);
    if (!ap_is_pow2(n) || count < 1 || (k1 >= k0 && (k0 < 1 || k1 > n / 2 - 1))) return -1;
    for (int32_t i = 0; i < count; i++) ap_envelope1_c(spec + (size_t)i * (n + 2), out + (size_t)i * n, n, k0, k1, 0);
    return 0;
}

/* ap_envelope with flags (AP_ENV_SQUARED, AP_ENV_WHITEN; 0 is ap_envelope): the squared envelope
 * |z_j|^2 instead of |z_j|, of the band whitened first (X_k / |X_k| on k0..k1), minus its mean.
 * -1 on bad args (flags beyond 0..3 included). */
static inline int32_t ap_envelope_ex(const float *spec, float *out, int32_t n, int32_t count, int32_t k0, int32_t k1,
                                     int32_t flags) {
    if (ap_dsp_use_host) return ap_host_envelope_ex(spec, out, n, count, k0, k1, flags);
    if (!ap_is_pow2(n) || count < 1 || flags < 0 || flags > 3 || (k1 >= k0 && (k0 < 1 || k1 > n / 2 - 1))) return -1;
    for (int32_t i = 0; i < count; i++)
        ap_envelope1_c(spec + (size_t)i * (n + 2), out + (size_t)i * n, n, k0, k1, flags);
    return 0;
}

/* ---- spectral kurtosis of bands -------------------------------------------------------------- */

static float ap_kurt_z[AP_DSP_MAX_N];   /* one band's complex envelope: 2m floats, m <= max(n/2, 4) */

static int32_t ap_band_kurtosis1_c(const float *spec, int32_t n, const ap_band *bands, int32_t nbands, int32_t flags,
                                   double *out) {
    ap_dsp_twiddles(n);
    for (int32_t i = 0; i < nbands; i++) {
        int32_t k0 = bands[i].k0, k1 = bands[i].k1;
        if (k1 < k0) { out[i] = 0; continue; }
        if (k0 < 1 || k1 > n / 2 - 1) return -1;
        int32_t b = k1 - k0 + 1, m = 4;
        while (m < b) m <<= 1;
        for (int32_t j = 0; j < b; j++) {
            float re = spec[2 * (k0 + j)], im = spec[2 * (k0 + j) + 1];
            if (flags & AP_ENV_WHITEN) ap_whiten_bin(&re, &im);
            ap_kurt_z[2 * j] = re;
            ap_kurt_z[2 * j + 1] = im;
        }
        for (int32_t j = 2 * b; j < 2 * m; j++) ap_kurt_z[j] = 0;
        ap_cfft(ap_kurt_z, m, 1, n);
        double s2 = 0, s4 = 0;
        for (int32_t j = 0; j < m; j++) {
            double p = (double)ap_kurt_z[2 * j] * ap_kurt_z[2 * j] + (double)ap_kurt_z[2 * j + 1] * ap_kurt_z[2 * j + 1];
            s2 += p;
            s4 += p * p;
        }
        out[i] = s2 > 0 ? (double)m * s4 / (s2 * s2) - 2 : 0;
    }
    return 0;
}

/* Spectral kurtosis of bands (the kurtogram's measure, Antoni 2006/2007): for each of count
 * spectra and each of nbands (1..AP_BANDS_MAX) bands {k0, k1, p} (p unused, 0), the complex
 * envelope of the band at its own rate, z_j = sum over k0 <= k <= k1 of X_k e^{2 pi i j (k-k0)/m}
 * for j < m (m the smallest power of two >= max(k1-k0+1, 4); whitened bins with AP_ENV_WHITEN),
 * and SK = m sum |z_j|^4 / (sum |z_j|^2)^2 - 2 (0 for an all-zero band, and for an empty one,
 * k1 < k0), float64 at out[i*nbands + j]. About 0 for Gaussian noise, -1 for a pure tone,
 * large for a band that impulses excite. 1 <= k0, k1 <= n/2 - 1. -1 on bad args. */
static inline int32_t ap_band_kurtosis(const float *spec, int32_t n, int32_t count, const ap_band *bands, int32_t nbands,
                                       int32_t flags, double *out) {
    if (ap_dsp_use_host) return ap_host_band_kurtosis(spec, n, count, bands, nbands, flags, out);
    if (!ap_is_pow2(n) || count < 1 || nbands < 1 || nbands > AP_BANDS_MAX || flags < 0 || flags > 3) return -1;
    for (int32_t i = 0; i < count; i++)
        if (ap_band_kurtosis1_c(spec + (size_t)i * (n + 2), n, bands, nbands, flags, out + (size_t)i * nbands))
            return -1;
    return 0;
}

/* ---- scalar helpers without libm ------------------------------------------------------------ */

/* Natural logarithm: x = m 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh((m-1)/(m+1)) by its
 * series (|s| <= 0.172, 12 terms: error < 1e-17). -inf at 0, NaN below, +inf stays +inf. */
static inline double ap_ln(double x) {
    if (x != x || x < 0) return __builtin_nan("");
    if (x == 0) return -__builtin_inf();
    if (!ap_isfinite(x)) return x;
    union { double d; uint64_t u; } v = {x};
    int32_t e = (int32_t)((v.u >> 52) & 0x7ff);
    if (e == 0) {                                   /* subnormal: scale into the normal range */
        v.d = x * 18014398509481984.0;              /* 2^54 */
        e = (int32_t)((v.u >> 52) & 0x7ff) - 54;
    }
    e -= 1023;
    v.u = (v.u & 0x000fffffffffffffull) | 0x3ff0000000000000ull;   /* mantissa in [1, 2) */
    double m = v.d;
    if (m > 1.41421356237309504880) { m *= 0.5; e++; }
    double s = (m - 1) / (m + 1), s2 = s * s, term = s, sum = 0;
    for (int i = 1; i <= 23; i += 2) { sum += term / i; term *= s2; }
    return 2 * sum + e * 0.69314718055994530942;
}

/* e^x: x = k ln2 + r, |r| <= ln2/2, Taylor to r^13 (error < 2e-16), times 2^k from the bits.
 * 0 below -708 (no subnormals), +inf above 709.78, NaN stays NaN. */
static inline double ap_exp(double x) {
    if (x != x) return x;
    if (x > 709.78) return __builtin_inf();
    if (x < -708) return 0;
    double kd = x * 1.44269504088896338700;
    int32_t k = (int32_t)(kd < 0 ? kd - 0.5 : kd + 0.5);
    double r = (x - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0;
    static const double inv[] = {1.0 / 479001600, 1.0 / 39916800, 1.0 / 3628800, 1.0 / 362880, 1.0 / 40320,
                                 1.0 / 5040, 1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1, 1};
    for (int i = 0; i < 13; i++) p = p * r + inv[i];
    union { double d; uint64_t u; } s;
    s.u = (uint64_t)(k + 1023) << 52;
    return p * s.d;
}

/* sin and cos of x radians (moderate |x|: meant for angles, not for phase accumulators). */
static inline void ap_sincos(double x, double *s, double *c) {
    double q = x * (2 / AP_PI);
    int64_t k = (int64_t)(q < 0 ? q - 0.5 : q + 0.5);          /* nearest quadrant */
    /* Cody-Waite: pi/2 in two parts so r = x - k pi/2 keeps its digits. */
    double r = (x - (double)k * 1.5707963267341256) - (double)k * 6.077100506506192e-11;
    double sr = ap_sin_kernel(r), cr = ap_cos_kernel(r);
    switch (k & 3) {
        case 0: *s = sr; *c = cr; break;
        case 1: *s = cr; *c = -sr; break;
        case 2: *s = -sr; *c = -cr; break;
        default: *s = -cr; *c = sr; break;
    }
}

/* ---- order statistics ------------------------------------------------------------------------ */

/* k-th smallest (0-based) of a[0..n), by quickselect (expected O(n)); reorders a so that
 * a[i] <= a[k] for i < k and a[i] >= a[k] for i > k. Median-of-three pivot. */
#define AP_DEFINE_SELECT(NAME, T)                                                              \
    static T NAME(T *a, int32_t n, int32_t k) {                                                \
        int32_t lo = 0, hi = n - 1;                                                            \
        while (hi > lo) {                                                                      \
            int32_t mid = lo + (hi - lo) / 2;                                                  \
            T t;                                                                               \
            if (a[mid] < a[lo]) { t = a[mid]; a[mid] = a[lo]; a[lo] = t; }                     \
            if (a[hi] < a[lo]) { t = a[hi]; a[hi] = a[lo]; a[lo] = t; }                        \
            if (a[hi] < a[mid]) { t = a[hi]; a[hi] = a[mid]; a[mid] = t; }                     \
            T pivot = a[mid];                                                                  \
            int32_t i = lo, j = hi;                                                            \
            while (i <= j) {                                                                   \
                while (a[i] < pivot) i++;                                                      \
                while (pivot < a[j]) j--;                                                      \
                if (i <= j) { t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }                     \
            }                                                                                  \
            if (k <= j) hi = j;                                                                \
            else if (k >= i) lo = i;                                                           \
            else break;                          /* j < k < i: a[k] == pivot, in place */      \
        }                                                                                      \
        return a[k];                                                                           \
    }
AP_DEFINE_SELECT(ap_select_f32, float)
AP_DEFINE_SELECT(ap_select_f64, double)
#undef AP_DEFINE_SELECT

/* Median of a[0..n) as numpy defines it (mean of the two middle values when n is even);
 * reorders a. O(n): after selecting the upper middle, the lower one is the largest value
 * left of it. Returns 0 for n <= 0. */
static inline double ap_median_f32(float *a, int32_t n) {
    if (n <= 0) return 0;
    double hi = ap_select_f32(a, n, n / 2);
    if (n & 1) return hi;
    float lo = a[0];
    for (int32_t i = 1; i < n / 2; i++) if (a[i] > lo) lo = a[i];
    return 0.5 * ((double)lo + hi);
}

static inline double ap_median_f64(double *a, int32_t n) {
    if (n <= 0) return 0;
    double hi = ap_select_f64(a, n, n / 2);
    if (n & 1) return hi;
    double lo = a[0];
    for (int32_t i = 1; i < n / 2; i++) if (a[i] > lo) lo = a[i];
    return 0.5 * (lo + hi);
}

/* Medians of count rows of n float32 (row i at in + i*stride floats, stride >= n), as
 * ap_median_f32 defines them (the mean of the two middle values, in double, for even n; 0 for
 * n = 0), into out[0..count), leaving the rows unchanged: the C path selects in scratch (room for
 * n floats). For finite values. -1 on bad args. */
static inline int32_t ap_median_rows(const float *in, int32_t n, int32_t count, int32_t stride, double *out,
                                     float *scratch) {
    if (ap_dsp_use_host) return ap_host_median(in, n, count, stride, out);
    if (n < 0 || count < 1 || stride < n) return -1;
    for (int32_t r = 0; r < count; r++) {
        const float *a = in + (size_t)r * stride;
        for (int32_t i = 0; i < n; i++) scratch[i] = a[i];
        out[r] = ap_median_f32(scratch, n);
    }
    return 0;
}

/* ---- features in one batch ------------------------------------------------------------------- */

/* Report count features (1..256) at once: names holds their names, each followed by a 0 byte
 * (names_len bytes in all), values their count doubles. The same as count ap.feature calls in
 * that order. */
static inline void ap_features(const char *names, int32_t names_len, const double *values, int32_t count) {
    if (ap_dsp_host_features) {
        ap_host_features(names, names_len, values, count);
        return;
    }
    int32_t start = 0, i = 0;
    for (int32_t j = 0; j < names_len && i < count; j++)
        if (names[j] == 0) {
            ap_host_feature(names + start, j - start, values[i++]);
            start = j + 1;
        }
}

#endif /* AP_DSP_H */
