"""The hot path of the wasmtime engine, straight on wasmtime's C API (the library the `wasmtime`
wheel ships; its Python classes make the engine, the store and the compiled module).

Why: wasmtime-py's checked calls cost ~40 µs from Python into wasm and ~7 µs for each host call
back (measured, x86-64): bearing makes ~50 host calls a window, which made the JIT'd module no
faster than its own overhead. The C API's "unchecked" calls take and give raw values: a call
costs a ctypes call, a host call one ctypes callback. The types are checked once, at link time,
against the module's own signatures (ABI v1, checked before load).

The one ctypes callback (HOST_TRAMPOLINE) is made when this module is imported, in the zygote:
a ctypes callback needs executable memory, which a worker's sandbox does not give.
"""
from __future__ import annotations

import ctypes
import itertools
import platform
import struct
import sys
import weakref
from pathlib import Path
from typing import Callable

import wasmtime

_machine = {"AMD64": "x86_64", "arm64": "aarch64", "ARM64": "aarch64"}.get(platform.machine(), platform.machine())
# The same file wasmtime-py loaded: dlopen hands back the same library, not a second copy.
LIB = ctypes.CDLL(str(Path(wasmtime.__file__).parent / f"{sys.platform}-{_machine}" / "_libwasmtime.so"))

P = ctypes.c_void_p
EXTERN_FUNC, EXTERN_MEMORY = 0, 3


class Extern(ctypes.Structure):
    """wasmtime_extern_t: a kind byte, then (at offset 8) the item; 32 bytes cover every kind."""
    _fields_ = [("kind", ctypes.c_uint8), ("item", ctypes.c_uint64 * 4)]


class ByteVec(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("data", ctypes.POINTER(ctypes.c_char))]


class Instance(ctypes.Structure):   # wasmtime_instance_t
    _fields_ = [("store_id", ctypes.c_uint64), ("index", ctypes.c_size_t)]


VALUE_BYTES = 16   # wasmtime_val_raw_t
HOST_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_size_t, P, P, P, ctypes.c_size_t)
NO_FINALIZER = ctypes.cast(None, ctypes.CFUNCTYPE(None, P))


def _fn(name: str, restype, *argtypes):
    f = getattr(LIB, name)
    f.restype, f.argtypes = restype, list(argtypes)
    return f


store_context = _fn("wasmtime_store_context", P, P)
set_epoch_deadline = _fn("wasmtime_context_set_epoch_deadline", None, P, ctypes.c_uint64)
set_fuel = _fn("wasmtime_context_set_fuel", P, P, ctypes.c_uint64)
linker_new = _fn("wasmtime_linker_new", P, P)
linker_delete = _fn("wasmtime_linker_delete", None, P)
linker_define_func_unchecked = _fn("wasmtime_linker_define_func_unchecked", P, P, ctypes.c_char_p, ctypes.c_size_t,
                                   ctypes.c_char_p, ctypes.c_size_t, P, HOST_CALLBACK, P, type(NO_FINALIZER))
linker_instantiate = _fn("wasmtime_linker_instantiate", P, P, P, P, ctypes.POINTER(Instance), ctypes.POINTER(P))
instance_export_get = _fn("wasmtime_instance_export_get", ctypes.c_bool, P, ctypes.POINTER(Instance),
                          ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(Extern))
func_call_unchecked = _fn("wasmtime_func_call_unchecked", P, P, P, P, ctypes.c_size_t, ctypes.POINTER(P))
memory_data = _fn("wasmtime_memory_data", P, P, P)
memory_data_size = _fn("wasmtime_memory_data_size", ctypes.c_size_t, P, P)
error_message = _fn("wasmtime_error_message", None, P, ctypes.POINTER(ByteVec))
error_delete = _fn("wasmtime_error_delete", None, P)
trap_new = _fn("wasmtime_trap_new", P, ctypes.c_char_p, ctypes.c_size_t)
trap_message = _fn("wasm_trap_message", None, P, ctypes.POINTER(ByteVec))
trap_code = _fn("wasmtime_trap_code", ctypes.c_bool, P, ctypes.POINTER(ctypes.c_uint8))
trap_delete = _fn("wasm_trap_delete", None, P)
byte_vec_delete = _fn("wasm_byte_vec_delete", None, ctypes.POINTER(ByteVec))

