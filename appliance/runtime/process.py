"""The supervisor's side of one worker process: fork it through the zygote, load the module,
send windows, read replies, kill it. ModuleHost (host.py) owns one at a time."""
from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import signal
import socket
import struct
import threading

import numpy as np

from appliance.runtime import zygote
from appliance.runtime.artifacts import ArtifactCache
from appliance.runtime.validate import ModuleRejected, wasm_validate_once
from appliance.runtime.fdwait import readable
from appliance.runtime.wire import ARTIFACT_SEALS, MAX_ARTIFACT_BYTES, REPLY, SANDBOX_VIOLATION, SOCKET_BUFFER

log = logging.getLogger("appliance.module")

LOAD_TIMEOUT_S = 10.0
WASM_PREAMBLE = b"\0asm\x01\0\0\0"
LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR}
# A window buffer may be written but never resized (a worker's ftruncate would SIGBUS the
# supervisor's next write); the module's bytes cannot change at all.
WINDOW_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
MODULE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


class ModuleFault(Exception):
    """alive: the worker survived it (a wasmtime deadline: the engine stopped the call) and
    serves the next window with a fresh instance."""

    def __init__(self, kind: str, reason: str, alive: bool = False) -> None:
        super().__init__(reason)
        self.kind, self.reason, self.alive = kind, reason, alive


def deadline_grace_s(deadline_s: float) -> float:
    """How long past its deadline the supervisor waits for a wasmtime worker to say the engine
    stopped the call (and to start a fresh instance) before it kills it: a host call that runs
    on (numpy, OpenCV) is beyond the epoch's reach."""
    return max(0.2, deadline_s)


