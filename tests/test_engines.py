"""The two engines (docs/engines.md): every shipped module gives the same features and events on
wasm3 and wasmtime, every hostile module the same fault kind; wasmtime's own parts: a deadline
ends the call and the worker lives on (same pid), fuel, compiled artifacts cached and rebuilt
when damaged, the SIMD build beside a module, and the sandbox's JIT exception."""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from appliance.config.schema import ConfigError
from appliance.core.supervisor import Supervisor
from appliance.runtime.artifacts import ArtifactCache
from appliance.runtime.modcheck import load_for, module_file
from appliance.runtime.process import ModuleFault, WorkerProcess
from appliance.runtime.validate import read_module
from appliance.runtime.wire import HEADER, load_message, pack_header
from appliance_tools.modbuild import bind_simd, build_module

from conftest import REPO
from hostile_modules.hostile import build_hostile
from support import FAST_RESTART, metric, sim_source, wait_for, write_config
from test_motion_module import crossing, scene

ENGINES = ("wasm3", "wasmtime")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> dict[str, tuple[bytes, bytes]]:
    """Each shipped module's build and its SIMD build (what `make modules` writes)."""
    out = tmp_path_factory.mktemp("shipped")
    built = {}
    for name in ("vibstats", "bearing", "motion", "process"):
        pair = []
        for simd in (False, True):
            result = build_module(REPO / "modules" / "src" / name, out / f"{name}{'.simd' if simd else ''}.wasm",
                                  simd=simd)
            assert result.ok, result.problems
            pair.append(result.out.read_bytes())
        built[name] = tuple(pair)
    return built


def vibration(seq: int, fault: bool = False, channels: int = 3, frames: int = 4096, rate: float = 12800.0):
    """Shaft harmonics and noise; with `fault`, bursts at a bearing's outer-race rate and a bigger level."""
    rng = np.random.default_rng(seq)
    t = (np.arange(frames) + seq * frames) / rate
    x = 0.05 * np.sin(2 * np.pi * 30 * t) + 0.01 * rng.standard_normal((channels, frames))
    if fault:
        x += 0.5 * (np.sin(2 * np.pi * 107.3 * t) > 0.99) * np.sin(2 * np.pi * 3000 * t)
    return pack_header(channels, frames, rate, seq), x.astype(np.float32)


def frames_of(n: int = 60, w: int = 320, h: int = 240):
    for i, img in enumerate(scene(n, objects=crossing)):
        yield pack_header(1, w * h, 10.0, i, start_ns=int(i * 1e8), sample_format=2, width=w, height=h), img.reshape(-1)


