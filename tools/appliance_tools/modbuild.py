"""Builds analytics modules (C + the SDK) into ABI v1 wasm binaries with the pinned zig toolchain.

The same source gives the same bytes on every machine: the compiler is the `ziglang` wheel from
PyPI, the working directory is the module's own directory and absolute paths are mapped away.
A build that compiles but breaks the ABI is not an error here: the problems travel in the
BuildResult, so tests can build hostile modules and the CLI decides what to refuse.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from appliance.config.params import SECTION as MANIFEST_SECTION, SIMD_OF_SECTION, find_custom_section
from appliance.config.params import Manifest as ParamsManifest

from appliance.runtime.inspect import DEFAULT_MAX_MEMORY_BYTES, all_problems, check_file
from appliance.runtime.wasm_binary import PAGE_BYTES, WasmInfo, custom_section

REPO = Path(__file__).resolve().parents[2]
SDK_DIR = REPO / "modules" / "sdk"
DEFAULT_SRC_ROOT = REPO / "modules" / "src"
DEFAULT_OUT_DIR = REPO / "modules" / "build"
DEFAULT_MEMORY_KB = 1024
DEFAULT_STACK_KB = 64
COMPILE_TIMEOUT_S = 300
MAX_ERROR_CHARS = 8000

_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,47}$")


class BuildError(Exception):
    """The module could not be built (bad manifest, compiler error)."""


@dataclass
class Manifest:
    name: str
    version: str
    description: str
    memory_kb: int
    stack_kb: int
    sources: list[Path]          # absolute paths
    src_dir: Path
    params: ParamsManifest | None = None   # module.yaml's params: embedded in the .wasm (ap.manifest)


@dataclass
class BuildResult:
    name: str
    version: str
    src: Path
    out: Path
    size: int
    sha256: str
    seconds: float
    memory_kb: int
    stack_kb: int
    toolchain: str
    validate_ok: bool
    validate_message: str
    info: WasmInfo | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def toolchain_version() -> str:
    """Version of the pinned ziglang wheel (the whole C toolchain)."""
    try:
        return importlib.metadata.version("ziglang")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _positive_int(doc: dict, key: str, default: int | None, module: str) -> int:
    value = doc.get(key, default)
    if value is None:
        raise BuildError(f"module {module}: module.yaml has no {key}")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BuildError(f"module {module}: {key} must be a positive integer, not {value!r}")
    return value


def load_manifest(src: Path) -> Manifest:
    """Reads module.yaml of a module directory, or makes defaults for a single .c file."""
    src = Path(src).resolve()
    if src.is_file():
        if src.suffix != ".c":
            raise BuildError(f"module {src.stem}: {src} is not a .c file or a module directory")
        return Manifest(src.stem, "0.0.0", "", DEFAULT_MEMORY_KB, DEFAULT_STACK_KB, [src], src.parent)
    if not src.is_dir():
        raise BuildError(f"module {src.name}: {src} does not exist")
    mf = src / "module.yaml"
    if not mf.is_file():
        raise BuildError(f"module {src.name}: {src} has no module.yaml")
    try:
        doc = yaml.safe_load(mf.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise BuildError(f"module {src.name}: cannot read {mf}: {e}") from None
    if not isinstance(doc, dict):
        raise BuildError(f"module {src.name}: {mf} must be a mapping")
    known = {"name", "version", "description", "memory_kb", "stack_kb", "sources", "params"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise BuildError(f"module {src.name}: unknown key(s) in {mf}: {', '.join(map(str, unknown))} "
                         f"(known: {', '.join(sorted(known))})")

    name = doc.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise BuildError(f"module {src.name}: name must match {_NAME_RE.pattern}, not {name!r}")
    version = doc.get("version", "0.0.0")
    if not isinstance(version, str):
        raise BuildError(f"module {name}: version must be a string (quote it), not {version!r}")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise BuildError(f"module {name}: description must be a string")
    memory_kb = _positive_int(doc, "memory_kb", None, name)
    if memory_kb % 64:
        raise BuildError(f"module {name}: memory_kb {memory_kb} is not a multiple of 64 (one wasm page)")
    if memory_kb * 1024 > 65536 * PAGE_BYTES:
        raise BuildError(f"module {name}: memory_kb {memory_kb} is beyond wasm32's 4 GiB")
    stack_kb = _positive_int(doc, "stack_kb", None, name)
    if stack_kb >= memory_kb:
        raise BuildError(f"module {name}: stack_kb {stack_kb} must be less than memory_kb {memory_kb}")

    raw_sources = doc.get("sources")
    if raw_sources is None:
        sources = sorted(src.glob("*.c"))
    else:
        if not isinstance(raw_sources, list) or not all(isinstance(s, str) for s in raw_sources):
            raise BuildError(f"module {name}: sources must be a list of file names")
        sources = []
        for s in raw_sources:
            p = (src / s).resolve()
            if not p.is_relative_to(src):
                raise BuildError(f"module {name}: source {s!r} is outside the module directory")
            if not p.is_file():
                raise BuildError(f"module {name}: source {s!r} does not exist")
            sources.append(p)
    if not sources:
        raise BuildError(f"module {name}: no .c sources in {src}")
    declared = None
    if "params" in doc:
        try:
            declared = ParamsManifest(name=name, version=version, description=description,
                                      params=doc["params"] or {})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise BuildError(f"module {name}: params in {mf}: {problems}") from None
    return Manifest(name, version, description, memory_kb, stack_kb, sources, src, declared)


def params_header(m: ParamsManifest) -> str:
    """C for the SDK's ap_params_check: the keys the manifest allows (<n>, <name> as patterns)."""
    keys = "".join(f"    {json.dumps(k)},\n" for k in m.params)
    return ("/* Generated by `appliance module build` from module.yaml; do not edit. */\n"
            "#define AP_PARAMS_MANIFEST 1\n"
            f"static const char *const ap_param_keys[] = {{\n{keys}    0\n}};\n")


