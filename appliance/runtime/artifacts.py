"""Compiled wasmtime modules kept on the data partition, so a restart does not compile again
(docs/engines.md, "Compiled artifacts").

An entry is named by what it depends on: the module's sha256, the wasmtime version, this CPU
(model and feature flags: Cranelift compiles for the features it finds) and the engine settings
a compiled module holds (SIMD, fuel, stack). Its content is a header with the body's sha256, so
a truncated or damaged file is noticed here, never handed to wasmtime (whose deserialisation
trusts its input); an entry wasmtime itself refuses (say, a version the key did not tell apart)
is compiled again by the worker and replaced. Writes are atomic: a temporary file, then rename.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
from pathlib import Path

log = logging.getLogger("appliance.module")

MAGIC = b"AP-WASMTIME-ARTIFACT 1\n"
KEPT = 64   # entries beyond this, oldest first, go (old builds of modules)


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

    def get(self, key: str) -> bytes:
        """The artifact, or b"" when there is none or it is damaged (then the file goes)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return b""
        except OSError as exc:
            log.warning("wasmtime cache: cannot read %s (%s); compiling", path, exc.strerror)
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
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
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
