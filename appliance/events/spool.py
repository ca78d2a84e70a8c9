"""The durable local spool of events.

An event counts as emitted only once its row is committed: SQLite in WAL mode with
synchronous=FULL, so a power cut loses nothing that was reported as emitted.
A damaged spool is moved aside and salvaged (events/salvage.py); ages are measured so that a
clock jump cannot expire unsent events (events/clock.py).
"""
from __future__ import annotations

import ctypes
import functools
import json
import logging
import sqlite3
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Callable

from appliance.events import salvage
from appliance.events.clock import SpoolClock
from appliance.events.record import SEVERITIES, Attachment, encode_event

log = logging.getLogger("appliance.events")

# How hard a commit is pushed to the card. Only FULL keeps the promise above; OFF exists for the
# image rig's power-cut drill, to prove that the drill notices lost events (refused elsewhere).
DURABILITY = {"full": "FULL", "off": "OFF"}
STATS_FOR_S = 1.0           # how long stats() figures stand when nothing changed


def sqlite_memory_used() -> int | None:
    """Bytes SQLite holds in this process (page caches, statements), or None where the library
    that the sqlite3 module uses cannot be asked (the metric of the supervisor's memory by kind)."""
    try:
        lib = _sqlite_library()
    except OSError:
        return None
    return int(lib.sqlite3_memory_used())


@functools.cache
def _sqlite_library() -> ctypes.CDLL:
    # dlopen of the soname the sqlite3 module is linked to returns that same loaded library, so
    # its counters are this process's; one handle (a CDLL per call leaves garbage for the GC).
    # The soname, no search (find_library starts ldconfig or gcc, in the supervisor).
    lib = ctypes.CDLL("libsqlite3.so.0")
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    return lib


