"""Ed25519 keys for module bundles (the `cryptography` package; nothing hand-written).

A key pair is two files: NAME.key (the private key, PKCS#8 PEM, mode 0600, stays on the build
machine) and NAME.pub (one line: `ed25519:<base64 of the 32-byte public key> NAME`). The
gateway's YAML lists public keys in that one-line form (deploy.trusted_keys). A key's id is the
first 16 hex digits of the sha256 of its 32 bytes: short enough to read, and what a signature
names so that the gateway knows which trusted key to try.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PREFIX = "ed25519:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


class KeyFileError(ValueError):
    """A key file or key line that cannot be used (says which and why)."""


@dataclass(frozen=True)
class PublicKey:
    raw: bytes          # 32 bytes
    name: str = ""      # the comment after the key: who it belongs to

    @property
    def key_id(self) -> str:
        return key_id(self.raw)

    def line(self) -> str:
        return f"{PREFIX}{base64.b64encode(self.raw).decode()}" + (f" {self.name}" if self.name else "")

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
            return True
        except InvalidSignature:
            return False


def key_id(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


def parse_public(line: str) -> PublicKey:
    """`ed25519:<base64> [name]` -> PublicKey; ValueError saying what is wrong."""
    parts = line.strip().split(None, 1)
    if not parts or not parts[0].startswith(PREFIX):
        raise ValueError(f"a public key is written '{PREFIX}<base64> [name]' (from `appliance keys new`), "
                         f"not {line.strip()[:40]!r}")
    try:
        raw = base64.b64decode(parts[0][len(PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"public key {parts[0][:40]!r}: not base64") from None
    if len(raw) != 32:
        raise ValueError(f"public key {parts[0][:40]!r}: {len(raw)} bytes, an Ed25519 key has 32")
    return PublicKey(raw, parts[1].strip() if len(parts) > 1 else "")


def new_pair(name: str, directory: Path) -> tuple[Path, Path]:
    """NAME.key (0600, created exclusively: an existing key is never overwritten) and NAME.pub."""
    if not _NAME.match(name):
        raise KeyFileError(f"key name {name!r}: letters, digits and _.@- only, 64 characters at most")
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / f"{name}.key", directory / f"{name}.pub"
    for path in (private, public):
        if path.exists():
            raise KeyFileError(f"{path} exists; a key is never overwritten (choose another name)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    public.write_text(PublicKey(raw, name).line() + "\n")
    return private, public


@dataclass(frozen=True)
class PrivateKey:
    key: Ed25519PrivateKey
    public: PublicKey

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)


def load_private(path: Path) -> PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: a {type(key).__name__}, bundles are signed with Ed25519 keys")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PrivateKey(key, PublicKey(raw, path.stem))


def canonical(doc: dict) -> bytes:
    """The bytes a signature over a JSON document covers: the document without its "signature"
    member, keys sorted, no spaces."""
    return json.dumps({k: v for k, v in doc.items() if k != "signature"}, sort_keys=True,
                      separators=(",", ":")).encode()


def sign_document(doc: dict, key: PrivateKey) -> dict:
    return {**doc, "signature": {"key_id": key.public.key_id,
                                 "signature": base64.b64encode(key.sign(canonical(doc))).decode()}}


def document_signer(doc: dict, trusted: tuple[PublicKey, ...] | list[PublicKey]) -> str:
    """The trusted key's name that signed `doc`; ValueError saying why not."""
    sig = doc.get("signature")
    if not isinstance(sig, dict):
        raise ValueError("unsigned (this gateway takes desired states signed by fleet.operator_keys only)")
    try:
        raw = base64.b64decode(str(sig["signature"]), validate=True)
        key_id = str(sig["key_id"])
    except (KeyError, ValueError, binascii.Error):
        raise ValueError("its signature cannot be read") from None
    for key in trusted:
        if key.key_id == key_id:
            if key.verify(raw, canonical(doc)):
                return key.name or key.key_id
            raise ValueError(f"bad signature (key {key_id}): changed after signing?")
    raise ValueError(f"signed by key {key_id}, which is not among fleet.operator_keys")
