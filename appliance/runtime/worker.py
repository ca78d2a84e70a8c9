"""The worker process: hosts exactly one wasm module instance.

Started by WorkerProcess (process.py) as `python -m appliance.runtime.worker` with three inherited
file descriptors: a SOCK_SEQPACKET socket to the supervisor, a memfd holding the window
buffer (shared memory), and a memfd holding the validated module bytes.

The protocol: appliance/runtime/wire.py.

Only the standard library and the engine are imported here: start-up stays in milliseconds and
no lock inherited from a threaded parent exists (we exec, never fork).
"""
from __future__ import annotations

import base64
import ctypes
import json
import mmap
import os
import resource
import signal
import socket
import struct
import sys
import time

from appliance.runtime.engines import BACKENDS
from appliance.runtime.hostcalls.abi import MAX_LOG_BYTES, MAX_LOGS_PER_CALL, MAX_STATE_BYTES, AbiViolation
from appliance.runtime.hostcalls import abi
from appliance.runtime.hostcalls.core import Calls, CoreCalls
from appliance.runtime.hostcalls.dsp import HostDsp
from appliance.runtime.hostcalls.image import HostImage
from appliance.runtime.validate import ModuleRejected, check_module
from appliance.runtime.wire import REPLY, SOCKET_BUFFER

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38


def private_memory_bytes() -> int:
    """VmData: the private writable memory the kernel charges against RLIMIT_DATA (heap, anonymous
    mappings, thread stacks; not code, not read-only or PROT_NONE reservations)."""
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmData:"):
                return int(line.split()[1]) << 10
    raise RuntimeError("no VmData in /proc/self/status")


def cap_memory(budget: int, final: bool) -> tuple[int, int]:
    """RLIMIT_DATA = what the worker holds now + budget: (footprint, cap).

    The cap bounds what the module and the host calls it makes can add, not what the libraries
    reserve when they load: numpy's and OpenCV's reservations differ by version (measured: import
    cv2 takes VmSize from 140 to 453 MB with OpenCV 4.14, 467 MB with 5.1), so a fixed
    address-space cap let a library update starve a healthy worker. A provisional cap covers the
    checks of the untrusted bytes; the final one, set once the kernels are imported and warmed
    up, is the hard limit too, so nothing in the worker can lift it afterwards."""
    footprint = private_memory_bytes()
    cap = footprint + budget
    ceiling = resource.getrlimit(resource.RLIMIT_DATA)[1]   # a service's own limit stays the ceiling
    if ceiling != resource.RLIM_INFINITY:
        cap = min(cap, ceiling)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap if final else ceiling))
    return footprint, cap


def _harden(expected_parent: int) -> None:
    """Die with the supervisor; never gain privileges (setuid binaries) from here on."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != expected_parent:   # the parent died before prctl took effect
        os._exit(1)


def main() -> int:
    sock_fd, shm_fd, wasm_fd = (int(x) for x in os.environ["AP_WORKER_FDS"].split(","))
    _harden(int(os.environ["AP_WORKER_PARENT"]))
    # Ctrl-C and a service stop reach the whole process group; stopping workers is the
    # supervisor's job (it asks, then kills), and PDEATHSIG covers a supervisor that died.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=sock_fd)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    shm = mmap.mmap(shm_fd, 0)
    shm_view = memoryview(shm)   # windows are copied from it into linear memory without a bytes copy
    with os.fdopen(wasm_fd, "rb") as f:
        wasm = f.read()

    load = json.loads(sock.recv(SOCKET_BUFFER))
    # Cap the process before it parses untrusted bytes; the final cap follows the imports.
    budget = int(load["memory_budget_bytes"])
    footprint, cap = cap_memory(budget, final=False)

    def capped() -> str:
        return f"worker capped at {budget >> 20} MiB above its own {footprint >> 20} MiB"

    calls = Calls()
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
        info = check_module(wasm, load["label"], int(load["max_memory_bytes"]))
    except ModuleRejected as exc:
        return fault("load", str(exc))
    except MemoryError:
        return fault("memory", f"out of memory while checking the module ({capped()})")

    try:
        backend = BACKENDS[load["backend"]]()
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

            # Native code only when the module's host_nn switch is on (host.nn=1 in its params).
            imports.update(HostNN(lambda: inst.memory(), AbiViolation, load.get("module_dir") or None,
                                  "host.nn=1" in load["params"].splitlines(), nn_log).imports())
        # Everything this worker will import is in now: the budget starts from here.
        footprint, cap = cap_memory(budget, final=True)

        def start_instance() -> tuple[str, str] | None:
            """Instantiate and ap_init; a (fault kind, reason) if the module cannot start."""
            nonlocal inst
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
    except RuntimeError as exc:
        if "allocation failed" in str(exc):
            return fault("memory", f"{exc} ({capped()})")
        return fault("trap" if "[trap]" in str(exc) else "load", str(exc))
    sock.send(json.dumps({"ok": True, "l": calls.logs, "st": state_note, "mem": [footprint, cap]}).encode())

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
        except RuntimeError as exc:
            return fault("trap" if "[trap]" in str(exc) else "engine", str(exc))
        extra: dict = {}
        if calls.events:
            extra["e"] = calls.events
        if calls.logs:
            extra["l"] = calls.logs
        if calls.state_changed and has_state:
            try:
                extra["s"] = base64.b64encode(state_blob()).decode()
            except AbiViolation as exc:
                return fault("abi", str(exc))
        names = tuple(calls.features)
        packed_names = b""
        if names != sent_names:
            packed_names = "\n".join(names).encode()
            sent_names = names
        text = json.dumps(extra, ensure_ascii=False).encode() if extra else b""
        sock.send(b"".join((REPLY.pack(b"R", rc, elapsed, calls.logs_dropped, len(names), len(packed_names), len(text)),
                            struct.pack(f"<{len(names)}d", *calls.features.values()), packed_names, text)))


if __name__ == "__main__":
    sys.exit(main())
