/* chatty: stays inside every ABI limit, at the limit: 70 log lines (64 are kept), 16 events
 * and 256 features per window, all messages 512 bytes of control characters (each would take
 * 6 bytes if JSON escaped them). The reply must still fit and arrive. */
#define AP_WINDOW_BYTES (64 + 4 * 4 * 16384)
#include "ap_module.h"

static char junk[512];

int32_t ap_init(const char *params, int32_t len) {
    (void)params; (void)len;
    for (int i = 0; i < 512; i++) junk[i] = (char)(1 + i % 30);
    return 0;
}

int32_t ap_process(const uint8_t *window, int32_t len) {
    (void)window; (void)len;
    for (int i = 0; i < 70; i++) ap_host_log(AP_LOG_INFO, junk, 512);
    for (int i = 0; i < 16; i++) ap_host_event(AP_SEV_WARNING, i, junk, 512);
    char name[16] = "f000";
    for (int i = 0; i < 256; i++) {
        name[1] = (char)('0' + i / 100); name[2] = (char)('0' + i / 10 % 10); name[3] = (char)('0' + i % 10);
        ap_feature(name, i);
    }
    return 0;
}
