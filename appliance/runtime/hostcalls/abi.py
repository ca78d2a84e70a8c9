"""What every host call keeps to: guest pointers inside linear memory, the limits of ABI v1."""
from __future__ import annotations

import re

MAX_LOG_BYTES = 512
MAX_LOGS_PER_CALL = 64
MAX_FEATURES = 256
MAX_EVENTS = 16
MAX_STATE_BYTES = 256 << 10
FEATURE_NAME = re.compile(rb"[A-Za-z0-9_.:\-]{1,64}")
# Control characters would be escaped 6 bytes each in JSON: replace them, keep replies small.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class AbiViolation(Exception):
    """The module broke the ABI in a host call (bad pointer, name, count)."""


def span(what: str, mem, ptr: int, nbytes: int) -> None:
    """Raise AbiViolation unless [ptr, ptr + nbytes) lies inside linear memory."""
    if ptr < 0 or nbytes < 0 or ptr + nbytes > len(mem):
        raise AbiViolation(f"{what}: pointer {ptr}+{nbytes} is outside linear memory ({len(mem)} bytes)")


def read(mem, ptr: int, length: int, what: str) -> bytes:
    """A copy of guest bytes, bounds-checked."""
    span(what, mem, ptr, length)
    return bytes(mem[ptr:ptr + length])


def text(raw: bytes) -> str:
    """Guest bytes as text for a log line or an event message: UTF-8, control characters replaced."""
    return CONTROL.sub("?", raw.decode("utf-8", "replace"))
