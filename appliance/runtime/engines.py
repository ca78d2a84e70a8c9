"""Wasm engines behind one small interface: wasm3 (interpreter, the default) and wasmtime
(Cranelift JIT, a module's `engine: wasmtime`; docs/engines.md).

An engine loads validated bytes, links the host imports of ABI v1 and calls exports. It runs
only inside a worker process: a crash, a hang or a leak in it takes down that worker, no more.
"""
from __future__ import annotations

import _signal   # getsignal without signal.py's enum conversion (see _SigintDeferral)
import contextlib
import signal
import threading
import time
from abc import ABC, abstractmethod
from typing import Callable

# (module, name) -> pywasm3-style signature string; ABI.md is the source of truth.
IMPORT_SIGNATURES = {
    ("ap", "log"): "v(iii)",
    ("ap", "feature"): "v(iiF)",
    ("ap", "event"): "v(iFii)",
    ("ap", "dsp_rfft"): "i(iii)",
    ("ap", "dsp_irfft"): "i(iii)",
    ("ap", "dsp_rfft_batch"): "i(iiii)",
    ("ap", "dsp_moments"): "i(iiiii)",
    ("ap", "dsp_band_power"): "i(iiiiii)",
    ("ap", "dsp_envelope"): "i(iiiiii)",
    ("ap", "dsp_envelope_ex"): "i(iiiiiii)",
    ("ap", "dsp_band_kurtosis"): "i(iiiiiii)",
    ("ap", "dsp_median"): "i(iiiii)",
    ("ap", "features"): "v(iiii)",
    ("ap", "state_changed"): "v()",
    ("ap", "img_downscale"): "i(iiiii)",
    ("ap", "img_blur"): "i(iiiii)",
    ("ap", "img_bg_subtract"): "i(iiiiiii)",
    ("ap", "img_dilate"): "i(iiiii)",
    ("ap", "img_blobs"): "i(iiiiii)",
    ("ap", "nn_run"): "i(iiiiii)",
}


class EngineTrap(RuntimeError):
    """A call that the engine stopped: kind 'trap' (the module's own fault) or 'deadline' (the
    window's time or fuel ran out; the worker carries on with a fresh instance)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"[trap] {message}")
        self.kind = kind


class EngineLoadError(RuntimeError):
    """The engine could not compile or instantiate the module: kind 'load' or 'memory'."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Instance(ABC):
    @abstractmethod
    def call(self, export: str, *args): ...

    @abstractmethod
    def memory(self) -> memoryview:
        """A view of linear memory, valid for the instance's life (its size never changes)."""


class Backend(ABC):
    name: str

    @abstractmethod
    def instantiate(self, wasm: bytes, stack_bytes: int,
                    imports: dict[tuple[str, str], Callable]) -> Instance: ...


class Wasm3Instance(Instance):
    def __init__(self, environment, runtime, module) -> None:
        self._env = environment   # keep alive: the runtime belongs to it
        self._rt = runtime
        self._module = module   # keep alive: wasm3 functions point into it
        self._functions: dict = {}
        # One view for the instance's life. pywasm3 0.5.0's get_memory() leaks its Py_buffer
        # (80 bytes a call, measured: 200,000 calls +15.7 MB RSS) and a view goes stale only
        # after memory.grow, which ABI v1 rules out (minimum == maximum, checked before load).
        self._memory = runtime.get_memory(0)

    def call(self, export: str, *args):
        fn = self._functions.get(export)
        if fn is None:
            fn = self._functions[export] = self._rt.find_function(export)
        return fn(*args)

    def memory(self) -> memoryview:
        return self._memory


class Wasm3Backend(Backend):
    name = "wasm3"

    def __init__(self) -> None:
        import wasm3  # only workers import the engine, before their memory cap is set
        self._wasm3 = wasm3

    def instantiate(self, wasm: bytes, stack_bytes: int, imports) -> Instance:
        env = self._wasm3.Environment()
        rt = env.new_runtime(stack_bytes)
        module = env.parse_module(bytes(wasm))
        rt.load(module)
        for (mod_name, name), fn in imports.items():
            # link_function must follow load; linking an import the module lacks is a no-op.
            module.link_function(mod_name, name, IMPORT_SIGNATURES[(mod_name, name)], fn)
        return Wasm3Instance(env, rt, module)


