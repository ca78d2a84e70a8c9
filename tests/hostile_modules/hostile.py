"""Builds the hostile test modules (see README.md in this directory) for isolation tests.

    from hostile import build_hostile      # or load this file by path
    path = build_hostile("trap", tmp_path)
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:  # usable from any test layout without installing the repo
    sys.path.insert(0, str(REPO))

from appliance_tools.modbuild import build_module  # noqa: E402
from appliance.runtime.wasm_binary import parse, uleb128  # noqa: E402

HOSTILE_NAMES = ("trap", "loop", "memhog", "invalid", "crash", "crash_compile")
_SOURCES = {"trap": HERE / "trap.c", "loop": HERE / "loop.c", "memhog": HERE / "memhog",
            "crash": HERE / "crash.c"}

# Not an opcode in any wasm proposal wabt knows, so wasm-validate must reject it.
UNDEFINED_OPCODE = 0xFF


def build_hostile(name: str, out_dir: Path) -> Path:
    """Builds hostile module `name` into out_dir/<name>.wasm and returns that path."""
    out_dir = Path(out_dir)
    out = out_dir / f"{name}.wasm"
    if name in _SOURCES:
        build_module(_SOURCES[name], out)
    elif name == "invalid":
        build_module(_SOURCES["trap"], out)
        out.write_bytes(corrupt_first_opcode(out.read_bytes()))
    elif name == "crash_compile":
        out_dir.mkdir(parents=True, exist_ok=True)
        out.write_bytes(deeply_nested_blocks_module())
    elif name.isidentifier() and (HERE / f"{name}.c").is_file():
        build_module(HERE / f"{name}.c", out)       # other single-file modules here (badptr, slow)
    elif name.isidentifier() and (HERE / name / "module.yaml").is_file():
        build_module(HERE / name, out)              # module directories with a manifest (framestats)
    else:
        known = sorted(set(HOSTILE_NAMES) | {p.stem for p in HERE.glob("*.c")}
                       | {p.parent.name for p in HERE.glob("*/module.yaml")})
        raise ValueError(f"unknown hostile module {name!r} (known: {', '.join(known)})")
    return out


def _uleb(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def corrupt_first_opcode(wasm: bytes) -> bytes:
    """Replaces the first instruction of the first function body with an undefined opcode.

    The section structure stays intact (so our own parser still reads it); only a validator
    that decodes code, like wasm-validate or wasm3's compiler, notices.
    """
    info = parse(wasm)
    code = next(s for s in info.sections if s.name == "code")
    pos = code.offset
    _, pos = _uleb(wasm, pos)            # number of bodies
    _, pos = _uleb(wasm, pos)            # size of the first body
    groups, pos = _uleb(wasm, pos)       # local declarations
    for _ in range(groups):
        _, pos = _uleb(wasm, pos)
        pos += 1                         # value type
    data = bytearray(wasm)
    data[pos] = UNDEFINED_OPCODE
    return bytes(data)


def _vec(items: list[bytes]) -> bytes:
    return uleb128(len(items)) + b"".join(items)


def _name(s: str) -> bytes:
    return uleb128(len(s)) + s.encode()


def deeply_nested_blocks_module(depth: int = 100_000) -> bytes:
    """A valid ABI v1 module whose ap_process calls a function of `depth` nested blocks.

    wasm-validate accepts it; wasm3 compiles functions lazily with native recursion per block,
    so the first ap_process call overflows the native stack while compiling (SIGSEGV), whatever
    the wasm3 stack size. Clang refuses such nesting, hence hand-assembled bytes.
    """
    i32 = b"\x7f"
    types = [b"\x60" + _vec([i32] * 3) + _vec([]),          # 0: ap.log
             b"\x60" + _vec([]) + _vec([i32]),               # 1: () -> i32
             b"\x60" + _vec([i32] * 2) + _vec([i32])]        # 2: (i32, i32) -> i32
    imports = [_name("ap") + _name("log") + b"\x00" + uleb128(0)]
    # function indices: 0 ap.log, 1 ap_abi_version, 2 ap_buffer, 3 ap_init, 4 nested, 5 ap_process
    funcs = [uleb128(1), uleb128(2), uleb128(2), uleb128(1), uleb128(2)]
    exports = [_name("memory") + b"\x02" + uleb128(0),
               _name("ap_abi_version") + b"\x00" + uleb128(1),
               _name("ap_buffer") + b"\x00" + uleb128(2),
               _name("ap_init") + b"\x00" + uleb128(3),
               _name("ap_process") + b"\x00" + uleb128(5)]

    def body(code: bytes) -> bytes:
        b = _vec([]) + code
        return uleb128(len(b)) + b

    bodies = [body(b"\x41\x01\x0b"),                          # ap_abi_version: 1
              body(b"\x41\x80\x08\x0b"),                      # ap_buffer: 1024
              body(b"\x41\x00\x0b"),                          # ap_init: 0
              body(b"\x02\x7f" * depth + b"\x41\x00" + b"\x0b" * depth + b"\x0b"),
              body(b"\x10\x04\x0b")]                          # ap_process: call nested

    def section(sid: int, payload: bytes) -> bytes:
        return bytes([sid]) + uleb128(len(payload)) + payload

    return (b"\x00asm\x01\x00\x00\x00"
            + section(1, _vec(types)) + section(2, _vec(imports)) + section(3, _vec(funcs))
            + section(5, _vec([b"\x01\x02\x02"]))             # memory min 2 max 2 pages
            + section(7, _vec(exports)) + section(10, _vec(bodies)))
