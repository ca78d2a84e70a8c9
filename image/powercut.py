#!/usr/bin/env python3
"""`make image-powercut N=...`: pull the plug on the image under QEMU, N times, and lose nothing.

The guest runs a lean gateway: the Modbus line, which the host drives across a rule's limit so
that events come fast (about 20 a second), and an MQTT uplink that points at a host port where,
for now, nothing listens, so they pile up in the spool. Each event's `EVENT ... [id ...]` line
reaches the kernel console (journald forwards to it in rig mode) only after its commit, and the
host records that console in a file. Then, at a random moment, the host kills QEMU with SIGKILL.

The card is attached with cache=writethrough: a write the guest was told is done is in the host's
file, and nothing else is, so a killed QEMU leaves what a pulled plug leaves (the guest's page
cache is gone with its memory). After each pull the host checks a copy of the data partition
(e2fsck, then SQLite's integrity_check of the spool), boots the card again with Mosquitto on that
port, waits for every event the console had reported as committed, and blocks the uplink again.

--durability off sets the spool's debug setting (refused outside the rig) that leaves commits in
the page cache: the same drill must then report lost events, or the drill itself is broken, and
it exits 1 if it does not (--expect-loss).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qemu_test as rig  # noqa: E402
from qemu_test import CheckFailed, NotYet, wait_until  # noqa: E402

REPO = rig.REPO
EVENT_LINE = re.compile(r"EVENT \w+ line_plc/plc_rules [^\n]*\[id ([0-9a-f-]{36})\]")
HIGH, LOW = 1250, 250        # 125.0 and 25.0 degC: over and under the rule's max of 110, alternately


def say(msg: str) -> None:
    print(f"[powercut {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def guest_config(mqtt_port: int, durability: str) -> dict:
    return {
        "gateway": {"name": rig.GATEWAY, "data_dir": "/data/appliance"},
        "metrics": {"listen": "0.0.0.0", "port": 9108},
        "runtime": {"zygote": "/run/appliance-zygote/zygote.sock"},
        # Every crossing is an event, on purpose: far beyond the default per-module rate limit.
        "events": {"module_rate_per_min": 60_000, "module_burst": 10_000, "spool_durability": durability},
        "uplink": {"transport": "mqtt", "backoff_s": 0.2, "backoff_max_s": 1.0,
                   "mqtt": {"host": "10.0.2.2", "port": mqtt_port, "topic_prefix": "factory"}},
        "sources": {
            "line_plc": {"type": "modbus_rtu", "device": "/dev/ttyS1", "baudrate": 115200, "poll_s": 0.05,
                         "points": [{"name": "oil_temp", "slave": 1, "address": 0, "data_type": "int16",
                                     "scale": 0.1, "unit": "degC"}]},
        },
        "modules": {
            "plc_rules": {"wasm": "/opt/appliance/modules/process.wasm", "source": "line_plc",
                          "channels": ["oil_temp"], "window": {"size": 16, "hop": 1}, "deadline_ms": 5000,
                          "params": {"signal.0": {"name": "oil_temp", "min": -20, "max": 110},
                                     "clear_samples": 1}},
        },
    }


class Guest:
    """One boot of the card: QEMU, its QMP socket and the Modbus peer on its second UART. Every
    boot appends to the same console log; this boot's part starts at log_offset."""

    def __init__(self, overlay: Path, work: Path, console_log: Path) -> None:
        self.metrics_port = rig.free_port()
        self.console_log = console_log
        self.log_offset = console_log.stat().st_size if console_log.exists() else 0
        self.qmp = self.modbus = None
        self.polls = 0
        # While events are delivered the line holds still: new alarms would be sent first (the
        # spool sends the most severe first) and older events would wait behind them for good.
        self.swing = True
        self._closed = False
        self._qemu_out = open(work / "qemu.out", "ab")
        self.qemu = subprocess.Popen(rig.virt_command(overlay, work, console_log, self.metrics_port,
                                                      cache="writethrough", append_log=True),
                                     stdout=self._qemu_out, stderr=subprocess.STDOUT)
        try:
            self.qmp = wait_until("QEMU's QMP socket", 30, lambda: rig.Qmp(work / "qmp.sock"), 0.2)
            pty = next(c["filename"] for c in self.qmp.command("query-chardev") if c["label"] == "plc")

            def oil_temp() -> int:   # the host drives the line: over the limit, back under, over...
                self.polls += 1
                return HIGH if self.swing and self.polls % 2 else LOW
            self.modbus = rig.ModbusSlave(pty.removeprefix("pty:"), oil_temp=oil_temp)
        except BaseException:
            self.close()
            raise

    def text(self) -> str:
        with open(self.console_log, "rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace")

    def committed(self) -> list[str]:
        return EVENT_LINE.findall(self.text())

    def alive(self) -> None:
        if self.qemu.poll() is not None:
            raise CheckFailed(f"QEMU exited with {self.qemu.returncode}")

    def up(self, timeout_s: float) -> None:
        def metrics():
            self.alive()
            return rig.metrics_text(self.metrics_port)
        wait_until("the appliance's /metrics", timeout_s, metrics, 2)

    def pull_the_plug(self) -> None:
        self.qemu.send_signal(signal.SIGKILL)
        self.qemu.wait()
        self.close()

    def power_off(self) -> None:
        self.qmp.command("system_powerdown")
        try:
            self.qemu.wait(120)
        except subprocess.TimeoutExpired:
            raise CheckFailed("the guest did not power off within 120 s of the power button") from None
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for thing in (self.qmp, self.modbus):
            try:
                if thing is not None:
                    thing.close()
            except Exception:   # noqa: BLE001 - the guest may be gone already
                pass
        if self.qemu.poll() is None:
            self.qemu.kill()
            self.qemu.wait()
        self._qemu_out.close()


