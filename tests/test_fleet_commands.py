"""Fleet commands on Mosquitto, which speaks MQTT 5: the operator's command carries a Response
Topic and its id as Correlation Data, the gateway answers there (docs/fleet.md). The same commands
over NATS (MQTT 3.1.1 only, the plain reply topic) are in test_fleet.py."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.config.schema import load_config
from appliance.core.supervisor import Supervisor
from appliance_tools.fleet.operator import FleetOperator

from broker import Broker, Subscriber
from support import sim_source, wait_for

GW = "gwcmd"


@pytest.fixture
def setup(tmp_path: Path, vibstats_wasm):
    broker = Broker(tmp_path / "broker").start()
    doc = {"gateway": {"name": GW, "data_dir": str(tmp_path / "data")}, "metrics": {"enabled": False},
           "fleet": {"enabled": True, "groups": ["line1"]},
           "uplink": {"transport": "mqtt", "mqtt": {"host": "127.0.0.1", "port": broker.port, "keepalive_s": 5}},
           "sources": {"a": sim_source()},
           "modules": {"stats": {"wasm": str(vibstats_wasm), "source": "a", "window": {"size": 256}}}}
    (tmp_path / "gw.yaml").write_text(yaml.safe_dump(doc))
    sup = Supervisor(load_config(tmp_path / "gw.yaml"))
    sup.start()
    op = FleetOperator([f"127.0.0.1:{broker.port}"], client_id="test-commands")
    try:
        wait_for(lambda: op.report(GW) is not None, 30, "the gateway's first report")
        yield broker, sup, op
    finally:
        op.close()
        sup.stop()
        broker.stop()


def test_commands_use_mqtt5_request_response_and_run_once(setup):
    broker, sup, op = setup
    assert op.protocol == "5" and sup.forwarder.transport.protocol == "5"
    plain = Subscriber(broker, [f"factory/{GW}/fleet/reply"]).start()
    try:
        before = op.report(GW)["time"]
        reply = op.command(GW, "report", ident="cmd-1", timeout_s=10)
        assert reply["ok"] and reply["result"] == "reported" and reply["route"] == "mqtt5 response topic"
        wait_for(lambda: op.report(GW)["time"] > before, 10, "the report the command asked for")
        assert sup.fleet.replies["cmd-1"]["result"] == "reported"
        # The same id again: the same reply, from the gateway's memory of it (not run a second time).
        sup.fleet.replies["cmd-1"]["result"] = "remembered"   # what the gateway would say if it did not run it again
        op.replies.clear()
        assert op.command(GW, "report", ident="cmd-1", timeout_s=10)["result"] == "remembered"
        unknown = op.command(GW, "reboot", timeout_s=10)
        assert not unknown["ok"] and "unknown op" in unknown["error"]
        time.sleep(0.5)
        assert plain.messages == []   # MQTT 5 answers go to the response topic only
    finally:
        plain.stop()


def test_a_response_topic_outside_the_replies_space_is_refused(setup):
    """A command may not make the gateway publish under its name anywhere it likes (another
    gateway's desired state, an event stream): its answer goes to the plain reply topic, refused."""
    broker, sup, op = setup
    target = f"factory/{GW}/events/spindle"   # its own topics, but not its replies
    watch = Subscriber(broker, [target, f"factory/{GW}/fleet/reply"]).start()
    raw = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="raw-v5", protocol=mqtt.MQTTv5)
    connected = threading.Event()
    raw.on_connect = lambda *a: connected.set()
    raw.connect("127.0.0.1", broker.port)
    raw.loop_start()
    try:
        assert connected.wait(5)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = target
        props.CorrelationData = b"evil-1"
        raw.publish(f"factory/{GW}/fleet/cmd", json.dumps({"id": "evil-1", "op": "report"}), qos=1,
                    properties=props).wait_for_publish(5)
        (msg,) = watch.wait_for(f"factory/{GW}/fleet/reply", timeout_s=10)
        reply = json.loads(msg.payload)
        assert reply["id"] == "evil-1" and not reply["ok"] and "response topic" in reply["error"]
        assert watch.on(target) == []
        assert "evil-1" not in sup.fleet.replies   # not run
        wait_for(lambda: any("response topic" in r["reason"] for r in op.report(GW).get("refusals", [])), 10,
                 "the refusal in the reported state")
    finally:
        raw.loop_stop()
        raw.disconnect()
        watch.stop()


