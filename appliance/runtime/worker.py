"""A module worker: hosts exactly one wasm module instance.

The zygote (zygote.py) forks it with three file descriptors: a SOCK_SEQPACKET socket to the
supervisor, a memfd holding the window buffer (shared memory, sealed against resizing), and a
sealed memfd holding the module bytes. run_forked() caps its memory, enters the sandbox
(sandbox/), and only then reads the module and the load message.

The protocol: appliance/runtime/wire.py.

Everything it uses was imported by the zygote before the fork: inside the sandbox nothing can
be opened from the file system.
"""
from __future__ import annotations

import base64
import ctypes
import fcntl
import json
import mmap
import os
import resource
import socket
import struct
import time

from appliance.core import malloc
from appliance.runtime import sandbox
from appliance.runtime.engines import BACKENDS, EngineLoadError, EngineTrap, WasmtimeBackend
from appliance.runtime.hostcalls.abi import MAX_LOG_BYTES, MAX_LOGS_PER_CALL, MAX_STATE_BYTES, AbiViolation
from appliance.runtime.hostcalls import abi
from appliance.runtime.hostcalls.core import Calls, CoreCalls
from appliance.runtime.hostcalls.dsp import KEEP_MMAP_THRESHOLD, KEEP_TRIM_THRESHOLD, HostDsp
from appliance.runtime.hostcalls.image import HostImage
from appliance.runtime.validate import ModuleRejected, check_module
from appliance.runtime.wire import ARTIFACT_SEALS, REPLY, SANDBOX_VIOLATION, SOCKET_BUFFER

LINEAR_MEMORY_MAPPED_FROM = 256 << 10   # memories this large (most are 1 MiB or more) are mapped fresh

SANDBOX_EXIT = 159   # the worker's exit status after a system call outside its allow-list
_SIGNAL_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


def private_memory_bytes() -> int:
    """VmData: the private writable memory the kernel charges against RLIMIT_DATA (heap, anonymous
    mappings, thread stacks; not code, not read-only or PROT_NONE reservations)."""
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmData:"):
                return int(line.split()[1]) << 10
    raise RuntimeError("no VmData in /proc/self/status")


def cap_memory(budget: int, footprint: int | None = None) -> tuple[int, int]:
    """RLIMIT_DATA = what the worker holds now + budget: (footprint, cap).

    The cap bounds what the module and the host calls it makes can add, not what the libraries
    reserve when they load: numpy's and OpenCV's reservations differ by version (measured: import
    cv2 takes VmSize from 140 to 453 MB with OpenCV 4.14, 467 MB with 5.1), so a fixed
    address-space cap let a library update starve a healthy worker. It is set before anything
    untrusted is read, as the hard limit too, so nothing in the worker can lift it afterwards.
    A spare worker measured its footprint before its sandbox shut /proc and passes it in."""
    if footprint is None:
        footprint = private_memory_bytes()
    cap = footprint + budget
    ceiling = resource.getrlimit(resource.RLIMIT_DATA)[1]   # a service's own limit stays the ceiling
    if ceiling != resource.RLIM_INFINITY:
        cap = min(cap, ceiling)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    return footprint, cap


def _on_sigsys(signo: int, info: int, context: int) -> None:
    number = ctypes.c_int.from_address(info + 24).value   # siginfo_t si_syscall (64-bit Linux)
    try:
        os.write(_sigsys_report_fd, SANDBOX_VIOLATION.pack(b"S", number))
    finally:
        os._exit(SANDBOX_EXIT)


_sigsys_report_fd = -1
# Made once, in the zygote: a ctypes callback needs executable memory, which the sandbox forbids.
_sigsys_handler = _SIGNAL_HANDLER(_on_sigsys)
_sigaction = ctypes.CDLL(None, use_errno=True).sigaction
_prctl = ctypes.CDLL(None, use_errno=True).prctl
PR_SET_NAME = 15


def report_sandbox_violations(sock_fd: int) -> None:
    """On SIGSYS (a system call the filter refuses), tell the supervisor which call, then die."""
    global _sigsys_report_fd
    _sigsys_report_fd = sock_fd
    action = ctypes.create_string_buffer(152)   # glibc's struct sigaction, the same on x86_64 and arm64
    struct.pack_into("<Q", action, 0, ctypes.cast(_sigsys_handler, ctypes.c_void_p).value)
    struct.pack_into("<i", action, 136, 4)     # SA_SIGINFO
    if _sigaction(31, action, None) != 0:      # SIGSYS
        raise OSError(ctypes.get_errno(), "sigaction(SIGSYS)")


