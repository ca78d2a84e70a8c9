"""A damaged spool never stops the gateway, and a clock jump never expires an unsent event.

Damage is made the way SD cards make it: a header overwritten, a page zeroed, the file cut
mid-page, a WAL from another database. Each time the supervisor starts, the readable events reach
a real Mosquitto, and the event about the damage says how many were lost."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time

import pytest

from appliance.core.supervisor import Supervisor
from appliance.events import salvage
from appliance.events.clock import SpoolClock
from appliance.events.record import Attachment, make_event
from appliance.events.spool import Spool

from conftest import REPO
from support import metric, sim_source, wait_for, write_config

N = 200
PAGE = 4096
DAY_NS = 86_400 * 10**9


def evidence(i: int) -> list[Attachment]:
    return [Attachment("window.npy", "application/octet-stream", bytes([i % 256]) * 700)] if i % 5 == 0 else []


def event(i: int, gateway: str = "gw-test") -> dict:
    return make_event(gateway=gateway, source="s", module="m", severity=1 + i % 3, score=float(i),
                      message=f"event {i}", window={}, features={"i": float(i)}, attachments=evidence(i))


def fill(path, first: int, n: int, gateway: str = "gw-test", crash: bool = False) -> None:
    """Commit events in a separate process; crash=True dies without closing (the WAL stays)."""
    code = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'tests')!r})
from test_spool_damage import event, evidence
from appliance.events.spool import Spool
s = Spool({str(path)!r}, 1 << 26)
for i in range({first}, {first + n}):
    s.append(event(i, {gateway!r}), evidence(i))
os._exit(0) if {crash} else s.close()
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def numbers(events) -> list[int]:
    return sorted(int(e["message"].split()[1]) for e in events if e.get("kind") == "anomaly")


# ---- the four kinds of damage --------------------------------------------------------------------

def overwrite_header(path) -> int:
    with open(path, "r+b") as f:
        f.write(os.urandom(salvage.HEADER_BYTES))
    return 0


def zero_a_page(path) -> int:
    """Zero the page holding event 100; returns how many events lived on it."""
    data = bytearray(path.read_bytes())
    page = data.index(b'"message":"event 100"') // PAGE
    on_page = sum(data[page * PAGE:(page + 1) * PAGE].count(b'"message":"event %d"' % i) for i in range(N))
    data[page * PAGE:(page + 1) * PAGE] = bytes(PAGE)
    path.write_bytes(bytes(data))
    return on_page


def cut_mid_page(path) -> int:
    size = path.stat().st_size
    os.truncate(path, size - 3 * PAGE - 1000)
    return -1   # not known in advance: checked as recovered + lost == N


def foreign_wal(path) -> int:
    other = path.with_name("other.db")
    fill(other, 10_000, 30, gateway="gw-other", crash=True)
    shutil.copyfile(other.with_name("other.db-wal"), path.with_name("spool.db-wal"))
    return 0


DAMAGE = {"header_overwritten": overwrite_header, "page_zeroed": zero_a_page, "cut_mid_page": cut_mid_page,
          "wal_of_another_database": foreign_wal}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_spool_is_salvaged_and_the_loss_counted(tmp_path, damage):
    path = tmp_path / "spool.db"
    fill(path, 0, N)
    expected_lost = DAMAGE[damage](path)

    spool = Spool(path, 1 << 26, recover=True)
    r = spool.recovery
    assert r is not None, "the damage went unnoticed"
    got = numbers(spool.tail(10 * N))
    assert len(got) == r.recovered == spool.depth()
    assert len(got) + r.lost == N, r.describe()
    if expected_lost >= 0:
        assert r.lost == expected_lost, r.describe()
    assert len(got) >= N - 40                        # the damage costs what it touched, not the spool
    assert not any(n >= 10_000 for n in got), "another database's events were taken in"
    assert r.moved_to.exists() and r.moved_to.name.startswith("spool.db.damaged-")
    assert salvage.check_read_only(path) is None          # the new file is sound
    # The evidence of every recovered event whose attachment survived is byte for byte the same.
    kept_evidence = [i for i in got if i % 5 == 0]
    ids = {int(e["message"].split()[1]): e["id"] for e in spool.tail(10 * N)}
    intact = sum(spool.attachment(ids[i], "window.npy") == evidence(i)[0].data for i in kept_evidence)
    assert intact >= len(kept_evidence) - r.attachments_lost
    spool.append(event(N + 1))                        # and it takes new events
    spool.close()
    assert Spool(path, 1 << 26, recover=True).recovery is None


def test_sound_spools_are_not_touched(tmp_path):
    path = tmp_path / "spool.db"
    fill(path, 0, 50)
    fill(path, 50, 10, crash=True)                    # its own WAL, uncheckpointed: not damage
    spool = Spool(path, 1 << 26, recover=True)
    assert spool.recovery is None and numbers(spool.tail(100)) == list(range(60))
    assert not list(tmp_path.glob("*.damaged-*"))
    spool.close()


def test_without_recovery_damage_is_an_error_and_the_file_stays(tmp_path):
    path = tmp_path / "spool.db"
    fill(path, 0, 20)
    overwrite_header(path)
    with pytest.raises(sqlite3.DatabaseError):
        Spool(path, 1 << 26)                          # `appliance events` reads; it never moves the file
    assert not list(tmp_path.glob("*.damaged-*"))


def test_only_the_newest_damaged_copies_are_kept(tmp_path):
    path = tmp_path / "spool.db"
    for _ in range(salvage.KEEP_DAMAGED + 2):
        fill(path, 0, 5)
        overwrite_header(path)
        Spool(path, 1 << 26, recover=True).close()
    kept = [p for p in tmp_path.glob("spool.db.damaged-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(kept) == salvage.KEEP_DAMAGED


def test_gateway_starts_on_a_damaged_spool_and_sends_what_was_readable(tmp_path):
    from broker import Broker, Subscriber

    path = tmp_path / "var" / "spool.db"
    path.parent.mkdir()
    fill(path, 0, N)
    on_page = zero_a_page(path)
    broker = Broker(tmp_path / "broker").start()
    sub = Subscriber(broker, ["factory/#"], client_id="plant").start()
    cfg = write_config(tmp_path, {"s": sim_source(block_s=0.05)}, {},
                       uplink={"transport": "mqtt", "mqtt": {"host": "127.0.0.1", "port": broker.port}})
    sup = Supervisor(cfg)                             # before: sqlite3.DatabaseError, a crash loop
    sup.start()
    try:
        def arrived() -> dict[str, dict]:
            return {e["id"]: e for e in (json.loads(m.payload) for m in sub.messages
                                         if "/events/" in m.topic and m.topic.count("/") == 3)}
        wait_for(lambda: len(arrived()) >= N - on_page + 1, 30, "the readable events upstream")
        events = list(arrived().values())
        damaged = [e for e in events if e["kind"] == "spool_damaged"]
        assert len(damaged) == 1 and damaged[0]["features"]["lost"] == on_page
        assert damaged[0]["severity"] == "alarm" and f"{on_page} lost" in damaged[0]["message"]
        got = numbers(events)
        assert len(got) == len(set(got)) == N - on_page and set(got) <= set(range(N))
        assert metric(sup, "appliance_spool_recoveries_total") == 1
        assert metric(sup, "appliance_spool_salvage_lost_events_total") == on_page
    finally:
        sup.stop()
        sub.stop()
        broker.stop()


def test_durability_off_is_refused_outside_the_rig(tmp_path):
    cfg = write_config(tmp_path, {"s": sim_source()}, {}, events={"spool_durability": "off"})
    with pytest.raises(ValueError, match="only for the image rig"):
        Supervisor(cfg)


# ---- clock jumps ---------------------------------------------------------------------------------

class FakeClock:
    """A wall clock that can jump, a steady clock that cannot, and NTP that may or may not have synced."""

    def __init__(self) -> None:
        self.wall = 1_600_000_000 * 10**9   # a Pi's stale clock: 2020
        self.steady = 5 * 10**9
        self.synced = False

    def spool_clock(self) -> SpoolClock:
        return SpoolClock(wall_ns=lambda: self.wall, steady_ns=lambda: self.steady,
                          synchronised=lambda: self.synced)

    def run(self, ns: int) -> None:
        self.wall += ns
        self.steady += ns


MAX_AGE_S = 30 * 86_400


def test_a_clock_jump_of_years_expires_no_unsent_event(tmp_path):
    clock = FakeClock()
    spool = Spool(tmp_path / "spool.db", 1 << 26, clock=clock.spool_clock())
    for i in range(20):
        spool.append(event(i))
    clock.run(DAY_NS)
    clock.wall += 5 * 365 * DAY_NS                  # NTP arrives: five years forward
    clock.synced = True
    assert spool.expire(MAX_AGE_S) == 0 and spool.depth() == 20
    assert spool.stats()["oldest_age_s"] == pytest.approx(86_400, rel=1e-6)
    clock.wall -= 10 * 365 * DAY_NS                 # and a bad server sends it ten years back
    assert spool.expire(MAX_AGE_S) == 0 and spool.depth() == 20
    spool.close()
    # A restart (another boot: the steady clock starts again) keeps the run time already counted.
    clock.steady = 1 * 10**9
    clock.synced = False
    clock.wall += 20 * 365 * DAY_NS
    spool = Spool(tmp_path / "spool.db", 1 << 26, clock=clock.spool_clock())
    assert spool.expire(MAX_AGE_S) == 0 and spool.depth() == 20
    assert spool.stats()["oldest_age_s"] == pytest.approx(86_400, rel=1e-3)
    clock.run(30 * DAY_NS)                          # thirty more days of running: now they are old
    assert spool.expire(MAX_AGE_S) == 20 and spool.depth() == 0
    spool.close()


def test_with_a_synchronised_clock_time_switched_off_counts(tmp_path):
    clock = FakeClock()
    clock.synced = True
    spool = Spool(tmp_path / "spool.db", 1 << 26, clock=clock.spool_clock())
    spool.append(event(1))
    spool.close()
    clock.wall += 31 * DAY_NS                       # a month on the shelf, switched off
    clock.steady = 10**9
    spool = Spool(tmp_path / "spool.db", 1 << 26, clock=clock.spool_clock())
    assert spool.expire(MAX_AGE_S) == 1             # both readings trusted: the month counts
    spool.close()


def test_events_committed_before_ntp_get_their_time_once_it_syncs(tmp_path):
    clock = FakeClock()
    spool = Spool(tmp_path / "spool.db", 1 << 26, clock=clock.spool_clock())
    spool.append(event(1))                          # committed at a stale wall time
    clock.run(3600 * 10**9)
    clock.wall += 5 * 365 * DAY_NS
    clock.synced = True
    spool.expire(MAX_AGE_S)                         # the maintenance tick anchors it
    spool.close()
    clock.wall += 31 * DAY_NS                       # then a month switched off
    clock.steady = 10**9
    spool = Spool(tmp_path / "spool.db", 1 << 26, clock=clock.spool_clock())
    assert spool.expire(MAX_AGE_S) == 1             # its true age, not its stale stamp, counted
    spool.close()


# ---- what the review found ------------------------------------------------------------------------

def test_the_wal_survives_the_check_and_is_read_both_ways(tmp_path):
    """A page zeroed in the file while the newest commits wait in the WAL: the read-only check
    leaves the WAL in place, and salvage reads the file with it (the newest events) and without."""
    path = tmp_path / "spool.db"
    fill(path, 0, N)
    fill(path, N, 20, crash=True)                    # events 200..219 live only in the WAL
    on_page = zero_a_page(path)
    spool = Spool(path, 1 << 26, recover=True)
    r = spool.recovery
    assert r is not None and r.moved_to.with_name(r.moved_to.name + "-wal").exists()
    got = numbers(spool.tail(10 * N))
    assert set(range(N, N + 20)) <= set(got), "the WAL's events were not read"
    assert len(got) + r.lost == N + 20 and r.lost == on_page, r.describe()
    spool.close()


def test_a_spool_with_nothing_left_to_find_its_rows_by_ends_in_bounded_time(tmp_path):
    """The table's root, its id index and sqlite_sequence zeroed: no bound on the sequence numbers
    is readable. Before, salvage searched on without end and the gateway never started."""
    path = tmp_path / "spool.db"
    fill(path, 0, N)
    data = bytearray(path.read_bytes())
    for page in (2, 3, 4):                            # events, its id index, sqlite_sequence (1-based)
        data[(page - 1) * PAGE:page * PAGE] = bytes(PAGE)
    path.write_bytes(bytes(data))
    code = f"""