def with_manifest(wasm: bytes, manifest: ParamsManifest) -> bytes:
    """The module with its manifest appended as the custom section ap.manifest."""
    return wasm + custom_section(MANIFEST_SECTION, manifest.to_bytes())


# The SIMD build (X.simd.wasm beside X.wasm, run by wasmtime only; docs/engines.md): the same
# source for speed rather than size, with the features every wasmtime has and wasm3 lacks.
SIMD_FEATURES = ("-msimd128", "-mnontrapping-fptoint", "-mbulk-memory", "-msign-ext")


def bind_simd(simd_path: Path, plain: bytes) -> None:
    """Tie a SIMD build to its plain twin: a custom section (SIMD_OF_SECTION) with the sha256 of
    X.wasm's bytes. The runtime runs X.simd.wasm only when it names the X.wasm it sits beside
    (modcheck.simd_file), so a stale or foreign SIMD build is never picked."""
    data = Path(simd_path).read_bytes()
    if find_custom_section(data, SIMD_OF_SECTION) is not None:
        raise BuildError(f"{simd_path} is already bound to a plain build")
    tmp = Path(simd_path).with_name(f".{Path(simd_path).name}.bind.tmp")
    tmp.write_bytes(data + custom_section(SIMD_OF_SECTION, hashlib.sha256(plain).hexdigest().encode()))
    os.chmod(tmp, 0o644)
    os.replace(tmp, simd_path)


def compile_command(m: Manifest, out: Path, params_h: Path | None = None, simd: bool = False) -> list[str]:
    mem = m.memory_kb * 1024
    extra = [f"-ffile-prefix-map={params_h.parent}=gen", "-include", str(params_h)] if params_h else []
    return [
        sys.executable, "-m", "ziglang", "cc",
        "--target=wasm32-freestanding", "-O2" if simd else "-Os", "-nostdlib",
        # The MVP feature set: every wasm3 build runs it, and the bytes do not depend on
        # which CPU features a future zig enables by default (it enables bulk memory,
        # extended-const, ... today).
        "-mcpu=mvp", *(SIMD_FEATURES if simd else ()),
        "-fvisibility=default", "-s",
        f"-I{SDK_DIR}",
        # Absolute paths (e.g. in __FILE__) must not make bytes depend on the checkout location.
        f"-ffile-prefix-map={m.src_dir}=.",
        f"-ffile-prefix-map={SDK_DIR}=sdk",
        "-Wl,--no-entry", "-Wl,--export-dynamic",
        f"-Wl,--initial-memory={mem}", f"-Wl,--max-memory={mem}",
        f"-Wl,-z,stack-size={m.stack_kb * 1024}",
        *extra,
        *[os.path.relpath(s, m.src_dir) for s in m.sources],
        "-o", str(out),
    ]


