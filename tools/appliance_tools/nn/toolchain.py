"""The pinned zig toolchain (the same as appliance_tools.modbuild's) for the generated C: the wasm
module, and the native libraries for the host import ap.nn_run.

Both sides compile the same network code at -O2 with -ffp-contract=off and without fast-math, so
every float operation is one IEEE operation in the order the C gives; the native libraries are
built for the baseline CPU of their architecture (no FMA, no wider vectors than the ABI's), link
nothing (-nostdlib, -z defs) and have no build id, so their bytes are reproducible too.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from appliance_tools.modbuild import COMPILE_TIMEOUT_S, SDK_DIR, run_compiler, toolchain_version
from appliance_tools.nn.ir import ModelError

# name -> (zig target, cpu). The names are what the worker matches against platform.machine().
NATIVE_ARCHES = {
    "x86_64": ("x86_64-linux-gnu", "baseline"),
    "aarch64": ("aarch64-linux-gnu", "generic"),
}
COMMON_FLAGS = ["-O2", "-ffp-contract=off", "-fno-fast-math", "-nostdlib", "-g0", "-s",
                "-Wall", "-Wno-unused-function", "-Werror=implicit-function-declaration"]
NATIVE_FLAGS = ["-shared", "-fPIC", "-fvisibility=hidden", "-DAP_NN_NATIVE", "-Wl,-z,defs", "-Wl,--build-id=none"]
STACK_BYTES = 64 * 1024


def _zig(args: list[str], cwd: Path, what: str) -> None:
    try:
        returncode, output = run_compiler([sys.executable, "-m", "ziglang", "cc", *args], cwd)
    except subprocess.TimeoutExpired:
        raise ModelError(f"{what}: the compiler timed out after {COMPILE_TIMEOUT_S} s") from None
    if returncode != 0:
        raise ModelError(f"{what}: compiling the generated C failed (exit status {returncode}):\n{output}")


def _paths(work: Path) -> list[str]:
    # Absolute paths must not reach the output: the bytes would depend on where we built.
    return [f"-I{SDK_DIR}", f"-ffile-prefix-map={work}=.", f"-ffile-prefix-map={SDK_DIR}=sdk"]


# The sibling module x.simd.wasm for engines with SIMD128 (wasmtime): the same C with the vector
# kernels (ap_nn.h); x.wasm stays MVP for wasm3. Both give the same bits.
SIMD_FLAGS = ["-msimd128"]


def wasm_flags(memory_bytes: int, simd: bool = False) -> list[str]:
    return ["--target=wasm32-freestanding", "-mcpu=mvp", *(SIMD_FLAGS if simd else []), *COMMON_FLAGS,
            "-fvisibility=default",
            "-Wl,--no-entry", "-Wl,--export-dynamic", f"-Wl,--initial-memory={memory_bytes}",
            f"-Wl,--max-memory={memory_bytes}", f"-Wl,-z,stack-size={STACK_BYTES}"]


def native_flags(arch: str) -> list[str]:
    target, cpu = NATIVE_ARCHES[arch]
    return [f"--target={target}", f"-mcpu={cpu}", *COMMON_FLAGS, *NATIVE_FLAGS]


class MemoryShort(Exception):
    """The linker needs more linear memory than estimated."""

    def __init__(self, need: int) -> None:
        super().__init__(need)
        self.need = need


def compile_wasm(work: Path, source: str, memory_bytes: int, label: str, simd: bool = False) -> bytes:
    """module.c in `work` -> wasm bytes (simd: the SIMD128 build). Raises MemoryShort when the
    estimate was short, with what the linker says it needs (the layout of data and stack is its)."""
    out = work / ("module.simd.wasm" if simd else "module.wasm")
    try:
        _zig([*wasm_flags(memory_bytes, simd), *_paths(work), source, "-o", out.name], work,
             f"{label} (SIMD128 module)" if simd else label)
    except ModelError as exc:
        m = re.search(r"initial memory too small, (\d+) bytes needed", str(exc))
        if not m:
            raise
        need = -(-int(m.group(1)) // 65536) * 65536 + 65536
        raise MemoryShort(need) from None
    return out.read_bytes()


def compile_native(work: Path, source: str, arch: str, label: str) -> bytes:
    out = work / f"net-{arch}.so"
    _zig([*native_flags(arch), *_paths(work), source, "-o", out.name], work, f"{label} ({arch} library)")
    return out.read_bytes()


def toolchain_id() -> str:
    return f"ziglang {toolchain_version()}"
