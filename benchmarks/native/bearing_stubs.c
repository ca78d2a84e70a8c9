/* Native build of modules/src/bearing for `make bench`: native_host.c passes only
 * "baseline.windows=10", so bearing.c is compiled with -Dap_init=bearing_ap_init and this
 * wrapper adds the geometry; the optional imports get stand-ins (the C FFT path is used). */
#include <stdint.h>
#include <string.h>
int32_t bearing_ap_init(const char *params, int32_t len);
__attribute__((weak)) void ap_host_state_changed(void) {}
/* Never called: the harness does not pass host.dsp=1, so ap_rfft takes the C path. */
__attribute__((weak)) int32_t ap_host_rfft(const float *in, float *out, int32_t n) {
    (void)in; (void)out; (void)n; return -1;
}
__attribute__((weak)) int32_t ap_host_irfft(const float *in, float *out, int32_t n) {
    (void)in; (void)out; (void)n; return -1;
}
int32_t ap_init(const char *params, int32_t len) {
    static char buf[4096];
    const char *extra = "bearing.balls=9\nbearing.ball_diameter=0.3126\nbearing.pitch_diameter=1.537\nshaft.rpm=1797\n";
    size_t n = strlen(extra);
    if ((size_t)len + n > sizeof buf) return 1;
    memcpy(buf, params, (size_t)len);
    memcpy(buf + len, extra, n);
    return bearing_ap_init(buf, len + (int32_t)n);
}