def sandbox_policy(request: dict) -> sandbox.Policy:
    """The supervisor decides what a worker may have beyond nothing: executable mappings for a
    host_nn module's verified native library (preloaded into a memfd, see preload()); for a
    wasmtime module, code its JIT made (never writable and executable at once) and one thread
    (the epoch ticker that ends an overrunning call)."""
    host_nn = bool(request.get("host_nn")) and bool(request.get("module_dir"))
    jit = request.get("engine") == "wasmtime"
    return sandbox.Policy(executable_mappings=host_nn, jit=jit, threads=2 if jit else 1,
                          skip=frozenset(request.get("skip_layers", ())))


def enter_sandbox(request: dict, fds: tuple[int, ...]) -> tuple[sandbox.Report, int, int]:
    """What every worker goes through after the fork, before it reads anything untrusted (and
    what the escape drill goes through): memory cap, SIGSYS reporter, sandbox layers.
    Returns the sandbox report and the memory footprint and cap."""
    footprint, cap = cap_memory(int(request["memory_budget_bytes"]))
    report_sandbox_violations(fds[0])
    return sandbox.enter(sandbox_policy(request), tuple(fds)), footprint, cap


def preload(request: dict) -> dict[str, int]:
    """What a worker's module may need from the file system, opened before the sandbox shuts it:
    a host_nn module's native libraries, as sealed memfds (checked before they are loaded)."""
    if not (request.get("host_nn") and request.get("module_dir")):
        return {}
    from appliance.runtime.hostcalls.nn import preload_libraries
    return preload_libraries(request["module_dir"])


def run_forked(request: dict, fds: list[int]) -> int:
    """A worker's life in a child of the zygote, forked for this request (a host_nn module, or
    the drill): preload what its policy allows, then the sandbox, then the module."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fds[0])
    name_process(str(request.get("name", "")))
    libraries = preload(request)
    report, footprint, cap = enter_sandbox(request, (*fds, *libraries.values()))
    if not report.native_code:
        for fd in libraries.values():
            os.close(fd)
        libraries = {}
    return serve(sock, fds[1], fds[2], budget=int(request["memory_budget_bytes"]), footprint=footprint, cap=cap,
                 report=report, libraries=libraries, artifact_fd=fds[3] if len(fds) > 3 else -1)


def read_all(fd: int) -> bytes:
    """A memfd's whole content, from its start (without closing it)."""
    chunks, offset = [], 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def write_all(fd: int, data: bytes) -> None:
    os.lseek(fd, 0, os.SEEK_SET)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def seal_artifact(fd: int, data: bytes) -> None:
    """Write the new artifact and seal the memfd (no write, no resize, no unsealing) before any
    guest code runs: what the supervisor caches is what the compiler produced, not what a module
    that took over its worker in ap_init could write there later (process.take_artifact checks
    the seals)."""
    write_all(fd, data)   # (a longer refused entry's tail may stay: the reply gives the length)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, ARTIFACT_SEALS)


def make_backend(load: dict, wasm: bytes, artifact_fd: int):
    """The module's engine, its code loaded: wasm3 parses at instantiation; wasmtime takes the
    cached artifact the supervisor handed over (artifact_fd) or compiles, and then leaves the
    new artifact in that memfd for the supervisor to keep (its length goes in the load reply)."""
    if load.get("backend") != "wasmtime":
        return BACKENDS["wasm3"](), {}
    backend = WasmtimeBackend(simd=bool(load.get("simd")), fuel=load.get("fuel"),
                              deadline_s=float(load.get("deadline_s", 0.25)),
                              memory_bytes=int(load["max_memory_bytes"]), stack_bytes=int(load["stack_bytes"]))
    artifact = read_all(artifact_fd) if artifact_fd >= 0 else b""
    backend.load(wasm, artifact)
    news: dict = {}
    if backend.artifact_out is not None and artifact_fd >= 0:
        seal_artifact(artifact_fd, backend.artifact_out)
        news["art"] = len(backend.artifact_out)
    if backend.artifact_note:
        news["art_note"] = backend.artifact_note
    return backend, news


