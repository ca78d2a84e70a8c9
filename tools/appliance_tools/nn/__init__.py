"""ONNX models compiled to ABI v1 wasm modules (docs/models.md).

    from appliance_tools.nn import compile_model
    result = compile_model("model.onnx", "modules/build/model.wasm", labels=["normal", "fault"])

The heavy parts (onnx, the code generator) load on first use: the worker imports only
appliance.runtime.hostcalls.nn, for the host import ap.nn_run.
"""
from __future__ import annotations

from appliance_tools.nn.errors import ModelError

__all__ = ["ModelError", "compile_model", "CompileResult", "supported_operators"]


def compile_model(model, output, **options):
    """See appliance_tools.nn.compiler.compile_model."""
    from appliance_tools.nn.compiler import compile_model as _compile
    return _compile(model, output, **options)


def supported_operators() -> list[str]:
    from appliance_tools.nn.onnx_import import supported_operators as _ops
    return _ops()


def __getattr__(name: str):
    if name == "CompileResult":
        from appliance_tools.nn.compiler import CompileResult
        return CompileResult
    raise AttributeError(name)
