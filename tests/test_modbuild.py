"""Module build (zig cc -> wasm32), the wasm structure reader, ABI v1 checks, hostile modules."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from appliance_tools import modbuild
from conftest import require_tool
from appliance.runtime.inspect import check_module_file, inspect_text
from appliance_tools.modbuild import BuildError, build_all, build_module, toolchain_version
from appliance.runtime.wasm_binary import (
    HOST_IMPORTS, FuncType, WasmFormatError, check_abi_v1, parse, signature_str,
)

REPO = Path(__file__).resolve().parents[1]
VIBSTATS = REPO / "modules" / "src" / "vibstats"
LIMIT = 64 * 1024 * 1024



def _load_hostile():
    spec = importlib.util.spec_from_file_location("hostile", REPO / "tests" / "hostile_modules" / "hostile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


hostile = _load_hostile()


@pytest.fixture(scope="module")
def vibstats_wasm(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vib") / "vibstats.wasm"
    r = build_module(VIBSTATS, out)
    assert r.problems == []
    return out


def _wat(tmp_path: Path, text: str, name: str = "m") -> bytes:
    src = tmp_path / f"{name}.wat"
    src.write_text(text)
    out = tmp_path / f"{name}.wasm"
    subprocess.run([require_tool("wat2wasm", "wabt"), str(src), "-o", str(out)], check=True, capture_output=True)
    return out.read_bytes()


ABI_FUNCS = """
  (func (export "ap_abi_version") (result i32) (i32.const 1))
  (func (export "ap_buffer") (param i32 i32) (result i32) (i32.const 1024))
  (func (export "ap_init") (param i32 i32) (result i32) (i32.const 0))
  (func (export "ap_process") (param i32 i32) (result i32) (i32.const 0))
