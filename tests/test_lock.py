"""The locks in requirements/ are what every target installs: the venv holds exactly dev.txt,
the gateway's lock agrees with it, and both satisfy the ranges in pyproject.toml."""
from __future__ import annotations

import importlib.metadata
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from conftest import REPO

sys.path.insert(0, str(REPO / "requirements"))
import lockfile  # noqa: E402
from install import PATCHED  # noqa: E402

LOCKS = REPO / "requirements"
MACHINES = ("x86_64", "aarch64")
DEBIAN_12 = (3, 11, 2)


def _installed() -> dict[str, str]:
    out = {}
    for dist in importlib.metadata.distributions(path=[p for p in sys.path if p.startswith(sys.prefix)]):
        out[lockfile.canonical(dist.metadata["Name"])] = dist.version
    return out


def test_every_lock_is_pinned_and_hashed():
    for lock in sorted(LOCKS.glob("*.txt")):
        pins = lockfile.read(lock)   # raises on an entry without ==version or without a hash
        assert pins, lock
        for machine in MACHINES:
            lockfile.pins_for(lock, machine, DEBIAN_12)   # raises on a package pinned twice


def test_the_venv_holds_exactly_the_lock():
    want = {k: p.version for k, p in lockfile.pins_for(LOCKS / "dev.txt").items()}
    want |= {k: p.version for k, p in lockfile.pins_for(LOCKS / "build.txt").items()}
    want |= {k: f"{want[k]}+{label}" for k, label in PATCHED.items()}   # built from source, mended
    have = _installed()
    have.pop("factory-gateway-appliance", None)   # the checkout itself, editable
    have.pop("factory-gateway-tools", None)
    assert have == want


@pytest.mark.parametrize("machine", MACHINES)
def test_the_gateway_runs_the_versions_the_tests_ran(machine):
    dev = lockfile.pins_for(LOCKS / "dev.txt", machine, DEBIAN_12)
    gateway = lockfile.pins_for(LOCKS / "gateway.txt", machine, DEBIAN_12)
    assert {k: p.version for k, p in gateway.items()} == {k: dev[k].version for k in gateway}
    assert {"pywasm3", "numpy", "opencv-python-headless"} <= set(gateway)
    assert not {"ziglang", "onnx", "onnxruntime", "pytest"} & set(gateway)   # toolchain and tests stay off


def test_the_locks_satisfy_the_ranges_in_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    tools = tomllib.loads((REPO / "tools" / "pyproject.toml").read_text())
    checks = [("gateway.txt", project["project"]["dependencies"]),
              ("dev.txt", project["project"]["dependencies"]
               + [r for extra in project["project"]["optional-dependencies"].values() for r in extra]
               + [r for r in tools["project"]["dependencies"] if not r.startswith("factory-gateway-")]),
              ("build.txt", project["build-system"]["requires"] + tools["build-system"]["requires"])]
    for lock, requirements in checks:
        for machine in MACHINES:
            pins = lockfile.pins_for(LOCKS / lock, machine, DEBIAN_12)
            for text in requirements:
                req = Requirement(text)
                pin = pins.get(lockfile.canonical(req.name))
                assert pin is not None, f"{lock} has no {req.name} for {machine}"
                assert req.specifier.contains(pin.version, prereleases=True), f"{lock}: {pin.name}=={pin.version} vs {text}"


def test_opencv_4_beside_the_venv_is_the_previous_major():
    (pin,) = lockfile.read(LOCKS / "opencv4.txt")
    dev = lockfile.pins_for(LOCKS / "dev.txt")["opencv-python-headless"]
    assert pin.version.split(".")[0] == "4" and dev.version.split(".")[0] != "4"


def test_markers_are_read_as_pip_reads_them():
    from packaging.markers import Marker
    texts = {p.marker for lock in LOCKS.glob("*.txt") for p in lockfile.read(lock) if p.marker}
    assert texts
    # and the shapes a future `make lock` may write
    texts |= {"platform_machine not in 'x86_64 aarch64'", "python_full_version == '3.11.*'",
              "python_version == '3.11'", "python_full_version >= '3.11' and python_full_version < '3.13'",
              "(platform_machine == 'aarch64' or platform_machine == 'arm64') and sys_platform == 'linux'",
              "python_version ~= '3.11'", "platform_system != 'Windows'", "implementation_name == 'cpython'",
              "python_full_version != '3.11.2'", "'linux' in sys_platform"}
    for machine in MACHINES:
        for python in ((3, 11, 2), (3, 12, 1), (3, 13, 0)):
            env = lockfile.environment(machine, python)
            for text in texts:
                pin = lockfile.Pin("x", "1", text, ("0" * 64,), "")
                assert lockfile.applies(pin, env) == Marker(text).evaluate(env), (text, machine, python)
