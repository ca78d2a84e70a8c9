"""The escape drill (issue: defense in depth): what a module worker that got native code execution
could try, each attempt on its own, in a child that entered the sandbox through the very code
every worker goes through. And a real worker of a running supervisor, seen from outside."""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml

from appliance.config.schema import load_config
from appliance.core.supervisor import Supervisor
from broker import Broker
from conftest import REPO, require
from support import metric, sim_source, wait_for

DRILL = REPO / "tests" / "sandbox_drill.py"
# What no layer but seccomp can refuse: a page of the worker's own memory made executable.
ONLY_SECCOMP = {"mprotect a page executable"}


@pytest.fixture
def target(tmp_path):
    """The things worth attacking, laid out as on a gateway (as root: the device nodes)."""
    require(os.geteuid() == 0, "root: the drill makes device nodes, and a worker switches uid only from root")
    data = tmp_path / "data"
    data.mkdir()
    config = tmp_path / "appliance.yaml"
    config.write_text("uplink:\n  mqtt:\n    password: hunter2\n")
    config.chmod(0o644)                       # as on the FAT partition: world-readable
    spool = data / "spool.db"
    db = sqlite3.connect(spool)
    db.execute("create table t (x)")
    db.commit()
    db.close()
    spool.chmod(0o666)                        # even a careless mode must not help
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.bind(str(tmp_path / "control.sock"))
    control.listen()
    os.chmod(tmp_path / "control.sock", 0o666)
    tcp = socket.create_server(("127.0.0.1", 0))
    i2c = tmp_path / "i2c-1"
    os.mknod(i2c, 0o666 | 0o020000, os.makedev(89, 1))   # /dev/i2c-1's numbers
    master, slave = os.openpty()
    tmp_path.chmod(0o755)
    broker = Broker(tmp_path / "broker").start()
    spec = {"config": str(config), "spool": str(spool), "control": str(tmp_path / "control.sock"),
            "tcp": tcp.getsockname()[1], "mqtt": broker.port, "i2c": str(i2c), "pty": os.ttyname(slave),
            "data_dir": str(data), "supervisor": os.getpid()}
    try:
        yield spec
    finally:
        broker.stop()
        for s in (control, tcp):
            s.close()
        os.close(master)
        os.close(slave)


def drill(tmp_path, spec: dict, skip: list[str]) -> dict[str, str]:
    path = tmp_path / f"drill-{'-'.join(skip) or 'all'}.json"
    path.write_text(json.dumps({**spec, "skip": skip}))
    out = subprocess.run([sys.executable, str(DRILL), str(path)], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    table = json.loads(out.stdout)
    layers = "every layer" if not skip else f"without {', '.join(skip)}"
    print(f"\nescape drill, {layers}:")
    for attempt, outcome in table.items():
        print(f"  {attempt:34s} {outcome}")
    assert not [o for o in table.values() if o.startswith("drill error")], table
    return table


def test_escape_drill_every_attempt_is_refused(tmp_path, target):
    table = drill(tmp_path, target, [])
    assert len(table) == 15
    assert {a: o for a, o in table.items() if o == "ok"} == {}
    assert not (tmp_path / "data" / "planted").exists()


def test_without_seccomp_the_other_layers_still_refuse(tmp_path, target):
    """Defense in depth: with the allow-list off, identity, namespaces, limits, seals and Landlock
    refuse every attempt but the one only a syscall filter can see."""
    table = drill(tmp_path, target, ["seccomp"])
    assert {a for a, o in table.items() if o == "ok"} == ONLY_SECCOMP
    assert not any("SIGSYS" in o for o in table.values())   # the filter really was off


def test_a_real_workers_credentials_from_outside(tmp_path, vibstats_wasm):
    require(os.geteuid() == 0, "root: a worker switches uid only from root (the image grants the zygote that)")
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump({
        "gateway": {"name": "gw", "data_dir": str(tmp_path / "var")}, "metrics": {"enabled": False},
        "sources": {"a": sim_source()},
        "modules": {"m": {"wasm": str(vibstats_wasm), "source": "a", "window": {"size": 1024}}}}))
    sup = Supervisor(load_config(path))
    sup.start()
    try:
        wait_for(lambda: sup.modules["m"].worker_pid, 20, "the worker")
        pid = sup.modules["m"].worker_pid
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        print({k: status[k] for k in ("Uid", "Gid", "Groups", "CapEff", "CapBnd", "NoNewPrivs", "Seccomp")})
        assert status["Seccomp"] == "2"
        assert status["NoNewPrivs"] == "1"
        assert int(status["CapEff"], 16) == 0
        assert int(status["Uid"].split()[0]) != os.getuid()
        assert status["Groups"].strip() == ""
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
        for layer in ("identity", "network", "limits", "landlock", "seccomp"):
            assert metric(sup, "appliance_worker_sandbox_layers", module="m", layer=layer) == 1, layer
        time.sleep(0.5)
        assert sup.modules["m"].processed > 0
    finally:
        sup.stop()


