"""The worker process on its own: ABI checks on every guest pointer, params rejection, the
memory cap, and a worker killed from outside."""
from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest

from appliance_tools.modbuild import build_module
from appliance.runtime.wire import HEADER, load_message, pack_header
from appliance.runtime.process import ModuleFault, WorkerProcess

from conftest import REPO


ENGINES = ("wasm3", "wasmtime")   # the worker's tests run on both engines (docs/engines.md)


def load_msg(params: str = "", budget_mb: int = 512, max_memory_mb: int = 64, engine: str = "wasm3") -> dict:
    return load_message("test.wasm", params, max_memory_bytes=max_memory_mb << 20,
                        memory_budget_bytes=budget_mb << 20, backend=engine)


def window(seq: int = 0, channels: int = 3, frames: int = 1024, scale: float = 1.0):
    data = (np.random.default_rng(seq).standard_normal((channels, frames)) * scale).astype(np.float32)
    header = pack_header(channels, frames, 12800.0, seq)
    return header, data


@pytest.mark.parametrize("engine", ENGINES)
def test_vibstats_round_trip_features_and_event(vibstats_wasm, engine):
    worker = WorkerProcess("t", vibstats_wasm.read_bytes(), HEADER.size + 4 * 3 * 1024,
                           load_msg("baseline.windows=5\nthreshold=6\n", engine=engine))
    try:
        for seq in range(5):
            reply = worker.process(*window(seq), deadline_s=5)
            assert reply["rc"] == 0 and reply["e"] == []
        assert [text for _, text in reply["l"]] == ["baseline learned"]
        assert set(reply["f"]) >= {"ch0.rms", "ch2.kurtosis", "baseline.progress"}
        assert abs(reply["f"]["ch1.rms"] - 1.0) < 0.1 and abs(reply["f"]["ch1.kurtosis"] - 3.0) < 0.5
        events = []
        for seq in range(5, 8):
            reply = worker.process(*window(seq, scale=10.0), deadline_s=5)
            events += reply["e"]
        assert len(events) == 1   # confirmed once, then held: no storm
        severity, score, message = events[0]
        assert severity == 3 and score > 24 and message.startswith("vibration anomaly: ch")
    finally:
        worker.stop()


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_guest_pointer_is_an_abi_fault(tmp_path, engine):
    wasm = build_module(REPO / "tests" / "hostile_modules" / "badptr.c", tmp_path / "badptr.wasm").out
    worker = WorkerProcess("badptr", wasm.read_bytes(), HEADER.size + 4 * 3 * 1024, load_msg(engine=engine))
    with pytest.raises(ModuleFault) as info:
        worker.process(*window(), deadline_s=5)
    assert info.value.kind == "abi"
    assert "outside linear memory" in info.value.reason and "ap.feature" in info.value.reason
    assert worker.returncode is not None   # it exited after the fault, and was reaped


@pytest.mark.parametrize("engine", ENGINES)
def test_module_rejecting_params_says_why(vibstats_wasm, engine):
    with pytest.raises(ModuleFault) as info:
        WorkerProcess("t", vibstats_wasm.read_bytes(), 4096, load_msg("threshold=-1\n", engine=engine))
    assert info.value.kind == "params"
    assert info.value.reason == "module rejected its params: threshold must be positive"


@pytest.mark.parametrize("engine", ENGINES)
def test_memory_cap_stops_a_memory_hog(tmp_path, engine):
    # memhog declares 2 GiB. With the declared-memory limit raised so the check lets it pass,
    # the second line of defence (RLIMIT_DATA over the worker's own footprint) must hold on its own.
    result = build_module(REPO / "tests" / "hostile_modules" / "memhog", tmp_path / "memhog.wasm")
    with pytest.raises(ModuleFault) as info:
        WorkerProcess("memhog", result.out.read_bytes(), 4096, load_msg(engine=engine))
    assert info.value.kind == "load" and "2048 MiB of memory, above the host limit of 64 MiB" in info.value.reason
    with pytest.raises(ModuleFault) as info:
        WorkerProcess("memhog", result.out.read_bytes(), 4096, load_msg(budget_mb=256, max_memory_mb=4096,
                                                                        engine=engine))
    assert info.value.kind == "memory"
    said = {"wasm3": r"memory allocation failed",
            "wasmtime": r"wasmtime could not instantiate the module: Cannot allocate memory \(os error 12\)"}[engine]
    assert re.fullmatch(said + r" \(worker capped at 256 MiB above its own \d+ MiB\)", info.value.reason), \
        info.value.reason