def check_data_partition(overlay: Path, image: Path, work: Path) -> dict:
    """A copy of the data partition as the pull left it: e2fsck (after its journal replay, any
    repair is an error) and PRAGMA integrity_check of the spool."""
    data = rig.partitions(image)[2]
    offset = data["start"] * 512
    size = rig.OVERLAY_BYTES - offset          # grown to the end of the card at first boot
    copy = work / "data-after-pull.ext4"
    copy.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "convert", "-O", "raw", "--image-opts",
                    f"driver=raw,offset={offset},size={size},file.driver=qcow2,file.file.driver=file,"
                    f"file.file.filename={overlay}", str(copy)], check=True)
    replay = subprocess.run(["e2fsck", "-y", "-E", "journal_only", str(copy)], capture_output=True, text=True)
    check = subprocess.run(["e2fsck", "-fn", str(copy)], capture_output=True, text=True)
    result = {"fsck_exit": check.returncode, "journal_replay_exit": replay.returncode}
    if check.returncode != 0:
        result["fsck"] = (check.stdout + check.stderr)[-2000:]
    spool = work / "spool-after-pull"
    shutil.rmtree(spool, ignore_errors=True)
    spool.mkdir()
    for name in ("spool.db", "spool.db-wal"):
        subprocess.run(["debugfs", "-R", f"dump /appliance/{name} {spool / name}", str(copy)],
                       capture_output=True, check=False)
    if (spool / "spool.db").exists():
        db = sqlite3.connect(spool / "spool.db")
        try:
            result["integrity"] = "; ".join(r[0] for r in db.execute("PRAGMA integrity_check").fetchall())
            result["spooled"] = db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            result["integrity"] = f"unreadable: {exc}"
        finally:
            db.close()
    else:
        result["integrity"] = "no spool.db on the data partition"
    copy.unlink()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pulls", type=int, default=3)
    p.add_argument("--durability", choices=["full", "off"], default="full")
    p.add_argument("--expect-loss", action="store_true", help="pass only if events are lost (the drill's own proof)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--image", type=Path, default=None)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    image = args.image or next(iter(sorted((REPO / "build" / "image").glob("appliance-*-arm64.img"))), None)
    if image is None or not image.exists():
        sys.exit("powercut: no image; `make image` builds it")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="powercut-"))
    console_log = work / "guest-console.log"
    mqtt_port = rig.free_port()
    config = guest_config(mqtt_port, args.durability)
    rig.check_config_here(config, work)
    overlay = rig.prepare_overlay(image, work, config)
    say(f"{args.pulls} pull(s), durability {args.durability}, seed {seed}, work {work}")
    committed: dict[str, int] = {}        # event id -> the pull it was reported in
    received: set[str] = set()
    pulls: list[dict] = []
    problems: list[str] = []
    broker = guest = None
    started = time.monotonic()
    ok = False
    try:
        guest = Guest(overlay, work, console_log)
        guest.up(420)
        for pull in range(1, args.pulls + 1):
            # The uplink is blocked (no broker on its port): events pile up in the spool.
            target = len(guest.committed()) + rng.randint(40, 160)
            wait_until(f"pull {pull}: events committed in the guest", 180,
                       lambda: (guest.alive(), len(guest.committed()) >= target)[1], 0.2)
            time.sleep(rng.uniform(0.0, 2.0))
            guest.pull_the_plug()
            for event_id in EVENT_LINE.findall(console_log.read_text(errors="replace")):
                committed.setdefault(event_id, pull)
            disk = check_data_partition(overlay, image, work)
            row = {"pull": pull, "committed_so_far": len(committed), **disk}
            say(f"pull {pull}: killed; {len(committed)} events reported committed so far; "
                f"fsck exit {disk['fsck_exit']}, integrity {disk['integrity']}, {disk.get('spooled')} in the spool")
            if disk["fsck_exit"] != 0:
                problems.append(f"pull {pull}: e2fsck found errors:\n{disk.get('fsck')}")
            if disk["integrity"] != "ok":
                problems.append(f"pull {pull}: spool integrity: {disk['integrity']}")
            # Power back on with the uplink open: everything committed must arrive.
            broker = rig.Broker(work, port=mqtt_port)
            t0 = time.monotonic()
            guest = Guest(overlay, work, console_log)
            guest.swing = False
            guest.up(420)
            row["boot_to_metrics_s"] = round(time.monotonic() - t0, 1)

            def delivered():
                guest.alive()
                received.update(e["id"] for e in broker.events())
                missing = set(committed) - received
                if missing:
                    raise NotYet(f"{len(missing)} committed events not yet upstream")
                return True
            try:
                # Lost events never come: when losses are expected, what survived arrives in seconds.
                wait_until(f"pull {pull}: every committed event upstream", 90 if args.expect_loss else 240, delivered, 1)
            except CheckFailed as exc:
                if args.durability == "full":
                    problems.append(str(exc))
            damaged = [e for e in broker.events() if e.get("kind") == "spool_damaged"]
            if damaged:
                problems.append(f"pull {pull}: the guest found its spool damaged: {damaged[0]['message']}")
            row["lost_so_far"] = len(set(committed) - received)
            say(f"pull {pull}: power back on in {row['boot_to_metrics_s']} s; {len(received & set(committed))} of "
                f"{len(committed)} committed events upstream, {row['lost_so_far']} missing")
            pulls.append(row)
            broker.close()           # blocked again for the next pull
            broker = None
            guest.swing = True
        guest.power_off()
        guest = None
        lost = sorted(set(committed) - received)
        summary = {"pulls": args.pulls, "durability": args.durability, "seed": seed,
                   "committed": len(committed), "received": len(received & set(committed)), "lost": len(lost),
                   "integrity_errors": sum(1 for r in pulls if r["integrity"] != "ok"),
                   "fsck_errors": sum(1 for r in pulls if r["fsck_exit"] != 0),
                   "boot_to_metrics_s": [r["boot_to_metrics_s"] for r in pulls],
                   "total_s": round(time.monotonic() - started, 1)}
        say("summary " + json.dumps(summary))
        out = REPO / "build" / "image" / f"powercut-{args.durability}.json"
        out.write_text(json.dumps({"summary": summary, "pulls": pulls, "lost_ids": lost}, indent=2) + "\n")
        if args.expect_loss:
            ok = bool(lost)
            say(f"durability {args.durability}: {len(lost)} of {len(committed)} committed events lost: "
                + ("the drill sees losses, as it must" if ok else "NO LOSS SEEN: the drill cannot tell"))
        else:
            if lost:
                problems.append(f"{len(lost)} of {len(committed)} committed events never arrived: {lost[:5]}")
            ok = not problems
    except CheckFailed as exc:
        problems.append(str(exc))
    except Exception as exc:   # noqa: BLE001 - a tool failing (qemu-img, e2fsck) is a failed drill, said
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        if guest is not None:
            guest.close()
        if broker is not None:
            broker.close()
    for problem in problems:
        print(f"powercut: {problem}", file=sys.stderr)
    if not ok:
        text = console_log.read_text(errors="replace") if console_log.exists() else "(no console log)"
        print("---- guest console (last boot) ----\n" + text[-20000:] + "\n----", file=sys.stderr)
        print(f"(work directory kept: {work})", file=sys.stderr)
    elif not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    say("PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
