"""Store-and-forward through the real supervisor: nothing committed is ever lost."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time

import pytest

from appliance.events.spool import Spool
from appliance.core.supervisor import Supervisor

from conftest import require
from hostile_modules.hostile import build_hostile
from support import metric, sim_source, wait_for, write_config
from webhook_server import Reply, WebhookServer


def event_of(request) -> dict:
    """The event a webhook request carried: the JSON body, or the multipart's "event" part."""
    return json.loads(request.part("event").data if request.parts else request.body)


def ticks(messages) -> list[int]:
    return [int(m.split()[-1]) for m in messages]


def ticker_config(tmp_path, uplink: dict | None = None, **gateway):
    wasm = build_hostile("ticker", tmp_path / "m")
    sections = {"uplink": uplink} if uplink else {}
    # An event on every window, on purpose: far beyond the default per-module rate limit.
    sections["events"] = {"module_burst": 10_000, "module_rate_per_min": 60_000}
    cfg = write_config(tmp_path, {"s": sim_source(block_s=0.02)},
                       {"tick": {"wasm": str(wasm), "source": "s", "window": {"size": 1024}}}, **sections)
    if gateway:
        cfg = cfg.model_copy(update={"gateway": cfg.gateway.model_copy(update=gateway)})
    return cfg


def test_http_errors_are_retried_in_order_and_a_refused_event_is_parked(tmp_path):
    with WebhookServer() as server:
        # Two server errors, then a 400 for that same event; then everything is accepted.
        script = [Reply(500), Reply(503, headers={"Retry-After": "0"}), Reply(400, b'{"error":"schema"}')]
        server.script(*script)
        cfg = ticker_config(tmp_path, {"transport": "http", "backoff_s": 0.05, "backoff_max_s": 0.2,
                                       "http": {"url": server.url, "timeout_s": 0.5}})
        sup = Supervisor(cfg)
        sup.start()
        try:
            wait_for(lambda: sup.events_emitted >= 20 and len(server.requests) >= 20, 20, "events and deliveries")
        finally:
            sup.stop()
        # Replies go to requests in arrival order, health summaries included.
        replies = script + [Reply(200)] * (len(server.requests) - len(script))
        answered = [(r, reply) for r, reply in zip(server.requests, replies)
                    if r.headers.get("x-appliance-kind") == "event"]
    requests = [r for r, _ in answered]
    acked = [event_of(r) for r, reply in answered if reply.status == 200]
    refused = [event_of(r) for r, reply in answered if reply.status == 400]
    spool = Spool(cfg.gateway.data_dir / "spool.db", 1 << 24)
    pending = [e for e, _ in spool.pending(1000)]
    parked = spool.stats()["parked"]
    spool.close()
    # An event that met only errors was tried again until the 400 parked it.
    assert len(refused) == 1 and event_of(requests[0])["message"] == "tick 1"
    refused_tick = int(refused[0]["message"].split()[-1])
    assert parked == 1
    # Every committed tick was acknowledged upstream or is still in the spool (the parked one
    # included, as it is not sent again): nothing lost, and the acknowledged ones came in order.
    committed = set(range(1, sup.events_emitted + 1))
    assert ticks(e["message"] for e in acked) == sorted(ticks(e["message"] for e in acked))
    assert set(ticks(e["message"] for e in acked)) | set(ticks(e["message"] for e in pending)) | {refused_tick} \
        == committed
    assert all(r.headers.get("idempotency-key") == event_of(r)["id"] for r in requests)
    assert metric(sup, "appliance_upstream_failures_total", reason="transient") >= 1
    assert metric(sup, "appliance_upstream_failures_total", reason="permanent") == 1
    assert metric(sup, "appliance_upstream_sent_events_total") == len(acked)


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "spoolfs"
    mnt.mkdir()
    require(os.geteuid() == 0 and shutil.which("mount") is not None, "root, to mount a small tmpfs (CI runs as root)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    require(proc.returncode == 0, f"a tmpfs mount: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_reported_counted_and_recovers_without_loss(tmp_path, small_tmpfs):
    cfg = ticker_config(tmp_path, data_dir=small_tmpfs)
    sup = Supervisor(cfg)
    filler = small_tmpfs / "filler"
    sup.start()
    try:
        wait_for(lambda: sup.events_emitted >= 5, 10, "first events")
        # Fill the file system: the spool can no longer commit.
        try:
            with open(filler, "wb") as f:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
        except OSError:   # ENOSPC: full (closing the file raises it again, hence outside)
            pass
        wait_for(lambda: metric(sup, "appliance_spool_errors_total") >= 3, 15, "commits to fail")
        assert sup.stopping is False and sup.sources["s"].health[0].value == "ok"
        waiting = sup.events_waiting
        assert waiting >= 1
        filler.unlink()                                   # space returns
        before = sup.events_emitted
        wait_for(lambda: sup.events_emitted > before + waiting, 15, "the waiting events to be committed")
    finally:
        sup.stop()
    spool = Spool(cfg.gateway.data_dir / "spool.db", 1 << 30)
    got = ticks(e["message"] for e, _ in spool.pending(100_000))
    spool.close()
    assert got == list(range(1, len(got) + 1))            # every tick, in order: none lost
    assert metric(sup, "appliance_events_lost_total") == 0
    db = sqlite3.connect(cfg.gateway.data_dir / "spool.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()


# ---- MQTT: broker outage and kills at random moments -------------------------------------------

def received_events(sub) -> list[dict]:
    """Events as they arrived (duplicates included), from the subscriber's messages."""
    return [json.loads(m.payload) for m in sub.messages if "/events/" in m.topic and m.topic.count("/") == 3]


def test_broker_outage_every_event_arrives_in_order(tmp_path):
    from broker import Broker, Subscriber

    broker = Broker(tmp_path / "broker").start()
    sub = Subscriber(broker, ["factory/#"], client_id="plant", clean=False)
    sub.client.reconnect_delay_set(0.1, 0.5)   # the plant's consumer is back quickly too
    sub.start()
    cfg = ticker_config(tmp_path, {"transport": "mqtt", "backoff_s": 0.1, "backoff_max_s": 0.5,
                                   "mqtt": {"host": "127.0.0.1", "port": broker.port, "ack_timeout_s": 2}})
    sup = Supervisor(cfg)
    sup.start()
    try:
        sub.wait(lambda m: len(received_events(sub)) >= 10, 15, "events before the outage")
        broker.stop()                                          # the plant network goes away
        emitted_at_outage = sup.events_emitted
        wait_for(lambda: sup.events_emitted >= emitted_at_outage + 15, 15, "events during the outage")
        assert sup.spool.depth() >= 10                         # they wait in the spool
        broker.start()                                         # and it comes back
        wait_for(lambda: sup.spool.depth() <= 2, 20, "the spool to drain")
    finally:
        sup.stop()
    spool = Spool(cfg.gateway.data_dir / "spool.db", 1 << 24)
    left = ticks(e["message"] for e, _ in spool.pending(1000))
    spool.close()
    committed = set(range(1, sup.events_emitted + 1))
    try:   # what the broker acknowledged reaches the (reconnected) consumer
        sub.wait(lambda m: {int(e["message"].split()[-1]) for e in received_events(sub)} | set(left) >= committed,
                 15, "every committed event")
    finally:
        sub.stop()
        broker.stop()
    first_arrivals: dict[str, int] = {}
    for e in received_events(sub):
        first_arrivals.setdefault(e["id"], int(e["message"].split()[-1]))
    got = list(first_arrivals.values())
    assert got == sorted(got), "events arrived out of order"
    assert set(got) | set(left) == committed, "an event was lost"
    assert max(got) >= emitted_at_outage + 15                  # the outage's events did arrive
    assert metric(sup, "appliance_upstream_failures_total", reason="transient") >= 1


def test_killed_at_random_moments_no_event_is_lost(tmp_path):
    import random
    import re
    import signal
    import sys

    import yaml
    from broker import Broker, Subscriber

    from conftest import REPO

    broker = Broker(tmp_path / "broker").start()
    sub = Subscriber(broker, ["factory/#"], client_id="plant", clean=False).start()
    sub.client.reconnect_delay_set(0.1, 0.5)
    wasm = build_hostile("ticker", tmp_path / "m")
    doc = {"gateway": {"name": "gw-kill", "data_dir": str(tmp_path / "var")}, "metrics": {"enabled": False},
           "events": {"module_burst": 10_000, "module_rate_per_min": 60_000},   # an event per window, on purpose
           "uplink": {"transport": "mqtt", "backoff_s": 0.05, "backoff_max_s": 0.2,
                      "mqtt": {"host": "127.0.0.1", "port": broker.port, "ack_timeout_s": 2}},
           "sources": {"s": sim_source(block_s=0.02)},
           "modules": {"tick": {"wasm": str(wasm), "source": "s", "window": {"size": 512}}}}
    path = tmp_path / "appliance.yaml"
    logged: set[str] = set()
    rng = random.Random(20261121)
    try:
        for _ in range(20):
            path.write_text(yaml.safe_dump(doc))
            proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(path)], cwd=REPO,
                                    stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
            time.sleep(rng.uniform(1.0, 2.5))                  # start-up, then events being committed and sent
            proc.send_signal(signal.SIGKILL)
            err = proc.communicate(timeout=30)[1]
            # An EVENT line is written only after the commit: each logged id must reach the plant.
            logged |= set(re.findall(r"EVENT .*\[id ([0-9a-f-]{36})\]", err))
        assert len(logged) > 100
        # A last run without the ticker, to let the forwarder empty the spool.
        doc["modules"]["tick"]["enabled"] = False
        path.write_text(yaml.safe_dump(doc))
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(path)], cwd=REPO,
                                stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        db = tmp_path / "var" / "spool.db"
        wait_for(lambda: sqlite3.connect(db).execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0, 60,
                 "the spool to drain")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        sub.wait(lambda m: logged <= {e["id"] for e in received_events(sub)}, 15, "every logged event upstream")
    finally:
        sub.stop()
        broker.stop()
    by_id: dict[str, set[bytes]] = {}
    for m in sub.messages:
        if "/events/" in m.topic and m.topic.count("/") == 3:
            by_id.setdefault(json.loads(m.payload)["id"], set()).add(m.payload)
    deliveries = sum(1 for m in sub.messages if "/events/" in m.topic and m.topic.count("/") == 3)
    print(f"\nkill test: 20 SIGKILLs; {len(logged)} events logged as committed, {len(by_id)} distinct events "
          f"received ({len(by_id) - len(logged)} committed but killed before their log line), "
          f"{deliveries - len(by_id)} duplicate deliveries (same id, same bytes), "
          f"{len(logged - set(by_id))} lost")
    assert logged <= set(by_id), f"{len(logged - set(by_id))} committed events never arrived"
    assert all(len(payloads) == 1 for payloads in by_id.values()), "a duplicate differs from its original"


