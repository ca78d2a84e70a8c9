"""pywasm3 0.5.0, built from its locked sdist with its two leaks mended and linear memory
allocated lazily (installed as 0.5.0+ap2).

pywasm3 has no wheel anywhere and its upstream is in minimal maintenance, so every target builds
it from the sdist whose sha256 the lock holds. Measured in the worker (benchmarks/soak.py):
- every call from wasm into a host function leaks the argument tuple and the return value
  (CallImport never releases them): about 125 bytes a call, 200,000 calls +25 MB RSS, so every
  worker grew by megabytes a minute;
- every Runtime.get_memory() leaks its Py_buffer (80 bytes a call).
Both are mended here by edits at named places in m3module.c. And wasm3 allocates a module's
linear memory with realloc() and then memset()s all of it: every page of it (1 MiB for vibstats,
4 MiB for bearing) was faulted in and zeroed at each worker start, used or not (0.4 ms of a
vibstats worker's 1.3 ms instantiation here, and resident memory the module never touched). A
first allocation now goes through calloc(), which leaves pages fresh from the kernel untouched
(they are zero already). Each place must appear exactly once, so a different sdist stops the
build instead of being patched blindly.

    python3 requirements/pywasm3_fix.py DEST [--python PY]   fetch (hash-checked), unpack, mend
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import lockfile  # noqa: E402

NAME = "pywasm3"
LOCAL_LABEL = "ap2"   # PEP 440 local version: 0.5.0 matches ==0.5.0 in every lock and range

# (file, what the place reads in 0.5.0, what it reads after): each a whole statement or two.
EDITS = [
    # m3_Realloc (malloc'd heap): a first allocation is calloc's, zero without touching fresh pages.
    ("wasm3/m3_core.c",
     "    if (UNLIKELY(i_newSize == i_oldSize)) return i_ptr;\n"
     "\n"
     "    void * newPtr = realloc (i_ptr, i_newSize);\n",
     "    if (UNLIKELY(i_newSize == i_oldSize)) return i_ptr;\n"
     "    if (!i_ptr) return calloc (i_newSize, 1);\n"
     "\n"
     "    void * newPtr = realloc (i_ptr, i_newSize);\n"),
    # CallImport: release the argument tuple once the call returned ...
    ("m3module.c",
     "    PyObject * pRets = PyObject_CallObject(pFunc, pArgs);\n"
     "    if (!pRets) m3ApiTrap(trapException);\n",
     "    PyObject * pRets = PyObject_CallObject(pFunc, pArgs);\n"
     "    Py_DECREF(pArgs);\n"
     "    if (!pRets) m3ApiTrap(trapException);\n"),
    # ... and the return value once it is on the wasm stack.
    ("m3module.c",
     "            put_arg_on_stack(&_sp[0], m3_GetRetType(f, 0), pRets);\n"
     "        } else {\n"
     "            m3ApiTrap(\"python call: should return a tuple\");\n"
     "        }\n"
     "    }\n"
     "    m3ApiSuccess();\n",
     "            put_arg_on_stack(&_sp[0], m3_GetRetType(f, 0), pRets);\n"
     "        } else {\n"
     "            m3ApiTrap(\"python call: should return a tuple\");\n"
     "        }\n"
     "    }\n"
     "    Py_DECREF(pRets);\n"
     "    m3ApiSuccess();\n"),
    # get_memory: the memoryview copies the Py_buffer; free ours (the runtime keeps the
    # reference PyBuffer_FillInfo took, so no view outlives it).
    ("m3module.c",
     "    PyBuffer_FillInfo(pybuff, (PyObject *)runtime, mem, size, 0, PyBUF_WRITABLE);\n"
     "    return PyMemoryView_FromBuffer(pybuff);\n",
     "    PyBuffer_FillInfo(pybuff, (PyObject *)runtime, mem, size, 0, PyBUF_WRITABLE);\n"
     "    PyObject *view = PyMemoryView_FromBuffer(pybuff);\n"
     "    PyMem_Free(pybuff);\n"
     "    return view;\n"),
]


def mend(src: Path, version: str) -> None:
    """Apply EDITS to the sources and give the package its local version label."""
    for name, before, after in EDITS:
        c = src / name
        text = c.read_text()
        count = text.count(before)
        if count != 1:
            raise SystemExit(f"pywasm3_fix: {c} holds {count} copies of the place to mend, expected 1:\n{before}")
        c.write_text(text.replace(before, after))
    for meta in (src / "setup.py", src / "PKG-INFO"):
        old = meta.read_text()
        new = old.replace(f'version      = "{version}"', f'version      = "{version}+{LOCAL_LABEL}"') \
            if meta.name == "setup.py" else old.replace(f"\nVersion: {version}\n", f"\nVersion: {version}+{LOCAL_LABEL}\n")
        if new == old:
            raise SystemExit(f"pywasm3_fix: no version {version} to label in {meta}")
        meta.write_text(new)


def fetch(dest: Path, lock: Path, python: str = sys.executable) -> Path:
    """Download the sdist the lock names (pip checks its sha256), unpack and mend it into dest."""
    pin = lockfile.pins_for(lock)[NAME]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        req = tmp / "req.txt"
        req.write_text(f"{pin.name}=={pin.version} " + " ".join(f"--hash=sha256:{h}" for h in pin.hashes) + "\n")
        subprocess.run([python, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                        "--no-binary=:all:", "--require-hashes", "-d", str(tmp), "-r", str(req)], check=True)
        (sdist,) = tmp.glob(f"{NAME}-{pin.version}.tar.gz")
        with tarfile.open(sdist) as tar:
            try:
                tar.extractall(tmp / "x", filter="data")
            except TypeError:   # CPython before 3.11.4 has no filter (the sdist is hash-checked)
                tar.extractall(tmp / "x")
        (unpacked,) = (tmp / "x").iterdir()
        mend(unpacked, pin.version)
        if dest.exists():
            raise SystemExit(f"pywasm3_fix: {dest} exists")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(unpacked, dest)
    return dest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dest", type=Path, help="directory to create with the mended source")
    p.add_argument("--lock", type=Path, default=HERE / "gateway.txt")
    p.add_argument("--python", default=sys.executable, help="the Python whose pip downloads")
    args = p.parse_args()
    print(fetch(args.dest, args.lock, args.python))
    return 0


if __name__ == "__main__":
    sys.exit(main())
