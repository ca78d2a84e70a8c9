"""The `console:` config section and the console's password hashes (docs/console.md).

Hashes use hashlib only, in the formats Django writes, so an existing tool can make them too:

    scrypt$<salt>$<n>$<r>$<p>$<base64 of 64-byte key>
    pbkdf2_sha256$<iterations>$<salt>$<base64 of 32-byte key>

The salt is text (used as its UTF-8 bytes). `appliance console hash-password` makes one.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

from typing import Literal

from pydantic import Field, field_validator, model_validator

from hal.schema import StrictModel

SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1      # 16 MiB, some 50 ms on a Raspberry Pi 4
SCRYPT_MAX_MEM = 256 << 20                         # refuse parameters that would need more
PBKDF2_ITERATIONS = 600_000                        # OWASP 2023 for PBKDF2-HMAC-SHA256
PBKDF2_MAX_ITERATIONS = 10_000_000                 # a typo must not make a login take minutes


class PasswordHashError(ValueError):
    pass


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise PasswordHashError("the key part is not base64") from None


def _int(text: str, what: str) -> int:
    if not text.isdigit():
        raise PasswordHashError(f"{what} {text!r} is not a positive integer")
    return int(text)


def parse_hash(encoded: str) -> tuple[str, dict]:
    """Split and check a stored hash; raises PasswordHashError saying what is wrong."""
    parts = encoded.split("$")
    algorithm = parts[0]
    if algorithm == "scrypt":
        if len(parts) != 6:
            raise PasswordHashError("a scrypt hash is scrypt$salt$n$r$p$key")
        _, salt, n, r, p, key = parts
        n, r, p = _int(n, "n"), _int(r, "r"), _int(p, "p")
        if n < 2 or n & (n - 1):
            raise PasswordHashError(f"scrypt n={n} is not a power of 2")
        if not r or not p or 128 * n * r * p > SCRYPT_MAX_MEM:
            raise PasswordHashError(f"scrypt n={n} r={r} p={p} needs more than {SCRYPT_MAX_MEM >> 20} MiB")
        params = {"salt": salt, "n": n, "r": r, "p": p, "key": _unb64(key)}
    elif algorithm == "pbkdf2_sha256":
        if len(parts) != 4:
            raise PasswordHashError("a pbkdf2_sha256 hash is pbkdf2_sha256$iterations$salt$key")
        _, iterations, salt, key = parts
        iterations = _int(iterations, "iterations")
        if not 1 <= iterations <= PBKDF2_MAX_ITERATIONS:
            raise PasswordHashError(f"{iterations} iterations is out of range (1 to {PBKDF2_MAX_ITERATIONS})")
        params = {"salt": salt, "iterations": iterations, "key": _unb64(key)}
    else:
        raise PasswordHashError(f"unknown hash algorithm {algorithm!r} (scrypt or pbkdf2_sha256)")
    if not params["salt"]:
        raise PasswordHashError("the salt is empty")
    if len(params["key"]) < 16:
        raise PasswordHashError("the key part is too short")
    return algorithm, params


def _derive(algorithm: str, params: dict, password: str) -> bytes:
    secret = password.encode("utf-8")
    salt = params["salt"].encode("utf-8")
    if algorithm == "scrypt":
        n, r, p = params["n"], params["r"], params["p"]
        return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=128 * n * r * p + (1 << 20),
                              dklen=len(params["key"]))
    return hashlib.pbkdf2_hmac("sha256", secret, salt, params["iterations"], dklen=len(params["key"]))


def hash_password(password: str, algorithm: str = "scrypt", *, iterations: int = PBKDF2_ITERATIONS) -> str:
    salt = secrets.token_urlsafe(16)   # no '$' in it
    if algorithm == "scrypt":
        params = {"salt": salt, "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "key": b"\0" * 64}
        key = _derive(algorithm, params, password)
        return f"scrypt${salt}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(key)}"
    if algorithm == "pbkdf2_sha256":
        params = {"salt": salt, "iterations": iterations, "key": b"\0" * 32}
        key = _derive(algorithm, params, password)
        return f"pbkdf2_sha256${iterations}${salt}${_b64(key)}"
    raise PasswordHashError(f"unknown hash algorithm {algorithm!r} (scrypt or pbkdf2_sha256)")


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time comparison; False (never an exception) for a malformed stored hash."""
    try:
        algorithm, params = parse_hash(encoded)
    except PasswordHashError:
        return False
    return hmac.compare_digest(_derive(algorithm, params, password), params["key"])


class ConsoleSection(StrictModel):
    """`console:` - the serial console (docs/console.md)."""

    device: str | None = Field(None, description="serial device the console serves, e.g. /dev/ttyAMA0, "
                               "/dev/ttyS0 or the USB gadget /dev/ttyGS0; none: only `appliance console "
                               "--device/--stdio`")
    baudrate: int = Field(115200, gt=0, le=4_000_000, description="bits per second (8N1, no flow control)")
    password_hash: str | None = Field(None, description="ask for a password: a scrypt$... or "
                                      "pbkdf2_sha256$iterations$salt$hash string from `appliance console "
                                      "hash-password`; without one, only status, sensors and version "
                                      "answer")
    password: Literal["none"] | None = Field(None, description="`none`: no password at all, every command "
                                             "answers on the console (say so explicitly: the default is a "
                                             "console that needs a login to change anything)")

    @field_validator("password_hash")
    @classmethod
    def _well_formed(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_hash(value)
            except PasswordHashError as exc:
                raise ValueError(f"not a usable password hash: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_or_the_other(self) -> "ConsoleSection":
        if self.password == "none" and self.password_hash:
            raise ValueError("password: none and a password_hash contradict each other: keep one")
        return self

