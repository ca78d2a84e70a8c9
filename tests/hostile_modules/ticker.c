/* ticker: raises one warning per window ("tick N"), for the store-and-forward tests: a steady,
 * countable stream of events. */
#define AP_WINDOW_BYTES (64 + 4 * 4 * 4096)
#include "ap_module.h"

static int64_t ticks;

int32_t ap_init(const char *params, int32_t len) { (void)params; (void)len; ticks = 0; return 0; }

int32_t ap_process(const uint8_t *window, int32_t len) {
    const ap_window_header *h = ap_window_open(window, len);
    if (!h) return -1;
    char msg[48];
    ap_text t = {msg, sizeof msg, 0};
    ap_text_str(&t, "tick ");
    ap_text_int(&t, ++ticks);
    ap_feature("seq", (double)h->sequence);
    ap_event(AP_SEV_WARNING, 1.0, msg);
    return 0;
}
