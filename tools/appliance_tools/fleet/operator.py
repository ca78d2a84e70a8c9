"""The operator's side of the fleet channel (docs/fleet.md): read what gateways report, publish
desired states, roll a bundle out in stages, send commands. MQTT 5 where the broker speaks it
(commands then use its request/response: a Response Topic and Correlation Data), else 3.1.1 and
the plain reply topic; any node of the broker."""
from __future__ import annotations

import base64
import hashlib
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.deploy.bundle import open_bundle
from appliance.uplink.mqtt import (SUBSCRIBE_RETRY_MAX_S, SUBSCRIBE_RETRY_S, UNSUPPORTED_PROTOCOL_VERSION,
                                   refused_filters, session_client, session_connect, topic_level)

# MQTT 5: the broker drops this tool's session this long after its connection ends, also when the
# tool was killed before close() could end it (MQTT 3.1.1 has no such bound: close() ends it).
SESSION_EXPIRY_S = 300


def revision_now() -> int:
    """Revisions only go up (gateways refuse an older one): microseconds of wall time."""
    return time.time_ns() // 1000


class CommandFailed(Exception):
    pass


class FleetOperator:
    def __init__(self, endpoints: list[str], prefix: str = "factory", client_id: str = "fleet-operator",
                 key=None, protocol: str = "auto", username: str | None = None, password: str | None = None) -> None:
        self.key = key   # a PrivateKey (appliance.deploy.keys): desired states go out signed
        self.endpoints = [(h, int(p)) for h, _, p in (e.rpartition(":") for e in endpoints)]
        self.prefix = prefix
        self.reports: dict[str, dict] = {}
        self.online: dict[str, bool] = {}   # from each gateway's retained status (its last will says offline)
        self.group_states: dict[str, dict] = {}   # the groups' retained desired states, as published
        self.received: dict[str, float] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()   # connected, and every subscription granted
        self._index = 0
        self._generation = 0   # one per connection: a retry timer of an older one does nothing
        self._sub_lock = threading.Lock()   # SUBSCRIBE packet ids and their SUBACKs
        self._subscribing: dict[int, list[str]] = {}
        self._retry_s = SUBSCRIBE_RETRY_S
        self.subscriptions_refused = 0
        self._stop = False
        self.wanted_protocol = protocol   # auto | 5 | 3.1.1
        self.credentials = (username, password) if username is not None else None
        self._speaks_311_only: set[tuple[str, int]] = set()
        self._refused_v5 = False   # the last CONNECT (MQTT 5) was answered "unsupported protocol version"
        self.replies: dict[str, dict] = {}   # command id -> its reply (either route)
        self._replied = threading.Condition(self._lock)
        # A session the broker keeps across this operator's reconnects (ended by close()): a
        # clustered broker that lost a node has the subscriptions ready, where a clean session
        # must have them made again while the cluster elects leaders (NATS refuses them then).
        self.client_id = f"{client_id}-{revision_now() % 10**9}"
        self.replies_level = topic_level(self.client_id)   # <prefix>/<gateway>/fleet/replies/<this>
        self.protocol = ""
        self.client = self._client("3.1.1" if protocol == "3.1.1" else "5")
        self._thread = threading.Thread(target=self._keep_connected, name="fleet-operator", daemon=True)
        self._thread.start()
        if not self._connected.wait(30):
            raise ConnectionError(f"no broker answered at {', '.join(endpoints)}")

    def _client(self, protocol: str) -> mqtt.Client:
        client = session_client(self.client_id, protocol)
        if self.credentials is not None:
            client.username_pw_set(*self.credentials)
        client.on_connect = self._on_connect
        client.on_disconnect = lambda c, u, f, rc, p: self._connected.clear()
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self.protocol = protocol
        return client

    def _keep_connected(self) -> None:
        """One connection at a time, to the next node when one goes."""
        while not self._stop:
            host, port = endpoint = self.endpoints[self._index % len(self.endpoints)]
            protocol = "3.1.1" if self.wanted_protocol == "3.1.1" or endpoint in self._speaks_311_only else "5"
            if protocol != self.protocol:   # paho's client speaks one version for its life
                self.client = self._client(protocol)
            self._refused_v5 = False
            try:
                session_connect(self.client, protocol, host, port, 10, SESSION_EXPIRY_S)
                self.client.loop_forever()
            except OSError:
                pass
            if self._stop:
                return
            if self._refused_v5 and self.wanted_protocol == "auto":
                self._speaks_311_only.add(endpoint)   # the same node again, in 3.1.1
                continue
            self._index += 1
            time.sleep(0.3)

    def _on_connect(self, client, userdata, flags, rc, props) -> None:
        if rc.is_failure:
            self._refused_v5 = self.protocol == "5" and rc.value == UNSUPPORTED_PROTOCOL_VERSION
            return
        with self._sub_lock:
            self._generation += 1
            self._subscribing.clear()
            self._retry_s = SUBSCRIBE_RETRY_S
        self._subscribe([f"{self.prefix}/+/fleet/reported", f"{self.prefix}/+/status",
                         f"{self.prefix}/fleet/groups/+/desired", f"{self.prefix}/+/fleet/reply",
                         f"{self.prefix}/+/fleet/replies/{self.replies_level}"])

    def _subscribe(self, filters: list[str]) -> None:
        with self._sub_lock:   # the SUBACK must find its packet id
            rc, mid = self.client.subscribe([(f, 1) for f in filters])
            if rc == mqtt.MQTT_ERR_SUCCESS:
                self._subscribing[mid] = filters

    def _on_subscribe(self, client, userdata, mid, reason_codes, props) -> None:
        """Connected counts once the broker granted every filter. One it refused (0x80: a
        clustered broker electing leaders after losing a node does) is subscribed again later:
        without that, this connection would never see a report again."""
        with self._sub_lock:
            filters = self._subscribing.pop(mid, None)
            if filters is None:
                return
            refused = refused_filters(filters, reason_codes)
            if not refused:
                if not self._subscribing:
                    self._connected.set()
                return
            self.subscriptions_refused += len(refused)
            delay, self._retry_s = self._retry_s, min(self._retry_s * 2, SUBSCRIBE_RETRY_MAX_S)
            timer = threading.Timer(delay, self._subscribe_again, (self._generation, refused))
        timer.daemon = True
        timer.start()

    def _subscribe_again(self, generation: int, filters: list[str]) -> None:
        if self._stop or generation != self._generation or not self.client.is_connected():
            return   # a newer connection subscribes to everything itself
        self._subscribe(filters)

    def _on_message(self, client, userdata, message) -> None:
        if message.topic.endswith(f"/fleet/replies/{self.replies_level}") or message.topic.endswith("/fleet/reply"):
            self._on_reply(message)
            return
        if message.topic.startswith(f"{self.prefix}/fleet/groups/"):
            group = message.topic.split("/")[-2]
            with self._lock:
                try:
                    self.group_states[group] = json.loads(message.payload) if message.payload else {}
                except ValueError:
                    self.group_states[group] = {}
            return
        try:
            doc = json.loads(message.payload)
        except ValueError:
            return
        if isinstance(doc, dict) and "gateway" in doc and message.topic.endswith("/status"):
            with self._lock:
                self.online[doc["gateway"]] = doc.get("state") == "online"
        elif isinstance(doc, dict) and "gateway" in doc:
            with self._lock:
                self.reports[doc["gateway"]] = doc
                self.received[doc["gateway"]] = time.time()

    def _on_reply(self, message) -> None:
        """A command's reply: on our MQTT 5 response topic, its id in the Correlation Data; on a
        gateway's plain reply topic (retained: an older command's may come first), the id in it."""
        try:
            doc = json.loads(message.payload)
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        ident = doc.get("id")
        if not message.topic.endswith("/fleet/reply"):
            correlation = getattr(getattr(message, "properties", None), "CorrelationData", None)
            ident = bytes(correlation).decode("utf-8", "replace") if correlation else ident
            doc = {**doc, "route": "mqtt5 response topic"}
        else:
            doc = {**doc, "route": "plain reply topic"}
        if isinstance(ident, str):
            with self._replied:
                self.replies[ident] = doc
                self._replied.notify_all()

    def command(self, gateway: str, op: str, *, ident: str | None = None, timeout_s: float = 30.0) -> dict:
        """Send one command and wait for its reply. MQTT 5: with a Response Topic (ours) and the
        id as Correlation Data; 3.1.1: plain, the reply found on the gateway's reply topic by id.
        The same id sent again gets the same reply and the gateway does not run it twice."""
        ident = ident or uuid.uuid4().hex
        doc = {"id": ident, "op": op, "time": time.time()}
        props = None
        if self.protocol == "5":
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = f"{self.prefix}/{topic_level(gateway)}/fleet/replies/{self.replies_level}"
            props.CorrelationData = ident.encode()
        self._publish(f"{self.prefix}/{topic_level(gateway)}/fleet/cmd", json.dumps(doc, sort_keys=True).encode(),
                      retain=False, properties=props)
        with self._replied:
            if not self._replied.wait_for(lambda: ident in self.replies, timeout_s):
                raise CommandFailed(f"no reply from {gateway} to {op!r} (id {ident}) within {timeout_s:g} s")
            return self.replies[ident]

    def close(self) -> None:
        self._stop = True
        self.client.disconnect()
        self._thread.join(5)
        self._end_session()

    def _end_session(self) -> None:
        """A clean connection with the same client id makes the broker drop the kept session."""
        for i in range(len(self.endpoints)):
            host, port = self.endpoints[(self._index + i) % len(self.endpoints)]
            done = threading.Event()
            v5 = self.protocol == "5"
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, reconnect_on_failure=False,
                            **({"protocol": mqtt.MQTTv5} if v5 else {"clean_session": True,
                                                                      "protocol": mqtt.MQTTv311}))
            if self.credentials is not None:
                c.username_pw_set(*self.credentials)
            c.on_connect = lambda cl, u, f, rc, p: done.set() if not rc.is_failure else None
            try:
                if v5:   # a clean start whose session ends with the connection (expiry 0, the default)
                    c.connect(host, port, keepalive=10, clean_start=True)
                else:
                    c.connect(host, port, keepalive=10)
                c.loop_start()
                if done.wait(5):
                    c.disconnect()
                    c.loop_stop()
                    return
            except OSError:
                pass
            c.loop_stop()

    # ---- reading -------------------------------------------------------------------------------

    def gateways(self, group: str | None = None, settle_s: float = 2.0) -> dict[str, dict]:
        """The latest report of each gateway (of one group); waits settle_s for retained reports."""
        time.sleep(settle_s)
        with self._lock:
            return {g: d for g, d in sorted(self.reports.items()) if group is None or group in d.get("groups", [])}

    def report(self, gateway: str) -> dict | None:
        with self._lock:
            return self.reports.get(gateway)

    # ---- publishing ----------------------------------------------------------------------------

    def _publish(self, topic: str, payload: bytes, retain: bool = True, properties: Properties | None = None) -> None:
        for _ in range(60):
            if self._connected.wait(1):
                if properties is not None and self.protocol != "5":
                    properties = None   # reconnected to a 3.1.1 node: the plain reply topic answers
                info = self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)
                try:
                    info.wait_for_publish(10)
                    if info.is_published():
                        return
                except (RuntimeError, ValueError):   # not connected (any more): not in a tight loop
                    time.sleep(0.5)
        raise ConnectionError(f"could not publish {topic}")

    def desired_topic(self, gateway: str | None = None, group: str | None = None) -> str:
        if gateway is not None:
            return f"{self.prefix}/{topic_level(gateway)}/fleet/desired"
        return f"{self.prefix}/fleet/groups/{topic_level(group)}/desired"

    def publish_desired(self, modules: dict[str, dict], *, gateway: str | None = None, group: str | None = None,
                        revision: int | None = None) -> int:
        """A new revision; for a group, merged into what the group's state already asks (other
        modules, its config) so that a gateway offline now still gets every change later."""
        revision = revision or revision_now()
        doc = {"revision": revision, "modules": modules}
        if group is not None:
            with self._lock:
                old = {k: v for k, v in (self.group_states.get(group) or {}).items() if k != "signature"}
            doc = {**old, "revision": revision, "modules": {**old.get("modules", {}), **modules}}
        if self.key is not None:
            from appliance.deploy.keys import sign_document
            doc = sign_document(doc, self.key)
        self._publish(self.desired_topic(gateway, group), json.dumps(doc, sort_keys=True).encode())
        return revision

    def clear_desired(self, *, gateway: str | None = None, group: str | None = None) -> None:
        self._publish(self.desired_topic(gateway, group), b"")


