/*
 * native_host.c: runs an analytics module's C source natively, to compare with wasm3.
 *
 *   gcc -O2 -Imodules/sdk modules/src/vibstats/vibstats.c benchmarks/native/native_host.c \
 *       -lm -o /tmp/vibstats_native
 *   /tmp/vibstats_native [channels=3] [frames=4096] [windows=1000]
 *
 * Built without --target=wasm32 the SDK turns the host imports into plain extern functions;
 * this file provides them (counting calls) and feeds ABI v1 windows to ap_process. Only the
 * ap_process calls are timed: copying a window in is the host's cost, not the module's.
 * Prints one JSON line.
 */
#define _POSIX_C_SOURCE 199309L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>

#define TWO_PI 6.283185307179586

int32_t ap_abi_version(void);
uint8_t *ap_buffer(int32_t kind, int32_t size);
int32_t ap_init(const char *params, int32_t len);
int32_t ap_process(const uint8_t *window, int32_t len);

static uint64_t n_logs, n_features, n_events;

void ap_host_log(int32_t level, const char *msg, int32_t len) {
    n_logs++;
    if (level >= 3) fprintf(stderr, "module error: %.*s\n", (int)len, msg);
}

void ap_host_feature(const char *name, int32_t name_len, double value) {
    (void)name; (void)name_len; (void)value;
    n_features++;
}

void ap_host_event(int32_t severity, double score, const char *msg, int32_t len) {
    (void)severity; (void)score; (void)msg; (void)len;
    n_events++;
}

/* xorshift32: same samples on every machine and libc, unlike rand(). */
static uint32_t rng_state = 0x9E3779B9u;
static float noise(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return (float)((double)rng_state / 4294967296.0 * 2.0 - 1.0);
}

static void put_u16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static void put_u32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put_u64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static void put_f64(uint8_t *p, double v) { memcpy(p, &v, 8); }

static void write_header(uint8_t *w, uint32_t channels, uint32_t frames, double rate, uint64_t seq) {
    memset(w, 0, 64);
    memcpy(w, "APW1", 4);
    put_u16(w + 4, 64);
    put_u16(w + 6, 1);                       /* float32 */
    put_u32(w + 8, channels);
    put_u32(w + 12, frames);
    put_f64(w + 16, rate);
    put_u64(w + 24, seq);
    put_u64(w + 32, (uint64_t)(1700000000.0e9 + (double)seq * frames / rate * 1e9));
    put_u32(w + 40, 0);                      /* planar */
    put_u32(w + 44, 0);                      /* dropped */
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static long arg(int argc, char **argv, int i, long dflt) {
    if (argc <= i) return dflt;
    char *end;
    long v = strtol(argv[i], &end, 10);
    if (*end || v <= 0) { fprintf(stderr, "argument %d must be a positive integer: %s\n", i, argv[i]); exit(2); }
    return v;
}

int main(int argc, char **argv) {
    uint32_t channels = (uint32_t)arg(argc, argv, 1, 3);
    uint32_t frames = (uint32_t)arg(argc, argv, 2, 4096);
    long windows = arg(argc, argv, 3, 1000);
    const double rate = 25600.0;

    if (ap_abi_version() != 1) { fprintf(stderr, "module ABI version %d, expected 1\n", (int)ap_abi_version()); return 1; }
    const char params[] = "baseline.windows=10\n";
    int32_t plen = (int32_t)strlen(params);
    uint8_t *pbuf = ap_buffer(0, plen);
    if (!pbuf) { fprintf(stderr, "module has no params buffer\n"); return 1; }
    memcpy(pbuf, params, (size_t)plen);
    if (ap_init((const char *)pbuf, plen) != 0) { fprintf(stderr, "ap_init rejected the params\n"); return 1; }

    uint64_t wlen64 = 64 + 4ull * channels * frames;
    if (wlen64 > INT32_MAX) { fprintf(stderr, "window too large\n"); return 2; }
    int32_t wlen = (int32_t)wlen64;
    uint8_t *wbuf = ap_buffer(1, wlen);
    if (!wbuf) { fprintf(stderr, "module refuses windows of %d bytes\n", (int)wlen); return 1; }

    /* A few distinct windows, cycled: a sine per channel plus noise, so statistics move. */
    enum { DISTINCT = 8 };
    float *samples = malloc((size_t)DISTINCT * channels * frames * sizeof(float));
    if (!samples) { fprintf(stderr, "out of memory\n"); return 1; }
    for (uint32_t k = 0; k < DISTINCT; k++)
        for (uint32_t c = 0; c < channels; c++)
            for (uint32_t i = 0; i < frames; i++) {
                double t = (double)(k * frames + i) / rate;
                samples[((size_t)k * channels + c) * frames + i] =
                    (float)(0.5 * sin(TWO_PI * (50.0 + 10.0 * c) * t)) + 0.05f * noise();
            }

    double busy = 0;
    long rejected = 0;
    for (long w = 0; w < windows; w++) {
        write_header(wbuf, channels, frames, rate, (uint64_t)w);
        memcpy(wbuf + 64, samples + (size_t)(w % DISTINCT) * channels * frames, (size_t)wlen - 64);
        double t0 = now_s();
        int32_t rc = ap_process(wbuf, wlen);
        busy += now_s() - t0;
        if (rc < 0) rejected++;
    }

    double total = (double)windows * channels * frames;
    printf("{\"windows\": %ld, \"samples\": %.0f, \"seconds\": %.6f, \"samples_per_s\": %.1f, "
           "\"rejected\": %ld, \"features\": %llu, \"events\": %llu, \"logs\": %llu}\n",
           windows, total, busy, busy > 0 ? total / busy : 0.0, rejected,
           (unsigned long long)n_features, (unsigned long long)n_events, (unsigned long long)n_logs);
    free(samples);
    return 0;
}
