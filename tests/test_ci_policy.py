"""Under CI=true nothing hides: a missing recording fails with its name, and a skip not on
tests/ci-skips.txt fails the run. Checked on a throwaway tree with this conftest and no
../shared/data beside it, in a pytest of its own."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PROBES = '''
import pytest
from conftest import shared_file

def test_needs_a_recording():
    shared_file("bearing", "cwru", "normal_0hp_48k.mat")

def test_skips_for_no_good_reason():
    pytest.skip("feeling lucky")

def test_skips_with_leave():
    pytest.skip("needs a real I2C bus")
'''


def _run(tmp_path: Path, ci: bool, allowed: str = "", select: str = "") -> subprocess.CompletedProcess:
    tree = tmp_path / ("ci" if ci else "dev")
    tests = tree / "main" / "tests"
    tests.mkdir(parents=True)
    shutil.copy2(REPO / "tests" / "conftest.py", tests / "conftest.py")
    (tests / "ci-skips.txt").write_text(allowed)
    (tests / "test_probe.py").write_text(PROBES)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(tests),
                           *(["-k", select] if select else [])],
                          cwd=tests, env=env, capture_output=True, text=True, timeout=120)


def test_outside_ci_missing_things_skip_with_the_reason(tmp_path):
    proc = _run(tmp_path, ci=False)
    assert proc.returncode == 0, proc.stdout
    assert "3 skipped" in proc.stdout
    assert "missing: recorded data" in proc.stdout and "shared/data/bearing/cwru/normal_0hp_48k.mat" in proc.stdout


def test_in_ci_a_missing_recording_fails_naming_it(tmp_path):
    proc = _run(tmp_path, ci=True, allowed="*::test_skips_* # probes\n")
    assert proc.returncode != 0
    assert "1 failed, 2 skipped" in proc.stdout
    assert "missing in CI: recorded data" in proc.stdout and "shared/data/bearing/cwru/normal_0hp_48k.mat" in proc.stdout


def test_in_ci_only_listed_skips_pass(tmp_path):
    listed = _run(tmp_path / "a", ci=True, allowed="*::test_skips_* # probes\n", select="skips")
    assert listed.returncode == 0 and "2 skipped" in listed.stdout, listed.stdout
    proc = _run(tmp_path / "b", ci=True, allowed="*::test_skips_with_leave # needs hardware\n", select="skips")
    assert proc.returncode != 0 and "2 skipped" in proc.stdout
    assert "1 skipped test(s) not on tests/ci-skips.txt" in proc.stdout
    assert "test_skips_for_no_good_reason: Skipped: feeling lucky" in proc.stdout
    assert "test_skips_with_leave" not in proc.stdout.split("not on tests/ci-skips.txt")[1]
