/*
 * ap_module.h: C SDK for appliance analytics modules, ABI v1 (see modules/ABI.md).
 *
 * Single header. In exactly one .c file of a module:
 *
 *     #define AP_WINDOW_BYTES (64 + 4 * 3 * 8192)   // largest window you accept
 *     #define AP_PARAMS_BYTES 4096                  // optional, default 4096
 *     #include "ap_module.h"
 *
 * and define ap_init() and ap_process(). The header supplies ap_abi_version(), ap_buffer()
 * with static buffers of those sizes, the host imports, the window header view, a params
 * parser and the few libc routines the compiler may call (memcpy, memset, memmove).
 *
 * The same source also compiles natively (gcc/clang without --target=wasm32): the host
 * imports are then ordinary extern functions a test or benchmark harness provides.
 */
#ifndef AP_MODULE_H
#define AP_MODULE_H

#include <stdint.h>
#include <stddef.h>

#define AP_ABI_VERSION 1

#if defined(__wasm__)
#define AP_EXPORT(name) __attribute__((export_name(#name), visibility("default")))
#define AP_IMPORT(name) __attribute__((import_module("ap"), import_name(#name)))
#else
#define AP_EXPORT(name)
#define AP_IMPORT(name)
#endif

/* ---- host imports ---------------------------------------------------------------------- */

enum { AP_LOG_DEBUG = 0, AP_LOG_INFO = 1, AP_LOG_WARNING = 2, AP_LOG_ERROR = 3 };
enum { AP_SEV_INFO = 0, AP_SEV_WARNING = 1, AP_SEV_ALARM = 2, AP_SEV_CRITICAL = 3 };

AP_IMPORT(log) void ap_host_log(int32_t level, const char *msg, int32_t len);
AP_IMPORT(feature) void ap_host_feature(const char *name, int32_t name_len, double value);
AP_IMPORT(event) void ap_host_event(int32_t severity, double score, const char *msg, int32_t len);

/* ---- freestanding helpers ---------------------------------------------------------------- */

static inline int32_t ap_strlen(const char *s) {
    int32_t n = 0;
    while (s[n]) n++;
    return n;
}

static inline void ap_log(int32_t level, const char *msg) { ap_host_log(level, msg, ap_strlen(msg)); }
static inline void ap_feature(const char *name, double value) { ap_host_feature(name, ap_strlen(name), value); }
static inline void ap_event(int32_t severity, double score, const char *msg) {
    ap_host_event(severity, score, msg, ap_strlen(msg));
}

/* Small text builder for event messages, no printf in a freestanding module. */
typedef struct { char *buf; int32_t cap, len; } ap_text;

static inline void ap_text_str(ap_text *t, const char *s) {
    if (t->cap <= 0) return;
    while (*s && t->len < t->cap - 1) t->buf[t->len++] = *s++;
    t->buf[t->len] = 0;
}

static inline void ap_text_int(ap_text *t, int64_t v) {
    char tmp[24];
    int n = 0;
    uint64_t u = v < 0 ? (uint64_t)(-v) : (uint64_t)v;
    do { tmp[n++] = (char)('0' + u % 10); u /= 10; } while (u && n < 23);
    if (v < 0) tmp[n++] = '-';
    if (t->cap <= 0) return;
    while (n && t->len < t->cap - 1) t->buf[t->len++] = tmp[--n];
    t->buf[t->len] = 0;
}

/* Fixed-point with `decimals` places; enough for messages, not for data. */
static inline void ap_text_num(ap_text *t, double v, int decimals) {
    if (v != v) { ap_text_str(t, "nan"); return; }
    if (v < 0) { ap_text_str(t, "-"); v = -v; }
    int64_t scale = 1;
    for (int i = 0; i < decimals && i < 15; i++) scale *= 10;
    if (v > 9.0e15 / (double)scale) {          /* no room for decimals in an int64 */
        if (v < 9.0e18) ap_text_int(t, (int64_t)v); else ap_text_str(t, "inf");
        return;
    }
    int64_t fixed = (int64_t)(v * (double)scale + 0.5);
    ap_text_int(t, fixed / scale);
    if (decimals > 0) {
        ap_text_str(t, ".");
        int64_t frac = fixed % scale;
        for (int64_t d = scale / 10; d > 0; d /= 10) {
            char c[2] = {(char)('0' + (frac / d) % 10), 0};
            ap_text_str(t, c);
        }
    }
}

