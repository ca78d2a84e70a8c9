"""Helpers for tests that run the real supervisor in-process."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import yaml

from appliance.config.schema import AppConfig, load_config

FAST_RESTART = {"backoff_s": 0.05, "backoff_max_s": 0.2, "max_faults": 3, "fault_window_s": 60}


def sim_source(**overrides: Any) -> dict[str, Any]:
    src = {"type": "sim_vibration", "sample_rate": 12800, "block_s": 0.05, "noise_g": 0.01}
    src.update(overrides)
    return src


def write_config(tmp_path: Path, sources: dict, modules: dict, **sections: Any) -> AppConfig:
    doc = {"gateway": {"name": "test-gw", "data_dir": str(tmp_path / "var")},
           "metrics": {"enabled": False}, "sources": sources, "modules": modules}
    doc.update(sections)
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_config(path)


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def metric(sup, name: str, **labels: str) -> float:
    value = sup.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def build_inline_module(tmp_path_factory, name: str, source: str, memory_kb: int) -> bytes:
    """Build a test module from C text (kernel tests export helpers the ABI does not need)."""
    from appliance_tools.modbuild import build_module
    src = tmp_path_factory.mktemp(f"{name}_src")
    (src / f"{name}.c").write_text(source)
    (src / "module.yaml").write_text(f"name: {name}\nversion: 0.0.1\ndescription: {name} (tests)\n"
                                     f"memory_kb: {memory_kb}\nstack_kb: 64\n")
    result = build_module(src, tmp_path_factory.mktemp(name) / f"{name}.wasm")
    assert result.ok, result.problems
    return result.out.read_bytes()