def test_the_documented_mosquitto_acls_let_the_fleet_work_and_nothing_more(tmp_path: Path, vibstats_wasm):
    """configs/broker/mosquitto-fleet.acl, as docs/fleet.md gives it: the gateway reads its group's
    desired state and its commands and answers them; as its user, another gateway's commands
    cannot be read nor its desired state written."""
    from conftest import REPO
    users = {"gw-acl-1": "pw1", "fleet-operator": "pw-op"}
    broker = Broker(tmp_path / "broker", users=users, acl_file=REPO / "configs/broker/mosquitto-fleet.acl").start()
    doc = {"gateway": {"name": "gw-acl-1", "data_dir": str(tmp_path / "data")}, "metrics": {"enabled": False},
           "fleet": {"enabled": True, "groups": ["line1"]},
           "uplink": {"transport": "mqtt", "mqtt": {"host": "127.0.0.1", "port": broker.port, "keepalive_s": 5,
                                                     "username": "gw-acl-1", "password": "pw1"}},
           "sources": {"a": sim_source()},
           "modules": {"stats": {"wasm": str(vibstats_wasm), "source": "a", "window": {"size": 256}}}}
    (tmp_path / "gw.yaml").write_text(yaml.safe_dump(doc))
    sup = Supervisor(load_config(tmp_path / "gw.yaml"))
    sup.start()
    op = FleetOperator([f"127.0.0.1:{broker.port}"], client_id="fleet-operator", username="fleet-operator",
                       password="pw-op")
    intruder = None
    try:
        wait_for(lambda: op.report("gw-acl-1") is not None, 30, "the gateway's report through the ACLs")
        assert sup.forwarder.transport.subscribed and sup.forwarder.transport.subscriptions_refused == 0
        revision = op.publish_desired({"stats": {"version": "config"}}, group="line1")
        wait_for(lambda: op.report("gw-acl-1").get("revisions", {}).get("line1") == revision, 30,
                 "the group's desired state read by the gateway")
        own = op.publish_desired({"stats": {"version": "config"}}, gateway="gw-acl-1")
        wait_for(lambda: op.report("gw-acl-1").get("revisions", {}).get("gateway") == own, 30,
                 "its own desired state read by the gateway")
        assert op.command("gw-acl-1", "report", timeout_s=10)["route"] == "mqtt5 response topic"
        # The gateway's user cannot read another gateway's commands or write its desired state.
        # (Mosquitto grants the SUBSCRIBE and then withholds what the ACL does not let it read.)
        def client(name: str, user: str, password: str, got: list) -> mqtt.Client:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
            c.username_pw_set(user, password)
            c.on_message = lambda cl, u, m: got.append((m.topic, m.payload))
            done = threading.Event()
            c.on_subscribe = lambda *a: done.set()
            c.connect("127.0.0.1", broker.port)
            c.loop_start()
            c.subscribe("factory/gw-acl-2/#", qos=1)
            assert done.wait(5)
            return c
        stolen: list = []
        seen: list = []
        intruder = client("gw-acl-1-intruder", "gw-acl-1", "pw1", stolen)
        watch = client("watch", "fleet-operator", "pw-op", seen)
        intruder.publish("factory/gw-acl-2/fleet/desired", b'{"revision": 1}', qos=1, retain=True).wait_for_publish(5)
        watch.publish("factory/gw-acl-2/fleet/cmd", b'{"id": "x", "op": "report"}', qos=1).wait_for_publish(5)
        wait_for(lambda: seen, 10, "an operator's command to gw-acl-2, seen by an operator")
        time.sleep(0.5)
        assert [t for t, _ in seen] == ["factory/gw-acl-2/fleet/cmd"]   # the intruder's desired state was dropped
        assert stolen == []
        watch.loop_stop()
        watch.disconnect()
    finally:
        if intruder is not None:
            intruder.loop_stop()
        op.close()
        sup.stop()
        broker.stop()


def test_the_reported_state_is_published_again_when_nothing_changed(setup, monkeypatch):
    """A report the broker acknowledged may still miss an operator; the next one heals that."""
    from appliance.deploy import channel
    broker, sup, op = setup
    monkeypatch.setattr(channel, "REPORT_AGAIN_S", 0.5)
    with Subscriber(broker, [f"factory/{GW}/fleet/reported"]) as sub:
        got = sub.wait(lambda ms: len(ms) >= 4, 10, "reports again and again")
    times = [json.loads(m.payload)["time"] for m in got]
    assert times == sorted(times) and len(set(times)) == len(times)
