/*
 * ap_nn.h: numerics and module runtime for the modules `appliance model compile` generates
 * (docs/models.md).
 *
 * The first part (numerics) is shared by the wasm module and by the native libraries the
 * compiler builds from the same network code for the host import ap.nn_run: both must give the
 * same bits, so nothing here depends on a libm, on FMA or on the rounding of a cast. Compiled
 * with -ffp-contract=off and without fast-math, every float operation is one IEEE operation.
 *
 * The second part (module runtime: params, input filling, rules, events) is compiled only into
 * the wasm module, after ap_module.h.
 */
#ifndef AP_NN_H
#define AP_NN_H

#include <stdint.h>
#include <stddef.h>

/* ---- numerics ------------------------------------------------------------------------------ */

/* Round half to even. |x| < 2^22 (callers clamp first). wasm has f32.nearest; natively the
 * 1.5*2^23 trick does the same in the FPU's default rounding mode, with no libm call. */
static inline float ap_nn_rint(float x) {
#if defined(__wasm__)
    return __builtin_rintf(x);
#else
    const float magic = 12582912.0f;
    return x >= 0.0f ? (x + magic) - magic : (x - magic) + magic;
#endif
}

static inline double ap_nn_rint64(double x) {   /* |x| < 2^51 */
#if defined(__wasm__)
    return __builtin_rint(x);
#else
    const double magic = 6755399441055744.0;
    return x >= 0.0 ? (x + magic) - magic : (x - magic) + magic;
#endif
}

/* Saturating requantization as onnxruntime's MLAS does it: clamp the scaled value to the
 * integer range shifted by the zero point (NaN goes to the low end, as MAXPS does), round
 * half to even, then add the zero point. */
static inline int32_t ap_nn_quant(float v, float lo, float hi) {
    if (!(v >= lo)) v = lo;
    if (v > hi) v = hi;
    return (int32_t)ap_nn_rint(v);
}

typedef union { double d; uint64_t u; } ap_nn_bits64;
typedef union { float f; uint32_t u; } ap_nn_bits32;

/* exp in double precision: x = k ln2 + r, |r| <= ln2/2, Taylor to degree 13 (error < 2e-16),
 * times 2^k built from bits. Rounded to float it is correct to well under one float ulp. */
static inline double ap_nn_exp(double x) {
    if (x != x) return x;
    if (x > 709.78) return 1.0 / 0.0;
    if (x < -745.2) return 0.0;
    const double ln2_hi = 6.93147180369123816490e-01;   /* ln2 with 21 low bits zero: k*ln2_hi is exact */
    const double ln2_lo = 1.90821492927058770002e-10;
    double k = ap_nn_rint64(x * 1.44269504088896338700);
    double r = (x - k * ln2_hi) - k * ln2_lo;
    double p = 1.0 / 6227020800.0;                        /* 1/13! */
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    int32_t ki = (int32_t)k;
    ap_nn_bits64 s;
    if (ki < -1000) {                                     /* subnormal result: scale in two steps */
        s.u = (uint64_t)(ki + 1000 + 1023) << 52;
        p *= s.d;
        s.u = (uint64_t)(1023 - 1000) << 52;
        return p * s.d;
    }
    if (ki > 1000) {
        s.u = (uint64_t)(ki - 1000 + 1023) << 52;
        p *= s.d;
        s.u = (uint64_t)(1023 + 1000) << 52;
        return p * s.d;
    }
    s.u = (uint64_t)(ki + 1023) << 52;
    return p * s.d;
}

static inline float ap_nn_expf(float x) { return (float)ap_nn_exp((double)x); }

static inline float ap_nn_sigmoid(float x) { return 1.0f / (1.0f + ap_nn_expf(-x)); }

static inline float ap_nn_tanh(float x) {
    if (x > 20.0f) return 1.0f;
    if (x < -20.0f) return -1.0f;
    double e = ap_nn_exp(2.0 * (double)x);
    return (float)((e - 1.0) / (e + 1.0));
}

static inline void ap_nn_zero(void *dst, size_t n) {
    uint8_t *d = (uint8_t *)dst;
    while (n--) *d++ = 0;
}

static inline void ap_nn_fill_u8(void *dst, uint8_t v, size_t n) {
    uint8_t *d = (uint8_t *)dst;
    while (n--) *d++ = v;
}

static inline void ap_nn_copy(void *dst, const void *src, size_t n) {
    uint8_t *d = (uint8_t *)dst;
    const uint8_t *s = (const uint8_t *)src;
    while (n--) *d++ = *s++;
}

/* ---- convolution and matrix products ---------------------------------------------------------
 *
 * The generated convolutions have two forms in the same C. AP_NN_SCALAR (the wasm module for
 * wasm3, which has no SIMD) keeps the direct kernels written for an interpreter; every other
 * build (the native twins, the SIMD128 module for wasmtime) lowers the convolution to im2col
 * and the blocked matrix products below, in 4-lane vectors (GCC vector extensions: SSE2, NEON
 * or SIMD128 as the target has them).
 *
 * Both forms compute each float output as the same sequence of IEEE operations: start from the
 * bias, then add w*x for the taps in (channel, ky, kx) order, one multiply and one add per tap
 * (-ffp-contract=off). Vectors and blocking only run independent outputs side by side; no sum is
 * split or reassociated, so every build gives the same bits. Integer sums are exact anyway. */
#if defined(__wasm__) && !defined(__wasm_simd128__)
#define AP_NN_SCALAR 1
#else
#define AP_NN_SCALAR 0
#endif

typedef float ap_nn_f4 __attribute__((vector_size(16), aligned(4)));
typedef int32_t ap_nn_i4 __attribute__((vector_size(16), aligned(4)));
typedef int16_t ap_nn_s4 __attribute__((vector_size(8), aligned(2)));

