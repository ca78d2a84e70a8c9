"""The Raspberry Pi boot path of the card, checked two ways by `make image-test`:

- **statically**: the FAT partition holds what the Pi firmware and U-Boot read (config.txt and the
  files it names, the firmware for both SoC families, the device trees with the appliance's
  overlay applied, a U-Boot environment whose CRC holds, extlinux.conf and the files it names);
- **booted** under QEMU's `raspi3b` machine (the Pi that Debian 12's QEMU has): QEMU plays the
  firmware's part (it loads kernel=u-boot.bin and hands over the card's own bcm2837-rpi-3-b.dtb),
  then U-Boot rpi_arm64, extlinux.conf, Linux from the SD card, systemd, the console prompt on the
  UART and the appliance running, with the sources that cannot exist there reported as failed.
"""
from __future__ import annotations

import json
import re
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

from qemu_test import CheckFailed, partitions, say

FIRMWARE = ("start4.elf", "fixup4.dat", "bootcode.bin", "start.elf", "fixup.dat")
BOARDS = ("bcm2711-rpi-4-b", "bcm2711-rpi-400", "bcm2711-rpi-cm4-io", "bcm2837-rpi-3-b", "bcm2837-rpi-3-b-plus")
UART0 = "/soc/serial@7e201000"           # the PL011, moved to GPIO14/15 by the overlay
I2C1 = "/soc/i2c@7e804000"               # the header's I2C on GPIO2/3


def fat_of(image: Path, work: Path) -> Path:
    boot = partitions(image)[0]
    fat = work / "pi-check.vfat"
    with open(image, "rb") as src, open(fat, "wb") as dst:
        src.seek(boot["start"] * 512)
        dst.write(src.read(boot["size"] * 512))
    return fat


def read_fat(fat: Path, name: str, dest: Path) -> Path:
    subprocess.run(["mcopy", "-o", "-i", str(fat), f"::/{name}", str(dest)], check=True, capture_output=True)
    return dest


def fdtget(dtb: Path, node: str, prop: str, kind: str = "s") -> str:
    out = subprocess.run(["fdtget", "-t", kind, str(dtb), node, prop], capture_output=True, text=True)
    if out.returncode:
        raise CheckFailed(f"{dtb.name}: no {node} {prop} ({out.stderr.strip()})")
    return out.stdout.strip()


def static_check(image: Path, work: Path) -> dict:
    fat = fat_of(image, work)
    listing = subprocess.run(["mdir", "-b", "-i", str(fat), "::/"], check=True, capture_output=True,
                             text=True).stdout.split()
    present = {Path(p).name for p in listing}
    missing = [n for n in (*FIRMWARE, "config.txt", "u-boot.bin", "uboot.env", "Image", "initrd.img",
                           *(f"{b}.dtb" for b in BOARDS)) if n not in present]
    if missing:
        raise CheckFailed(f"the FAT partition lacks what a Pi boots from: {missing}")
    config = read_fat(fat, "config.txt", work / "config.txt").read_text()
    settings = dict(line.split("=", 1) for line in config.splitlines()
                    if "=" in line and not line.lstrip().startswith("#"))
    for key, want in (("arm_64bit", "1"), ("enable_uart", "1"), ("kernel", "u-boot.bin"), ("upstream_kernel", "1")):
        if settings.get(key) != want:
            raise CheckFailed(f"config.txt: {key}={settings.get(key)!r}, expected {want!r}")
    if settings["kernel"] not in present:
        raise CheckFailed(f"config.txt names kernel={settings['kernel']}, which is not on the partition")
    uboot = read_fat(fat, "u-boot.bin", work / "u-boot.bin").read_bytes()
    if b"U-Boot 20" not in uboot or b"rpi" not in uboot:
        raise CheckFailed("u-boot.bin is not a Raspberry Pi U-Boot")
    # U-Boot's environment: a CRC32 (little endian) over the rest; a bad CRC means the defaults
    # (a 2 s autoboot delay that a noisy serial line can interrupt).
    env = read_fat(fat, "uboot.env", work / "uboot.env").read_bytes()
    crc, data = struct.unpack("<I", env[:4])[0], env[4:]
    if zlib.crc32(data) != crc:
        raise CheckFailed("uboot.env: its CRC does not hold, so U-Boot would ignore it")
    variables = dict(v.split("=", 1) for v in data.split(b"\0\0")[0].decode().split("\0") if "=" in v)
    if variables.get("bootdelay") != "-2" or variables.get("boot_syslinux_conf") != "extlinux/extlinux.conf":
        raise CheckFailed(f"uboot.env: bootdelay={variables.get('bootdelay')}, "
                          f"boot_syslinux_conf={variables.get('boot_syslinux_conf')}")
    extlinux = subprocess.run(["mtype", "-i", str(fat), "::/extlinux/extlinux.conf"], check=True,
                              capture_output=True, text=True).stdout
    for path in re.findall(r"^\s*(?:linux|initrd)\s+/?(\S+)", extlinux, re.M):
        if path not in present:
            raise CheckFailed(f"extlinux.conf names /{path}, which is not on the partition")
    trees = {}
    for board in BOARDS:
        dtb = read_fat(fat, f"{board}.dtb", work / f"{board}.dtb")
        pins_node = fdtget(dtb, UART0, "pinctrl-0", "x")
        bt = fdtget(dtb, f"{UART0}/bluetooth", "status")
        alias = fdtget(dtb, "/aliases", "i2c1")
        i2c = fdtget(dtb, I2C1, "status")
        if bt != "disabled" or alias != I2C1 or i2c != "okay":
            raise CheckFailed(f"{board}.dtb: bluetooth {bt}, i2c1 alias {alias}, {I2C1} {i2c}")
        pins = subprocess.run(["fdtget", "-t", "u", str(dtb), "/soc/gpio@7e200000/appliance_uart0_gpio14",
                               "brcm,pins"], capture_output=True, text=True).stdout.split()
        if pins != ["14", "15"]:
            raise CheckFailed(f"{board}.dtb: the PL011's pins are {pins}, not GPIO14/15")
        trees[board] = {"uart0_pinctrl": pins_node, "i2c1": alias}
    fat.unlink()
    say(f"Pi boot files: {len(FIRMWARE)} firmware files, u-boot.bin, config.txt, uboot.env (CRC ok, bootdelay -2), "
        f"{len(BOARDS)} device trees with the PL011 on GPIO14/15 and i2c1 on GPIO2/3")
    return {"files": sorted(present), "boards": list(BOARDS)}


