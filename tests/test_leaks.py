"""The engine binding leaks nothing per call (requirements/pywasm3_fix.py mends pywasm3 0.5.0,
which leaked ~125 bytes per host call and 80 bytes per get_memory). The whole appliance over
hours is `make soak`'s job; these pin the two leaks it found, in milliseconds."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from appliance.runtime.engines import Wasm3Backend
from support import build_inline_module

CALLER = r"""
#define AP_WINDOW_BYTES 1024
#include "ap_module.h"
int32_t ap_init(const char *p, int32_t n) { (void)p; (void)n; return 0; }
int32_t ap_process(const uint8_t *w, int32_t len) {
    (void)w; (void)len;
    for (int i = 0; i < 1000; i++) ap_feature("x", (double)i * 1.5);   /* host calls with a float */
    return 0;
}
"""


def rss_kb() -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())[1])


@pytest.fixture(scope="module")
def caller(tmp_path_factory):
    wasm = build_inline_module(tmp_path_factory, "caller", CALLER, 128)
    calls = []
    inst = Wasm3Backend().instantiate(wasm, 64 << 10, {("ap", "feature"): lambda p, n, v: calls.append(v) or None,
                                                       ("ap", "log"): lambda *a: None,
                                                       ("ap", "event"): lambda *a: None})
    return inst, calls


def test_host_calls_do_not_leak(caller):
    inst, calls = caller
    buf = inst.call("ap_buffer", 1, 64)
    for _ in range(20):   # warm-up: allocator and caches settle
        inst.call("ap_process", buf, 0)
        calls.clear()
    before = rss_kb()
    for _ in range(200):  # 200,000 host calls: 25 MB with the unmended binding
        inst.call("ap_process", buf, 0)
        calls.clear()
    assert rss_kb() - before < 2048


def test_memory_views_do_not_leak(tmp_path_factory):
    import wasm3   # the raw binding is what is under test
    env = wasm3.Environment()
    runtime = env.new_runtime(64 << 10)
    module = env.parse_module(build_inline_module(tmp_path_factory, "views", CALLER, 128))
    runtime.load(module)
    for _ in range(1000):
        runtime.get_memory(0)
    before = rss_kb()
    for _ in range(200_000):   # 15.7 MB with the unmended binding
        runtime.get_memory(0)
    assert rss_kb() - before < 2048


def test_linear_memory_is_not_touched_until_the_module_uses_it(tmp_path_factory):
    """wasm3 memset() all of a module's linear memory at instantiation: every page resident at each
    worker start, used or not (requirements/pywasm3_fix.py has it calloc'd). 64 MiB declared, a
    few pages used: resident memory grows by the pages used, and the memory still reads as zero."""
    wasm = build_inline_module(tmp_path_factory, "roomy", CALLER, 64 << 10)
    before = rss_kb()
    inst = Wasm3Backend().instantiate(wasm, 64 << 10, {})
    grown = rss_kb() - before
    memory = inst.memory()
    assert len(memory) == 64 << 20
    assert grown < 8 * 1024, f"instantiating a 64 MiB module made {grown} kB resident"
    assert not any(memory[i] for i in range(0, len(memory), 4096 * 97))   # zero, pages far apart