static inline ap_nn_f4 ap_nn_f4_load(const float *p) { return *(const ap_nn_f4 *)p; }
static inline void ap_nn_f4_store(float *p, ap_nn_f4 v) { *(ap_nn_f4 *)p = v; }
static inline ap_nn_f4 ap_nn_f4_splat(float v) { return (ap_nn_f4){v, v, v, v}; }
static inline ap_nn_i4 ap_nn_i4_load16(const int16_t *p) {
    return __builtin_convertvector(*(const ap_nn_s4 *)p, ap_nn_i4);
}
static inline ap_nn_i4 ap_nn_i4_load(const int32_t *p) { return *(const ap_nn_i4 *)p; }
static inline void ap_nn_i4_store(int32_t *p, ap_nn_i4 v) { *(ap_nn_i4 *)p = v; }
static inline ap_nn_i4 ap_nn_i4_splat(int32_t v) { return (ap_nn_i4){v, v, v, v}; }

/* Y[m*ld + n] = bias[m] + W[m*K + 0]*P[0*ld + n] + W[m*K + 1]*P[1*ld + n] + ..., left to right.
 *
 * Blocks of 4 rows x 8 columns (8 vector accumulators) or 1 row x 16 columns, taken four taps a
 * pass: a pass splats its 16 (or 4) weights once, then sweeps the row block's columns, each
 * block's sums loaded from Y (the bias on the first pass), four taps added, stored back. The sums
 * are the same operations in the same order as one sweep of all K taps (a float32 stored and
 * reloaded is the same float). Why passes: wasmtime checks its epoch at every loop head and may
 * call out there, so Cranelift keeps whatever a loop carries in stack slots; a loop over K taps
 * paid a store and a reload of all 8 accumulators per tap (1.7x the time of the same loop without
 * epoch interruption). Here no vector crosses a loop head but the splatted weights. */
#define AP_NN_PASS_TAPS 4

/* One body for both kinds of products (the float sums of the models and the int32 sums of the
 * quantized ones): NAME##_v4(W, bias, P, Y, M, N, K, ld), W and P of type WT, Y and bias of type
 * YT, in vectors VT: SPLAT a value, LOADX four of P's, LOADY / STOREY four of Y's. */
#define AP_NN_GEMM_V4(NAME, WT, YT, VT, SPLAT, LOADX, LOADY, STOREY)                                            \
static inline __attribute__((always_inline)) void NAME##_pass4x8(                                               \
        const WT *w0, const WT *w1, const WT *w2, const WT *w3, const YT *bias, const WT *P, YT *Y,             \
        int32_t N, int32_t ld, int32_t k0, int32_t taps) {                                                      \
    VT s0[AP_NN_PASS_TAPS], s1[AP_NN_PASS_TAPS], s2[AP_NN_PASS_TAPS], s3[AP_NN_PASS_TAPS];                      \
    for (int32_t j = 0; j < taps; j++) {                                                                        \
        s0[j] = SPLAT(w0[k0 + j]); s1[j] = SPLAT(w1[k0 + j]);                                                   \
        s2[j] = SPLAT(w2[k0 + j]); s3[j] = SPLAT(w3[k0 + j]);                                                   \
    }                                                                                                           \
    for (int32_t n = 0; n + 8 <= N; n += 8) {                                                                   \
        YT *y = Y + n;                                                                                          \
        VT a0, a1, a2, a3, b0, b1, b2, b3;                                                                      \
        if (k0 == 0) {                                                                                          \
            a0 = b0 = SPLAT(bias[0]); a1 = b1 = SPLAT(bias[1]);                                                 \
            a2 = b2 = SPLAT(bias[2]); a3 = b3 = SPLAT(bias[3]);                                                 \
        } else {                                                                                                \
            a0 = LOADY(y); b0 = LOADY(y + 4);                                                                   \
            a1 = LOADY(y + ld); b1 = LOADY(y + ld + 4);                                                         \
            a2 = LOADY(y + 2 * ld); b2 = LOADY(y + 2 * ld + 4);                                                 \
            a3 = LOADY(y + 3 * ld); b3 = LOADY(y + 3 * ld + 4);                                                 \
        }                                                                                                       \
        const WT *p = P + k0 * ld + n;                                                                          \
        for (int32_t j = 0; j < taps; j++, p += ld) {                                                           \
            const VT x0 = LOADX(p), x1 = LOADX(p + 4);                                                          \
            a0 += s0[j] * x0; b0 += s0[j] * x1; a1 += s1[j] * x0; b1 += s1[j] * x1;                             \
            a2 += s2[j] * x0; b2 += s2[j] * x1; a3 += s3[j] * x0; b3 += s3[j] * x1;                             \
        }                                                                                                       \
        STOREY(y, a0); STOREY(y + 4, b0);                                                                       \
        STOREY(y + ld, a1); STOREY(y + ld + 4, b1);                                                             \
        STOREY(y + 2 * ld, a2); STOREY(y + 2 * ld + 4, b2);                                                     \
        STOREY(y + 3 * ld, a3); STOREY(y + 3 * ld + 4, b3);                                                     \
    }                                                                                                           \
}                                                                                                               \
                                                                                                                \
static inline __attribute__((always_inline)) void NAME##_pass1x16(                                              \
        const WT *w0, const YT *bias, const WT *P, YT *Y, int32_t N, int32_t ld, int32_t k0, int32_t taps) {    \
    VT s[AP_NN_PASS_TAPS];                                                                                      \
    for (int32_t j = 0; j < taps; j++) s[j] = SPLAT(w0[k0 + j]);                                                \
    for (int32_t n = 0; n + 16 <= N; n += 16) {                                                                 \
        YT *y = Y + n;                                                                                          \
        VT a0, a1, a2, a3;                                                                                      \
        if (k0 == 0) {                                                                                          \
            a0 = a1 = a2 = a3 = SPLAT(bias[0]);                                                                 \
        } else {                                                                                                \
            a0 = LOADY(y); a1 = LOADY(y + 4); a2 = LOADY(y + 8); a3 = LOADY(y + 12);                            \
        }                                                                                                       \
        const WT *p = P + k0 * ld + n;                                                                          \
        for (int32_t j = 0; j < taps; j++, p += ld) {                                                           \
            a0 += s[j] * LOADX(p); a1 += s[j] * LOADX(p + 4);                                                   \
            a2 += s[j] * LOADX(p + 8); a3 += s[j] * LOADX(p + 12);                                              \
        }                                                                                                       \
        STOREY(y, a0); STOREY(y + 4, a1); STOREY(y + 8, a2); STOREY(y + 12, a3);                                \
    }                                                                                                           \
}                                                                                                               \
                                                                                                                \
