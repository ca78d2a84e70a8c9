"""How the console writes numbers, sizes and durations, and hides secrets."""
from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit


def si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.2f}"


def size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def duration(s: float) -> str:
    s = int(s)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms" if seconds < 0.01 else f"{seconds * 1000:.0f} ms"


def per_s(r: float | None) -> str:
    return "-" if r is None else si(r) if r >= 100 else f"{r:.1f}"


_SECRET_KEYS = {"password", "password_hash", "secret", "token"}


def redact_url(text: str) -> str:
    """A URL with its user:password@ and ?query (which may carry a key) hidden, as in the logs."""
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<hidden>"   # not a URL that parses: it may still hold a secret
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"<hidden>@{'[' + host + ']' if ':' in host else host}{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "<hidden>" if parts.query else "",
                       "<hidden>" if parts.fragment else ""))


def redact(value: Any, key: str = "") -> Any:
    """The config as shown to an operator: passwords, tokens, HTTP header values, and the
    credentials and query strings of URLs hidden."""
    if isinstance(value, dict):
        return {k: ("<hidden>" if key == "headers" and v is not None else redact(v, str(k)))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if key in _SECRET_KEYS and value is not None:
        return "<hidden>"
    if isinstance(value, str):
        return redact_url(value)
    return value