def _signal_name(returncode: int | None) -> str:
    if returncode is None:
        return "exit status not known"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def sealed_memfd(name: str, data: bytes | None, size: int, seals: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        if data is not None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.lseek(fd, 0, os.SEEK_SET)
        else:
            os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


def take_artifact(fd: int, length) -> tuple[bytes | None, str]:
    """The artifact a worker compiled, from its memfd: (bytes, "") or (None, why not). Only from
    a memfd the worker sealed before any guest code ran (ARTIFACT_SEALS), and of a length that
    fits the memfd and MAX_ARTIFACT_BYTES: the length comes from the worker, which may be a
    module's by then."""
    if isinstance(length, bool) or not isinstance(length, int) or not 0 < length <= MAX_ARTIFACT_BYTES:
        return None, f"an artifact length of {str(length)[:40]!r}"
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        size = os.fstat(fd).st_size
        if seals & ARTIFACT_SEALS != ARTIFACT_SEALS:
            return None, "an artifact in a memfd the worker did not seal before running the module"
        if length > size:
            return None, f"an artifact length of {length} in a memfd of {size} bytes"
        data = os.pread(fd, length, 0)
    except OSError as exc:
        return None, f"an artifact that cannot be read ({exc.strerror or exc})"
    return (data, "") if len(data) == length else (None, "a short artifact")


class WorkerProcess:
    """One running worker: fork (through the zygote), load, process windows, kill."""

    def __init__(self, name: str, wasm: bytes, shm_bytes: int, load: dict, *,
                 spawner: zygote.Zygote | None = None, artifact_cache: ArtifactCache | None = None) -> None:
        self.name = name
        self.shm_bytes = shm_bytes
        self.engine = load.get("backend", "wasm3")
        simd = self.engine == "wasmtime" and bool(load.get("simd"))
        self.artifact_note = ""   # wasmtime: where the compiled code came from
        self._names: list[str] = []   # feature names of the last window reply that carried them
        # Anonymous pages, touched only as far as the largest reply (a bytearray would zero the
        # whole megabyte at once: 0.7 ms a worker start and 1 MiB resident).
        self._inbox = mmap.mmap(-1, SOCKET_BUFFER)
        self._inbox_view = memoryview(self._inbox)
        if wasm[:8] != WASM_PREAMBLE:   # what no tool needs to be asked about
            raise ModuleFault("load", f"{load['label']} is not a valid wasm binary: it does not begin with the wasm "
                                      "magic number and version 1")
        try:
            complaint = wasm_validate_once(wasm, load["label"], simd)
        except ModuleRejected as exc:   # wasm-validate is missing
            raise ModuleFault("load", str(exc)) from None
        if complaint:
            raise ModuleFault("load", f"{load['label']} failed wasm-validate: {complaint}")
        self._zygote = spawner or zygote.shared()
        self._first_window = True
        self.pid = -1
        self.returncode: int | None = None
        self._pidfd = -1
        self._pidfd_lock = threading.Lock()
        self._sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for end in (self._sock, child_sock):   # the worker's end too: it may not set socket options
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        shm_fd = wasm_fd = art_fd = -1
        art_key = ""
        try:
            shm_fd = sealed_memfd(f"ap-window-{name}", None, shm_bytes, WINDOW_SEALS)
            self._shm = mmap.mmap(shm_fd, shm_bytes)
            wasm_fd = sealed_memfd(f"ap-wasm-{name}", wasm, 0, MODULE_SEALS)
            fds = [child_sock.fileno(), shm_fd, wasm_fd]
            if self.engine == "wasmtime":
                # The compiled module from the cache, or nothing: the worker compiles (in its
                # sandbox) and leaves the artifact in this memfd for the cache.
                artifact = b""
                if artifact_cache is not None:
                    art_key = artifact_cache.key(wasm, simd=simd, fuel=load.get("fuel") is not None,
                                                 stack_bytes=int(load["stack_bytes"]))
                    artifact = artifact_cache.get(art_key)
                art_fd = sealed_memfd(f"ap-artifact-{name}", artifact, 0, 0)
                fds.append(art_fd)
                self.artifact_note = "cached" if artifact else "compiled"
            request = {"name": name, "memory_budget_bytes": load["memory_budget_bytes"],
                       "host_nn": load.get("host_nn", False), "module_dir": load.get("module_dir", ""),
                       "engine": self.engine}
            # Queued before the fork: the worker finds it as soon as it looks, instead of waiting
            # for the zygote's answer to reach this process first.
            self._sock.send(json.dumps(load).encode())
            try:
                self.pid, self._pidfd = self._zygote.fork(request, tuple(fds))
            except zygote.ZygoteUnavailable as exc:
                raise ModuleFault("load", f"no worker could be started: {exc}") from None
        except BaseException:
            self._sock.close()   # no worker holds the other end
            raise
        finally:
            child_sock.close()
            for fd in (shm_fd, wasm_fd):
                if fd >= 0:
                    os.close(fd)
        try:
            try:
                reply = self._receive(LOAD_TIMEOUT_S, "load")
            except BaseException:
                self.kill()   # and close: its pidfd and socket must not outlive a failed load
                raise
            if reply.get("art_note"):
                log.warning("module %s: wasmtime %s", name, reply["art_note"])
                self.artifact_note = "compiled (cache entry refused)"
            if "art" in reply and artifact_cache is not None and art_key:
                artifact, refused = take_artifact(art_fd, reply["art"])
                if artifact is None:
                    log.warning("module %s: its worker handed over %s: not cached", name, refused)
                else:
                    artifact_cache.put(art_key, artifact)
        finally:
            if art_fd >= 0:
                os.close(art_fd)
        self.load_logs = reply.get("l", [])
        self.state_note = reply.get("st", "")
        self.footprint_bytes, self.memory_cap_bytes = reply.get("mem", (0, 0))
        self.sandbox_layers: dict[str, bool] = reply.get("sb", {})

    def _receive(self, timeout_s: float, what: str) -> dict:
        if not readable(self._sock, timeout_s):
            self.kill()
            kind = "deadline" if what == "window" else "load"
            raise ModuleFault(kind, f"no answer to {what} within {timeout_s * 1000:.0f} ms; worker killed")
        try:
            # Into a buffer kept for the worker's life: recv(1 MiB) mapped and unmapped a fresh
            # megabyte for every reply (19 us a window against 3 us, measured).
            n = self._sock.recv_into(self._inbox)
            data = bytes(self._inbox_view[:n])
        except ConnectionResetError:
            data = b""
        if not data:
            rc = self._reap()
            raise ModuleFault("crash", f"worker died during {what} ({_signal_name(rc)})")
        if data[:1] == b"S" and len(data) == SANDBOX_VIOLATION.size:
            from appliance.runtime.sandbox.seccomp import syscall_name
            (number,) = SANDBOX_VIOLATION.unpack(data)[1:]
            self._reap()
            raise ModuleFault("sandbox", f"worker made system call {syscall_name(number)} ({number}), which its "
                                         f"sandbox does not allow, during {what}; it was killed")
        if data[:1] == b"R":
            return self._window_reply(data)
        reply = json.loads(data)
        if "fault" in reply:
            for level, text in reply.get("l", []):
                log.log(LEVELS.get(level, logging.INFO), "module %s: %s", self.name, text)
            if reply.get("alive") is True and reply["fault"] == "deadline" and self.engine == "wasmtime":
                raise ModuleFault("deadline", reply["error"], alive=True)
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
        if self.engine == "wasmtime":   # the engine ends the call at the deadline; SIGKILL is the backstop
            deadline_s += deadline_grace_s(deadline_s)
        try:
            return self._receive(deadline_s, "window")
        finally:
            self._start_is_over()

    def _start_is_over(self) -> None:
        """The first window answered (or the worker ends): the zygote may prepare the next spare."""
        if self._first_window:
            self._first_window = False
            self._zygote.refill(self.pid)

    def alive(self) -> bool:
        return self.returncode is None and self._pidfd >= 0 and not readable(self._pidfd, 0)

    def _reap(self) -> int | None:
        """Wait (bounded) for the worker to end; its exit code as Popen gives it (-signal)."""
        if self.returncode is None and self._pidfd >= 0:
            if not readable(self._pidfd, 2.0):
                self.signal_kill()
                readable(self._pidfd, 5.0)
            status = self._zygote.exit_status(self.pid, 2.0)
            self.returncode = os.waitstatus_to_exitcode(status) if status is not None else None
        return self.returncode

    def signal_kill(self) -> None:
        """SIGKILL now, without waiting (any thread: it unblocks the one waiting for a reply)."""
        with self._pidfd_lock:   # never a pidfd number that close() gave back (it may be reused)
            try:
                if self._pidfd >= 0:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except OSError:
                pass

    def kill(self) -> None:
        if self.returncode is None and self.alive():
            self.signal_kill()
            if not readable(self._pidfd, 5.0):
                log.error("module %s: worker %d did not die after SIGKILL", self.name, self.pid)
        self.close()

    def stop(self, timeout_s: float = 1.0) -> None:
        """Ask politely, then kill: a bounded stop."""
        if self.alive():
            try:
                self._sock.send(b"Q")
                readable(self._pidfd, timeout_s)
            except OSError:
                pass
        self.kill()

    def close(self) -> None:
        self._start_is_over()
        with self._pidfd_lock:
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1
        try:
            self._sock.close()
        except OSError:
            pass
        try:
            self._shm.close()
        except (BufferError, ValueError):
            pass
        try:   # a reply being received in another thread keeps it until then (the GC closes it)
            self._inbox_view.release()
            self._inbox.close()
        except (BufferError, ValueError):
            pass
