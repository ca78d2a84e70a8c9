"""The worker process: hosts exactly one wasm module instance.

Started by WorkerProcess (host.py) as `python -m appliance.runtime.worker` with three inherited
file descriptors: a SOCK_SEQPACKET socket to the supervisor, a memfd holding the window
buffer (shared memory), and a memfd holding the validated module bytes.

Protocol (one datagram per message):
  supervisor -> worker  JSON {"op": "load", ...}          -> JSON {"ok": true, "logs": [...]}
                        b"W" + u32 window_bytes            -> JSON {"rc", "f", "e", "l", "ns"}
                        b"Q"                                -> exit 0
  On a fault the worker answers {"fault": kind, "error": text} and exits: after a trap or an
  ABI violation the instance's state is not to be trusted, so the supervisor starts afresh.

Only the standard library and the engine are imported here: start-up stays in milliseconds and
no lock inherited from a threaded parent exists (we exec, never fork).
"""
from __future__ import annotations

import base64
import ctypes
import json
import mmap
import os
import re
import resource
import signal
import socket
import struct
import sys
import time

from appliance.runtime.backend import BACKENDS
from appliance.runtime.validate import ModuleRejected, check_module

MAX_LOG_BYTES = 512
MAX_LOGS_PER_CALL = 64
MAX_FEATURES = 256
MAX_EVENTS = 16
MAX_STATE_BYTES = 256 << 10
MAX_FFT = 1 << 16
FEATURE_NAME = re.compile(rb"[A-Za-z0-9_.:\-]{1,64}")
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
SOCKET_BUFFER = 1 << 20   # > the largest reply the limits above allow (~170 KB)
# Control characters would be escaped 6 bytes each in JSON: replace them, keep replies small.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class AbiViolation(Exception):
    """The module broke the ABI in a host call (bad pointer, name, count)."""


