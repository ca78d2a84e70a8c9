"""A module that lags loses windows, counted, and never blocks its source."""
from __future__ import annotations

import time

from appliance_tools.modbuild import build_module
from appliance.core.supervisor import Supervisor

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
    sup.subscribe(lambda name, window, result: seen.append(result.features) if name == host.name else None)
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


def test_operator_restart_during_a_slow_window_is_not_a_fault(tmp_path):
    from appliance.runtime.host import ModuleState

    slow = build_module(REPO / "tests" / "hostile_modules" / "slow.c", tmp_path / "slow.wasm")
    cfg = write_config(tmp_path, {"spindle": sim_source()}, {
        "slow": {"wasm": str(slow.out), "source": "spindle", "window": {"size": 1024}, "deadline_ms": 30000,
                 "params": {"spin": 2_000_000_000}},   # seconds per window
    })
    sup = Supervisor(cfg)
    sup.start()
    try:
        host = sup.modules["slow"]
        wait_for(lambda: host.busy, 10, "a window in flight")
        first_pid = host.worker_pid
        for _ in range(3):
            assert host.restart()
            wait_for(lambda old=first_pid: host.state is ModuleState.RUNNING and host.worker_pid not in (None, old),
                     10, "the restarted worker")
            first_pid = host.worker_pid
            wait_for(lambda: host.busy, 10, "a window in flight")
        faults = sum(metric(sup, "appliance_module_faults_total", module="slow", kind=k)
                     for k in ("trap", "deadline", "crash", "load", "abi", "protocol"))
        assert faults == 0
        assert metric(sup, "appliance_module_restarts_total", module="slow") == 3
        assert metric(sup, "appliance_module_windows_dropped_total", module="slow", reason="unavailable") >= 3
    finally:
        sup.stop(drain_s=0.1)
    assert metric(sup, "appliance_module_windows_dropped_total", module="slow", reason="fault") == 0
    assert metric(sup, "appliance_module_windows_dropped_total", module="slow", reason="stopped") >= 1
    cut = sup.pipelines["spindle"][0].windower.windows_cut
    dropped = sum(metric(sup, "appliance_module_windows_dropped_total", module="slow", reason=r)
                  for r in ("overflow", "unavailable", "fault", "stopped"))
    assert sup.modules["slow"].processed + dropped == cut   # every window accounted for, even at stop