def serve(sock: socket.socket, shm_fd: int, wasm_fd: int, *, budget: int, footprint: int, cap: int,
          report: sandbox.Report, libraries: dict[str, int], artifact_fd: int = -1) -> int:
    # Until the module's instance is up, large blocks are mapped fresh (start_instance): the load
    # message's receive buffer (1 MiB) carved from the heap would leave a top that calloc then
    # hands the linear memory from, zeroing it page by page.
    malloc.tune(mmap_threshold=LINEAR_MEMORY_MAPPED_FROM, trim_threshold=KEEP_TRIM_THRESHOLD)
    shm = mmap.mmap(shm_fd, 0)
    shm_view = memoryview(shm)   # windows are copied from it into linear memory without a bytes copy
    with os.fdopen(wasm_fd, "rb") as f:
        wasm = f.read()

    load = json.loads(sock.recv(SOCKET_BUFFER))
    def capped() -> str:
        return f"worker capped at {budget >> 20} MiB above its own {footprint >> 20} MiB"

    calls = Calls()
    for note in report.notes:
        calls.logs.append([2, f"sandbox: {note}"])
    inst = None

    def read_guest(ptr: int, length: int, what: str) -> bytes:
        return abi.read(inst.memory(), ptr, length, what)

    def state_blob() -> bytes:
        size = inst.call("ap_state_size")
        if not 0 < size <= MAX_STATE_BYTES:
            raise AbiViolation(f"ap_state_size() returned {size} (1..{MAX_STATE_BYTES} bytes allowed)")
        return read_guest(inst.call("ap_state_ptr"), size, "ap_state_ptr")

    def restore_state(blob: bytes) -> str:
        size = inst.call("ap_state_size")
        if size != len(blob):
            return f"refused: saved state is {len(blob)} bytes, the module's is {size}"
        ptr = inst.call("ap_state_ptr")
        read_guest(ptr, size, "ap_state_ptr")   # bounds check
        inst.memory()[ptr:ptr + size] = blob
        rc = inst.call("ap_state_loaded")
        return "accepted" if rc == 0 else f"refused by the module (ap_state_loaded returned {rc})"

    def fault(kind: str, error: str) -> int:
        sock.send(json.dumps({"fault": kind, "error": abi.text(error.encode())[:1000], "l": calls.logs},
                             ensure_ascii=False).encode())
        return 3

    def guest_buffer(kind: int, size: int) -> int:
        ptr = inst.call("ap_buffer", kind, size)
        if ptr == 0:
            raise AbiViolation(f"ap_buffer({kind}, {size}) returned 0: the module has no buffer that large")
        if ptr < 0 or ptr + size > len(inst.memory()):
            raise AbiViolation(f"ap_buffer({kind}, {size}) returned {ptr}, outside linear memory")
        return ptr

    try:
        info = check_module(wasm, load["label"], int(load["max_memory_bytes"]), validated=True,
                            simd=load.get("backend") == "wasmtime" and bool(load.get("simd")))
    except ModuleRejected as exc:
        return fault("load", str(exc))
    except MemoryError:
        return fault("memory", f"out of memory while checking the module ({capped()})")

    try:
        backend, artifact_news = make_backend(load, wasm, artifact_fd)
        imports = CoreCalls(lambda: inst.memory(), calls).imports()
        wanted = {(i.module, i.name) for i in info.imports}
        if wanted & {("ap", name) for name in HostDsp.IMPORTS}:
            imports.update(HostDsp(lambda: inst.memory(), AbiViolation).imports())   # numpy only if used
        if wanted & {("ap", name) for name in HostImage.IMPORTS}:
            imports.update(HostImage(lambda: inst.memory(), AbiViolation).imports())   # OpenCV only if used
        if ("ap", "nn_run") in wanted:
            from appliance.runtime.hostcalls.nn import HostNN

            def nn_log(level: int, text: str) -> None:
                if len(calls.logs) < MAX_LOGS_PER_CALL:
                    calls.logs.append([level, abi.text(text.encode())[:MAX_LOG_BYTES]])

            # Native code only when the supervisor says so (the module's host_nn: true), never a param.
            imports.update(HostNN(lambda: inst.memory(), AbiViolation, load.get("module_dir") or None,
                                  load.get("host_nn") is True, nn_log, preloaded=libraries).imports())

        def start_instance() -> tuple[str, str] | None:
            """Instantiate and ap_init; a (fault kind, reason) if the module cannot start."""
            nonlocal inst
            # The linear memory mapped fresh, not carved from the heap the kernels keep: calloc
            # would zero all of it (1 MiB for vibstats: ~260 page faults, ~0.4 ms a start), and
            # pages the module never touches would be resident.
            with malloc.large_blocks_mapped_fresh(LINEAR_MEMORY_MAPPED_FROM, then_mmap=KEEP_MMAP_THRESHOLD,
                                                  then_trim=KEEP_TRIM_THRESHOLD):
                inst = backend.instantiate(wasm, int(load["stack_bytes"]), imports)
            version = inst.call("ap_abi_version")
            if version != 1:
                return "load", f"module speaks ABI version {version}; this host implements version 1"
            params = load["params"].encode()
            ptr = guest_buffer(0, max(len(params), 1))
            inst.memory()[ptr:ptr + len(params)] = params
            rc = inst.call("ap_init", ptr, len(params))
            if rc != 0:
                errors = [m for lvl, m in calls.logs if lvl >= 3]
                return "params", f"module rejected its params: {errors[-1] if errors else f'ap_init returned {rc}'}"
            return None

        problem = start_instance()
        if problem:
            return fault(*problem)
        has_state = all(info.export(n) is not None for n in ("ap_state_size", "ap_state_ptr", "ap_state_loaded"))
        state_note = ""
        if load.get("state") and has_state:
            state_note = restore_state(base64.b64decode(load["state"]))
            if state_note != "accepted":
                # The refused blob now sits in the instance's memory: start a clean instance.
                problem = start_instance()
                if problem:
                    return fault(*problem)
    except AbiViolation as exc:
        return fault("abi", str(exc))
    except MemoryError:
        return fault("memory", f"out of memory while loading ({capped()})")
    except (EngineTrap, EngineLoadError) as exc:
        return fault(exc.kind, f"{exc} ({capped()})" if exc.kind == "memory" else str(exc))
    except RuntimeError as exc:
        if "allocation failed" in str(exc):
            return fault("memory", f"{exc} ({capped()})")
        return fault("trap" if "[trap]" in str(exc) else "load", str(exc))
    sock.send(json.dumps({"ok": True, "l": calls.logs, "st": state_note, "mem": [footprint, cap],
                          "sb": report.applied, **artifact_news}).encode())
    # The state a fresh instance resumes from after a deadline (wasmtime): the last one the
    # supervisor was sent, which is what it would hand a new worker.
    last_state = base64.b64decode(load["state"]) if load.get("state") and state_note == "accepted" else b""

    window_ptrs: dict[int, int] = {}
    sent_names: tuple[str, ...] = ()   # the feature names the supervisor holds
    while True:
        msg = sock.recv(65536)
        if not msg or msg[:1] == b"Q":
            return 0
        if msg[:1] != b"W":
            return fault("protocol", f"unexpected message {msg[:16]!r}")
        (nbytes,) = struct.unpack_from("<I", msg, 1)
        calls.reset()
        try:
            ptr = window_ptrs.get(nbytes)
            if ptr is None:
                ptr = window_ptrs[nbytes] = guest_buffer(1, nbytes)
            inst.memory()[ptr:ptr + nbytes] = shm_view[:nbytes]
            t0 = time.perf_counter_ns()
            rc = inst.call("ap_process", ptr, nbytes)
            elapsed = time.perf_counter_ns() - t0
        except AbiViolation as exc:
            return fault("abi", str(exc))
        except MemoryError:
            return fault("memory", f"out of memory ({capped()})")
        except EngineTrap as exc:
            if exc.kind != "deadline":
                return fault(exc.kind, str(exc))
            # Stopped by the engine, not killed: the instance's memory may be half-way through
            # an update, so a fresh one takes over (the compiled code is kept), from the last
            # state the supervisor holds; the worker, its pid and its sandbox stay.
            window_ptrs.clear()
            calls.reset()
            try:
                problem = start_instance()
                if problem:
                    return fault(*problem)
                if last_state and has_state:
                    note = restore_state(last_state)
                    if note != "accepted":   # as at load: the refused blob is in memory, so a clean instance
                        last_state = b""     # and not offered again at the next deadline
                        problem = start_instance()
                        if problem:
                            return fault(*problem)
                        calls.logs.append([2, f"state after the deadline {note}; the module starts over clean"])
            except (AbiViolation, EngineTrap, EngineLoadError, MemoryError, RuntimeError) as again:
                return fault("deadline", f"{exc}; a fresh instance did not start: {again}")
            sock.send(json.dumps({"fault": "deadline", "error": abi.text(str(exc).encode())[:1000],
                                  "l": calls.logs, "alive": True}, ensure_ascii=False).encode())
            continue
        except RuntimeError as exc:
            return fault("trap" if "[trap]" in str(exc) else "engine", str(exc))
        extra: dict = {}
        if calls.events:
            extra["e"] = calls.events
        if calls.logs:
            extra["l"] = calls.logs
        if calls.state_changed and has_state:
            try:
                last_state = state_blob()
                extra["s"] = base64.b64encode(last_state).decode()
            except AbiViolation as exc:
                return fault("abi", str(exc))
            except EngineTrap as exc:
                return fault(exc.kind, str(exc))
        names = tuple(calls.features)
        packed_names = b""
        if names != sent_names:
            packed_names = "\n".join(names).encode()
            sent_names = names
        text = json.dumps(extra, ensure_ascii=False).encode() if extra else b""
        sock.send(b"".join((REPLY.pack(b"R", rc, elapsed, calls.logs_dropped, len(names), len(packed_names), len(text)),
                            struct.pack(f"<{len(names)}d", *calls.features.values()), packed_names, text)))