@pytest.mark.parametrize("engine", ENGINES)
def test_the_cap_starts_from_the_workers_own_footprint(vibstats_wasm, engine):
    worker = WorkerProcess("t", vibstats_wasm.read_bytes(), HEADER.size + 4 * 3 * 1024, load_msg(budget_mb=100, engine=engine))
    try:
        status = Path(f"/proc/{worker.pid}/status").read_text()
        limits = Path(f"/proc/{worker.pid}/limits").read_text()
    finally:
        worker.stop()
    vm_data = int(re.search(r"VmData:\s+(\d+) kB", status)[1]) << 10
    soft, hard = re.search(r"Max data size\s+(\d+)\s+(\d+)\s+bytes", limits).groups()
    assert int(soft) == int(hard) == worker.memory_cap_bytes   # the module cannot lift it
    assert worker.memory_cap_bytes == worker.footprint_bytes + (100 << 20)
    assert worker.footprint_bytes <= vm_data < worker.memory_cap_bytes


@pytest.mark.parametrize("engine", ENGINES)
def test_worker_killed_from_outside_is_a_crash(vibstats_wasm, engine):
    worker = WorkerProcess("t", vibstats_wasm.read_bytes(), HEADER.size + 4 * 3 * 1024, load_msg(engine=engine))
    # wasmtime handles SIGSEGV itself (a wasm trap): one sent from outside, not from wasm code, is
    # passed to the default action only when the fault recurs, which a kill() never does.
    sig = signal.SIGSEGV if engine == "wasm3" else signal.SIGABRT
    os.kill(worker.pid, sig)
    with pytest.raises(ModuleFault) as info:
        worker.process(*window(), deadline_s=5)
    assert info.value.kind == "crash" and sig.name in info.value.reason


@pytest.mark.parametrize("engine", ENGINES)
def test_a_module_at_every_limit_still_gets_its_reply_through(tmp_path, engine):
    wasm = build_module(REPO / "tests" / "hostile_modules" / "chatty.c", tmp_path / "chatty.wasm").out
    worker = WorkerProcess("chatty", wasm.read_bytes(), HEADER.size + 4 * 3 * 1024, load_msg(engine=engine))
    try:
        reply = worker.process(*window(), deadline_s=5)
    finally:
        worker.stop()
    assert reply["rc"] == 0
    assert len(reply["l"]) == 64 and reply["ld"] == 6
    assert len(reply["e"]) == 16 and len(reply["f"]) == 256
    assert all(len(m) == 512 and "\x01" not in m for _, _, m in reply["e"])


@pytest.mark.parametrize("engine", ENGINES)
def test_non_finite_samples_are_skipped_not_learned(vibstats_wasm, engine):
    worker = WorkerProcess("t", vibstats_wasm.read_bytes(), HEADER.size + 4 * 3 * 1024,
                           load_msg("baseline.windows=5\nthreshold=6\n", engine=engine))
    try:
        header, data = window(0)
        data[1, 17] = np.nan
        reply = worker.process(header, data, deadline_s=5)
        assert reply["rc"] == -4 and reply["f"] == {}
        assert reply["l"] == [[2, "window holds non-finite samples; skipped"]]
        for seq in range(1, 6):
            worker.process(*window(seq), deadline_s=5)
        events = []
        for seq in range(6, 9):
            events += worker.process(*window(seq, scale=10.0), deadline_s=5)["e"]
        assert len(events) == 1 and events[0][0] == 3   # the baseline is intact: a 10x rise is critical
    finally:
        worker.stop()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("params, reason", [
    ("threshold=1e999999999\n", "a param is not a number"),
    ("threshold=inf\n", "a param is not a number"),
    ("threshold=0\n", "threshold must be positive"),
    ("baseline.windows=1\n", "baseline.windows must be at least 2"),
])
def test_params_the_module_refuses(vibstats_wasm, params, reason, engine):
    with pytest.raises(ModuleFault) as info:
        WorkerProcess("t", vibstats_wasm.read_bytes(), 4096, load_msg(params, engine=engine))
    assert info.value.kind == "params" and info.value.reason == f"module rejected its params: {reason}"


