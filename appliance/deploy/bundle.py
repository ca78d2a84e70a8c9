"""Module bundles: one file per module version, signed (docs/deploy.md).

A bundle is an uncompressed POSIX tar (reproducible: mtime 0, owner 0, mode 0644, sorted):

    bundle.json    {"format": 1, "module": NAME, "version": V, "files": {FILE: {"sha256", "size"}}}
    module.wasm    the module (its manifest, issue 11, is embedded in it)
    module.simd.wasm  its SIMD build for wasmtime (docs/engines.md), where it has one: bound to
                   module.wasm by its ap.simd_of section, so it lands beside it and runs in its place
    nn-*-ARCH.so   the native twins of a compiled model, where the module has them
    bundle.sig     {"key_id": ID, "signature": base64}: Ed25519 over bundle.json's bytes

The signature covers bundle.json, and bundle.json the sha256 of every other file, so one
signature vouches for every byte. A bundle is untrusted input until open_bundle() has checked
all of it: only plain files with plain names, bounded sizes, nothing unlisted, every hash, the
manifest inside the .wasm agreeing with bundle.json, and the signature against the trusted keys.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config.params import simd_binding_problem
from appliance.deploy.keys import PrivateKey, PublicKey

FORMAT = 1
INDEX, SIGNATURE, MODULE, SIMD_MODULE = "bundle.json", "bundle.sig", "module.wasm", "module.simd.wasm"
SUFFIX = ".apb"
MAX_MEMBERS = 16
MAX_MEMBER_BYTES = 64 << 20
MAX_BUNDLE_BYTES = 160 << 20
_FILE_NAME = re.compile(r"^(module\.wasm|module\.simd\.wasm|nn-[0-9a-f]{16}-[a-z0-9_]{1,16}\.so)$")
_VERSION = re.compile(r"^[0-9][0-9A-Za-z.+_-]{0,63}$")   # a digit first: never "current" or "previous"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")


class BundleRejected(ValueError):
    """A bundle that must not run: the reason says what is wrong with it."""


@dataclass(frozen=True)
class Bundle:
    module: str
    version: str
    files: dict[str, bytes] = field(repr=False)
    index: bytes = field(repr=False)    # bundle.json exactly as signed
    signer: str | None                  # the trusted key's name (or id) that signed it; None: unsigned
    signature: bytes | None = field(default=None, repr=False)   # bundle.sig as it came (kept with the version)

    @property
    def digest(self) -> str:
        """sha256 of bundle.json: names this exact build (every file's hash is in it)."""
        return hashlib.sha256(self.index).hexdigest()

    @property
    def wasm(self) -> bytes:
        return self.files[MODULE]


def _index(module: str, version: str, files: dict[str, bytes]) -> bytes:
    doc = {"format": FORMAT, "module": module, "version": version,
           "files": {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for n, b in sorted(files.items())}}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _write(path: Path, members: list[tuple[str, bytes]]) -> None:
    """Reproducible tar, written to a temporary name and renamed: never half a bundle."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def native_twins(wasm_path: Path, wasm: bytes) -> dict[str, bytes]:
    """The nn-<model hash>-<arch>.so files next to the module whose model hash the module carries."""
    found = {}
    for lib in sorted(wasm_path.parent.glob("nn-*-*.so")):
        if _FILE_NAME.fullmatch(lib.name) and bytes.fromhex(lib.name[3:19]) in wasm:
            found[lib.name] = lib.read_bytes()
    return found


def simd_build(wasm_path: Path, wasm: bytes) -> dict[str, bytes]:
    """X.simd.wasm beside X.wasm when it is X.wasm's own SIMD build (names its sha256)."""
    sibling = wasm_path.with_name(wasm_path.name[:-len(".wasm")] + ".simd.wasm")
    if not wasm_path.name.endswith(".wasm") or not sibling.is_file():
        return {}
    simd = sibling.read_bytes()
    why = simd_binding_problem(simd, wasm)
    if why:
        raise BundleRejected(f"{sibling} is not the SIMD build of {wasm_path}: {why}; build both again with "
                             "`make modules`, or remove it")
    return {SIMD_MODULE: simd}



def make_bundle(wasm_path: Path, out: Path | None = None, *, natives: bool = True) -> Path:
    """A bundle of a built module (name and version from its embedded manifest), unsigned."""
    from appliance.config.params import ManifestError, manifest_of
    wasm = wasm_path.read_bytes()
    try:
        manifest = manifest_of(wasm)
    except ManifestError as exc:
        raise BundleRejected(f"{wasm_path}: {exc}") from None
    if manifest is None:
        raise BundleRejected(f"{wasm_path} carries no manifest (name, version): build it with `appliance module "
                             "build`, which embeds module.yaml")
    check_names(manifest.name, manifest.version)
    files = {MODULE: wasm, **simd_build(wasm_path, wasm), **(native_twins(wasm_path, wasm) if natives else {})}
    out = out or wasm_path.with_name(f"{manifest.name}-{manifest.version}{SUFFIX}")
    index = _index(manifest.name, manifest.version, files)
    _write(out, [(INDEX, index), *sorted(files.items())])
    return out


def sign_bundle(path: Path, key: PrivateKey) -> Bundle:
    """Sign (or re-sign) a bundle in place, after checking that its files match its index."""
    bundle = open_bundle(path, trusted=(), allow_unsigned=True, ignore_signature=True)
    signature = json.dumps({"key_id": key.public.key_id, "signature": base64.b64encode(key.sign(bundle.index)).decode()},
                           sort_keys=True).encode()
    _write(path, [(INDEX, bundle.index), *sorted(bundle.files.items()), (SIGNATURE, signature)])
    return Bundle(bundle.module, bundle.version, bundle.files, bundle.index, key.public.name or key.public.key_id,
                  signature)


def check_names(module: str, version: str) -> None:
    if not isinstance(module, str) or not _NAME.fullmatch(module):
        raise BundleRejected(f"module name {module!r}: lower-case letters, digits and '_', starting with a letter")
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise BundleRejected(f"version {version!r}: letters, digits and .+_- (as in 1.2.0)")


def read_members(data: bytes) -> dict[str, bytes]:
    """The tar's members, each checked before it is read: regular files with plain names, bounded."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleRejected(f"{len(data)} bytes; a bundle may have {MAX_BUNDLE_BYTES >> 20} MiB at most")
    members: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if len(members) >= MAX_MEMBERS:
                    raise BundleRejected(f"more than {MAX_MEMBERS} files")
                # Plain files only: a sparse member would expand to its declared size in memory.
                if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.sparse is not None:
                    raise BundleRejected(f"{info.name!r} is not a plain file (links, folders and sparse files are "
                                         "refused)")
                total += info.size
                if total > len(data):
                    raise BundleRejected(f"{info.name!r}: its files claim more bytes than the bundle has")
                if info.name not in (INDEX, SIGNATURE) and not _FILE_NAME.fullmatch(info.name):
                    raise BundleRejected(f"unexpected file {info.name!r} (module.wasm, module.simd.wasm, "
                                         "nn-<hash>-<arch>.so, "
                                         f"{INDEX} and {SIGNATURE} only)")
                if info.name in members:
                    raise BundleRejected(f"{info.name!r} appears twice")
                if info.size > MAX_MEMBER_BYTES:
                    raise BundleRejected(f"{info.name!r} has {info.size} bytes (at most {MAX_MEMBER_BYTES >> 20} MiB)")
                f = tar.extractfile(info)
                members[info.name] = f.read() if f is not None else b""
    except tarfile.TarError as exc:
        raise BundleRejected(f"not a bundle (tar: {exc})") from None
    return members


def open_bundle(source: Path | bytes, *, trusted: tuple[PublicKey, ...] | list[PublicKey], allow_unsigned: bool,
                ignore_signature: bool = False) -> Bundle:
    """Check everything about a bundle (see the module's doc) and return it; BundleRejected
    with the reason otherwise. Unsigned (or, with no trusted key, any) bundles pass only with
    allow_unsigned."""
    if isinstance(source, Path):
        try:
            if source.stat().st_size > MAX_BUNDLE_BYTES:
                raise BundleRejected(f"{source}: larger than {MAX_BUNDLE_BYTES >> 20} MiB")
            data = source.read_bytes()
        except OSError as exc:
            raise BundleRejected(f"{source}: {exc.strerror or exc}") from None
    else:
        data = source
    members = read_members(data)
    index = members.pop(INDEX, None)
    if index is None:
        raise BundleRejected(f"no {INDEX}")
    try:
        doc = json.loads(index)
        if not isinstance(doc, dict):
            raise TypeError("not an object")
        module, version, listed = doc["module"], doc["version"], doc["files"]
        if doc.get("format") != FORMAT:
            raise BundleRejected(f"bundle format {doc.get('format')!r}; this gateway reads format {FORMAT}")
        if not isinstance(listed, dict):
            raise TypeError("files")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        if isinstance(exc, BundleRejected):
            raise
        raise BundleRejected(f"{INDEX} cannot be read ({type(exc).__name__})") from None
    check_names(module, version)
    sig = members.pop(SIGNATURE, None)
    if set(listed) != set(members):
        extra, missing = sorted(set(members) - set(listed)), sorted(set(listed) - set(members))
        raise BundleRejected("its files do not match its index" + (f": not listed {extra}" if extra else "")
                             + (f": missing {missing}" if missing else ""))
    for name, data_ in members.items():
        entry = listed[name]
        if not isinstance(entry, dict) or entry.get("sha256") != hashlib.sha256(data_).hexdigest() \
                or entry.get("size") != len(data_):
            raise BundleRejected(f"{name}: its sha256 or size differs from the index (changed after bundling)")
    if MODULE not in members:
        raise BundleRejected(f"no {MODULE}")
    _check_manifest(members[MODULE], module, version)
    why = simd_binding_problem(members[SIMD_MODULE], members[MODULE]) if SIMD_MODULE in members else ""
    if why:
        raise BundleRejected(f"{SIMD_MODULE} is not the SIMD build of this {MODULE}: {why}")
    signer = None if ignore_signature else check_signature(sig, index, trusted, allow_unsigned)
    return Bundle(module, version, members, index, signer, sig)


def _check_manifest(wasm: bytes, module: str, version: str) -> None:
    from appliance.config.params import ManifestError, manifest_of
    try:
        manifest = manifest_of(wasm)
    except ManifestError as exc:
        raise BundleRejected(f"{MODULE}: {exc}") from None
    if manifest is None:
        raise BundleRejected(f"{MODULE} carries no manifest")
    if (manifest.name, manifest.version) != (module, version):
        raise BundleRejected(f"{MODULE} is {manifest.name} {manifest.version}, the index says {module} {version}")


def check_signature(sig: bytes | None, index: bytes, trusted, allow_unsigned: bool) -> str | None:
    """The signer's name (None: unsigned, accepted because allow_unsigned); BundleRejected if
    the signature is bad, from an untrusted key, or missing without allow_unsigned."""
    if sig is None:
        if allow_unsigned:
            return None
        raise BundleRejected("unsigned (sign it with `appliance module sign --key`; deploy.allow_unsigned is for "
                             "development only)")
    try:
        doc = json.loads(sig)
        key_id, signature = str(doc["key_id"]), base64.b64decode(doc["signature"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError):
        raise BundleRejected(f"{SIGNATURE} cannot be read") from None
    for key in trusted:
        if key.key_id == key_id:
            if key.verify(signature, index):
                return key.name or key.key_id
            raise BundleRejected(f"bad signature: the bundle does not match what key {key_id} "
                                 f"({key.name or 'unnamed'}) signed (changed after signing?)")
    if allow_unsigned:
        return None
    raise BundleRejected(f"signed by key {key_id}, which is not among deploy.trusted_keys "
                         f"({', '.join(k.key_id for k in trusted) or 'none'})")
