"""The fleet channel on a real 3-node NATS cluster (JetStream, its MQTT listener), gateways on
different nodes (docs/fleet.md): staged rollouts, a bad canary halting them, a broker node killed
mid-rollout, an offline gateway converging, and tampered, untrusted and replayed desired states
refused with nothing changed. The 20-gateway rollout, with a node killed mid-rollout, is `make fleet-demo`."""
from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from appliance.config.schema import load_config
from appliance.core.supervisor import Supervisor
from appliance_tools.fleet.cluster import NatsCluster
from appliance_tools.fleet.operator import FleetOperator, bundle_entry, rollout
from appliance_tools.fleet.rig import EventTap

from conftest import require_tool
from support import FAST_RESTART, metric, sim_source, wait_for
from test_deploy import kit, rewrite_member  # noqa: F401  (the keys and bundles of the deploy tests)

GROUP = "line1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_tool("nats-server", "nats-server")
    c = NatsCluster(tmp_path_factory.mktemp("nats")).start()
    yield c
    c.stop()


def gateway(tmp_path: Path, kit, cluster, index: int, operator_keys: list[str] = ()) -> Supervisor:   # noqa: F811
    name = f"gw{index:02d}"
    endpoints = cluster.mqtt_endpoints
    home = endpoints[index % len(endpoints)]
    host, _, port = home.rpartition(":")
    doc = {"gateway": {"name": name, "data_dir": str(tmp_path / name)}, "metrics": {"enabled": False},
           "runtime": {"restart": FAST_RESTART},
           "deploy": {"trusted_keys": [kit["public"]], "probation_windows": 20},
           "fleet": {"enabled": True, "groups": [GROUP], "operator_keys": list(operator_keys)},
           "uplink": {"transport": "mqtt", "mqtt": {"host": host, "port": int(port), "keepalive_s": 2,
                                                     "also": [e for e in endpoints if e != home]}},
           "sources": {"a": sim_source()},
           "modules": {"versioned": {"wasm": str(kit["wasm"]["1.0.0"]), "source": "a", "window": {"size": 256},
                                     "params": {"event_every": 100}}}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return Supervisor(load_config(path))


def running(sup) -> str:
    return sup.deployer.describe("versioned")["version"] or "config"


def test_a_staged_rollout_reaches_every_gateway_and_an_offline_one_when_it_returns(tmp_path, kit, cluster):  # noqa: F811
    """Gateways on different nodes of the cluster."""
    tap = EventTap(cluster.mqtt_endpoints[1])
    gateways = [gateway(tmp_path, kit, cluster, i) for i in range(5)]
    for sup in gateways:
        sup.start()
    away = gateways[4]
    op = FleetOperator(cluster.mqtt_endpoints, client_id="test-operator")
    try:
        wait_for(lambda: len(op.gateways(GROUP, settle_s=0)) == 5, 30, "5 gateways reporting")
        away.stop()   # offline during the rollout
        wait_for(lambda: op.online.get("gw04") is False, 10, "gw04 offline")
        t0 = time.monotonic()
        result = rollout(op, kit["signed"]["1.1.0"], GROUP, canary=1, batch_pct=50, max_failures=0, timeout_s=60)
        print(result.table())
        assert not result.halted, result.table()
        assert [result.result_of(f"gw0{i}") for i in range(5)] == ["kept"] * 4 + ["offline"]
        for sup in gateways[:4]:
            assert running(sup) == "1.1.0"
        print(f"rollout to 4 online gateways on 3 broker nodes: {time.monotonic() - t0:.1f} s")

        # The offline gateway comes back and converges from the group's state.
        back = gateway(tmp_path, kit, cluster, 4)
        gateways[4] = back
        back.start()
        wait_for(lambda: running(back) == "1.1.0" and back.deployer.describe("versioned")["probation_left"] is None,
                 60, "gw04 converged to 1.1.0")

        # Events flowed through it all, and none was lost.
        for sup in gateways:
            wait_for(lambda: sup.spool.depth() == 0, 60, f"{sup.cfg.gateway.name}'s spool drained")
        time.sleep(1)
        emitted: dict[str, int] = {}
        for sup in [*gateways, away]:
            emitted[sup.cfg.gateway.name] = emitted.get(sup.cfg.gateway.name, 0) + sup.events_emitted
        received = {name: len(tap.received(name)) for name in emitted}
        print("events committed / received per gateway:", {n: (emitted[n], received[n]) for n in sorted(emitted)})
        assert all(emitted.values()) and all(received[n] >= emitted[n] for n in emitted), (emitted, received)
    finally:
        op.close()
        for sup in gateways:
            if not sup.stopping:
                sup.stop()
        tap.close()


def test_a_broker_node_killed_mid_rollout_the_rollout_completes(tmp_path, kit):  # noqa: F811
    """Node n1 dies right after the canary; the operator (on n1 too) and the gateways on it go on
    through the other nodes, and the rollout completes. While the cluster elects new leaders, NATS
    2.9 refuses new subscriptions (SUBACK 0x80: their JetStream consumer was not made within its
    4 s). The operator used to ignore that and never saw another report (3 runs of 11 hung); now
    both sides subscribe again until granted, and the operator keeps its session across reconnects,
    so its subscriptions need not be made again. A gateway offline during it all converges later
    through a surviving node. A cluster of its own: this one loses a node."""
    require_tool("nats-server", "nats-server")
    cluster = NatsCluster(tmp_path / "nats").start()
    gateways = [gateway(tmp_path, kit, cluster, i) for i in range(4)]   # gw00 and gw03 on n1
    op = None
    try:
        # On n1 too. Connected first: NATS 2.9 may miss a retained message published on another
        # node while a subscription is being made (its copy of the retained messages lags).
        op = FleetOperator(cluster.mqtt_endpoints, client_id="test-operator-kill")
        for sup in gateways:
            sup.start()
        wait_for(lambda: len(op.gateways(GROUP, settle_s=0)) == 4, 30, "4 gateways reporting")
        gateways[3].stop()   # offline during the rollout; comes back after it
        expected = {"gw00": True, "gw01": True, "gw02": True, "gw03": False}
        try:
            wait_for(lambda: op.online == expected, 10, "gw03 offline, the others online")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {op.online}") from None

        def kill_n1_after_the_canary(line: str) -> None:
            print(line)
            if line.startswith("  canary:") and cluster.nodes[0].proc is not None:
                cluster.kill(cluster.nodes[0])
                print("  (broker node n1 killed)")

        t0 = time.monotonic()
        result = rollout(op, kit["signed"]["1.1.0"], GROUP, canary=1, batch_pct=50, max_failures=0, timeout_s=40,
                         progress=kill_n1_after_the_canary)
        print(result.table())
        assert cluster.nodes[0].proc is None, "n1 was not killed"
        assert not result.halted, result.table()
        assert [result.result_of(f"gw0{i}") for i in range(4)] == ["kept"] * 3 + ["offline"], \
            (result.table(), op.online)
        for sup in gateways[:3]:
            assert running(sup) == "1.1.0"
        took = time.monotonic() - t0

        back = gateway(tmp_path, kit, cluster, 3)   # n1 is its home: it goes on to another node
        gateways[3] = back
        back.start()
        wait_for(lambda: running(back) == "1.1.0" and back.deployer.describe("versioned")["probation_left"] is None,
                 30, "gw03 converged to 1.1.0 through a surviving node")
        refused = {s.cfg.gateway.name: s.forwarder.transport.subscriptions_refused for s in gateways}
        print(f"rollout with n1 killed after the canary: {took:.1f} s; subscriptions refused and subscribed "
              f"again: operator {op.subscriptions_refused}, gateways {refused}")
    finally:
        if op is not None:
            op.close()
        for sup in gateways:
            if not sup.stopping:
                sup.stop()
        cluster.stop()


def test_a_bad_canary_rolls_back_by_itself_and_halts_the_rollout(tmp_path, kit, cluster):  # noqa: F811
    gateways = [gateway(tmp_path, kit, cluster, 10 + i) for i in range(3)]
    for sup in gateways:
        sup.start()
    op = FleetOperator(cluster.mqtt_endpoints, client_id="test-operator-2")
    try:
        names = {s.cfg.gateway.name for s in gateways}
        wait_for(lambda: names <= set(op.gateways(GROUP, settle_s=0)), 30, "3 gateways reporting")
        t0 = time.monotonic()
        result = rollout(op, kit["signed"]["1.2.0"], GROUP, canary=1, batch_pct=50, max_failures=0, timeout_s=60)
        print(result.table())
        canary = sorted(names)[0]
        assert result.halted and result.result_of(canary) == "rolled_back", result.table()
        assert not [o for o in result.outcomes if o.stage.startswith("batch")], "a batch ran after the bad canary"
        for sup in gateways:
            assert running(sup) in ("config", "1.1.0"), running(sup)
        print(f"bad canary: rolled back and the rollout halted in {time.monotonic() - t0:.1f} s")
    finally:
        op.close()
        for sup in gateways:
            sup.stop()


def test_tampered_untrusted_and_replayed_desired_states_change_nothing(tmp_path, kit, cluster):  # noqa: F811
    from appliance.deploy.keys import load_private, new_pair
    operator_key, operator_pub = new_pair("operator", tmp_path / "operator")
    sup = gateway(tmp_path, kit, cluster, 20, operator_keys=[operator_pub.read_text().strip()])
    sup.start()
    op = FleetOperator(cluster.mqtt_endpoints, client_id="test-operator-3", key=load_private(operator_key))
    stranger = FleetOperator(cluster.mqtt_endpoints, client_id="test-operator-unsigned")
    try:
        wait_for(lambda: op.report("gw20") is not None, 30, "gw20 reporting")
        module, version, entry = bundle_entry(kit["signed"]["1.1.0"])
        good_revision = op.publish_desired({module: entry}, gateway="gw20")
        wait_for(lambda: running(sup) == "1.1.0", 30, "1.1.0 from the fleet")
        wait_for(lambda: sup.deployer.describe("versioned")["probation_left"] is None, 30, "1.1.0 kept")

        def refused(where: str) -> bool:
            return any(where in r["where"] for r in (op.report("gw20") or {}).get("refusals", []))

        # One byte of the .wasm changed (the desired state's sha256 made to match the changed file).
        changed = rewrite_member(kit["signed"]["1.3.0"], tmp_path / "tampered.apb", "module.wasm",
                                 lambda d: d[:-1] + bytes([d[-1] ^ 1]))
        raw = changed.read_bytes()   # what an attacker in the path would send: the operator's tool refuses it
        tampered = {"version": "1.3.0", "bundle": base64.b64encode(raw).decode(), "sha256": hashlib.sha256(raw).hexdigest()}
        op.publish_desired({module: tampered}, gateway="gw20")
        wait_for(lambda: refused("module versioned 1.3.0"), 30, "the tampered bundle refused and reported")
        time.sleep(2)   # a refusal is not tried again and again: once per revision
        assert metric(sup, "appliance_module_deploys_total", module="versioned", outcome="refused") == 1
        # A desired state nested deeper than the parser can follow: refused, reported, the channel goes on.
        raw = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="raw-publisher", protocol=mqtt.MQTTv311)
        host, _, port = cluster.mqtt_endpoints[2].rpartition(":")
        raw.connect(host, int(port))
        raw.loop_start()
        raw.publish(op.desired_topic(gateway="gw20"), b"[" * 100_000, qos=1).wait_for_publish(10)
        raw.loop_stop()
        raw.disconnect()
        wait_for(lambda: any("RecursionError" in r["reason"] for r in op.report("gw20").get("refusals", [])), 30,
                 "the deeply nested desired state refused")
        # A bundle signed by a key the gateway does not trust.
        from appliance.deploy.bundle import make_bundle, sign_bundle
        stranger_key, _ = new_pair("mallory", tmp_path / "mallory")
        evil = make_bundle(kit["wasm"]["1.3.0"], tmp_path / "evil.apb")
        sign_bundle(evil, load_private(stranger_key))
        _, _, evil_entry = bundle_entry(evil)
        op.publish_desired({module: evil_entry}, gateway="gw20")
        wait_for(lambda: any("not among deploy.trusted_keys" in r["reason"]
                             for r in op.report("gw20").get("refusals", [])), 30, "the untrusted key refused")
        # Desired states not signed by an operator key this gateway trusts.
        stranger.publish_desired({module: {"version": "config"}}, gateway="gw20")
        wait_for(lambda: any(r["reason"].startswith("unsigned") for r in op.report("gw20").get("refusals", [])), 30,
                 "an unsigned desired state refused")
        # An old desired state replayed (a lower revision).
        op.publish_desired({module: {"version": "config"}}, gateway="gw20", revision=good_revision - 1)
        wait_for(lambda: refused(f"revision {good_revision - 1}"), 30, "the replay refused")
        time.sleep(1)
        assert running(sup) == "1.1.0"
        reasons = [r["reason"] for r in op.report("gw20")["refusals"]]
        print("refused:", *reasons, sep="\n  ")
    finally:
        op.close()
        stranger.close()
        sup.stop()


def test_commands_over_a_broker_without_mqtt5_use_the_plain_reply_topic(tmp_path, kit, cluster):  # noqa: F811
    """NATS 2.9 refuses an MQTT 5 CONNECT: gateway and operator speak 3.1.1 to it, and a command's
    reply is found by its id on the gateway's retained reply topic (test_fleet_commands.py: MQTT 5)."""
    sup = gateway(tmp_path, kit, cluster, 21)
    sup.start()
    op = FleetOperator(cluster.mqtt_endpoints, client_id="test-operator-commands")
    try:
        wait_for(lambda: op.report("gw21") is not None, 30, "gw21 reporting")
        assert op.protocol == "3.1.1" and sup.forwarder.transport.protocol == "3.1.1"
        reply = op.command("gw21", "report", ident="nats-1", timeout_s=20)
        assert reply["ok"] and reply["id"] == "nats-1" and reply["route"] == "plain reply topic"
        op.replies.clear()
        assert op.command("gw21", "report", ident="nats-1", timeout_s=20)["ok"]   # answered again, run once
        assert list(sup.fleet.replies) == ["nats-1"]
    finally:
        op.close()
        sup.stop()
