"""Checks and a report on a module binary, as the runtime judges it: wasm-validate with the
runtime's flags, our structural parser, the ABI v1 rules (`appliance module inspect`, and the
module toolchain's check after a build)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from appliance.runtime.validate import ModuleRejected, wasm_validate
from appliance.runtime.wasm_binary import WasmFormatError, WasmInfo, check_abi_v1, parse, signature_str

DEFAULT_MAX_MEMORY_BYTES = 64 * 1024 * 1024   # the runtime's default runtime.max_memory_mb


def validate(path: Path, simd: bool = False) -> tuple[bool, str]:
    """(accepted, message) from wasm-validate, with the runtime's flags (one place owns them);
    simd: a module's SIMD build, which only wasmtime runs."""
    try:
        complaint = wasm_validate(Path(path).read_bytes(), Path(path).name, simd)
    except ModuleRejected as exc:
        return False, str(exc)
    return complaint is None, complaint or ""


def is_simd_build(path: Path) -> bool:
    """X.simd.wasm: a module's SIMD build, for wasmtime (docs/engines.md)."""
    return path.name.endswith(".simd.wasm")


def check_file(data: bytes, path: Path, max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES, simd: bool = False
               ) -> tuple[WasmInfo | None, bool, str, list[str]]:
    """(info, validate_ok, validate_message, abi_problems) for a built or shipped binary."""
    ok, msg = validate(path, simd)
    try:
        info = parse(data)
    except WasmFormatError as e:
        return None, ok, msg, [f"malformed wasm binary: {e}"]
    return info, ok, msg, check_abi_v1(info, max_memory_bytes)


def check_module_file(path: Path, max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES) -> list[str]:
    """Every reason to refuse the binary at `path` (wasm-validate, format, ABI v1); [] = ok."""
    path = Path(path)
    _, ok, msg, abi_problems = check_file(path.read_bytes(), path, max_memory_bytes, is_simd_build(path))
    return all_problems(ok, msg, abi_problems)


def all_problems(ok: bool, msg: str, abi_problems: list[str]) -> list[str]:
    if ok:
        return list(abi_problems)
    return [f"wasm-validate rejects it: {msg}" if msg else "wasm-validate rejects it", *abi_problems]


def inspect_text(path: Path, max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES) -> str:
    """Human-readable report on a module binary, for `appliance module inspect`."""
    path = Path(path)
    data = path.read_bytes()
    lines = [f"{path}", f"  size:      {len(data)} bytes",
             f"  sha256:    {hashlib.sha256(data).hexdigest()}"]
    info, ok, msg, problems = check_file(data, path, max_memory_bytes, is_simd_build(Path(path)))
    lines.append("  validate:  wasm-validate accepts it" if ok
                 else f"  validate:  wasm-validate rejects it: {msg or '(no message)'}")
    if problems:
        lines.append("  ABI v1:    problems:")
        lines.extend(f"    - {p}" for p in problems)
    else:
        lines.append("  ABI v1:    ok")
    if info is None:
        return "\n".join(lines)

    mems = [("imported " + f"{i.module}.{i.name}", i.limits) for i in info.imported_memories]
    mems += [("defined", lim) for lim in info.memories]
    if not mems:
        lines.append("  memory:    none")
    for how, lim in mems:
        hi = "no maximum" if lim.max is None else f"max {lim.max} pages ({lim.max * 64} KiB)"
        lines.append(f"  memory:    {how}, min {lim.min} pages ({lim.min * 64} KiB), {hi}")
    lines.append(f"  functions: {len(info.functions)} defined, code {sum(info.code_sizes)} bytes")
    lines.append("  exports:")
    for e in info.exports:
        detail = signature_str(e.signature) if e.kind == "func" else e.kind
        lines.append(f"    {e.name:<20} {detail}")
    lines.append("  imports:" + ("" if info.imports else " none"))
    for i in info.imports:
        detail = signature_str(i.signature) if i.kind == "func" else i.kind
        lines.append(f"    {i.module + '.' + i.name:<20} {detail}")
    lines.append("  custom sections: " + (", ".join(info.custom_sections) or "none"))
    from appliance.config import params as schema
    try:
        manifest = schema.read_manifest(path)
    except schema.ManifestError as exc:
        lines.append(f"  params:    manifest unreadable: {exc}")
    else:
        if manifest is None:
            lines.append("  params:    no manifest (the host does not check its params)")
        else:
            lines.append(f"  params:    manifest of {manifest.name} {manifest.version}, {len(manifest.params)} params:")
            lines += [f"    {k:<28} {s.type:<8} {s.range_text() or ''}" for k, s in manifest.params.items()]
    return "\n".join(lines)