static inline void NAME##_v4(const WT *W, const YT *bias, const WT *P, YT *Y, int32_t M, int32_t N, int32_t K,  \
                             int32_t ld) {                                                                      \
    const int32_t whole = K - K % AP_NN_PASS_TAPS;   /* the taps of whole passes; then a pass of the rest */    \
    int32_t m = 0;                                                                                              \
    for (; m + 4 <= M; m += 4) {                                                                                \
        const WT *w0 = W + m * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;                                     \
        YT *y = Y + m * ld;                                                                                     \
        for (int32_t k0 = 0; k0 < whole; k0 += AP_NN_PASS_TAPS)                                                 \
            NAME##_pass4x8(w0, w1, w2, w3, bias + m, P, y, N, ld, k0, AP_NN_PASS_TAPS);                         \
        if (whole < K || K == 0) NAME##_pass4x8(w0, w1, w2, w3, bias + m, P, y, N, ld, whole, K - whole);       \
        for (int32_t n = N - N % 8; n < N; n++) {                                                               \
            YT a0 = bias[m], a1 = bias[m + 1], a2 = bias[m + 2], a3 = bias[m + 3];                              \
            const WT *p = P + n;                                                                                \
            for (int32_t k = 0; k < K; k++, p += ld) {                                                          \
                const YT x = *p;                                                                                \
                a0 += w0[k] * x; a1 += w1[k] * x; a2 += w2[k] * x; a3 += w3[k] * x;                             \
            }                                                                                                   \
            Y[m * ld + n] = a0; Y[(m + 1) * ld + n] = a1; Y[(m + 2) * ld + n] = a2; Y[(m + 3) * ld + n] = a3;   \
        }                                                                                                       \
    }                                                                                                           \
    for (; m < M; m++) {                                                                                        \
        const WT *w0 = W + m * K;                                                                               \
        YT *y = Y + m * ld;                                                                                     \
        for (int32_t k0 = 0; k0 < whole; k0 += AP_NN_PASS_TAPS)                                                 \
            NAME##_pass1x16(w0, bias + m, P, y, N, ld, k0, AP_NN_PASS_TAPS);                                    \
        if (whole < K || K == 0) NAME##_pass1x16(w0, bias + m, P, y, N, ld, whole, K - whole);                  \
        for (int32_t n = N - N % 16; n < N; n++) {                                                              \
            YT a = bias[m];                                                                                     \
            const WT *p = P + n;                                                                                \
            for (int32_t k = 0; k < K; k++, p += ld) a += w0[k] * (YT)*p;                                       \
            Y[m * ld + n] = a;                                                                                  \
        }                                                                                                       \
    }                                                                                                           \
}

AP_NN_GEMM_V4(ap_nn_gemm_f32, float, float, ap_nn_f4, ap_nn_f4_splat, ap_nn_f4_load, ap_nn_f4_load, ap_nn_f4_store)

/* ACC[m*N + n] = init[m] + sum_k W[m*K + k] * P[k*N + n] in int32 (exact: any order). The
 * operands are int16 (the int8 weights less their zero point, the uint8/int8 activations), so a
 * product fits and the compilers widen them with the target's 16-bit multiplies. */
AP_NN_GEMM_V4(ap_nn_gemm_i16, int16_t, int32_t, ap_nn_i4, ap_nn_i4_splat, ap_nn_i4_load16, ap_nn_i4_load,
              ap_nn_i4_store)

#if defined(AP_NN_NATIVE) && defined(__x86_64__)
/* x86-64 native twins: the same products in 8-lane AVX2 or 16-lane AVX-512 vectors where the CPU
 * has them (asked once with CPUID). The library stays built for the baseline CPU; AVX2 lanes are the same IEEE
 * single operations as SSE2's (no FMA: -ffp-contract=off, and AVX2 does not bring it). */
typedef float ap_nn_f8 __attribute__((vector_size(32), aligned(4)));
/* A real splat: 0 + v would turn a bias of -0.0 into +0.0. */
__attribute__((target("avx2"))) static inline ap_nn_f8 ap_nn_f8_splat(float v) {
    return (ap_nn_f8){v, v, v, v, v, v, v, v};
}

/* 0: SSE2 only, 1: AVX2, 2: AVX2 and AVX-512F (each with the OS saving its registers). */
static int ap_nn_x86_known = -1;   /* a race between threads writes the same value */
static int ap_nn_x86_level(void) {
    int known = ap_nn_x86_known;
    if (known < 0) {
        uint32_t a, b, c, d, lo, hi;
        __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0), "c"(0));
        int ok = a >= 7;
        if (ok) {
            __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
            ok = (c & (1u << 27)) && (c & (1u << 28));          /* OSXSAVE, AVX */
        }
        if (ok) {
            __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
            ok = (lo & 6u) == 6u;                                  /* the OS saves XMM and YMM */
        }
        if (ok) {
            __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
            ok = (b & (1u << 5)) != 0;                             /* AVX2 */
            if (ok && (b & (1u << 16)) && (lo & 0xe0u) == 0xe0u)  /* AVX-512F, opmask and ZMM state */
                ok = 2;
        }
        known = ap_nn_x86_known = ok;
    }
    return known;
}

/* For the tests: run the narrower kernels on a wider CPU (never wider than the CPU has). */
static int32_t ap_nn_x86_limit(int32_t level) {
    ap_nn_x86_known = -1;
    const int32_t have = ap_nn_x86_level();
    if (level >= 0 && level < have) ap_nn_x86_known = level;
    return ap_nn_x86_level();
}

/* The wide products, one body for AVX2 (8 lanes) and AVX-512F (16): blocks of 4 rows x 2 vectors
 * and 1 row x 4 vectors, the rest by the 4-lane kernel; the same per-lane operations as it. */
