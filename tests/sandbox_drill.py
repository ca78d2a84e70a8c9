"""The escape drill's attacker (tests/test_sandbox.py runs it as its own process).

It loads what the zygote loads, then for each attempt forks a child that enters the sandbox
through the very function every worker goes through (worker.enter_sandbox), and runs the
attempt in Python: what code execution inside wasm3 could do. The child reports on a socket
that stands where a worker's supervisor socket stands (the SIGSYS reporter writes to it too).

Usage: python sandbox_drill.py SPEC.json  ->  one JSON object {attempt: outcome} on stdout,
where an outcome is "ok" (the attempt worked) or how it was refused.
"""
from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import select
import signal
import socket
import sys

from appliance.runtime import worker, zygote
from appliance.runtime.process import WINDOW_SEALS, sealed_memfd
from appliance.runtime.sandbox.seccomp import syscall_name
from appliance.runtime.wire import SANDBOX_VIOLATION

libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int) -> None:
    if rc == -1:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def attempts(spec: dict, window_fd: int) -> dict:
    def read(path):
        with open(path, "rb") as f:
            f.read(16)

    def write(path):
        with open(path, "r+b") as f:
            f.write(b"x")

    def connect_unix(path):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)

    def connect_tcp(port):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(("127.0.0.1", port))

    def fork():
        pid = os.fork()
        if pid == 0:
            os._exit(0)

    def mprotect_exec():
        page = mmap.mmap(-1, mmap.PAGESIZE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        _check(libc.mprotect(ctypes.c_void_p(address), mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC))

    def plant():
        with open(os.path.join(spec["data_dir"], "planted"), "w") as f:
            f.write("x")

    return {
        "read the config YAML": lambda: read(spec["config"]),
        "read the spool": lambda: read(spec["spool"]),
        "write the spool": lambda: write(spec["spool"]),
        "connect to control.sock": lambda: connect_unix(spec["control"]),
        "connect TCP to a listening port": lambda: connect_tcp(spec["tcp"]),
        "connect TCP to Mosquitto": lambda: connect_tcp(spec["mqtt"]),
        "open an i2c device node": lambda: os.close(os.open(spec["i2c"], os.O_RDWR)),
        "open a pty (serial line)": lambda: os.close(os.open(spec["pty"], os.O_RDWR | os.O_NOCTTY)),
        "fork": fork,
        "execve /bin/sh": lambda: os.execv("/bin/sh", ["sh", "-c", "true"]),
        "ptrace the supervisor": lambda: _check(libc.ptrace(16, spec["supervisor"], None, None)),   # PTRACE_ATTACH
        "signal the supervisor": lambda: os.kill(spec["supervisor"], signal.SIGWINCH),
        "write under the data directory": plant,
        "ftruncate the window memfd": lambda: os.ftruncate(window_fd, 0),
        "mprotect a page executable": mprotect_exec,
    }


def run_one(spec: dict, name: str, window_fd: int) -> str:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            mine.close()
            request = {"name": "drill", "memory_budget_bytes": 64 << 20, "skip_layers": spec.get("skip", [])}
            fds = (theirs.fileno(), window_fd)
            worker.enter_sandbox(request, fds)
            try:
                attempts(spec, window_fd)[name]()
                outcome = "ok"
            except OSError as exc:
                outcome = f"{errno.errorcode.get(exc.errno, exc.errno)} ({exc.strerror})"
            os.write(theirs.fileno(), json.dumps(outcome).encode())
        except BaseException as exc:   # a drill that cannot run must not pass as refused
            os.write(theirs.fileno(), json.dumps(f"drill error: {type(exc).__name__}: {exc}").encode())
            code = 1
        finally:
            os._exit(code)
    theirs.close()
    outcome = None
    if select.select([mine], [], [], 20)[0]:
        data = mine.recv(65536)
        if data[:1] == b"S" and len(data) == SANDBOX_VIOLATION.size:
            number = SANDBOX_VIOLATION.unpack(data)[1]
            outcome = f"killed: SIGSYS, {syscall_name(number)} is not on the allow-list"
        elif data:
            outcome = json.loads(data)
    _, status = os.waitpid(pid, 0)
    if outcome is None:
        outcome = (f"killed by {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
                   else f"drill error: no report (exit status {os.WEXITSTATUS(status)})")
    return outcome


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    zygote.preload()
    window_fd = sealed_memfd("ap-window-drill", None, 1 << 16, WINDOW_SEALS)
    os.set_inheritable(window_fd, True)
    names = list(attempts(spec, window_fd))
    print(json.dumps({name: run_one(spec, name, window_fd) for name in names}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
