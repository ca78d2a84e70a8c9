/*
 * loop: a hostile module for isolation tests. Follows ABI v1, then never returns from
 * ap_process, so only the host's deadline (SIGKILL of the worker) can stop it.
 *
 * Params:
 *   after  windows processed normally before the first endless loop (default 0: the first)
 */
#define AP_WINDOW_BYTES (64 + 4 * 8 * 16384)
#include "ap_module.h"

static int32_t after, seen;
/* A volatile store is a side effect, so the compiler may not delete the loop. */
static volatile uint32_t spin;

int32_t ap_init(const char *params, int32_t len) {
    int bad = 0;
    after = (int32_t)ap_param_f64(params, len, "after", 0, &bad);
    if (bad || after < 0) { ap_log(AP_LOG_ERROR, "after must be a number >= 0"); return 1; }
    seen = 0;
    return 0;
}

int32_t ap_process(const uint8_t *window, int32_t len) {
    if (!ap_window_open(window, len)) return -1;
    if (seen++ < after) { ap_feature("windows", seen); return 0; }
    ap_log(AP_LOG_WARNING, "loop: spinning forever");
    for (;;) spin++;
}
