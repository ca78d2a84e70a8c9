"""`make fleet-demo`: 20 gateway processes on a 3-node NATS cluster, a staged rollout of a signed
bundle, a bad bundle halted at its canary, and the table of both (docs/fleet.md).

Each gateway is `appliance run` with a light config: one replay source (a recording looped in
real time), the `versioned` test module, the uplink on one of the three nodes (the others as
`also`), the fleet channel on, group `line1`. Events flow all along; at the end every gateway's
spool must be empty and every event it committed must have reached the broker.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from appliance.deploy.bundle import make_bundle, sign_bundle
from appliance.deploy.keys import load_private, new_pair
from appliance_tools.fleet.cluster import NatsCluster
from appliance_tools.fleet.operator import FleetOperator, rollout
from appliance_tools.fleet.rig import REPO, EventTap, build_version

GROUP = "line1"


def gateway_config(work: Path, index: int, cluster: NatsCluster, wasm: Path, recording: Path, public: str) -> Path:
    name = f"gw{index:02d}"
    endpoints = cluster.mqtt_endpoints
    home = endpoints[index % len(endpoints)]
    host, _, port = home.rpartition(":")
    doc = {"gateway": {"name": name, "data_dir": str(work / name)}, "metrics": {"enabled": False},
           "deploy": {"trusted_keys": [public], "probation_windows": 20},
           "fleet": {"enabled": True, "groups": [GROUP]},
           "uplink": {"transport": "mqtt", "mqtt": {"host": host, "port": int(port), "keepalive_s": 5,
                                                     "also": [e for e in endpoints if e != home]}},
           "sources": {"line": {"type": "replay", "realtime": True, "loop": True, "block_frames": 512,
                                "segments": [{"path": str(recording), "sample_rate": 12800}]}},
           "modules": {"versioned": {"wasm": str(wasm), "source": "line", "window": {"size": 1024},
                                     "params": {"event_every": 50}}}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gateways", type=int, default=20)
    p.add_argument("--canary", type=int, default=2)
    p.add_argument("--batch", type=float, default=25.0)
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--kill-node", action="store_true", help="kill broker node n1 once the first canary is judged")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fleet-demo-"))
    procs: list[subprocess.Popen] = []
    cluster = NatsCluster(work / "nats").start()
    tap = EventTap(cluster.mqtt_endpoints[1])
    try:
        private, public = new_pair("demo", work / "keys")
        key = load_private(private)
        wasm = {v: build_version(work, v, b, t) for v, b, t in (("1.0.0", 1, 0), ("1.1.0", 2, 0), ("1.2.0", 3, 5))}
        bundles = {}
        for v in ("1.1.0", "1.2.0"):
            bundles[v] = make_bundle(wasm[v], work / f"versioned-{v}.apb")
            sign_bundle(bundles[v], key)
        recording = work / "line.npy"
        t = np.arange(12800 * 4) / 12800
        np.save(recording, (0.5 * np.sin(2 * np.pi * 50 * t)[:, None] * [1, 0.8, 0.6]).astype(np.float32))
        line = public.read_text().strip()
        log_dir = work / "logs"
        log_dir.mkdir()
        for i in range(args.gateways):
            config = gateway_config(work, i, cluster, wasm["1.0.0"], recording, line)
            with open(log_dir / f"gw{i:02d}.log", "w") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(config)],
                                              stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True))
        op = FleetOperator(cluster.mqtt_endpoints, client_id="demo-operator")
        end = time.monotonic() + 120
        while len(op.gateways(GROUP, settle_s=1)) < args.gateways and time.monotonic() < end:
            pass
        print(f"fleet demo: {len(op.gateways(GROUP, settle_s=0))} gateways on a 3-node NATS cluster "
              f"({', '.join(cluster.mqtt_endpoints)}), work {work}", flush=True)
        def progress(line: str) -> None:
            print(line, flush=True)
            if args.kill_node and line.startswith("  canary:") and cluster.nodes[0].proc is not None:
                cluster.kill(cluster.nodes[0])   # a third of the gateways were on it
                print(f"  (broker node {cluster.nodes[0].name} killed)", flush=True)

        good = rollout(op, bundles["1.1.0"], GROUP, canary=args.canary, batch_pct=args.batch, max_failures=1,
                       timeout_s=args.timeout, progress=progress)
        print("\n" + good.table() + "\n", flush=True)
        t0 = time.monotonic()
        bad = rollout(op, bundles["1.2.0"], GROUP, canary=args.canary, batch_pct=args.batch, max_failures=0,
                      timeout_s=args.timeout, progress=lambda s: print(s, flush=True))
        print("\n" + bad.table() + "\n", flush=True)
        rolled = [o.seconds for o in bad.outcomes if o.result == "rolled_back"]
        op.close()
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(2)
        from appliance.events.spool import Spool
        committed = received = lost = 0
        for i in range(args.gateways):
            name = f"gw{i:02d}"
            ids = set(re.findall(r"EVENT .*\[id ([0-9a-f-]+)\]$", (log_dir / f"{name}.log").read_text(), re.M))
            spool = Spool(work / name / "spool.db", 64 << 20)
            waiting = {e["id"] for e, _ in spool.pending(100_000)}
            spool.close()
            got = tap.received(name)
            committed += len(ids)
            received += len(ids & got)
            lost += len(ids - got - waiting)
        print(f"rollout of 1.1.0 to {args.gateways} gateways: {'HALTED' if good.halted else 'complete'} in "
              f"{good.seconds:.1f} s; bad canary 1.2.0: rolled back within {max(rolled, default=float('nan')):.1f} s "
              f"of its desired state, rollout {'halted' if bad.halted else 'NOT halted'} in {time.monotonic() - t0:.1f} s; "
              f"events: {committed} committed, {received} received upstream, {lost} lost")
        return 0 if not good.halted and bad.halted and rolled and not lost else 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        tap.close()
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