import sys
import time
sys.path.insert(0, {str(REPO)!r})
from appliance.events.spool import Spool
s = Spool({str(path)!r}, 1 << 26, recover=True)
print(s.recovery.recovered, s.recovery.lost)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    salvaged, lost = map(int, out.stdout.split())
    assert salvaged + lost <= N


def test_a_full_disk_during_salvage_still_gives_a_working_spool(tmp_path, monkeypatch):
    path = tmp_path / "spool.db"
    fill(path, 0, 30)
    overwrite_header(path)

    def no_space(*_a, **_k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(salvage.shutil, "copyfile", no_space)
    spool = Spool(path, 1 << 26, recover=True)
    r = spool.recovery
    assert r is not None and r.incomplete and "No space left" in r.incomplete
    assert "more may be lost" in r.describe()
    assert not list(tmp_path.glob("spool-salvage-*")), "scratch copies left on the data partition"
    spool.append(event(1))
    assert spool.depth() == 1
    spool.close()


def test_a_damaged_copy_is_never_pruned_before_it_is_read(tmp_path):
    """A Pi without a real-time clock stamps files out of order: older damaged copies may look
    newer. The one just moved aside must still be read."""
    path = tmp_path / "spool.db"
    for _ in range(salvage.KEEP_DAMAGED):
        fill(path, 0, 5)
        overwrite_header(path)
        Spool(path, 1 << 26, recover=True).close()
    future = time.time() + 10 * 365 * 86_400
    for old in tmp_path.glob("spool.db.damaged-*"):
        os.utime(old, (future, future))
    fill(path, 100, 50)
    overwrite_header(path)
    spool = Spool(path, 1 << 26, recover=True)
    # Every event it held: the 50 new ones and the 5 each earlier salvage had carried over.
    assert spool.recovery.recovered == 50 + 5 * salvage.KEEP_DAMAGED and spool.recovery.moved_to.exists()
    kept = [p for p in tmp_path.glob("spool.db.damaged-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(kept) == salvage.KEEP_DAMAGED and spool.recovery.moved_to in kept
    spool.close()


# ---- a power cut inside a rollback-journal transaction ------------------------------------------

def cut_mid_transaction(path, committed: int = 0) -> None:
    """A process dies inside a rollback-journal transaction after SQLite spilled pages into the
    file: a hot journal stays beside it, as a power cut in the spool's first transaction (over an
    empty file, committed=0) left one in the CI's power-cut drill (image/powercut.py)."""
    code = f"""
import os, sqlite3
db = sqlite3.connect({str(path)!r}, isolation_level=None)
if {committed}:
    db.execute("CREATE TABLE t (x BLOB)")
for _ in range({committed}):
    db.execute("INSERT INTO t VALUES (?)", (os.urandom(3000),))
db.execute("PRAGMA cache_size=2")            # so the transaction spills into the file
db.execute("BEGIN")
db.execute("CREATE TABLE IF NOT EXISTS t (x BLOB)")
for _ in range(200):
    db.execute("INSERT INTO t VALUES (?)", (os.urandom(3000),))
os._exit(0)
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert path.with_name(path.name + "-journal").exists()


def test_a_transaction_a_power_cut_interrupted_is_rolled_back_not_refused(tmp_path):
    """A read-only connection cannot read past a hot journal (SQLITE_READONLY_ROLLBACK): the
    gateway refused to start on every restart. SQLite's own rollback is the recovery."""
    path = tmp_path / "spool.db"
    cut_mid_transaction(path)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        salvage.check_read_only(path)
    spool = Spool(path, 1 << 26, recover=True)
    assert spool.recovery is None and spool.depth() == 0
    assert not path.with_name("spool.db-journal").exists()
    assert not list(tmp_path.glob("spool-salvage-*")), "the scratch copy was left behind"
    spool.append(event(1))
    spool.close()
    assert Spool(path, 1 << 26, recover=True).depth() == 1


def test_a_journal_that_would_restore_pages_is_not_the_spools(tmp_path):
    """The spool writes a rollback journal only in its first transaction, over an empty file.
    SQLite rolls back any hot journal beside the file: one from another database replaced a
    spool's 30 events with its own, silently. Such a journal is refused: the file is salvaged as
    it is, and the journal moves aside with it (left beside the new spool, SQLite would roll it
    into that)."""
    path = tmp_path / "spool.db"
    fill(path, 0, 30)
    other = tmp_path / "other" / "other.db"
    other.parent.mkdir()
    cut_mid_transaction(other, committed=40)
    shutil.copyfile(other.with_name("other.db-journal"), tmp_path / "spool.db-journal")
    spool = Spool(path, 1 << 26, recover=True)
    r = spool.recovery
    assert r is not None and "journal" in r.reason, "another database's journal was rolled in"
    assert numbers(spool.tail(100)) == list(range(30)) and r.lost == 0
    assert r.moved_to.with_name(r.moved_to.name + "-journal").exists()
    assert not path.with_name("spool.db-journal").exists()
    spool.append(event(31))
    spool.close()
    assert Spool(path, 1 << 26, recover=True).recovery is None


def test_a_full_disk_while_judging_a_hot_journal_opens_it_rolled_back_in_place(tmp_path, monkeypatch):
    path = tmp_path / "spool.db"
    cut_mid_transaction(path)

    def no_space(*_a, **_k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(salvage.shutil, "copyfile", no_space)
    spool = Spool(path, 1 << 26, recover=True)
    assert spool.recovery is None and spool.depth() == 0
    assert not list(tmp_path.glob("spool-salvage-*"))
    spool.close()
