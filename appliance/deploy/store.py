"""Deployed module versions on the gateway's data partition, swapped atomically.

    <store>/<module>/<version>/     module.wasm, nn-*.so, bundle.json, signer.json (as verified)
    <store>/<module>/current        symlink to the version that runs
    <store>/<module>/previous       symlink to the version before it (the rollback target)
    <store>/<module>/probation.json the version on probation and the one it replaced
    <store>/<module>/rejected.json  versions that were rolled back, with the reason

A version folder is written under a temporary name, flushed, then renamed; `current` changes
by renaming a new symlink over it. Each step is one rename, so a power cut leaves the old
version or the new one in `current`, never neither (resolve() checks at start, and falls back
to `previous` if `current` cannot be verified).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.deploy.bundle import INDEX, MODULE, SIGNATURE, Bundle, BundleRejected, check_names

log = logging.getLogger("appliance.deploy")

CURRENT, PREVIOUS, PROBATION, REJECTED = "current", "previous", "probation.json", "rejected.json"
SIGNER = "signer.json"   # which trusted key vouched for the version when it came in
KEEP_VERSIONS = 3   # current, previous and one more; older folders are removed after a commit


@dataclass(frozen=True)
class Installed:
    module: str
    version: str
    folder: Path
    digest: str        # sha256 of bundle.json
    signer: str | None
    index: bytes = b""                  # bundle.json, and the signature as it came: the trust settings
    signature: bytes | None = None      # of today are checked again before a stored version runs

    @property
    def wasm(self) -> Path:
        return self.folder / MODULE


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json_atomically(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    _write_file(tmp, json.dumps(doc, sort_keys=True).encode())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class ModuleStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, module: str) -> Path:
        return self.root / module

    # ---- installing ---------------------------------------------------------------------------

    def install(self, bundle: Bundle) -> Installed:
        """The bundle's files in <module>/<version>/ (already there with the same digest: reused;
        with another: refused, a version names one build)."""
        base = self.folder(bundle.module)
        base.mkdir(parents=True, exist_ok=True)
        final = base / bundle.version
        if final.exists():
            have = self._read(bundle.module, final)
            if have is not None and have.digest == bundle.digest:
                return have
            if have is not None:
                raise ValueError(f"{bundle.module} {bundle.version} is already installed with other contents "
                                 f"(digest {have.digest[:12]}, this bundle {bundle.digest[:12]}): a new build "
                                 "needs a new version")
            shutil.rmtree(final)   # a folder that does not verify: left by a failed install
        staging = base / f".staging-{bundle.version}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            for name, data in bundle.files.items():
                _write_file(staging / name, data)
            _write_file(staging / INDEX, bundle.index)
            if bundle.signer is not None:
                _write_file(staging / SIGNER, json.dumps({"signer": bundle.signer}).encode())
            if bundle.signature is not None:
                _write_file(staging / SIGNATURE, bundle.signature)
            _fsync_dir(staging)
            os.rename(staging, final)
            _fsync_dir(base)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return Installed(bundle.module, bundle.version, final, bundle.digest, bundle.signer, bundle.index,
                         bundle.signature)

    def installed(self, module: str, version: str) -> Installed | None:
        """A version already on the card (it verifies against its bundle.json), or None."""
        try:
            check_names(module, version)   # a name from the fleet must not lead out of the store
        except BundleRejected:
            return None
        folder = self.folder(module) / version
        return self._read(module, folder) if folder.is_dir() and not folder.is_symlink() else None

    def _read(self, module: str, folder: Path) -> Installed | None:
        """A version folder whose files match its bundle.json (the signature was checked when it
        came in; this catches a card that lost or changed a file since)."""
        try:
            index = (folder / INDEX).read_bytes()
            doc = json.loads(index)
            if (doc["module"], doc["version"]) != (module, folder.name) or folder.is_symlink():
                log.error("deploy: %s/%s holds %s %s; ignored", module, folder.name, doc["module"], doc["version"])
                return None
            for name, entry in doc["files"].items():
                if "/" in name or name.startswith("."):
                    return None
                if hashlib.sha256((folder / name).read_bytes()).hexdigest() != entry["sha256"]:
                    log.error("deploy: %s/%s: %s does not match its bundle.json", module, folder.name, name)
                    return None
            signer = None
            with contextlib.suppress(OSError, ValueError, KeyError):
                signer = json.loads((folder / SIGNER).read_bytes())["signer"]
            signature = None
            with contextlib.suppress(OSError):
                signature = (folder / SIGNATURE).read_bytes()
            return Installed(module, str(doc["version"]), folder, hashlib.sha256(index).hexdigest(), signer, index,
                             signature)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            log.error("deploy: %s/%s cannot be read: %s", module, folder.name, exc)
            return None

    # ---- the links --------------------------------------------------------------------------

    def _link(self, module: str, which: str, version: str | None) -> None:
        base = self.folder(module)
        link = base / which
        if version is None:
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
        else:
            tmp = base / f".{which}.tmp"
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.symlink(version, tmp)
            os.replace(tmp, link)
        _fsync_dir(base)

    def linked(self, module: str, which: str) -> Installed | None:
        link = self.folder(module) / which
        try:
            target = os.readlink(link)
        except OSError:
            return None
        if "/" in target or target.startswith("."):
            log.error("deploy: %s points outside its module's folder (%r); ignored", link, target)
            return None
        return self._read(module, self.folder(module) / target)

    def activate(self, new: Installed, *, probation_windows: int) -> Installed | None:
        """Make `new` current, on probation; the version it replaces becomes `previous`."""
        old = self.linked(new.module, CURRENT)
        _write_json_atomically(self.folder(new.module) / PROBATION,
                               {"version": new.version, "previous": old.version if old else None,
                                "windows": probation_windows, "since": time.time()})
        if old is not None and old.version != new.version:
            self._link(new.module, PREVIOUS, old.version)
        self._link(new.module, CURRENT, new.version)
        return old

    def count_start(self, module: str) -> int:
        """One more start of the gateway during this module's probation; how many so far."""
        doc = self.probation(module)
        if doc is None:
            return 0
        doc["starts"] = int(doc.get("starts", 0)) + 1
        _write_json_atomically(self.folder(module) / PROBATION, doc)
        return doc["starts"]

    def probation(self, module: str) -> dict | None:
        try:
            doc = json.loads((self.folder(module) / PROBATION).read_bytes())
            return doc if isinstance(doc, dict) else None
        except (OSError, ValueError):
            return None

    def commit(self, module: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.folder(module) / PROBATION).unlink()
        _fsync_dir(self.folder(module))
        self._prune(module)

    def roll_back(self, module: str, reason: str) -> Installed | None:
        """`previous` becomes current again (None: there was none; current is dropped and the
        YAML's own file runs). The refused version is remembered with the reason."""
        doc = self.probation(module) or {}
        bad = self.linked(module, CURRENT)
        back = self.linked(module, PREVIOUS)
        if bad is not None:
            rejected = self.rejected(module)
            rejected[bad.version] = {"digest": bad.digest, "reason": reason, "at": time.time()}
            _write_json_atomically(self.folder(module) / REJECTED, rejected)
        previous = doc.get("previous", back.version if back else None)
        target = back if back is not None and back.version == previous else None
        self._link(module, CURRENT, target.version if target else None)
        self._link(module, PREVIOUS, None)
        with contextlib.suppress(FileNotFoundError):
            (self.folder(module) / PROBATION).unlink()
        _fsync_dir(self.folder(module))
        return target

    def rejected(self, module: str) -> dict:
        try:
            doc = json.loads((self.folder(module) / REJECTED).read_bytes())
            return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            return {}

    def drop(self, module: str) -> None:
        """No deployed version runs any more (the YAML's file does): the console's `modules revert`."""
        self._link(module, CURRENT, None)
        self._link(module, PREVIOUS, None)
        with contextlib.suppress(FileNotFoundError):
            (self.folder(module) / PROBATION).unlink()

    def resolve(self, module: str) -> tuple[Installed | None, dict | None]:
        """At start: the version to run (current, or previous if current does not verify) and
        its probation, if it was on probation when the gateway stopped."""
        current = self.linked(module, CURRENT)
        probation = self.probation(module)
        if current is None:
            fallback = self.linked(module, PREVIOUS)
            if (self.folder(module) / CURRENT).is_symlink() and fallback is not None:
                log.error("deploy: %s: the current version cannot be verified; running the previous one (%s)",
                          module, fallback.version)
                self._link(module, CURRENT, fallback.version)
                self._link(module, PREVIOUS, None)
                with contextlib.suppress(FileNotFoundError):
                    (self.folder(module) / PROBATION).unlink()
                return fallback, None
            return None, None
        if probation is not None and probation.get("version") != current.version:
            # The power went between writing the probation note and the swap: the old one runs.
            with contextlib.suppress(FileNotFoundError):
                (self.folder(module) / PROBATION).unlink()
            probation = None
        return current, probation

    def _prune(self, module: str) -> None:
        """Keep current, previous and the newest others up to KEEP_VERSIONS; leftovers of staging go."""
        base = self.folder(module)
        keep = {os.readlink(base / n) for n in (CURRENT, PREVIOUS) if (base / n).is_symlink()}
        others = sorted((p for p in base.iterdir() if p.is_dir() and not p.is_symlink() and p.name not in keep),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        for p in others:
            if p.name.startswith(".staging-") or len(keep) >= KEEP_VERSIONS:
                shutil.rmtree(p, ignore_errors=True)
            else:
                keep.add(p.name)