def process_signal(seq: int, frames: int = 64):
    x = np.full((1, frames), 5.0, np.float32)
    if seq >= 6:
        x[0, frames // 2:] = 50.0   # out of range
    return pack_header(1, frames, 10.0, seq, start_ns=int(seq * frames * 1e8)), x


def cwru_windows():
    """The healthy CWRU recording (12 kHz), then the outer-race one: a baseline, then events with a
    diagnosis (tests/test_bearing_module.py reads the same files)."""
    from test_bearing_module import FS, cwru, healthy_12k, windows
    healthy, fault = windows(healthy_12k())[:8], windows(cwru("outer_race_007_at6_0hp_12k.mat"))[:6]
    return [(pack_header(1, len(w), FS, seq), w[None].astype(np.float32)) for seq, w in enumerate(healthy + fault)]


CASES = {
    # module: (params, windows, shared-buffer bytes)
    "vibstats": ("baseline.windows=4\nthreshold=6\n",
                 lambda: [vibration(i, fault=i >= 8) for i in range(12)], HEADER.size + 3 * 4 * 4096),
    "bearing": ("bearing.balls=9\nbearing.ball_diameter=0.3126\nbearing.pitch_diameter=1.537\n"
                "bearing.contact_angle_deg=0\nshaft.rpm_min=1700\nshaft.rpm_max=1850\nbaseline.windows=8\n"
                "threshold=4\n", lambda: cwru_windows(), HEADER.size + 4 * 4096),
    "motion": ("", lambda: list(frames_of()), HEADER.size + 320 * 240),
    "process": ("signal.0.name=temp\nsignal.0.min=0\nsignal.0.max=10\n", lambda: [process_signal(i) for i in range(10)],
                HEADER.size + 4 * 64),
}


def run(wasm: bytes, engine: str, params: str, windows, shm: int, deadline_s: float = 10.0,
        simd: bool = False) -> list[dict]:
    worker = WorkerProcess("parity", wasm, shm, load_message("m.wasm", params, backend=engine, simd=simd))
    try:
        return [worker.process(header, data, deadline_s) for header, data in windows]
    finally:
        worker.stop()


# Host kernels on (host.dsp=1) and off (the module's own C code); process uses none.
@pytest.mark.parametrize("module, host_dsp", [(m, d) for m in sorted(CASES) for d in (0, 1)
                                              if not (m == "process" and d)])
def test_shipped_modules_agree_on_both_engines(shipped, module, host_dsp):
    params, windows, shm = CASES[module]
    text = params + f"host.dsp={host_dsp}\n"
    data = windows()
    plain, simd = shipped[module]
    a = run(plain, "wasm3", text, data, shm)
    events = sum(len(x["e"]) for x in a)
    assert events > 0, f"{module}: the data raised no event, so events were not compared"
    for b in (run(plain, "wasmtime", text, data, shm), run(simd, "wasmtime", text, data, shm, simd=True)):
        assert_same(module, a, b)


def test_vibstats_statistics_are_the_sums_left_to_right_bit_for_bit(shipped):
    """vibstats adds its samples in runs of eight (for wasmtime's register allocation), one after
    another as before: rms, peak and kurtosis equal a left-to-right float64 reference exactly, on
    both engines and both builds, with a window length that leaves a remainder (1,003 frames)."""
    frames = 1003
    windows = [vibration(seq, frames=frames) for seq in range(2)]
    plain, simd = shipped["vibstats"]
    params = "baseline.windows=4\nthreshold=6\nhost.dsp=0\n"
    shm = HEADER.size + 3 * 4 * frames
    replies = [run(plain, "wasm3", params, windows, shm), run(plain, "wasmtime", params, windows, shm),
               run(simd, "wasmtime", params, windows, shm, simd=True)]
    for seq, (_, x) in enumerate(windows):
        for c, samples in enumerate(x.astype(np.float64)):
            mean = np.cumsum(samples)[-1] / frames          # cumsum: strictly left to right
            d = samples - mean
            m2, m4 = np.cumsum(d * d)[-1] / frames, np.cumsum((d * d) * (d * d))[-1] / frames
            want = {"rms": np.sqrt(m2), "peak": np.abs(d).max(), "kurtosis": m4 / (m2 * m2)}
            for engine, reply in zip(("wasm3", "wasmtime", "wasmtime SIMD"), replies):
                got = {k: reply[seq]["f"][f"ch{c}.{k}"] for k in want}
                assert got == {k: float(v) for k, v in want.items()}, (engine, seq, c)


def assert_same(module: str, a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for seq, (x, y) in enumerate(zip(a, b)):
        assert x["rc"] == y["rc"], seq
        assert list(x["f"]) == list(y["f"]), seq
        np.testing.assert_allclose(list(y["f"].values()), list(x["f"].values()), rtol=1e-6, atol=1e-9,
                                   err_msg=f"{module} window {seq}")
        assert [(s, m) for s, _, m in x["e"]] == [(s, m) for s, _, m in y["e"]], seq
        np.testing.assert_allclose([sc for _, sc, _ in y["e"]], [sc for _, sc, _ in x["e"]], rtol=1e-6)


# What each hostile module is counted as, per engine. wasm3 segfaults on deep recursion and deep
# nesting (tests/hostile_modules/README.md); wasmtime traps cleanly on the first and compiles the second.
HOSTILE = {
    "trap": ({"trap"}, {"trap"}),
    "badptr": ({"abi"}, {"abi"}),
    "loop": ({"deadline"}, {"deadline"}),
    "invalid": ({"load"}, {"load"}),
    "memhog": ({"load"}, {"load"}),
    "crash": ({"crash", "trap"}, {"trap"}),
    "crash_compile": ({"crash", "deadline", "engine"}, {"crash", "deadline", "trap", "load"}),
}


@pytest.mark.parametrize("hostile", sorted(HOSTILE))
def test_hostile_modules_fault_alike_on_both_engines(tmp_path, hostile):
    wasm = build_hostile(hostile, tmp_path).read_bytes()
    kinds = {}
    for engine, expected in zip(ENGINES, HOSTILE[hostile]):
        try:
            worker = WorkerProcess(hostile, wasm, HEADER.size + 3 * 4 * 1024, load_message("h.wasm", "", backend=engine,
                                                                                        deadline_s=0.3))
            try:
                worker.process(*vibration(0, frames=1024), deadline_s=0.3)
                kinds[engine] = "none"
            finally:
                worker.stop()
        except ModuleFault as fault:
            kinds[engine] = fault.kind
        assert kinds[engine] in expected, (engine, kinds)
    if hostile not in ("crash", "crash_compile"):
        assert kinds["wasm3"] == kinds["wasmtime"]


def test_trap_kinds_alike(tmp_path):
    wasm = build_hostile("trap", tmp_path).read_bytes()
    for mode, text in (("oob", "out of bounds"), ("unreachable", "unreachable"), ("divzero", "divide by zero")):
        for engine in ENGINES:
            worker = WorkerProcess("trap", wasm, HEADER.size + 3 * 4 * 1024,
                                   load_message("t.wasm", f"mode={mode}\n", backend=engine))
            with pytest.raises(ModuleFault) as info:
                worker.process(*vibration(0, frames=1024), deadline_s=5)
            worker.kill()
            assert info.value.kind == "trap" and text in info.value.reason.lower(), (engine, info.value.reason)


def test_an_endless_loop_on_wasmtime_is_stopped_at_its_deadline_and_the_worker_lives(tmp_path):
    wasm = build_hostile("loop", tmp_path).read_bytes()
    worker = WorkerProcess("loop", wasm, HEADER.size + 3 * 4 * 1024,
                           load_message("loop.wasm", "after=1\n", backend="wasmtime", deadline_s=0.2))
    try:
        pid = worker.pid
        assert worker.process(*vibration(0, frames=1024), deadline_s=0.2)["f"] == {"windows": 1.0}
        for round_ in range(3):
            t0 = time.monotonic()
            with pytest.raises(ModuleFault) as info:
                worker.process(*vibration(1, frames=1024), deadline_s=0.2)
            took = time.monotonic() - t0
            assert info.value.kind == "deadline" and info.value.alive, info.value.reason
            assert "epoch" in info.value.reason
            assert 0.19 < took < 0.35, took   # at the deadline, not at the supervisor's SIGKILL backstop
            assert worker.alive() and worker.pid == pid
            # A fresh instance (its `after` counts again from zero) serves the next window.
            assert worker.process(*vibration(2, frames=1024), deadline_s=0.2)["f"] == {"windows": 1.0}
    finally:
        worker.stop()


def test_after_a_deadline_a_refused_state_is_not_left_in_the_fresh_instance(tmp_path, caplog):
    """The fresh instance gets the last state the module saved; when the module refuses it (here:
    a blob saved before it learned), it starts over clean, as at load, and says so."""
    wasm = build_hostile("stateful", tmp_path).read_bytes()
    worker = WorkerProcess("stateful", wasm, HEADER.size + 3 * 4 * 1024,
                           load_message("stateful.wasm", "learn=100\nevery=1\nloop_at=3\n", backend="wasmtime",
                                        deadline_s=0.2))
    try:
        for seq in (0, 1):
            assert worker.process(*vibration(seq, frames=1024), deadline_s=0.2)["f"]["windows"] == seq + 1
        with caplog.at_level(logging.WARNING, logger="appliance.module"), pytest.raises(ModuleFault) as info:
            worker.process(*vibration(2, frames=1024), deadline_s=0.2)
        assert info.value.kind == "deadline" and info.value.alive
        assert "state after the deadline refused by the module" in caplog.text
        # Counting from zero again: not from the refused blob's 2 windows.
        assert worker.process(*vibration(3, frames=1024), deadline_s=0.2)["f"]["windows"] == 1
    finally:
        worker.stop()


def test_the_supervisor_counts_a_survived_deadline_and_keeps_the_worker(tmp_path, vibstats_wasm):
    loop = build_hostile("loop", tmp_path / "hostile")
    cfg = write_config(tmp_path, {"spindle": sim_source()}, {
        "healthy": {"wasm": str(vibstats_wasm), "source": "spindle", "window": {"size": 1024}, "queue": 256,
                    "engine": "wasmtime"},
        "bad": {"wasm": str(loop), "source": "spindle", "window": {"size": 1024}, "deadline_ms": 100,
                "engine": "wasmtime", "params": {"after": 2}, "queue": 64,
                "restart": {**FAST_RESTART, "max_faults": 100}},
    })
    sup = Supervisor(cfg)
    sup.start()
    try:
        wait_for(lambda: sup.modules["bad"].worker_pid is not None, 30, "the looping module's worker")
        pid = sup.modules["bad"].worker_pid
        wait_for(lambda: metric(sup, "appliance_module_faults_total", module="bad", kind="deadline") >= 3, 30,
                 "three deadlines")
        assert sup.modules["bad"].worker_pid == pid
        assert sup.modules["bad"].state.value == "running"
        assert metric(sup, "appliance_module_restarts_total", module="bad") == 0
        assert sup.modules["bad"].processed >= 4   # two windows served after each fresh instance
        assert sup.modules["healthy"].state.value == "running"
    finally:
        sup.stop(drain_s=5.0)


def test_fuel_stops_a_loop_like_a_deadline(tmp_path):
    wasm = build_hostile("loop", tmp_path).read_bytes()
    worker = WorkerProcess("loop", wasm, HEADER.size + 3 * 4 * 1024,
                           load_message("loop.wasm", "", backend="wasmtime", deadline_s=10.0, fuel=1_000_000))
    try:
        t0 = time.monotonic()
        with pytest.raises(ModuleFault) as info:
            worker.process(*vibration(0, frames=1024), deadline_s=10.0)
        assert info.value.kind == "deadline" and "fuel" in info.value.reason and info.value.alive
        assert time.monotonic() - t0 < 2.0
    finally:
        worker.stop()


# ---- compiled artifacts ---------------------------------------------------------------------------


def start(wasm: bytes, cache: ArtifactCache) -> WorkerProcess:
    worker = WorkerProcess("v", wasm, HEADER.size + 3 * 4 * 1024, load_message("v.wasm", "", backend="wasmtime"),
                           artifact_cache=cache)
    assert worker.process(*vibration(0, frames=1024), deadline_s=5)["rc"] == 0
    worker.stop()
    return worker


def test_a_restart_loads_the_cached_artifact(tmp_path, vibstats_wasm):
    cache = ArtifactCache(tmp_path / "cache")
    wasm = vibstats_wasm.read_bytes()
    assert start(wasm, cache).artifact_note == "compiled"
    entries = list((tmp_path / "cache").glob("*.cwasm"))
    assert len(entries) == 1 and ArtifactCache(tmp_path / "cache").get(entries[0].stem)
    assert start(wasm, cache).artifact_note == "cached"
    # Another module (one byte more: a custom section) has its own entry.
    start(wasm + bytes([0, 2, 1, ord("x")]), cache)
    assert len(list((tmp_path / "cache").glob("*.cwasm"))) == 2


@pytest.mark.parametrize("damage", ["truncated", "flipped", "garbage"])
def test_a_damaged_cache_entry_is_discarded_and_rebuilt(tmp_path, vibstats_wasm, damage, caplog):
    cache = ArtifactCache(tmp_path / "cache")
    wasm = vibstats_wasm.read_bytes()
    start(wasm, cache)
    (entry,) = (tmp_path / "cache").glob("*.cwasm")
    good = entry.read_bytes()
    bad = {"truncated": good[:len(good) // 2], "flipped": good[:-100] + bytes([good[-100] ^ 1]) + good[-99:],
           "garbage": b"\0" * 4096}[damage]
    entry.write_bytes(bad)
    assert start(wasm, cache).artifact_note == "compiled"
    assert "damaged" in caplog.text
    assert entry.read_bytes() == good   # rebuilt (compilation is deterministic)
    assert start(wasm, cache).artifact_note == "cached"


def test_an_artifact_wasmtime_refuses_is_compiled_again_and_replaced(tmp_path, vibstats_wasm, caplog):
    """A well-formed entry that wasmtime will not load (here: compiled with other settings, as a
    different wasmtime version's would be) costs a compile, and is replaced."""
    cache = ArtifactCache(tmp_path / "cache")
    wasm = vibstats_wasm.read_bytes()
    start(wasm, cache)
    (entry,) = (tmp_path / "cache").glob("*.cwasm")
    key = entry.stem
    worker = WorkerProcess("v", wasm, HEADER.size + 3 * 4 * 1024,
                           load_message("v.wasm", "", backend="wasmtime", fuel=10 ** 9), artifact_cache=cache)
    worker.stop()
    other = [p for p in (tmp_path / "cache").glob("*.cwasm") if p.stem != key]
    assert len(other) == 1   # the fuel build's own entry
    cache.put(key, cache.get(other[0].stem))   # the wrong build under the plain key: checksum fine
    worker = start(wasm, cache)
    assert worker.artifact_note == "compiled (cache entry refused)"
    assert "cached artifact refused" in caplog.text
    assert start(wasm, cache).artifact_note == "cached"


def test_pruning_keeps_the_entries_in_use(tmp_path, monkeypatch):
    """Least recently used go first: an entry a restart just loaded outlives newer ones nobody uses."""
    import appliance.runtime.artifacts as artifacts
    monkeypatch.setattr(artifacts, "KEPT", 2)
    cache = ArtifactCache(tmp_path / "cache")
    for n, key in enumerate(("used", "idle")):
        cache.put(key, key.encode() * 10)
        os.utime(cache.path(key), (1_000_000 + n, 1_000_000 + n))   # "used" is the older of the two
    assert cache.get("used") == b"used" * 10
    cache.put("new", b"new")
    assert sorted(p.stem for p in (tmp_path / "cache").glob("*.cwasm")) == ["new", "used"]


def test_only_a_sealed_artifact_of_a_sane_length_is_taken_from_a_worker():
    """The artifact memfd is the worker's to write: the supervisor takes its bytes only once the
    worker sealed it (before any guest code ran), and only of a length that fits."""
    from appliance.runtime.process import sealed_memfd, take_artifact
    from appliance.runtime.wire import ARTIFACT_SEALS, MAX_ARTIFACT_BYTES
    body = b"compiled code" * 100
    fd = sealed_memfd("art", body, 0, 0)   # as the supervisor hands it over: writable, unsealed
    try:
        data, why = take_artifact(fd, len(body))
        assert data is None and "did not seal" in why   # a module could still be writing it
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, ARTIFACT_SEALS)
        assert take_artifact(fd, len(body)) == (body, "")
        assert take_artifact(fd, 10) == (body[:10], "")
        for length in (-1, 0, len(body) + 1, MAX_ARTIFACT_BYTES + 1, True, "12", 1.5, None):
            data, why = take_artifact(fd, length)
            assert data is None and why, length
    finally:
        os.close(fd)


def test_a_worker_seals_the_artifact_it_hands_over(tmp_path, vibstats_wasm, monkeypatch):
    from appliance.runtime import process
    seen = []
    real = process.take_artifact

    def spy(fd, length):
        seen.append(fcntl.fcntl(fd, fcntl.F_GET_SEALS))
        return real(fd, length)
    monkeypatch.setattr(process, "take_artifact", spy)
    assert start(vibstats_wasm.read_bytes(), ArtifactCache(tmp_path / "cache")).artifact_note == "compiled"
    from appliance.runtime.wire import ARTIFACT_SEALS
    assert seen and seen[0] & ARTIFACT_SEALS == ARTIFACT_SEALS
    assert len(list((tmp_path / "cache").glob("*.cwasm"))) == 1


@pytest.mark.parametrize("what", ["entry", "directory", "symlink"])
def test_a_cache_entry_others_could_have_written_is_refused(tmp_path, vibstats_wasm, what, caplog):
    """The checksum tells damage, not forgery: an entry someone else could have written (its mode,
    its directory's, a symlink) is never handed to a worker."""
    cache = ArtifactCache(tmp_path / "cache")
    wasm = vibstats_wasm.read_bytes()
    start(wasm, cache)
    (entry,) = (tmp_path / "cache").glob("*.cwasm")
    assert entry.stat().st_mode & 0o777 == 0o600 and (tmp_path / "cache").stat().st_mode & 0o777 == 0o700
    if what == "entry":
        entry.chmod(0o666)
    elif what == "directory":
        (tmp_path / "cache").chmod(0o777)
    else:
        target = tmp_path / "elsewhere.cwasm"
        target.write_bytes(entry.read_bytes())
        entry.unlink()
        entry.symlink_to(target)
    assert cache.get(entry.stem) == b""
    assert "wasmtime cache" in caplog.text
    assert start(wasm, cache).artifact_note == "compiled"
    if what == "directory":   # nothing is kept in a directory others may write
        assert not entry.exists()
        (tmp_path / "cache").chmod(0o700)
    assert start(wasm, cache).artifact_note == ("compiled" if what == "directory" else "cached")


# ---- the SIMD build beside a module --------------------------------------------------------------

SIMD_MODULE = r"""
#define AP_WINDOW_BYTES (64 + 4 * 4 * 1024)
#include "ap_module.h"
#ifdef __wasm_simd128__
#include <wasm_simd128.h>
#endif

int32_t ap_init(const char *params, int32_t len) { (void)params; (void)len; return 0; }

int32_t ap_process(const uint8_t *window, int32_t len) {
    const ap_window_header *h = ap_window_open(window, len);
    if (!h) return -1;
    const float *x = ap_window_channel(h, 0);
    int32_t n = (int32_t)h->frames & ~3;
    float sum = 0;
#ifdef __wasm_simd128__
    v128_t acc = wasm_f32x4_splat(0.0f);
    for (int32_t i = 0; i < n; i += 4) acc = wasm_f32x4_add(acc, wasm_v128_load(x + i));
    sum = wasm_f32x4_extract_lane(acc, 0) + wasm_f32x4_extract_lane(acc, 1)
        + wasm_f32x4_extract_lane(acc, 2) + wasm_f32x4_extract_lane(acc, 3);
    ap_feature("simd", 1);
#else
    float lanes[4] = {0, 0, 0, 0};
    for (int32_t i = 0; i < n; i += 4) for (int j = 0; j < 4; j++) lanes[j] += x[i + j];
    sum = lanes[0] + lanes[1] + lanes[2] + lanes[3];
    ap_feature("simd", 0);
#endif
    ap_feature("sum", sum);
    return 0;
}
"""


@pytest.fixture(scope="module")
def simd_pair(tmp_path_factory) -> Path:
    """sumx.wasm (MVP, as `make modules` builds) and sumx.simd.wasm (the same source with SIMD128)."""
    src = tmp_path_factory.mktemp("sumx_src")
    (src / "sumx.c").write_text(SIMD_MODULE)
    (src / "module.yaml").write_text("name: sumx\nversion: 0.0.1\ndescription: SIMD test\nmemory_kb: 256\n"
                                     "stack_kb: 32\n")
    out = tmp_path_factory.mktemp("sumx")
    for name, simd in (("sumx.wasm", False), ("sumx.simd.wasm", True)):   # as `make modules` builds them
        result = build_module(src, out / name, simd=simd)
        assert result.ok, result.problems
    assert b"\xfd" in (out / "sumx.simd.wasm").read_bytes()   # SIMD opcodes are there
    bind_simd(out / "sumx.simd.wasm", (out / "sumx.wasm").read_bytes())
    return out / "sumx.wasm"


def simd_config(tmp_path: Path, wasm: Path, **module):
    return write_config(tmp_path, {"s": sim_source()},
                        {"m": {"wasm": str(wasm), "source": "s", "window": {"size": 1024}, **module}})


@pytest.mark.parametrize("module, expect", [
    ({"engine": "wasmtime"}, "sumx.simd.wasm"),
    ({"engine": "wasmtime", "simd": False}, "sumx.wasm"),
    ({"engine": "wasm3"}, "sumx.wasm"),
    ({}, "sumx.wasm"),
])
def test_the_simd_build_runs_on_wasmtime_only(tmp_path, simd_pair, module, expect):
    cfg = simd_config(tmp_path, simd_pair, **module)
    mod, rt = cfg.modules["m"], cfg.runtime
    assert module_file(mod, rt).name == expect
    worker = WorkerProcess("m", read_module(module_file(mod, rt)), HEADER.size + 4 * 1024, load_for(mod, rt))
    try:
        x = np.random.default_rng(3).standard_normal((1, 1024)).astype(np.float32)
        reply = worker.process(pack_header(1, 1024, 1000.0, 0), x, 5.0)
    finally:
        worker.stop()
    assert reply["f"]["simd"] == (1.0 if expect.endswith(".simd.wasm") else 0.0)
    acc = np.zeros(4, np.float32)
    for row in x[0].reshape(-1, 4):   # four lanes, in order: both builds sum this way
        acc = acc + row
    expected = np.float32(np.float32(acc[0] + acc[1]) + acc[2]) + acc[3]
    assert reply["f"]["sum"] == float(expected)


@pytest.mark.parametrize("sibling", ["stale", "foreign", "unbound"])
def test_a_simd_build_of_another_plain_build_is_not_run(tmp_path, simd_pair, sibling, caplog):
    """X.simd.wasm runs only when it names the X.wasm beside it: not one left from an earlier
    build of X, not another module's, not one that names nothing."""
    d = tmp_path / "mods"
    d.mkdir()
    plain = simd_pair.read_bytes()
    simd = simd_pair.with_name("sumx.simd.wasm").read_bytes()
    if sibling == "stale":   # X.wasm rebuilt (here: one custom section more), X.simd.wasm not
        plain = plain + bytes([0, 2, 1, ord("x")])
    elif sibling == "foreign":   # another module's SIMD build, bound to that module
        other = tmp_path / "other.simd.wasm"
        other.write_bytes(simd[:simd.rindex(b"ap.simd_of") - 3])
        bind_simd(other, plain + b"\0")
        simd = other.read_bytes()
    else:   # built by hand, never bound
        simd = simd[:simd.rindex(b"ap.simd_of") - 3]
    (d / "sumx.wasm").write_bytes(plain)
    (d / "sumx.simd.wasm").write_bytes(simd)
    cfg = simd_config(tmp_path, d / "sumx.wasm", engine="wasmtime")
    mod, rt = cfg.modules["m"], cfg.runtime
    assert module_file(mod, rt) == d / "sumx.wasm"
    assert "is not the SIMD build of" in caplog.text
    assert ("names no plain build" in caplog.text) == (sibling == "unbound")
    assert load_for(mod, rt)["simd"] is False and load_for(mod, rt)["label"] == "sumx.wasm"


def test_wasm3_refuses_a_simd_build(simd_pair):
    simd = simd_pair.with_name("sumx.simd.wasm").read_bytes()
    with pytest.raises(ModuleFault) as info:
        WorkerProcess("m", simd, HEADER.size + 4 * 1024, load_message("sumx.simd.wasm", "", backend="wasm3"))
    assert info.value.kind == "load" and "wasm-validate" in info.value.reason and "simd" in info.value.reason.lower()


# ---- config ---------------------------------------------------------------------------------------


def test_engine_options_are_checked_with_file_and_line(tmp_path, vibstats_wasm):
    with pytest.raises(ConfigError) as info:
        simd_config(tmp_path, vibstats_wasm, fuel=1000)
    text = str(info.value)
    assert "appliance.yaml:" in text and "modules.m.fuel" in text and "engine: wasmtime" in text
    with pytest.raises(ConfigError) as info:
        simd_config(tmp_path, vibstats_wasm, engine="wasmer")
    assert "modules.m.engine" in str(info.value)
    cfg = simd_config(tmp_path, vibstats_wasm, engine="wasmtime", fuel=1000)
    assert load_for(cfg.modules["m"], cfg.runtime)["fuel"] == 1000
    cfg = write_config(tmp_path, {"s": sim_source()},
                       {"m": {"wasm": str(vibstats_wasm), "source": "s", "window": {"size": 1024}}},
                       runtime={"backend": "wasmtime"})
    assert load_for(cfg.modules["m"], cfg.runtime)["backend"] == "wasmtime"
    # fuel where the engine comes from runtime.backend: wasmtime counts it; on wasm3, the error names that line.
    cfg = write_config(tmp_path, {"s": sim_source()},
                       {"m": {"wasm": str(vibstats_wasm), "source": "s", "window": {"size": 1024}, "fuel": 1000}},
                       runtime={"backend": "wasmtime"})
    assert load_for(cfg.modules["m"], cfg.runtime)["fuel"] == 1000
    with pytest.raises(ConfigError) as info:
        write_config(tmp_path, {"s": sim_source()},
                     {"m": {"wasm": str(vibstats_wasm), "source": "s", "window": {"size": 1024}, "fuel": 1000}},
                     runtime={"backend": "wasm3"})
    assert "modules.m.fuel" in str(info.value) and "runtime.backend: wasm3" in str(info.value)


# ---- the sandbox's JIT exception --------------------------------------------------------------------

PROBE = r"""
import ctypes, mmap, os, sys
from appliance.runtime.sandbox import seccomp
libc = ctypes.CDLL(None, use_errno=True)
seccomp.preload()
assert libc.prctl(38, 1, 0, 0, 0) == 0   # no_new_privs
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
fd = os.memfd_create("code")   # before the filter: a memfd the worker holds, writable
os.ftruncate(fd, 4096)
seccomp.install(jit=sys.argv[1] == "jit")
prot = {"rx": mmap.PROT_READ | mmap.PROT_EXEC, "rwx": mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC,
        "rw": mmap.PROT_READ | mmap.PROT_WRITE, "rx-file": mmap.PROT_READ | mmap.PROT_EXEC,
        "rw-file": mmap.PROT_READ | mmap.PROT_WRITE}[sys.argv[2]]
if sys.argv[2].endswith("-file"):
    p = libc.mmap(None, 4096, prot, mmap.MAP_SHARED, fd, 0)
else:
    p = libc.mmap(None, 4096, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
sys.exit(0 if p not in (None, ctypes.c_void_p(-1).value) else 3)
"""


@pytest.mark.parametrize("policy, prot, allowed", [
    ("strict", "rw", True), ("strict", "rx", False), ("strict", "rwx", False),
    ("jit", "rw", True), ("jit", "rx", True), ("jit", "rwx", False),
    ("jit", "rw-file", True), ("jit", "rx-file", False),   # code in anonymous memory only
])
def test_the_jit_may_map_code_but_never_writable_code(policy, prot, allowed):
    proc = subprocess.run([sys.executable, "-c", PROBE, policy, prot], cwd=REPO, capture_output=True, timeout=60)
    if allowed:
        assert proc.returncode == 0, proc.stderr.decode()
    else:
        assert proc.returncode == -signal.SIGSYS, (proc.returncode, proc.stderr.decode())


def test_the_zygote_stays_single_threaded_with_wasmtime_imported():
    code = ("from appliance.runtime import zygote; import os, threading; zygote.preload(); import wasmtime; "
            "print(threading.active_count(), len(os.listdir('/proc/self/task')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["1", "1"], out.stderr


# ---- the compiled models --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from appliance_tools.evaluation import nn as evaluation_nn
    return evaluation_nn.build(tmp_path_factory.mktemp("nn-models"), native=False)


def model_inputs(name: str):
    rng = np.random.default_rng(7)
    if name.startswith("people"):   # 96x96 gray frames, one a window
        return [(pack_header(1, 96 * 96, 10.0, i, start_ns=int(i * 1e8), sample_format=2, width=96, height=96),
                 rng.integers(0, 256, (1, 96 * 96), dtype=np.uint8)) for i in range(6)], HEADER.size + 96 * 96
    return [(pack_header(1, 1024, 12000.0, i), (0.1 * rng.standard_normal((1, 1024))).astype(np.float32))
            for i in range(6)], HEADER.size + 4 * 1024


@pytest.mark.parametrize("name", ["bearing_cnn", "bearing_cnn_int8", "people_cnn", "people_cnn_int8"])
def test_compiled_models_agree_on_both_engines(models, name):
    windows, shm = model_inputs(name)
    wasm = models[name].read_bytes()
    a = run(wasm, "wasm3", "", windows, shm)
    b = run(wasm, "wasmtime", "", windows, shm)
    assert all(x["rc"] == 0 for x in a), a[0]
    assert a[0]["f"], "the model emitted no features"
    assert_same(name, a, b)
