"""Compiled wasmtime modules kept on the data partition, so a restart does not compile again
(docs/engines.md, "Compiled artifacts").

An entry is named by what it depends on: the module's sha256, the wasmtime version, this CPU
(model and feature flags: Cranelift compiles for the features it finds) and the engine settings
a compiled module holds (SIMD, fuel, stack). Its content is a header with the body's sha256, so
a truncated or damaged file is noticed here, never handed to wasmtime (whose deserialisation
trusts its input); an entry wasmtime itself refuses (say, a version the key did not tell apart)
is compiled again by the worker and replaced. Writes are atomic: a temporary file, then rename.

The checksum tells damage, not forgery: whoever can write an entry chooses the native code a
module's worker runs. So the directory is the supervisor's alone (0700) and its entries 0600,
and an entry (or a directory) owned by another user, or writable by group or others, is refused
and removed (`trusted`).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import os
import stat
import threading
from pathlib import Path

log = logging.getLogger("appliance.module")

MAGIC = b"AP-WASMTIME-ARTIFACT 1\n"
KEPT = 64   # entries beyond this, least recently used first, go (old builds of modules)


@functools.cache
def wasmtime_version() -> str:
    from importlib.metadata import version
    return version("wasmtime")


@functools.cache
def cpu_tag() -> str:
    """This CPU's model and features, as a short hash (the first processor's block of cpuinfo)."""
    wanted = ("vendor_id", "cpu family", "model", "model name", "flags", "CPU implementer", "CPU architecture",
              "CPU variant", "CPU part", "Features")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    block = text.split("\n\n", 1)[0]
    fields = sorted(line.strip() for line in block.splitlines() if line.split(":", 1)[0].strip() in wanted)
    return hashlib.sha256(f"{os.uname().machine}\n".encode() + "\n".join(fields).encode()).hexdigest()[:16]


class ArtifactCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def key(self, wasm: bytes, *, simd: bool, fuel: bool, stack_bytes: int) -> str:
        settings = f"s{int(simd)}f{int(fuel)}k{stack_bytes >> 10}"
        return f"{hashlib.sha256(wasm).hexdigest()}-wasmtime{wasmtime_version()}-{cpu_tag()}-{settings}"

    def path(self, key: str) -> Path:
        return self.root / f"{key}.cwasm"

    def trusted(self, st: os.stat_result) -> bool:
        """Owned by this process's user and writable by no one else."""
        return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)

    def get(self, key: str) -> bytes:
        """The artifact, or b"" when there is none, or it is damaged or not trusted (then the file goes)."""
        path = self.path(key)
        try:
            with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW)) as f:
                st = os.fstat(f.fileno())
                if not (stat.S_ISREG(st.st_mode) and self.trusted(st) and self.trusted(self.root.stat())):
                    log.warning("wasmtime cache: %s (or its directory) is not the supervisor's alone (owner uid "
                                "%d, mode %o); discarded, compiling again", path, st.st_uid, st.st_mode & 0o7777)
                    self.discard(key)
                    return b""
                data = f.read()
                # Used now: pruning goes by modification time, oldest first, so an entry in use
                # must not look old (one metadata write a module start).
                with contextlib.suppress(OSError):
                    os.utime(f.fileno())
        except FileNotFoundError:
            return b""
        except OSError as exc:
            log.warning("wasmtime cache: cannot read %s (%s); compiling", path, exc.strerror)
            if exc.errno == errno.ELOOP:
                self.discard(key)   # a symlink where an entry should be
            return b""
        head = len(MAGIC) + 64
        if data[:len(MAGIC)] == MAGIC and len(data) > head + 1 and \
                hashlib.sha256(data[head + 1:]).hexdigest().encode() == data[len(MAGIC):head]:
            return data[head + 1:]
        log.warning("wasmtime cache: %s is damaged (truncated or altered); discarded, compiling again", path.name)
        self.discard(key)
        return b""

    def put(self, key: str, artifact: bytes) -> None:
        """Keep an artifact (atomic). A failure (full or read-only /data) costs only the next compile."""
        path = self.path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")   # modules start in threads
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.trusted(self.root.stat()):
                log.warning("wasmtime cache: %s is not the supervisor's alone (writable by others, or another "
                            "owner): nothing is cached there", self.root)
                return
            tmp.unlink(missing_ok=True)   # left by a crash
            with open(tmp, "wb", opener=lambda p, flags: os.open(p, flags | os.O_EXCL | os.O_NOFOLLOW, 0o600)) as f:
                f.write(MAGIC + hashlib.sha256(artifact).hexdigest().encode() + b"\n" + artifact)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            log.warning("wasmtime cache: cannot write %s (%s); the module compiles at its next start too",
                        path, exc.strerror or exc)
            return
        self._prune()

    def discard(self, key: str) -> None:
        with contextlib.suppress(OSError):
            self.path(key).unlink(missing_ok=True)

    def _prune(self) -> None:
        try:
            entries = sorted(self.root.glob("*.cwasm"), key=lambda p: p.stat().st_mtime)
        except OSError:
            return
        for old in entries[:-KEPT]:
            with contextlib.suppress(OSError):
                old.unlink()
