"""A damaged spool never stops the gateway: move it aside, read what can be read, count the rest.

SD cards corrupt files. When the spool fails to open or fails `PRAGMA quick_check`, the damaged
file (with its WAL) is renamed `spool.db.damaged-<UTC time>` and every event that can still be
read is copied into a new spool. Reading is done on a scratch copy, two ways, and the results
merged by event id:

- with the WAL (the newest commits live there until a checkpoint);
- without it (a WAL that belongs to another database, or is itself damaged, can hide a good file).

A header that SQLite no longer recognises is rebuilt on the copy first (the 100-byte header is
mostly derivable: page size, page count, format numbers). Rows are read in blocks of sequence
numbers; a block that raises is split in half until each unreadable row is isolated, so one
zeroed page costs the rows on it and no more. Each row must decode (JSON whose id matches its
row) to be kept. Rows that raise are the ones counted as lost: an estimate, as rows deleted
after delivery leave gaps that a damaged page's range also covers.
"""
from __future__ import annotations

import hashlib
import json
import re
import logging
import shutil
import sqlite3
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("appliance.events")

SQLITE_MAGIC = b"SQLite format 3\x00"
JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")   # a rollback journal's header, once written
HEADER_BYTES = 100
BLOCK = 256                          # sequence numbers read per query before bisecting
KEEP_DAMAGED = 3                     # damaged copies kept on the data partition (the newest)
BARREN_BLOCKS = 16                   # with the end unknown: blocks in a row without a readable row, then stop
QUERY_BUDGET = 200_000               # queries one reading may make (a few seconds on a Pi)
DAMAGED_CODES = (11, 26)             # SQLITE_CORRUPT ("disk image is malformed"), SQLITE_NOTADB ("not a database")
# SQLITE_READONLY_RECOVERY, _ROLLBACK, _CANTINIT: a cut left work only a writer may finish (a hot
# journal to roll back, a WAL index to rebuild), which a read-only connection refuses to read past.
NEEDS_A_WRITER = (264, 776, 1288)
SIDE_FILES = ("-journal", "-wal", "-shm")
EVENT_COLUMNS = ("seq", "id", "priority", "created_ns", "body", "size", "parked", "run_ns", "wall_synced")


@dataclass
class SalvagedEvent:
    row: dict[str, Any]                                   # the events row (columns as above, missing = None)
    attachments: list[tuple[str, str, bytes]] = field(default_factory=list)


@dataclass
class Recovery:
    """What opening a damaged spool did: said in an event, a metric and the log."""
    reason: str
    moved_to: Path
    recovered: int                   # events put into the new spool (the rows themselves are not kept)
    lost: int                        # rows that could not be read (an estimate; see the module's doc)
    attachments_lost: int
    header_rebuilt: bool = False
    incomplete: str | None = None    # why more may be lost than counted

    def describe(self) -> str:
        return (f"spool damaged ({self.reason}); moved aside to {self.moved_to.name}; "
                f"{self.recovered} event(s) recovered, {self.lost} lost"
                + (f", {self.attachments_lost} event(s) without some evidence" if self.attachments_lost else "")
                + ("; its header was rebuilt" if self.header_rebuilt else "")
                + (f"; more may be lost ({self.incomplete})" if self.incomplete else ""))