_I32, _I64 = ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int64)
_F32, _F64 = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_double)
# Where a value of each kind sits in a 16-byte wasmtime_val_raw_t: (pointer type, index stride).
_SLOTS = {"i": (_I32, 4), "I": (_I64, 2), "f": (_F32, 4), "F": (_F64, 2)}
# The same as struct formats: a host call's arguments are read in one unpack (a cast per
# argument cost a microsecond each).
_PACKED = {"i": "i12x", "I": "q8x", "f": "f12x", "F": "d8x"}


class CallError(Exception):
    """A wasm call that did not return: `trap_code` (None: not a trap) and the engine's message."""

    def __init__(self, message: str, code: int | None) -> None:
        super().__init__(message)
        self.code = code


def _take_message(ptr: int, read, delete) -> str:
    vec = ByteVec()
    read(ptr, ctypes.byref(vec))
    text = ctypes.string_at(vec.data, vec.size).decode("utf-8", "replace") if vec.size else ""
    byte_vec_delete(ctypes.byref(vec))
    delete(ptr)
    return text


def error_text(error: int) -> str:
    return _take_message(error, error_message, error_delete)


def raise_trap(trap: int) -> None:
    code = ctypes.c_uint8()
    has_code = trap_code(trap, ctypes.byref(code))
    raise CallError(_take_message(trap, trap_message, trap_delete), code.value if has_code else None)


# ---- host functions -------------------------------------------------------------------------------

class HostTable:
    """The host functions of one engine's instance, by index: fn, param kinds, result kind. A
    Python exception in one is kept here and raised again once the wasm call has unwound.
    A worker has one table; a tool may run several modules side by side in one process, so a
    function's env names its table too (its id in the high bits). The registry holds a table
    weakly: it goes with its engine."""

    def __init__(self) -> None:
        self.entries: list[tuple[Callable, struct.Struct, struct.Struct | None]] = []
        self.pending: BaseException | None = None
        self.id = next(_table_ids)
        _TABLES[self.id] = weakref.ref(self, lambda _, table_id=self.id: _TABLES.pop(table_id, None))

    def clear(self) -> None:
        """A new instance replaces the old one (after a deadline): its functions replace the old ones."""
        self.entries.clear()
        self.pending = None

    def add(self, fn: Callable, signature: str) -> int:
        """signature: pywasm3's "r(pp)" (engines.IMPORT_SIGNATURES). Returns the function's env."""
        if len(self.entries) >= _INDEX_MASK:
            raise CallError("too many host functions in one table", None)
        params = struct.Struct("<" + "".join(_PACKED[c] for c in signature[2:-1]))
        result = None if signature[0] == "v" else struct.Struct("<" + signature[0].replace("I", "q").replace("F", "d"))
        self.entries.append((fn, params, result))
        return self.id << _INDEX_BITS | len(self.entries)   # index from 1: env 0 would read as NULL


_table_ids = itertools.count(1)
_INDEX_BITS = 20
_INDEX_MASK = (1 << _INDEX_BITS) - 1
_TABLES: dict[int, weakref.ref] = {}   # table id -> table (read by the trampoline)


_TRAP_MESSAGE = b"host call raised"


@HOST_CALLBACK
def HOST_TRAMPOLINE(env, caller, values, count):   # noqa: N802 (a constant: made once, in the zygote)
    # Nothing may leave a ctypes callback raising: ctypes would return junk, which wasmtime takes
    # for a trap pointer. Every step is inside the try; a KeyboardInterrupt at the very first
    # bytecode is kept out by the callers (engines.py holds SIGINT back around in-process calls).
    table = None
    try:
        ref = _TABLES.get(env >> _INDEX_BITS)
        table = ref() if ref is not None else None
        if table is None:
            raise LookupError(f"host function {env:#x}: its table is gone")
        fn, params, result = table.entries[(env & _INDEX_MASK) - 1]
        value = fn(*params.unpack(ctypes.string_at(values, params.size)) if params.size else ())
        if result is not None:
            ctypes.memmove(values, result.pack(value), result.size)
        return 0
    except BaseException as exc:   # noqa: BLE001 (it is raised again after the call unwinds)
        if table is not None:
            table.pending = exc
        return trap_new(_TRAP_MESSAGE, len(_TRAP_MESSAGE)) or 0


