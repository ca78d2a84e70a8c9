/*
 * crash: a hostile module for isolation tests. It passes wasm-validate and the ABI v1 checks,
 * yet kills a wasm3 (pywasm3 0.5.0) host process with SIGSEGV instead of trapping.
 *
 * Why: wasm3 runs each `loop` as a nested native call and each wasm call as another, but only
 * counts the wasm value stack (env.new_runtime(size)) against its limit. crash_recurse keeps
 * its wasm frame tiny (~56 bytes: two pointer params, no constants) and makes every recursive
 * call from inside 192 nested loops, so each 56 bytes of wasm stack cost roughly 192 native
 * frames. With a 64 KiB or larger wasm3 stack the 8 MiB native stack of the thread runs out
 * first: SIGSEGV, no trap. With a 48 KiB or smaller wasm3 stack (or a native stack of 32 MiB
 * for a 128 KiB wasm3 stack) wasm3 reports "[trap] stack overflow" instead.
 *
 * Params:
 *   after  windows processed normally before the recursion starts (default 0)
 *   depth  recursion depth limit (default: none). A small depth (e.g. 10) shows the module
 *          itself is correct: ap_process then returns 0.
 */
#define AP_WINDOW_BYTES (64 + 4 * 8 * 16384)
#include "ap_module.h"

static int32_t after, seen, depth_limit;
static volatile int32_t zero_cell, mark_cell;

/* A store that differs per loop level keeps clang from merging the loops into one. */
#define NEST1(x) do { *mark = n; x } while (*zero);
#define NEST2(x) NEST1(NEST1(x))
#define NEST4(x) NEST2(NEST2(x))
#define NEST8(x) NEST4(NEST4(x))
#define NEST16(x) NEST8(NEST8(x))
#define NEST32(x) NEST16(NEST16(x))
#define NEST64(x) NEST32(NEST32(x))
#define NEST128(x) NEST64(NEST64(x))
#define NEST192(x) NEST128(NEST64(x))

/* Not static: an exported function cannot be specialised on its constant arguments, so the
 * pointers stay parameters (locals) instead of becoming constants that enlarge wasm3's frame. */
__attribute__((noinline)) int32_t crash_recurse(int32_t n, volatile int32_t *mark, volatile int32_t *zero) {
    int32_t r = 0;
    if (n >= depth_limit) return 0;
    NEST192(r = crash_recurse(n + 1, mark, zero);)
    return r + 1;
}

int32_t ap_init(const char *params, int32_t len) {
    int bad = 0;
    after = (int32_t)ap_param_f64(params, len, "after", 0, &bad);
    depth_limit = (int32_t)ap_param_f64(params, len, "depth", 2147483647.0, &bad);
    if (bad || after < 0 || depth_limit < 0) { ap_log(AP_LOG_ERROR, "after and depth must be numbers >= 0"); return 1; }
    seen = 0;
    return 0;
}

int32_t ap_process(const uint8_t *window, int32_t len) {
    if (!ap_window_open(window, len)) return -1;
    if (seen++ < after) { ap_feature("windows", seen); return 0; }
    int32_t reached = crash_recurse(0, &mark_cell, &zero_cell);
    ap_feature("depth", reached);
    return 0;
}