def _spool_id(path: Path, mode: str) -> int | None:
    db = sqlite3.connect(f"file:{path}?{mode}", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'spool_id'").fetchone()
        return int(row[0]) if row else None
    finally:
        db.close()


def foreign_wal(path: Path) -> str | None:
    """Why the WAL beside the spool must not be applied, or None.

    SQLite applies any WAL whose own checksums hold, even one copied from another database, and
    the next checkpoint writes its pages over the spool's. So before the spool is opened for
    writing, the spool's id is read from the file alone (immutable: the WAL is ignored) and
    through the WAL (read-only: nothing is checkpointed); they must agree."""
    wal = path.with_name(path.name + "-wal")
    if not wal.exists() or wal.stat().st_size == 0:
        return None
    try:
        own = _spool_id(path, "immutable=1")
    except sqlite3.DatabaseError:
        return None     # the file itself is damaged (or busy): the read-only check says which
    if own is None:     # a spool whose first commits never reached the file: nothing to compare
        return None
    try:
        seen = _spool_id(path, "mode=ro")
    except sqlite3.DatabaseError as exc:
        if not is_damage(exc):
            raise
        return f"its WAL does not read ({exc})"
    if seen != own:
        return f"its WAL belongs to another database (spool id {seen}, the file's {own})"
    return None


def is_damage(exc: sqlite3.DatabaseError) -> bool:
    """SQLITE_CORRUPT or SQLITE_NOTADB: the file is damaged (not busy, full, missing or read-only)."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in DAMAGED_CODES


def health(db: sqlite3.Connection) -> str | None:
    """None when the database passes quick_check, else what is wrong (the first problems)."""
    rows = db.execute("PRAGMA quick_check(5)").fetchall()
    verdict = "; ".join(str(r[0]) for r in rows)
    return None if verdict == "ok" else verdict


def check_read_only(path: Path) -> str | None:
    """quick_check on a read-only connection, before anything writes to the file: a read-write
    open would create tables in a damaged file, and its close would checkpoint the WAL into it
    (and delete the WAL, which salvage wants to read both with and without). None when sound or
    absent; raises for errors that are not damage."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    return _damage_reading(f"file:{path}?mode=ro", health, uri=True)


def _damage_reading(target: str | Path, read: Callable[[sqlite3.Connection], str | None], **connect: Any) -> str | None:
    """read(db) on a new connection to target: its answer, or the error if opening or reading
    says the file is damaged (is_damage); other errors are raised."""
    try:
        db = sqlite3.connect(target, **connect)
        try:
            return read(db)
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        if is_damage(exc):
            return str(exc)
        raise


def journal_pages_before(journal: Path) -> int | None:
    """The database size in pages a rollback journal restores (its header's), or None if it is
    no journal SQLite would roll back (absent, short, or its header not written)."""
    try:
        with open(journal, "rb") as f:
            head = f.read(28)
    except FileNotFoundError:
        return None
    if len(head) < 28 or head[:8] != JOURNAL_MAGIC:
        return None
    return struct.unpack(">I", head[16:20])[0]


def judge(path: Path) -> str | None:
    """Why the spool must be salvaged, or None: foreign_wal, then check_read_only.

    A power cut inside a rollback-journal transaction (the spool's first one switches it to WAL)
    leaves a hot journal; SQLite rolls it back at the next write-open, but a read-only connection
    refuses to read past it. Then the same checks run on a scratch copy a writer has settled, which
    is the state the real open will reach. The spool writes a journal only in that first
    transaction, over an empty file: one that would restore pages came from elsewhere (SQLite
    applies any journal beside the file), so the file is salvaged as it is instead."""
    try:
        return foreign_wal(path) or check_read_only(path)
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", 0) not in NEEDS_A_WRITER:
            raise
        log.warning("spool %s: an interrupted transaction is left (%s); judging it rolled back",
                    path, getattr(exc, "sqlite_errorname", exc))
    journal = path.with_name(path.name + "-journal")
    pages = journal_pages_before(journal)
    if pages:
        return f"a rollback journal beside it that this spool never writes (it would restore {pages} pages)"
    try:
        scratch = Path(tempfile.mkdtemp(prefix="spool-salvage-", dir=path.parent))
    except OSError as exc:   # a full disk: the open rolls it back in place, needing no room
        log.warning("spool %s: no room to judge a copy (%s); opening it as SQLite leaves it", path, exc)
        return None
    try:
        copy = scratch / path.name
        shutil.copyfile(path, copy)
        if journal.exists():
            shutil.copyfile(journal, copy.with_name(copy.name + "-journal"))
        # A writer's first read rolls it back.
        damage = _damage_reading(copy, lambda db: db.execute("PRAGMA schema_version").fetchone() and None)
        if damage:
            return damage
        # The WAL goes in after the rollback, beside no index of the scratch connection's.
        copy.with_name(copy.name + "-shm").unlink(missing_ok=True)
        wal = path.with_name(path.name + "-wal")
        if wal.exists():
            shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
        return foreign_wal(copy) or check_read_only(copy)
    except OSError as exc:
        log.warning("spool %s: no room to judge a copy (%s); opening it as SQLite leaves it", path, exc)
        return None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def remove_scratch(folder: Path) -> None:
    """Scratch copies a salvage interrupted (a power cut, a full disk) left behind."""
    for stale in folder.glob("spool-salvage-*"):
        shutil.rmtree(stale, ignore_errors=True)


def move_aside(path: Path) -> Path:
    """Rename the database and its journal/WAL/shm as spool.db.damaged-<n>-<UTC time>: n counts
    up, so the order holds even when a Pi without a real-time clock stamps them out of order. A
    hot journal left beside the new spool would be rolled back into it."""
    numbers = [int(m.group(1)) for p in path.parent.glob(f"{path.name}.damaged-*")
               if (m := re.match(rf"{re.escape(path.name)}\.damaged-(\d+)-", p.name))]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.damaged-{max(numbers, default=0) + 1}-{stamp}")
    for suffix in SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
    path.rename(target)
    return target


def prune_damaged(path: Path, keep: int = KEEP_DAMAGED) -> None:
    """Keep the newest `keep` damaged copies (by their number), after the newest was salvaged."""
    copies = []
    for p in path.parent.glob(f"{path.name}.damaged-*"):
        m = re.match(rf"{re.escape(path.name)}\.damaged-(\d+)-[^-]*$", p.name)
        if m:
            copies.append((int(m.group(1)), p))
    for _, old in sorted(copies)[:-keep]:
        for f in (old, *(old.with_name(old.name + suffix) for suffix in SIDE_FILES)):
            f.unlink(missing_ok=True)


def rebuilt_header(data: bytes, file_size: int, wal_mode: bool) -> bytes | None:
    """A plausible 100-byte header for a file whose own is gone, or None if page 1 is gone too.

    The page size is taken from the damaged header if it still reads as one, else the first size
    under which page 1 and page 2 look like b-tree pages. What cannot be derived is set so SQLite
    trusts nothing stale: one change, no freelist (its pages are abandoned), schema format 4, UTF-8."""
    def btree(byte: int) -> bool:
        return byte in (0x02, 0x05, 0x0A, 0x0D)

    # data: the file's first bytes (at least the largest page size and one more); file_size: all of it.
    if file_size < 512 or len(data) <= HEADER_BYTES or not btree(data[HEADER_BYTES]):
        return None
    stated = struct.unpack(">H", data[16:18])[0]
    stated = 65536 if stated == 1 else stated
    candidates = [stated] if stated in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536) else []
    candidates += [4096, 1024, 2048, 8192, 16384, 32768, 65536, 512]
    for size in candidates:   # page 2 is a b-tree page, or an overflow/freelist page (starts with 0)
        if file_size == size or len(data) > size and (btree(data[size]) or data[size] == 0):
            break
    else:
        return None
    pages = -(-file_size // size)
    version = 2 if wal_mode else 1
    header = bytearray(HEADER_BYTES)
    header[0:16] = SQLITE_MAGIC
    header[16:18] = struct.pack(">H", 1 if size == 65536 else size)
    header[18], header[19] = version, version
    header[20], header[21], header[22], header[23] = 0, 64, 32, 32
    struct.pack_into(">IIIII", header, 24, 1, pages, 0, 0, 1)          # change counter, size, freelist, cookie
    struct.pack_into(">IIIII", header, 44, 4, 0, 0, 1, 0)              # schema format, cache, vacuum, UTF-8, user
    struct.pack_into(">II", header, 92, 1, sqlite3.sqlite_version_info[0] * 1_000_000
                     + sqlite3.sqlite_version_info[1] * 1000 + sqlite3.sqlite_version_info[2])
    return bytes(header)


class _View:
    """One way of reading the damaged copy; every query may raise sqlite3.DatabaseError."""

    def __init__(self, db_file: Path, wal: Path | None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="spool-salvage-", dir=db_file.parent))
        try:
            self._copy(db_file, wal)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _copy(self, db_file: Path, wal: Path | None) -> None:
        self.file = self.dir / "copy.db"
        shutil.copyfile(db_file, self.file)
        if wal is not None:
            shutil.copyfile(wal, self.dir / "copy.db-wal")
        self.header_rebuilt = False
        with open(self.file, "rb") as f:   # the header and page 2 at the largest page size: no more
            data = f.read((1 << 16) + 1)
        if not data.startswith(SQLITE_MAGIC):
            header = rebuilt_header(data, self.file.stat().st_size, wal_mode=wal is not None)
            if header is not None:
                with open(self.file, "r+b") as f:
                    f.write(header)
                self.header_rebuilt = True
        self.db = sqlite3.connect(self.file, isolation_level=None)
        # Without it a schema that fails SQLite's checks (a file cut short) reads as nothing at all.
        self.db.execute("PRAGMA writable_schema=ON")
        self.columns: list[str] = []
        self.truncated = False
        self.unknown_tail = False

    def close(self) -> None:
        self.db.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def open_table(self) -> bool:
        try:
            present = {r[1] for r in self.db.execute("PRAGMA table_info(events)")}
        except sqlite3.DatabaseError:
            return False
        self.columns = [c for c in EVENT_COLUMNS if c in present]
        return {"seq", "id", "body"} <= present

    def bounds(self) -> tuple[int, int | None]:
        lo = hi = None
        try:
            lo, hi = self.db.execute("SELECT MIN(seq), MAX(seq) FROM events").fetchone()
        except sqlite3.DatabaseError:
            pass
        if hi is None:
            try:
                row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
                hi = row[0] if row else None
            except sqlite3.DatabaseError:
                pass
        return (lo if lo is not None else 1), hi

    def rows(self, lo: int, hi: int) -> list[tuple]:
        cols = ", ".join(self.columns)
        if lo == hi:   # an equality seek: a range would step on into the next (maybe damaged) page
            return self.db.execute(f"SELECT {cols} FROM events WHERE seq = ?", (lo,)).fetchall()
        return self.db.execute(f"SELECT {cols} FROM events WHERE seq BETWEEN ? AND ? ORDER BY seq",
                               (lo, hi)).fetchall()

    def read(self) -> tuple[dict[int, dict], set[int]]:
        """(readable rows by seq, seqs that raised). Bounded: at most QUERY_BUDGET queries, and
        with the table's end unknown, it stops after a run of blocks without a readable row
        (errors past the last readable row then count as unknown, not as lost)."""
        good: dict[int, dict] = {}
        bad: set[int] = set()
        budget = [QUERY_BUDGET]

        def block(a: int, b: int) -> None:
            if budget[0] <= 0:
                return
            budget[0] -= 1
            try:
                for values in self.rows(a, b):
                    good[values[0]] = dict(zip(self.columns, values))
            except sqlite3.DatabaseError:
                if a == b:
                    bad.add(a)
                else:
                    mid = (a + b) // 2
                    block(a, mid)
                    block(mid + 1, b)

        lo, hi = self.bounds()
        a, barren = lo, 0
        while (hi is None or a <= hi) and budget[0] > 0:
            before = len(good)
            block(a, a + BLOCK - 1 if hi is None else min(a + BLOCK - 1, hi))
            a += BLOCK
            if hi is None:   # the end is unknown: stop once well past anything readable
                barren = 0 if len(good) > before else barren + 1
                if barren >= BARREN_BLOCKS:
                    break
        self.truncated = budget[0] <= 0
        if hi is None:   # rows past the last readable one cannot be told from rows never written
            last = max(good, default=lo - 1)
            self.unknown_tail = any(seq > last for seq in bad)
            bad = {seq for seq in bad if seq <= last}
        return good, bad

    def attachments(self, event_id: str) -> list[tuple[str, str, bytes]]:
        return [(n, t, bytes(d)) for n, t, d in self.db.execute(
            "SELECT name, type, data FROM attachments WHERE event_id = ? ORDER BY name", (event_id,))]


