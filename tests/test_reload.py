"""Live reload: a bad file changes nothing; a good one restarts only what changed, and the
pipelines that did not change lose no window."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import yaml

from appliance.config.schema import ConfigError, load_config
from appliance_tools.modbuild import build_module
from appliance.core.supervisor import Supervisor

from conftest import REPO
from support import metric, sim_source, wait_for


def config_doc(tmp_path, wasm, threshold=6):
    return {"gateway": {"name": "gw", "data_dir": str(tmp_path / "var")}, "metrics": {"enabled": False},
            "sources": {"a": sim_source(), "b": sim_source(seed=1)},
            "modules": {
                "changing": {"wasm": str(wasm), "source": "a", "window": {"size": 1024},
                             "params": {"threshold": threshold, "baseline": {"windows": 3}}},
                # A deep queue: an overflow on a loaded machine (counted, correct) is not what this
                # test is about; a lost window would be.
                "steady": {"wasm": str(wasm), "source": "b", "window": {"size": 512}, "queue": 256,
                           "params": {"baseline": {"windows": 3}}}}}


@pytest.fixture(scope="module")
def wasm(tmp_path_factory):
    return build_module(REPO / "modules" / "src" / "vibstats", tmp_path_factory.mktemp("m") / "vibstats.wasm").out


def test_reload_restarts_only_what_changed_and_loses_nothing_elsewhere(tmp_path, wasm):
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump(config_doc(tmp_path, wasm)))
    sup = Supervisor(load_config(path))
    sup.config_path = path
    sup.start()
    try:
        wait_for(lambda: all(h.worker_pid for h in sup.modules.values()), 10, "workers")
        changing_pid, steady_pid = sup.modules["changing"].worker_pid, sup.modules["steady"].worker_pid
        steady_host = sup.modules["steady"]
        time.sleep(0.5)

        # A broken file: nothing changes, the error says where.
        path.write_text(yaml.safe_dump(config_doc(tmp_path, wasm)).replace("threshold: 6", "threshold: -1"))
        with pytest.raises(ConfigError,
                           match=r"appliance.yaml:\d+:\d+: modules.changing.params.threshold: -1 is invalid"):
            sup.reload_config()
        assert sup.modules["changing"].worker_pid == changing_pid

        # A good change to one module's params.
        path.write_text(yaml.safe_dump(config_doc(tmp_path, wasm, threshold=9)))
        assert sup.reload_config() == "restarted modules changing"
        wait_for(lambda: sup.modules["changing"].worker_pid not in (None, changing_pid), 10, "the new worker")
        assert sup.modules["changing"].cfg.params["threshold"] == 9
        assert sup.modules["steady"] is steady_host and steady_host.worker_pid == steady_pid
        time.sleep(0.5)
        assert sup.reload_config() == "nothing changed"
    finally:
        sup.stop(drain_s=30)   # returns once idle: the bound only matters on a loaded machine
    cut = next(p for p in sup.pipelines["b"] if p.module is steady_host).windower.windows_cut
    assert steady_host.processed == cut > 20          # the unchanged pipeline lost no window
    for reason in ("overflow", "unavailable", "fault"):
        assert metric(sup, "appliance_module_windows_dropped_total", module="steady", reason=reason) == 0


def test_replaced_wasm_file_is_picked_up(tmp_path, wasm):
    local = tmp_path / "mod.wasm"
    local.write_bytes(wasm.read_bytes())
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump(config_doc(tmp_path, local)))
    sup = Supervisor(load_config(path))
    sup.config_path = path
    sup.start()
    try:
        wait_for(lambda: all(h.worker_pid for h in sup.modules.values()), 10, "workers")
        other = build_module(REPO / "tests" / "hostile_modules" / "slow.c", tmp_path / "slow.wasm").out
        tmp = tmp_path / "mod.wasm.new"
        tmp.write_bytes(other.read_bytes())
        tmp.replace(local)                               # atomic replacement, as a deploy does
        assert sup.reload_config() == "restarted modules changing, steady"
    finally:
        sup.stop()


def test_sighup_reloads_a_running_appliance(tmp_path, wasm):
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump(config_doc(tmp_path, wasm)))
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(path)], cwd=REPO,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        time.sleep(3)
        path.write_text(yaml.safe_dump(config_doc(tmp_path, wasm)).replace("sources:", "nonsense: 1\nsources:"))
        proc.send_signal(signal.SIGHUP)
        time.sleep(2)
        path.write_text(yaml.safe_dump(config_doc(tmp_path, wasm, threshold=8)))
        proc.send_signal(signal.SIGHUP)
        time.sleep(2)
    finally:
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=20)[1]
    assert "config reload refused, still running the previous config" in err
    assert f"{path}:" in err and "'nonsense' is not a valid option" in err
    assert "reloaded: restarted modules changing" in err
    assert proc.returncode == 0


def test_load_module_swaps_a_build_and_refuses_a_bad_one(tmp_path, wasm):
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump(config_doc(tmp_path, wasm)))
    sup = Supervisor(load_config(path))
    sup.start()
    try:
        wait_for(lambda: sup.modules["changing"].worker_pid, 10, "workers")
        steady = sup.modules["steady"]
        bad = tmp_path / "bad.wasm"
        bad.write_bytes(b"\0asm garbage")
        with pytest.raises(ValueError, match="bad.wasm not loaded: .*not a valid wasm binary"):
            sup.load_module("changing", bad)
        other = build_module(REPO / "tests" / "hostile_modules" / "slow.c", tmp_path / "slow.wasm").out
        assert sup.load_module("changing", other) == f"module changing: loaded {other}"
        wait_for(lambda: sup.modules["changing"].worker_pid is not None, 10, "the new build")
        assert sup.cfg.modules["changing"].wasm == other and sup.modules["steady"] is steady
    finally:
        sup.stop()


def test_a_reload_failing_while_preparing_changes_nothing(tmp_path, wasm):
    import numpy as np
    np.save(tmp_path / "two.npy", np.zeros((5000, 2), dtype=np.float32))
    doc = config_doc(tmp_path, wasm)
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump(doc))
    sup = Supervisor(load_config(path))
    sup.config_path = path
    sup.start()
    try:
        wait_for(lambda: sup.modules["changing"].worker_pid, 10, "workers")
        pid = sup.modules["changing"].worker_pid
        # Valid YAML, but column 7 of a 2-column recording only fails when the file is read.
        bad = yaml.safe_load(yaml.safe_dump(doc))
        bad["sources"]["a"] = {"type": "replay", "segments": [{"path": str(tmp_path / "two.npy"),
                                                               "sample_rate": 1000, "columns": [0, 7]}]}
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ValueError, match="column"):
            sup.reload_config()
        assert sup.modules["changing"].worker_pid == pid and "a" in sup.sources
        assert sup.cfg.sources["a"].type == "sim_vibration"
        path.write_text(yaml.safe_dump(config_doc(tmp_path, wasm, threshold=7)))
        assert sup.reload_config() == "restarted modules changing"       # the next reload works
    finally:
        sup.stop()


def test_stop_after_a_failed_start(tmp_path, wasm):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        doc = config_doc(tmp_path, wasm)
        doc["metrics"] = {"enabled": True, "port": taken.getsockname()[1]}
        path = tmp_path / "appliance.yaml"
        path.write_text(yaml.safe_dump(doc))
        sup = Supervisor(load_config(path))
        with pytest.raises(OSError):
            sup.start()
        sup.stop()   # must not raise: nothing had started
