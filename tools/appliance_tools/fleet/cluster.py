"""A 3-node NATS cluster on loopback, with JetStream and its MQTT listener: the distributed broker
the fleet tests and `make fleet-demo` run against (docs/fleet.md says why NATS).

Each node: a client port, a cluster (route) port and an MQTT port. MQTT sessions and retained
messages live in JetStream streams that NATS replicates over the cluster (R3), so a retained
desired state published on one node is there on the others, also after a node dies.
"""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 30.0


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Node:
    name: str
    client_port: int
    route_port: int
    mqtt_port: int
    config: Path
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def mqtt(self) -> str:
        return f"127.0.0.1:{self.mqtt_port}"


class NatsCluster:
    def __init__(self, workdir: Path, nodes: int = 3, binary: str | None = None) -> None:
        self.binary = binary or shutil.which("nats-server") or "/usr/bin/nats-server"
        if not Path(self.binary).exists():
            raise FileNotFoundError("nats-server is not installed (Debian: apt install nats-server; `make` does it)")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        ports = free_ports(3 * nodes)
        self.nodes = [Node(f"n{i + 1}", ports[3 * i], ports[3 * i + 1], ports[3 * i + 2],
                           workdir / f"n{i + 1}.conf", workdir / f"n{i + 1}.log") for i in range(nodes)]
        routes = ", ".join(f"nats-route://127.0.0.1:{n.route_port}" for n in self.nodes)
        for n in self.nodes:
            n.config.write_text(
                f"server_name: {n.name}\nlisten: 127.0.0.1:{n.client_port}\n"
                f"jetstream {{ store_dir: \"{workdir / ('js-' + n.name)}\", max_memory_store: 64MB, "
                f"max_file_store: 512MB }}\n"
                f"cluster {{ name: fleet, listen: 127.0.0.1:{n.route_port}, routes: [{routes}] }}\n"
                f"mqtt {{ listen: 127.0.0.1:{n.mqtt_port}, ack_wait: \"10s\", stream_replicas: 3, consumer_replicas: 3 }}\n"
                "max_payload: 8MB\n")

    @property
    def mqtt_endpoints(self) -> list[str]:
        return [n.mqtt for n in self.nodes]

    def start(self) -> "NatsCluster":
        for n in self.nodes:
            self.start_node(n, wait=False)
        for n in self.nodes:
            self._wait_mqtt(n)
        self._wait_for_quorum()
        return self

    def start_node(self, node: Node, wait: bool = True) -> None:
        log = open(node.log, "ab")
        node.proc = subprocess.Popen([self.binary, "-c", str(node.config)], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        if wait:
            self._wait_mqtt(node)

    def kill(self, node: Node) -> None:
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(10)
        node.proc = None

    def stop(self) -> None:
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                n.proc.terminate()
        for n in self.nodes:
            if n.proc is not None:
                try:
                    n.proc.wait(10)
                except subprocess.TimeoutExpired:
                    n.proc.kill()
                    n.proc.wait()
            n.proc = None

    def _wait_mqtt(self, node: Node) -> None:
        end = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < end:
            if node.proc is not None and node.proc.poll() is not None:
                raise RuntimeError(f"nats-server {node.name} exited ({node.proc.returncode}): "
                                   f"{node.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"nats-server {node.name}: no MQTT listener on {node.mqtt} after {START_TIMEOUT_S:g} s")

    def _wait_for_quorum(self) -> None:
        """The MQTT streams need a JetStream meta leader: publish a retained message on one node
        and read it back on another before anyone relies on the cluster."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        end = time.monotonic() + START_TIMEOUT_S
        last = ""
        while time.monotonic() < end:
            got = []
            pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="cluster-probe-pub", protocol=mqtt.MQTTv311)
            sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="cluster-probe-sub", protocol=mqtt.MQTTv311)
            try:
                pub.connect("127.0.0.1", self.nodes[0].mqtt_port)
                pub.loop_start()
                info = pub.publish("cluster/probe", b"up", qos=1, retain=True)
                info.wait_for_publish(5)
                sub.on_message = lambda c, u, m: got.append(m.payload)
                sub.connect("127.0.0.1", self.nodes[-1].mqtt_port)
                sub.loop_start()
                sub.subscribe("cluster/probe", qos=1)
                deadline = time.monotonic() + 5
                while not got and time.monotonic() < deadline:
                    time.sleep(0.05)
                if got:
                    return
                last = "the retained probe did not arrive on the other node"
            except (OSError, RuntimeError, ValueError) as exc:
                last = str(exc)
            finally:
                for c in (pub, sub):
                    c.loop_stop()
                    c.disconnect()
            time.sleep(0.5)
        raise RuntimeError(f"the NATS cluster did not form within {START_TIMEOUT_S:g} s: {last}")