def bundle_entry(path: Path) -> tuple[str, str, dict]:
    """(module, version, desired entry with the bundle inline) for a bundle file."""
    data = path.read_bytes()
    bundle = open_bundle(data, trusted=(), allow_unsigned=True, ignore_signature=True)   # the gateways verify
    return bundle.module, bundle.version, {"version": bundle.version, "bundle": base64.b64encode(data).decode(),
                                           "sha256": hashlib.sha256(data).hexdigest()}


@dataclass
class Outcome:
    gateway: str
    stage: str
    result: str = "pending"      # kept, rolled_back, refused, timeout, reverted
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Rollout:
    module: str
    version: str
    group: str
    outcomes: list[Outcome] = field(default_factory=list)
    halted: str = ""
    seconds: float = 0.0

    def result_of(self, gateway: str) -> str:
        results = [o.result for o in self.outcomes if o.gateway == gateway]
        return results[-1] if results else "absent"

    @property
    def failures(self) -> int:
        return sum(o.result in ("rolled_back", "refused", "timeout") for o in self.outcomes)

    def table(self) -> str:
        lines = [f"rollout of {self.module} {self.version} to group {self.group}: "
                 + (f"HALTED ({self.halted})" if self.halted else "complete") + f" in {self.seconds:.1f} s",
                 f"{'gateway':<20} {'stage':<10} {'result':<12} {'s':>6}  detail"]
        for o in self.outcomes:
            lines.append(f"{o.gateway:<20} {o.stage:<10} {o.result:<12} {o.seconds:>6.1f}  {o.detail}")
        return "\n".join(lines)