/* ---- The event story (one fault, one story) -------------------------------------------------
 * What every anomaly module tells, and what an operator expects: raise once the score has been
 * above the threshold for `confirm` windows in a row; raise again only if the severity
 * escalates; clear (an info event) once it has stayed below threshold * clear_ratio for
 * `clear_windows` windows. Keep an ap_story in the module's persistent state (three int32s) and
 * feed it every window:
 *
 *     switch (ap_story_update(&st.story, score, cfg.threshold, sev, cfg.confirm, cfg.clear_ratio,
 *                             cfg.clear_windows)) {
 *     case AP_STORY_RAISE:    ap_event(sev, score, "anomaly ..."); break;
 *     case AP_STORY_ESCALATE: ap_event(sev, score, "anomaly escalated ..."); break;
 *     case AP_STORY_CLEAR:    ap_event(AP_SEV_INFO, score, "back to normal ..."); break;
 *     }
 * The host also limits events per module (events.module_rate_per_min); a module that tells its
 * story this way never comes near it. */
typedef struct { int32_t above, below, active; } ap_story;   /* active: the open severity, -1: none */
enum { AP_STORY_QUIET = 0, AP_STORY_RAISE = 1, AP_STORY_ESCALATE = 2, AP_STORY_CLEAR = 3 };

static inline void ap_story_reset(ap_story *s) { s->above = s->below = 0; s->active = -1; }

static inline int ap_story_update(ap_story *s, double score, double threshold, int32_t severity,
                                  int32_t confirm, double clear_ratio, int32_t clear_windows) {
    if (score > threshold) { s->above++; s->below = 0; }
    else if (score < threshold * clear_ratio) { s->below++; s->above = 0; }
    else { s->above = 0; s->below = 0; }
    if (s->above >= confirm) {
        if (severity > s->active) {
            int what = s->active < 0 ? AP_STORY_RAISE : AP_STORY_ESCALATE;
            s->active = severity;
            return what;
        }
    } else if (s->active >= 0 && s->below >= clear_windows) {
        s->active = -1;
        return AP_STORY_CLEAR;
    }
    return AP_STORY_QUIET;
}

/* ---- the window ------------------------------------------------------------------------- */

#define AP_WINDOW_MAGIC 0x31575041u /* "APW1" little-endian */
#define AP_WINDOW_HEADER_BYTES 64
enum { AP_FORMAT_F32 = 1, AP_FORMAT_U8 = 2 };
enum { AP_LAYOUT_PLANAR = 0 };

typedef struct {
    uint32_t magic;
    uint16_t header_size;
    uint16_t sample_format;
    uint32_t channels;
    uint32_t frames;
    double sample_rate;
    uint64_t sequence;
    int64_t start_time_ns;
    uint32_t layout;
    uint32_t dropped;
    uint32_t width;       /* images (sample_format u8): frames == width * height; else 0 */
    uint32_t height;
    uint8_t reserved[8];
} ap_window_header;

_Static_assert(sizeof(ap_window_header) == AP_WINDOW_HEADER_BYTES, "window header is 64 bytes");

/* Checks the header against the bytes the host said it wrote; returns the header or 0. */
static inline const ap_window_header *ap_window_open(const uint8_t *ptr, int32_t len) {
    if (len < AP_WINDOW_HEADER_BYTES) return 0;
    const ap_window_header *h = (const ap_window_header *)ptr;
    if (h->magic != AP_WINDOW_MAGIC || h->header_size != AP_WINDOW_HEADER_BYTES) return 0;
    if (h->sample_format != AP_FORMAT_F32 || h->layout != AP_LAYOUT_PLANAR) return 0;
    uint64_t need = (uint64_t)AP_WINDOW_HEADER_BYTES + 4ull * h->channels * h->frames;
    if (h->channels == 0 || h->frames == 0 || need > (uint64_t)len) return 0;
    return h;
}

