"""A module cannot flood the spool: a token bucket per module, the excess counted and summarised."""
from __future__ import annotations

import time

from appliance.core.supervisor import Supervisor
from appliance.events.limit import EventBudget
from appliance.events.spool import Spool

from hostile_modules.hostile import build_hostile
from support import metric, sim_source, wait_for, write_config


def test_the_bucket_lets_a_burst_through_then_the_rate():
    now = [0.0]
    budget = EventBudget(per_minute=60, burst=5, summary_s=60, clock=lambda: now[0])
    assert [budget.take(1) for _ in range(7)] == [True] * 5 + [False] * 2
    now[0] = 1.0                       # one second: one more token
    assert budget.take(1) and not budget.take(3)
    assert budget.summary_due() is None        # the interval has not passed
    now[0] = 61.0
    held = budget.summary_due()
    assert (held.count, held.worst) == (3, 3)
    assert budget.summary_due() is None        # said once


def test_a_module_raising_16_events_per_window_at_full_speed(tmp_path):
    wasm = build_hostile("flood", tmp_path / "m")
    burst, per_minute = 20, 60
    cfg = write_config(tmp_path, {"s": sim_source(block_s=0.01)}, {
        "flood": {"wasm": str(wasm), "source": "s", "window": {"size": 128}, "queue": 64}},
        events={"module_burst": burst, "module_rate_per_min": per_minute, "suppressed_summary_s": 3600})
    sup = Supervisor(cfg)
    started = time.monotonic()
    sup.start()
    host = sup.modules["flood"]
    try:
        wait_for(lambda: host.processed >= 200, 60, "200 windows")
    finally:
        sup.stop(drain_s=10)
    elapsed = time.monotonic() - started
    raised = 16 * host.processed
    suppressed = metric(sup, "appliance_events_suppressed_total", module="flood")
    allowed = burst + per_minute * elapsed / 60.0
    spool = Spool(sup.spool.path, 64 << 20)   # the spool as the next start finds it
    events = [e for e, _ in spool.pending(100_000)]
    spool.close()
    print(f"\n{host.processed} windows, {raised} events raised in {elapsed:.1f} s; "
          f"{sup.events_emitted} committed (limit {allowed:.0f} + 1 summary), {suppressed:.0f} suppressed")
    assert len(events) == sup.events_emitted <= allowed + 1
    assert suppressed == raised - (sup.events_emitted - 1) > 0
    summaries = [e for e in events if e["kind"] == "events_suppressed"]
    assert len(summaries) == 1 and summaries[0]["features"]["suppressed"] == suppressed
    assert "suppressed" in summaries[0]["message"] and "flood" in summaries[0]["message"]