def _judge(doc: dict | None, module: str, version: str, revision: int) -> tuple[str, str] | None:
    """A gateway's outcome from its report, once the report shows it took `revision` of its own
    desired state (the gateway's revision, not two machines' clocks)."""
    if not doc or (doc.get("revisions") or {}).get("gateway", 0) < revision:
        return None
    m = doc.get("modules", {}).get(module)
    if m is None:
        return "refused", f"no module {module}"
    if version in m.get("rejected", []):
        rb = doc.get("last_rollback") or {}
        return "rolled_back", str(rb.get("reason", ""))[:80]
    for r in doc.get("refusals", []):
        if r.get("where", "") == f"module {module} {version} (revision {revision})":
            return "refused", str(r.get("reason", ""))[:80]
    if m.get("version") == version and m.get("probation_left") is None and m.get("state") == "running":
        return "kept", ""
    return None


def rollout(op: FleetOperator, bundle: Path, group: str, *, canary: int = 1, batch_pct: float = 25.0,
            max_failures: int = 0, timeout_s: float = 120.0, progress: Callable[[str], None] = print) -> Rollout:
    """Canary, then batches; each gateway must keep the new version (probation passed) within
    timeout_s. More than max_failures failures halt the rollout and put every gateway that took
    the new version back on the version it ran before. The end: the group's desired state names
    the new version (gateways offline now converge when they return), per-gateway states cleared."""
    t0 = time.monotonic()
    module, version, entry = bundle_entry(bundle)
    members = op.gateways(group)
    everyone = sorted(members)   # offline ones too: their per-gateway states are cleared at the end
    result = Rollout(module, version, group)
    offline = sorted(g for g in members if not op.online.get(g, False))
    for g in offline:   # not waited for: the group's desired state reaches them when they return
        result.outcomes.append(Outcome(g, "-", "offline", 0.0, "converges from the group's desired state"))
        members.pop(g)
    if not members:
        result.halted = f"no gateway reports group {group}"
        return result
    before = {g: d.get("modules", {}).get(module, {}).get("version", "config") for g, d in members.items()}
    names = sorted(members)
    stages = [("canary", names[:canary])]
    rest = names[canary:]
    size = max(1, math.ceil(len(names) * batch_pct / 100))
    for i in range(0, len(rest), size):
        stages.append((f"batch {i // size + 1}", rest[i:i + size]))
    progress(f"rollout {module} {version} to {len(names)} gateways of group {group}: "
             + ", ".join(f"{s} {len(g)}" for s, g in stages))
    sent: list[str] = []
    for stage, gateways in stages:
        started = time.monotonic()
        pending = {g: Outcome(g, stage) for g in gateways}
        revisions = {}
        for g in gateways:
            revisions[g] = op.publish_desired({module: entry}, gateway=g)
            sent.append(g)
        while pending and time.monotonic() - started < timeout_s:
            for g in list(pending):
                verdict = _judge(op.report(g), module, version, revisions[g])
                if verdict is not None:
                    o = pending.pop(g)
                    o.result, o.detail = verdict
                    o.seconds = time.monotonic() - started
                    result.outcomes.append(o)
                    progress(f"  {stage}: {g} {o.result} after {o.seconds:.1f} s {o.detail}".rstrip())
            time.sleep(0.1)
        for g, o in pending.items():
            o.result, o.seconds, o.detail = "timeout", timeout_s, "no report of the new version in time"
            result.outcomes.append(o)
            progress(f"  {stage}: {g} timeout")
        if result.failures > max_failures:
            result.halted = f"{result.failures} failure(s) in {stage}, more than {max_failures} allowed"
            # Every gateway that was sent the bundle goes back, unless it rolled back or refused
            # by itself (a timeout may still be on probation, and would keep the new version).
            settled = {o.gateway for o in result.outcomes if o.result in ("rolled_back", "refused")}
            back = [g for g in sent if g not in settled]
            progress(f"HALT: {result.halted}; reverting {len(back)} gateway(s)")
            for g in sent:
                if g not in back:
                    op.clear_desired(gateway=g)
            for g in back:
                op.publish_desired({module: {"version": before[g]}}, gateway=g)
                result.outcomes.append(Outcome(g, "revert", "reverted", 0.0, f"back to {before[g]}"))
            break
    else:
        op.publish_desired({module: entry}, group=group)
        for g in everyone:
            op.clear_desired(gateway=g)
        progress(f"group {group} now asks for {module} {version}")
    result.seconds = time.monotonic() - t0
    return result


def roll_back(op: FleetOperator, group: str, module: str, to: str) -> int:
    """The group's desired state names an earlier version (on the gateways' cards already, or
    `config` for the YAML's file), with a new revision; per-gateway states of the group cleared."""
    members = op.gateways(group)
    revision = op.publish_desired({module: {"version": to}}, group=group)
    for g in members:
        op.clear_desired(gateway=g)
    return revision


def status_table(reports: dict[str, dict]) -> str:
    now = time.time()
    lines = [f"{'gateway':<20} {'groups':<14} {'age':>6}  modules"]
    for g, d in reports.items():
        mods = []
        for name, m in sorted(d.get("modules", {}).items()):
            flag = "*" if m.get("probation_left") is not None else ""
            state = "" if m.get("state") == "running" else f" ({m.get('state')})"
            mods.append(f"{name} {m.get('version')}{flag}{state}")
        rb = d.get("last_rollback")
        extra = f"  last rollback: {rb['module']} {rb['version']}" if rb else ""
        lines.append(f"{g:<20} {','.join(d.get('groups', [])):<14} {now - d.get('time', now):>5.0f}s  "
                     f"{'; '.join(mods)}{extra}")
    lines.append("(* on probation)")
    return "\n".join(lines)
