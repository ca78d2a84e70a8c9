/*
 * native_host.c: runs an analytics module's C source natively, fed exactly what the wasm rows
 * of `make bench` feed it, measured the same way.
 *
 *   native_host PARAMS_FILE WINDOWS_FILE CHANNELS FRAMES RATE WARMUP COUNT
 *
 * PARAMS_FILE holds the module's params text (what the worker passes to ap_init); WINDOWS_FILE
 * holds W windows of CHANNELS x FRAMES planar float32, as the benchmark generated them. The
 * first WARMUP windows (cycling through the file) are processed untimed; then COUNT more, each
 * one written into the module's window buffer (header + samples, as the worker copies it into
 * linear memory) and passed to ap_process, under the process's CPU clock. Prints one JSON line.
 *
 * Built without --target=wasm32 the SDK turns the host imports into plain extern functions;
 * this file provides the core ones (counting calls).
 */
#define _POSIX_C_SOURCE 199309L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

void ap_host_features(const char *names, int32_t names_len, const double *values, int32_t count) {
    (void)names; (void)names_len; (void)values;
    n_features += (uint64_t)count;
}

void ap_host_event(int32_t severity, double score, const char *msg, int32_t len) {
    (void)severity; (void)score; (void)msg; (void)len;
    n_events++;
}

static void put_u16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static void put_u32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put_u64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static void put_f64(uint8_t *p, double v) { memcpy(p, &v, 8); }

/* The 64-byte header of modules/ABI.md, as appliance/runtime/host.py packs it. */
static uint32_t img_w, img_h;   /* image windows (camera frames, uint8) when given */

static void write_header(uint8_t *w, uint32_t channels, uint32_t frames, double rate, uint64_t seq) {
    memset(w, 0, 64);
    put_u32(w, 0x31575041u);                 /* "APW1" */
    put_u16(w + 4, 64);
    put_u16(w + 6, img_w ? 2 : 1);           /* uint8 image, or float32 */
    put_u32(w + 8, channels);
    put_u32(w + 12, frames);
    put_f64(w + 16, rate);
    put_u64(w + 24, seq);
    if (img_w) {
        put_u64(w + 32, (uint64_t)((double)seq * 1e9 / rate));   /* start time: frames at `rate` fps */
        put_u32(w + 48, img_w);
        put_u32(w + 52, img_h);
    }
}

static double cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void *read_file(const char *path, long *size) {
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    fseek(f, 0, SEEK_END);
    *size = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *buf = malloc((size_t)*size + 1);
    if (!buf || fread(buf, 1, (size_t)*size, f) != (size_t)*size) { fprintf(stderr, "cannot read %s\n", path); exit(2); }
    fclose(f);
    return buf;
}

static long arg(char **argv, int i) {
    char *end;
    long v = strtol(argv[i], &end, 10);
    if (*end || v < 0) { fprintf(stderr, "argument %d must be a non-negative integer: %s\n", i, argv[i]); exit(2); }
    return v;
}

int main(int argc, char **argv) {
    if (argc != 8 && argc != 10) {
        fprintf(stderr, "usage: %s PARAMS_FILE WINDOWS_FILE CHANNELS FRAMES RATE WARMUP COUNT [WIDTH HEIGHT]\n",
                argv[0]);
        return 2;
    }
    if (argc == 10) { img_w = (uint32_t)arg(argv, 8); img_h = (uint32_t)arg(argv, 9); }
    long plen, wbytes;
    char *params = read_file(argv[1], &plen);
    uint8_t *windows = read_file(argv[2], &wbytes);
    uint32_t channels = (uint32_t)arg(argv, 3), frames = (uint32_t)arg(argv, 4);
    double rate = strtod(argv[5], NULL);
    long warmup = arg(argv, 6), count = arg(argv, 7);
    size_t samples = (size_t)channels * frames, bytes = img_w ? 1 : sizeof(float);
    long distinct = wbytes / (long)(samples * bytes);
    if (distinct < 1 || (size_t)wbytes != (size_t)distinct * samples * bytes) {
        fprintf(stderr, "%s does not hold whole windows of %u x %u %s\n", argv[2], channels, frames,
                img_w ? "uint8" : "float32");
        return 2;
    }

    if (ap_abi_version() != 1) { fprintf(stderr, "module ABI version %d, expected 1\n", (int)ap_abi_version()); return 1; }
    uint8_t *pbuf = ap_buffer(0, (int32_t)(plen > 0 ? plen : 1));
    if (!pbuf) { fprintf(stderr, "module has no params buffer\n"); return 1; }
    memcpy(pbuf, params, (size_t)plen);
    if (ap_init((const char *)pbuf, (int32_t)plen) != 0) { fprintf(stderr, "ap_init rejected the params\n"); return 1; }

    int32_t wlen = (int32_t)(64 + samples * bytes);
    uint8_t *wbuf = ap_buffer(1, wlen);
    if (!wbuf) { fprintf(stderr, "module refuses windows of %d bytes\n", (int)wlen); return 1; }

    long rejected = 0;
    double t0 = 0;
    for (long w = 0; w < warmup + count; w++) {
        if (w == warmup) t0 = cpu_s();
        write_header(wbuf, channels, frames, rate, (uint64_t)w);
        memcpy(wbuf + 64, windows + (size_t)(w % distinct) * samples * bytes, samples * bytes);
        if (ap_process(wbuf, wlen) < 0) rejected++;
    }
    double cpu = cpu_s() - t0;
    double total = (double)count * (double)samples;
    printf("{\"windows\": %ld, \"samples\": %.0f, \"cpu_s\": %.6f, \"samples_per_cpu_s\": %.1f, "
           "\"rejected\": %ld, \"features\": %llu, \"events\": %llu, \"logs\": %llu}\n",
           count, total, cpu, cpu > 0 ? total / cpu : 0.0, rejected,
           (unsigned long long)n_features, (unsigned long long)n_events, (unsigned long long)n_logs);
    free(params);
    free(windows);
    return 0;
}
