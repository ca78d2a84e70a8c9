"""Real recorded bearing data through the real pipeline: replay source -> windows -> vibstats
in its wasm3 worker -> events in the spool."""
from __future__ import annotations

from appliance.events.spool import Spool
from appliance.core.supervisor import Supervisor

from conftest import shared_file
from support import metric, write_config

FS = 12000
WINDOW, HOP = 2048, 1024


def test_inner_race_fault_raises_events_and_healthy_second_half_none(tmp_path, vibstats_wasm):
    normal = shared_file("bearing", "cwru", "normal_0hp_48k.mat")
    inner = shared_file("bearing", "cwru", "inner_race_007_0hp_12k.mat")
    half_s = 60985 / 2 / FS   # the normal recording decimated to 12 kHz holds 60985 frames
    cfg = write_config(tmp_path, {"cwru": {
        "type": "replay", "realtime": False, "block_frames": 1024,
        "segments": [
            {"path": str(normal), "decimate": 4, "sample_rate": 48000, "duration_s": half_s},   # learn
            {"path": str(normal), "decimate": 4, "sample_rate": 48000, "start_s": half_s},      # must stay quiet
            {"path": str(inner), "sample_rate": FS},                                            # must alarm
        ]}}, {
        "vib": {"wasm": str(vibstats_wasm), "source": "cwru", "window": {"size": WINDOW, "hop": HOP},
                "overflow": "block", "queue": 8, "params": {"baseline": {"windows": 25}, "threshold": 6}},
    })
    sup = Supervisor(cfg)
    sup.start()
    try:
        assert sup.wait_until_done(timeout_s=120), "replay did not finish"
    finally:
        sup.stop()
    source = sup.sources["cwru"]
    second_half_start = source.segment_starts[1]

    cut = sup.pipelines["cwru"][0].windower.windows_cut
    assert sup.modules["vib"].processed == cut > 100
    assert metric(sup, "appliance_module_windows_dropped_total", module="vib", reason="overflow") == 0

    spool = Spool(cfg.gateway.data_dir / "spool.db", 1 << 24)
    events = spool.tail(1000)
    spool.close()
    # Windows never span segments (each starts afresh at a gap): count them per segment.
    bounds = list(source.segment_starts) + [source.frames_total]
    per_segment = [(b - a - WINDOW) // HOP + 1 for a, b in zip(bounds, bounds[1:])]
    first_faulty = per_segment[0] + per_segment[1]
    assert cut == sum(per_segment)
    healthy = [e for e in events if e["window"]["seq"] < first_faulty]
    faulty = [e for e in events if e["window"]["seq"] >= first_faulty]
    assert healthy == [], f"healthy data raised: {[e['message'] for e in healthy]}"
    assert faulty and faulty[0]["severity"] in ("alarm", "critical"), events
    # The first alarm comes within a few windows of the fault recording's start.
    assert faulty[0]["window"]["seq"] - first_faulty <= 3
    assert faulty[0]["features"]["ch0.kurtosis"] > 3.5
    assert second_half_start > 25 * HOP   # the baseline was learned inside the first half