# ---- instances --------------------------------------------------------------------------------------

class Export:
    """An exported function called with raw values: arguments and results share one buffer."""

    def __init__(self, context: int, extern: Extern, params: str, results: str) -> None:
        self._context = context
        self._extern = extern   # keep alive: the call reads the function from it
        self._func = ctypes.addressof(extern) + 8
        self._count = max(len(params), len(results), 1)
        self._buffer = (ctypes.c_uint8 * (VALUE_BYTES * self._count))()
        self._address = ctypes.addressof(self._buffer)
        # Typed views of the buffer, made once: (pointer, index) per argument, and the result's.
        self._params = [(ctypes.cast(self._address, _SLOTS[c][0]), i * _SLOTS[c][1]) for i, c in enumerate(params)]
        self._result = ctypes.cast(self._address, _SLOTS[results[0]][0]) if results else None
        self._trap = P()
        self._trap_ref = ctypes.byref(self._trap)

    def __call__(self, *args):
        for (pointer, index), value in zip(self._params, args):
            pointer[index] = value
        error = func_call_unchecked(self._context, self._func, self._address, self._count, self._trap_ref)
        if error:
            raise CallError(error_text(error), None)
        trap = self._trap
        if trap.value:
            pointer, trap.value = trap.value, None
            raise_trap(pointer)
        return self._result[0] if self._result is not None else None


def link_and_instantiate(engine, store, module, imports: dict[tuple[str, str], tuple[Callable, str]],
                         table: HostTable) -> tuple[int, Instance]:
    """Instantiate `module` (wasmtime-py objects) with `imports` {(module, name): (fn, signature)}
    through the unchecked host trampoline. Returns (store context, instance)."""
    context = store_context(ctypes.cast(store.ptr(), P))
    linker = linker_new(ctypes.cast(engine.ptr(), P))
    try:
        types = []   # borrowed by the linker only during each define call
        for (mod, name), (fn, signature) in imports.items():
            env = table.add(fn, signature)
            ftype = _func_type(signature)
            types.append(ftype)
            error = linker_define_func_unchecked(linker, mod.encode(), len(mod.encode()), name.encode(),
                                                 len(name.encode()), ctypes.cast(ftype.ptr(), P),
                                                 HOST_TRAMPOLINE, env, NO_FINALIZER)
            if error:
                raise CallError(error_text(error), None)
        instance, trap = Instance(), P()
        error = linker_instantiate(linker, context, ctypes.cast(module.ptr(), P), ctypes.byref(instance),
                                   ctypes.byref(trap))
        if error:
            raise CallError(error_text(error), None)
        if trap.value:
            raise_trap(trap.value)
        return context, instance
    finally:
        linker_delete(linker)


def export(context: int, instance: Instance, name: str) -> Extern:
    extern = Extern()
    if not instance_export_get(context, ctypes.byref(instance), name.encode(), len(name.encode()),
                               ctypes.byref(extern)):
        raise KeyError(name)
    return extern


def memory_view(context: int, extern: Extern) -> memoryview:
    """Linear memory as a view (its base holds: ABI v1 memories never grow)."""
    if extern.kind != EXTERN_MEMORY:
        raise KeyError("memory")
    item = ctypes.addressof(extern) + 8
    size = memory_data_size(context, item)
    return memoryview((ctypes.c_ubyte * size).from_address(memory_data(context, item))).cast("B")


_VALTYPES = {"i": "i32", "I": "i64", "f": "f32", "F": "f64"}


def _func_type(signature: str):
    result, params = signature[0], signature[2:-1]
    vt = wasmtime.ValType
    return wasmtime.FuncType([getattr(vt, _VALTYPES[c])() for c in params],
                             [] if result == "v" else [getattr(vt, _VALTYPES[result])()])
