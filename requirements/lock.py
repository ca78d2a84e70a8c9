"""`make lock`: resolve every Python package any target installs, once, for x86_64 and aarch64,
with the sha256 of every file, into requirements/*.txt. Run it only to move versions on purpose;
the new lock is its own commit and must pass `make test` (README, "Moving a dependency").

    lock file       input                                       installed by
    build.txt       build.in (pip, setuptools, wheel)           every venv first, and the image
    dev.txt         pyproject.toml [test,mat] + tools/pyproject.toml make run / test / bench (.venv)
    gateway.txt     pyproject.toml, no extras, at dev's pins    the image (aarch64 wheels)
    opencv4.txt     opencv4.in, at dev's pins                   .venv/opencv4 (tests under OpenCV 4)
    train.txt       train.in + torch (CPU build, see below)     make train-models (.venv-train)
    tools.txt       tools.in (uv)                               .venv-tools (this script)

uv resolves "universally": one file serves both machines, with environment markers where the
answer differs. Markers for Windows or macOS may appear and are harmless.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import lockfile  # noqa: E402

INDEX = "https://pypi.org/simple"
PYTHON = "3.11"           # Debian 12's CPython, on the gateway and in the clean room
# torch: PyPI's x86_64 wheel is the CUDA build (gigabytes of nvidia-* packages); its CPU build
# lives on download.pytorch.org, which this workplace cannot reach, and on the machine's disk.
TORCH_VERSION = "2.13.0"
TORCH_CPU_X86_64 = ("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
                    "6746dbcbeb526eb61330b76b41ff1b4eb848951103a892eeb080dfa2b264667b")


def uv_compile(inputs: list[str], out: Path, constraints: Path | None = None, extra: list[str] = ()) -> None:
    cmd = [sys.executable, "-m", "uv", "pip", "compile", "--quiet", "--universal", "--python-version", PYTHON,
           "--generate-hashes", "--index-url", INDEX, "--no-config", "--custom-compile-command", "make lock",
           "-o", str(out), *extra, *inputs]
    if constraints:
        cmd += ["--constraint", str(constraints)]
    subprocess.run(cmd, check=True, cwd=REPO)


def pins_as_constraints(lock: Path, dest: Path, skip: set[str] = frozenset()) -> Path:
    """name==version[; marker] lines (no hashes) from a lock, so another lock agrees with it."""
    lines = [f"{p.name}=={p.version}" + (f" ; {p.marker}" if p.marker else "")
             for p in lockfile.read(lock) if p.key not in skip]
    dest.write_text("\n".join(lines) + "\n")
    return dest


def pypi_file_hash(name: str, filename: str) -> str:
    req = urllib.request.Request(f"{INDEX}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        files = json.load(resp)["files"]
    for f in files:
        if f["filename"] == filename:
            return f["hashes"]["sha256"]
    raise SystemExit(f"lock: {filename} is not on {INDEX}/{name}/")


def torch_lines() -> str:
    cpu_name, cpu_hash = TORCH_CPU_X86_64
    for folder in (Path("/opt/wheels"),):   # where this workplace's machines keep the CPU wheel
        local = folder / cpu_name
        if local.exists() and hashlib.sha256(local.read_bytes()).hexdigest() != cpu_hash:
            raise SystemExit(f"lock: {local} does not have the sha256 recorded in {__file__}")
    arm = f"torch-{TORCH_VERSION}-cp311-cp311-manylinux_2_28_aarch64.whl"
    arm_hash = pypi_file_hash("torch", arm)
    return (f"torch=={TORCH_VERSION}+cpu ; platform_machine == 'x86_64' \\\n"
            f"    --hash=sha256:{cpu_hash}\n"
            f"    # the CPU build ({cpu_name}); pip finds it through find-links\n"
            f"torch=={TORCH_VERSION} ; platform_machine == 'aarch64' \\\n"
            f"    --hash=sha256:{arm_hash}\n"
            f"    # PyPI's aarch64 wheel is CPU-only\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upgrade", action="store_true", help="newest versions the ranges allow (default: keep "
                                                          "what the locks hold where the ranges still allow it)")
    args = p.parse_args()
    extra = ["--upgrade"] if args.upgrade else []
    # Inputs uv reads from files are named in the locks' "via" notes: keep them at fixed places.
    scratch = {name: HERE / f".{name}" for name in ("dev.in", "dev-pins.txt", "dev-pins-no-cv.txt")}
    try:
        uv_compile(["requirements/tools.in"], HERE / "tools.txt", extra=extra)
        uv_compile(["requirements/build.in"], HERE / "build.txt", extra=extra)
        # The two local projects as editables, so the tools' dependency on the appliance resolves
        # here; neither is emitted (make installs both from the checkout).
        scratch["dev.in"].write_text("-e .[test,mat]\n-e ./tools\n")   # relative to the repo: uv runs there
        uv_compile([f"requirements/{scratch['dev.in'].name}", "--no-emit-package", "factory-gateway-appliance",
                    "--no-emit-package", "factory-gateway-tools"], HERE / "dev.txt", extra=extra)
        dev_pins = pins_as_constraints(HERE / "dev.txt", scratch["dev-pins.txt"])
        uv_compile(["pyproject.toml"], HERE / "gateway.txt", dev_pins.relative_to(REPO), extra)
        # OpenCV alone: it goes beside the venv (pip --target) and uses the venv's numpy.
        no_cv = pins_as_constraints(HERE / "dev.txt", scratch["dev-pins-no-cv.txt"], {"opencv-python-headless"})
        uv_compile(["requirements/opencv4.in"], HERE / "opencv4.txt", no_cv.relative_to(REPO), [*extra, "--no-deps"])
        uv_compile(["requirements/train.in"], HERE / "train.txt", extra=extra)
        with open(HERE / "train.txt", "a") as f:
            f.write(torch_lines())
    finally:
        for path in scratch.values():
            path.unlink(missing_ok=True)
    for lock in sorted(HERE.glob("*.txt")):
        pins = lockfile.read(lock)
        print(f"{lock.relative_to(REPO)}: {len(pins)} packages, {sum(len(p.hashes) for p in pins)} hashes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
