"""Install a lock into a venv: `python3 requirements/install.py VENV LOCK`.

Exactly the pins of LOCK that apply to this machine and Python, each file checked against its
sha256, without resolving anything (--no-deps) and without fetching build tools behind the
lock's back (--no-build-isolation: requirements/build.txt goes in first). pywasm3, where the lock
has it, is built from its hash-checked sdist with its leaks mended (requirements/pywasm3_fix.py).
Standard library only: it runs before the venv has anything.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import lockfile  # noqa: E402
import pywasm3_fix  # noqa: E402

PATCHED = {pywasm3_fix.NAME: pywasm3_fix.LOCAL_LABEL}   # built from source with our fixes


def locked_text(lock: Path, machine: str | None = None, python: tuple[int, int, int] | None = None,
                exclude: set[str] = frozenset()) -> str:
    """The lock's pins for this machine (or `machine`), markers decided, as hash-pinned lines."""
    pins = lockfile.pins_for(lock, machine, python)
    return "".join(f"{p.name}=={p.version} " + " ".join(f"--hash=sha256:{h}" for h in p.hashes) + "\n"
                   for p in sorted(pins.values(), key=lambda p: p.key) if p.key not in exclude)


def pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args], check=True)


def install(venv: Path, lock: Path) -> None:
    python = venv / "bin" / "python"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build = tmp / "build.txt"
        build.write_text(locked_text(HERE / "build.txt"))
        pip(python, "--require-hashes", "--no-deps", "-r", str(build))
        rest = tmp / "lock.txt"
        rest.write_text(locked_text(lock, exclude=set(PATCHED)))
        pip(python, "--require-hashes", "--no-deps", "--no-build-isolation", "-r", str(rest))
        if pywasm3_fix.NAME in lockfile.pins_for(lock):
            src = pywasm3_fix.fetch(tmp / "pywasm3", lock, str(python))
            pip(python, "--no-deps", "--no-build-isolation", str(src))
    subprocess.run([str(python), "-m", "pip", "check", "-q"], check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("venv", type=Path)
    p.add_argument("lock", type=Path)
    args = p.parse_args()
    install(args.venv, args.lock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