def run_compiler(cmd: list[str], cwd: Path) -> tuple[int, str]:
    """Run the C compiler: (exit status, what it printed, cut to MAX_ERROR_CHARS). A compiler that
    runs past COMPILE_TIMEOUT_S raises subprocess.TimeoutExpired."""
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    output = (p.stderr + p.stdout).strip()
    if len(output) > MAX_ERROR_CHARS:
        output = output[:MAX_ERROR_CHARS] + f"\n... ({len(output) - MAX_ERROR_CHARS} more characters)"
    return p.returncode, output


def build_module(src: Path, out: Path, max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
                 simd: bool = False) -> BuildResult:
    """Compiles a module directory (with module.yaml) or a single .c file to `out`; simd: the
    SIMD build for wasmtime (SIMD_FEATURES, -O2), conventionally X.simd.wasm beside X.wasm."""
    t0 = time.monotonic()
    m = load_manifest(Path(src))
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        params_h = None
        if m.params is not None:
            params_h = Path(tempfile.mkdtemp(prefix=".ap-gen-", dir=out.parent)) / "ap_params.h"
            params_h.write_text(params_header(m.params))
        try:
            returncode, output = run_compiler(compile_command(m, tmp, params_h, simd), m.src_dir)
        except subprocess.TimeoutExpired:
            raise BuildError(f"module {m.name}: compiler timed out after {COMPILE_TIMEOUT_S} s") from None
        if returncode != 0:
            status = f"signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
            raise BuildError(f"module {m.name}: compilation failed ({status})"
                             + (f":\n{output}" if output else ", and the compiler printed nothing"))
        data = tmp.read_bytes()
        if not data:
            raise BuildError(f"module {m.name}: compiler produced an empty file")
        if m.params is not None:
            data = with_manifest(data, m.params)
            tmp.write_bytes(data)
        info, ok, msg, abi_problems = check_file(data, tmp, max_memory_bytes, simd)
        problems = all_problems(ok, msg, abi_problems)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        if params_h is not None:
            shutil.rmtree(params_h.parent, ignore_errors=True)
    return BuildResult(
        name=m.name, version=m.version, src=Path(src), out=out, size=len(data),
        sha256=hashlib.sha256(data).hexdigest(), seconds=time.monotonic() - t0,
        memory_kb=m.memory_kb, stack_kb=m.stack_kb, toolchain=toolchain_version(),
        validate_ok=ok, validate_message=msg, info=info, problems=problems,
    )


def build_all(src_root: Path = DEFAULT_SRC_ROOT, out_dir: Path = DEFAULT_OUT_DIR,
              max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES, simd: bool = False) -> list[BuildResult]:
    """Builds every subdirectory of src_root that has a module.yaml into out_dir/<name>.wasm
    (and, with simd, its SIMD build out_dir/<name>.simd.wasm too)."""
    results = []
    for d in sorted(Path(src_root).iterdir()):
        if (d / "module.yaml").is_file():
            name = load_manifest(d).name
            plain = Path(out_dir) / f"{name}.wasm"
            sibling = Path(out_dir) / f"{name}.simd.wasm"
            sibling.unlink(missing_ok=True)   # a failed SIMD build must not leave the previous one beside the new X.wasm
            results.append(build_module(d, plain, max_memory_bytes))
            if simd:
                results.append(build_module(d, sibling, max_memory_bytes, simd=True))
                bind_simd(sibling, plain.read_bytes())
    return results