#define AP_NN_GEMM_F32_WIDE(NAME, TARGET, VT, SPLAT, L)                                                        \
__attribute__((target(TARGET))) static void NAME(const float *W, const float *bias, const float *P,            \
                                                 float *Y, int32_t M, int32_t N, int32_t K) {                  \
    int32_t m = 0;                                                                                             \
    for (; m + 4 <= M; m += 4) {                                                                               \
        const float *w0 = W + m * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;                                 \
        int32_t n = 0;                                                                                         \
        for (; n + 2 * (L) <= N; n += 2 * (L)) {                                                               \
            VT a0 = SPLAT(bias[m]), a1 = SPLAT(bias[m + 1]);                                                   \
            VT a2 = SPLAT(bias[m + 2]), a3 = SPLAT(bias[m + 3]);                                               \
            VT b0 = a0, b1 = a1, b2 = a2, b3 = a3;                                                             \
            const float *p = P + n;                                                                            \
            for (int32_t k = 0; k < K; k++, p += N) {                                                          \
                const VT x0 = *(const VT *)p, x1 = *(const VT *)(p + (L));                                     \
                VT s = SPLAT(w0[k]); a0 += s * x0; b0 += s * x1;                                               \
                s = SPLAT(w1[k]); a1 += s * x0; b1 += s * x1;                                                  \
                s = SPLAT(w2[k]); a2 += s * x0; b2 += s * x1;                                                  \
                s = SPLAT(w3[k]); a3 += s * x0; b3 += s * x1;                                                  \
            }                                                                                                  \
            float *y = Y + m * N + n;                                                                          \
            *(VT *)y = a0; *(VT *)(y + (L)) = b0;                                                              \
            *(VT *)(y + N) = a1; *(VT *)(y + N + (L)) = b1;                                                    \
            *(VT *)(y + 2 * N) = a2; *(VT *)(y + 2 * N + (L)) = b2;                                            \
            *(VT *)(y + 3 * N) = a3; *(VT *)(y + 3 * N + (L)) = b3;                                            \
        }                                                                                                      \
        if (n < N) /* the rest of these rows: the 4-lane kernel, the same sums */                              \
            for (int32_t r = 0; r < 4; r++)                                                                    \
                ap_nn_gemm_f32_v4(W + (m + r) * K, bias + m + r, P + n, Y + (m + r) * N + n, 1, N - n, K, N);  \
    }                                                                                                          \
    for (; m < M; m++) {                                                                                       \
        const float *w0 = W + m * K;                                                                           \
        int32_t n = 0;                                                                                         \
        for (; n + 4 * (L) <= N; n += 4 * (L)) {                                                               \
            VT a0 = SPLAT(bias[m]), a1 = a0, a2 = a0, a3 = a0;                                                 \
            const float *p = P + n;                                                                            \
            for (int32_t k = 0; k < K; k++, p += N) {                                                          \
                const VT s = SPLAT(w0[k]);                                                                     \
                a0 += s * *(const VT *)p; a1 += s * *(const VT *)(p + (L));                                    \
                a2 += s * *(const VT *)(p + 2 * (L)); a3 += s * *(const VT *)(p + 3 * (L));                    \
            }                                                                                                  \
            float *y = Y + m * N + n;                                                                          \
            *(VT *)y = a0; *(VT *)(y + (L)) = a1; *(VT *)(y + 2 * (L)) = a2; *(VT *)(y + 3 * (L)) = a3;        \
        }                                                                                                      \
        if (n < N) ap_nn_gemm_f32_v4(w0, bias + m, P + n, Y + m * N + n, 1, N - n, K, N);                      \
    }                                                                                                          \
}

AP_NN_GEMM_F32_WIDE(ap_nn_gemm_f32_avx2, "avx2", ap_nn_f8, ap_nn_f8_splat, 8)

/* AVX-512F: 16 lanes, the same per-lane operations again. */
typedef float ap_nn_f16 __attribute__((vector_size(64), aligned(4)));
__attribute__((target("avx512f"))) static inline ap_nn_f16 ap_nn_f16_splat(float v) {
    return (ap_nn_f16){v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v};
}

AP_NN_GEMM_F32_WIDE(ap_nn_gemm_f32_avx512, "avx512f", ap_nn_f16, ap_nn_f16_splat, 16)
#endif

static void ap_nn_gemm_f32(const float *W, const float *bias, const float *P, float *Y,
                           int32_t M, int32_t N, int32_t K) {
#if defined(AP_NN_NATIVE) && defined(__x86_64__)
    const int level = ap_nn_x86_level();
    if (level == 2) {
        ap_nn_gemm_f32_avx512(W, bias, P, Y, M, N, K);
        return;
    }
    if (level == 1) {
        ap_nn_gemm_f32_avx2(W, bias, P, Y, M, N, K);
        return;
    }
#endif
    ap_nn_gemm_f32_v4(W, bias, P, Y, M, N, K, N);
}

