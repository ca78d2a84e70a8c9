"""MQTT uplink against a real Mosquitto (tests/broker.py): topics and exact payloads, QoS 1, retained
status and last will, password and TLS (CA, server name, client certificate), a stopped, hung and
restarted broker, subscriptions (listen) on every connection and a refused one subscribed again.
Layout: docs/uplink-mqtt.md."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import cv2
import jsonschema
import numpy as np
import paho.mqtt.client as mqtt
import pydantic
import pytest

from appliance.events.record import Attachment, make_event

from appliance.events.spool import Spool
from appliance.uplink.mqtt import MqttConfig, MqttTransport, topic_level
from appliance.uplink.transport import TransientError

from broker import Broker, Subscriber, make_pki
from conftest import REPO

GW = "gw-test-01"
SCHEMA = json.loads((REPO / "docs" / "event.schema.json").read_text())
WINDOW = {"seq": 3, "start": "2026-11-21T10:00:00.000Z", "frames": 1, "sample_rate": 10.0, "channels": ["gray"],
          "width": 64, "height": 48}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def start_broker(tmp_path):
    """start_broker(**Broker options) -> a running Broker, stopped after the test whatever happens."""
    brokers: list[Broker] = []

    def start(**kw) -> Broker:
        b = Broker(tmp_path / f"broker{len(brokers)}", **kw)
        brokers.append(b)
        return b.start()

    yield start
    for b in brokers:
        b.stop()


@pytest.fixture
def transports():
    made: list[MqttTransport] = []

    def make(broker: Broker, gateway: str = GW, **overrides) -> MqttTransport:
        settings = {**broker.client_settings(), "ack_timeout_s": 2.0, "connect_timeout_s": 3.0, **overrides}
        t = MqttTransport(MqttConfig(**{k: v for k, v in settings.items() if v is not None}), gateway)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


@pytest.fixture
def subscribers():
    made: list[Subscriber] = []

    def make(broker: Broker, topics: list[str], **kw) -> Subscriber:
        s = Subscriber(broker, topics, **kw).start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def jpeg() -> bytes:
    img = np.zeros((48, 64, 3), np.uint8)
    cv2.rectangle(img, (10, 10), (40, 30), (0, 0, 255), 2)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def event(source: str = "cam1", attachments=(), **kw) -> dict:
    return make_event(gateway=GW, source=source, module="motion", severity=2, score=3.5,
                      message="Überlast: blob in zone", window=WINDOW, features={"box0.x": 10.0, "box0.w": 30.0},
                      attachments=attachments, **kw)


def status(msg) -> dict:
    return json.loads(msg.payload)


# ---- delivery -------------------------------------------------------------------------------------

def test_event_and_snapshot_arrive_on_documented_topics_with_the_spooled_bytes(tmp_path, start_broker, transports,
                                                                               subscribers):
    broker = start_broker()
    sub = subscribers(broker, ["factory/#"])
    snap = Attachment("snapshot.jpg", "image/jpeg", jpeg())
    ev = event(attachments=[snap])
    spool = Spool(tmp_path / "spool.db", 1 << 20)
    spool.append(ev, [snap])
    spool.close()
    with sqlite3.connect(tmp_path / "spool.db") as db:
        stored = db.execute("SELECT body FROM events WHERE id = ?", (ev["id"],)).fetchone()[0].encode()

    t = transports(broker)
    t.connect()
    assert t.connected
    n = t.send(json.loads(stored), [snap])

    ev_topic = f"factory/{GW}/events/cam1"
    att_topic = f"factory/{GW}/events/cam1/{ev['id']}/snapshot.jpg"
    sub.wait_for(ev_topic)
    got = [m for m in sub.messages if m.topic in (ev_topic, att_topic)]
    assert [m.topic for m in got] == [att_topic, ev_topic]          # the evidence first
    att, body = got
    assert body.payload == stored                                   # byte for byte as spooled
    jsonschema.Draft202012Validator(SCHEMA).validate(json.loads(body.payload))
    assert att.payload == snap.data and att.payload[:2] == b"\xff\xd8"
    listed = json.loads(body.payload)["attachments"]
    assert listed == [{"name": "snapshot.jpg", "type": "image/jpeg", "size": len(snap.data),
                       "sha256": hashlib.sha256(att.payload).hexdigest()}]
    assert all(m.qos == 1 and not m.retain for m in got)
    assert n == len(stored) + len(snap.data) and t.bytes_sent >= n and t.attachments_skipped == 0


def test_online_status_is_retained_qos1_and_a_clean_stop_says_offline(start_broker, transports, subscribers):
    broker = start_broker()
    t = transports(broker)
    t.connect()
    t.publish_status(True)        # already announced by connect(): no second message
    late = subscribers(broker, [f"factory/{GW}/status"])   # subscribes after the fact: the retained copy
    (msg,) = late.wait_for(f"factory/{GW}/status")
    assert msg.retain and msg.qos == 1
    assert status(msg)["state"] == "online" and status(msg)["gateway"] == GW and "time" in status(msg)

    t.publish_status(False)
    t.close()
    late.wait_for(f"factory/{GW}/status", 2)
    assert status(late.on(f"factory/{GW}/status")[-1]) | {"time": None} == \
        {"gateway": GW, "state": "offline", "reason": "stopped", "time": None}
    assert not t.connected
    with pytest.raises(TransientError, match="not connected"):
        t.send(event(), [])


def test_health_summary_is_retained(start_broker, transports, subscribers):
    broker = start_broker()
    t = transports(broker)
    t.connect()
    n = t.publish_health({"queue_depth": 3, "sources": {"cam1": "ok"}})
    sub = subscribers(broker, [f"factory/{GW}/health"])
    (msg,) = sub.wait_for(f"factory/{GW}/health")
    doc = json.loads(msg.payload)
    assert msg.retain and n == len(msg.payload)
    assert doc["queue_depth"] == 3 and doc["sources"] == {"cam1": "ok"} and doc["gateway"] == GW


def test_oversized_attachment_is_skipped_counted_and_the_event_unchanged(start_broker, transports, subscribers):
    broker = start_broker()
    sub = subscribers(broker, ["factory/#"])
    big = Attachment("raw.bin", "application/octet-stream", os.urandom(5000))
    small = Attachment("snapshot.jpg", "image/jpeg", jpeg())
    ev = event(attachments=[big, small])
    t = transports(broker, max_attachment_bytes=4096)
    t.connect()
    n = t.send(ev, [big, small])
    (body,) = sub.wait_for(f"factory/{GW}/events/cam1")
    assert json.loads(body.payload) == ev and len(json.loads(body.payload)["attachments"]) == 2
    topics = {m.topic for m in sub.messages}
    assert f"factory/{GW}/events/cam1/{ev['id']}/snapshot.jpg" in topics
    assert f"factory/{GW}/events/cam1/{ev['id']}/raw.bin" not in topics
    assert t.attachments_skipped == 1 and n == len(body.payload) + len(small.data)


def test_names_cannot_add_topic_levels_or_wildcards(start_broker, transports, subscribers):
    broker = start_broker()
    gw = "line/3+"
    sub = subscribers(broker, ["factory/#"])
    t = transports(broker, gateway=gw, topic_prefix="factory/plant1")
    t.connect()
    ev = event(source="cam#1/a")
    t.send(ev, [])
    (msg,) = sub.wait_for("factory/plant1/line%2F3%2B/events/cam%231%2Fa")
    assert json.loads(msg.payload)["id"] == ev["id"]
    assert topic_level("spindle_1.x-y") == "spindle_1.x-y" and topic_level("50%") == "50%25"


# ---- last will ------------------------------------------------------------------------------------

CLIENT = """
import json, signal, sys, time
sys.path.insert(0, {repo!r})
from appliance.uplink.mqtt import MqttConfig, MqttTransport
t = MqttTransport(MqttConfig(**json.loads(sys.argv[1])), {gw!r})
t.connect()
print("connected", flush=True)
time.sleep(60)
"""


def run_client(broker: Broker, **overrides) -> subprocess.Popen:
    settings = {**broker.client_settings(), **overrides}
    proc = subprocess.Popen([sys.executable, "-c", CLIENT.format(repo=str(REPO), gw=GW), json.dumps(settings)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "connected":
        proc.kill()
        raise AssertionError(f"client did not connect: {line!r} exit {proc.wait()}")
    return proc


def test_last_will_when_the_gateway_dies(start_broker, subscribers):
    """SIGKILL: the process ends mid-connection without DISCONNECT (the kernel closes the socket, as a
    crash does): the broker publishes the retained offline will at once."""
    broker = start_broker()
    topic = f"factory/{GW}/status"
    sub = subscribers(broker, [topic])
    proc = run_client(broker)
    try:
        sub.wait(lambda ms: any(status(m)["state"] == "online" for m in ms), 5, "online")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        sub.wait(lambda ms: status(ms[-1])["state"] == "offline", 5, "the last will")
        assert time.monotonic() - t0 < 2
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert status(sub.on(topic)[-1]) == {"gateway": GW, "state": "offline", "reason": "lost"}
    late = subscribers(broker, [topic])   # and it is retained for whoever looks later
    (msg,) = late.wait_for(topic)
    assert msg.retain and status(msg)["state"] == "offline"


def test_last_will_when_the_link_goes_silent(start_broker, subscribers):
    """SIGSTOP: the TCP connection stays open but nothing more comes (a cut cable, a hung gateway):
    the broker gives up after 1.5 x keepalive and publishes the will (Mosquitto 2.0.11 checks
    keepalives only every few seconds: about 5 s here with a 1 s keepalive)."""
    broker = start_broker()
    topic = f"factory/{GW}/status"
    sub = subscribers(broker, [topic])
    proc = run_client(broker, keepalive_s=1)
    try:
        sub.wait(lambda ms: any(status(m)["state"] == "online" for m in ms), 5, "online")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGSTOP)
        sub.wait(lambda ms: status(ms[-1])["state"] == "offline", 10, "the last will")
        assert time.monotonic() - t0 >= 1.0
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


# ---- authentication and TLS -----------------------------------------------------------------------

def test_username_and_password(tmp_path, start_broker, transports, subscribers):
    broker = start_broker(users={"gw": "s3cret", "other": "x"})
    sub = subscribers(broker, ["factory/#"])
    secret = tmp_path / "mqtt.pass"
    secret.write_text("s3cret\n")
    t = transports(broker, password=None, password_file=str(secret))
    t.connect()
    t.send(ev := event(), [])
    sub.wait_for(f"factory/{GW}/events/cam1")
    assert json.loads(sub.on(f"factory/{GW}/events/cam1")[0].payload)["id"] == ev["id"]

    for wrong in ({"password": "nope"}, {"username": "nobody"}, {"username": None, "password": None}):
        with pytest.raises(TransientError, match=f"MQTT broker 127.0.0.1:{broker.port} refused the connection: "
                                                 "not authorized"):
            transports(broker, **wrong).connect()


def test_tls_verifies_the_broker_against_the_ca(pki, start_broker, transports, subscribers):
    broker = start_broker(pki=pki)
    sub = subscribers(broker, ["factory/#"])
    t = transports(broker)
    assert t.config.tls is not None
    t.connect()
    t.send(event(), [])
    sub.wait_for(f"factory/{GW}/events/cam1")
    t.close()
    transports(broker, tls={"ca": str(pki.ca), "server_name": "localhost"}).connect()   # a name in the cert

    with pytest.raises(TransientError, match="TLS certificate verification failed: self-signed certificate in "
                                             "certificate chain .check tls.ca"):
        transports(broker, tls={"ca": str(pki.other_ca)}).connect()
    with pytest.raises(TransientError, match="Hostname mismatch.*wrong.example"):
        transports(broker, tls={"ca": str(pki.ca), "server_name": "wrong.example"}).connect()
    with pytest.raises(TransientError, match="does the broker expect TLS"):
        transports(broker, tls=None).connect()
    transports(broker, tls={"ca": str(pki.other_ca), "insecure_skip_verify": True}).connect()


def test_client_certificate_required_by_the_broker(pki, start_broker, transports, subscribers):
    broker = start_broker(pki=pki, require_certificate=True)
    sub = subscribers(broker, ["factory/#"])
    t = transports(broker)
    t.connect()
    t.send(event(), [])
    sub.wait_for(f"factory/{GW}/events/cam1")
    with pytest.raises(TransientError, match="closed the connection before accepting it.*require a client "
                                             "certificate"):
        transports(broker, tls={"ca": str(pki.ca)}).connect()


# ---- the broker goes away and comes back ----------------------------------------------------------

def test_broker_stopped_then_restarted_on_the_same_port(start_broker, transports, subscribers):
    broker = start_broker()
    t = transports(broker, ack_timeout_s=2.0)
    t.connect()
    t.send(event(), [])

    broker.stop()
    t0 = time.monotonic()
    with pytest.raises(TransientError):
        t.send(event(), [])
    assert time.monotonic() - t0 < 2.5 and not t.connected
    with pytest.raises(TransientError, match="connection refused"):
        t.connect()

    broker.start()
    sub = subscribers(broker, ["factory/#"])
    t.connect()
    assert t.connected
    t.send(ev := event(), [])
    (msg,) = sub.wait_for(f"factory/{GW}/events/cam1")
    assert json.loads(msg.payload)["id"] == ev["id"]


def test_listen_subscribes_on_every_connection_and_gets_the_retained_message(start_broker, transports):
    """What the fleet channel relies on, on plain Mosquitto: the retained message on each (re)connect."""
    broker = start_broker()
    topic = f"factory/{GW}/fleet/desired"
    raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="retainer", protocol=mqtt.MQTTv311)
    raw.connect("127.0.0.1", broker.port)
    raw.loop_start()
    raw.publish(topic, b"rev 1", qos=1, retain=True).wait_for_publish(5)
    raw.loop_stop()
    raw.disconnect()
    got: list[bytes] = []
    t = transports(broker)
    t.listen([topic], lambda tp, payload, request: got.append(payload))
    t.connect()
    wait(lambda: got == [b"rev 1"] and t.subscribed, 5, "the retained message")
    broker.restart()
    t.connect()   # what the forwarder does once it notices
    wait(lambda: got == [b"rev 1", b"rev 1"] and t.subscribed, 5, "the retained message again")
    assert t.subscriptions_refused == 0


class RefusingBroker:
    """A minimal MQTT 3.1.1 server, one client at a time: its SUBACK refuses (0x80) every filter the
    first `refusals` times, then grants them and sends each filter's retained message. A clustered
    broker does the same while it elects leaders after losing a node (NATS 2.9)."""

    def __init__(self, refusals: int, retained: dict[str, bytes]) -> None:
        self.refusals, self.retained = refusals, retained
        self.subscribes: list[list[str]] = []
        self.published: list[str] = []
        self.levels: list[int] = []   # each CONNECT's protocol level
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(0.2)
                try:
                    self._session(conn)
                except (OSError, ConnectionError):
                    pass

    @staticmethod
    def _packet(kind: int, body: bytes) -> bytes:
        size, length = len(body), b""
        while True:
            byte, size = size % 128, size // 128
            length += bytes([byte | (128 if size else 0)])
            if not size:
                return bytes([kind]) + length + body

    def _read(self, conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            try:
                chunk = conn.recv(n - len(data))
            except TimeoutError:
                if self.stopping:
                    raise ConnectionError("stopping") from None
                continue
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _session(self, conn: socket.socket) -> None:
        while True:
            header = self._read(conn, 1)[0]
            size, shift = 0, 0
            while True:
                byte = self._read(conn, 1)[0]
                size |= (byte & 127) << shift
                shift += 7
                if not byte & 128:
                    break
            body = self._read(conn, size)
            kind = header >> 4
            if kind == 1:     # CONNECT: 3.1.1 (level 4) only, like NATS 2.9
                self.levels.append(body[6])
                conn.sendall(self._packet(0x20, b"\x00\x00" if body[6] == 4 else b"\x00\x01"))
            elif kind == 3:   # PUBLISH
                n = int.from_bytes(body[:2], "big")
                self.published.append(body[2:2 + n].decode())
                if (header >> 1) & 3:
                    conn.sendall(self._packet(0x40, body[2 + n:4 + n]))
            elif kind == 8:   # SUBSCRIBE
                pid, rest, filters = body[:2], body[2:], []
                while rest:
                    n = int.from_bytes(rest[:2], "big")
                    filters.append(rest[2:2 + n].decode())
                    rest = rest[3 + n:]
                self.subscribes.append(filters)
                granted = len(self.subscribes) > self.refusals
                conn.sendall(self._packet(0x90, pid + bytes([1 if granted else 0x80] * len(filters))))
                for f in filters if granted else ():
                    if f in self.retained:
                        conn.sendall(self._packet(0x31, len(f).to_bytes(2, "big") + f.encode() + self.retained[f]))
            elif kind == 12:  # PINGREQ
                conn.sendall(self._packet(0xD0, b""))
            elif kind == 14:  # DISCONNECT
                return

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(5)
        self.sock.close()


def wait(predicate, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def test_a_refused_subscription_is_subscribed_again_until_granted():
    desired, cmd = f"factory/{GW}/fleet/desired", f"factory/{GW}/fleet/cmd"
    broker = RefusingBroker(refusals=2, retained={desired: b"rev 7"})
    t = MqttTransport(MqttConfig(host="127.0.0.1", port=broker.port, ack_timeout_s=2.0, connect_timeout_s=3.0), GW)
    got: list[bytes] = []
    try:
        t.listen([desired, cmd], lambda topic, payload, request: got.append(payload))
        t.connect()
        wait(lambda: t.subscriptions_refused == 2, 5, "the first SUBACK refusing both filters")
        assert not t.subscribed
        t.send(event(), [])   # events go on meanwhile
        wait(lambda: got == [b"rev 7"], 10, "the retained message once the broker granted the subscription")
        assert t.subscribed and t.subscriptions_refused == 4
        assert broker.subscribes == [[desired, cmd], [cmd, desired], [cmd, desired]]   # 1 s, then 2 s later
        assert f"factory/{GW}/events/cam1" in broker.published
        assert broker.levels == [5, 4] and t.protocol == "3.1.1"   # MQTT 5 refused: 3.1.1 on the same node
    finally:
        t.close()
        broker.stop()


def test_hung_broker_send_fails_within_ack_timeout_then_recovers(start_broker, transports, subscribers):
    broker = start_broker()
    sub = subscribers(broker, ["factory/#"])
    t = transports(broker, ack_timeout_s=1.0)
    t.connect()
    broker.freeze()    # connections stay open, no PUBACK ever comes
    try:
        t0 = time.monotonic()
        with pytest.raises(TransientError, match="no PUBACK .* within 1 s"):
            t.send(lost := event(), [Attachment("snapshot.jpg", "image/jpeg", jpeg())])
        assert 0.9 < time.monotonic() - t0 < 1.8
        t0 = time.monotonic()
        t.close()                     # must not hang on the unacknowledged messages
        assert time.monotonic() - t0 < 3.5
    finally:
        broker.thaw()
    t.connect()                       # the forwarder's retry: the same event again, same id
    t.send(lost, [])
    got = sub.wait(lambda ms: sum(m.topic.endswith("/events/cam1") for m in ms) >= 1, 5, "the resent event")
    ids = [json.loads(m.payload)["id"] for m in got if m.topic.endswith("/events/cam1")]
    assert set(ids) == {lost["id"]}   # delivered, possibly twice, never under another id


# ---- configuration --------------------------------------------------------------------------------

def test_config_defaults_and_rules(pki, tmp_path):
    plain = MqttConfig(host="broker")
    assert (plain.port, plain.topic_prefix, plain.keepalive_s, plain.ack_timeout_s, plain.max_attachment_bytes) \
        == (1883, "factory", 30, 10.0, 256 * 1024)
    assert MqttConfig(host="broker", tls={"ca": str(pki.ca)}).port == 8883
    assert MqttConfig(host="broker", port=9000, tls={}).port == 9000
    assert MqttTransport(plain, "gw7").client_id == "gw7"
    assert MqttTransport(MqttConfig(host="b", client_id="fixed"), "gw7").client_id == "fixed"
    rel = MqttConfig.model_validate({"host": "b", "username": "u", "password_file": "secret"},
                                    context={"base_dir": str(tmp_path)})
    assert rel.password_file == tmp_path / "secret"
    bad = [
        {"host": "b", "tls": {"ca": str(pki.ca), "cert": str(pki.client_cert)}},      # cert without key
        {"host": "b", "tls": {"cert": str(pki.client_cert), "key": str(pki.server_key)}},   # not its key
        {"host": "b", "tls": {"ca": str(tmp_path / "missing.pem")}},
        {"host": "b", "username": "u", "password": "p", "password_file": "f"},
        {"host": "b", "password": "p"},
        {"host": "b", "topic_prefix": "factory/#"},
        {"host": "b", "topic_prefix": "/factory"},
        {"host": "b", "qos": 2},
    ]
    for doc in bad:
        with pytest.raises(pydantic.ValidationError):
            MqttConfig.model_validate(doc)


def test_protocol_setting(start_broker):
    """auto by default; 5 and 3.1.1 force one (YAML's bare 5 is read as "5"); a forced 5 that the
    broker refuses is an error in words, not a silent fallback."""
    assert MqttConfig(host="b").protocol == "auto"
    assert MqttConfig(host="b", protocol=5).protocol == "5"
    with pytest.raises(ValueError):
        MqttConfig(host="b", protocol="4")
    broker = start_broker()
    t = MqttTransport(MqttConfig(host="127.0.0.1", port=broker.port, protocol="3.1.1"), GW)
    try:
        t.connect()
        assert t.protocol == "3.1.1"
    finally:
        t.close()
    refusing = RefusingBroker(refusals=0, retained={})
    t = MqttTransport(MqttConfig(host="127.0.0.1", port=refusing.port, protocol="5", connect_timeout_s=3.0), GW)
    try:
        with pytest.raises(TransientError, match="does not speak MQTT 5"):
            t.connect()
        assert refusing.levels == [5]
    finally:
        t.close()
        refusing.stop()