def test_sensor_events_carry_the_window_samples(tmp_path):
    import io

    import numpy as np

    cfg = ticker_config(tmp_path)
    cfg = cfg.model_copy(update={"events": cfg.events.model_copy(update={"attachment_max_kb": 4})})
    sup = Supervisor(cfg)
    sup.start()
    try:
        wait_for(lambda: sup.events_emitted >= 2, 10, "events")
    finally:
        sup.stop()
    spool = Spool(cfg.gateway.data_dir / "spool.db", 1 << 24)
    event, [att] = spool.pending(1)[0]
    spool.close()
    assert att.name == "window.npy" and event["attachments"][0]["size"] == len(att.data) <= 4096
    samples = np.load(io.BytesIO(att.data), allow_pickle=False)
    # 3 axes of float32; 1024 frames do not fit 4 KiB, so the middle of the window is kept.
    assert samples.dtype == np.float32 and samples.shape[0] == 3 and 0 < samples.shape[1] < 1024
    assert 0.001 < float(np.std(samples)) < 1.0          # real vibration, in g


def test_retry_after_zero_does_not_spin(tmp_path):
    with WebhookServer() as server:
        server.default = Reply(429, headers={"Retry-After": "0"})
        cfg = ticker_config(tmp_path, {"transport": "http", "backoff_s": 0.2, "backoff_max_s": 0.5,
                                       "http": {"url": server.url, "timeout_s": 1}})
        sup = Supervisor(cfg)
        sup.start()
        try:
            wait_for(lambda: len(server.requests) >= 1, 10, "a first request")
            first = len(server.requests)
            time.sleep(2.0)
            during = len(server.requests) - first
        finally:
            sup.stop()
    assert 2 <= during <= 12, during   # retried at the backoff's pace, not thousands of times
