"""Shared fixtures: the repo, the recorded data beside it, modules built from source; and the
rule that tests cannot hide (CI=true).

Outside CI a test that lacks a recording, a tool or an emulator skips with the reason. Under
CI=true the same lack is a failure (`require`), and any skip left at the end of the run must be
on tests/ci-skips.txt with its reason, or the run fails: a green CI run means every test ran.
"""
from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
ALLOWED_SKIPS = Path(__file__).resolve().parent / "ci-skips.txt"


def require(present: bool | Path, what: str) -> None:
    """Skip (outside CI) or fail (CI=true) unless `present` (a path must exist)."""
    if isinstance(present, Path):
        present = present.exists()
    if present:
        return
    if IN_CI:
        pytest.fail(f"missing in CI: {what}", pytrace=False)
    pytest.skip(f"missing: {what}")


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"the command {name} (Debian package {package}; `make test` installs it)")
    return path


def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    require(path, f"recorded data {path} (see ../shared/data/README.md)")
    return path


def allowed_skips() -> list[tuple[str, str]]:
    """(test id pattern, reason) pairs from tests/ci-skips.txt: `pattern  # reason` per line."""
    rules = []
    for n, line in enumerate(ALLOWED_SKIPS.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pattern, sep, reason = line.partition("#")
        if not sep or not reason.strip():
            raise ValueError(f"{ALLOWED_SKIPS}:{n}: every allowed skip needs its reason after '#'")
        rules.append((pattern.strip(), reason.strip()))
    return rules


_skipped: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, reason))


def pytest_sessionfinish(session, exitstatus):
    if not IN_CI or not _skipped:
        return
    rules = allowed_skips()
    hidden = [(nodeid, reason) for nodeid, reason in _skipped
              if not any(fnmatch.fnmatchcase(nodeid, pattern) for pattern, _ in rules)]
    if hidden:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"CI=true: {len(hidden)} skipped test(s) not on {ALLOWED_SKIPS.relative_to(REPO)}:"]
        lines += [f"  {nodeid}: {reason}" for nodeid, reason in hidden]
        for line in lines:
            if reporter:
                reporter.write_line(line, red=True)
            else:
                print(line)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def module_dir(tmp_path_factory) -> Path:
    """vibstats built from source for this test session (not the checked-in build folder)."""
    from appliance_tools.modbuild import build_module
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
