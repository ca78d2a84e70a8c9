"""The event record (schema: docs/event.schema.json): ids, times, evidence attachments, the one
encoding used in the spool and on the wire."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = 1
SEVERITIES = ("info", "warning", "alarm", "critical")


_id_lock = threading.Lock()
_id_last = [0, 0]   # [unix ms, 12-bit counter] of the last id


def new_event_id() -> str:
    """UUIDv7 (RFC 9562) with a counter in rand_a (its method 1), so ids sort in creation
    order even within one millisecond, and across restarts."""
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _id_last[0]:
            ms, counter = _id_last[0], _id_last[1] + 1
            if counter > 0xFFF:            # counter exhausted: borrow the next millisecond
                ms, counter = ms + 1, 0
        else:
            counter = int.from_bytes(os.urandom(2), "big") & 0x3FF   # random start, room to count
        _id_last[:] = [ms, counter]
    rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand_b
    return str(uuid.UUID(int=value))


def iso_time(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, tz=dt.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


@dataclass(frozen=True)
class Attachment:
    """Evidence that travels with an event (a JPEG snapshot, a raw window snippet)."""
    name: str
    content_type: str
    data: bytes

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.content_type, "size": len(self.data),
                "sha256": hashlib.sha256(self.data).hexdigest()}


def make_event(*, gateway: str, source: str, module: str, severity: int, score: float, message: str,
               window: dict[str, Any], features: dict[str, float], kind: str = "anomaly",
               attachments: list[Attachment] | tuple = ()) -> dict[str, Any]:
    event = {
        "schema": SCHEMA_VERSION,
        "id": new_event_id(),
        "kind": kind,
        "time": iso_time(time.time_ns()),
        "gateway": gateway,
        "source": source,
        "module": module,
        "severity": SEVERITIES[severity],
        "score": _finite(score),
        "message": message,
        "window": window,
        "features": {k: _finite(v) for k, v in features.items()},
    }
    if attachments:
        event["attachments"] = [a.describe() for a in attachments]
    return event


def encode_event(event: dict[str, Any]) -> bytes:
    """The event's bytes, as stored and as sent upstream: one encoding, so what arrives is
    exactly what was recorded."""
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode()


def _finite(x: float) -> float | None:
    # JSON has no NaN/Infinity; a module may still produce them.
    return x if x == x and x not in (float("inf"), float("-inf")) else None
