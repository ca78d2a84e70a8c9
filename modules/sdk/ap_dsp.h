/*
 * ap_dsp.h: signal processing for modules, in plain C with no libm (freestanding wasm32).
 *
 * Real FFT of power-of-two length, its inverse, and the sine/cosine they need. Every function
 * has a host-accelerated twin behind the optional `ap.dsp_*` imports (see modules/ABI.md,
 * "Host DSP"): ap_rfft() uses the host when the host said so in the params (`host.dsp=1`),
 * and this code otherwise. Both paths agree within the tolerance documented in ABI.md.
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

static int ap_dsp_use_host;   /* set by ap_dsp_init from the params */

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

/* In-place complex FFT of m points (m a power of two); inverse if inv (unnormalised).
 * Twiddles come from the table for tw_n = the largest size in use (step tw_n/m). */
static void ap_cfft(float *z, int32_t m, int inv, int32_t tw_n) {
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
        int32_t half = len >> 1, step = tw_n / len;
        for (int32_t i = 0; i < m; i += len) {
            for (int32_t k = 0; k < half; k++) {
                float wr = ap_dsp_tw[2 * k * step], wi = ap_dsp_tw[2 * k * step + 1];
                if (inv) wi = -wi;
                float *a = z + 2 * (i + k), *b = z + 2 * (i + k + half);
                float xr = b[0] * wr - b[1] * wi, xi = b[0] * wi + b[1] * wr;
                b[0] = a[0] - xr; b[1] = a[1] - xi;
                a[0] += xr; a[1] += xi;
            }
        }
    }
}

static inline int ap_is_pow2(int32_t n) { return n >= 4 && (n & (n - 1)) == 0 && n <= AP_DSP_MAX_N; }

/* Real FFT in C: n reals -> n/2+1 complex bins in out (2n+2 floats of room needed in out
 * because the packing step works in place on n floats plus the Nyquist pair). */
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

#endif /* AP_DSP_H */