def test_a_service_limit_below_the_budget_caps_the_worker_instead_of_crashing_it(vibstats_wasm, tmp_path):
    """Under a finite hard RLIMIT_DATA (a service's own limit) the worker takes that as its cap."""
    import subprocess
    import sys
    script = f"""
import resource
from appliance.runtime.process import WorkerProcess
from appliance.runtime.wire import HEADER, load_message
resource.setrlimit(resource.RLIMIT_DATA, (1 << 30, 1 << 30))
w = WorkerProcess("t", open({str(vibstats_wasm)!r}, "rb").read(), HEADER.size + 4096,
                  load_message("v.wasm", "", memory_budget_bytes=4 << 30))
print(w.memory_cap_bytes)
w.stop()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == 1 << 30


@pytest.mark.parametrize("engine", ENGINES)
def test_failed_loads_leave_no_descriptor_behind(vibstats_wasm, engine):
    """A module that fails at every load (here: params it refuses) is restarted again and again:
    each attempt must give back its pidfd, socket and memfds."""
    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    def attempt():
        return WorkerProcess("t", vibstats_wasm.read_bytes(), 4096, load_message("vibstats.wasm", "confirm=0\n", backend=engine))
    with pytest.raises(ModuleFault):
        attempt()   # the first one opens what stays open (the zygote's socket, its spare)
    before = open_fds()
    for _ in range(10):
        with pytest.raises(ModuleFault):
            attempt()
    assert open_fds() <= before + 2   # a spare handed over meanwhile holds two


def test_spares_that_keep_dying_end_only_their_own_kind():
    """A zygote whose wasmtime spares all die (a JIT the service forbids) stops asking for those,
    and still asks again for a wasm3 spare that died once."""
    from appliance.runtime.zygote import SPARE_RETRIES, SpareRetries
    retries = SpareRetries()
    delays = [retries.died("wasmtime") for _ in range(SPARE_RETRIES + 2)]
    assert all(d is not None for d in delays[:SPARE_RETRIES]) and delays[SPARE_RETRIES:] == [None, None]
    assert delays[:SPARE_RETRIES] == sorted(delays[:SPARE_RETRIES])   # later and later
    assert not retries.may_ask("wasmtime")
    assert retries.may_ask("wasm3") and retries.died("wasm3") is not None
    retries.used("wasmtime")   # one served a module after all: the kind works
    assert retries.may_ask("wasmtime")


def test_the_next_spare_is_prepared_once_the_module_in_the_one_taken_has_started(vibstats_wasm):
    """The next spare's fork, sandbox and warm-up wait until the module in the spare just taken has
    answered its first window (on 2 cores they took the CPU from that start), or failed to load."""
    import time
    from appliance.runtime.zygote import Zygote
    from support import wait_for
    z = Zygote()
    z.ensure_started()
    try:
        for params, starts in (("", True), ("threshold=0\n", False)):
            wait_for(lambda: "wasm3" in z.spares(), 20, "a spare")
            taken = z.spares()["wasm3"]
            if not starts:
                with pytest.raises(ModuleFault, match="threshold must be positive"):
                    WorkerProcess("t", vibstats_wasm.read_bytes(), 4096, load_msg(params), spawner=z)
            else:
                worker = WorkerProcess("t", vibstats_wasm.read_bytes(), HEADER.size + 4 * 3 * 1024, load_msg(params),
                                       spawner=z)
                assert worker.pid == taken
                # Another module's first window meanwhile (its worker forked on request) asks for none.
                other = WorkerProcess("o", vibstats_wasm.read_bytes(), HEADER.size + 4 * 3 * 1024,
                                      load_message("o.wasm", "", host_nn=True), spawner=z)
                other.process(*window(0), deadline_s=5)
                other.stop()
                time.sleep(0.5)
                assert "wasm3" not in z.spares(), "a spare was prepared while the module was starting"
                worker.process(*window(0), deadline_s=5)
            try:
                wait_for(lambda: z.spares().get("wasm3", taken) != taken, 10, "the next spare")
            finally:
                if starts:
                    worker.stop()
    finally:
        z.stop()


def test_a_spare_owed_by_a_zygote_that_died_is_asked_of_the_next_one(vibstats_wasm):
    """A wasmtime spare was taken, then the zygote died: the next wasmtime start (a new zygote, no
    spare of that kind) asks the new zygote for one, not the dead one's socket."""
    import signal as signals
    from appliance.runtime.zygote import Zygote
    from support import wait_for
    z = Zygote()
    z.ensure_started()
    workers = []

    def start():
        workers.append(WorkerProcess("t", vibstats_wasm.read_bytes(), HEADER.size + 4 * 3 * 1024,
                                     load_msg(engine="wasmtime"), spawner=z))
    try:
        start()                                       # forked on request; asks for a wasmtime spare
        wait_for(lambda: "wasmtime" in z.spares(), 20, "a wasmtime spare")
        start()                                       # takes it: the next is owed to this zygote
        first = z.pid
        os.kill(first, signals.SIGKILL)
        wait_for(lambda: not z.spares(), 10, "the dead zygote's spares dropped")
        start()                                       # a new zygote; no wasmtime spare in it yet
        assert z.pid != first
        wait_for(lambda: "wasmtime" in z.spares(), 20, "a wasmtime spare from the new zygote")
    finally:
        for worker in workers:
            worker.stop()
        z.stop()


