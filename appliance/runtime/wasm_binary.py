"""Structural reader for WebAssembly binaries, and the ABI v1 load-time rules.

Reads a module's sections without executing anything, so the host can refuse a bad module
(wrong exports, foreign imports, growable or oversized memory) before wasm3 ever sees it.
Malformed input raises WasmFormatError naming what was wrong and the byte offset.
"""
from __future__ import annotations

from dataclasses import dataclass, field

WASM_MAGIC = b"\x00asm"
WASM_VERSION = 1
PAGE_BYTES = 65536

SECTION_NAMES = {
    0: "custom", 1: "type", 2: "import", 3: "function", 4: "table", 5: "memory",
    6: "global", 7: "export", 8: "start", 9: "element", 10: "code", 11: "data",
    12: "datacount", 13: "tag",
}
# Non-custom sections must appear in this order (tag sits between memory and global).
_SECTION_ORDER = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 13: 6, 6: 7, 7: 8, 8: 9, 9: 10, 12: 11, 10: 12, 11: 13}

VALUE_TYPES = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64", 0x7B: "v128",
               0x70: "funcref", 0x6F: "externref"}
EXTERNAL_KINDS = {0: "func", 1: "table", 2: "memory", 3: "global", 4: "tag"}

# What the host links into every module (import module "ap"); the runtime reuses this table.
HOST_IMPORTS: dict[tuple[str, str], str] = {
    ("ap", "log"): "(i32, i32, i32) -> ()",
    ("ap", "feature"): "(i32, i32, f64) -> ()",
    ("ap", "event"): "(i32, f64, i32, i32) -> ()",
    # Optional additions within ABI v1 (modules/ABI.md, "Host DSP" and "Persistent state").
    ("ap", "dsp_rfft"): "(i32, i32, i32) -> i32",
    ("ap", "dsp_irfft"): "(i32, i32, i32) -> i32",
    ("ap", "dsp_rfft_batch"): "(i32, i32, i32, i32) -> i32",
    ("ap", "dsp_moments"): "(i32, i32, i32, i32, i32) -> i32",
    ("ap", "dsp_band_power"): "(i32, i32, i32, i32, i32, i32) -> i32",
    ("ap", "dsp_envelope"): "(i32, i32, i32, i32, i32, i32) -> i32",
    ("ap", "dsp_envelope_ex"): "(i32, i32, i32, i32, i32, i32, i32) -> i32",
    ("ap", "dsp_band_kurtosis"): "(i32, i32, i32, i32, i32, i32, i32) -> i32",
    ("ap", "dsp_median"): "(i32, i32, i32, i32, i32) -> i32",
    ("ap", "features"): "(i32, i32, i32, i32) -> ()",
    ("ap", "state_changed"): "() -> ()",
    # Host image kernels (modules/ABI.md, "Host image kernels").
    ("ap", "img_downscale"): "(i32, i32, i32, i32, i32) -> i32",
    ("ap", "img_blur"): "(i32, i32, i32, i32, i32) -> i32",
    ("ap", "img_bg_subtract"): "(i32, i32, i32, i32, i32, i32, i32) -> i32",
    ("ap", "img_dilate"): "(i32, i32, i32, i32, i32) -> i32",
    ("ap", "img_blobs"): "(i32, i32, i32, i32, i32, i32) -> i32",
    # Host-accelerated inference for compiled models (modules/ABI.md, "Host inference").
    ("ap", "nn_run"): "(i32, i32, i32, i32, i32, i32) -> i32",
}

# Optional exports: when present they must have these types.
OPTIONAL_FUNC_EXPORTS: dict[str, str] = {
    "ap_state_size": "() -> i32",
    "ap_state_ptr": "() -> i32",
    "ap_state_loaded": "() -> i32",
}

REQUIRED_FUNC_EXPORTS: dict[str, str] = {
    "ap_abi_version": "() -> i32",
    "ap_buffer": "(i32, i32) -> i32",
    "ap_init": "(i32, i32) -> i32",
    "ap_process": "(i32, i32) -> i32",
}


class WasmFormatError(ValueError):
    """The bytes are not a well-formed WebAssembly binary (or use an encoding we do not read)."""


@dataclass(frozen=True)
class FuncType:
    params: tuple[str, ...]
    results: tuple[str, ...]

    def __str__(self) -> str:
        return signature_str(self)


