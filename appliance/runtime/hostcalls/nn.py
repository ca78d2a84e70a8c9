"""The worker's side of ap.nn_run: run a compiled model's native twin on the module's memory.

`appliance model compile` builds the network's C twice: into the wasm module, and into native
libraries (one per architecture) named nn-<model hash>-<arch>.so next to the .wasm. The module
embeds a descriptor: the model hash and the sha256 of each library. When the module's host_nn
switch is on, the module calls ap.nn_run(descriptor, input, output) per window; the first call
decides once: the library for this machine must exist next to the module and hash to what the
descriptor says (a copy in a memfd is what gets loaded, so the file cannot change between the
check and the load). Otherwise the call answers "not available" and the module runs its own
wasm code. Every pointer and length is checked against linear memory first.

Standard library only: this runs in the worker (modules/ABI.md, Host inference).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import stat
from pathlib import Path

DESCRIPTOR_MAGIC = b"APNN"
DESCRIPTOR_HEAD = 40            # magic, version, count, 2 reserved, model hash (32)
DESCRIPTOR_ENTRY = 48           # arch (16, NUL padded), sha256 (32)
MAX_ENTRIES = 8
MAX_LIBRARY_BYTES = 64 << 20
MAX_DESCRIPTORS = 4             # a module carries one model; a few distinct descriptors at most


def pack_descriptor(model_hash: bytes, libs: list[tuple[str, bytes]]) -> bytes:
    """What a compiled module hands ap.nn_run: which model, and the sha256 of each native twin
    ((architecture, digest) pairs). The compiler writes it; HostNN reads it."""
    out = bytearray(DESCRIPTOR_MAGIC + bytes([1, len(libs), 0, 0]) + model_hash)
    for arch, digest in libs:
        out += arch.encode().ljust(16, b"\0") + digest
    return bytes(out)

OK, OFF, NO_LIBRARY, REFUSED, SIZE_MISMATCH = 0, 1, 2, 3, 4
MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def machine_arch() -> str | None:
    return MACHINES.get(platform.machine().lower())


def library_name(model_hash_hex: str, arch: str) -> str:
    return f"nn-{model_hash_hex[:16]}-{arch}.so"


def preload_libraries(module_dir: str) -> dict[str, int]:
    """The native libraries for this machine next to a module, each read into a sealed memfd:
    what a sandboxed worker (which can open no file) may later verify and load. Read before the
    worker enters its sandbox; nothing in them runs until HostNN has checked their sha256."""
    import fcntl

    arch = machine_arch()
    found: dict[str, int] = {}
    try:
        names = sorted(n for n in os.listdir(module_dir) if n.startswith("nn-") and n.endswith(f"-{arch}.so"))
    except OSError:
        return found
    for name in names[:MAX_DESCRIPTORS * 2]:
        try:
            fd = os.open(os.path.join(module_dir, name), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_LIBRARY_BYTES:
                continue
            data = os.read(fd, MAX_LIBRARY_BYTES + 1)
        finally:
            os.close(fd)
        copy = os.memfd_create(f"ap-{name}", os.MFD_ALLOW_SEALING)   # no CLOEXEC: it stays with the worker
        view = memoryview(data)
        while view:
            view = view[os.write(copy, view):]
        fcntl.fcntl(copy, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
                    | fcntl.F_SEAL_SEAL)
        found[name] = copy
    return found


class NativeTwin:
    """A loaded native twin: run(in_ptr, in_bytes, out_ptr, out_bytes) -> 0 on success."""

    def __init__(self, lib, run, in_bytes: int, out_bytes: int, name: str) -> None:
        self.lib, self.run, self.in_bytes, self.out_bytes, self.name = lib, run, in_bytes, out_bytes, name


def bind_native(lib, name: str) -> NativeTwin:
    """A native twin's entry points in a loaded library (ctypes.CDLL), after its ABI check."""
    if lib.ap_nn_native_abi() != 1:
        raise ValueError("it speaks another native ABI")
    sizes = (ctypes.c_int32 * 2)()
    lib.ap_nn_native_sizes.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.ap_nn_native_sizes(ctypes.addressof(sizes), ctypes.addressof(sizes) + 4)
    run = lib.ap_nn_native_run
    run.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32]
    run.restype = ctypes.c_int32
    return NativeTwin(lib, run, sizes[0], sizes[1], name)


