#!/usr/bin/env python3
"""`make image-test`: boot the SD-card image under QEMU and check the whole appliance from outside.

The guest is the arm64 `virt` machine (cortex-a72, 2 CPUs, TCG): U-Boot from Debian's u-boot-qemu
reads the card's FAT partition (extlinux.conf) and boots the kernel and initrd from it; the root
is found by its label. The card is a virtio disk (Debian's U-Boot for QEMU has no SD host
driver). The image itself is never written: the guest runs on a copy-on-write qcow2 overlay, larger than the image so the first boot
grows the data partition. Into the overlay's FAT partition the rig writes its own appliance.yaml
(what a plant engineer does with a PC) and `appliance.testrig` on the kernel command line, which
makes the image load i2c-stub (preset as an ADXL345) and vivid (a V4L2 camera).

Host side, all real: a Mosquitto broker on 127.0.0.1 (the guest reaches it at 10.0.2.2 through
QEMU's user network), a pymodbus RTU server on the guest's second PCI UART (a host pty), the
service console on the first PCI UART (a host unix socket), /metrics through a port forward bound
to 127.0.0.1. Each check has a timeout; any failure prints the guest's console log and exits 1.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from appliance.config.console import hash_password  # noqa: E402

IMAGE_DIR = Path(__file__).resolve().parent
REPO = IMAGE_DIR.parent
UBOOT = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")
GATEWAY = "qemu-gw"
OIL_TEMP_RAW = 1250          # 125.0 degC from the host's Modbus slave: above the rule's max of 110
OVERLAY_BYTES = 4 << 30      # a 4 GiB card (the SD card model wants a power of two)


class CheckFailed(Exception):
    pass


class NotYet(Exception):
    """A probe's "not yet", with what it saw (reported if the wait times out)."""


def say(msg: str) -> None:
    print(f"[image-test {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, timeout_s: float, probe, interval_s: float = 1.0):
    """probe() -> a true value when done; its last exception or value explains a timeout."""
    end = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < end:
        try:
            got = probe()
            if got:
                return got
            last = got
        except CheckFailed:
            raise
        except Exception as exc:   # noqa: BLE001 - a probe may fail many ways until the guest is up
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(interval_s)
    raise CheckFailed(f"{what}: not within {timeout_s:.0f} s (last: {last})")


# ---------------------------------------------------------------------------------- the card

def partitions(image: Path) -> list[dict]:
    out = subprocess.run(["sfdisk", "--json", str(image)], check=True, capture_output=True, text=True).stdout
    return json.loads(out)["partitiontable"]["partitions"]


RIG_PASSWORD = "rig-console-password"
# pbkdf2 with few iterations: the rig's login must not cost seconds under TCG.
RIG_PASSWORD_HASH = hash_password(RIG_PASSWORD, "pbkdf2_sha256", iterations=1000)


def guest_config(mqtt_port: int) -> dict:
    """What the plant engineer would write for this machine: real drivers on the rig's devices."""
    return {
        "gateway": {"name": GATEWAY, "data_dir": "/data/appliance"},
        "metrics": {"listen": "0.0.0.0", "port": 9108},
        "runtime": {"zygote": "/run/appliance-zygote/zygote.sock"},
        "console": {"device": "/dev/ttyS0", "password_hash": RIG_PASSWORD_HASH},
        "uplink": {"transport": "mqtt", "health_interval_s": 10,
                   "mqtt": {"host": "10.0.2.2", "port": mqtt_port, "topic_prefix": "factory"}},
        "sources": {
            "gearbox": {"type": "i2c_accel", "chip": "adxl345", "bus": 0, "address": 0x53, "sample_rate": 100,
                        "range_g": 16},
            "dock_camera": {"type": "camera", "url": "/dev/video0", "fourcc": "YUYV", "width": 320, "height": 240,
                            "fps": 5, "resize": [160, 120], "gray": True},
            "line_plc": {"type": "modbus_rtu", "device": "/dev/ttyS1", "baudrate": 115200, "poll_s": 0.5,
                         "points": [{"name": "oil_temp", "slave": 1, "address": 0, "data_type": "int16",
                                     "scale": 0.1, "unit": "degC"}]},
        },
        "modules": {
            "gearbox_stats": {"wasm": "/opt/appliance/modules/vibstats.wasm", "source": "gearbox",
                              "window": {"size": 64}, "deadline_ms": 5000,
                              "params": {"baseline": {"windows": 10}, "threshold": 6}},
            "dock_motion": {"wasm": "/opt/appliance/modules/motion.wasm", "source": "dock_camera",
                            "deadline_ms": 5000},
            "plc_rules": {"wasm": "/opt/appliance/modules/process.wasm", "source": "line_plc",
                          "channels": ["oil_temp"], "window": {"size": 16, "hop": 1}, "deadline_ms": 5000,
                          "params": {"signal.0": {"name": "oil_temp", "min": -20, "max": 110}}},
        },
    }


def check_config_here(config: dict, work: Path) -> None:
    """Validate the rig's YAML on the host first (module paths pointed at modules/build): a
    mistake here should cost a second, not a boot."""
    from appliance.config.schema import ConfigError, load_config
    local = json.loads(json.dumps(config))
    for module in local["modules"].values():
        module["wasm"] = str(REPO / "modules" / "build" / Path(module["wasm"]).name)
    path = work / "appliance-host-check.yaml"
    path.write_text(yaml.safe_dump(local, sort_keys=False))
    try:
        load_config(path)
    except ConfigError as exc:
        raise CheckFailed(f"the rig's own appliance.yaml is invalid:\n{exc}") from None


def prepare_overlay(image: Path, work: Path, config: dict) -> Path:
    """A qcow2 overlay on the image, with the rig's YAML and kernel argument in its FAT partition
    (written through qemu-io: the image file itself stays as built)."""
    overlay = work / "card.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.resolve()),
                    str(overlay), str(OVERLAY_BYTES)], check=True)
    write_card(overlay, image, work, config)
    return overlay