def name_process(name: str) -> None:
    """What `ps`, `top` and the soak see: ap:<module> (15 characters at most)."""
    _prctl(PR_SET_NAME, f"ap:{name}".encode()[:15], 0, 0, 0)


SPARE_KINDS = ("wasm3", "wasmtime")


def spare_policy(kind: str) -> sandbox.Policy:
    """A spare's sandbox: the default, or a wasmtime worker's (sandbox_policy, for its engine)."""
    return sandbox_policy({"engine": kind})


def run_spare(channel: socket.socket, kind: str = "wasm3") -> int:
    """A worker forked ahead of need: it enters its kind's sandbox at once, then waits for its
    request and file descriptors on `channel` (from the zygote). A module's start then costs no
    fork and no sandbox set-up, only the module's own load."""
    name_process("spare")
    footprint = private_memory_bytes()   # before the sandbox: /proc is shut afterwards
    report_sandbox_violations(channel.fileno())
    report = sandbox.enter(spare_policy(kind), (channel.fileno(),))
    _warm_up(kind)
    # The warm-up's freed blocks would be the next large request's: a linear memory then calloc'd
    # out of them (zeroed, page by page). Given back now, off the path of a module's start.
    malloc.trim()
    data, fds, _, _ = socket.recv_fds(channel, 65536, 4)
    if not data or len(fds) != (4 if kind == "wasmtime" else 3):
        return 0   # the zygote is gone (or asked nothing): never used
    channel.close()
    request = json.loads(data)
    name_process(str(request.get("name", "")))
    report_sandbox_violations(fds[0])
    budget = int(request["memory_budget_bytes"])
    footprint, cap = cap_memory(budget, footprint=footprint)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fds[0])   # family given: no syscall to ask
    return serve(sock, fds[1], fds[2], budget=budget, footprint=footprint, cap=cap, report=report, libraries={},
                 artifact_fd=fds[3] if len(fds) > 3 else -1)


