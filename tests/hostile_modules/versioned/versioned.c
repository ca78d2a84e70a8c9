/* versioned: reports the window count, the mean of the first channel and its own build number,
 * so a test can tell which version of it runs. TRAP_AFTER > 0 makes a build that traps on real
 * data after that many windows (a bad release that passed its load check). */
#define AP_WINDOW_BYTES (64 + 4 * 8 * 4096)
#include "ap_module.h"

#define BUILD 1
#define TRAP_AFTER 0

static double gain;
static uint32_t windows, event_every;

int32_t ap_init(const char *params, int32_t len) {
    if (ap_params_check(params, len) != 0) return -1;
    int bad = 0;
    gain = ap_param_f64(params, len, "gain", 1.0, &bad);
    event_every = (uint32_t)ap_param_f64(params, len, "event_every", 0, &bad);
    if (bad) return -1;
    windows = 0;
    return 0;
}

int32_t ap_process(const uint8_t *window, int32_t len) {
    const ap_window_header *h = ap_window_open(window, len);
    if (!h) return -1;
    windows++;
    if (TRAP_AFTER > 0 && windows > TRAP_AFTER) __builtin_trap();
    const float *x = ap_window_channel(h, 0);
    double sum = 0;
    for (uint32_t i = 0; i < h->frames; i++) sum += x[i];
    ap_feature("build", BUILD);
    ap_feature("windows", windows);
    ap_feature("mean", gain * sum / (h->frames ? h->frames : 1));
    if (event_every && windows % event_every == 0) ap_event(0, (double)BUILD, "a regular event (window count)");
    return 0;
}
