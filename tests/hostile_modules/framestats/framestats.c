/* framestats: a minimal image module for pipeline tests: reports each frame's size, mean and
 * the mean absolute difference to the previous frame (motion). Refuses sample windows. */
#define AP_WINDOW_BYTES (64 + 3 * 1024 * 1024)
#include "ap_module.h"

static uint8_t previous[1024 * 1024];
static uint32_t previous_frames;

int32_t ap_init(const char *params, int32_t len) { (void)params; (void)len; previous_frames = 0; return 0; }

int32_t ap_process(const uint8_t *window, int32_t len) {
    const ap_window_header *h = ap_image_open(window, len);
    if (!h) { ap_log(AP_LOG_ERROR, "not an image window"); return -1; }
    if (h->frames > sizeof previous) { ap_log(AP_LOG_ERROR, "frame too large"); return -2; }
    const uint8_t *px = ap_image_plane(h, 0);
    uint64_t sum = 0, diff = 0;
    for (uint32_t i = 0; i < h->frames; i++) {
        sum += px[i];
        if (previous_frames == h->frames) diff += (uint32_t)(px[i] > previous[i] ? px[i] - previous[i] : previous[i] - px[i]);
        previous[i] = px[i];
    }
    previous_frames = h->frames;
    ap_feature("width", h->width);
    ap_feature("height", h->height);
    ap_feature("channels", h->channels);
    ap_feature("mean", (double)sum / h->frames);
    ap_feature("motion", (double)diff / h->frames);
    return 0;
}