#if defined(AP_NN_NATIVE) && defined(__x86_64__)
/* The integer products in 8 (AVX2) or 16 (AVX-512F) int32 lanes: SSE2 has no 32-bit multiply. */
#define AP_NN_GEMM_I16_WIDE(NAME, TARGET, L)                                                            \
typedef int32_t NAME##_vi __attribute__((vector_size(4 * L), aligned(4)));                              \
typedef int16_t NAME##_vs __attribute__((vector_size(2 * L), aligned(2)));                              \
__attribute__((target(TARGET))) static void NAME(const int16_t *W, const int32_t *init, const int16_t *P,   \
                                                 int32_t *ACC, int32_t M, int32_t N, int32_t K) {       \
    int32_t m = 0;                                                                                      \
    for (; m + 4 <= M; m += 4) {                                                                        \
        const int16_t *w0 = W + m * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;                        \
        int32_t n = 0;                                                                                  \
        for (; n + 2 * L <= N; n += 2 * L) {                                                            \
            NAME##_vi a0 = (NAME##_vi){0} + init[m], a1 = (NAME##_vi){0} + init[m + 1];                 \
            NAME##_vi a2 = (NAME##_vi){0} + init[m + 2], a3 = (NAME##_vi){0} + init[m + 3];             \
            NAME##_vi b0 = a0, b1 = a1, b2 = a2, b3 = a3;                                               \
            const int16_t *p = P + n;                                                                   \
            for (int32_t k = 0; k < K; k++, p += N) {                                                   \
                const NAME##_vi x0 = __builtin_convertvector(*(const NAME##_vs *)p, NAME##_vi);         \
                const NAME##_vi x1 = __builtin_convertvector(*(const NAME##_vs *)(p + L), NAME##_vi);   \
                NAME##_vi s = (NAME##_vi){0} + (int32_t)w0[k]; a0 += s * x0; b0 += s * x1;             \
                s = (NAME##_vi){0} + (int32_t)w1[k]; a1 += s * x0; b1 += s * x1;                        \
                s = (NAME##_vi){0} + (int32_t)w2[k]; a2 += s * x0; b2 += s * x1;                        \
                s = (NAME##_vi){0} + (int32_t)w3[k]; a3 += s * x0; b3 += s * x1;                        \
            }                                                                                           \
            int32_t *y = ACC + m * N + n;                                                               \
            *(NAME##_vi *)y = a0; *(NAME##_vi *)(y + L) = b0;                                           \
            *(NAME##_vi *)(y + N) = a1; *(NAME##_vi *)(y + N + L) = b1;                                 \
            *(NAME##_vi *)(y + 2 * N) = a2; *(NAME##_vi *)(y + 2 * N + L) = b2;                         \
            *(NAME##_vi *)(y + 3 * N) = a3; *(NAME##_vi *)(y + 3 * N + L) = b3;                         \
        }                                                                                               \
        if (n < N) ap_nn_gemm_i16_v4(W + m * K, init + m, P + n, ACC + m * N + n, 4, N - n, K, N);      \
    }                                                                                                   \
    if (m < M) ap_nn_gemm_i16_v4(W + m * K, init + m, P, ACC + m * N, M - m, N, K, N);                  \
}
AP_NN_GEMM_I16_WIDE(ap_nn_gemm_i16_avx2, "avx2", 8)
AP_NN_GEMM_I16_WIDE(ap_nn_gemm_i16_avx512, "avx512f", 16)
#endif

static void ap_nn_gemm_i16(const int16_t *W, const int32_t *init, const int16_t *P, int32_t *ACC,
                           int32_t M, int32_t N, int32_t K) {
#if defined(AP_NN_NATIVE) && defined(__x86_64__)
    const int level = ap_nn_x86_level();
    if (level == 2) {
        ap_nn_gemm_i16_avx512(W, init, P, ACC, M, N, K);
        return;
    }
    if (level == 1) {
        ap_nn_gemm_i16_avx2(W, init, P, ACC, M, N, K);
        return;
    }
#endif
    ap_nn_gemm_i16_v4(W, init, P, ACC, M, N, K, N);
}

/* -nostdlib: the native libraries bring the memcpy and memset the compiler emits for copy and
 * fill loops. Their own loops are written out (not through the helpers above, whose loops the
 * compiler would turn back into calls to these), and no_builtin keeps them loops. */
typedef uint64_t ap_nn_word __attribute__((may_alias, aligned(1)));
#define AP_NN_NATIVE_LIBC \
    __attribute__((visibility("hidden"), no_builtin)) void *memcpy(void *dst, const void *src, size_t n) { \
        uint8_t *d = (uint8_t *)dst; const uint8_t *s = (const uint8_t *)src;                          \
        for (; n >= 8; n -= 8, d += 8, s += 8) *(ap_nn_word *)d = *(const ap_nn_word *)s;              \
        while (n--) *d++ = *s++;                                                                        \
        return dst;                                                                                     \
    }                                                                                                   \
    __attribute__((visibility("hidden"), no_builtin)) void *memset(void *dst, int c, size_t n) {      \
        uint8_t *d = (uint8_t *)dst;                                                                    \
        const uint64_t v = (uint64_t)(uint8_t)c * 0x0101010101010101ull;                                \
        for (; n >= 8; n -= 8, d += 8) *(ap_nn_word *)d = v;   /* the pad fills: 8 bytes a step */    \
        while (n--) *d++ = (uint8_t)c;                                                                  \
        return dst;                                                                                     \
    }

/* ---- module runtime (wasm module only) ---------------------------------------------------------- */

#if defined(AP_MODULE_H) && !defined(AP_NN_NATIVE)

enum { AP_NN_RULE_NONE = 0, AP_NN_RULE_CLASSIFIER = 1, AP_NN_RULE_SCORE = 2 };
#define AP_NN_MAX_CHANNELS 64
#define AP_NN_MAX_LABELS 256

/* What the generated module describes about itself; the runtime below does the rest. */
typedef struct {
    const char *model;             /* model file name, for messages */
    int32_t format;                /* AP_FORMAT_F32 (sample windows) or AP_FORMAT_U8 (frames) */
    int32_t channels;              /* window channels (or image planes) */
    int32_t frames;                /* samples per channel (width*height for frames) */
    int32_t width, height;         /* frames only */
    int32_t channels_last;         /* the model wants samples interleaved (NLC / NHWC) */
    float scale[AP_NN_MAX_CHANNELS], offset[AP_NN_MAX_CHANNELS];   /* defaults, per channel */
    int32_t outputs_len;           /* floats in the output block */
    const char *const *feature_names;   /* one per output float */
    int32_t rule;
    int32_t rule_offset, rule_len; /* the rule's slice of the output block */
    int32_t apply_softmax;         /* classifier on logits: softmax before the rule */
    const char *const *labels;     /* classifier: rule_len labels */
    uint8_t normal_default[AP_NN_MAX_LABELS];
    double threshold, clear_threshold, severity;
    int32_t consecutive, clear;
    const uint8_t *descriptor;     /* for ap.nn_run; 0 = the module has no native twin */
    int32_t descriptor_len;
} ap_nn_module;

typedef struct {
    float scale[AP_NN_MAX_CHANNELS], offset[AP_NN_MAX_CHANNELS];
    double threshold, clear_threshold;
    int32_t consecutive, clear, severity;
    int32_t label_severity[AP_NN_MAX_LABELS];   /* -1: the default severity */
    uint8_t normal[AP_NN_MAX_LABELS];
    int32_t use_host;
    /* episode state */
    int32_t active, streak, calm, active_label;
    double peak;
} ap_nn_state;

static ap_nn_state ap_nn_st;

#if defined(AP_NN_HOST_IMPORT)
AP_IMPORT(nn_run) int32_t ap_host_nn_run(const uint8_t *desc, int32_t desc_len, const void *in, int32_t in_len,
                                         void *out, int32_t out_len);
#endif

static int ap_nn_reject(const char *what, const char *key, int32_t klen, const char *tail) {
    char msg[320];
    ap_text t = {msg, (int32_t)sizeof msg, 0};
    msg[0] = 0;
    ap_text_str(&t, what);
    char k[96];
    int32_t n = klen < 95 ? klen : 95;
    for (int32_t i = 0; i < n; i++) k[i] = key[i];
    k[n] = 0;
    ap_text_str(&t, k);
    ap_text_str(&t, tail);
    ap_log(AP_LOG_ERROR, msg);
    return 1;
}

static int ap_nn_keyeq(const char *key, int32_t klen, const char *name) {
    int32_t n = ap_strlen(name);
    if (n != klen) return 0;
    for (int32_t i = 0; i < n; i++) if (key[i] != name[i]) return 0;
    return 1;
}

static int ap_nn_label_index(const ap_nn_module *m, const char *s, int32_t n) {
    for (int32_t i = 0; i < m->rule_len; i++)
        if (ap_nn_keyeq(s, n, m->labels[i])) return i;
    return -1;
}

/* A comma list of numbers: one for every channel, or one per channel. */
static int ap_nn_channel_list(const ap_nn_module *m, const char *v, int32_t vlen, float *out, const char *key) {
    float vals[AP_NN_MAX_CHANNELS];
    int32_t count = 0, i = 0;
    while (i <= vlen) {
        int32_t j = i;
        while (j < vlen && v[j] != ',') j++;
        int ok;
        double x = ap_parse_f64(v + i, j - i, &ok);
        if (!ok || count >= AP_NN_MAX_CHANNELS)
            return ap_nn_reject("param ", key, ap_strlen(key), ": expected a number or a comma list of numbers, "
                                "one per channel");
        vals[count++] = (float)x;
        i = j + 1;
    }
    if (count != 1 && count != m->channels)
        return ap_nn_reject("param ", key, ap_strlen(key), ": give one value or one per channel");
    for (int32_t c = 0; c < m->channels; c++) out[c] = vals[count == 1 ? 0 : c];
    return 0;
}

static int ap_nn_number(const char *key, int32_t klen, const char *v, int32_t vlen, double lo, double hi, double *out) {
    int ok;
    double x = ap_parse_f64(v, vlen, &ok);
    if (!ok || x < lo || x > hi) {
        char tail[96];
        ap_text t = {tail, (int32_t)sizeof tail, 0};
        tail[0] = 0;
        ap_text_str(&t, ": not a number in ");
        ap_text_num(&t, lo, 3);
        ap_text_str(&t, "..");
        ap_text_num(&t, hi, 3);
        return ap_nn_reject("param ", key, klen, tail);
    }
    *out = x;
    return 0;
}

/* Parses the params (ABI.md, Params): every key must be known; host.* is the appliance's. */
static int32_t ap_nn_init(const ap_nn_module *m, const char *p, int32_t len) {
    ap_nn_state *s = &ap_nn_st;
    for (int32_t c = 0; c < m->channels; c++) { s->scale[c] = m->scale[c]; s->offset[c] = m->offset[c]; }
    s->threshold = m->threshold;
    s->clear_threshold = m->clear_threshold;
    s->consecutive = m->consecutive;
    s->clear = m->clear;
    s->severity = (int32_t)m->severity;
    for (int32_t i = 0; i < AP_NN_MAX_LABELS; i++) { s->label_severity[i] = -1; s->normal[i] = m->normal_default[i]; }
    s->use_host = 0;
    s->active = s->streak = s->calm = 0;
    s->active_label = -1;
    s->peak = 0;
    ap_params_iter it = ap_params_begin(p, len);
    const char *key, *v;
    int32_t klen, vlen;
    while (ap_params_next(&it, &key, &klen, &v, &vlen)) {
        if (!v) return ap_nn_reject("params line without '=': ", key, klen, "");
        double x;
        if (klen > 5 && key[0] == 'h' && key[1] == 'o' && key[2] == 's' && key[3] == 't' && key[4] == '.') {
            if (ap_nn_keyeq(key, klen, "host.nn")) {
                if (ap_nn_number(key, klen, v, vlen, 0, 1, &x)) return 1;
                s->use_host = x != 0;
            }
        } else if (ap_nn_keyeq(key, klen, "input.scale")) {
            if (ap_nn_channel_list(m, v, vlen, s->scale, "input.scale")) return 1;
        } else if (ap_nn_keyeq(key, klen, "input.offset")) {
            if (ap_nn_channel_list(m, v, vlen, s->offset, "input.offset")) return 1;
        } else if (m->rule != AP_NN_RULE_NONE && ap_nn_keyeq(key, klen, "threshold")) {
            if (ap_nn_number(key, klen, v, vlen, -1e30, 1e30, &s->threshold)) return 1;
        } else if (m->rule == AP_NN_RULE_SCORE && ap_nn_keyeq(key, klen, "clear_threshold")) {
            if (ap_nn_number(key, klen, v, vlen, -1e30, 1e30, &s->clear_threshold)) return 1;
        } else if (m->rule != AP_NN_RULE_NONE && ap_nn_keyeq(key, klen, "consecutive")) {
            if (ap_nn_number(key, klen, v, vlen, 1, 100000, &x)) return 1;
            s->consecutive = (int32_t)x;
        } else if (m->rule != AP_NN_RULE_NONE && ap_nn_keyeq(key, klen, "clear")) {
            if (ap_nn_number(key, klen, v, vlen, 1, 100000, &x)) return 1;
            s->clear = (int32_t)x;
        } else if (m->rule != AP_NN_RULE_NONE && ap_nn_keyeq(key, klen, "severity")) {
            if (ap_nn_number(key, klen, v, vlen, 0, 3, &x)) return 1;
            s->severity = (int32_t)x;
        } else if (m->rule == AP_NN_RULE_CLASSIFIER && klen > 9 && ap_nn_keyeq(key, 9, "severity.")) {
            int32_t li = ap_nn_label_index(m, key + 9, klen - 9);
            if (li < 0) return ap_nn_reject("param ", key, klen, ": no such label");
            if (ap_nn_number(key, klen, v, vlen, 0, 3, &x)) return 1;
            s->label_severity[li] = (int32_t)x;
        } else if (m->rule == AP_NN_RULE_CLASSIFIER && ap_nn_keyeq(key, klen, "normal")) {
            for (int32_t k = 0; k < AP_NN_MAX_LABELS; k++) s->normal[k] = 0;
            int32_t a = 0;
            while (a <= vlen) {
                int32_t b = a;
                while (b < vlen && v[b] != ',') b++;
                int32_t li = ap_nn_label_index(m, v + a, b - a);
                if (li < 0) return ap_nn_reject("param normal: no label '", v + a, b - a, "'");
                s->normal[li] = 1;
                a = b + 1;
            }
        } else {
            const char *known = m->rule == AP_NN_RULE_CLASSIFIER
                ? "' (known: input.scale, input.offset, threshold, consecutive, clear, severity, severity.LABEL, "
                  "normal)"
                : m->rule == AP_NN_RULE_SCORE
                ? "' (known: input.scale, input.offset, threshold, clear_threshold, consecutive, clear, severity)"
                : "' (known: input.scale, input.offset)";
            return ap_nn_reject("unknown param '", key, klen, known);
        }
    }
    if (m->rule == AP_NN_RULE_SCORE && s->clear_threshold > s->threshold)
        return ap_nn_reject("param clear_threshold", "", 0, " must not exceed threshold (hysteresis)");
    return 0;
}

static int32_t ap_nn_bad_window(const ap_nn_module *m, const ap_window_header *h) {
    char msg[200];
    ap_text t = {msg, (int32_t)sizeof msg, 0};
    msg[0] = 0;
    if (m->format == AP_FORMAT_U8) {
        ap_text_str(&t, "frame is not what the model takes: expected ");
        ap_text_int(&t, m->width); ap_text_str(&t, "x"); ap_text_int(&t, m->height);
        ap_text_str(&t, " with "); ap_text_int(&t, m->channels); ap_text_str(&t, " plane(s) of uint8");
        if (h) {
            ap_text_str(&t, ", got "); ap_text_int(&t, h->width); ap_text_str(&t, "x"); ap_text_int(&t, h->height);
            ap_text_str(&t, " with "); ap_text_int(&t, h->channels);
        } else {
            ap_text_str(&t, ", got a window that is not a uint8 image");
        }
    } else {
        ap_text_str(&t, "window is not what the model takes: expected ");
        ap_text_int(&t, m->channels); ap_text_str(&t, " channel(s) x ");
        ap_text_int(&t, m->frames); ap_text_str(&t, " float32 samples");
        if (h) {
            ap_text_str(&t, ", got "); ap_text_int(&t, h->channels); ap_text_str(&t, " x "); ap_text_int(&t, h->frames);
        } else {
            ap_text_str(&t, ", got a window that is not float32 samples");
        }
    }
    ap_log(AP_LOG_ERROR, msg);
    return -1;
}

/* Window -> model input (float32), x * scale + offset per channel, in the model's layout. */
static int32_t ap_nn_fill(const ap_nn_module *m, const uint8_t *win, int32_t len, float *in) {
    const ap_nn_state *s = &ap_nn_st;
    const int32_t C = m->channels, F = m->frames;
    const ap_window_header *h;
    if (m->format == AP_FORMAT_U8) {
        h = ap_image_open(win, len);
        if (!h || (int32_t)h->width != m->width || (int32_t)h->height != m->height || (int32_t)h->channels != C)
            return ap_nn_bad_window(m, h ? h : (const ap_window_header *)0);
        for (int32_t c = 0; c < C; c++) {
            const uint8_t *src = ap_image_plane(h, (uint32_t)c);
            const float sc = s->scale[c], of = s->offset[c];
            float *dst = m->channels_last ? in + c : in + (size_t)c * F;
            const int32_t step = m->channels_last ? C : 1;
            if (step == 1) {    /* the usual layout: 8 pixels a turn, constant offsets (fewest wasm3 ops) */
                const uint8_t *end = src + F, *end8 = src + (F & ~7);
                for (; src < end8; src += 8, dst += 8) {
                    dst[0] = (float)src[0] * sc + of; dst[1] = (float)src[1] * sc + of;
                    dst[2] = (float)src[2] * sc + of; dst[3] = (float)src[3] * sc + of;
                    dst[4] = (float)src[4] * sc + of; dst[5] = (float)src[5] * sc + of;
                    dst[6] = (float)src[6] * sc + of; dst[7] = (float)src[7] * sc + of;
                }
                while (src < end) *dst++ = (float)*src++ * sc + of;
            } else {
                for (int32_t i = 0; i < F; i++) dst[(size_t)i * step] = (float)src[i] * sc + of;
            }
        }
    } else {
        h = ap_window_open(win, len);
        if (!h || (int32_t)h->channels != C || (int32_t)h->frames != F)
            return ap_nn_bad_window(m, h ? h : (const ap_window_header *)0);
        for (int32_t c = 0; c < C; c++) {
            const float *src = ap_window_channel(h, (uint32_t)c);
            const float sc = s->scale[c], of = s->offset[c];
            float *dst = m->channels_last ? in + c : in + (size_t)c * F;
            const int32_t step = m->channels_last ? C : 1;
            if (step == 1) {
                const float *end = src + F, *end8 = src + (F & ~7);
                for (; src < end8; src += 8, dst += 8) {
                    dst[0] = src[0] * sc + of; dst[1] = src[1] * sc + of; dst[2] = src[2] * sc + of;
                    dst[3] = src[3] * sc + of; dst[4] = src[4] * sc + of; dst[5] = src[5] * sc + of;
                    dst[6] = src[6] * sc + of; dst[7] = src[7] * sc + of;
                }
                while (src < end) *dst++ = *src++ * sc + of;
            } else {
                for (int32_t i = 0; i < F; i++) dst[(size_t)i * step] = src[i] * sc + of;
            }
        }
    }
    return h->dropped ? 1 : 0;
}

static void ap_nn_softmax(const float *x, float *y, int32_t n) {
    float mx = x[0];
    for (int32_t i = 1; i < n; i++) if (x[i] > mx) mx = x[i];
    float sum = 0.0f;
    for (int32_t i = 0; i < n; i++) { y[i] = ap_nn_expf(x[i] - mx); sum += y[i]; }
    for (int32_t i = 0; i < n; i++) y[i] = y[i] / sum;
}

/* Features of the window, then the rule: one event per episode (N windows in a row past the
 * threshold), an info event when `clear` calm windows in a row end it. A gap (dropped windows)
 * breaks a run. */
static void ap_nn_report(const ap_nn_module *m, const float *out, int32_t gap, int32_t host) {
    ap_nn_state *s = &ap_nn_st;
    for (int32_t i = 0; i < m->outputs_len; i++)
        if (m->feature_names[i]) ap_feature(m->feature_names[i], (double)out[i]);
    if (m->descriptor) ap_feature("nn.host", host ? 1.0 : 0.0);
    if (m->rule == AP_NN_RULE_NONE) return;
    if (gap) { s->streak = 0; s->calm = 0; }
    char msg[400];
    ap_text t = {msg, (int32_t)sizeof msg, 0};
    msg[0] = 0;
    if (m->rule == AP_NN_RULE_CLASSIFIER) {
        float probs[AP_NN_MAX_LABELS];
        const float *p = out + m->rule_offset;
        if (m->apply_softmax) { ap_nn_softmax(p, probs, m->rule_len); p = probs; }
        int32_t top = 0;
        for (int32_t i = 1; i < m->rule_len; i++) if (p[i] > p[top]) top = i;
        double pt = p[top];
        if (m->apply_softmax)
            for (int32_t i = 0; i < m->rule_len; i++) {
                char name[80];
                ap_text n = {name, (int32_t)sizeof name, 0};
                name[0] = 0;
                ap_text_str(&n, "p."); ap_text_str(&n, m->labels[i]);
                ap_feature(name, (double)p[i]);
            }
        ap_feature("class", (double)top);
        int abnormal = !s->normal[top] && pt >= s->threshold;
        if (abnormal) {
            s->streak++;
            s->calm = 0;
            if (s->streak == 1 && !s->active) s->peak = pt; else if (pt > s->peak) s->peak = pt;
            if (!s->active && s->streak >= s->consecutive) {
                s->active = 1;
                s->active_label = top;
                int32_t sev = s->label_severity[top] >= 0 ? s->label_severity[top] : s->severity;
                ap_text_str(&t, "model ");
                ap_text_str(&t, m->model);
                ap_text_str(&t, ": class '");
                ap_text_str(&t, m->labels[top]);
                ap_text_str(&t, "' (p=");
                ap_text_num(&t, pt, 3);
                ap_text_str(&t, ") for ");
                ap_text_int(&t, s->streak);
                ap_text_str(&t, " windows in a row");
                ap_event(sev, pt, msg);
            }
        } else {
            s->streak = 0;
            s->calm++;
            if (s->active && s->calm >= s->clear) {
                s->active = 0;
                ap_text_str(&t, "model ");
                ap_text_str(&t, m->model);
                ap_text_str(&t, ": back to '");
                ap_text_str(&t, m->labels[top]);
                ap_text_str(&t, "' for ");
                ap_text_int(&t, s->calm);
                ap_text_str(&t, " windows; the '");
                ap_text_str(&t, m->labels[s->active_label]);
                ap_text_str(&t, "' episode peaked at p=");
                ap_text_num(&t, s->peak, 3);
                ap_event(AP_SEV_INFO, pt, msg);
                s->peak = 0;
            }
        }
    } else {
        double v = out[m->rule_offset];
        if (v > s->threshold) {
            s->streak++;
            s->calm = 0;
            if (s->streak == 1 && !s->active) s->peak = v; else if (v > s->peak) s->peak = v;
            if (!s->active && s->streak >= s->consecutive) {
                s->active = 1;
                ap_text_str(&t, "model ");
                ap_text_str(&t, m->model);
                ap_text_str(&t, ": ");
                ap_text_str(&t, m->feature_names[m->rule_offset] ? m->feature_names[m->rule_offset] : "score");
                ap_text_str(&t, " ");
                ap_text_num(&t, v, 4);
                ap_text_str(&t, " > ");
                ap_text_num(&t, s->threshold, 4);
                ap_text_str(&t, " for ");
                ap_text_int(&t, s->streak);
                ap_text_str(&t, " windows in a row");
                ap_event(s->severity, v, msg);
            }
        } else {
            s->streak = 0;
            if (v < s->clear_threshold) s->calm++; else s->calm = 0;
            if (s->active && s->calm >= s->clear) {
                s->active = 0;
                ap_text_str(&t, "model ");
                ap_text_str(&t, m->model);
                ap_text_str(&t, ": ");
                ap_text_str(&t, m->feature_names[m->rule_offset] ? m->feature_names[m->rule_offset] : "score");
                ap_text_str(&t, " back below ");
                ap_text_num(&t, s->clear_threshold, 4);
                ap_text_str(&t, " for ");
                ap_text_int(&t, s->calm);
                ap_text_str(&t, " windows; the episode peaked at ");
                ap_text_num(&t, s->peak, 4);
                ap_event(AP_SEV_INFO, v, msg);
                s->peak = 0;
            }
        }
    }
}

#endif /* AP_MODULE_H && !AP_NN_NATIVE */

#endif /* AP_NN_H */
