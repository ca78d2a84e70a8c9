"""The systemd service protocol: READY=1 once running, WATCHDOG=1 only while not hung, STOPPING=1."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from appliance.ops import systemd
from appliance.core.supervisor import Supervisor

from conftest import REPO
from support import sim_source, wait_for, write_config


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    yield path, sock
    sock.close()


def receive(sock, until: float) -> list[str]:
    got = []
    while time.monotonic() < until:
        try:
            got += sock.recv(4096).decode().split("\n")
        except socket.timeout:
            continue
    return got


def test_notify_is_a_no_op_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_watchdog_interval_only_for_this_process(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval_s() == 4.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval_s() is None
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert systemd.watchdog_interval_s() is None


def test_watchdog_withholds_pings_while_hung_and_resumes(monkeypatch, notify_socket):
    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    problems: list[str] = []
    dog = systemd.Watchdog(lambda: list(problems), interval_s=0.1)
    dog.tick()
    assert sock.recv(4096) == b"WATCHDOG=1"
    problems.append("module m dispatcher stuck for 99 s")
    time.sleep(0.06)
    dog.tick()
    assert sock.recv(4096).startswith(b"STATUS=unhealthy: module m dispatcher stuck")
    problems.clear()
    time.sleep(0.06)
    dog.tick()
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_supervisor_reports_a_stuck_dispatcher_and_a_silent_maintenance_tick(tmp_path, vibstats_wasm):
    cfg = write_config(tmp_path, {"s": sim_source()},
                       {"m": {"wasm": str(vibstats_wasm), "source": "s", "window": {"size": 1024}}})
    sup = Supervisor(cfg)
    sup.start()
    try:
        wait_for(lambda: sup.modules["m"].processed > 0, 20, "first window")
        assert sup.hang_problems() == []
        host = sup.modules["m"]
        host.last_turn -= 1000          # as if its loop had not turned for 1000 s
        sup.last_maintenance -= 1000   # as if maintenance had been silent as long
        problems = sup.hang_problems()
        assert any(p.startswith("module m dispatcher stuck for 10") for p in problems), problems
        assert any(p.startswith("maintenance thread silent") for p in problems), problems
        # The loops are alive: their next turns clear it.
        wait_for(lambda: sup.hang_problems() == [], 10, "heartbeats to resume")
    finally:
        sup.stop()


def test_only_a_wasmtime_module_gets_the_grace_past_its_deadline_before_it_counts_as_hung(tmp_path, vibstats_wasm):
    """wasm3 cannot stop a window: the worker is killed at its deadline. wasmtime's worker may
    take the grace past it to say its engine stopped the call; only there is waiting longer right."""
    from appliance.core.supervisor import HANG_AFTER_S
    cfg = write_config(tmp_path, {"s": sim_source()}, {
        engine: {"wasm": str(vibstats_wasm), "source": "s", "window": {"size": 1024}, "engine": engine,
                 "deadline_ms": 500} for engine in ("wasm3", "wasmtime")})
    sup = Supervisor(cfg)
    assert sup.hang_limit_s(sup.modules["wasm3"]) == HANG_AFTER_S + 0.5
    assert sup.hang_limit_s(sup.modules["wasmtime"]) == HANG_AFTER_S + 0.5 + 0.5


def test_appliance_run_speaks_the_notify_protocol(tmp_path, notify_socket, vibstats_wasm):
    path, sock = notify_socket
    cfg_path = tmp_path / "appliance.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "gateway": {"name": "gw", "data_dir": str(tmp_path / "var")}, "metrics": {"enabled": False},
        "sources": {"s": sim_source()},
        "modules": {"m": {"wasm": str(vibstats_wasm), "source": "s", "window": {"size": 1024}}}}))
    env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "500000"}
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(cfg_path)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        got = receive(sock, time.monotonic() + 8)
        assert "READY=1" in got, got
        assert any(g.startswith("STATUS=running gateway gw: 1 sources, 1 modules") for g in got), got
        after_ready = got[got.index("READY=1"):]
        assert after_ready.count("WATCHDOG=1") >= 10, got     # every 0.25 s for several seconds
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in receive(sock, time.monotonic() + 3)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