def raspi3b_config(virt_config: dict) -> dict:
    """The rig's YAML for the Pi: the console on the header UART (ttyAMA0, as gateway.yaml has
    it), the accelerometer on the header's I2C1 (an adapter with no chip: its probe fails), the
    Modbus line on a UART this board lacks; the camera (vivid) does exist."""
    config = json.loads(json.dumps(virt_config))
    config["console"]["device"] = "/dev/ttyAMA0"
    config["sources"]["gearbox"]["bus"] = 1
    return config


def boot_raspi3b(overlay: Path, image: Path, work: Path, timeout_s: float = 1200) -> dict:
    """Boot the card (the same qcow2 overlay the virt rig used: a 4 GiB card, a power of two as
    QEMU's SD model wants) on raspi3b; the times to U-Boot, Linux, the login prompt on the UART
    and the appliance running, from the kernel console."""
    fat = fat_of(image, work)
    dtb = read_fat(fat, "bcm2837-rpi-3-b.dtb", work / "raspi3b.dtb")
    uboot = read_fat(fat, "u-boot.bin", work / "raspi3b-u-boot.bin")
    fat.unlink()
    log = work / "raspi3b-console.log"
    cmd = ["qemu-system-aarch64", "-M", "raspi3b", "-m", "1G", "-kernel", str(uboot), "-dtb", str(dtb),
           "-drive", f"if=sd,format=qcow2,file={overlay}", "-display", "none", "-monitor", "none",
           "-serial", f"file:{log}", "-no-reboot"]
    started = time.monotonic()
    qemu_out = open(work / "raspi3b-qemu.out", "wb")
    qemu = subprocess.Popen(cmd, stdout=qemu_out, stderr=subprocess.STDOUT)
    marks = {"u_boot": r"U-Boot 20\d\d", "extlinux": r"Found /extlinux/extlinux.conf",
             "linux": r"Booting Linux on physical CPU", "root_mounted": r"EXT4-fs \(mmcblk0p2\): mounted",
             "console_prompt": r"\(guest\)> ", "appliance_running": r"appliance \S+ running gateway",
             "source_failed": r"source (gearbox|line_plc): \w+"}
    seen: dict[str, float] = {}
    try:
        while time.monotonic() - started < timeout_s and len(seen) < len(marks):
            if qemu.poll() is not None:
                raise CheckFailed(f"raspi3b: QEMU exited with {qemu.returncode}")
            text = log.read_text(errors="replace") if log.exists() else ""
            for name, pattern in marks.items():
                if name not in seen and re.search(pattern, text):
                    seen[name] = round(time.monotonic() - started, 1)
                    say(f"raspi3b: {name.replace('_', ' ')} at {seen[name]} s")
            if re.search(r"Kernel panic|emergency mode|Traceback \(most recent", text):
                break
            time.sleep(2)
        text = log.read_text(errors="replace") if log.exists() else ""
        if len(seen) < len(marks) or re.search(r"Kernel panic|emergency mode|Traceback \(most recent", text):
            raise CheckFailed(f"raspi3b: reached {sorted(seen)}, not {sorted(set(marks) - set(seen))}:\n"
                              + text[-6000:])
        time.sleep(20)   # the appliance keeps running with its failed sources: no restart, no crash
        text = log.read_text(errors="replace")
        starts = len(re.findall(marks["appliance_running"], text))
        if starts != 1 or "Main process exited" in text.split("running gateway", 1)[1]:
            raise CheckFailed(f"raspi3b: the appliance started {starts} times or exited:\n{text[-4000:]}")
        reports = {name: line.strip()[-200:] for name, line in
                   re.findall(r"source (gearbox|line_plc): ([^\n]*)", text)}
        failed = sorted(reports)
        if failed != ["gearbox", "line_plc"]:
            raise CheckFailed(f"raspi3b: the sources that cannot exist there were not both reported: {reports}")
        say(f"raspi3b: appliance running; sources reported failed: {reports}")
        return {"marks_s": seen, "boot_to_console_prompt_s": seen["console_prompt"], "sources_failed": reports}
    finally:
        qemu.send_signal(signal.SIGKILL)
        qemu.wait()
        qemu_out.close()