def spare_kind(request: dict) -> str | None:
    """The spare that can serve a request (its engine's sandbox, every layer, no native library),
    or None: fork one for it."""
    if request.get("host_nn") or request.get("skip_layers"):
        return None
    engine = request.get("engine", "wasm3")
    return engine if engine in SPARE_KINDS else None


# A module with one exported function `f` returning 7 and a one-page memory: enough to take wasm3,
# the checks and the host-call set-up once through their paths.
_WARM_UP_MODULE = bytes.fromhex("0061736d01000000010501600001 7f030201000503010001070501016600000a06010400 41070b"
                                .replace(" ", ""))


def _warm_up(kind: str = "wasm3") -> None:
    """Run once, in a spare, what every module start runs: the pages this touches are copied from
    the zygote now (copy-on-write) instead of during a module's start. A wasmtime spare makes an
    engine and compiles the little module: wasmtime's one-time set-up (its signal handlers, CPU
    features) is done before a module waits for it (no epoch thread: the module's engine has it)."""
    from appliance.runtime.wasm_binary import WasmFormatError, parse
    try:
        check_module(_WARM_UP_MODULE, "warm-up", 1 << 20, validated=True)
    except ModuleRejected:
        pass   # it follows no ABI: what counts is that the checks ran once (0.57 -> 0.45 ms a start)
    try:
        parse(_WARM_UP_MODULE)
        if kind == "wasmtime":
            import wasmtime
            from appliance.runtime.engines import wasmtime_config
            engine = wasmtime.Engine(wasmtime_config(wasmtime, simd=True, fuel=False, stack_bytes=0))
            module = wasmtime.Module(engine, _WARM_UP_MODULE)
            wasmtime.Module.deserialize(engine, module.serialize())
        else:
            instance = BACKENDS["wasm3"]().instantiate(_WARM_UP_MODULE, 64 << 10, {})
            instance.call("f")
    except (WasmFormatError, RuntimeError):
        pass
    except Exception:   # noqa: BLE001 (a warm-up: the module's own start reports what fails)
        pass
    CoreCalls(lambda: memoryview(b""), Calls()).imports()
    HostDsp(lambda: memoryview(b""), AbiViolation).imports()
    json.loads(json.dumps({"op": "load", "l": [[1, "x"]]}))
