/* eventbox: raises one warning on the third image window with a box around (10,10)-(49,39),
 * for the snapshot-evidence test. */
#define AP_WINDOW_BYTES (64 + 3 * 320 * 240)
#include "ap_module.h"

static int32_t seen;

int32_t ap_init(const char *params, int32_t len) { (void)params; (void)len; seen = 0; return 0; }

int32_t ap_process(const uint8_t *window, int32_t len) {
    if (!ap_image_open(window, len)) return -1;
    if (++seen != 3) return 0;
    ap_feature("box0.x", 10);
    ap_feature("box0.y", 10);
    ap_feature("box0.w", 40);
    ap_feature("box0.h", 30);
    ap_event(AP_SEV_WARNING, 1.0, "something at the dock");
    return 0;
}
