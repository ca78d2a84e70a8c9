/* badptr: hands the host a pointer far outside its linear memory. The host must refuse it
 * (ABI fault), never read or write outside the module's memory. */
#define AP_WINDOW_BYTES (64 + 4 * 4 * 16384)
#include "ap_module.h"

int32_t ap_init(const char *params, int32_t len) { (void)params; (void)len; return 0; }

int32_t ap_process(const uint8_t *window, int32_t len) {
    (void)window; (void)len;
    ap_host_feature((const char *)0x7ffffff0, 8, 1.0);
    return 0;
}
