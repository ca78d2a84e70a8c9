"""Each driver's own counters reach Prometheus, with the source and event as labels."""
from __future__ import annotations

from prometheus_client import generate_latest

from appliance.core.supervisor import Supervisor

from support import metric, write_config


def test_driver_counters_are_exported(tmp_path):
    cfg = write_config(tmp_path, {
        "acc": {"type": "i2c_accel", "chip": "adxl345", "emulate": True, "sample_rate": 800},
        "gps": {"type": "nmea", "simulate": True},
    }, {})
    sup = Supervisor(cfg)
    sup.sources["acc"].overruns = 2
    sup.sources["gps"].bad_checksums = 5
    assert metric(sup, "appliance_source_driver_events_total", source="acc", event="overruns") == 2
    assert metric(sup, "appliance_source_driver_events_total", source="gps", event="bad_checksums") == 5
    text = generate_latest(sup.metrics.registry).decode()
    assert 'appliance_source_driver_events_total{event="bad_lines",source="gps"} 0.0' in text
    sup.stop()
