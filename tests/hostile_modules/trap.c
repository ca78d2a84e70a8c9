/*
 * trap: a hostile module for isolation tests. Follows ABI v1, then traps in ap_process.
 *
 * Params:
 *   after  windows processed normally before the first trap (default 0: every window traps)
 *   mode   oob (default): load from far outside linear memory -> "[trap] out of bounds memory access"
 *          unreachable:   the `unreachable` instruction       -> "[trap] unreachable executed"
 *          divzero:       integer division by zero            -> "[trap] integer divide by zero"
 */
#define AP_WINDOW_BYTES (64 + 4 * 8 * 16384)
#include "ap_module.h"

enum { MODE_OOB, MODE_UNREACHABLE, MODE_DIVZERO };

static int32_t after, mode, seen;
/* volatile so the compiler cannot prove the fault and fold it away. */
static volatile uint32_t far_address = 0xFFFFFFF0u;
static volatile int32_t zero = 0;

static int str_is(const char *v, int32_t n, const char *s) {
    int32_t k = ap_strlen(s);
    if (k != n) return 0;
    for (int32_t i = 0; i < n; i++) if (v[i] != s[i]) return 0;
    return 1;
}

int32_t ap_init(const char *params, int32_t len) {
    int bad = 0;
    after = (int32_t)ap_param_f64(params, len, "after", 0, &bad);
    if (bad || after < 0) { ap_log(AP_LOG_ERROR, "after must be a number >= 0"); return 1; }
    int32_t vlen;
    const char *v = ap_param_find(params, len, "mode", &vlen);
    mode = MODE_OOB;
    if (v) {
        if (str_is(v, vlen, "oob")) mode = MODE_OOB;
        else if (str_is(v, vlen, "unreachable")) mode = MODE_UNREACHABLE;
        else if (str_is(v, vlen, "divzero")) mode = MODE_DIVZERO;
        else { ap_log(AP_LOG_ERROR, "mode must be oob, unreachable or divzero"); return 1; }
    }
    seen = 0;
    return 0;
}

int32_t ap_process(const uint8_t *window, int32_t len) {
    if (!ap_window_open(window, len)) return -1;
    if (seen++ < after) { ap_feature("windows", seen); return 0; }
    ap_log(AP_LOG_WARNING, "trap: about to fault");
    if (mode == MODE_UNREACHABLE) __builtin_trap();
    if (mode == MODE_DIVZERO) return (int32_t)seen / zero;
    return (int32_t)*(volatile uint32_t *)(uintptr_t)far_address;
}