static inline const float *ap_window_channel(const ap_window_header *h, uint32_t channel) {
    return (const float *)((const uint8_t *)h + AP_WINDOW_HEADER_BYTES) + (size_t)channel * h->frames;
}

/* An image window (a camera frame): uint8 planes of width x height; returns the header or 0.
 * ap_window_open() refuses these, so sample modules never misread pixels as samples. */
static inline const ap_window_header *ap_image_open(const uint8_t *ptr, int32_t len) {
    if (len < AP_WINDOW_HEADER_BYTES) return 0;
    const ap_window_header *h = (const ap_window_header *)ptr;
    if (h->magic != AP_WINDOW_MAGIC || h->header_size != AP_WINDOW_HEADER_BYTES) return 0;
    if (h->sample_format != AP_FORMAT_U8 || h->layout != AP_LAYOUT_PLANAR) return 0;
    if (h->width == 0 || h->height == 0 || (uint64_t)h->width * h->height != h->frames) return 0;
    uint64_t need = (uint64_t)AP_WINDOW_HEADER_BYTES + (uint64_t)h->channels * h->frames;
    if (h->channels == 0 || need > (uint64_t)len) return 0;
    return h;
}

static inline const uint8_t *ap_image_plane(const ap_window_header *h, uint32_t channel) {
    return (const uint8_t *)h + AP_WINDOW_HEADER_BYTES + (size_t)channel * h->frames;
}

/* ---- params ("key=value" lines, see ABI.md) ---------------------------------------------- */

/* Finds key; returns a pointer to its value and sets *vlen, or returns 0. */
static inline const char *ap_param_find(const char *p, int32_t len, const char *key, int32_t *vlen) {
    int32_t klen = ap_strlen(key), i = 0;
    while (i < len) {
        int32_t line_end = i;
        while (line_end < len && p[line_end] != '\n') line_end++;
        int32_t k = 0;
        while (k < klen && i + k < line_end && p[i + k] == key[k]) k++;
        if (k == klen && i + k < line_end && p[i + k] == '=') {
            *vlen = line_end - (i + k + 1);
            return p + i + k + 1;
        }
        i = line_end + 1;
    }
    return 0;
}

static inline int ap_isfinite(double x) { return x - x == 0; }   /* false for NaN and +-inf */

/* Parses a decimal number (optional sign, fraction, exponent); *ok = 0 if it is not one.
 * Digits gather into an integer and one power of ten scales it: for up to 15 significant digits
 * and |exponent| <= 22 that is one correctly rounded operation, so "0.05" gives the double
 * 0.05, as the C literal (and Python, writing the YAML value) does. Beyond that it is within a
 * few ulp. */
