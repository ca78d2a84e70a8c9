"""The zygote: one process that has imported what every worker needs, and forks a worker per
module on request (Chromium's zygote, for the same reasons: a worker starts in a millisecond
instead of a Python start, and shares the libraries' pages instead of loading its own).

The supervisor starts it (`python -m appliance.runtime.zygote`) with one SOCK_SEQPACKET socket.
Requests and answers are JSON datagrams; file descriptors travel as SCM_RIGHTS:

  zygote -> supervisor  {"spare": pid, "kind": k} + its channel and a pidfd: a worker forked ahead
                        of need, already in its sandbox (worker.run_spare); the supervisor starts a
                        module by sending {"op": "fork", ...} + the module's fds down that channel,
                        and once that module has answered its first window (or failed, or
                        stopped) asks for the next spare with {"op": "spare", "kind": k}. Kinds
                        (worker.SPARE_KINDS): "wasm3" (one from the start) and "wasmtime" (its JIT's
                        sandbox; asked for once a wasmtime module has started)
  supervisor -> zygote  {"op": "fork", "name", "memory_budget_bytes", "host_nn", "module_dir", "engine"}
                        + fds (worker socket, window memfd, module memfd[, wasmtime's artifact memfd]):
                        a worker forked for a request a spare cannot serve (a host_nn module's native
                        library is read first; a wasmtime module's sandbox allows its JIT)
  zygote -> supervisor  {"pid": n} + a pidfd of the worker, or {"error": text}
                        {"exit": pid, "status": wait status}   when a worker ends (it reaps them)

The zygote stays single-threaded, so a fork copies no lock some other thread held: BLAS and
OpenCV run one thread (set before they load), nothing here starts a thread. It exits when the
supervisor's end of the socket closes. If it dies, workers already running keep running (they
are not tied to it); the supervisor starts a new one for the next fork (Zygote below).
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from appliance.runtime.fdwait import readable

log = logging.getLogger("appliance.module")

START_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 10.0   # a zygote service that is starting or restarting
FORK_TIMEOUT_S = 10.0
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])   # where `appliance` imports from
MAX_EXITS_KEPT = 4096
SPARE_RETRIES = 5
UNAVAILABLE_S = 5.0   # after the zygote could not be started or reached, starts fail fast this long


# ---- the zygote process ------------------------------------------------------------------------


def preload() -> list[str]:
    """Import (and warm up) everything a worker may use, so that a worker imports nothing after
    it enters its sandbox. Returns what could not be loaded (OpenCV is optional)."""
    missing = []
    from appliance.runtime.hostcalls.dsp import ONE_THREAD
    os.environ.update(ONE_THREAD)   # before numpy and OpenCV load, whatever the environment said
    import numpy as np
    import wasm3  # noqa: F401
    import wasmtime  # noqa: F401  (its library and its ctypes callbacks; engines are made after the fork)
    from appliance.runtime import wasmtime_c  # noqa: F401  (its host-call trampoline: a ctypes callback)
    from appliance.runtime import worker  # noqa: F401
    from appliance.runtime.hostcalls import dsp, nn  # noqa: F401
    from appliance.runtime.sandbox import seccomp
    seccomp.preload()
    for n in (1 << k for k in range(6, 16)):   # the FFT sizes modules use: their plans made once, here
        np.fft.irfft(np.fft.rfft(np.zeros(n, np.float32)), n)
    dsp.keep_heap()                  # malloc's settings carry over into every worker
    from appliance.runtime.sandbox import drop_bounding_set
    drop_bounding_set()              # the zygote switches identity (CAP_SETUID) but never execs
    try:
        from hal.drivers.camera import kernels
        kernels.configure(threads=1)
        kernels.warm_up()
    except ImportError as exc:
        missing.append(f"image kernels ({exc})")
    return missing


def _fork_child(run, closing: list) -> int:
    """Fork; in the child close the zygote's own descriptors, run `run()`, and exit with its code."""
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for thing in closing:
            thing.close() if hasattr(thing, "close") else os.close(thing)
        code = run()
    except BaseException as exc:   # a worker must never return into the zygote's loop
        try:
            sys.stderr.write("worker: " + "".join(traceback.format_exception(exc)))
            sys.stderr.flush()
        except BaseException:
            pass
    finally:
        os._exit(code)