def write_card(overlay: Path, image: Path, work: Path, config: dict) -> None:
    """Put a YAML and the rig's kernel arguments on the overlay's FAT partition, as a plant
    engineer would edit the card in a PC."""
    boot = partitions(image)[0]
    offset, size = boot["start"] * 512, boot["size"] * 512
    fat = work / "boot.vfat"
    subprocess.run(["qemu-img", "convert", "-O", "raw", "--image-opts",
                    f"driver=raw,offset={offset},size={size},file.driver=qcow2,file.file.driver=file,"
                    f"file.file.filename={overlay}", str(fat)], check=True)
    (work / "appliance.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    subprocess.run(["mcopy", "-o", "-i", str(fat), str(work / "appliance.yaml"), "::/appliance.yaml"], check=True)
    ext = subprocess.run(["mtype", "-i", str(fat), "::/extlinux/extlinux.conf"], check=True, capture_output=True,
                         text=True).stdout
    if "appliance.testrig" not in ext:
        # Under emulation (raspi3b above all) udev's coldplug takes minutes: devices get 15 of them.
        ext = re.sub(r"^(\s*append .*)$", r"\1 appliance.testrig systemd.journald.forward_to_console=1 "
                     r"systemd.default_device_timeout_sec=900", ext, count=1, flags=re.M)
        (work / "extlinux.conf").write_text(ext)
        subprocess.run(["mcopy", "-o", "-i", str(fat), str(work / "extlinux.conf"), "::/extlinux/extlinux.conf"],
                       check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {fat} {offset} {size}", str(overlay)], check=True,
                   stdout=subprocess.DEVNULL)
    fat.unlink()


# ---------------------------------------------------------------------------------- host peers

class Broker:
    """mosquitto on 127.0.0.1 and a subscriber that keeps what the gateway publishes."""

    def __init__(self, work: Path, port: int | None = None) -> None:
        import paho.mqtt.client as mqtt
        self.port = port or free_port()
        conf = work / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.messages: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="image-test")
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe("factory/#", qos=1)
        wait_until("mosquitto to listen", 10, lambda: socket.create_connection(("127.0.0.1", self.port), 1).close()
                   or True, 0.1)
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()

    def events(self) -> list[dict]:
        out = []
        for topic, payload in list(self.messages):
            if re.fullmatch(rf"factory/{GATEWAY}/events/[^/]+", topic):
                out.append(json.loads(payload))
        return out

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
        self.proc.terminate()
        self.proc.wait(10)


