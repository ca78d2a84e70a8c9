"""The durable local spool of events.

An event counts as emitted only once its row is committed: SQLite in WAL mode with
synchronous=FULL, so a power cut loses nothing that was reported as emitted.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

from appliance.events.record import SEVERITIES, Attachment, encode_event

log = logging.getLogger("appliance.events")


class Spool:
    """Committed events, oldest first; bounded by size (oldest lowest-severity goes first)."""

    def __init__(self, path: Path, max_bytes: int, on_evict: Callable[[int], None] | None = None,
                 connect: Callable[..., sqlite3.Connection] = sqlite3.connect) -> None:
        """connect: how the database is opened (sqlite3.connect; tests inject failures there)."""
        self.path = Path(path)
        self._on_evict = on_evict
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.evicted = 0
        self._closed = False
        self._last_stats: dict[str, float] = {}
        self._lock = threading.Lock()
        self._db = connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        # SQLite's page cache grows with the file up to its bound (2 MB by default), which in a
        # slow real-time run looks like a leak for an hour; half a megabyte holds the spool's hot
        # pages (the newest rows and the indexes) and fills within minutes.
        self._db.execute("PRAGMA cache_size=-512")
        self._db.execute("""CREATE TABLE IF NOT EXISTS events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            priority INTEGER NOT NULL,
            created_ns INTEGER NOT NULL,
            body TEXT NOT NULL,
            size INTEGER NOT NULL DEFAULT 0)""")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(events)")}
        if "size" not in columns:   # a spool written before attachments existed
            self._db.execute("ALTER TABLE events ADD COLUMN size INTEGER NOT NULL DEFAULT 0")
            self._db.execute("UPDATE events SET size = LENGTH(body)")
        if "parked" not in columns:  # the reason the far side refused it for good, if it did
            self._db.execute("ALTER TABLE events ADD COLUMN parked TEXT")
        self._db.execute("""CREATE TABLE IF NOT EXISTS attachments (
            event_id TEXT NOT NULL,
            name TEXT NOT NULL,
            type TEXT NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (event_id, name))""")
        self._bytes = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM events").fetchone()[0]

    def append(self, event: dict[str, Any], attachments: list[Attachment] | tuple = ()) -> None:
        """Commit one event with its attachments, all or nothing (raises sqlite3.Error/OSError
        when it cannot; nothing changes then)."""
        body = encode_event(event).decode()
        size = len(body) + sum(len(a.data) for a in attachments)
        priority = SEVERITIES.index(event["severity"])
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT INTO events (id, priority, created_ns, body, size) VALUES (?, ?, ?, ?, ?)",
                                 (event["id"], priority, time.time_ns(), body, size))
                for a in attachments:
                    self._db.execute("INSERT INTO attachments (event_id, name, type, data) VALUES (?, ?, ?, ?)",
                                     (event["id"], a.name, a.content_type, a.data))
                evicted = self._evict_locked(self._bytes + size)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            # Counters move only once the transaction is durable.
            self._bytes += size - sum(n for _, n in evicted)
            self.evicted += len(evicted)
        for event_id, _ in evicted:
            log.warning("spool over %d bytes: evicted event %s (oldest of the lowest severity)",
                        self.max_bytes, event_id)
        if evicted and self._on_evict:
            self._on_evict(len(evicted))

    def _evict_locked(self, total: int) -> list[tuple[str, int]]:
        evicted: list[tuple[str, int]] = []
        while total > self.max_bytes:
            row = self._db.execute("SELECT seq, id, size FROM events "
                                   "ORDER BY priority ASC, seq ASC LIMIT 1").fetchone()
            if row is None:
                break
            self._db.execute("DELETE FROM events WHERE seq = ?", (row[0],))
            self._db.execute("DELETE FROM attachments WHERE event_id = ?", (row[1],))
            total -= row[2]
            evicted.append((row[1], row[2]))
        return evicted

    def depth(self) -> int:
        return int(self.stats()["depth"])

    def tail(self, n: int = 20) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT body FROM events ORDER BY seq DESC LIMIT ?", (n,)).fetchall()
        return [json.loads(r[0]) for r in reversed(rows)]

    # ---- forwarding (appliance/uplink/forwarder.py) ------------------------------------------

    def pending(self, limit: int = 50) -> list[tuple[dict[str, Any], list[Attachment]]]:
        """Events to send, most severe first and oldest first within a severity; parked
        events (refused for good upstream) are left out."""
        with self._lock:
            rows = self._db.execute("SELECT id, body FROM events WHERE parked IS NULL "
                                    "ORDER BY priority DESC, seq ASC LIMIT ?", (limit,)).fetchall()
            out = []
            for event_id, body in rows:
                atts = self._db.execute("SELECT name, type, data FROM attachments WHERE event_id = ? "
                                        "ORDER BY name", (event_id,)).fetchall()
                out.append((json.loads(body), [Attachment(n, t, bytes(d)) for n, t, d in atts]))
        return out

    def delete(self, event_id: str) -> None:
        """The far side acknowledged it: it leaves the spool (durably, in one transaction)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT size FROM events WHERE id = ?", (event_id,)).fetchone()
                self._db.execute("DELETE FROM events WHERE id = ?", (event_id,))
                self._db.execute("DELETE FROM attachments WHERE event_id = ?", (event_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            if row:
                self._bytes -= row[0]

    def park(self, event_id: str, reason: str) -> None:
        """Refused for good upstream: kept (never silently dropped), not retried."""
        with self._lock:
            self._db.execute("UPDATE events SET parked = ? WHERE id = ?", (reason[:500], event_id))

    def requeue_parked(self) -> int:
        """Give parked events another chance (after the uplink's config was fixed)."""
        with self._lock:
            return self._db.execute("UPDATE events SET parked = NULL WHERE parked IS NOT NULL").rowcount

    def expire(self, max_age_s: float) -> int:
        """The age bound: events older than max_age_s leave, counted and logged like evictions."""
        cutoff = time.time_ns() - int(max_age_s * 1e9)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute("SELECT id, size FROM events WHERE created_ns < ?", (cutoff,)).fetchall()
                for event_id, _ in rows:
                    self._db.execute("DELETE FROM events WHERE id = ?", (event_id,))
                    self._db.execute("DELETE FROM attachments WHERE event_id = ?", (event_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._bytes -= sum(size for _, size in rows)
            self.evicted += len(rows)
        for event_id, _ in rows:
            log.warning("spool: event %s is older than %.0f h: evicted", event_id, max_age_s / 3600)
        if rows and self._on_evict:
            self._on_evict(len(rows))
        return len(rows)

    def stats(self) -> dict[str, float]:
        with self._lock:
            if self._closed:   # a scrape after stop: the last figures, not an error
                return dict(self._last_stats)
            depth, parked, oldest = self._db.execute(
                "SELECT COUNT(*), COUNT(parked), MIN(created_ns) FROM events").fetchone()
        age = 0.0 if oldest is None else max(0.0, (time.time_ns() - oldest) / 1e9)
        self._last_stats = {"depth": depth, "parked": parked, "bytes": self._bytes, "oldest_age_s": age}
        return dict(self._last_stats)

    def attachment(self, event_id: str, name: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT data FROM attachments WHERE event_id = ? AND name = ?",
                                   (event_id, name)).fetchone()
        return None if row is None else bytes(row[0])

    def close(self) -> None:
        self.stats()
        with self._lock:
            self._closed = True
            self._db.close()
