"""Check a module before any engine sees it: wasm3 can segfault on invalid input."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from appliance.wasm_binary import WasmFormatError, check_abi_v1, parse

MAX_MODULE_BYTES = 16 << 20
WASM_VALIDATE_FLAGS = ["--disable-reference-types", "--disable-simd"]


class ModuleRejected(Exception):
    """The module may not be loaded; the message says why."""


@dataclass(frozen=True)
class ValidatedModule:
    path: Path
    wasm: bytes
    sha256: str


def wasm_validate(wasm: bytes, label: str) -> str | None:
    """wasm-validate's complaint, or None when the binary is valid. The features wasm3 lacks
    are disabled, so a module that uses them is rejected here, not crashed on later."""
    tool = shutil.which("wasm-validate")
    if tool is None:
        raise ModuleRejected("wasm-validate (Debian package 'wabt') is not installed; modules cannot be "
                             "checked, so none is loaded")
    try:
        proc = subprocess.run([tool, *WASM_VALIDATE_FLAGS, "-"], input=wasm, capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "wasm-validate timed out"
    if proc.returncode == 0:
        return None
    text = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip().replace("-:", f"{label}:", 1)
    first = text.splitlines()[0] if text else ""
    if proc.returncode < 0:
        # wabt recurses per nested block; absurd nesting kills it, which is a rejection too.
        return f"{first} (wasm-validate died with signal {-proc.returncode})".strip()
    return first or f"exit status {proc.returncode}"


def validate_module(path: Path, max_memory_bytes: int, known_good: str | None = None) -> ValidatedModule:
    """Read and check the file; `known_good` is a sha256 that already passed (restarts skip
    re-running wasm-validate when the file has not changed)."""
    try:
        size = path.stat().st_size
        if size > MAX_MODULE_BYTES:
            raise ModuleRejected(f"{path} is {size >> 20} MiB; modules are at most {MAX_MODULE_BYTES >> 20} MiB")
        wasm = path.read_bytes()
    except OSError as exc:
        raise ModuleRejected(f"cannot read {path}: {exc.strerror}") from None
    digest = hashlib.sha256(wasm).hexdigest()
    if digest == known_good:
        return ValidatedModule(path, wasm, digest)
    try:
        info = parse(wasm)
    except WasmFormatError as exc:
        raise ModuleRejected(f"{path.name} is not a valid wasm binary: {exc}") from None
    complaint = wasm_validate(wasm, path.name)
    if complaint:
        raise ModuleRejected(f"{path.name} failed wasm-validate: {complaint}")
    problems = check_abi_v1(info, max_memory_bytes)
    if problems:
        raise ModuleRejected(f"{path.name} does not follow ABI v1: " + "; ".join(problems))
    return ValidatedModule(path, wasm, digest)