@dataclass(frozen=True)
class Limits:
    min: int                     # pages for memories, elements for tables
    max: int | None              # None when the binary declares no maximum
    shared: bool = False
    is64: bool = False


@dataclass
class Import:
    module: str
    name: str
    kind: str                    # func | table | memory | global | tag
    type_index: int | None = None
    signature: FuncType | None = None
    limits: Limits | None = None


@dataclass
class Export:
    name: str
    kind: str
    index: int
    signature: FuncType | None = None


@dataclass
class Section:
    id: int
    name: str                    # section kind, or the custom section's own name
    offset: int                  # offset of the section's payload
    size: int


MAX_VECTOR_ITEMS = 100_000
MAX_PROBLEMS = 10


@dataclass
class WasmInfo:
    version: int
    size: int
    sections: list[Section] = field(default_factory=list)
    types: list[FuncType] = field(default_factory=list)
    imports: list[Import] = field(default_factory=list)
    functions: list[int] = field(default_factory=list)   # type index per defined function
    tables: list[Limits] = field(default_factory=list)
    memories: list[Limits] = field(default_factory=list)  # defined (not imported) memories
    exports: list[Export] = field(default_factory=list)
    start: int | None = None
    code_sizes: list[int] = field(default_factory=list)
    custom_sections: list[str] = field(default_factory=list)

    @property
    def imported_functions(self) -> list[Import]:
        return [i for i in self.imports if i.kind == "func"]

    @property
    def imported_memories(self) -> list[Import]:
        return [i for i in self.imports if i.kind == "memory"]

    def export(self, name: str) -> Export | None:
        for e in self.exports:
            if e.name == name:
                return e
        return None

    def function_signature(self, index: int, imported: list[Import] | None = None) -> FuncType | None:
        """Signature of function `index` in the function index space (imports first)."""
        if imported is None:
            imported = self.imported_functions
        if index < len(imported):
            return imported[index].signature
        local = index - len(imported)
        if 0 <= local < len(self.functions):
            t = self.functions[local]
            return self.types[t] if t < len(self.types) else None
        return None

    def memory_limits(self, index: int = 0) -> Limits | None:
        """Limits of memory `index` in the memory index space (imports first)."""
        spaces = [i.limits for i in self.imported_memories] + list(self.memories)
        return spaces[index] if 0 <= index < len(spaces) else None


def signature_str(sig: FuncType | None) -> str:
    if sig is None:
        return "?"

    def group(types: tuple[str, ...]) -> str:
        return "(" + ", ".join(types) + ")"

    results = sig.results[0] if len(sig.results) == 1 else group(sig.results)
    return f"{group(sig.params)} -> {results}"


