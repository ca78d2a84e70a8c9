"""A compiled model module in this process (wasm3 or wasmtime, the engines of
appliance.runtime.engines), for tests, tools and benchmarks: feed it arrays, get its outputs,
features and events. The appliance itself runs modules in worker processes; this is the same
module and engine without the isolation (and, on wasmtime, without a deadline)."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from appliance.config.schema import params_text
from appliance.runtime.engines import Wasm3Backend, WasmtimeBackend
from appliance.runtime.wire import pack_header
from appliance.runtime.validate import check_module


class ModuleCallError(RuntimeError):
    pass


@dataclass
class Result:
    rc: int
    outputs: np.ndarray
    features: dict[str, float] = field(default_factory=dict)
    events: list[tuple[int, float, str]] = field(default_factory=list)
    logs: list[tuple[int, str]] = field(default_factory=list)


class ModelModule:
    def __init__(self, wasm, params: dict | str | None = None, *, host_nn: bool = False,
                 module_dir: Path | None = None, stack_bytes: int = 128 << 10,
                 max_memory_bytes: int = 256 << 20, engine: str = "wasm3", validated: bool = False) -> None:
        """engine: "wasm3", or "wasmtime" for the SIMD128 build (x.simd.wasm; ImportError where
        wasmtime is not installed). validated: the caller ran wasm-validate with the features its
        engine has (the SIMD128 build)."""
        if isinstance(wasm, (str, Path)):
            module_dir = Path(wasm).parent if module_dir is None else module_dir
            wasm = Path(wasm).read_bytes()
        if engine not in ("wasm3", "wasmtime"):
            raise ValueError(f"engine {engine!r}: wasm3 or wasmtime")
        info = check_module(wasm, "model", max_memory_bytes, validated=validated, simd=engine == "wasmtime")
        self.features: dict[str, float] = {}
        self.events: list[tuple[int, float, str]] = []
        self.logs: list[tuple[int, str]] = []
        inst = None

        def read(ptr: int, n: int) -> bytes:
            mem = inst.memory()
            if ptr < 0 or n < 0 or ptr + n > len(mem):
                raise ModuleCallError(f"pointer {ptr}+{n} outside memory")
            return bytes(mem[ptr:ptr + n])

        def log(level, ptr, n):
            self.logs.append((level, read(ptr, n).decode("utf-8", "replace")))

        def feature(ptr, n, value):
            self.features[read(ptr, n).decode()] = value

        def event(sev, score, ptr, n):
            self.events.append((sev, score, read(ptr, n).decode("utf-8", "replace")))

        imports = {("ap", "log"): log, ("ap", "feature"): feature, ("ap", "event"): event}
        self.host = None
        if any((i.module, i.name) == ("ap", "nn_run") for i in info.imports):
            from appliance.runtime.hostcalls.nn import HostNN
            self.host = HostNN(lambda: inst.memory(), ModuleCallError, str(module_dir) if module_dir else None,
                               host_nn, lambda level, text: self.logs.append((level, text)))
            imports.update(self.host.imports())
        # One wasmtime backend a module: it keeps the module it compiled.
        backend = WasmtimeBackend(simd=True, deadline_s=None, memory_bytes=max_memory_bytes) \
            if engine == "wasmtime" else Wasm3Backend()
        inst = backend.instantiate(wasm, stack_bytes, imports)
        self.inst = inst
        if isinstance(params, dict) or params is None:
            params = dict(params or {})
            params.setdefault("host", {"nn": 1 if host_nn else 0})
            text = params_text(params)
        else:
            text = params
        raw = text.encode()
        ptr = inst.call("ap_buffer", 0, max(len(raw), 1))
        inst.memory()[ptr:ptr + len(raw)] = raw
        rc = inst.call("ap_init", ptr, len(raw))
        if rc != 0:
            errors = [m for lvl, m in self.logs if lvl >= 3]
            raise ModuleCallError(f"module rejected its params: {errors[-1] if errors else rc}")
        self._seq = 0
        self._ptrs: dict[int, int] = {}
        self._output: tuple[int, int] | None = None

    def window(self, data: np.ndarray, *, dropped: int = 0, sample_rate: float = 1000.0) -> bytes:
        data = np.ascontiguousarray(data)
        if data.dtype == np.uint8:
            planes, h, w = data.shape if data.ndim == 3 else (1,) + data.shape
            header = pack_header(planes, w * h, sample_rate, self._seq, dropped=dropped, sample_format=2, width=w,
                                 height=h)
        else:
            data = data.astype(np.float32)
            if data.ndim == 1:
                data = data[None]
            header = pack_header(data.shape[0], data.shape[1], sample_rate, self._seq, dropped=dropped)
        return header + data.tobytes()

    def process(self, data: np.ndarray | bytes, *, dropped: int = 0) -> Result:
        """One window: (channels, frames) float32 samples, or (planes, h, w) / (h, w) uint8 pixels."""
        raw = data if isinstance(data, bytes) else self.window(data, dropped=dropped)
        self.features, self.events, self.logs = {}, [], []
        ptr = self._ptrs.get(len(raw))
        if ptr is None:
            ptr = self._ptrs[len(raw)] = self.inst.call("ap_buffer", 1, len(raw))
            if not ptr:
                raise ModuleCallError(f"the module has no buffer for {len(raw)} bytes")
        self.inst.memory()[ptr:ptr + len(raw)] = raw
        rc = self.inst.call("ap_process", ptr, len(raw))
        self._seq += 1
        return Result(rc, self.outputs(), self.features, self.events, self.logs)

    def outputs(self) -> np.ndarray:
        if self._output is None:   # a static block of the module's: asked once (two calls a window cost ~12 us on wasmtime)
            self._output = (self.inst.call("ap_nn_output_ptr"), self.inst.call("ap_nn_output_len"))
        ptr, n = self._output
        mem = self.inst.memory()
        return np.array(struct.unpack_from(f"<{n}f", mem, ptr), np.float32)