"""


# ---- build -----------------------------------------------------------------------------------

def test_build_is_reproducible_across_directories(tmp_path):
    a = tmp_path / "a" / "vibstats"
    b = tmp_path / "elsewhere" / "deeper" / "vibstats"
    shutil.copytree(VIBSTATS, a)
    shutil.copytree(VIBSTATS, b)
    ra = build_module(a, tmp_path / "out_a" / "vibstats.wasm")
    rb = build_module(b, tmp_path / "out_b" / "vibstats.wasm")
    da, db = ra.out.read_bytes(), rb.out.read_bytes()
    assert da == db
    assert ra.sha256 == rb.sha256 == hashlib.sha256(da).hexdigest()
    assert str(tmp_path).encode() not in da
    assert (ra.name, ra.version, ra.memory_kb, ra.stack_kb) == ("vibstats", "1.0.0", 1024, 64)
    assert ra.validate_ok and ra.problems == [] and ra.ok
    assert ra.toolchain == toolchain_version() != "unknown"
    # atomic write: nothing but the output is left in the directory
    assert [p.name for p in (tmp_path / "out_a").iterdir()] == ["vibstats.wasm"]


def test_vibstats_structure(vibstats_wasm):
    info = parse(vibstats_wasm.read_bytes())
    exports = {e.name: e for e in info.exports}
    assert exports["memory"].kind == "memory"
    assert signature_str(exports["ap_abi_version"].signature) == "() -> i32"
    for name in ("ap_buffer", "ap_init", "ap_process"):
        assert exports[name].kind == "func"
        assert signature_str(exports[name].signature) == "(i32, i32) -> i32"
    assert len(info.memories) == 1
    assert info.memories[0].min == info.memories[0].max == 16
    assert sorted((i.module, i.name) for i in info.imports) == [("ap", "event"), ("ap", "feature"), ("ap", "features"),
                                                                ("ap", "log")]
    for imp in info.imports:
        assert signature_str(imp.signature) == HOST_IMPORTS[(imp.module, imp.name)]
    assert len(info.code_sizes) == len(info.functions) > 0
    assert check_abi_v1(info, LIMIT) == []


def test_inspect_text(vibstats_wasm):
    text = inspect_text(vibstats_wasm)
    assert "ABI v1:    ok" in text
    assert "wasm-validate accepts it" in text
    assert hashlib.sha256(vibstats_wasm.read_bytes()).hexdigest() in text
    assert "ap_process           (i32, i32) -> i32" in text
    assert "ap.event             (i32, f64, i32, i32) -> ()" in text
    assert "min 16 pages (1024 KiB), max 16 pages (1024 KiB)" in text


def test_build_all(tmp_path):
    root = tmp_path / "src"
    shutil.copytree(VIBSTATS, root / "vibstats")
    (root / "notes").mkdir()  # no module.yaml: not a module
    results = build_all(root, tmp_path / "build")
    assert [r.name for r in results] == ["vibstats"]
    assert (tmp_path / "build" / "vibstats.wasm").is_file()


def test_build_all_binds_the_simd_build_and_never_leaves_a_stale_one(tmp_path, monkeypatch):
    from appliance.config.params import SIMD_OF_SECTION, find_custom_section
    from appliance_tools import modbuild
    root = tmp_path / "src"
    shutil.copytree(VIBSTATS, root / "vibstats")
    out = tmp_path / "build"
    build_all(root, out, simd=True)
    plain, simd = (out / "vibstats.wasm").read_bytes(), (out / "vibstats.simd.wasm").read_bytes()
    assert find_custom_section(simd, SIMD_OF_SECTION) == hashlib.sha256(plain).hexdigest().encode()
    real = modbuild.build_module

    def simd_fails(src, dst, *args, simd=False, **kw):
        if simd:
            raise BuildError("the SIMD build failed")
        return real(src, dst, *args, **kw)
    monkeypatch.setattr(modbuild, "build_module", simd_fails)
    with pytest.raises(BuildError):
        build_all(root, out, simd=True)
    assert (out / "vibstats.wasm").is_file() and not (out / "vibstats.simd.wasm").exists()


def test_single_c_file_defaults(tmp_path):
    r = build_module(REPO / "tests" / "hostile_modules" / "trap.c", tmp_path / "trap.wasm")
    assert (r.name, r.memory_kb, r.stack_kb) == ("trap", 1024, 64)
    assert r.problems == []


def test_syntax_error_raises_build_error_naming_module(tmp_path):
    d = tmp_path / "broken_mod"
    d.mkdir()
    (d / "module.yaml").write_text("name: broken_mod\nversion: '1'\nmemory_kb: 128\nstack_kb: 16\n")
    (d / "broken.c").write_text("int32_t ap_init(const char *p, int len) { return 0 }\n")
    with pytest.raises(BuildError) as e:
        build_module(d, tmp_path / "broken.wasm")
    msg = str(e.value)
    assert "broken_mod" in msg and "error" in msg and "broken.c" in msg
    assert not (tmp_path / "broken.wasm").exists()
    assert list(tmp_path.glob("*.tmp")) == []


@pytest.mark.parametrize("yaml_text, words", [
    ("name: m\nmemory_kb: 100\nstack_kb: 16\n", "multiple of 64"),
    ("name: m\nmemory_kb: 128\nstack_kb: 128\n", "less than memory_kb"),
    ("name: m\nmemory_kb: 128\n", "no stack_kb"),
    ("name: m\nmemory_kb: 128\nstack_kb: 16\nsources: [nope.c]\n", "does not exist"),
    ("name: m\nmemory_kb: 128\nstack_kb: 16\nstack_size: 3\n", "unknown key"),
])
def test_manifest_errors(tmp_path, yaml_text, words):
    (tmp_path / "module.yaml").write_text(yaml_text)
    (tmp_path / "m.c").write_text("int x;\n")
    with pytest.raises(BuildError, match=words):
        build_module(tmp_path, tmp_path / "m.wasm")


# ---- ABI v1 checks ---------------------------------------------------------------------------

def test_memhog_memory_too_big(tmp_path):
    path = hostile.build_hostile("memhog", tmp_path)
    problems = check_abi_v1(parse(path.read_bytes()), LIMIT)
    assert problems == ["declares 2048 MiB of memory, above the host limit of 64 MiB"]


def test_foreign_import(tmp_path):
    src = tmp_path / "foreign.c"
    src.write_text(textwrap.dedent("""\
        #define AP_WINDOW_BYTES 1024
        #include "ap_module.h"
        __attribute__((import_module("env"), import_name("foo"))) int32_t foo(int32_t);
        int32_t ap_init(const char *p, int32_t len) { (void)p; return foo(len); }
        int32_t ap_process(const uint8_t *w, int32_t len) { (void)w; (void)len; return 0; }
        """))
    r = build_module(src, tmp_path / "foreign.wasm")
    assert r.problems == ["imports env.foo (i32) -> i32, which this host does not provide "
                          "(it provides: ap.log, ap.feature, ap.event, ap.dsp_rfft, ap.dsp_irfft, "
                          "ap.dsp_rfft_batch, ap.dsp_moments, ap.dsp_band_power, ap.dsp_envelope, ap.dsp_envelope_ex, "
                          "ap.dsp_band_kurtosis, ap.dsp_median, "
                          "ap.features, ap.state_changed, ap.img_downscale, ap.img_blur, ap.img_bg_subtract, "
                          "ap.img_dilate, ap.img_blobs, ap.nn_run)"]


def test_wrong_host_import_signature(tmp_path):
    src = tmp_path / "badlog.c"
    src.write_text(textwrap.dedent("""\
        #include <stdint.h>
        __attribute__((import_module("ap"), import_name("log"))) void ap_log(int32_t);
        __attribute__((export_name("ap_abi_version"))) int32_t ap_abi_version(void) { return 1; }
        __attribute__((export_name("ap_buffer"))) int32_t ap_buffer(int32_t k, int32_t n) { return 0; }
        __attribute__((export_name("ap_init"))) int32_t ap_init(int32_t p, int32_t n) { ap_log(n); return 0; }
        __attribute__((export_name("ap_process"))) int32_t ap_process(int32_t p, int32_t n) { return 0; }
        """))
    r = build_module(src, tmp_path / "badlog.wasm")
    assert r.problems == ["imports ap.log as (i32) -> (), but the host provides ap.log as (i32, i32, i32) -> ()"]


def test_memory_min_differs_from_max_via_linker_flags(tmp_path):
    m = modbuild.load_manifest(VIBSTATS)
    cmd = modbuild.compile_command(m, tmp_path / "grow.wasm")
    cmd = [a.replace(f"--max-memory={1024 * 1024}", f"--max-memory={2048 * 1024}") for a in cmd]
    subprocess.run(cmd, cwd=VIBSTATS, check=True, capture_output=True)
    problems = check_abi_v1(parse((tmp_path / "grow.wasm").read_bytes()), LIMIT)
    assert problems == ["declares memory min 1024 KiB, max 2048 KiB: ABI v1 requires minimum == maximum"]


def test_memory_rules_from_wat(tmp_path):
    no_max = _wat(tmp_path, f'(module (memory (export "memory") 2) {ABI_FUNCS})', "nomax")
    assert check_abi_v1(parse(no_max), LIMIT) == [
        "declares memory min 128 KiB and has no maximum: ABI v1 requires minimum == maximum"]

    too_big = _wat(tmp_path, f'(module (memory (export "memory") 1 1040) {ABI_FUNCS})', "big")
    assert check_abi_v1(parse(too_big), LIMIT) == [
        "declares memory min 64 KiB, max 66560 KiB: ABI v1 requires minimum == maximum",
        "declares 65 MiB of memory, above the host limit of 64 MiB"]

    imported = _wat(tmp_path, f'(module (import "env" "memory" (memory 4 4)) (export "memory" (memory 0)) '
                              f'{ABI_FUNCS})', "imported")
    info = parse(imported)
    assert info.imports[0].kind == "memory" and info.imports[0].limits.max == 4
    problems = check_abi_v1(info, LIMIT)
    assert len(problems) == 1 and "imported memory is not allowed" in problems[0]

    nomem = _wat(tmp_path, f'(module {ABI_FUNCS})', "nomem")
    assert check_abi_v1(parse(nomem), LIMIT) == ['does not export its memory as "memory"',
                                                  "declares no memory"]


def test_export_rules_from_wat(tmp_path):
    data = _wat(tmp_path, """(module
      (memory (export "memory") 1 1)
      (global (export "ap_abi_version") i32 (i32.const 1))
      (func (export "ap_buffer") (param i32) (result i32) (i32.const 0))
      (func (export "ap_init") (param i32 i32) (result i32) (i32.const 0)))""")
    assert check_abi_v1(parse(data), LIMIT) == [
        "exports ap_abi_version as a global, not a function () -> i32",
        "exports ap_buffer as (i32) -> i32, ABI v1 requires (i32, i32) -> i32",
        "does not export ap_process (i32, i32) -> i32",
    ]


# ---- malformed binaries ------------------------------------------------------------------------

def test_format_errors_name_an_offset(vibstats_wasm):
    good = vibstats_wasm.read_bytes()
    cases = [
        b"",
        b"hello, world! not wasm",
        b"\x00asm\x02\x00\x00\x00",
        good[:9],
        good[:100],
        good[:-3],
        b"\x00asm\x01\x00\x00\x00\x01\xff\xff\xff\xff\x7f",     # section size overflows u32
        b"\x00asm\x01\x00\x00\x00\x0e\x00",                       # unknown section id 14
        b"\x00asm\x01\x00\x00\x00\x01\x04\x01\x60\x01\x55",        # unknown value type 0x55
        b"\x00asm\x01\x00\x00\x00\x03\x02\x01\x00",                # type index out of range
    ]
    for data in cases:
        with pytest.raises(WasmFormatError, match=r"at byte offset \d+ \(0x[0-9a-f]+\)"):
            parse(data)


def test_format_error_messages():
    with pytest.raises(WasmFormatError, match="bad magic.*at byte offset 0"):
        parse(b"hello, world! not wasm")
    with pytest.raises(WasmFormatError, match="LEB128 size of type section overflows u32 at byte offset 9"):
        parse(b"\x00asm\x01\x00\x00\x00\x01\xff\xff\xff\xff\x7f")
    with pytest.raises(WasmFormatError, match="LEB128 .* longer than 5 bytes"):
        parse(b"\x00asm\x01\x00\x00\x00\x01\xff\xff\xff\xff\xff\x00")
    with pytest.raises(WasmFormatError, match="unknown section id 14 at byte offset 8"):
        parse(b"\x00asm\x01\x00\x00\x00\x0e\x00")


def test_mutated_binaries_raise_only_format_errors(vibstats_wasm):
    # Whatever the bytes, the reader either understands them or says where it stopped.
    good = vibstats_wasm.read_bytes()
    rnd = random.Random(7)
    for _ in range(2000):
        d = bytearray(good)
        for _ in range(rnd.randint(1, 4)):
            if not d:
                break
            op, at = rnd.random(), rnd.randrange(len(d))
            if op < 0.6:
                d[at] = rnd.randrange(256)
            elif op < 0.8:
                del d[at:at + rnd.randint(1, 50)]
            else:
                del d[at:]
        try:
            check_abi_v1(parse(bytes(d)), LIMIT)
        except WasmFormatError as e:
            assert "at byte offset" in str(e)


def test_signature_str():
    assert signature_str(FuncType(("i32", "i32"), ("i32",))) == "(i32, i32) -> i32"
    assert signature_str(FuncType((), ())) == "() -> ()"
    assert signature_str(FuncType(("f64",), ("i32", "i64"))) == "(f64) -> (i32, i64)"
    assert HOST_IMPORTS[("ap", "feature")] == "(i32, i32, f64) -> ()"


# ---- hostile modules ---------------------------------------------------------------------------

def test_hostile_modules_build(tmp_path):
    for name in ("trap", "loop", "crash", "crash_compile"):
        path = hostile.build_hostile(name, tmp_path)
        assert check_module_file(path) == [], name
    invalid = hostile.build_hostile("invalid", tmp_path)
    problems = check_module_file(invalid)
    assert len(problems) == 1 and "wasm-validate rejects it" in problems[0] and "0xff" in problems[0]
    assert parse(invalid.read_bytes()).export("ap_process") is not None
    with pytest.raises(ValueError, match="unknown hostile module"):
        hostile.build_hostile("nice", tmp_path)


_WASM3_CHILD = r"""
import struct, sys, threading
import wasm3