class _Reader:
    def __init__(self, data: bytes, pos: int = 0, end: int | None = None):
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def fail(self, what: str, at: int | None = None) -> WasmFormatError:
        at = self.pos if at is None else at
        return WasmFormatError(f"{what} at byte offset {at} (0x{at:x})")

    def byte(self, what: str) -> int:
        if self.pos >= self.end:
            raise self.fail(f"unexpected end of data reading {what}")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def bytes(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise self.fail(f"{what} needs {n} bytes but only {self.end - self.pos} remain")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def uleb(self, what: str, bits: int = 32) -> int:
        start = self.pos
        result = shift = 0
        max_bytes = (bits + 6) // 7
        for i in range(max_bytes):
            if self.pos >= self.end:
                raise self.fail(f"unexpected end of data in LEB128 {what}", start)
            b = self.data[self.pos]
            self.pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                # The last byte may only carry bits that fit in the declared width.
                if i == max_bytes - 1 and (b & 0x7F) >> (bits - 7 * i):
                    raise self.fail(f"LEB128 {what} overflows u{bits}", start)
                return result
            shift += 7
        raise self.fail(f"LEB128 {what} longer than {max_bytes} bytes", start)

    def count(self, what: str, min_item_bytes: int = 1) -> int:
        at = self.pos
        n = self.uleb(what)
        if n > MAX_VECTOR_ITEMS:
            # Far beyond any analytics module; refusing early keeps the checker's cost bounded.
            raise self.fail(f"{what} is {n}, above the limit of {MAX_VECTOR_ITEMS}", at)
        # A vector cannot hold more items than bytes are left: catches absurd counts early.
        if n * min_item_bytes > self.end - self.pos:
            raise self.fail(f"{what} is {n}, more than the {self.end - self.pos} bytes left allow", at)
        return n

    def name(self, what: str) -> str:
        n = self.count(f"length of {what}")
        at = self.pos
        raw = self.bytes(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8", at + e.start) from None

    def valtype(self, what: str) -> str:
        at = self.pos
        b = self.byte(what)
        if b not in VALUE_TYPES:
            raise self.fail(f"unknown value type 0x{b:02x} in {what}", at)
        return VALUE_TYPES[b]

    def reftype(self, what: str) -> str:
        at = self.pos
        t = self.valtype(what)
        if t not in ("funcref", "externref"):
            raise self.fail(f"{what} must be a reference type, not {t}", at)
        return t

    def limits(self, what: str, allow_memory_flags: bool) -> Limits:
        at = self.pos
        flags = self.byte(f"{what} limits flags")
        allowed = 0x07 if allow_memory_flags else 0x01
        if flags & ~allowed:
            raise self.fail(f"unknown {what} limits flags 0x{flags:02x}", at)
        is64 = bool(flags & 0x04)
        bits = 64 if is64 else 32
        lo = self.uleb(f"{what} minimum", bits)
        hi = self.uleb(f"{what} maximum", bits) if flags & 0x01 else None
        if hi is not None and hi < lo:
            raise self.fail(f"{what} maximum {hi} is below its minimum {lo}", at)
        return Limits(lo, hi, shared=bool(flags & 0x02), is64=is64)

    def expect_end(self, what: str) -> None:
        if self.pos != self.end:
            raise self.fail(f"{what} has {self.end - self.pos} unread bytes at its end")


def _func_type(types: list[FuncType], index: int, r: _Reader, at: int) -> FuncType:
    if index >= len(types):
        raise r.fail(f"type index {index} out of range ({len(types)} types)", at)
    return types[index]


def uleb128(n: int) -> bytes:
    """n as wasm's unsigned LEB128 (sizes, counts, indices)."""
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def custom_section(name: str, payload: bytes) -> bytes:
    """A custom section (id 0): its name, then any bytes; allowed anywhere in a module."""
    body = uleb128(len(name.encode())) + name.encode() + payload
    return b"\0" + uleb128(len(body)) + body


def parse(data: bytes) -> WasmInfo:
    """Reads the structure of a wasm binary. Raises WasmFormatError when it is malformed."""
    data = bytes(data)
    r = _Reader(data)
    if len(data) < 8:
        raise r.fail(f"file is {len(data)} bytes, too short for a wasm header (8 bytes)", len(data))
    if data[:4] != WASM_MAGIC:
        raise r.fail(f"bad magic {data[:4]!r}, expected {WASM_MAGIC!r}", 0)
    version = int.from_bytes(data[4:8], "little")
    if version != WASM_VERSION:
        raise r.fail(f"unsupported wasm version {version} (expected 1)", 4)
    r.pos = 8
    info = WasmInfo(version=version, size=len(data))
    last_order = 0
    seen: set[int] = set()
    n_code_bodies: int | None = None

    while r.pos < r.end:
        header_at = r.pos
        sid = r.byte("section id")
        if sid not in SECTION_NAMES:
            raise r.fail(f"unknown section id {sid}", header_at)
        size = r.uleb(f"size of {SECTION_NAMES[sid]} section")
        body = r.pos
        if body + size > len(data):
            raise r.fail(f"{SECTION_NAMES[sid]} section of {size} bytes runs past the end of the "
                         f"file ({len(data) - body} bytes left)", header_at)
        s = _Reader(data, body, body + size)
        if sid == 0:
            name = s.name("custom section name")
            info.custom_sections.append(name)
            info.sections.append(Section(0, name, body, size))
            r.pos = body + size
            continue
        if sid in seen:
            raise r.fail(f"duplicate {SECTION_NAMES[sid]} section", header_at)
        if _SECTION_ORDER[sid] < last_order:
            raise r.fail(f"{SECTION_NAMES[sid]} section out of order", header_at)
        seen.add(sid)
        last_order = _SECTION_ORDER[sid]
        info.sections.append(Section(sid, SECTION_NAMES[sid], body, size))

        if sid == 1:
            for _ in range(s.count("type count")):
                at = s.pos
                form = s.byte("function type form")
                if form != 0x60:
                    raise s.fail(f"unsupported type form 0x{form:02x} (expected 0x60, func)", at)
                params = tuple(s.valtype("param type") for _ in range(s.count("param count")))
                results = tuple(s.valtype("result type") for _ in range(s.count("result count")))
                info.types.append(FuncType(params, results))
        elif sid == 2:
            for _ in range(s.count("import count", 3)):
                module = s.name("import module name")
                name = s.name("import name")
                at = s.pos
                kind_b = s.byte("import kind")
                if kind_b not in EXTERNAL_KINDS:
                    raise s.fail(f"unknown import kind {kind_b} for {module}.{name}", at)
                imp = Import(module, name, EXTERNAL_KINDS[kind_b])
                if kind_b == 0:
                    at = s.pos
                    imp.type_index = s.uleb("import type index")
                    imp.signature = _func_type(info.types, imp.type_index, s, at)
                elif kind_b == 1:
                    s.reftype("imported table element type")
                    imp.limits = s.limits("table", allow_memory_flags=False)
                elif kind_b == 2:
                    imp.limits = s.limits("memory", allow_memory_flags=True)
                elif kind_b == 3:
                    s.valtype("imported global type")
                    at = s.pos
                    if s.byte("global mutability") > 1:
                        raise s.fail("bad global mutability flag", at)
                else:
                    at = s.pos
                    if s.byte("tag attribute") != 0:
                        raise s.fail("bad tag attribute", at)
                    tat = s.pos
                    imp.type_index = s.uleb("tag type index")
                    _func_type(info.types, imp.type_index, s, tat)
                info.imports.append(imp)
        elif sid == 3:
            for _ in range(s.count("function count")):
                at = s.pos
                t = s.uleb("function type index")
                _func_type(info.types, t, s, at)
                info.functions.append(t)
        elif sid == 4:
            for _ in range(s.count("table count", 2)):
                s.reftype("table element type")
                info.tables.append(s.limits("table", allow_memory_flags=False))
        elif sid == 5:
            for _ in range(s.count("memory count", 2)):
                info.memories.append(s.limits("memory", allow_memory_flags=True))
        elif sid == 7:
            names: set[str] = set()
            imported_funcs = info.imported_functions
            for _ in range(s.count("export count", 3)):
                name_at = s.pos
                name = s.name("export name")
                if name in names:
                    raise s.fail(f"duplicate export name {name!r}", name_at)
                names.add(name)
                at = s.pos
                kind_b = s.byte("export kind")
                if kind_b not in EXTERNAL_KINDS:
                    raise s.fail(f"unknown export kind {kind_b} for {name!r}", at)
                at = s.pos
                index = s.uleb("export index")
                exp = Export(name, EXTERNAL_KINDS[kind_b], index)
                if kind_b == 0:
                    n_funcs = len(imported_funcs) + len(info.functions)
                    if index >= n_funcs:
                        raise s.fail(f"export {name!r} names function {index}, "
                                     f"but there are {n_funcs}", at)
                    exp.signature = info.function_signature(index, imported_funcs)
                elif kind_b == 2:
                    n_mems = len(info.imported_memories) + len(info.memories)
                    if index >= n_mems:
                        raise s.fail(f"export {name!r} names memory {index}, "
                                     f"but there are {n_mems}", at)
                info.exports.append(exp)
        elif sid == 8:
            at = s.pos
            info.start = s.uleb("start function index")
            if info.start >= len(info.imported_functions) + len(info.functions):
                raise s.fail(f"start function {info.start} does not exist", at)
        elif sid == 10:
            n_code_bodies = s.count("code body count")
            if n_code_bodies != len(info.functions):
                raise s.fail(f"code section has {n_code_bodies} bodies but the function section "
                             f"declares {len(info.functions)} functions", body)
            for _ in range(n_code_bodies):
                at = s.pos
                n = s.uleb("code body size")
                s.bytes(n, f"code body at offset {at}")
                info.code_sizes.append(n)
        else:
            # global/element/data/datacount/tag: the ABI checks need nothing from them.
            s.pos = s.end
        s.expect_end(f"{SECTION_NAMES[sid]} section")
        r.pos = body + size

    if n_code_bodies is None and info.functions:
        raise r.fail(f"function section declares {len(info.functions)} functions but there is "
                     "no code section", len(data))
    return info


def _kib(pages: int) -> str:
    return f"{pages * PAGE_BYTES // 1024} KiB"


def _mib(nbytes: int) -> str:
    mib = nbytes / (1024 * 1024)
    return f"{mib:g} MiB"


def check_abi_v1(info: WasmInfo, max_memory_bytes: int) -> list[str]:
    """Problems that make the host refuse this module under ABI v1 (see modules/ABI.md)."""
    problems: list[str] = []
    provided = ", ".join(f"{m}.{n}" for m, n in HOST_IMPORTS)

    for imp in info.imports:
        qual = f"{imp.module}.{imp.name}"
        if imp.kind == "memory":
            problems.append(f"imports its memory ({qual}): ABI v1 requires the module to define "
                            "and export its own memory; imported memory is not allowed")
        elif imp.kind != "func":
            problems.append(f"imports {imp.kind} {qual}, which this host does not provide "
                            f"(it provides only the functions {provided})")
        else:
            sig = signature_str(imp.signature)
            wanted = HOST_IMPORTS.get((imp.module, imp.name))
            if wanted is None:
                problems.append(f"imports {qual} {sig}, which this host does not provide "
                                f"(it provides: {provided})")
            elif sig != wanted:
                problems.append(f"imports {qual} as {sig}, but the host provides {qual} as {wanted}")

    mem_export = info.export("memory")
    if mem_export is None:
        problems.append("does not export its memory as \"memory\"")
    elif mem_export.kind != "memory":
        problems.append(f"exports \"memory\" as a {mem_export.kind}, not a memory")

    n_memories = len(info.imported_memories) + len(info.memories)
    if n_memories == 0:
        problems.append("declares no memory")
    elif n_memories > 1:
        problems.append(f"declares {n_memories} memories; ABI v1 allows exactly one")
    if info.memories:
        mem = info.memories[0]
        if mem.is64:
            problems.append("declares a 64-bit memory (memory64); ABI v1 requires a 32-bit memory")
        if mem.shared:
            problems.append("declares a shared memory; ABI v1 does not allow shared memory")
        if mem.max is None:
            problems.append(f"declares memory min {_kib(mem.min)} and has no maximum: "
                            "ABI v1 requires minimum == maximum")
        elif mem.min != mem.max:
            problems.append(f"declares memory min {_kib(mem.min)}, max {_kib(mem.max)}: "
                            "ABI v1 requires minimum == maximum")
        pages = mem.min if mem.max is None else mem.max
        if pages * PAGE_BYTES > max_memory_bytes:
            problems.append(f"declares {_mib(pages * PAGE_BYTES)} of memory, above the host "
                            f"limit of {_mib(max_memory_bytes)}")

    for name, wanted in REQUIRED_FUNC_EXPORTS.items():
        exp = info.export(name)
        if exp is None:
            problems.append(f"does not export {name} {wanted}")
        elif exp.kind != "func":
            problems.append(f"exports {name} as a {exp.kind}, not a function {wanted}")
        elif signature_str(exp.signature) != wanted:
            problems.append(f"exports {name} as {signature_str(exp.signature)}, "
                            f"ABI v1 requires {wanted}")
    for name, wanted in OPTIONAL_FUNC_EXPORTS.items():
        exp = info.export(name)
        if exp is not None and (exp.kind != "func" or signature_str(exp.signature) != wanted):
            problems.append(f"exports {name} as {signature_str(exp.signature) if exp.kind == 'func' else exp.kind}, "
                            f"ABI v1 requires {wanted}")
    state = [n for n in OPTIONAL_FUNC_EXPORTS if info.export(n) is not None]
    if state and len(state) != len(OPTIONAL_FUNC_EXPORTS):
        problems.append(f"exports {', '.join(state)} but not all of {', '.join(OPTIONAL_FUNC_EXPORTS)}: "
                        "persistent state needs the three together")
    if len(problems) > MAX_PROBLEMS:
        problems = problems[:MAX_PROBLEMS] + [f"and {len(problems) - MAX_PROBLEMS} more problems"]
    return problems