# ---- wasmtime ------------------------------------------------------------------------------------

INIT_DEADLINE_S = 5.0   # ap_init and the state calls: under the supervisor's 10 s load timeout


class EpochTicker:
    """Ends a call that overruns its deadline: a thread that bumps the engine's epoch once the
    armed deadline passes (the JIT'd code checks the epoch at function entries and loop heads
    and traps). Python runs no signal handler while native code runs, so a thread it is.

    It sleeps while nothing is armed. A call wakes it only when the new deadline comes before
    the one it sleeps towards: a window every few ms against a 250 ms deadline costs a wake-up
    every 250 ms, not two a window."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self._cond = threading.Condition()
        self._until: float | None = None
        self._sleeping_until: float | None = None   # None: idle, waiting to be armed
        self._thread = threading.Thread(target=self._run, name="epoch", daemon=True)
        self._thread.start()

    def arm(self, seconds: float) -> None:
        with self._cond:
            self._until = until = time.monotonic() + seconds
            if self._sleeping_until is None or until < self._sleeping_until:
                self._cond.notify()

    def disarm(self) -> None:
        # Under the lock: the ticker reads an expired deadline and bumps the epoch in one hold of
        # it, so a bump for this call cannot land after the next call set its epoch deadline.
        with self._cond:
            self._until = None

    def _run(self) -> None:
        with self._cond:
            while True:
                until = self._until
                if until is None:
                    self._sleeping_until = None
                    self._cond.wait()
                    continue
                left = until - time.monotonic()
                if left > 0:
                    self._sleeping_until = until
                    self._cond.wait(left)
                    continue
                self._until = None
                self._engine.increment_epoch()


class _SigintDeferral:
    """Ctrl-C while JIT code runs would raise KeyboardInterrupt inside the host trampoline (a
    ctypes callback) before its try, crashing the process; during a call the handler only takes
    note, and the interrupt comes once the call returned. For calls in a tool's own process: a
    worker ignores SIGINT, and only the main thread may set a handler (another thread needs none:
    the interrupt is raised in the main thread). Only a Python handler can raise there: with
    SIGINT ignored, left to the default action (the process ends at once) or handled in C, nothing
    is installed.

    The handler stays installed in front of the one it found (which it calls outside calls):
    swapping handlers around every call cost ~18 us a call on this VM (two sigaction calls and a
    generator), as much as a small module's window on wasmtime. Each outermost call checks that it
    is still the installed one (a tool or a notebook may set its own later) and puts it back in
    front of that one if not. It asks _signal, the C module under signal: signal.getsignal turns
    a handler into an enum member by trying and catching a ValueError, ~3 us a call."""

    def __init__(self) -> None:
        self.depth = 0
        self.caught = None          # the frame of a SIGINT that came during a call
        self.previous = None

    def _handler(self, signum, frame) -> None:
        if self.depth:
            self.caught = frame
        elif callable(self.previous):
            self.previous(signum, frame)

    def __enter__(self) -> None:
        if threading.get_ident() != threading.main_thread().ident:
            return
        if not self.depth:
            current = _signal.getsignal(signal.SIGINT)
            if current != self._handler and callable(current):
                self.previous = current
                signal.signal(signal.SIGINT, self._handler)
        self.depth += 1

    def __exit__(self, *exc) -> None:
        if threading.get_ident() != threading.main_thread().ident:
            return
        self.depth -= 1
        if not self.depth and self.caught is not None:
            frame, self.caught = self.caught, None
            if callable(self.previous):
                self.previous(signal.SIGINT, frame)


_SIGINT_DEFERRAL = _SigintDeferral()


def sigint_deferred() -> _SigintDeferral:
    """The context in which an in-process wasmtime call runs (see _SigintDeferral)."""
    return _SIGINT_DEFERRAL


class WasmtimeInstance(Instance):
    def __init__(self, backend: "WasmtimeBackend", store, context: int, instance) -> None:
        c = backend.c
        self._backend = backend
        self._store = store   # keep alive: the context and the instance belong to it
        self._context = context
        self._instance = instance
        self._functions: dict = {}
        try:
            # ABI v1: exported as "memory" (checked before load); it never grows, so the base holds.
            self._memory = c.memory_view(context, c.export(context, instance, "memory"))
        except KeyError:
            raise EngineLoadError("load", "the module exports no memory") from None

    def call(self, export: str, *args):
        backend = self._backend
        fn = self._functions.get(export)
        if fn is None:
            params, results = backend.export_types[export]
            fn = self._functions[export] = backend.c.Export(self._context, backend.c.export(
                self._context, self._instance, export), params, results)
        if backend.fuel is not None:
            self._store.set_fuel(backend.fuel)
        ticker = backend.ticker
        if ticker is None:   # no deadline (a tool's in-process run)
            with sigint_deferred():
                try:
                    return fn(*args)
                except backend.c.CallError as exc:
                    raise backend.trap(exc, export) from None
        backend.c.set_epoch_deadline(self._context, 1)
        ticker.arm(backend.deadline_s if export == "ap_process" else INIT_DEADLINE_S)
        try:
            return fn(*args)
        except backend.c.CallError as exc:
            raise backend.trap(exc, export) from None
        finally:
            ticker.disarm()

    def memory(self) -> memoryview:
        return self._memory


_KINDS = {"i32": "i", "i64": "I", "f32": "f", "f64": "F"}


class WasmtimeBackend(Backend):
    """Cranelift-compiled modules. One engine per worker, made after the fork (an engine may
    start threads for compilation; this one is told not to). The compiled module is kept: a
    fresh instance after a deadline costs an instantiation, not a compilation. Calls go through
    wasmtime_c (the C API's unchecked calls): wasmtime-py's own cost more than the module.

    load(): a compiled artifact from the cache (docs/engines.md); when it does not load, the
    module is compiled and `artifact_out` holds the new one for the supervisor to keep."""

    name = "wasmtime"

    def __init__(self, *, simd: bool = False, fuel: int | None = None, deadline_s: float | None = 0.25,
                 memory_bytes: int = 64 << 20, stack_bytes: int = 512 << 10) -> None:
        import wasmtime   # imported by the zygote; the engine itself is made here, after the fork
        from appliance.runtime import wasmtime_c
        self.wasmtime, self.c = wasmtime, wasmtime_c
        self.fuel, self.deadline_s, self.memory_bytes = fuel, deadline_s, memory_bytes
        self.engine = wasmtime.Engine(wasmtime_config(wasmtime, simd=simd, fuel=fuel is not None,
                                                      stack_bytes=stack_bytes))
        # deadline_s None: no deadline (tools running a model in their own process), no ticker thread.
        self.ticker = EpochTicker(self.engine) if deadline_s is not None else None
        self.host = wasmtime_c.HostTable()
        self.export_types: dict[str, tuple[str, str]] = {}
        self._module = None
        self.artifact_out: bytes | None = None
        self.artifact_note = ""

    def load(self, wasm: bytes, artifact: bytes = b"") -> None:
        """Deserialize the cached artifact, or compile (and keep the artifact for the cache)."""
        wt = self.wasmtime
        module = None
        if artifact:
            try:
                module = wt.Module.deserialize(self.engine, artifact)
            except wt.WasmtimeError as exc:
                self.artifact_note = f"cached artifact refused ({str(exc).splitlines()[0][:200]}); compiled again"
        if module is None:
            try:
                module = wt.Module(self.engine, bytes(wasm))
            except wt.WasmtimeError as exc:
                raise EngineLoadError("load", f"wasmtime could not compile the module: {str(exc).splitlines()[0]}") \
                    from None
            self.artifact_out = bytes(module.serialize())
        for ex in module.exports:
            if isinstance(ex.type, wt.FuncType):
                self.export_types[ex.name] = ("".join(_KINDS[str(t)] for t in ex.type.params),
                                              "".join(_KINDS[str(t)] for t in ex.type.results))
        self._module = module

    def instantiate(self, wasm: bytes, stack_bytes: int, imports) -> Instance:
        wt = self.wasmtime
        if self._module is None:
            self.load(wasm)
        store = wt.Store(self.engine)
        # The worker's memory cap, enforced by wasmtime too: one instance, one memory, one table.
        store.set_limits(memory_size=self.memory_bytes, instances=1, memories=1, tables=1,
                         table_elements=1 << 20)
        wanted = {(imp.module, imp.name) for imp in self._module.imports}
        linked = {key: (fn, IMPORT_SIGNATURES[key]) for key, fn in imports.items() if key in wanted}
        self.host.clear()   # the previous instance (if any) is dropped: its host functions with it
        if self.fuel is not None:
            store.set_fuel(self.fuel)
        store.set_epoch_deadline(1)
        if self.ticker is not None:
            self.ticker.arm(INIT_DEADLINE_S)   # a start function runs during instantiation
        try:
            with sigint_deferred() if self.ticker is None else contextlib.nullcontext():
                context, instance = self.c.link_and_instantiate(self.engine, store, self._module, linked, self.host)
        except self.c.CallError as exc:
            if exc.code is not None or self.host.pending is not None:   # a trap, or a host call's exception
                raise self.trap(exc, "start") from None
            text = str(exc).splitlines()[0] if str(exc) else "instantiation failed"
            # Out of memory: the store's limit, or the worker's RLIMIT_DATA (ENOMEM, os error 12).
            kind = "memory" if any(w in text for w in ("limit", "exceed", "os error 12")) and "memory" in text else "load"
            raise EngineLoadError(kind, f"wasmtime could not instantiate the module: {text}") from None
        finally:
            if self.ticker is not None:
                self.ticker.disarm()
        return WasmtimeInstance(self, store, context, instance)

    def trap(self, exc, export: str) -> Exception:
        """What a call that did not return becomes: a host call's own exception (AbiViolation,
        MemoryError) raised again, or an EngineTrap."""
        if self.host.pending is not None:
            pending, self.host.pending = self.host.pending, None
            return pending
        names = {v.value: k for k, v in self.wasmtime.TrapCode.__members__.items()}
        code = names.get(exc.code)
        if code == "INTERRUPT":
            limit = self.deadline_s if export == "ap_process" else INIT_DEADLINE_S
            return EngineTrap("deadline", f"{export} ran past its deadline of {limit * 1000:.0f} ms "
                                          "(stopped by wasmtime's epoch interruption)")
        if code == "OUT_OF_FUEL":
            return EngineTrap("deadline", f"{export} ran out of fuel ({self.fuel} units a call)")
        # In wasm3's words, so a trap reads the same on both engines.
        text = _TRAP_TEXT.get(code, code.lower().replace("_", " ")) if code else (str(exc).splitlines() or ["trap"])[0]
        return EngineTrap("trap", f"{text} (in {export})")


_TRAP_TEXT = {"STACK_OVERFLOW": "stack overflow", "MEMORY_OUT_OF_BOUNDS": "out of bounds memory access",
              "INTEGER_DIVISION_BY_ZERO": "integer divide by zero", "UNREACHABLE": "unreachable executed",
              "INTEGER_OVERFLOW": "integer overflow", "BAD_CONVERSION_TO_INTEGER": "invalid conversion to integer",
              "INDIRECT_CALL_TO_NULL": "indirect call to a null table entry",
              "BAD_SIGNATURE": "indirect call signature mismatch", "TABLE_OUT_OF_BOUNDS": "undefined table element"}


def wasmtime_config(wasmtime, *, simd: bool, fuel: bool, stack_bytes: int):
    """The engine's settings. A compiled artifact holds them: the cache key names them (cache.py)."""
    cfg = wasmtime.Config()
    cfg.epoch_interruption = True
    cfg.consume_fuel = fuel
    cfg.wasm_simd = simd
    cfg.wasm_relaxed_simd = False
    cfg.wasm_threads = False
    cfg.parallel_compilation = False   # no compiler threads in a worker (RLIMIT_NPROC)
    # Copy-on-write memory images need memfd_create, which the sandbox refuses: an fd mapped
    # twice (writable, and executable) would undo the JIT's W^X rule. Data segments are copied.
    cfg.memory_init_cow = False
    cfg.cranelift_opt_level = "speed"
    cfg.max_wasm_stack = max(stack_bytes, 512 << 10)
    return cfg


BACKENDS: dict[str, type[Backend]] = {"wasm3": Wasm3Backend, "wasmtime": WasmtimeBackend}
