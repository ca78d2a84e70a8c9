"""Wasm engines behind one small interface, so wasm3 can be swapped (it is in minimal maintenance).

An engine loads validated bytes, links the host imports of ABI v1 and calls exports. It runs
only inside a worker process: a crash, a hang or a leak in it takes down that worker, no more.
"""
from __future__ import annotations

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


BACKENDS: dict[str, type[Backend]] = {"wasm3": Wasm3Backend}
