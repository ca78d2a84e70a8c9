"""Events: the documented schema, durable commit, order, size bound."""
from __future__ import annotations

import json
import subprocess
import sys

import jsonschema

from appliance.events.spool import Spool

from appliance.events.record import make_event

from conftest import REPO

SCHEMA = json.loads((REPO / "docs" / "event.schema.json").read_text())
WINDOW = {"seq": 7, "start": "2026-11-21T10:00:00.000Z", "frames": 4096, "sample_rate": 12800.0,
          "channels": ["x", "y", "z"]}


def event(i: int, severity: int = 1, message: str = "m") -> dict:
    return make_event(gateway="gw", source="s", module="m", severity=severity, score=float(i),
                      message=f"{message} {i}", window=WINDOW, features={"ch0.rms": 0.1 * i, "bad": float("nan")})


def test_event_matches_documented_schema():
    e = event(1)
    jsonschema.Draft202012Validator(SCHEMA).validate(e)
    assert e["features"]["bad"] is None   # NaN is not JSON: stored as null
    ids = [event(i)["id"] for i in range(50)]
    assert len(set(ids)) == 50 and ids == sorted(ids)   # UUIDv7 sorts by time


def test_committed_events_survive_a_killed_writer(tmp_path):
    # A separate process commits and dies with SIGKILL-like abruptness (os._exit, no close).
    code = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
from appliance.events.spool import Spool
from appliance.events.record import make_event
s = Spool({str(tmp_path / 'spool.db')!r}, 1 << 20)
for i in range(25):
    s.append(make_event(gateway='gw', source='s', module='m', severity=1, score=i, message=str(i),
                        window={{}}, features={{}}))
os._exit(0)
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    spool = Spool(tmp_path / "spool.db", 1 << 20)
    assert [e["message"] for e in spool.tail(100)] == [str(i) for i in range(25)]
    assert spool.depth() == 25
    spool.close()


def test_size_bound_evicts_oldest_lowest_severity_first(tmp_path):
    spool = Spool(tmp_path / "spool.db", 6_000)
    for i in range(10):
        spool.append(event(i, severity=3, message="critical"))
    for i in range(40):
        spool.append(event(i, severity=0, message="info"))
    kept = spool.tail(1000)
    spool.close()
    assert spool.evicted > 0
    assert [e["message"] for e in kept if e["severity"] == "critical"] == [f"critical {i}" for i in range(10)]
    infos = [e["message"] for e in kept if e["severity"] == "info"]
    assert infos and infos == [f"info {i}" for i in range(40 - len(infos), 40)]   # the newest infos stay
    assert sum(len(json.dumps(e, separators=(",", ":"))) for e in kept) <= 6_000


def test_events_wait_in_memory_while_the_spool_fails(tmp_path, vibstats_wasm):
    import sqlite3

    from appliance.core.supervisor import Supervisor
    from support import metric, sim_source, write_config

    cfg = write_config(tmp_path, {"s": sim_source()}, {})
    sup = Supervisor(cfg)
    real_append = sup.spool.append
    failing = {"on": True}

    def append(e, attachments=()):
        if failing["on"]:
            raise sqlite3.OperationalError("database or disk is full")
        real_append(e, attachments)

    sup.spool.append = append
    for i in range(3):
        sup.emit(event(i))
    assert sup.spool.depth() == 0 and metric(sup, "appliance_spool_errors_total") == 3
    assert sup.events_emitted == 0   # not committed, so not emitted
    failing["on"] = False
    sup.emit(event(3))
    assert [e["message"] for e in sup.spool.tail(10)] == ["m 0", "m 1", "m 2", "m 3"]
    assert sup.events_emitted == 4 and metric(sup, "appliance_events_lost_total") == 0
    sup.stop()


def test_failed_commits_do_not_skew_the_size_bound(tmp_path):
    import sqlite3
    full = {"on": False}

    class FillingDisk:
        """A connection whose COMMIT fails while the disk is full, as SQLite's would."""

        def __init__(self, *args, **kw):
            self.db = sqlite3.connect(*args, **kw)

        def __getattr__(self, name):
            return getattr(self.db, name)

        def execute(self, sql, *args):
            if sql == "COMMIT" and full["on"]:
                raise sqlite3.OperationalError("database or disk is full")
            return self.db.execute(sql, *args)

    spool = Spool(tmp_path / "spool.db", 20_000, connect=FillingDisk)
    for i in range(10):
        spool.append(event(i))
    full["on"] = True
    for i in range(300):
        try:
            spool.append(event(100 + i))
        except sqlite3.OperationalError:
            pass
    full["on"] = False
    for i in range(10, 15):
        spool.append(event(i))
    assert spool.evicted == 0 and spool.depth() == 15   # nothing evicted for phantom bytes
    spool.close()


def test_attachments_commit_with_their_event_and_leave_with_it(tmp_path):
    from appliance.events.record import Attachment
    spool = Spool(tmp_path / "spool.db", 10_000)
    jpg = Attachment("snapshot.jpg", "image/jpeg", b"\xff\xd8" + b"x" * 3000)
    first = make_event(gateway="gw", source="cam", module="m", severity=1, score=1.0, message="motion",
                       window=WINDOW, features={}, attachments=[jpg])
    jsonschema.Draft202012Validator(SCHEMA).validate(first)
    assert first["attachments"][0]["size"] == 3002 and len(first["attachments"][0]["sha256"]) == 64
    spool.append(first, [jpg])
    assert spool.attachment(first["id"], "snapshot.jpg") == jpg.data
    for i in range(3):   # the attachment's bytes count toward the bound: the first event goes
        e = make_event(gateway="gw", source="cam", module="m", severity=1, score=1.0, message=str(i),
                       window=WINDOW, features={}, attachments=[jpg])
        spool.append(e, [jpg])
    assert spool.evicted >= 1 and spool.attachment(first["id"], "snapshot.jpg") is None
    spool.close()
    reopened = Spool(tmp_path / "spool.db", 10_000)
    assert reopened.stats()["bytes"] == sum(len(json.dumps(e, separators=(",", ":"), sort_keys=True)) + 3002
                                  for e in reopened.tail(10))
    reopened.close()
