"""What the fleet tests and `make fleet-demo` share: releases of the `versioned` test module, and
a tap that counts the events gateways deliver to the broker."""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from appliance_tools.modbuild import build_module

REPO = Path(__file__).resolve().parents[3]
VERSIONED = REPO / "tests" / "hostile_modules" / "versioned"


def build_version(work: Path, version: str, build: int, trap_after: int = 0) -> Path:
    """The versioned test module as release `version` (its BUILD feature says which runs);
    trap_after > 0: a release that traps on real data after that many windows."""
    src = work / f"src-{version}"
    shutil.copytree(VERSIONED, src)
    (src / "module.yaml").write_text((src / "module.yaml").read_text().replace("version: 1.0.0", f"version: {version}"))
    code = (src / "versioned.c").read_text().replace("#define BUILD 1", f"#define BUILD {build}")
    (src / "versioned.c").write_text(code.replace("#define TRAP_AFTER 0", f"#define TRAP_AFTER {trap_after}"))
    result = build_module(src, work / f"v{version}" / "versioned.wasm")
    if not result.ok:
        raise ValueError(f"building versioned {version}: {'; '.join(result.problems)}")
    return result.out


class EventTap:
    """Every event the gateways deliver, by gateway and id (a duplicate is allowed, a loss is not)."""

    def __init__(self, endpoint: str, prefix: str = "factory") -> None:
        self.ids: dict[str, set[str]] = {}
        self.lock = threading.Lock()
        host, _, port = endpoint.rpartition(":")
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"tap-{time.time_ns()}", clean_session=False,
                                  protocol=mqtt.MQTTv311)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{prefix}/+/events/+", qos=1)
        self.client.connect(host, int(port))
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        doc = json.loads(message.payload)
        with self.lock:
            self.ids.setdefault(doc["gateway"], set()).add(doc["id"])

    def received(self, gateway: str) -> set[str]:
        with self.lock:
            return set(self.ids.get(gateway, ()))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
