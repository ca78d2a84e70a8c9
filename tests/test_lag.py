"""A module that lags loses windows, counted, and never blocks its source."""
from __future__ import annotations

import time

from appliance.modbuild import build_module
from appliance.supervisor import Supervisor

from conftest import REPO
from support import metric, sim_source, wait_for, write_config


def test_lagging_module_drops_oldest_and_source_keeps_pace(tmp_path):
    slow = build_module(REPO / "tests" / "hostile_modules" / "slow.c", tmp_path / "slow.wasm")
    assert not slow.problems
    seen: list[dict] = []
    cfg = write_config(tmp_path, {"spindle": sim_source(sample_rate=12800, block_s=0.02)}, {
        # 100 windows/s offered; each takes far longer than 10 ms in wasm3.
        "slow": {"wasm": str(slow.out), "source": "spindle", "window": {"size": 128}, "queue": 2,
                 "deadline_ms": 5000, "params": {"spin": 3000000}},
    })
    sup = Supervisor(cfg)
    host = sup.modules["slow"]
    original = host._on_result
    host._on_result = lambda h, window, result: (seen.append(result.features), original(h, window, result))
    sup.start()
    started = time.monotonic()
    try:
        wait_for(lambda: metric(sup, "appliance_module_windows_dropped_total", module="slow", reason="overflow") > 20,
                 20, "overflow drops")
        time.sleep(1.0)
        elapsed = time.monotonic() - started
        samples = metric(sup, "appliance_source_samples_total", source="spindle") / 3
    finally:
        sup.stop(drain_s=10.0)

    # The source was never held back: it delivered (about) real time.
    assert samples >= 0.8 * 12800 * (elapsed - 0.3), (samples, elapsed)
    cut = sup.pipelines["spindle"][0].windower.windows_cut
    overflow = metric(sup, "appliance_module_windows_dropped_total", module="slow", reason="overflow")
    processed = sup.modules["slow"].processed
    assert processed >= 2 and overflow > 0
    assert processed + overflow == cut, (processed, overflow, cut)
    # Every lost window shows up for the module as a gap in the sequence and in `dropped`.
    seqs = [int(f["seq"]) for f in seen]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    gaps = [b - a - 1 for a, b in zip([-1] + seqs, seqs)]
    assert [int(f["dropped"]) for f in seen] == gaps
    assert sum(gaps) + (cut - 1 - seqs[-1]) == overflow
    assert all(int(f["frames"]) == 128 for f in seen)
