/* flood: raises the most events the ABI allows (16) on every window, for the event-rate limit test. */
#define AP_WINDOW_BYTES (64 + 4 * 4 * 1024)
#include "ap_module.h"

int32_t ap_init(const char *params, int32_t len) { (void)params; (void)len; return 0; }

int32_t ap_process(const uint8_t *window, int32_t len) {
    if (!ap_window_open(window, len)) return -1;
    for (int i = 0; i < 16; i++) ap_event(i == 0 ? AP_SEV_ALARM : AP_SEV_WARNING, (double)i, "flood");
    return 0;
}