class ModbusSlave:
    """A pymodbus RTU server on the host end of the guest's second UART."""

    def __init__(self, port: str, oil_temp=None) -> None:
        """oil_temp: a function giving the raw register for each answer (the host drives the
        line: the power-cut drill swings it across the rule's limit); default a constant."""
        from pymodbus.server import ModbusSerialServer
        from pymodbus.simulator import DataType, SimData, SimDevice
        regs = SimData(0, values=[OIL_TEMP_RAW, 0], datatype=DataType.REGISTERS)
        empty_bits = SimData(0, values=[False] * 16, datatype=DataType.BITS)
        device = SimDevice(id=1, simdata=([empty_bits], [empty_bits], [regs], [SimData(0, values=[0],
                                                                                   datatype=DataType.REGISTERS)]))
        self.served = 0

        def trace(sending: bool, pdu):
            if not sending:
                self.served += 1
            elif oil_temp is not None and getattr(pdu, "registers", None):
                pdu.registers[0] = oil_temp()
            return pdu

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start():
            self.server = ModbusSerialServer([device], port=port, baudrate=115200, trace_pdu=trace)
            await self.server.serve_forever(background=True)

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


class Qmp:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.reader = self.sock.makefile("rb")
        json.loads(self.reader.readline())            # greeting
        self.command("qmp_capabilities")

    def command(self, name: str, **arguments) -> object:
        self.sock.sendall(json.dumps({"execute": name, "arguments": arguments}).encode())
        while True:
            reply = json.loads(self.reader.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error']}")

    def close(self) -> None:
        self.sock.close()


class SerialConsole:
    """The appliance console on the guest's first PCI UART, through QEMU's unix socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(0.5)
        self.buffer = b""

    def read_for(self, seconds: float) -> str:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data = self.sock.recv(4096)
                if not data:
                    raise CheckFailed("console socket closed")
                self.buffer += data
            except socket.timeout:
                pass
        return self.buffer.decode("ascii", "replace")

    def wait_ready(self, timeout_s: float, prompt: str) -> None:
        """Press Enter until a prompt comes back: what is sent before the guest's console has
        opened its port is lost, so a command typed too early would never be answered."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            self.buffer = b""
            self.sock.sendall(b"\r")
            if prompt in self.read_for(2.0):
                return
        raise CheckFailed(f"console: no prompt within {timeout_s:.0f} s; got:\n{self.buffer.decode(errors='replace')}")

    def command(self, line: str, expect: str, timeout_s: float = 30, prompt: str = f"{GATEWAY}> ") -> str:
        """Type a line; the text up to the next prompt, once it contains `expect`."""
        self.buffer = b""
        self.sock.sendall(line.encode() + b"\r")
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            text = self.read_for(0.5)
            if expect in text and text.rstrip().endswith(prompt.rstrip()):
                return text
        raise CheckFailed(f"console: {line!r} did not answer with {expect!r}; got:\n{self.buffer.decode(errors='replace')}")

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------------------- the run

class FirstSeen:
    """When a pattern first shows in a growing log file (seconds from now), watched in a thread."""

    def __init__(self, path: Path, pattern: str) -> None:
        self.seconds: float | None = None
        started = time.monotonic()

        def watch() -> None:
            while self.seconds is None:
                if path.exists() and re.search(pattern, path.read_text(errors="replace")):
                    self.seconds = round(time.monotonic() - started, 1)
                time.sleep(0.5)
        threading.Thread(target=watch, daemon=True).start()


def metrics_text(port: int) -> str:
    # A loaded host can make an emulated guest slow to answer: a probe's timeout is not a failure.
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of the first sample of `name` whose labels include `labels`."""
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)", line)
        if m is None or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(4))
    return None


def virt_command(overlay: Path, work: Path, console_log: Path, metrics_port: int, cache: str = "writeback",
                 append_log: bool = False) -> list[str]:
    """QEMU's virt machine with the card, the kernel console to a file, the appliance console on
    the first PCI UART (a unix socket), the Modbus line on the second (a pty), /metrics forwarded.
    cache: how the card's writes reach the host (the power-cut drill uses writethrough, so that a
    killed QEMU leaves exactly what the guest was told was written)."""
    # acpi=off: U-Boot boots the kernel with a device tree, and only then does QEMU put the
    # power button (gpio-keys on a PL061) in it; with ACPI on it would be an ACPI event.
    return ["qemu-system-aarch64", "-M", "virt,acpi=off", "-cpu", "cortex-a72", "-smp", "2", "-m", "1024",
            "-accel", "tcg,thread=multi", "-bios", str(UBOOT), "-display", "none", "-monitor", "none",
            "-chardev", f"file,id=log,path={console_log}{',append=on' if append_log else ''}", "-serial", "chardev:log",
            "-drive", f"if=none,id=card,file={overlay},format=qcow2,cache={cache}",
            "-device", "virtio-blk-pci,drive=card",
            "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{metrics_port}-:9108",
            "-device", "virtio-net-pci,netdev=net0,romfile=", "-device", "virtio-rng-pci",
            "-chardev", f"socket,id=con,path={work / 'console.sock'},server=on,wait=off",
            "-chardev", "pty,id=plc",
            "-device", "pci-serial-2x,chardev1=con,chardev2=plc",
            "-qmp", f"unix:{work / 'qmp.sock'},server=on,wait=off"]


def main() -> int:
    # pi_boot uses this module's helpers: run as a script, this module is __main__, and pi_boot
    # must get the same one (its CheckFailed is the one caught below).
    sys.modules.setdefault("qemu_test", sys.modules[__name__])
    import pi_boot
    p = argparse.ArgumentParser(description="boot the image under QEMU and test the appliance in it")
    p.add_argument("--image", type=Path, default=None, help="the raw image (default: the one in build/image)")
    p.add_argument("--timeout", type=float, default=420, help="boot-to-ready limit in seconds")
    p.add_argument("--keep", action="store_true", help="keep the work directory (overlay, logs)")
    args = p.parse_args()
    image = args.image or next(iter(sorted((REPO / "build" / "image").glob("appliance-*-arm64.img"))), None)
    if image is None or not image.exists():
        sys.exit("image-test: no image; `make image` builds it")
    if not UBOOT.exists():
        sys.exit(f"image-test: {UBOOT} missing (package u-boot-qemu)")
    work = Path(tempfile.mkdtemp(prefix="image-test-"))
    console_log = work / "guest-console.log"
    qemu = broker = modbus = qmp = con = None
    results: dict[str, object] = {}
    started = time.monotonic()
    ok = False
    try:
        broker = Broker(work)
        check_config_here(guest_config(broker.port), work)
        overlay = prepare_overlay(image, work, guest_config(broker.port))
        metrics_port = free_port()
        cmd = virt_command(overlay, work, console_log, metrics_port)
        results["pi_boot_files"] = pi_boot.static_check(image, work)["boards"]
        say(f"booting {image.name} (work dir {work})")
        qemu = subprocess.Popen(cmd, stdout=open(work / "qemu.out", "wb"), stderr=subprocess.STDOUT)
        # The console prompt: the appliance console logs this line as it shows its banner.
        login_prompt = FirstSeen(console_log, r"console on /dev/tty\w+ at 115200 8N1")
        qmp = wait_until("QEMU's QMP socket", 30, lambda: Qmp(work / "qmp.sock"), 0.2)
        pty = next(c["filename"] for c in qmp.command("query-chardev") if c["label"] == "plc")
        modbus = ModbusSlave(pty.removeprefix("pty:"))
        say(f"Modbus slave on {pty}, broker on 127.0.0.1:{broker.port}, metrics forwarded to {metrics_port}")

        def alive():
            if qemu.poll() is not None:
                raise CheckFailed(f"QEMU exited with {qemu.returncode}")

        def metrics_up():
            alive()
            return metrics_text(metrics_port)

        body = wait_until("the appliance's /metrics through the port forward", args.timeout, metrics_up, 2)
        results["boot_to_metrics_s"] = round(time.monotonic() - started, 1)
        say(f"/metrics answers {results['boot_to_metrics_s']} s after QEMU started")

        def sources_flowing():
            alive()
            text = metrics_text(metrics_port)
            flowing = {s: (metric(text, "appliance_source_samples_total", source=s) or 0) > 0
                       and metric(text, "appliance_source_up", source=s) == 1
                       for s in ("gearbox", "dock_camera", "line_plc")}
            if not all(flowing.values()):
                raise NotYet(f"flowing: {flowing}")
            return text
        body = wait_until("all three sources up with samples (i2c-stub, vivid, Modbus)", 180, sources_flowing, 2)
        results["sources_ready_s"] = round(time.monotonic() - started, 1)
        for s in ("gearbox", "dock_camera", "line_plc"):
            results[f"samples_{s}"] = metric(body, "appliance_source_samples_total", source=s)
        counts = ", ".join(f"{s} {int(results['samples_' + s])}" for s in ("gearbox", "dock_camera", "line_plc"))
        say(f"sources flowing: {counts} samples")

        def processed():
            text = metrics_text(metrics_port)
            counts = {m: metric(text, "appliance_module_windows_total", module=m) or 0
                      for m in ("gearbox_stats", "dock_motion", "plc_rules")}
            if not all(v > 0 for v in counts.values()):
                raise NotYet(f"windows processed: {counts}")
            return counts
        results["modules_processed"] = wait_until("every module processing windows in wasm3", 120, processed, 2)
        say(f"modules processing: {results['modules_processed']}")

        # Each worker came from appliance-zygote.service and runs in its sandbox (docs/sandbox.md).
        text = metrics_text(metrics_port)
        layers = {m: {layer: metric(text, "appliance_worker_sandbox_layers", module=m, layer=layer)
                      for layer in ("identity", "network", "limits", "landlock", "seccomp")}
                  for m in ("gearbox_stats", "dock_motion", "plc_rules")}
        results["sandbox_layers"] = layers
        say("worker sandbox layers: " + "; ".join(f"{m}: {', '.join(name for name, v in ls.items() if v == 1) or 'none'}"
                                                 for m, ls in layers.items()))
        for m, ls in layers.items():
            missing = [layer for layer in ("identity", "network", "limits", "seccomp") if ls[layer] != 1]
            if missing:
                raise CheckFailed(f"module {m}'s worker runs without the sandbox layers {missing}")

        def exposure():
            found = dict(re.findall(r"Overall exposure level for (\S+): ([0-9.]+)",
                                    console_log.read_text(errors="replace") if console_log.exists() else ""))
            if "appliance.service" not in found:
                raise NotYet("no systemd-analyze security figure on the console yet")
            return found
        results["exposure"] = wait_until("systemd-analyze security of the services (console)", 60, exposure, 1)
        say("systemd-analyze security exposure: " + ", ".join(f"{u} {x}" for u, x in results["exposure"].items()))
        if float(results["exposure"]["appliance.service"]) > 2.0:
            raise CheckFailed(f"appliance.service exposure {results['exposure']['appliance.service']} is above 2.0")

        def event_from_guest():
            alive()
            return [e for e in broker.events() if e.get("module") == "plc_rules"]
        events = wait_until("the over-temperature event from the guest at the host's Mosquitto", 120,
                            event_from_guest, 1)
        results["event"] = {k: events[0].get(k) for k in ("id", "source", "module", "severity", "message")}
        say(f"event received over MQTT: {results['event']}")
        if modbus.served == 0:
            raise CheckFailed("the host's Modbus slave answered no request")

        con = SerialConsole(work / "console.sock")
        guest = f"{GATEWAY} (guest)> "
        con.wait_ready(120, guest)
        # Without a login: status answers; loading a module or reloading the config does not.
        text = con.command("status", "source   line_plc", prompt=guest)
        for refused in ("modules load gearbox_stats /boot/firmware/x.wasm", "config reload"):
            con.command(refused, "needs a login", prompt=guest)
        con.command("login", "Password: ", prompt="Password:")
        con.command(RIG_PASSWORD, f"Welcome to {GATEWAY}")
        yaml_mode = re.search(r"testrig: yaml (\S+) (\d+)", console_log.read_text(errors="replace"))
        # umask=0077 on FAT: the owner's bits only (700: FAT has no execute bit to drop).
        if not yaml_mode or yaml_mode.group(1) != "appliance:appliance" or int(yaml_mode.group(2), 8) & 0o077:
            raise CheckFailed(f"the YAML on the FAT partition is not the appliance user's alone: "
                              f"{yaml_mode.groups() if yaml_mode else 'no testrig line'}")
        results["yaml_mode"] = " ".join(yaml_mode.groups())
        for needle in ("gearbox", "dock_camera", "plc_rules"):
            if needle not in text:
                raise CheckFailed(f"console status lacks {needle}:\n{text}")
        text = con.command("system", "service  appliance.service")
        if not re.search(r"service  appliance\.service\s+active/running", text):
            raise CheckFailed(f"appliance.service is not active/running:\n{text}")
        grown = re.search(r"disk\s+data\s+\S+\s+\S+ \S+ free of (\S+) (\S+)", text)
        results["console_system"] = [line for line in text.splitlines() if line.startswith(("service", "disk", "host"))]
        say("console answers; " + "; ".join(results["console_system"]))
        if not grown or not (grown.group(2) == "GiB" or (grown.group(2) == "MiB" and float(grown.group(1)) > 1024)):
            raise CheckFailed(f"the data partition did not grow to the card:\n{text}")

        results["boot_to_console_prompt_s"] = login_prompt.seconds
        say(f"virt: the console prompt on ttyS0 {login_prompt.seconds} s after QEMU started")
        say("powering off")
        qmp.command("system_powerdown")
        try:
            qemu.wait(120)
        except subprocess.TimeoutExpired:
            raise CheckFailed("the guest did not power off within 120 s of the power button") from None
        # The same card on the Pi machine Debian's QEMU has (image/pi_boot.py).
        write_card(overlay, image, work, pi_boot.raspi3b_config(guest_config(broker.port)))
        results["raspi3b"] = pi_boot.boot_raspi3b(overlay, image, work)
        say(f"boot to the console prompt: virt {results['boot_to_console_prompt_s']} s, "
            f"raspi3b {results['raspi3b']['boot_to_console_prompt_s']} s")
        results["total_s"] = round(time.monotonic() - started, 1)
        ok = True
    except CheckFailed as exc:
        print(f"\nimage-test FAILED: {exc}\n", file=sys.stderr)
    finally:
        for thing in (con, qmp):
            if thing is not None:
                thing.close()
        if qemu is not None and qemu.poll() is None:
            qemu.kill()
            qemu.wait()
        for thing in (modbus, broker):
            if thing is not None:
                try:
                    thing.close()
                except Exception:   # noqa: BLE001 - cleanup must not hide the result
                    pass
        if not ok:
            log = console_log.read_text(errors="replace") if console_log.exists() else "(no console log)"
            print("---- guest console (ttyAMA0) ----\n" + log[-30000:] + "\n---- end of guest console ----",
                  file=sys.stderr)
            qemu_out = work / "qemu.out"
            if qemu_out.exists() and qemu_out.stat().st_size:
                print("---- qemu ----\n" + qemu_out.read_text(errors="replace")[-3000:], file=sys.stderr)
        if not args.keep and ok:
            shutil.rmtree(work, ignore_errors=True)
        elif not ok:
            print(f"(work directory kept: {work})", file=sys.stderr)
    if ok:
        say("PASSED " + json.dumps(results))
        (REPO / "build" / "image" / "image-test.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
