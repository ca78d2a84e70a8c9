/* Native build of modules/src/bearing for `make bench`: stand-ins for the optional imports that
 * ap_dsp.h does not cover. The benchmark passes host.dsp=0 in the params, as the wasm row it is
 * compared with does, so the module takes its own C FFT and these are never called. */
#include <stdint.h>
__attribute__((weak)) void ap_host_state_changed(void) {}
__attribute__((weak)) int32_t ap_host_rfft(const float *in, float *out, int32_t n) {
    (void)in; (void)out; (void)n; return -1;
}
__attribute__((weak)) int32_t ap_host_irfft(const float *in, float *out, int32_t n) {
    (void)in; (void)out; (void)n; return -1;
}
