"""The worker's sandbox, entered in layers right after the zygote forks it and before it reads
a byte of the module. Each layer alone blocks what it can (docs/sandbox.md has the drill):

  identity    an unused uid and gid, no supplementary groups (when the zygote may switch
              identity: root or CAP_SETUID; otherwise the supervisor's uid, said so once)
  namespaces  a user namespace with a fresh network namespace: no interface but a downed lo
  limits      no_new_privs, no capabilities, not dumpable, RLIMIT_NPROC 1, NOFILE, CORE 0;
              every file descriptor closed but the ones it was handed
  landlock    no file-system right, no TCP, no signal or abstract socket outside itself
  seccomp     an allow-list of system calls (seccomp.py)

Where the kernel lacks a layer the worker starts anyway and reports the layer as missing
(logged once; appliance_worker_sandbox_layers{module,layer} = 0).
"""
from __future__ import annotations

import ctypes
import os
import resource
from dataclasses import dataclass, field

from appliance.runtime.sandbox import landlock, seccomp

LAYERS = ("identity", "network", "limits", "landlock", "seccomp")

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_READ, PR_CAPBSET_DROP = 4, 38, 23, 24
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
CAPABILITY_VERSION_3 = 0x20080522
OPEN_FILES = 16

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Policy:
    uid: int = 59999                 # the top of Debian's range for local accounts: unused on a gateway
    gid: int = 59999
    executable_mappings: bool = False
    # wasmtime's JIT: pages that become executable once written (never both at once); and the
    # threads the worker may run (RLIMIT_NPROC), 2 for its epoch ticker (docs/engines.md).
    jit: bool = False
    threads: int = 1
    # Layers to leave out: for the escape drill alone (it proves what the others hold by themselves).
    skip: frozenset[str] = frozenset()


@dataclass
class Report:
    """Which layers hold, and why one does not."""
    applied: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    native_code: bool = False   # the worker may load a verified native library (host_nn)

    def missing(self) -> list[str]:
        return [layer for layer in LAYERS if not self.applied.get(layer)]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def drop_bounding_set() -> None:
    """No capability can ever be gained again by this process or what it forks (the zygote does
    it once at start; a worker only checks)."""
    for cap in range(64):
        held = _libc.prctl(PR_CAPBSET_READ, cap, 0, 0, 0)
        if held < 0:   # past the last capability this kernel knows
            break
        if held:
            _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)


def _drop_capabilities() -> None:
    drop_bounding_set()
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    if _libc.capget(header, data) == 0 and not any(data):
        return   # none held (an unprivileged service whose filter may refuse capset itself)
    data = (ctypes.c_uint32 * 6)()
    _check(_libc.capset(header, data), "capset")


def enter(policy: Policy, keep_fds: tuple[int, ...]) -> Report:
    """Enter every layer this kernel offers, in order; raise only when a layer that exists fails."""
    report = Report()
    # identity: from root (or CAP_SETUID) to the worker's own uid, no groups.
    try:
        if "identity" in policy.skip:
            raise PermissionError("skipped")
        os.setgroups([])
        os.setresgid(policy.gid, policy.gid, policy.gid)
        os.setresuid(policy.uid, policy.uid, policy.uid)
        report.applied["identity"] = True
    except PermissionError:
        report.applied["identity"] = False
        report.notes.append("identity: the zygote may not switch uid (not root, no CAP_SETUID); "
                            "the worker keeps the supervisor's uid")
    # network: a user namespace (which unprivileged processes may create) holding a new netns.
    if "network" not in policy.skip and _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        report.applied["network"] = True
    else:
        report.applied["network"] = False
        report.notes.append(f"network: no new network namespace ({os.strerror(ctypes.get_errno())})")
    # limits
    _drop_capabilities()
    _check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "PR_SET_DUMPABLE")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    keep = set(keep_fds) | {2}   # stderr: the service's journal, for a traceback
    for fd in os.listdir("/proc/self/fd"):
        if int(fd) not in keep:
            try:
                os.close(int(fd))
            except OSError:
                pass
    # (No RLIMIT_FSIZE: Landlock and seccomp leave no file to write, and a traceback to a stderr
    # that is a regular file must not end the worker with SIGXFSZ.)
    for limit, value in ((resource.RLIMIT_NPROC, policy.threads), (resource.RLIMIT_NOFILE, OPEN_FILES + len(keep)),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    report.applied["limits"] = True
    # landlock
    try:
        if "landlock" in policy.skip:
            raise OSError("skipped")
        abi = landlock.restrict()
        report.applied["landlock"] = True
        if abi < 6:
            report.notes.append(f"landlock: kernel ABI {abi}; signals and abstract sockets are held by seccomp alone"
                                if abi >= 4 else f"landlock: kernel ABI {abi}; TCP and signals are held by the "
                                "network namespace and seccomp")
    except OSError as exc:
        report.applied["landlock"] = False
        report.notes.append(f"landlock: {exc}")
    # A worker that may map executable memory (a host_nn native library) and open /proc/self/fd
    # leans on Landlock to refuse every real file: without Landlock it gets the strict filter,
    # and its module runs its own wasm code.
    executable = policy.executable_mappings and report.applied["landlock"]
    if policy.executable_mappings and not executable:
        report.notes.append("host_nn: off, because Landlock is missing (a worker that may run native code "
                            "must not be able to open files); the module runs its own wasm code")
    report.native_code = executable
    # seccomp, last: everything above needed calls it forbids.
    try:
        if "seccomp" in policy.skip:
            raise OSError("skipped")
        seccomp.install(executable, jit=policy.jit)
        report.applied["seccomp"] = True
    except OSError as exc:
        report.applied["seccomp"] = False
        report.notes.append(f"seccomp: {exc}")
    return report