def serve(control: socket.socket) -> int:
    """Serve one supervisor until its end of `control` closes; then end every worker forked for
    it (a worker stuck in a module's endless loop would not notice on its own)."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)   # the wakeup fd is what matters
    children: set[int] = set()
    try:
        _serve(control, wake_r, wake_w, children)
    except OSError:
        pass   # the supervisor went while we answered: the same as its socket closing
    finally:
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return 0


def _serve(control: socket.socket, wake_r: int, wake_w: int, children: set[int]) -> None:
    from appliance.runtime import worker

    def hand_over_a_spare(kind: str = "wasm3") -> None:
        """Fork a spare and give the supervisor its channel and pidfd: the supervisor's next module
        start goes straight to it, without a round trip through here."""
        if kind not in worker.SPARE_KINDS:
            raise ValueError(f"no spare of kind {kind!r}")
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = _fork_child(lambda: worker.run_spare(theirs, kind), [control, mine, wake_r, wake_w])
        children.add(pid)
        theirs.close()
        pidfd = os.pidfd_open(pid)
        try:
            socket.send_fds(control, [json.dumps({"spare": pid, "kind": kind}).encode()], [mine.fileno(), pidfd])
        finally:
            mine.close()
            os.close(pidfd)

    hand_over_a_spare()
    poller = select.poll()   # not select(): the control socket's number is the supervisor's, maybe past 1023
    poller.register(control, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if wake_r in ready:
            while True:
                try:
                    os.read(wake_r, 512)
                except BlockingIOError:
                    break
            _reap(control, children)
        if control.fileno() not in ready:
            continue
        data, fds, _, _ = socket.recv_fds(control, 65536, 4)
        if not data:
            return   # the supervisor is gone
        request: dict = {}
        try:
            request = json.loads(data)
            if request.get("op") == "spare":
                hand_over_a_spare(str(request.get("kind", "wasm3")))
                continue
            if request.get("op") != "fork" or len(fds) not in (3, 4):
                raise ValueError(f"unexpected request {str(request)[:80]} with {len(fds)} fds")
            pid = _fork_child(lambda: worker.run_forked(request, fds), [control, wake_r, wake_w])
            children.add(pid)
            pidfd = os.pidfd_open(pid)
        except (ValueError, OSError) as exc:
            for fd in fds:
                os.close(fd)
            control.send(json.dumps({"error": str(exc), "id": request.get("id")}).encode())
            continue
        for fd in fds:
            os.close(fd)
        try:
            socket.send_fds(control, [json.dumps({"pid": pid, "id": request.get("id")}).encode()], [pidfd])
        finally:
            os.close(pidfd)


def _reap(control: socket.socket, children: set[int]) -> None:
    """Reap every child that ended and tell the supervisor (a worker's exit status)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        control.send(json.dumps({"exit": pid, "status": status}).encode())


def _ready_to_fork() -> dict:
    # Ctrl-C and a service stop reach the whole process group; the supervisor ends the zygote by
    # closing its socket, after it stopped the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    missing = preload()
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        return {"error": "the zygote is not single-threaded after its imports"}
    # What was imported stays put: the collector would otherwise walk (and so write to) every
    # object in each worker, copying the pages a fork shares.
    gc.freeze()
    return {"ready": os.getpid(), "missing": missing}


def listen(path: str) -> int:
    """The zygote as a service of its own (the image's appliance-zygote.service): it waits on a
    unix socket (0600) for its supervisor, serves it until it goes, then waits for the next one.
    Workers already running outlive both: each ends with its own socket to the supervisor."""
    hello = _ready_to_fork()
    if "error" in hello:
        print(f"zygote: {hello['error']}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # here systemd stops it
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if os.path.exists(path):
        os.unlink(path)
    old = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(1)
    print(f"zygote: ready at {path}", file=sys.stderr, flush=True)
    while True:
        conn, _ = listener.accept()
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != os.getuid():   # the socket is 0600; say why anyway
            conn.close()
            continue
        conn.send(json.dumps(hello).encode())
        serve(conn)
        conn.close()


def main() -> int:
    if sys.argv[1:2] == ["--listen"] and len(sys.argv) == 3:
        return listen(sys.argv[2])
    control = socket.socket(fileno=int(os.environ["AP_ZYGOTE_FD"]))
    hello = _ready_to_fork()
    control.send(json.dumps(hello).encode())
    return 1 if "error" in hello else serve(control)


# ---- the supervisor's side ------------------------------------------------------------------------


class ZygoteUnavailable(Exception):
    pass


class SpareRetries:
    """When to ask again for a spare that died unused: later and later, and after SPARE_RETRIES
    in a row no more. Counted per kind: wasmtime's spares failing (a JIT the service's settings
    forbid) must not end wasm3's."""

    def __init__(self) -> None:
        self.failures: dict[str, int] = {}

    def died(self, kind: str) -> float | None:
        """One more died: seconds to wait before asking again, or None: ask no more."""
        n = self.failures[kind] = self.failures.get(kind, 0) + 1
        return 0.1 * 2 ** n if n <= SPARE_RETRIES else None

    def just_gave_up(self, kind: str) -> bool:
        return self.failures.get(kind, 0) == SPARE_RETRIES + 1

    def may_ask(self, kind: str) -> bool:
        return self.failures.get(kind, 0) <= SPARE_RETRIES

    def used(self, kind: str) -> None:
        """A spare of this kind served a module: the kind works."""
        self.failures[kind] = 0


class Zygote:
    """The supervisor's handle: starts the zygote on first use and again after it died, forks
    workers through it, and keeps the exit status of each worker it reaped."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path                       # a zygote service's socket; None: start our own
        self._lock = threading.Lock()          # one fork request at a time
        self._cond = threading.Condition()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._answers: list[tuple[dict, list[int]]] = []
        self._exits: dict[int, int] = {}
        self._spares: dict[str, tuple[int, socket.socket, int]] = {}   # kind -> pid, channel, pidfd
        self._spare_retries = SpareRetries()
        self._owed: dict[str, tuple[int, socket.socket]] = {}   # kind -> the spare taken (pid), its zygote
        self._requests = 0
        self._unavailable_until = 0.0   # after a failed start: fail fast for a while
        self.starts = 0
        self.pid: int | None = None

    def _connect(self) -> tuple[socket.socket, None]:
        """To the zygote service, waiting for it (it may be starting, or restarting)."""
        end = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                sock.connect(self.path)
                return sock, None
            except OSError as exc:
                sock.close()
                if time.monotonic() > end:
                    raise ZygoteUnavailable(f"no zygote at {self.path} ({exc.strerror})") from None
                time.sleep(0.2)

    def _spawn(self) -> tuple[socket.socket, subprocess.Popen]:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p),
               "AP_ZYGOTE_FD": str(theirs.fileno())}
        try:
            proc = subprocess.Popen([sys.executable, "-m", "appliance.runtime.zygote"], pass_fds=(theirs.fileno(),),
                                    env=env, stdin=subprocess.DEVNULL, close_fds=True)
        finally:
            theirs.close()
        return mine, proc

    def _start(self) -> None:
        mine, proc = self._connect() if self.path else self._spawn()
        hello = json.loads(mine.recv(65536) or b"{}") if readable(mine, START_TIMEOUT_S) else {}
        if "ready" not in hello:
            if proc is not None:
                proc.kill()
                proc.wait()
            mine.close()
            raise ZygoteUnavailable(hello.get("error") or "the zygote did not start")
        for what in hello.get("missing", []):
            log.warning("zygote: %s not available; modules that use them cannot start", what)
        self._sock, self._proc, self.pid = mine, proc, hello["ready"]
        self.starts += 1
        log.info("zygote pid %d ready (%s %d)", self.pid, f"connection to {self.path}" if self.path else "start",
                 self.starts)
        threading.Thread(target=self._read, args=(mine, proc), name="zygote-reader", daemon=True).start()

    def _read(self, sock: socket.socket, proc: subprocess.Popen | None) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(sock, 65536, 2)
            except OSError:
                data, fds = b"", []
            if not data:
                break
            msg = json.loads(data)
            with self._cond:
                if "exit" in msg:
                    self._exits[msg["exit"]] = msg["status"]
                    while len(self._exits) > MAX_EXITS_KEPT:
                        self._exits.pop(next(iter(self._exits)))
                    for kind, spare in list(self._spares.items()):
                        if spare[0] == msg["exit"]:   # it died unused
                            self._drop_spare(kind)
                            self._spare_died(sock, msg["status"], kind)
                elif "spare" in msg and len(fds) == 2:
                    kind = str(msg.get("kind", "wasm3"))
                    self._drop_spare(kind)
                    self._spares[kind] = (msg["spare"], socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0,
                                                                      fds[0]), fds[1])
                else:
                    self._answers.append((msg, fds))
                self._cond.notify_all()
        rc = proc.wait() if proc is not None else None
        with self._cond:
            for kind in list(self._spares):
                self._drop_spare(kind)   # the zygote is gone: its spares end too (their channels closed)
            if self._sock is sock:
                self._sock = None
                how = "connection closed" if rc is None else f"exit status {rc}" if rc >= 0 else f"signal {-rc}"
                log.error("zygote pid %d ended (%s); the next worker start %s", self.pid, how,
                          "connects again" if self.path else "begins a new one")
            self._cond.notify_all()
        sock.close()

    def _drop_spare(self, kind: str) -> None:
        """Call with the condition held."""
        spare = self._spares.pop(kind, None)
        if spare is not None:
            spare[1].close()
            os.close(spare[2])

    def _ask_for_spare(self, sock: socket.socket, kind: str = "wasm3") -> None:
        try:
            sock.send(json.dumps({"op": "spare", "kind": kind}).encode())
        except OSError:
            pass

    def _spare_died(self, sock: socket.socket, status: int, kind: str) -> None:
        """A spare died before it was used: something fails in every spare (a sandbox layer this
        machine refuses, say). Ask again later and later; after a few, stop asking (module starts
        then fork on request, and their faults say what is wrong). Call with the condition held."""
        delay = self._spare_retries.died(kind)
        if delay is None:
            if self._spare_retries.just_gave_up(kind):
                log.error("zygote: %d %s spare workers in a row died before use (last: wait status %d); no more "
                          "such spares (each such module start forks its worker on request)", SPARE_RETRIES, kind,
                          status)
            return
        timer = threading.Timer(delay, self._ask_for_spare, (sock, kind))
        timer.daemon = True
        timer.start()

    def _take_spare(self, request: dict, fds: tuple[int, ...]) -> tuple[int, int] | None:
        """Hand the request to the ready spare of its kind: (pid, pidfd), or None if there is none
        that fits. A kind's first request finds none, and asks for one for the next."""
        from appliance.runtime.worker import spare_kind
        kind = spare_kind(request)
        if kind is None:
            return None
        with self._cond:
            spare = self._spares.pop(kind, None)
            sock = self._sock
            owed = self._owed.pop(kind, None) if spare is None else None
        if spare is None:   # this start forks on request; the next one should find a spare
            if sock is not None and (owed is not None or kind != "wasm3" and self._spare_retries.may_ask(kind)):
                self._ask_for_spare(sock, kind)
            return None
        pid, channel, pidfd = spare
        self._spare_retries.used(kind)
        try:
            socket.send_fds(channel, [json.dumps({"op": "fork", **request}).encode()], list(fds))
        except OSError:   # it died meanwhile: fork one the slow way
            os.close(pidfd)
            return None
        finally:
            channel.close()
            if sock is not None:
                # Asked for when the module just handed over has started (refill): the next
                # spare's fork, sandbox and warm-up would take the CPU from that start.
                with self._cond:
                    self._owed[kind] = (pid, sock)
        return pid, pidfd

    def refill(self, pid: int) -> None:
        """Worker `pid` has answered its first window, or failed to start, or stopped: if it was
        the spare last taken of its kind, ask for the next one (from the zygote that runs now; a
        start that finds no spare asks too)."""
        with self._cond:
            kind = next((k for k, (taken, _) in self._owed.items() if taken == pid), None)
            owed = self._owed.pop(kind) if kind is not None else None
            sock = self._sock
        if owed is not None and owed[1] is sock:
            self._ask_for_spare(sock, kind)

    def spares(self) -> dict[str, int]:
        """The spares ready to take: kind -> pid."""
        with self._cond:
            return {kind: spare[0] for kind, spare in self._spares.items()}

    def ensure_started(self) -> None:
        with self._lock:
            if self._sock is None:
                self._start()

    def fork(self, request: dict, fds: tuple[int, int, int]) -> tuple[int, int]:
        """A new worker: (pid, pidfd). The fds are the worker's; the caller closes its copies."""
        with self._lock:
            if self._sock is None:
                if time.monotonic() < self._unavailable_until:
                    raise ZygoteUnavailable("the zygote could not be reached a moment ago")
                try:
                    self._start()
                except ZygoteUnavailable:
                    self._unavailable_until = time.monotonic() + UNAVAILABLE_S
                    raise
            taken = self._take_spare(request, fds)
            if taken is None:
                taken = self._fork_on_request(request, fds)
        with self._cond:
            self._exits.pop(taken[0], None)   # a status of an earlier process with this pid
        return taken

    def _fork_on_request(self, request: dict, fds: tuple[int, int, int]) -> tuple[int, int]:
        """Call with _lock held."""
        sock = self._sock
        if sock is None:   # it ended since this request began (its reader saw it go)
            raise ZygoteUnavailable("the zygote is gone")
        self._requests += 1
        ident = self._requests
        try:
            socket.send_fds(sock, [json.dumps({"op": "fork", "id": ident, **request}).encode()], list(fds))
        except OSError as exc:
            raise ZygoteUnavailable(f"the zygote is gone ({exc})") from None
        end = time.monotonic() + FORK_TIMEOUT_S
        with self._cond:
            while True:
                while self._answers and self._answers[0][0].get("id") != ident:
                    _, stale = self._answers.pop(0)   # the answer to a request that timed out
                    for fd in stale:
                        os.close(fd)
                if self._answers:
                    answer, got = self._answers.pop(0)
                    break
                left = end - time.monotonic()
                if left <= 0 or self._sock is not sock:
                    raise ZygoteUnavailable("the zygote did not answer a fork request")
                self._cond.wait(left)
        if "error" in answer:
            for fd in got:
                os.close(fd)
            raise ZygoteUnavailable(answer["error"])
        return answer["pid"], got[0]

    def exit_status(self, pid: int, timeout_s: float) -> int | None:
        """The worker's wait status once the zygote reaped it; None if not known in time."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while pid not in self._exits:
                left = end - time.monotonic()
                if left <= 0 or self._sock is None:
                    return None
                self._cond.wait(left)
            return self._exits.pop(pid)

    def stop(self) -> None:
        with self._lock:
            sock, proc = self._sock, self._proc
            self._sock = None
        if sock is not None:
            with contextlib.suppress(OSError):   # the reader may have closed it as the zygote went
                sock.shutdown(socket.SHUT_RDWR)
        if proc is not None:
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()


_shared: Zygote | None = None
_shared_lock = threading.Lock()


def shared() -> Zygote:
    """This process's zygote (a supervisor, a test or a benchmark has one)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Zygote()
        return _shared


SERVICE_SOCKET = Path("/run/appliance-zygote/zygote.sock")   # appliance-zygote.service on the image


def service_socket() -> Path | None:
    """The image's zygote service, when it runs here (a config written without runtime.zygote
    must not lose the sandbox the service gives)."""
    return SERVICE_SOCKET if SERVICE_SOCKET.exists() else None


def configure(path: str | None) -> Zygote:
    """Use the zygote service at `path` (runtime.zygote in the YAML), or None: start our own.
    A change stops using the old one; workers already running are not affected."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.path != (path or None):
            old, _shared = _shared, Zygote(path or None)
            if old is not None:
                old.stop()
        return _shared


if __name__ == "__main__":
    sys.exit(main())