class Spool:
    """Committed events, oldest first; bounded by size (oldest lowest-severity goes first)."""

    def __init__(self, path: Path, max_bytes: int, on_evict: Callable[[int], None] | None = None,
                 connect: Callable[..., sqlite3.Connection] = sqlite3.connect, *, recover: bool = False,
                 clock: SpoolClock | None = None, durability: str = "full") -> None:
        """connect: how the database is opened (sqlite3.connect; tests inject failures there).
        recover: a spool that fails to open or to pass quick_check is moved aside and salvaged
        (the supervisor's spool; a command-line reader must not move the service's file).
        After a recovery, `recovery` says what happened and the salvaged events are in."""
        self.path = Path(path)
        self._on_evict = on_evict
        self._connect = connect
        self._clock = clock or SpoolClock()
        self._sync = DURABILITY[durability]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.evicted = 0
        self.recovery: salvage.Recovery | None = None
        self._closed = False
        self._last_stats: dict[str, float] = {}
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._stats_at = -1.0
        problem = None
        if recover:
            # Judged before anything opens it for writing (salvage.judge says why);
            # errors that are not damage (a full, read-only or missing disk) go to the caller.
            salvage.remove_scratch(self.path.parent)
            problem = salvage.judge(self.path)
        if problem is not None:
            self._recover(problem)
        else:
            self._db = self._open()
        self._bytes = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM events").fetchone()[0]
        # Run time (events/clock.py) carries on from where the last run left it: the saved figure,
        # or the newest event's if the last run ended before it could save (a power cut).
        saved = self._db.execute("SELECT value FROM meta WHERE key = 'run_ns'").fetchone()
        newest = self._db.execute("SELECT MAX(run_ns) FROM events").fetchone()[0]
        # One ns on, so this run's events (run_ns >= _run_base) are told from the last run's.
        self._run_base = max(int(saved[0]) if saved else 0, newest or 0) + 1
        self._steady0 = self._clock.steady_ns()

    def _open(self) -> sqlite3.Connection:
        db = self._connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self._sync}")
            # SQLite's page cache grows with the file up to its bound (2 MB by default), which in a
            # slow real-time run looks like a leak for an hour; half a megabyte holds the spool's hot
            # pages (the newest rows and the indexes) and fills within minutes.
            db.execute("PRAGMA cache_size=-512")
            db.execute("""CREATE TABLE IF NOT EXISTS events (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                id TEXT NOT NULL UNIQUE,
                priority INTEGER NOT NULL,
                created_ns INTEGER NOT NULL,
                body TEXT NOT NULL,
                size INTEGER NOT NULL DEFAULT 0)""")
            columns = {row[1] for row in db.execute("PRAGMA table_info(events)")}
            if "size" not in columns:   # a spool written before attachments existed
                db.execute("ALTER TABLE events ADD COLUMN size INTEGER NOT NULL DEFAULT 0")
                db.execute("UPDATE events SET size = LENGTH(body)")
            if "parked" not in columns:  # the reason the far side refused it for good, if it did
                db.execute("ALTER TABLE events ADD COLUMN parked TEXT")
            if "run_ns" not in columns:  # a spool from before clock-safe ages: their run time starts now
                db.execute("ALTER TABLE events ADD COLUMN run_ns INTEGER NOT NULL DEFAULT 0")
                db.execute("ALTER TABLE events ADD COLUMN wall_synced INTEGER NOT NULL DEFAULT 0")
            db.execute("""CREATE TABLE IF NOT EXISTS attachments (
                event_id TEXT NOT NULL,
                name TEXT NOT NULL,
                type TEXT NOT NULL,
                data BLOB NOT NULL,
                PRIMARY KEY (event_id, name))""")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            # Who this spool is: a WAL that says otherwise came from another database (salvage.py).
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('spool_id', ?)",
                       (secrets.randbits(62),))
        except BaseException:
            db.close()
            raise
        return db

    def _recover(self, problem: str) -> None:
        """Move the damaged file aside, open a new one, put in what can be read. Whatever goes
        wrong while reading the damaged copy, the gateway gets a working spool and is told."""
        log.error("spool %s is damaged (%s): moving it aside and salvaging what can be read", self.path, problem)
        moved = salvage.move_aside(self.path)
        wal = moved.with_name(moved.name + "-wal")
        trust_wal = wal.exists() and "WAL belongs to another" not in problem
        try:
            found = salvage.salvage(moved, wal if trust_wal else None)
        except Exception as exc:   # noqa: BLE001 - a salvage bug must not stop the gateway either
            log.exception("spool salvage failed")
            found = salvage.Salvage([], 0, 0, False, f"salvage failed: {type(exc).__name__}: {exc}")
        self._db = self._open()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for item in found.events:
                row = item.row
                self._db.execute(
                    "INSERT OR IGNORE INTO events (id, priority, created_ns, body, size, parked, run_ns, wall_synced) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (row["id"], row.get("priority", 1), row.get("created_ns") or 0, row["body"],
                     row.get("size") or len(row["body"]), row.get("parked"), row.get("run_ns") or 0,
                     row.get("wall_synced") or 0))
                for name, content_type, data in item.attachments:
                    self._db.execute("INSERT OR IGNORE INTO attachments (event_id, name, type, data) "
                                     "VALUES (?, ?, ?, ?)", (row["id"], name, content_type, data))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        salvage.prune_damaged(self.path)
        self.recovery = salvage.Recovery(problem, moved, len(found.events), found.lost, found.attachments_lost,
                                         found.header_rebuilt, found.incomplete)
        log.error("%s", self.recovery.describe())

    def run_ns(self) -> int:
        """The appliance's running time as this spool has seen it (never jumps)."""
        return self._run_base + self._clock.steady_ns() - self._steady0

    def _save_run_locked(self, run: int) -> None:
        self._db.execute("INSERT INTO meta (key, value) VALUES ('run_ns', ?) "
                         "ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)", (run,))

    def append(self, event: dict[str, Any], attachments: list[Attachment] | tuple = ()) -> None:
        """Commit one event with its attachments, all or nothing (raises sqlite3.Error/OSError
        when it cannot; nothing changes then)."""
        body = encode_event(event).decode()
        size = len(body) + sum(len(a.data) for a in attachments)
        priority = SEVERITIES.index(event["severity"])
        with self._lock:
            self._stats_at = -1.0   # the figures changed
            self._db.execute("BEGIN IMMEDIATE")
            try:
                run = self.run_ns()
                self._db.execute("INSERT INTO events (id, priority, created_ns, body, size, run_ns, wall_synced) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?)", (event["id"], priority, self._clock.wall_ns(), body,
                                                                  size, run, int(self._clock.synchronised())))
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
            self._stats_at = -1.0   # the figures changed
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
            self._stats_at = -1.0   # the figures changed
            self._db.execute("UPDATE events SET parked = ? WHERE id = ?", (reason[:500], event_id))

    def requeue_parked(self) -> int:
        """Give parked events another chance (after the uplink's config was fixed)."""
        with self._lock:
            self._stats_at = -1.0   # the figures changed
            return self._db.execute("UPDATE events SET parked = NULL WHERE parked IS NOT NULL").rowcount

    def _age_sql(self) -> tuple[str, tuple]:
        """An event's age in ns as SQL (events/clock.py): its run time, or its wall-clock age when
        the clock was synchronised both when it was committed and now, whichever is larger."""
        run, wall, synced = self.run_ns(), self._clock.wall_ns(), int(self._clock.synchronised())
        return ("MAX(? - run_ns, CASE WHEN wall_synced = 1 AND ? = 1 THEN ? - created_ns ELSE 0 END)",
                (run, synced, wall))

    def expire(self, max_age_s: float) -> int:
        """The age bound: events older than max_age_s leave, counted and logged like evictions.
        A wall clock that jumps before NTP has synchronised it (a boot without RTC) cannot make
        an event old (events/clock.py)."""
        with self._lock:
            self._stats_at = -1.0   # the figures changed
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._anchor_locked()
                age, params = self._age_sql()
                rows = self._db.execute(f"SELECT id, size FROM events WHERE {age} > ?",
                                        (*params, int(max_age_s * 1e9))).fetchall()
                for event_id, _ in rows:
                    self._db.execute("DELETE FROM events WHERE id = ?", (event_id,))
                    self._db.execute("DELETE FROM attachments WHERE event_id = ?", (event_id,))
                self._save_run_locked(self.run_ns())
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

    def _anchor_locked(self) -> None:
        """Once the clock is synchronised, events committed earlier in this run get their true
        commit time back (now minus the run time since), so their wall-clock age counts too."""
        if not self._clock.synchronised():
            return
        self._db.execute("UPDATE events SET created_ns = ? - (? - run_ns), wall_synced = 1 "
                         "WHERE wall_synced = 0 AND run_ns >= ?",
                         (self._clock.wall_ns(), self.run_ns(), self._run_base))

    def stats(self) -> dict[str, float]:
        """depth, parked, bytes, oldest_age_s. A scrape reads four gauges from it: the figures are
        kept for a second unless the spool changed (its age query scans the table)."""
        with self._lock:
            if self._closed:   # a scrape after stop: the last figures, not an error
                return dict(self._last_stats)
            now = time.monotonic()
            if self._stats_at >= 0 and now - self._stats_at < STATS_FOR_S:
                return dict(self._last_stats)
            age_sql, params = self._age_sql()
            depth, parked, oldest = self._db.execute(
                f"SELECT COUNT(*), COUNT(parked), MAX({age_sql}) FROM events", params).fetchone()
            age = 0.0 if oldest is None else max(0.0, oldest / 1e9)
            self._last_stats = {"depth": depth, "parked": parked, "bytes": self._bytes, "oldest_age_s": age}
            self._stats_at = now
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
            try:
                self._save_run_locked(self.run_ns())
            except sqlite3.Error as exc:   # the disk is gone: the run time since the last commit is lost (ages only shrink)
                log.warning("spool: run time not saved at close: %s", exc)
            self._db.close()
