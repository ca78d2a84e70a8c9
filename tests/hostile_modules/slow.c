/* slow: a well-behaved but slow module, for lag tests. Spins `spin` iterations per window and
 * reports what the host told it about the window (sequence, dropped) so tests can check that
 * every lost window is visible to the module as a gap. */
#define AP_WINDOW_BYTES (64 + 4 * 4 * 16384)
#include "ap_module.h"

static double spin;

int32_t ap_init(const char *params, int32_t len) {
    spin = ap_param_f64(params, len, "spin", 1000000, 0);
    return 0;
}

int32_t ap_process(const uint8_t *window, int32_t len) {
    const ap_window_header *h = ap_window_open(window, len);
    if (!h) return -1;
    volatile uint32_t sink = 0;
    for (uint32_t i = 0; i < (uint32_t)spin; i++) sink += i;
    ap_feature("seq", (double)h->sequence);
    ap_feature("dropped", (double)h->dropped);
    ap_feature("frames", (double)h->frames);
    return 0;
}