def test_a_supervisor_holding_descriptors_past_1023_starts_feeds_and_stops_workers(vibstats_wasm):
    """select() refuses descriptors past 1023 (FD_SETSIZE): make bench's real-time trial with 256
    accelerometers died of it in WorkerProcess. A process holding 1,100 open files runs one."""
    import subprocess
    import sys
    script = f"""
import os, resource
import numpy as np
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
assert hard >= 1200, f"RLIMIT_NOFILE hard limit {{hard}}: no descriptor past 1023 can be had here"
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
from appliance.runtime.process import WorkerProcess
from appliance.runtime.wire import HEADER, load_message, pack_header
w = WorkerProcess("t", open({str(vibstats_wasm)!r}, "rb").read(), HEADER.size + 4 * 3 * 1024,
                  load_message("v.wasm", ""))
reply = w.process(pack_header(3, 1024, 12800.0, 0), np.zeros((3, 1024), np.float32), 5.0)
w.stop()
print(reply["rc"], len(reply["f"]), w.alive())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    rc, features, alive = out.stdout.split()
    assert rc == "0" and int(features) > 0 and alive == "False"


def test_a_module_file_beyond_the_limit_or_not_a_file_is_refused(tmp_path):
    from appliance.runtime.validate import MAX_MODULE_BYTES, ModuleRejected, read_module
    big = tmp_path / "big.wasm"
    with open(big, "wb") as f:
        f.truncate(MAX_MODULE_BYTES + 1)   # sparse: costs no disk
    with pytest.raises(ModuleRejected, match="larger than 16 MiB"):
        read_module(big)
    exact = tmp_path / "exact.wasm"
    with open(exact, "wb") as f:
        f.truncate(MAX_MODULE_BYTES)
    assert len(read_module(exact)) == MAX_MODULE_BYTES
    with pytest.raises(ModuleRejected, match="not a regular file"):
        read_module(Path("/dev/zero"))


SMALL_MODULE = r"""
#define AP_WINDOW_BYTES 1024
#include "ap_module.h"
int32_t ap_init(const char *p, int32_t n) { (void)p; (void)n; return 0; }
int32_t ap_process(const uint8_t *w, int32_t len) { (void)w; (void)len; ap_feature("x", 1); return 0; }
"""


@pytest.mark.parametrize("engine", ["wasm3", "wasmtime"])
def test_a_workers_linear_memory_is_resident_only_where_the_module_touches_it(tmp_path_factory, engine):
    """The linear memory is mapped fresh in the worker, not carved out of the heap it keeps for
    the host kernels (there calloc zeroed every page of vibstats' 1 MiB: ~0.4 ms and the whole
    memory resident at each start, measured). 1 MiB declared against 128 KiB, a few pages used."""
    from support import build_inline_module
    rss = {}
    for memory_kb in (128, 1024):
        wasm = build_inline_module(tmp_path_factory, f"m{memory_kb}", SMALL_MODULE, memory_kb)
        worker = WorkerProcess("roomy", wasm, HEADER.size + 64, load_message("m.wasm", "", backend=engine,
                                                                             max_memory_bytes=64 << 20))
        try:
            worker.process(pack_header(1, 4, 100.0, 0), np.zeros((1, 4), np.float32), 5.0)
            status = Path(f"/proc/{worker.pid}/status").read_text()
            rss[memory_kb] = int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1))
        finally:
            worker.stop()
    assert rss[1024] - rss[128] < 512, rss
