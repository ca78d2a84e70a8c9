"""The metrics exposition passes promtool, and the documented catalog and the dashboard use
only metrics that exist."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from prometheus_client import generate_latest

from appliance_tools.modbuild import build_module
from appliance.core.supervisor import Supervisor

from conftest import REPO
from support import metric, sim_source, wait_for, write_config


@pytest.fixture(scope="module")
def exposition(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metrics")
    wasm = build_module(REPO / "modules" / "src" / "vibstats", tmp / "vibstats.wasm").out
    cfg = write_config(tmp, {"spindle": sim_source(),
                             "gps": {"type": "nmea", "simulate": True}}, {
        "stats": {"wasm": str(wasm), "source": "spindle", "window": {"size": 1024},
                  "params": {"baseline": {"windows": 3}}}})
    sup = Supervisor(cfg)
    sup.start()
    try:
        wait_for(lambda: metric(sup, "appliance_module_windows_total", module="stats") >= 5, 15, "windows")
        text = generate_latest(sup.metrics.registry).decode()
    finally:
        sup.stop()
    return text


def names_in(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            names.add(name)
            if kind == "counter":
                names.add(name + "_total")
            if kind == "histogram":
                names |= {name + "_bucket", name + "_sum", name + "_count"}
            if kind == "info":
                names.add(name + "_info")
    return names


def test_promtool_accepts_the_exposition(exposition, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: make test installs Debian's prometheus package")
    proc = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr
    for needed in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_gc_collections_total",
                   'appliance_module_memory_bytes{module="stats"}', 'appliance_module_cpu_seconds_total{module="stats"}',
                   'appliance_module_call_seconds_bucket{le="0.001",module="stats"}'):
        assert needed in exposition, needed


def test_every_documented_metric_exists(exposition):
    documented = set(re.findall(r"^\| `([a-z_]+)`", (REPO / "docs" / "metrics.md").read_text(), re.M))
    assert len(documented) > 25
    missing = documented - names_in(exposition)
    assert not missing, f"documented but not exported: {sorted(missing)}"


def test_every_exported_metric_is_documented(exposition):
    documented = set(re.findall(r"^\| `([a-z_]+)`", (REPO / "docs" / "metrics.md").read_text(), re.M))
    ours = set()
    for line in exposition.splitlines():                         # the families, as the docs name them
        if line.startswith("# TYPE appliance_") and not line.split()[2].endswith("_created"):
            name, kind = line.split()[2:4]
            ours.add(name + "_total" if kind == "counter" and not name.endswith("_total") else name)
    assert not ours - documented, f"exported but not in docs/metrics.md: {sorted(ours - documented)}"


def test_dashboard_queries_use_existing_metrics(exposition):
    dash = json.loads((REPO / "docs" / "grafana" / "appliance.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(dash["panels"]) >= 12 and exprs
    exported = names_in(exposition)
    used = {m for e in exprs for m in re.findall(r"\b((?:appliance|process)_[a-z_]+)\b", e)}
    assert used and not used - exported, f"dashboard uses unknown metrics: {sorted(used - exported)}"


def test_the_supervisors_memory_by_kind_counts_the_spools_sqlite_cache(tmp_path):
    """The soak names what grew from these kinds; SQLite's share must be its own, live count."""
    from appliance.events.record import make_event
    from appliance.events.spool import Spool, sqlite_memory_used
    from appliance.ops.metrics import Metrics

    def kinds() -> dict[str, float]:
        text = generate_latest(Metrics().registry).decode()
        return {m[1]: float(m[2]) for m in re.finditer(r'appliance_supervisor_memory_bytes\{kind="(\w+)"\} (\S+)', text)}

    before = kinds()
    assert {"rss_anon", "rss_file", "malloc_in_use", "malloc_free", "sqlite"} <= set(before)
    spool = Spool(tmp_path / "spool.db", 64 << 20)
    for i in range(200):
        spool.append(make_event(gateway="gw", source="s", module="m", severity=1, score=1.0, message="x" * 2000,
                                window={"seq": i}, features={}))
    after = kinds()
    assert after["sqlite"] - before["sqlite"] > 100_000, (before["sqlite"], after["sqlite"])
    assert after["sqlite"] == pytest.approx(sqlite_memory_used(), rel=0.2)
    spool.close()


def test_the_supervisor_collects_reference_cycles_on_its_own_schedule(tmp_path, monkeypatch):
    """CPython's own full collections come hours apart in a quiet supervisor; the maintenance
    tick runs one every FULL_COLLECTION_EVERY_S (here 0.1 s, automatic collection off)."""
    import gc
    import appliance.core.supervisor as supervisor_mod
    monkeypatch.setattr(supervisor_mod, "FULL_COLLECTION_EVERY_S", 0.1)
    monkeypatch.setattr(supervisor_mod, "MAINTENANCE_TICK_S", 0.05)
    cfg = write_config(tmp_path, {"spindle": sim_source()}, {})
    sup = Supervisor(cfg)
    gc.disable()
    try:
        before = gc.get_stats()[2]["collections"]
        sup.start()
        wait_for(lambda: gc.get_stats()[2]["collections"] >= before + 2, 10, "full collections by the supervisor")
    finally:
        sup.stop()
        gc.enable()
