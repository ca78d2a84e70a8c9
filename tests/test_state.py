"""A module's learned state survives restarts, and an operator can reset it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from appliance.core.supervisor import Supervisor

from conftest import REPO, require
from hostile_modules.hostile import build_hostile
from support import metric, sim_source, wait_for, write_config


def run_until(cfg, predicate, what: str) -> tuple[Supervisor, list[dict]]:
    sup = Supervisor(cfg)
    seen: list[dict] = []
    host = sup.modules["learner"]
    sup.subscribe(lambda name, w, r: seen.append(r.features) if name == host.name else None)
    sup.start()
    try:
        wait_for(lambda: bool(seen) and predicate(seen), 20, what)
    finally:
        sup.stop()
    return sup, seen


def test_learned_state_survives_restart_and_reset_discards_it(tmp_path):
    wasm = build_hostile("stateful", tmp_path / "m")
    cfg = write_config(tmp_path, {"s": sim_source(block_s=0.02)}, {
        "learner": {"wasm": str(wasm), "source": "s", "window": {"size": 256}, "params": {"learn": 5}}})
    state_file = cfg.gateway.data_dir / "state" / "learner.state"

    _, seen = run_until(cfg, lambda s: s[-1]["windows"] >= 8, "learning")
    assert seen[0]["learned"] == 0 and seen[-1]["learned"] == 1
    assert state_file.exists() and state_file.stat().st_size == 16

    # A new supervisor (a restart of the appliance): the module starts learned.
    _, seen = run_until(cfg, lambda s: len(s) >= 2, "the restarted module")
    assert seen[0]["learned"] == 1 and seen[0]["windows"] >= 6

    # The operator resets the baseline from the CLI: the module learns from scratch.
    proc = subprocess.run([sys.executable, "-m", "appliance", "baseline", "reset", "learner", "--config",
                           str(tmp_path / "appliance.yaml")], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0 and "baseline reset requested for learner" in proc.stdout
    _, seen = run_until(cfg, lambda s: len(s) >= 2, "the reset module")
    assert seen[0]["learned"] == 0 and seen[0]["windows"] == 1


def test_reset_while_running_restarts_the_module(tmp_path):
    wasm = build_hostile("stateful", tmp_path / "m")
    cfg = write_config(tmp_path, {"s": sim_source(block_s=0.02)}, {
        "learner": {"wasm": str(wasm), "source": "s", "window": {"size": 256}, "params": {"learn": 3}}})
    sup = Supervisor(cfg)
    seen: list[dict] = []
    host = sup.modules["learner"]
    sup.subscribe(lambda name, w, r: seen.append(r.features) if name == host.name else None)
    sup.start()
    try:
        # The result reaches subscribers before its state is saved (events first): wait for both.
        wait_for(lambda: bool(seen) and seen[-1]["learned"] == 1
                 and (cfg.gateway.data_dir / "state" / "learner.state").exists(), 20, "learning")
        before = len(seen)
        (cfg.gateway.data_dir / "state" / "learner.reset").touch()
        wait_for(lambda: any(f["windows"] == 1 and f["learned"] == 0 for f in seen[before:]), 10,
                 "the module to restart unlearned")
        assert not (cfg.gateway.data_dir / "state" / "learner.reset").exists()
    finally:
        sup.stop()


def test_refused_state_is_discarded(tmp_path):
    wasm = build_hostile("stateful", tmp_path / "m")
    cfg = write_config(tmp_path, {"s": sim_source(block_s=0.02)}, {
        "learner": {"wasm": str(wasm), "source": "s", "window": {"size": 256}}})
    state_file = cfg.gateway.data_dir / "state" / "learner.state"
    state_file.parent.mkdir(parents=True)
    state_file.write_bytes(b"\0" * 16)          # right size, wrong magic: the module refuses it
    _, seen = run_until(cfg, lambda s: len(s) >= 1, "a window")
    assert seen[0]["learned"] == 0 and seen[0]["windows"] == 1


@pytest.mark.parametrize("trouble", ["full", "read-only"])
def test_a_full_disk_while_saving_state_is_the_hosts_problem(tmp_path, trouble):
    """/data full (or remounted read-only after an error, as ext4 does): the state cannot be
    saved. The module keeps running, unquarantined, no fault counted, every window's event
    kept; the host's error is logged and counted."""
    require(os.geteuid() == 0, "root: the test mounts a tiny tmpfs and fills it")
    wasm = build_hostile("stateful", tmp_path / "m")
    cfg = write_config(tmp_path, {"s": sim_source(block_s=0.02)}, {
        "learner": {"wasm": str(wasm), "source": "s", "window": {"size": 256}, "params": {"every": 1}}},
        events={"module_burst": 1000})
    state_dir = cfg.gateway.data_dir / "state"
    state_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "full", str(state_dir)], check=True)
    try:
        fd = os.open(state_dir / "filler", os.O_WRONLY | os.O_CREAT)   # fill it to the last block
        try:
            while os.write(fd, b"x" * 512):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        if trouble == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(state_dir)], check=True)
        sup = Supervisor(cfg)
        sup.start()
        host = sup.modules["learner"]
        try:
            wait_for(lambda: host.processed >= 10, 30, "ten windows")
        finally:
            sup.stop(drain_s=10)
        assert metric(sup, "appliance_module_host_errors_total", module="learner", what="state") >= 10
        assert sum(metric(sup, "appliance_module_faults_total", module="learner", kind=k)
                   for k in ("trap", "deadline", "crash", "load", "abi", "params", "memory", "engine", "protocol",
                             "sandbox")) == 0
        assert metric(sup, "appliance_module_quarantined", module="learner") == 0
        assert metric(sup, "appliance_module_restarts_total", module="learner") == 0
        assert sup.events_emitted == host.processed       # one event per window, none lost
        assert not (state_dir / "learner.state").exists()
    finally:
        subprocess.run(["umount", str(state_dir)], check=True)