def _decodes(row: dict) -> bool:
    try:
        body = json.loads(row["body"])
    except (TypeError, ValueError):
        return False
    return isinstance(body, dict) and body.get("id") == row["id"] and isinstance(row.get("priority", 0), int)


@dataclass
class Salvage:
    events: list[SalvagedEvent]
    lost: int
    attachments_lost: int
    header_rebuilt: bool
    incomplete: str | None           # why the count of lost rows may be short, if it may


def salvage(damaged: Path, wal: Path | None) -> Salvage:
    """What can be read from a damaged spool file and its WAL (either may be garbage), events in
    commit order. Never raises for the file's sake: what it could not do is in `incomplete`."""
    found: dict[str, tuple[int, dict, _View]] = {}
    unreadable: set[int] = set()
    readable: set[int] = set()
    views: list[_View] = []
    header_rebuilt = False
    incomplete: list[str] = []
    try:
        for wal_file in ([wal] if wal is not None else []) + [None]:
            try:
                view = _View(damaged, wal_file)
            except (OSError, sqlite3.Error) as exc:
                log.warning("spool salvage: cannot make a copy to read (%s)", exc)
                incomplete.append(f"no copy to read: {exc}")
                continue
            views.append(view)
            if not view.open_table():
                continue
            header_rebuilt |= view.header_rebuilt
            good, bad = view.read()
            if view.truncated:
                incomplete.append(f"reading stopped after {QUERY_BUDGET} queries")
            if view.unknown_tail:
                incomplete.append("the table's end is unreadable: rows past the last readable one are not counted")
            unreadable |= bad
            for seq, row in good.items():
                if not _decodes(row):
                    unreadable.add(seq)
                    continue
                readable.add(seq)
                found.setdefault(row["id"], (seq, row, view))   # the WAL view first: it is newer
        if not any(v.columns for v in views):
            incomplete.append("its events table could not be read at all")
        events, attachments_lost = [], 0
        for seq, row, view in sorted(found.values(), key=lambda item: item[0]):
            event = SalvagedEvent(row)
            try:
                event.attachments = view.attachments(row["id"])
            except sqlite3.DatabaseError:
                pass
            # The event lists its evidence (name, sha256): what is missing or altered is lost.
            listed = {a.get("name"): a.get("sha256") for a in json.loads(row["body"]).get("attachments") or []}
            event.attachments = [a for a in event.attachments
                                 if a[0] in listed and hashlib.sha256(a[2]).hexdigest() == listed[a[0]]]
            if len(event.attachments) < len(listed):
                attachments_lost += 1
            events.append(event)
        return Salvage(events, len(unreadable - readable), attachments_lost, header_rebuilt,
                       "; ".join(dict.fromkeys(incomplete)) or None)
    finally:
        for view in views:
            view.close()
