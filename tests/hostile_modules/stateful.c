/* stateful: a tiny learner for the persistent-state tests. It "learns" by counting windows;
 * after `learn` windows it is learned, calls ap.state_changed, and keeps counting. Its blob
 * carries a magic and the `learn` param, so a blob learned under other params is refused.
 * With `every=1` it changes its state and raises a warning on every window (the full-disk test).
 * With `loop_at=N` its Nth window spins forever (a deadline with state to restore). */
#define AP_WINDOW_BYTES (64 + 4 * 4 * 16384)
#include "ap_module.h"

AP_IMPORT(state_changed) void ap_host_state_changed(void);

static struct { uint32_t magic; uint32_t learn; uint32_t learned; uint32_t windows; } state;
static int every;
static uint32_t loop_at;
static volatile uint32_t spin;

int32_t ap_init(const char *params, int32_t len) {
    state.magic = 0x53544154u;
    state.learn = (uint32_t)ap_param_f64(params, len, "learn", 5, 0);
    state.learned = 0;
    state.windows = 0;
    every = ap_param_f64(params, len, "every", 0, 0) != 0;
    loop_at = (uint32_t)ap_param_f64(params, len, "loop_at", 0, 0);
    return 0;
}

AP_EXPORT(ap_state_size) int32_t ap_state_size(void) { return sizeof state; }
AP_EXPORT(ap_state_ptr) uint8_t *ap_state_ptr(void) { return (uint8_t *)&state; }
AP_EXPORT(ap_state_loaded) int32_t ap_state_loaded(void) {
    return state.magic == 0x53544154u && state.learned ? 0 : 1;
}

int32_t ap_process(const uint8_t *window, int32_t len) {
    (void)window; (void)len;
    state.windows++;
    if (loop_at && state.windows == loop_at)
        for (;;) spin++;
    if (!state.learned && state.windows >= state.learn) {
        state.learned = 1;
        ap_host_state_changed();
    }
    if (every) {
        ap_host_state_changed();
        ap_event(AP_SEV_WARNING, state.windows, "window seen");
    }
    ap_feature("windows", state.windows);
    ap_feature("learned", state.learned);
    return 0;
}
