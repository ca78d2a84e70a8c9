"""Check a module before any engine sees it: wasm3 can segfault on invalid input."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from appliance.runtime.wasm_binary import WasmFormatError, WasmInfo, check_abi_v1, parse

MAX_MODULE_BYTES = 16 << 20
WASM_VALIDATE_FLAGS = ["--disable-reference-types", "--disable-simd"]
# A wasmtime module's SIMD128 build (x.simd.wasm beside x.wasm; docs/engines.md): wasm3 never gets one.
WASM_VALIDATE_FLAGS_SIMD = ["--disable-reference-types"]
VALIDATE_MEMORY_BYTES = 1 << 30
_validated: dict[str, str | None] = {}   # sha256 -> wasm-validate's verdict (a restart does not ask again)
_validated_lock = threading.Lock()
_VALIDATED_KEPT = 256


class ModuleRejected(Exception):
    """The module may not be loaded; the message says why."""


@dataclass(frozen=True)
class ValidatedModule:
    path: Path
    wasm: bytes
    sha256: str


def wasm_validate(wasm: bytes, label: str, simd: bool = False) -> str | None:
    """wasm-validate's complaint, or None when the binary is valid. The features wasm3 lacks
    are disabled, so a module that uses them is rejected here, not crashed on later (simd: SIMD128
    allowed, for wasmtime alone). It runs as
    its own process, capped (prlimit) when util-linux's prlimit is there: a crash or a blow-up in
    it is a rejection, never harm to the caller."""
    return _run_wasm_validate(wasm, label, simd)[0]


def _run_wasm_validate(wasm: bytes, label: str, simd: bool = False) -> tuple[str | None, bool]:
    """(complaint, whether the bytes alone decided it: not a timeout, not a limit that a busy
    machine may have hit)."""
    tool = shutil.which("wasm-validate")
    if tool is None:
        raise ModuleRejected("wasm-validate (Debian package 'wabt') is not installed; modules cannot be "
                             "checked, so none is loaded")
    try:
        limit = shutil.which("prlimit")
        capped = [limit, f"--data={VALIDATE_MEMORY_BYTES}", "--cpu=60", "--"] if limit else []
        flags = WASM_VALIDATE_FLAGS_SIMD if simd else WASM_VALIDATE_FLAGS
        proc = subprocess.run([*capped, tool, *flags, "-"], input=wasm, capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "wasm-validate timed out", False
    if proc.returncode == 0:
        return None, True
    text = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip().replace("-:", f"{label}:", 1)
    first = text.splitlines()[0] if text else ""
    if proc.returncode < 0:
        # wabt recurses per nested block; absurd nesting kills it, which is a rejection too.
        transient = -proc.returncode in (signal.SIGKILL, signal.SIGXCPU)   # out of memory or CPU time
        return f"{first} (wasm-validate died with signal {-proc.returncode})".strip(), not transient
    return first or f"exit status {proc.returncode}", True


def wasm_validate_once(wasm: bytes, label: str, simd: bool = False) -> str | None:
    """wasm_validate, remembered by the bytes' sha256 (and the features allowed) when the bytes
    alone decided it."""
    digest = hashlib.sha256(wasm).hexdigest() + ("+simd" if simd else "")
    if digest in _validated:
        return _validated[digest]
    verdict, definitive = _run_wasm_validate(wasm, label, simd)
    if verdict is not None and verdict.startswith(f"{label}:"):
        verdict = verdict[len(label) + 1:].lstrip()   # the label is the caller's to add
    if definitive:
        with _validated_lock:
            while len(_validated) >= _VALIDATED_KEPT:
                _validated.pop(next(iter(_validated)))
            _validated[digest] = verdict
    return verdict


def read_module(path: Path) -> bytes:
    """The module file's bytes: a regular file of bounded size, read without blocking (a FIFO
    or /dev/zero behind a symlink must not hang or exhaust the supervisor)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ModuleRejected(f"cannot open {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModuleRejected(f"{path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            # As many bytes as the file has, and one more to see it growing: no buffer of the
            # limit's size allocated for every start.
            wasm = f.read(min(st.st_size, MAX_MODULE_BYTES) + 1)
    except OSError as exc:
        raise ModuleRejected(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(wasm) > MAX_MODULE_BYTES:
        raise ModuleRejected(f"{path} is larger than {MAX_MODULE_BYTES >> 20} MiB, the limit for a module")
    if len(wasm) > st.st_size:
        raise ModuleRejected(f"{path} changed while it was read (being written?)")
    return wasm


def check_module(wasm: bytes, label: str, max_memory_bytes: int, *, validated: bool = False,
                 simd: bool = False) -> WasmInfo:
    """Raise ModuleRejected unless the bytes are valid wasm following ABI v1. A worker runs it in
    its sandbox, under its memory cap and load deadline (parsing untrusted bytes can cost memory
    and time, and that cost must not land on the supervisor), with validated=True: the
    supervisor ran wasm-validate (a program a sandboxed worker cannot start) before the fork."""
    try:
        info = parse(wasm)
    except WasmFormatError as exc:
        raise ModuleRejected(f"{label} is not a valid wasm binary: {exc}") from None
    complaint = None if validated else wasm_validate(wasm, label, simd)
    if complaint:
        raise ModuleRejected(f"{label} failed wasm-validate: {complaint}")
    problems = check_abi_v1(info, max_memory_bytes)
    if problems:
        raise ModuleRejected(f"{label} does not follow ABI v1: " + "; ".join(problems))
    return info


def validate_module(path: Path, max_memory_bytes: int) -> ValidatedModule:
    """Read and check in this process (tools and benchmarks; the supervisor splits the two)."""
    wasm = read_module(path)
    check_module(wasm, path.name, max_memory_bytes)
    return ValidatedModule(path, wasm, hashlib.sha256(wasm).hexdigest())