class Calls:
    """What the module reported during the current export call."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.features: dict[str, float] = {}
        self.events: list[list] = []
        self.logs: list[list] = []
        self.logs_dropped = 0
        self.state_changed = False


class HostDsp:
    """Native kernels for ap.dsp_*: numpy's FFT, reading and writing the module's memory in
    place (no copy crosses the boundary but the FFT's own). Layout as ap_dsp.h documents."""

    def __init__(self, memory, violation) -> None:
        import numpy as np   # imported only by workers whose module uses host DSP
        self.np, self.memory, self.violation = np, memory, violation

    def _views(self, what: str, in_ptr: int, in_floats: int, out_ptr: int, out_floats: int, n: int):
        if n < 4 or n > MAX_FFT or n & (n - 1):
            raise self.violation(f"{what}: n={n} is not a power of two in 4..{MAX_FFT}")
        mem = self.memory()
        for ptr, floats in ((in_ptr, in_floats), (out_ptr, out_floats)):
            if ptr < 0 or ptr + 4 * floats > len(mem):
                raise self.violation(f"{what}: pointer {ptr}+{4 * floats} is outside linear memory ({len(mem)} bytes)")
        f32 = self.np.float32
        return (self.np.frombuffer(mem, f32, in_floats, in_ptr), self.np.frombuffer(mem, f32, out_floats, out_ptr))

    def rfft(self, in_ptr: int, out_ptr: int, n: int) -> int:
        x, out = self._views("ap.dsp_rfft", in_ptr, n, out_ptr, n + 2, n)
        spectrum = self.np.fft.rfft(x)
        out[0::2] = spectrum.real
        out[1::2] = spectrum.imag
        return 0

    def irfft(self, in_ptr: int, out_ptr: int, n: int) -> int:
        spec, out = self._views("ap.dsp_irfft", in_ptr, n + 2, out_ptr, n, n)
        out[:] = self.np.fft.irfft(spec[0::2] + 1j * spec[1::2], n)
        return 0

    def imports(self) -> dict:
        return {("ap", "dsp_rfft"): self.rfft, ("ap", "dsp_irfft"): self.irfft}


def _text(raw: bytes) -> str:
    return CONTROL.sub("?", raw.decode("utf-8", "replace"))


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
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the supervisor's to handle
    sock = socket.socket(fileno=sock_fd)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    shm = mmap.mmap(shm_fd, 0)
    with os.fdopen(wasm_fd, "rb") as f:
        wasm = f.read()

    load = json.loads(sock.recv(SOCKET_BUFFER))
    # Cap the whole process before the engine allocates anything: wasm3 has no memory limit.
    cap = int(load["address_space_bytes"])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    calls = Calls()
    inst = None

    def read_guest(ptr: int, length: int, what: str) -> bytes:
        mem = inst.memory()
        if length < 0 or ptr < 0 or ptr + length > len(mem):
            raise AbiViolation(f"{what}: pointer {ptr}+{length} is outside linear memory ({len(mem)} bytes)")
        return bytes(mem[ptr:ptr + length])

    def host_log(level: int, ptr: int, length: int) -> None:
        text = read_guest(ptr, min(length, MAX_LOG_BYTES), "ap.log")
        if len(calls.logs) >= MAX_LOGS_PER_CALL:
            calls.logs_dropped += 1
            return
        calls.logs.append([int(level), _text(text)])

    def host_feature(ptr: int, length: int, value: float) -> None:
        if length > 64:
            raise AbiViolation(f"ap.feature: name of {length} bytes (max 64)")
        name = read_guest(ptr, length, "ap.feature")
        if not FEATURE_NAME.fullmatch(name):
            raise AbiViolation(f"ap.feature: invalid name {name[:64]!r}")
        if len(calls.features) >= MAX_FEATURES and name.decode() not in calls.features:
            raise AbiViolation(f"ap.feature: more than {MAX_FEATURES} features in one window")
        calls.features[name.decode()] = float(value)

    def host_event(severity: int, score: float, ptr: int, length: int) -> None:
        if not 0 <= severity <= 3:
            raise AbiViolation(f"ap.event: severity {severity} (must be 0..3)")
        if len(calls.events) >= MAX_EVENTS:
            raise AbiViolation(f"ap.event: more than {MAX_EVENTS} events in one window")
        msg = _text(read_guest(ptr, min(length, MAX_LOG_BYTES), "ap.event"))
        calls.events.append([int(severity), float(score), msg])

    def host_state_changed() -> None:
        calls.state_changed = True

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
        sock.send(json.dumps({"fault": kind, "error": _text(error.encode())[:1000], "l": calls.logs},
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
        return fault("memory", f"out of memory while checking the module (worker capped at {cap >> 20} MiB)")

    try:
        backend = BACKENDS[load["backend"]]()
        imports = {("ap", "log"): host_log, ("ap", "feature"): host_feature, ("ap", "event"): host_event,
                   ("ap", "state_changed"): host_state_changed}
        wanted = {(i.module, i.name) for i in info.imports}
        if wanted & {("ap", "dsp_rfft"), ("ap", "dsp_irfft")}:
            imports.update(HostDsp(lambda: inst.memory(), AbiViolation).imports())   # numpy only if used

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
        return fault("memory", f"out of memory while loading (worker capped at {cap >> 20} MiB)")
    except RuntimeError as exc:
        if "allocation failed" in str(exc):
            return fault("memory", f"{exc} (worker capped at {cap >> 20} MiB)")
        return fault("trap" if "[trap]" in str(exc) else "load", str(exc))
    sock.send(json.dumps({"ok": True, "l": calls.logs, "st": state_note}).encode())

    window_ptrs: dict[int, int] = {}
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
            inst.memory()[ptr:ptr + nbytes] = shm[:nbytes]
            t0 = time.perf_counter_ns()
            rc = inst.call("ap_process", ptr, nbytes)
            elapsed = time.perf_counter_ns() - t0
        except AbiViolation as exc:
            return fault("abi", str(exc))
        except MemoryError:
            return fault("memory", f"out of memory (worker capped at {cap >> 20} MiB)")
        except RuntimeError as exc:
            return fault("trap" if "[trap]" in str(exc) else "engine", str(exc))
        reply = {"rc": rc, "f": calls.features, "e": calls.events, "l": calls.logs, "ld": calls.logs_dropped,
                 "ns": elapsed}
        if calls.state_changed and has_state:
            try:
                reply["s"] = base64.b64encode(state_blob()).decode()
            except AbiViolation as exc:
                return fault("abi", str(exc))
        sock.send(json.dumps(reply, ensure_ascii=False).encode())


if __name__ == "__main__":
    sys.exit(main())
