"""Shared fixtures: the repo, the recorded data beside it, modules built from source."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"recorded data not found at {path} (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def module_dir(tmp_path_factory) -> Path:
    """vibstats built from source for this test session (not the checked-in build folder)."""
    from appliance.modbuild import build_module
    out = tmp_path_factory.mktemp("modules")
    result = build_module(REPO / "modules" / "src" / "vibstats", out / "vibstats.wasm")
    assert not result.problems, result.problems
    return out


@pytest.fixture(scope="session")
def vibstats_wasm(module_dir) -> Path:
    return module_dir / "vibstats.wasm"


@pytest.fixture(autouse=True, scope="session")
def _need_wasm_validate():
    if shutil.which("wasm-validate") is None:
        pytest.fail("wasm-validate is missing: `make test` installs Debian's wabt")
