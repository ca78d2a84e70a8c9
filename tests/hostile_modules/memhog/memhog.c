/*
 * memhog: a hostile module for isolation tests. Its module.yaml declares 2 GiB of linear memory
 * (minimum == maximum), which the host must refuse before loading. A host that loaded it anyway
 * would see ap_process write one byte into every 64 KiB page, making all of it resident.
 * It imports a host image kernel, so its worker loads OpenCV: whatever address space that
 * OpenCV version reserves, the worker's memory cap must still stop the 2 GiB.
 */
#define AP_WINDOW_BYTES (64 + 4 * 8 * 16384)
#include "ap_module.h"
#include "ap_image.h"

extern unsigned char __heap_base;

int32_t ap_init(const char *params, int32_t len) {
    (void)params; (void)len;
    return 0;
}

int32_t ap_process(const uint8_t *window, int32_t len) {
    if (!ap_window_open(window, len)) return -1;
    uintptr_t end = (uintptr_t)__builtin_wasm_memory_size(0) * 65536u;
    uint32_t touched = 0;
    for (uintptr_t p = (uintptr_t)&__heap_base; p + 1 < end; p += 65536) {
        *(volatile uint8_t *)p = 1;
        touched++;
    }
    uint8_t pixel = 0;
    ap_host_img_blur(&pixel, &pixel, 1, 1, 1);
    ap_feature("pages_touched", touched);
    return 0;
}
