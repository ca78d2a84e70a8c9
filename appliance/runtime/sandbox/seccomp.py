"""A seccomp-bpf allow-list for module workers, compiled by libseccomp (through ctypes; no BPF by
hand). libseccomp2 is part of every Debian system (apt depends on it).

The list is the steady state of a worker that has imported everything in the zygote: talk on
its socket, compute, map memory that is never executable, exit. Opening a file is answered with
EACCES (a library that probes a file gets an error it handles, and Landlock refuses it too),
an ioctl with ENOTTY (Python asks whether a file is a terminal);
any other call outside the list raises SIGSYS, which the worker reports (the call's name) and
dies of: a fault of kind `sandbox`.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os

ACT_TRAP = 0x00030000
ACT_ALLOW = 0x7FFF0000
CMP_EQ, CMP_MASKED_EQ = 4, 7
ATTR_OPTIMIZE = 8   # SCMP_FLTATR_CTL_OPTIMIZE (libseccomp >= 2.5)
CLONE_THREAD = 0x00010000
PR_SET_NAME = 15


def ACT_ERRNO(code: int) -> int:   # noqa: N802 (libseccomp's name)
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


_lib = None


def library():
    """libseccomp, loaded once (by the zygote, before any fork: a sandboxed worker cannot open it)."""
    global _lib
    if _lib is None:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)   # the soname: no search (it runs gcc)
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                               ctypes.POINTER(_ArgCmp)]
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_syscall_resolve_num_arch.argtypes = [ctypes.c_uint32, ctypes.c_int]
        lib.seccomp_syscall_resolve_num_arch.restype = ctypes.c_void_p
        _lib = lib
    return _lib


# Everything a worker's steady state calls, by name (a name this architecture lacks is skipped:
# aarch64 has no open, poll or select).
ALLOWED = (
    "read", "write", "readv", "writev", "pread64", "close", "fstat", "newfstatat", "statx", "lseek",
    "brk", "munmap", "mremap", "madvise", "futex", "set_robust_list", "rseq",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack",
    "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid",
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "sched_yield",
    "sched_getaffinity", "getrandom", "getrusage", "getrlimit", "sysinfo", "uname", "getcwd",
    "sendto", "sendmsg", "recvfrom", "recvmsg", "getsockname", "getsockopt", "select", "pselect6", "poll", "ppoll",
    "fcntl", "dup", "exit", "exit_group", "membarrier", "restart_syscall",
)
REFUSED_EACCES = ("open", "openat", "openat2", "creat")


_numbers: dict[str, int] = {}


def syscall_number(name: str) -> int:
    """This architecture's number for a system call (negative: it has no such call). Resolved
    once, in the zygote (preload), so a worker's filter is quick to build."""
    if name not in _numbers:
        _numbers[name] = library().seccomp_syscall_resolve_name(name.encode())
    return _numbers[name]


def preload() -> None:
    for name in (*ALLOWED, *REFUSED_EACCES, "ioctl", "clone3", "clone", "mmap", "mprotect", "kill", "tkill",
                 "tgkill", "prlimit64", "setrlimit", "prctl"):
        syscall_number(name)


def syscall_name(number: int) -> str:
    """The name of a system call number on this machine ('?' if libseccomp does not know it)."""
    lib = library()
    ptr = lib.seccomp_syscall_resolve_num_arch(0, number)   # 0: the native architecture
    if not ptr:
        return "?"
    name = ctypes.string_at(ptr).decode()
    ctypes.CDLL(None).free(ctypes.c_void_p(ptr))
    return name


def install(executable_mappings: bool = False, jit: bool = False) -> int:
    """Load the filter into this process (no_new_privs must be set). Returns the rule count.
    executable_mappings: for a worker that loads a verified native library for ap.nn_run (its
    module's host_nn: true): PROT_EXEC mappings and opening /proc/self/fd/N (the library's memfd,
    which Landlock allows as it allows no real file).
    jit: for a wasmtime worker: mmap and mprotect may ask for PROT_EXEC without PROT_WRITE (the
    JIT writes code into read-write pages, then turns them read-execute); W+X stays refused,
    and nothing else opens (docs/engines.md, "Sandbox")."""
    lib = library()
    ctx = lib.seccomp_init(ACT_TRAP)
    if not ctx:
        raise OSError("seccomp_init failed")
    rules = 0
    try:
        def add(name: str, action: int = ACT_ALLOW, *cmps: tuple[int, int, int, int]) -> None:
            nonlocal rules
            number = syscall_number(name)
            if number < 0:
                return   # not a system call on this architecture
            arr = (_ArgCmp * max(len(cmps), 1))(*[_ArgCmp(*c) for c in cmps])
            rc = lib.seccomp_rule_add_array(ctx, action, number, len(cmps), arr)
            if rc < 0:
                raise OSError(-rc, f"seccomp_rule_add {name}: {os.strerror(-rc)}")
            rules += 1

        for name in ALLOWED:
            add(name)
        for name in REFUSED_EACCES:
            if executable_mappings and name in ("openat", "open"):
                add(name)   # dlopen of /proc/self/fd/N (the library's memfd); Landlock refuses real files
            else:
                add(name, ACT_ERRNO(errno.EACCES))
        # Python asks whether a file is a terminal (TCGETS); every ioctl is refused as "not a tty".
        add("ioctl", ACT_ERRNO(errno.ENOTTY))
        # glibc tries clone3 first and falls back to clone, whose flags a filter can read.
        add("clone3", ACT_ERRNO(errno.ENOSYS))
        add("clone", ACT_ALLOW, (0, CMP_MASKED_EQ, CLONE_THREAD, CLONE_THREAD))   # threads, never a process
        if executable_mappings:
            add("mmap")
            add("mprotect")
        else:
            add("mmap", ACT_ALLOW, (2, CMP_MASKED_EQ, mmap.PROT_EXEC, 0))
            add("mprotect", ACT_ALLOW, (2, CMP_MASKED_EQ, mmap.PROT_EXEC, 0))
            if jit:
                # Code only in anonymous memory: a file (a memfd the worker holds) mapped
                # executable could be written through its descriptor meanwhile.
                wx = mmap.PROT_WRITE | mmap.PROT_EXEC
                add("mmap", ACT_ALLOW, (2, CMP_MASKED_EQ, wx, mmap.PROT_EXEC),
                    (3, CMP_MASKED_EQ, mmap.MAP_ANONYMOUS, mmap.MAP_ANONYMOUS))
                add("mprotect", ACT_ALLOW, (2, CMP_MASKED_EQ, wx, mmap.PROT_EXEC))
        pid = os.getpid()
        for name in ("kill", "tkill"):   # raise() and abort() signal only this process
            add(name, ACT_ALLOW, (0, CMP_EQ, pid, 0))
        add("tgkill", ACT_ALLOW, (0, CMP_EQ, pid, 0))
        # Limits: without CAP_SYS_RESOURCE a process can only lower a hard limit (a spare worker
        # sets its memory cap once it knows its module), and only its own (pid 0).
        add("prlimit64", ACT_ALLOW, (0, CMP_EQ, 0, 0))
        add("setrlimit")
        add("prctl", ACT_ALLOW, (0, CMP_EQ, PR_SET_NAME, 0))   # its name in ps, once it knows its module
        # A binary tree of the rules rather than a list: every system call of the worker runs the
        # filter, and the steady state's calls sit at its end.
        lib.seccomp_attr_set(ctx, ATTR_OPTIMIZE, 2)
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")
    finally:
        lib.seccomp_release(ctx)
    return rules