def main():
    env = wasm3.Environment()
    rt = env.new_runtime(128 * 1024)
    mod = env.parse_module(open(sys.argv[1], "rb").read())
    rt.load(mod)
    mod.link_function("ap", "log", "v(iii)", lambda l, p, n: None)
    mod.link_function("ap", "feature", "v(iiF)", lambda p, n, v: None)
    mod.link_function("ap", "event", "v(iFii)", lambda s, sc, p, n: None)
    params = sys.argv[2].encode()
    pp = rt.find_function("ap_buffer")(0, len(params))
    rt.get_memory(0)[pp:pp + len(params)] = params
    assert rt.find_function("ap_init")(pp, len(params)) == 0
    n = 64 + 4 * 16
    wp = rt.find_function("ap_buffer")(1, n)
    mem = rt.get_memory(0)
    mem[wp:wp + 64] = struct.pack("<4sHHIIdQqII16x", b"APW1", 64, 1, 1, 16, 100.0, 0, 0, 0, 0)
    mem[wp + 64:wp + n] = bytes(64)
    try:
        print("returned", rt.find_function("ap_process")(wp, n), flush=True)
    except RuntimeError as e:
        print("raised", e, flush=True)

# A fixed 8 MiB native stack, so the outcome does not depend on `ulimit -s`.
threading.stack_size(8 * 1024 * 1024)
t = threading.Thread(target=main)
t.start()
t.join()
"""


@pytest.mark.parametrize("name, params, expect", [
    ("trap", "", "raised [trap] out of bounds memory access"),
    ("trap", "mode=unreachable", "raised [trap] unreachable executed"),
    ("crash", "depth=10", "returned 0"),
    ("crash", "", "SIGSEGV"),
])
def test_hostile_behaviour_under_wasm3(tmp_path, name, params, expect):
    path = hostile.build_hostile(name, tmp_path)
    p = subprocess.run([sys.executable, "-c", _WASM3_CHILD, str(path), params],
                       capture_output=True, text=True, timeout=60)
    if expect == "SIGSEGV":
        assert p.returncode == -11, (p.returncode, p.stdout, p.stderr[-500:])
    else:
        assert p.returncode == 0, p.stderr[-2000:]
        assert p.stdout.startswith(expect), p.stdout


# ---- native benchmark harness -----------------------------------------------------------------

def test_native_harness(tmp_path):
    """The native row of `make bench` runs the module on the windows and params it is given."""
    require_tool("gcc", "gcc")
    exe = tmp_path / "vibstats_native"
    subprocess.run(["gcc", "-O2", f"-I{REPO / 'modules' / 'sdk'}", str(VIBSTATS / "vibstats.c"),
                    str(REPO / "benchmarks" / "native" / "native_host.c"), "-lm", "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    import numpy as np
    (tmp_path / "params").write_text("baseline.windows=10\nthreshold=6\n")
    rng = np.random.default_rng(0)
    calm = rng.standard_normal((10, 3, 1024)).astype(np.float32)
    np.concatenate([calm, 20 * calm[:3]]).tofile(tmp_path / "windows")   # 10 to learn, then 3 loud ones
    p = subprocess.run([str(exe), str(tmp_path / "params"), str(tmp_path / "windows"), "3", "1024", "12800",
                        "5", "8"], check=True, capture_output=True, text=True)
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["windows"] == 8 and result["samples"] == 3 * 1024 * 8   # 5 untimed, then 8
    assert result["cpu_s"] > 0 and result["samples_per_cpu_s"] > 0
    assert result["rejected"] == 0
    assert result["features"] == 13 * 3 * 4 + 10 + 3  # 12 per window, progress x10, score x3
    assert result["events"] == 1   # the loud windows are seen: the module got these windows, in order
