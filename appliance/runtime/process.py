"""The supervisor's side of one worker process: spawn it, load the module, send windows,
read replies, kill it. ModuleHost (host.py) owns one at a time."""
from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

from appliance.runtime.wire import REPLY

log = logging.getLogger("appliance.module")

LOAD_TIMEOUT_S = 10.0
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])   # where `appliance` imports from
# The worker imports the same libraries as the supervisor, from the same places.
WORKER_PYTHONPATH = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)
LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR}


class ModuleFault(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def _signal_name(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class WorkerProcess:
    """One running worker: spawn, load, process windows, kill."""

    def __init__(self, name: str, wasm: bytes, shm_bytes: int, load: dict) -> None:
        self.name = name
        self.shm_bytes = shm_bytes
        self._names: list[str] = []   # feature names of the last window reply that carried them
        self._sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        shm_fd = os.memfd_create(f"ap-window-{name}")
        wasm_fd = os.memfd_create(f"ap-wasm-{name}")
        try:
            os.ftruncate(shm_fd, shm_bytes)
            import mmap
            self._shm = mmap.mmap(shm_fd, shm_bytes)
            os.write(wasm_fd, wasm)
            os.lseek(wasm_fd, 0, os.SEEK_SET)
            # A minimal environment: nothing of the supervisor's (credentials, tokens) leaks in.
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
                   "PYTHONPATH": WORKER_PYTHONPATH, "PYTHONDONTWRITEBYTECODE": "1",
                   "AP_WORKER_FDS": f"{child_sock.fileno()},{shm_fd},{wasm_fd}",
                   "AP_WORKER_PARENT": str(os.getpid()), "AP_WORKER_MODULE": name}
            # exec a fresh interpreter rather than fork a threaded supervisor.
            self.proc = subprocess.Popen([sys.executable, "-m", "appliance.runtime.worker"],
                                         pass_fds=(child_sock.fileno(), shm_fd, wasm_fd), env=env,
                                         stdin=subprocess.DEVNULL, close_fds=True)
        finally:
            child_sock.close()
            os.close(shm_fd)
            os.close(wasm_fd)
        self._sock.send(json.dumps(load).encode())
        reply = self._receive(LOAD_TIMEOUT_S, "load")
        self.load_logs = reply.get("l", [])
        self.state_note = reply.get("st", "")
        self.footprint_bytes, self.memory_cap_bytes = reply.get("mem", (0, 0))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _receive(self, timeout_s: float, what: str) -> dict:
        ready, _, _ = select.select([self._sock], [], [], timeout_s)
        if not ready:
            self.kill()
            kind = "deadline" if what == "window" else "load"
            raise ModuleFault(kind, f"no answer to {what} within {timeout_s * 1000:.0f} ms; worker killed")
        try:
            data = self._sock.recv(1 << 20)
        except ConnectionResetError:
            data = b""
        if not data:
            rc = self._reap()
            raise ModuleFault("crash", f"worker died during {what} ({_signal_name(rc)})")
        if data[:1] == b"R":
            return self._window_reply(data)
        reply = json.loads(data)
        if "fault" in reply:
            for level, text in reply.get("l", []):
                log.log(LEVELS.get(level, logging.INFO), "module %s: %s", self.name, text)
            self._reap()
            raise ModuleFault(reply["fault"], reply["error"])
        return reply

    def _window_reply(self, data: bytes) -> dict:
        """A binary window reply (worker.py, REPLY) as {"rc", "f", "e", "l", "ld", "ns"[, "s"]}."""
        if len(data) < REPLY.size:
            self.kill()
            raise ModuleFault("protocol", f"window reply of {len(data)} bytes is shorter than its header")
        _, rc, ns, dropped, count, names_len, text_len = REPLY.unpack_from(data)
        at = REPLY.size + 8 * count
        if len(data) != at + names_len + text_len:
            self.kill()
            raise ModuleFault("protocol", f"window reply of {len(data)} bytes does not match its header")
        if names_len:
            self._names = data[at:at + names_len].decode().split("\n")
        if count and len(self._names) != count:
            self.kill()
            raise ModuleFault("protocol", f"window reply has {count} feature values for {len(self._names)} names")
        values = struct.unpack_from(f"<{count}d", data, REPLY.size)
        extra = json.loads(data[at + names_len:]) if text_len else {}
        reply = {"rc": rc, "f": dict(zip(self._names, values)) if count else {}, "e": extra.get("e", []),
                 "l": extra.get("l", []), "ld": dropped, "ns": ns}
        if "s" in extra:
            reply["s"] = extra["s"]
        return reply

    def process(self, header: bytes, data: np.ndarray, deadline_s: float) -> dict:
        nbytes = len(header) + data.nbytes
        if nbytes > self.shm_bytes:
            raise ModuleFault("protocol", f"window of {nbytes} bytes exceeds the shared buffer")
        self._shm[:len(header)] = header
        np.frombuffer(self._shm, dtype=data.dtype, count=data.size, offset=len(header))[:] = data.reshape(-1)
        try:
            self._sock.send(b"W" + struct.pack("<I", nbytes))
        except OSError:   # the worker is gone (killed from outside): a crash like any other
            rc = self._reap()
            raise ModuleFault("crash", f"worker died before the window ({_signal_name(rc)})") from None
        return self._receive(deadline_s, "window")

    def _reap(self) -> int | None:
        try:
            return self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                log.error("module %s: worker %d did not die after SIGKILL", self.name, self.proc.pid)
        self.close()

    def stop(self, timeout_s: float = 1.0) -> None:
        """Ask politely, then kill: a bounded stop."""
        if self.proc.poll() is None:
            try:
                self._sock.send(b"Q")
                self.proc.wait(timeout=timeout_s)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass
        try:
            self._shm.close()
        except (BufferError, ValueError):
            pass
