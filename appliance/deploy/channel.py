"""The fleet channel: desired state in, reported state out, over the uplink's MQTT connection
(docs/fleet.md). Plain MQTT 3.1.1 topics, so any broker serves it; MQTT 5's request/response
where the connection speaks it.

    <prefix>/fleet/groups/<group>/desired   retained, by the operator: what a group should run
    <prefix>/<gateway>/fleet/desired        retained, by the operator: this gateway's own (wins per module)
    <prefix>/<gateway>/fleet/cmd            commands {"id", "op", ...}; replies on .../fleet/reply (retained),
                                            or, for an MQTT 5 command with a Response Topic, there,
                                            with its Correlation Data (under .../fleet/replies/)
    <prefix>/<gateway>/fleet/reported       retained, by the gateway: what runs, probation, last rollback

A desired state: {"revision": N, "modules": {NAME: {"version": V, "bundle": base64 | "url": URL,
"sha256": of the bundle file}}}. Each topic's revision only goes up: an older one (a replay) is
refused and reported, a repeated one changes nothing. Version "config" means the YAML's own file.
The gateway converges whenever a desired state arrives, on each reconnect (the broker sends the
retained ones again, so a gateway offline for days catches up) and after each probation ends.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import queue
import threading
import time
import urllib.request
from typing import TYPE_CHECKING

from appliance.deploy.bundle import MAX_BUNDLE_BYTES
from appliance.deploy.deployer import DeployRefused
from appliance.deploy.keys import document_signer, parse_public
from appliance.uplink.mqtt import topic_level

if TYPE_CHECKING:
    from appliance.core.supervisor import Supervisor
    from appliance.uplink.mqtt import MqttTransport, Request

log = logging.getLogger("appliance.fleet")

MAX_DESIRED_BYTES = 4 * MAX_BUNDLE_BYTES // 3 + 65536   # one inline bundle, base64
COMMANDS_KEPT = 200
REFUSALS_KEPT = 20
FETCH_TIMEOUT_S = 60.0
# The reported state is published again this long after the last one even when nothing changed:
# a report the broker acknowledged can still miss an operator (a clustered broker losing a node
# dropped one in 71 runs here), and the report's health and time go stale otherwise.
REPORT_AGAIN_S = 60.0


class FleetChannel:
    def __init__(self, sup: "Supervisor", transport: "MqttTransport", groups: list[str]) -> None:
        self.sup, self.transport, self.groups = sup, transport, list(groups)
        prefix, me = transport.config.topic_prefix, topic_level(transport.gateway)
        self.own_topic = f"{prefix}/{me}/fleet/desired"
        self.group_topics = {f"{prefix}/fleet/groups/{topic_level(g)}/desired": g for g in self.groups}
        self.cmd_topic = f"{prefix}/{me}/fleet/cmd"
        self.reply_topic = f"{prefix}/{me}/fleet/reply"
        self.reported_topic = f"{prefix}/{me}/fleet/reported"
        # Where an MQTT 5 Response Topic may point: under the gateway's own topics, which its ACL lets
        # it write (docs/fleet.md), and nowhere else.
        self.response_space = f"{prefix}/{me}/fleet/replies/"
        self.state_path = sup.cfg.gateway.data_dir / "fleet.json"
        self.operator_keys = tuple(parse_public(k) for k in sup.cfg.fleet.operator_keys)
        saved = self._load()
        self.revisions: dict[str, int] = saved.get("revisions", {})   # topic -> last accepted revision
        self.desired: dict[str, dict] = saved.get("desired", {})      # topic -> its accepted modules
        self.replies: dict[str, dict] = saved.get("replies", {})      # command id -> its reply (idempotence)
        self.refusals: list[dict] = saved.get("refusals", [])
        self.configs_wanted: dict[str, dict] = saved.get("configs", {})   # topic -> {"yaml": text}
        self._failed: set[tuple[str, int | None, str]] = set()   # (topic, revision, module) that failed
        self._refused_revisions: set[tuple[str, int]] = set()     # retained messages already refused
        self._work: queue.Queue = queue.Queue()
        self._dirty = threading.Event()
        self._reported_at = float("-inf")   # monotonic time of the last report the broker acknowledged
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet", daemon=True)
        transport.listen([self.own_topic, *self.group_topics, self.cmd_topic], self._on_message, self._on_connected)
        sup.deployer.listeners.append(self._on_deploy_change)

    # ---- persistence --------------------------------------------------------------------------

    def _load(self) -> dict:
        try:
            doc = json.loads(self.state_path.read_bytes())
            return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save(self) -> None:
        # Inline bundles stay in memory only: the broker resends the retained message after a restart.
        desired = {t: {n: {k: v for k, v in e.items() if k != "bundle"} for n, e in mods.items()}
                   for t, mods in self.desired.items()}
        doc = {"revisions": self.revisions, "desired": desired, "replies": self.replies, "configs": self.configs_wanted,
               "refusals": self.refusals[-REFUSALS_KEPT:]}
        tmp = self.state_path.with_suffix(".tmp")
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)

    # ---- threads ------------------------------------------------------------------------------

    def start(self) -> None:
        if self.sup.configs is not None:   # set by the time the supervisor starts (cli: use_config_files)
            self.sup.configs.listeners.append(self._on_deploy_change)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._work.put(("stop", None, None, None))
        self._thread.join(5.0)

    def _on_message(self, topic: str, payload: bytes, request: "Request | None" = None) -> None:
        self._work.put(("message", topic, payload, request))   # paho's thread: hand over, never block it

    def _on_deploy_change(self, module: str, what: str, detail: str) -> None:
        self._dirty.set()   # the report says it
        if what != "refused":   # a refusal changes nothing: trying again would refuse again, forever
            self._work.put(("converge", None, None, None))   # a probation's end may allow the next step

    def _on_connected(self) -> None:
        self._failed.clear()   # after a reconnect, what failed may be tried once more (a url may answer now)
        self._dirty.set()
        self._work.put(("converge", None, None, None))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                kind, topic, payload, request = self._work.get(timeout=min(5.0, REPORT_AGAIN_S))
            except queue.Empty:
                kind = "tick"
            try:
                if kind == "stop":
                    return
                if kind == "message":
                    if topic == self.cmd_topic:
                        self._command(payload, request)
                    else:
                        self._desired(topic, payload)
                    self._converge()
                elif kind == "converge":
                    self._converge()
                stale = time.monotonic() - self._reported_at >= REPORT_AGAIN_S
                if (self._dirty.is_set() or stale) and self.transport.connected:
                    self._report()
            except Exception:   # the channel must outlive one bad message
                log.exception("fleet: handling %s failed", kind)

    # ---- desired state ------------------------------------------------------------------------

    def _refuse(self, where: str, reason: str) -> None:
        log.error("fleet: %s refused, nothing changed: %s", where, reason)
        self.refusals.append({"where": where, "reason": reason, "time": time.time()})
        self.refusals = self.refusals[-REFUSALS_KEPT:]
        self._save()
        self._dirty.set()

    def _desired(self, topic: str, payload: bytes) -> None:
        source = "gateway" if topic == self.own_topic else f"group {self.group_topics.get(topic, '?')}"
        if not payload:   # the operator cleared it: that source no longer asks for anything
            if self.desired.pop(topic, None) is not None or self.configs_wanted.pop(topic, None) is not None:
                self._save()
            return
        if len(payload) > MAX_DESIRED_BYTES:
            return self._refuse(f"desired state ({source})", f"{len(payload)} bytes (at most {MAX_DESIRED_BYTES})")
        try:
            doc = json.loads(payload)
            revision, modules, config = doc["revision"], doc.get("modules", {}), doc.get("config")
            if not isinstance(revision, int) or isinstance(revision, bool) or not isinstance(modules, dict) \
                    or not all(isinstance(v, dict) and isinstance(v.get("version"), str) for v in modules.values()):
                raise TypeError("revision must be an integer and modules a map of {version, ...}")
            if config is not None and not (isinstance(config, dict) and isinstance(config.get("yaml"), str)):
                raise TypeError("config must be {\"yaml\": <the whole YAML text>}")
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            return self._refuse(f"desired state ({source})", f"cannot be read: {type(exc).__name__}: {exc}"[:300])
        if self.operator_keys:
            try:
                document_signer(doc, self.operator_keys)
            except ValueError as exc:
                if (topic, revision) in self._refused_revisions:
                    return
                self._refused_revisions.add((topic, revision))
                return self._refuse(f"desired state ({source}) revision {revision}", str(exc))
        if (topic, revision) in self._refused_revisions:
            return   # the same retained message again: refused once, reported once
        last = self.revisions.get(topic)
        if last is not None and revision < last:
            self._refused_revisions.add((topic, revision))
            return self._refuse(f"desired state ({source}) revision {revision}",
                                f"older than revision {last}, already applied (a replay?)")
        if last == revision:
            # The retained copy again (a reconnect, or after a restart): nothing new, but its
            # inline bundles, which are not kept on disk, are in memory again.
            self.desired[topic] = {n: m for n, m in modules.items() if n in self.sup.cfg.modules}
            return
        unknown = sorted(set(modules) - set(self.sup.cfg.modules))
        if unknown and topic == self.own_topic:
            self._refused_revisions.add((topic, revision))
            return self._refuse(f"desired state ({source}) revision {revision}",
                                f"this gateway has no module {', '.join(unknown)}")
        self._failed = {f for f in self._failed if f[0] != topic}
        self.revisions[topic] = revision
        self.desired[topic] = {n: m for n, m in modules.items() if n in self.sup.cfg.modules}
        if config is not None:
            self.configs_wanted[topic] = config
        else:
            self.configs_wanted.pop(topic, None)
        self._save()
        self._dirty.set()
        log.info("fleet: desired state from %s, revision %d: %s", source, revision,
                 ", ".join(f"{n} {m['version']}" for n, m in modules.items()) or "nothing")

    def wanted(self) -> dict[str, tuple[str, dict]]:
        """module -> (source topic, entry): the groups in the order the YAML lists them, then the
        gateway's own desired state, each later one winning per module."""
        merged: dict[str, tuple[str, dict]] = {}
        for topic in [*self.group_topics, self.own_topic]:
            for name, entry in self.desired.get(topic, {}).items():
                merged[name] = (topic, entry)
        return merged

    def _converge_config(self) -> None:
        """The gateway's own config wins over its groups' (the last group listed over the others)."""
        configs = self.sup.configs
        chosen = next((self.configs_wanted[t] for t in [self.own_topic, *reversed(list(self.group_topics))]
                       if t in self.configs_wanted), None)
        if chosen is None or configs is None or configs.on_probation is not None:
            return
        text = chosen["yaml"].encode()
        sha = hashlib.sha256(text).hexdigest()
        if configs.running().get("sha256") == sha or sha in configs.store.rejected() \
                or ("config", None, sha) in self._failed:
            return
        where = f"config {sha[:12]}"
        try:
            configs.apply(text, "fleet")
        except ValueError as exc:
            self._failed.add(("config", None, sha))
            self._refuse(where, str(exc))
        self._dirty.set()

    def _converge(self) -> None:
        self._converge_config()
        deployer = self.sup.deployer
        for name, (topic, entry) in self.wanted().items():
            want = entry["version"]
            now = deployer.describe(name)
            if now["probation_left"] is not None:
                continue   # one change at a time: the next step after this probation ends
            running = now["version"] or "config"
            if want == running:
                continue
            revision = self.revisions.get(topic)
            if (topic, revision, name) in self._failed:
                continue   # refused for this revision already: a new revision (or a reconnect) tries again
            rejected = now["rejected"].get(want)
            where = f"module {name} {want} (revision {revision})"
            if rejected and not entry.get("force"):
                self._failed.add((topic, revision, name))
                self._refuse(where, f"rolled back here before: {rejected.get('reason')}")
                continue
            who = f"fleet revision {revision}"
            try:
                if want == "config":
                    deployer.revert(name, who)
                elif "bundle" in entry or "url" in entry:
                    deployer.deploy(self._fetch(entry), who, module=name, force=bool(entry.get("force")))
                else:
                    deployer.deploy_installed(name, want, who)
            except Exception as exc:   # whatever it was, this module's step failed; the others go on
                self._failed.add((topic, revision, name))
                self._refuse(where, f"{exc}" if isinstance(exc, (DeployRefused, ValueError, OSError))
                             else f"{type(exc).__name__}: {exc}")
            self._dirty.set()

    def _fetch(self, entry: dict) -> bytes:
        if "bundle" in entry:
            try:
                data = base64.b64decode(entry["bundle"], validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise ValueError("its inline bundle is not base64") from None
        else:
            url = str(entry["url"])
            if not url.startswith(("https://", "http://")):
                raise ValueError(f"bundle url {url[:80]!r}: http(s) only")
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
                data = response.read(MAX_BUNDLE_BYTES + 1)
            if len(data) > MAX_BUNDLE_BYTES:
                raise ValueError(f"the bundle at {url} is larger than {MAX_BUNDLE_BYTES >> 20} MiB")
        digest = entry.get("sha256")
        if digest is not None and hashlib.sha256(data).hexdigest() != digest:
            raise ValueError("the bundle's sha256 differs from the desired state's (changed in transit?)")
        return data

    # ---- commands -------------------------------------------------------------------------------

    def _command(self, payload: bytes, request: "Request | None" = None) -> None:
        try:
            doc = json.loads(payload)
            ident, op = str(doc["id"]), str(doc["op"])
        except (ValueError, KeyError, TypeError, RecursionError):
            return self._refuse("command", "cannot be read (it needs an id and an op)")
        if request is not None and not self._answerable(request.response_topic):
            # Anyone who may send commands must not make the gateway publish into other topics
            # (another gateway's desired state, an event stream) under its own name: not run, and
            # the refusal goes to the plain reply topic.
            self._refuse("command", f"{ident}: response topic {request.response_topic!r} is not under "
                                    f"{self.response_space}")
            request = None
            reply = {"ok": False, "id": ident, "error": f"response topic not under {self.response_space}"}
        else:
            reply = self.replies.get(ident)
        if reply is None:   # a command runs once, whatever number of times it arrives
            reply = self._run_command(op, doc)
            reply["id"] = ident
            self.replies[ident] = reply
            while len(self.replies) > COMMANDS_KEPT:
                self.replies.pop(next(iter(self.replies)))
            self._save()
        body = json.dumps(reply, sort_keys=True).encode()
        with contextlib.suppress(Exception):   # not connected: the sender asks again (same id, same reply)
            if request is not None:
                self.transport.answer(request, body)
            else:
                self.transport.publish_retained(self.reply_topic, body)
        self._dirty.set()

    def _answerable(self, topic: str) -> bool:
        rest = topic[len(self.response_space):]
        return topic.startswith(self.response_space) and bool(rest) and not any(c in topic for c in "+#\0")

    def _run_command(self, op: str, doc: dict) -> dict:
        # Versions change through desired states only (a command could not outlast them).
        if op == "report":
            return {"ok": True, "result": "reported"}
        return {"ok": False, "error": f"unknown op {op!r} (report; versions change through desired states)"}

    # ---- reported state -------------------------------------------------------------------------

    def report_doc(self) -> dict:
        modules = {}
        for name in self.sup.cfg.modules:
            now = self.sup.deployer.describe(name)
            host = self.sup.modules.get(name)
            modules[name] = {"version": now["version"] or "config", "origin": now["origin"], "signer": now["signer"],
                             "probation_left": now["probation_left"], "rejected": sorted(now["rejected"]),
                             "state": host.state.value if host else "absent",
                             "last_fault": host.last_fault if host else ""}
        config = self.sup.configs.running() if self.sup.configs is not None else {}
        if self.sup.configs is not None and self.sup.configs.on_probation is not None:
            config["on_probation"] = self.sup.configs.on_probation["sha256"]
        return {"gateway": self.transport.gateway, "groups": self.groups, "time": time.time(), "config": config,
                "revisions": {("gateway" if t == self.own_topic else self.group_topics.get(t, t)): r
                              for t, r in self.revisions.items()},
                "modules": modules, "last_rollback": self.sup.deployer.last_rollback,
                "refusals": self.refusals[-5:], "health": self.sup.health_summary()}

    def _report(self) -> None:
        self._dirty.clear()
        try:
            self.transport.publish_retained(self.reported_topic,
                                            json.dumps(self.report_doc(), sort_keys=True, default=str).encode())
            self._reported_at = time.monotonic()
        except Exception as exc:   # not connected: the next connection reports
            self._dirty.set()
            log.debug("fleet: report not sent: %s", exc)