static inline double ap_parse_f64(const char *s, int32_t n, int *ok) {
    static const double pow10[23] = {1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12,
                                     1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
    int32_t i = 0;
    double sign = 1.0;
    uint64_t mant = 0;
    int digits = 0, kept = 0, exp10 = 0;
    if (i < n && (s[i] == '-' || s[i] == '+')) { if (s[i] == '-') sign = -1.0; i++; }
    while (i < n && s[i] >= '0' && s[i] <= '9') {
        if (kept < 19) { mant = mant * 10 + (uint64_t)(s[i] - '0'); if (mant) kept++; }
        else exp10++;                                   /* a digit beyond 19: only its place counts */
        i++; digits++;
    }
    if (i < n && s[i] == '.') {
        i++;
        while (i < n && s[i] >= '0' && s[i] <= '9') {
            if (kept < 19) { mant = mant * 10 + (uint64_t)(s[i] - '0'); if (mant) kept++; exp10--; }
            i++; digits++;
        }
    }
    if (digits && i < n && (s[i] == 'e' || s[i] == 'E')) {
        int esign = 1, e = 0, edigits = 0;
        i++;
        if (i < n && (s[i] == '-' || s[i] == '+')) { if (s[i] == '-') esign = -1; i++; }
        while (i < n && s[i] >= '0' && s[i] <= '9') { if (e < 10000) e = e * 10 + (s[i] - '0'); i++; edigits++; }
        if (!edigits || e > 400) digits = 0;   /* beyond any double: refused, and no long loop */
        exp10 += esign * e;
    }
    if (!digits || i != n) { *ok = 0; return 0.0; }
    double v = (double)mant;
    if (mant == 0 || exp10 == 0) {
        /* v as is */
    } else if (mant <= (1ull << 53) && exp10 > 0 && exp10 <= 22) {
        v *= pow10[exp10];
    } else if (mant <= (1ull << 53) && exp10 < 0 && exp10 >= -22) {
        v /= pow10[-exp10];
    } else {
        while (exp10 > 22 && ap_isfinite(v)) { v *= 1e22; exp10 -= 22; }
        while (exp10 < -22 && v != 0) { v /= 1e22; exp10 += 22; }
        if (exp10 > 22 || exp10 < -22) exp10 = 0;   /* v is already inf or 0: nothing left to scale */
        v = exp10 >= 0 ? v * pow10[exp10] : v / pow10[-exp10];
    }
    v *= sign;
    *ok = digits > 0 && i == n && ap_isfinite(v);
    return v;
}

/* The number at key, or dflt if absent. *bad (if given) is set when present but not a number. */
static inline double ap_param_f64(const char *p, int32_t len, const char *key, double dflt, int *bad) {
    int32_t vlen;
    const char *v = ap_param_find(p, len, key, &vlen);
    if (!v) return dflt;
    int ok;
    double x = ap_parse_f64(v, vlen, &ok);
    if (!ok) { if (bad) *bad = 1; return dflt; }
    return x;
}

/* One params line after another: key, value (not NUL-terminated), empty lines skipped.
 *     ap_params_iter it = ap_params_begin(params, len);
 *     const char *k, *v; int32_t klen, vlen;
 *     while (ap_params_next(&it, &k, &klen, &v, &vlen)) { ... }
 * A line without '=' comes back with *v = 0 (vlen 0): the module decides how to refuse it. */
typedef struct { const char *p; int32_t len, at; } ap_params_iter;

static inline ap_params_iter ap_params_begin(const char *p, int32_t len) {
    ap_params_iter it = {p, len, 0};
    return it;
}

static inline int ap_params_next(ap_params_iter *it, const char **key, int32_t *klen, const char **value,
                                 int32_t *vlen) {
    while (it->at < it->len) {
        int32_t i = it->at, end = i;
        while (end < it->len && it->p[end] != '\n') end++;
        it->at = end + 1;
        if (end == i) continue;
        int32_t eq = i;
        while (eq < end && it->p[eq] != '=') eq++;
        *key = it->p + i;
        *klen = eq - i;
        *value = eq < end ? it->p + eq + 1 : 0;
        *vlen = eq < end ? end - eq - 1 : 0;
        return 1;
    }
    return 0;
}

/* Whether key (klen bytes) matches a manifest pattern: dot-separated segments, "<n>" for a
 * number, "<name>" for a name of letters, digits, '_', '-' and ':' (and '.' when it ends the
 * pattern), as appliance/config/params.py matches them. */
static inline int ap_param_key_matches(const char *pattern, const char *key, int32_t klen) {
    int32_t i = 0;
    while (*pattern) {
        if (pattern[0] == '<' && pattern[1] == 'n') {
            int numeric = pattern[2] == '>';
            while (*pattern && *pattern != '>') pattern++;
            if (*pattern) pattern++;
            int last = *pattern == 0;
            int32_t start = i;
            while (i < klen && (key[i] != '.' || (!numeric && last))) {
                char c = key[i];
                int digit = c >= '0' && c <= '9';
                int word = digit || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == '-' ||
                           c == ':' || c == '.';
                if (numeric ? !digit : !word) return 0;
                i++;
            }
            if (i == start) return 0;
            continue;
        }
        if (i >= klen || key[i] != *pattern) return 0;
        i++;
        pattern++;
    }
    return i == klen;
}

/* Refuses (logs, returns 1) a key the module's manifest does not declare. The build generates
 * the list from module.yaml's params: (AP_PARAMS_MANIFEST); without one every key passes.
 * host.* keys are the appliance's and always pass. Call it first in ap_init. */
static inline int ap_params_check(const char *p, int32_t len) {
#ifdef AP_PARAMS_MANIFEST
    ap_params_iter it = ap_params_begin(p, len);
    const char *k, *v;
    int32_t klen, vlen;
    while (ap_params_next(&it, &k, &klen, &v, &vlen)) {
        if (klen > 5 && k[0] == 'h' && k[1] == 'o' && k[2] == 's' && k[3] == 't' && k[4] == '.') continue;
        int known = 0;
        for (int32_t i = 0; ap_param_keys[i] && !known; i++) known = ap_param_key_matches(ap_param_keys[i], k, klen);
        if (!known) {
            char msg[160];
            ap_text t = {msg, sizeof msg, 0};
            ap_text_str(&t, "unknown param '");
            for (int32_t i = 0; i < klen && i < 64; i++) { char c[2] = {k[i], 0}; ap_text_str(&t, c); }
            ap_text_str(&t, "' (not in the module's manifest)");
            ap_log(AP_LOG_ERROR, msg);
            return 1;
        }
    }
#else
    (void)p; (void)len;
#endif
    return 0;
}

/* ---- default buffers and exports ----------------------------------------------------------- */

#ifndef AP_PARAMS_BYTES
#define AP_PARAMS_BYTES 4096
#endif
#ifndef AP_WINDOW_BYTES
#error "define AP_WINDOW_BYTES (largest window in bytes, header included) before including ap_module.h"
#endif

static uint8_t ap_params_buffer[AP_PARAMS_BYTES];
static uint8_t ap_window_buffer[AP_WINDOW_BYTES] __attribute__((aligned(16)));

AP_EXPORT(ap_abi_version) int32_t ap_abi_version(void) { return AP_ABI_VERSION; }

AP_EXPORT(ap_buffer) uint8_t *ap_buffer(int32_t kind, int32_t size) {
    if (size < 0) return 0;
    if (kind == 0 && size <= AP_PARAMS_BYTES) return ap_params_buffer;
    if (kind == 1 && size <= AP_WINDOW_BYTES) return ap_window_buffer;
    return 0;
}

AP_EXPORT(ap_init) int32_t ap_init(const char *params, int32_t len);
AP_EXPORT(ap_process) int32_t ap_process(const uint8_t *window, int32_t len);

#if defined(__wasm__)
/* clang lowers struct copies and zeroing to these; -nostdlib means we provide them. */
__attribute__((weak)) void *memcpy(void *dst, const void *src, size_t n) {
    uint8_t *d = (uint8_t *)dst;
    const uint8_t *s = (const uint8_t *)src;
    while (n--) *d++ = *s++;
    return dst;
}
__attribute__((weak)) void *memmove(void *dst, const void *src, size_t n) {
    uint8_t *d = (uint8_t *)dst;
    const uint8_t *s = (const uint8_t *)src;
    if (d < s) { while (n--) *d++ = *s++; }
    else { d += n; s += n; while (n--) *--d = *--s; }
    return dst;
}
__attribute__((weak)) void *memset(void *dst, int c, size_t n) {
    uint8_t *d = (uint8_t *)dst;
    while (n--) *d++ = (uint8_t)c;
    return dst;
}
#endif

static inline double ap_sqrt(double x) { return __builtin_sqrt(x); }
static inline double ap_fabs(double x) { return __builtin_fabs(x); }

#endif /* AP_MODULE_H */
