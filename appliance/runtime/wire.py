"""The wire between the supervisor and a worker (appliance/runtime/process.py and worker.py).

Three file descriptors, handed to the worker when the zygote forks it: a SOCK_SEQPACKET socket,
a memfd holding the window buffer (shared memory: the 64-byte header of modules/ABI.md, then the
samples; sealed against shrinking and growing), and a memfd holding the module's bytes (sealed).

Protocol (one datagram per message):
  supervisor -> worker  JSON {"op": "load", ...}          -> JSON {"ok": true, "logs": [...]}
                        b"W" + u32 window_bytes            -> a window reply (REPLY below)
                        b"Q"                                -> exit 0
  A window reply is binary, since JSON of a hundred features costs more than a small module's
  whole window: REPLY (b"R", rc, ns, logs dropped, feature count F, names bytes N, JSON bytes J),
  then F float64 feature values, then N bytes of feature names joined by "\n" (sent only when
  they differ from the previous reply's; the supervisor keeps the last ones), then J bytes of JSON
  {"e": events, "l": logs, "s": state} holding only the keys that are not empty (J = 0: none).
  WorkerProcess._receive (host.py) turns it back into {"rc", "f", "e", "l", "ld", "ns"[, "s"]}.
  A system call outside the worker's allow-list: SANDBOX_VIOLATION (b"S", the call's number)
  from its SIGSYS handler, then it exits.
  On a fault the worker answers {"fault": kind, "error": text} and exits: after a trap or an
  ABI violation the instance's state is not to be trusted, so the supervisor starts afresh.
"""
from __future__ import annotations

import base64
import fcntl
import struct

import numpy as np

HEADER = struct.Struct("<IHHIIdQqIIII8x")   # the window header, modules/ABI.md
FORMATS = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2}
WINDOW_MAGIC = 0x31575041
# Window reply header: b"R", rc, ns, logs dropped, features, names bytes, JSON bytes.
REPLY = struct.Struct("<1siqIIII")
SANDBOX_VIOLATION = struct.Struct("<1si")
# A wasmtime worker seals the memfd of the artifact it compiled before any guest code runs; the
# supervisor caches an artifact only from a memfd so sealed (process.take_artifact).
ARTIFACT_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
MAX_ARTIFACT_BYTES = 256 << 20   # far above any ABI v1 module's (16 MiB of wasm at most)
SOCKET_BUFFER = 1 << 20   # > the largest reply the limits of ABI v1 allow (~170 KB)


def pack_header(channels: int, frames: int, sample_rate: float, seq: int, start_ns: int = 0, dropped: int = 0,
                sample_format: int = 1, width: int = 0, height: int = 0) -> bytes:
    return HEADER.pack(WINDOW_MAGIC, HEADER.size, sample_format, channels, frames, sample_rate, seq, start_ns, 0,
                       min(dropped, 0xFFFFFFFF), width, height)


def load_message(label: str, params: str, *, backend: str = "wasm3", stack_bytes: int = 128 << 10,
                 max_memory_bytes: int = 64 << 20, memory_budget_bytes: int = 320 << 20,
                 state: bytes | None = None, module_dir: str = "", host_nn: bool = False,
                 host_dsp: bool = True, simd: bool = False, fuel: int | None = None,
                 deadline_s: float = 0.25) -> dict:
    """The first message a worker gets: what to check, how to instantiate, its limits (the
    memory budget is what the worker may add to its own footprint once its libraries are
    loaded), the module's saved state (if any), and its directory (where a compiled model's
    native library for ap.nn_run lies). host_nn and host_dsp are the module's switches from the
    config, typed: no param text can turn them on. backend "wasmtime" reads simd (the module is
    the SIMD128 build), fuel (units a call, or none) and deadline_s (the engine ends a window's
    call then; wasm3 workers are killed by the supervisor instead)."""
    return {"op": "load", "label": label, "params": params, "backend": backend, "stack_bytes": stack_bytes,
            "max_memory_bytes": max_memory_bytes, "memory_budget_bytes": memory_budget_bytes,
            "state": base64.b64encode(state).decode() if state else "", "module_dir": module_dir,
            "host_nn": bool(host_nn), "host_dsp": bool(host_dsp), "simd": bool(simd), "fuel": fuel,
            "deadline_s": float(deadline_s)}
