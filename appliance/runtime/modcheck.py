"""Let each module judge its own params before anything runs.

A module's params are free-form YAML that only the module understands (a bearing geometry,
an ISO machine group, ...). The module is the authority: load it in a throwaway worker, run
its ap_init, and turn a refusal into a config error at the line of its params.
"""
from __future__ import annotations

import logging

from appliance.config.params import simd_binding_problem
from appliance.config.schema import AppConfig, ConfigIssue, ModuleSection, RuntimeSection, module_params_text
from appliance.runtime.wire import HEADER, load_message
from appliance.runtime.process import ModuleFault, WorkerProcess
from appliance.runtime.validate import ModuleRejected, read_module
from pathlib import Path
from appliance.config.yamlsource import YamlDocument

log = logging.getLogger("appliance.module")


def engine_of(mod: ModuleSection, rt: RuntimeSection) -> str:
    return mod.engine or rt.backend


_refused_siblings: set[tuple[str, str]] = set()   # (path, why): said once


def simd_file(mod: ModuleSection, rt: RuntimeSection) -> Path | None:
    """x.simd.wasm beside x.wasm (the same module built with SIMD128), when the module runs on
    wasmtime and its config leaves `simd` on; wasm3 never gets one (it has no SIMD). Only a SIMD
    build that names this x.wasm's sha256 (its SIMD_OF_SECTION, written by `make modules`): one
    left from an earlier build, or another module's, is not run."""
    if engine_of(mod, rt) != "wasmtime" or not mod.simd:
        return None
    sibling = mod.wasm.with_name(mod.wasm.name[:-len(".wasm")] + ".simd.wasm")
    if not sibling.is_file():
        return None
    try:
        why = simd_binding_problem(read_module(sibling), read_module(mod.wasm))
    except ModuleRejected as exc:
        why = str(exc)
    if not why:
        return sibling
    if (str(sibling), why) not in _refused_siblings:
        _refused_siblings.add((str(sibling), why))
        log.warning("%s is not the SIMD build of %s (%s): %s runs", sibling, mod.wasm, why, mod.wasm.name)
    return None


def module_file(mod: ModuleSection, rt: RuntimeSection) -> Path:
    """The file a worker of this module runs."""
    return simd_file(mod, rt) or mod.wasm


def load_for(mod: ModuleSection, rt: RuntimeSection, state: bytes | None = None) -> dict:
    """The load message of a module as its config says: every start, the real one or a check, sends this."""
    path = module_file(mod, rt)
    return load_message(path.name, module_params_text(mod), backend=engine_of(mod, rt), stack_bytes=rt.stack_kb * 1024,
                        max_memory_bytes=rt.max_memory_mb << 20, memory_budget_bytes=rt.worker_budget_bytes,
                        state=state, module_dir=str(mod.wasm.parent), host_nn=mod.host_nn, host_dsp=mod.host_dsp,
                        simd=path != mod.wasm, fuel=mod.fuel, deadline_s=mod.deadline_ms / 1000.0)


def try_start(name: str, mod: ModuleSection, rt: RuntimeSection) -> None:
    """Start the module in a throwaway worker (its checks, ap_init with its params) and stop it;
    ModuleRejected or ModuleFault say why it would not start."""
    WorkerProcess(name, read_module(module_file(mod, rt)), HEADER.size, load_for(mod, rt)).stop()


def check_modules(doc: YamlDocument, cfg: AppConfig) -> list[ConfigIssue]:
    issues = []
    for name, mod in cfg.modules.items():
        if not mod.enabled:
            continue
        here = ("modules", name)
        try:
            try_start(name, mod, cfg.runtime)
        except ModuleRejected as exc:
            issues.append(ConfigIssue(doc.path, doc.mark_for(here + ("wasm",)), here + ("wasm",), str(exc)))
            continue
        except ModuleFault as fault:
            where = here + (("params",) if fault.kind == "params" else ("wasm",))
            issues.append(ConfigIssue(doc.path, doc.mark_for(where, key=True), where, fault.reason))
    return issues