class HostNN:
    """ap.nn_run for one worker. `log(level, text)` reaches the module's log (which path runs)."""

    IMPORTS = ("nn_run",)

    @property
    def libraries_loaded(self) -> int:
        """Native libraries opened (each from its own memfd) so far."""
        return len(self._fds)

    def __init__(self, memory, violation, module_dir: str | None, enabled: bool, log,
                 preloaded: dict[str, int] | None = None) -> None:
        self.memory, self.violation, self.log = memory, violation, log
        self.module_dir = Path(module_dir) if module_dir else None
        self.preloaded = preloaded   # name -> sealed memfd (a sandboxed worker: preload_libraries)
        self.enabled = enabled
        self._decided: dict[bytes, object] = {}
        self._loaded: dict[bytes, NativeTwin] = {}   # sha256 -> the library loaded with those bytes
        self._fds: list[int] = []
        self.native_calls = 0
        self.last_code = None

    def _span(self, what: str, size: int, ptr: int, length: int) -> None:
        if ptr < 0 or length < 0 or ptr + length > size:
            raise self.violation(f"ap.nn_run: {what} {ptr}+{length} is outside linear memory ({size} bytes)")

    def nn_run(self, desc_ptr: int, desc_len: int, in_ptr: int, in_len: int, out_ptr: int, out_len: int) -> int:
        mem = self.memory()
        size = len(mem)
        if not DESCRIPTOR_HEAD <= desc_len <= DESCRIPTOR_HEAD + MAX_ENTRIES * DESCRIPTOR_ENTRY:
            raise self.violation(f"ap.nn_run: descriptor of {desc_len} bytes")
        self._span("descriptor", size, desc_ptr, desc_len)
        self._span("input", size, in_ptr, in_len)
        self._span("output", size, out_ptr, out_len)
        desc = bytes(mem[desc_ptr:desc_ptr + desc_len])
        if desc[:4] != DESCRIPTOR_MAGIC or desc[4] != 1 or desc_len != DESCRIPTOR_HEAD + desc[5] * DESCRIPTOR_ENTRY:
            raise self.violation("ap.nn_run: malformed model descriptor")
        native = self._decided.get(desc)
        if native is None:
            # Each new descriptor costs a file read, a hash and possibly a dlopen (a memfd kept
            # open): a module cycling through descriptors must not exhaust fds or memory.
            if len(self._decided) >= MAX_DESCRIPTORS:
                raise self.violation(f"ap.nn_run: more than {MAX_DESCRIPTORS} different model descriptors")
            native = self._decided[desc] = self._resolve(desc)
        if isinstance(native, int):
            self.last_code = native
            return native
        if in_len != native.in_bytes or out_len != native.out_bytes:
            self.last_code = SIZE_MISMATCH
            self.log(2, f"host nn: {native.name} takes {native.in_bytes} bytes in and {native.out_bytes} out; the "
                        f"module passed {in_len} and {out_len}; running the module's wasm code")
            self._decided[desc] = SIZE_MISMATCH
            return SIZE_MISMATCH
        view = (ctypes.c_char * size).from_buffer(mem)
        try:
            base = ctypes.addressof(view)
            rc = native.run(base + in_ptr, in_len, base + out_ptr, out_len)
        finally:
            del view
        self.native_calls += rc == 0
        self.last_code = rc
        return rc

    def _resolve(self, desc: bytes) -> object:
        model_hash = desc[8:40].hex()
        entries = {}
        for i in range(desc[5]):
            e = desc[DESCRIPTOR_HEAD + i * DESCRIPTOR_ENTRY:DESCRIPTOR_HEAD + (i + 1) * DESCRIPTOR_ENTRY]
            entries[e[:16].rstrip(b"\0").decode("ascii", "replace")] = e[16:]
        if not self.enabled:
            self.log(1, "host nn: off (host_nn: false); the module runs its own wasm code")
            return OFF
        arch = machine_arch()
        if arch is None or arch not in entries:
            self.log(2, f"host nn: the module has no native library for this machine ({platform.machine()}; it has "
                        f"{', '.join(entries) or 'none'}); running the module's wasm code")
            return NO_LIBRARY
        name = library_name(model_hash, arch)
        if self.preloaded is not None:
            return self._resolve_preloaded(name, entries[arch])
        if self.module_dir is None:
            self.log(2, "host nn: the module's directory is unknown; running the module's wasm code")
            return NO_LIBRARY
        path = self.module_dir / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            self.log(2, f"host nn: {name} is missing next to the module; running the module's wasm code")
            return NO_LIBRARY
        except OSError as exc:
            self.log(2, f"host nn: cannot open {name} ({exc.strerror}); running the module's wasm code")
            return NO_LIBRARY
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_LIBRARY_BYTES:
                self.log(2, f"host nn: {name} is not a regular file of at most {MAX_LIBRARY_BYTES >> 20} MiB; "
                            "running the module's wasm code")
                return REFUSED
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read(MAX_LIBRARY_BYTES + 1)
        finally:
            os.close(fd)
        if hashlib.sha256(data).digest() != entries[arch]:
            self.log(2, f"host nn: {name} does not have the sha256 the module expects (changed, or from another "
                        "compile); it is not loaded; running the module's wasm code")
            return REFUSED
        digest = entries[arch]
        if digest in self._loaded:   # the same bytes under another descriptor: load them once
            return self._loaded[digest]
        try:
            native = self._loaded[digest] = self._load(data, name)
        except (OSError, AttributeError, ValueError) as exc:
            self.log(2, f"host nn: {name} could not be loaded ({exc}); running the module's wasm code")
            return REFUSED
        self.log(1, f"host nn: {name} (sha256 verified) runs the model natively")
        return native

    def _resolve_preloaded(self, name: str, digest: bytes) -> object:
        fd = self.preloaded.get(name)
        if fd is None:
            self.log(2, f"host nn: {name} is missing next to the module; running the module's wasm code")
            return NO_LIBRARY
        data = os.pread(fd, MAX_LIBRARY_BYTES + 1, 0)
        if hashlib.sha256(data).digest() != digest:
            self.log(2, f"host nn: {name} does not have the sha256 the module expects (changed, or from another "
                        "compile); it is not loaded; running the module's wasm code")
            return REFUSED
        if digest in self._loaded:
            return self._loaded[digest]
        try:
            native = self._loaded[digest] = bind_native(ctypes.CDLL(f"/proc/self/fd/{fd}",
                                                                  mode=os.RTLD_LOCAL | os.RTLD_NOW), name)
        except (OSError, AttributeError, ValueError) as exc:
            self.log(2, f"host nn: {name} could not be loaded ({exc}); running the module's wasm code")
            return REFUSED
        self._fds.append(fd)
        self.log(1, f"host nn: {name} (sha256 verified) runs the model natively")
        return native

    def _load(self, data: bytes, name: str) -> NativeTwin:
        # Load the bytes that were checked, not the path: a memfd cannot be swapped underneath. The
        # fd stays open while the library is loaded: dlopen knows a library by its path name, and a
        # reused /proc/self/fd/N would hand back the library loaded under that name before.
        fd = os.memfd_create(f"ap-{name}", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            lib = ctypes.CDLL(f"/proc/self/fd/{fd}", mode=os.RTLD_LOCAL | os.RTLD_NOW)
        except BaseException:
            os.close(fd)
            raise
        self._fds.append(fd)
        return bind_native(lib, name)


    def imports(self) -> dict:
        return {("ap", "nn_run"): self.nn_run}