def test_the_zygote_is_restarted_and_running_workers_outlive_it(tmp_path, vibstats_wasm):
    import signal

    from appliance.runtime import zygote

    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump({
        "gateway": {"name": "gw", "data_dir": str(tmp_path / "var")}, "metrics": {"enabled": False},
        "sources": {"a": sim_source()},
        "modules": {m: {"wasm": str(vibstats_wasm), "source": "a", "window": {"size": 1024}} for m in ("m", "n")}}))
    sup = Supervisor(load_config(path))
    sup.start()
    try:
        wait_for(lambda: all(h.worker_pid for h in sup.modules.values()), 20, "the workers")
        spawner = zygote.shared()
        starts, old = spawner.starts, spawner.pid
        pids = {name: h.worker_pid for name, h in sup.modules.items()}
        os.kill(old, signal.SIGKILL)
        done = sup.modules["m"].processed
        wait_for(lambda: sup.modules["m"].processed > done + 3, 20, "windows after the zygote died")
        assert {name: h.worker_pid for name, h in sup.modules.items()} == pids   # the workers run on
        assert sup.modules["n"].restart("test")
        wait_for(lambda: sup.modules["n"].worker_pid not in (None, pids["n"]), 20, "a worker from a new zygote")
        assert spawner.starts == starts + 1 and spawner.pid != old
        done = sup.modules["n"].processed
        wait_for(lambda: sup.modules["n"].processed > done, 20, "the new worker's windows")
    finally:
        sup.stop()
    for name in ("m", "n"):
        assert metric(sup, "appliance_module_faults_total", module=name, kind="crash") == 0


def test_a_zygote_service_serves_the_supervisor_and_its_successor(tmp_path, vibstats_wasm):
    """The image runs the zygote as a service of its own (appliance-zygote.service): the
    supervisor connects to its socket, and a restarted service is found again."""
    from appliance.runtime import zygote

    path = tmp_path / "zygote.sock"
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def service():
        proc = subprocess.Popen([sys.executable, "-m", "appliance.runtime.zygote", "--listen", str(path)],
                                cwd=REPO, env=env)
        wait_for(lambda: path.exists(), 60, "the zygote's socket")
        return proc

    proc = service()
    cfg = tmp_path / "appliance.yaml"
    cfg.write_text(yaml.safe_dump({
        "gateway": {"name": "gw", "data_dir": str(tmp_path / "var")}, "metrics": {"enabled": False},
        "runtime": {"zygote": str(path)}, "sources": {"a": sim_source()},
        "modules": {"m": {"wasm": str(vibstats_wasm), "source": "a", "window": {"size": 1024}}}}))
    sup = Supervisor(load_config(cfg))
    sup.start()
    try:
        host = sup.modules["m"]
        wait_for(lambda: host.processed > 3, 30, "windows through the service's worker")
        assert zygote.shared().path == str(path) and zygote.shared().pid == proc.pid
        first = host.worker_pid
        proc.kill()                      # systemd would restart it: so do we
        proc.wait()
        done = host.processed
        wait_for(lambda: host.processed > done + 3, 20, "windows after the service died")   # the worker runs on
        assert host.worker_pid == first
        proc = service()
        assert host.restart("test")
        wait_for(lambda: host.worker_pid not in (None, first), 30, "a worker from the new service")
        assert zygote.shared().pid == proc.pid
    finally:
        sup.stop()
        proc.kill()
        zygote.configure(None)


def test_workers_end_with_their_supervisors_connection(tmp_path):
    """A worker stuck in a module's endless loop never reads its socket: when the supervisor's
    connection to the zygote ends, the zygote ends the workers it forked for it."""
    import numpy as np

    from appliance.runtime import zygote
    from appliance.runtime.process import ModuleFault, WorkerProcess
    from appliance.runtime.wire import HEADER, load_message, pack_header
    from hostile_modules.hostile import build_hostile

    spawner = zygote.Zygote()
    wasm = build_hostile("loop", tmp_path / "m").read_bytes()
    worker = WorkerProcess("loop", wasm, HEADER.size + 4 * 1024, load_message("loop.wasm", ""), spawner=spawner)
    with pytest.raises(ModuleFault):
        worker.process(pack_header(1, 1024, 1000.0, 0), np.zeros(1024, np.float32), 0.3)   # killed at the deadline
    stuck = WorkerProcess("loop", wasm, HEADER.size + 4 * 1024, load_message("loop.wasm", ""), spawner=spawner)
    import threading
    window = threading.Thread(target=lambda: pytest.raises(ModuleFault, stuck.process, pack_header(1, 1024, 1000.0, 0),
                                                           np.zeros(1024, np.float32), 60.0), daemon=True)
    window.start()                                   # a window it never finishes (the deadline is far)
    time.sleep(0.5)
    assert os.path.exists(f"/proc/{stuck.pid}")
    spawner.stop()                                   # the supervisor is gone
    window.join(10)                                  # its socket closed: the waiting call ended
    assert not window.is_alive()
    wait_for(lambda: not os.path.exists(f"/proc/{stuck.pid}"), 10, "the stuck worker to end")


def test_host_nn_without_landlock_runs_no_native_code(tmp_path):
    """A worker that may map executable memory leans on Landlock to refuse every file: without it
    the host_nn switch is off and the filter is the strict one."""
    code = (
        "import json, os, socket\n"
        "from appliance.runtime import worker, zygote\n"
        "zygote.preload()\n"
        "a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    report, _, _ = worker.enter_sandbox({'memory_budget_bytes': 64 << 20, 'host_nn': True,\n"
        "        'module_dir': '/tmp', 'skip_layers': ['landlock']}, (b.fileno(),))\n"
        "    try:\n"
        "        os.open('/etc/hostname', os.O_RDONLY)\n"
        "        opened = 'opened'\n"
        "    except OSError as exc:\n"
        "        opened = exc.strerror\n"
        "    os.write(b.fileno(), json.dumps([report.native_code, report.notes, opened]).encode())\n"
        "    os._exit(0)\n"
        "print(a.recv(65536).decode())\n"
        "os.waitpid(pid, 0)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    native, notes, opened = json.loads(out.stdout.strip().splitlines()[-1])
    assert native is False and opened == "Permission denied"
    assert any("host_nn: off, because Landlock is missing" in n for n in notes), notes
