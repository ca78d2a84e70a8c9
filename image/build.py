#!/usr/bin/env python3
"""`make image`: the flashable SD-card image (arm64 Debian 12) for Raspberry Pi 4/CM4-class
gateways and QEMU's `virt` machine.

Two stages. The **base** root file system (Debian packages, the i2c-stub module, the venv with
the third-party Python packages) takes minutes under emulation, so it is cached as a tarball
keyed by everything that goes into it (image/base-packages.txt, image/rootfs-hooks/*, the locked
Python requirements in requirements/gateway.txt and build.txt). The **appliance** stage runs every time and takes about a minute: our package,
the prebuilt modules, the systemd units and config, then the partitions and the card:

    MBR | 1: FAT32 "APPBOOT" 256 MiB  kernel, initrd, extlinux.conf, appliance.yaml (edit from any PC)
        | 2: ext4  "APPROOT"          read-only root, /opt/appliance/venv
        | 3: ext4  "APPDATA" 64 MiB   spool, baselines, logs; grows to the end of the card at first boot

Outputs (build/image/): the raw .img, .img.xz, .bmap (bmaptool), SHA256SUMS, build-info.json, and
what is in it: manifest.txt and sbom.spdx.json (image/sbom.py), manifest-moved.txt (what differs
from the manifest recorded in image/manifest.txt).
Needs root (mmdebstrap --mode=root, chroot, file ownership); `make image` installs the host tools.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGE_DIR = Path(__file__).resolve().parent
REPO = IMAGE_DIR.parent
SUITE = "bookworm"
COMPONENTS = "main non-free-firmware"
SOURCES = [
    f"deb http://deb.debian.org/debian {SUITE} {COMPONENTS}",
    f"deb http://deb.debian.org/debian {SUITE}-updates {COMPONENTS}",
    f"deb http://deb.debian.org/debian-security {SUITE}-security {COMPONENTS}",
]
MIB = 1 << 20
ALIGN_MIB = 4                 # partitions start on 4 MiB boundaries (SD erase blocks)
BOOT_MIB = 256
DATA_MIB = 64                 # grown at first boot
ROOT_SLACK = 1.15             # free space in the read-only root: 15 % + 128 MiB
ROOT_EXTRA_MIB = 128
DEFAULT_CACHE = Path(os.environ.get("IMAGE_CACHE", Path.home() / ".cache" / "appliance-image"))
DEFAULT_OUT = REPO / "build" / "image"
UNITS = ["appliance.service", "appliance-zygote.service", "appliance-console.service", "appliance-system.service",
         "appliance-grow-data.service", "appliance-testrig.service", "systemd-networkd.service",
         "systemd-resolved.service", "systemd-timesyncd.service"]


# What dpkg never unpacks on the card (nobody reads it there): manuals, translations, docs but
# their licences, wabt's static library and its tools besides wasm-validate. (Headers stay: the
# base compiles i2c-stub and pywasm3, then purges the compilers and -dev packages with them.)
DPKG_SLIM = ["path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*",
             "path-exclude=/usr/share/locale/*", "path-include=/usr/share/locale/locale.alias",
             "path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
             "path-exclude=/usr/share/lintian/*",
             "path-exclude=/usr/lib/*/libwabt.a",
             *[f"path-exclude=/usr/bin/{tool}" for tool in (
                 "wasm2c", "wasm-interp", "spectest-interp", "wat2wasm", "wast2json", "wat-desugar",
                 "wasm-decompile", "wasm2wat", "wasm-objdump", "wasm-strip", "wasm-stats", "wasm-opcodecnt",
                 "wasm2wat-fuzz", "json-to-wasm-test")]]


def say(msg: str) -> None:
    print(f"[image] {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, **kw)
    except FileNotFoundError:
        sys.exit(f"image: {cmd[0]} is not installed (make image installs the host tools)")
    except subprocess.CalledProcessError as exc:
        sys.exit(f"image: `{' '.join(map(str, cmd))[:300]}` failed with exit {exc.returncode}")


def in_root(root: Path, *cmd: str) -> None:
    # A clean environment: the host's pip and locale settings must not leak into the image.
    run(["chroot", str(root), "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8",
         *cmd])


def ensure_binfmt() -> None:
    """arm64 programs in the chroot run through qemu-user; binfmt_misc is not mounted at boot here."""
    misc = Path("/proc/sys/fs/binfmt_misc")
    if not (misc / "status").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(misc)])
    if not (misc / "qemu-aarch64").exists():
        run(["update-binfmts", "--enable", "qemu-aarch64"])
    if not (misc / "qemu-aarch64").exists():
        sys.exit("image: binfmt for qemu-aarch64 is not registered (package qemu-user-static, binfmt-support)")


LOCKS = REPO / "requirements"
DEBIAN_PYTHON = (3, 11, 2)    # bookworm's CPython, for the lock's markers
sys.path.insert(0, str(LOCKS))
import install as locked  # noqa: E402
import pywasm3_fix  # noqa: E402

sys.path.insert(0, str(IMAGE_DIR))
import sbom  # noqa: E402


def locked_requirements() -> tuple[str, str]:
    """(build tools, gateway packages but pywasm3) as hash-pinned requirement text for arm64
    Debian 12: requirements/build.txt and gateway.txt with their markers decided for aarch64."""
    return (locked.locked_text(LOCKS / "build.txt", "aarch64", DEBIAN_PYTHON),
            locked.locked_text(LOCKS / "gateway.txt", "aarch64", DEBIAN_PYTHON, exclude=set(locked.PATCHED)))


def package_list() -> list[str]:
    lines = (IMAGE_DIR / "base-packages.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def download_wheels(wheelhouse: Path) -> None:
    """aarch64 wheels for Debian 12's CPython 3.11, exactly the files the lock names (pip checks
    every sha256 here, and the chroot's pip again), fetched by the host's pip (its network and
    certificate settings); pywasm3 has no wheel anywhere: its sdist, checked and mended
    (requirements/pywasm3_fix.py), compiles in the chroot."""
    wheelhouse.mkdir()
    build, gateway = locked_requirements()
    (wheelhouse / "build.txt").write_text(build)
    (wheelhouse / "requirements.txt").write_text(gateway)
    binary = wheelhouse / "binary.txt"
    binary.write_text(build + gateway)
    platforms = [a for p in ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64")
                 for a in ("--platform", p)]
    run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--require-hashes",
         "--no-deps", "-d", str(wheelhouse), "--only-binary=:all:", *platforms, "--python-version", "3.11",
         "--implementation", "cp", "--abi", "cp311", "--abi", "abi3", "--abi", "none", "-r", str(binary)])
    binary.unlink()
    pywasm3_fix.fetch(wheelhouse / "pywasm3", LOCKS / "gateway.txt")


def base_key() -> str:
    h = hashlib.sha256()
    for part in [SUITE, *SOURCES, "\n".join(package_list()), *DPKG_SLIM, *locked_requirements(),
                 (LOCKS / "pywasm3_fix.py").read_text()]:
        h.update(part.encode() + b"\0")
    for hook in sorted((IMAGE_DIR / "rootfs-hooks").iterdir()):
        h.update(hook.name.encode() + b"\0" + hook.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_base(cache: Path) -> tuple[Path, bool]:
    """The cached base tarball, built if its key is new. Returns (path, was_cached)."""
    cache.mkdir(parents=True, exist_ok=True)
    tar = cache / f"base-{base_key()}.tar"
    if tar.exists():
        return tar, True
    say(f"building the base root file system {tar.name} (mmdebstrap, arm64 under emulation; minutes)")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        wheelhouse = Path(tmp) / "wheelhouse"
        download_wheels(wheelhouse)
        partial = Path(tmp) / "base.tar"
        hooks = IMAGE_DIR / "rootfs-hooks"
        run(["mmdebstrap", "--mode=root", "--arch=arm64", "--variant=apt", "--verbose",
             f"--include={','.join(package_list())}", *[f"--dpkgopt={o}" for o in DPKG_SLIM],
             f"--setup-hook={hooks / 'setup.sh'} \"$1\"",
             f"--customize-hook={hooks / 'customize.sh'} \"$1\" {wheelhouse}",
             SUITE, str(partial), *SOURCES])
        partial.rename(tar)
    for old in cache.glob("base-*.tar"):       # keep the cache to the current base
        if old != tar:
            old.unlink()
    return tar, False


def appliance_wheel(work: Path) -> Path:
    """The gateway's distribution (pyproject.toml: appliance/ and hal/ only; the tools are another),
    built from a copy of the checkout's tracked files (setuptools reuses a build/lib it finds,
    stale modules included; an untracked file is not part of any commit). build-info.json says
    whether the tracked files differed from the commit."""
    listed = subprocess.run(["git", "-c", "safe.directory=*", "-C", str(REPO), "ls-files", "-z"], check=True,
                            capture_output=True).stdout.decode().split("\0")   # tracked files only
    src = work / "src"
    for name in filter(None, listed):
        if (REPO / name).is_file() and name.split("/")[0] in ("appliance", "hal", "pyproject.toml", "README.md"):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(work),
         str(src)], stdout=subprocess.DEVNULL)
    return next(work.glob("factory_gateway_appliance-*.whl"))


def passwd_ids(root: Path, user: str) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise KeyError(user)


def stage_rootfs(base: Path, work: Path) -> Path:
    root = work / "rootfs"
    root.mkdir()
    run(["tar", "-xpf", str(base), "-C", str(root), "--numeric-owner"])
    modules = sorted((REPO / "modules" / "build").glob("*.wasm"))
    if not modules:
        sys.exit("image: no modules in modules/build (make modules builds them)")
    opt = root / "opt/appliance"
    (opt / "modules").mkdir(parents=True, exist_ok=True)
    for wasm in modules:
        shutil.copy2(wasm, opt / "modules" / wasm.name)
    for native in (REPO / "modules" / "build").glob("nn-*-aarch64.so"):   # compiled models' ap.nn_run twins
        shutil.copy2(native, opt / "modules" / native.name)
    shutil.copy2(REPO / "README.md", opt / "README.md")
    shutil.copytree(REPO / "docs", opt / "docs", dirs_exist_ok=True)
    shutil.copy2(REPO / "configs" / "gateway.yaml", opt / "gateway.yaml")   # the factory default

    wheel = appliance_wheel(work)
    shutil.copy2(wheel, root / "tmp" / wheel.name)
    in_root(root, "/opt/appliance/venv/bin/pip", "install", "-q", "--no-deps", "--no-index",
            "--disable-pip-version-check", f"/tmp/{wheel.name}")
    (root / "tmp" / wheel.name).unlink()
    in_root(root, "/opt/appliance/venv/bin/appliance", "--help")   # imports, under emulation

    run(["cp", "-a", "--no-preserve=ownership", f"{IMAGE_DIR / 'overlay'}/.", str(root)])
    in_root(root, "sh", "-c", "getent group i2c >/dev/null || groupadd --system i2c")
    in_root(root, "useradd", "--system", "--user-group", "--home-dir", "/data/appliance", "--no-create-home",
            "--shell", "/usr/sbin/nologin", "appliance")
    in_root(root, "systemctl", "enable", *UNITS)
    # The header UART is the appliance console's (console.device); systemd would start a login
    # getty on it too, being the kernel's console, and the two would fight over its input.
    in_root(root, "systemctl", "mask", "serial-getty@ttyAMA0.service")
    uid, gid = passwd_ids(root, "appliance")
    fstab = root / "etc/fstab"
    fstab.write_text(fstab.read_text().replace("@APPLIANCE_UID@", str(uid)).replace("@APPLIANCE_GID@", str(gid)))
    for d in ("boot/firmware", "data"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/machine-id").write_text("")     # read-only root: systemd makes a transient one
    # The root is mounted read-only: a mount point missing from the image cannot be made at
    # boot and would drop the boot into emergency mode.
    for line in (root / "etc/fstab").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2 and not line.startswith("#") and fields[1].startswith("/"):
            if not (root / fields[1].lstrip("/")).is_dir():
                sys.exit(f"image: fstab mount point {fields[1]} does not exist in the root file system")
    hosts = root / "etc/hosts"
    hosts.write_text("127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n")
    return root


def kernel_files(root: Path) -> tuple[bytes, Path, str]:
    """(uncompressed arm64 Image, initrd, version): U-Boot's booti wants the plain Image."""
    vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))[-1]
    version = vmlinuz.name.removeprefix("vmlinuz-")
    data = vmlinuz.read_bytes()
    image = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    return image, root / "boot" / f"initrd.img-{version}", version


def make_fat(path: Path, files: dict[str, bytes | Path]) -> None:
    run(["mkfs.vfat", "-C", "-F", "32", "-n", "APPBOOT", str(path), str(BOOT_MIB * 1024)],
        stdout=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            dest = Path(tmp) / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copyfile(content, dest)
            else:
                dest.write_bytes(content)
        run(["mcopy", "-s", "-m", "-i", str(path), *[str(p) for p in Path(tmp).iterdir()], "::/"])


def du_mib(path: Path) -> int:
    out = subprocess.run(["du", "-s", "--block-size=1M", str(path)], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[0])


def boot_files(root: Path, extra_args: str = "") -> dict[str, bytes | Path]:
    image, initrd, version = kernel_files(root)
    extlinux = (IMAGE_DIR / "boot" / "extlinux.conf").read_text().replace("@EXTRA@", extra_args).rstrip() + "\n"
    readme = ("Factory gateway appliance - boot partition\r\n\r\n"
              "appliance.yaml  the gateway's configuration: edit it on any PC, then boot the card.\r\n"
              "                Options: /opt/appliance/docs/configuration.md on the gateway, or docs/ in the repo.\r\n"
              "                The factory default is /opt/appliance/gateway.yaml on the gateway.\r\n"
              f"Image, initrd.img  Linux {version} (arm64)\r\n"
              "extlinux/       U-Boot boot menu\r\n"
              "config.txt, *.elf, *.dat, bootcode.bin, u-boot.bin, uboot.env, *.dtb\r\n"
              "                Raspberry Pi boot firmware, U-Boot and device trees (docs/image.md)\r\n")
    return {"Image": image, "initrd.img": initrd, "extlinux/extlinux.conf": extlinux.encode(),
            "appliance.yaml": (REPO / "configs" / "gateway.yaml").read_bytes(), "README.txt": readme.encode()}


PI_BOARDS = ["bcm2711-rpi-4-b", "bcm2711-rpi-400", "bcm2711-rpi-cm4-io", "bcm2837-rpi-3-b", "bcm2837-rpi-3-b-plus"]
PI_FIRMWARE = ["start4.elf", "fixup4.dat",                      # Pi 4, Pi 400, CM4 (second stage in EEPROM)
               "bootcode.bin", "start.elf", "fixup.dat"]        # Pi 3, 3+
UBOOT_ENV_BYTES = 0x4000     # CONFIG_ENV_SIZE of u-boot-rpi's rpi_arm64 build


def pi_boot_files(root: Path, work: Path) -> dict[str, bytes | Path]:
    """What a Raspberry Pi reads before extlinux.conf: the firmware (raspi-firmware), U-Boot
    (u-boot-rpi rpi_arm64), config.txt, the device trees from the image's own kernel with
    image/boot/appliance-pi.dtso applied (fdtoverlay: Debian's trees have no overlay symbols for
    the firmware's dtparam/dtoverlay), and U-Boot's environment (bootdelay -2: a noisy serial
    line never stops the boot at U-Boot's prompt)."""
    pi = root / "usr/lib/appliance/pi-boot"
    files: dict[str, bytes | Path] = {name: pi / name for name in PI_FIRMWARE}
    files["u-boot.bin"] = pi / "u-boot-rpi_arm64.bin"
    files["config.txt"] = IMAGE_DIR / "boot" / "config.txt"
    overlay = work / "appliance-pi.dtbo"
    run(["dtc", "-q", "-@", "-I", "dts", "-O", "dtb", "-o", str(overlay), str(IMAGE_DIR / "boot" / "appliance-pi.dtso")])
    trees = next((root / "usr/lib").glob("linux-image-*/broadcom"))
    for board in PI_BOARDS:
        out = work / f"{board}.dtb"
        run(["fdtoverlay", "-i", str(trees / f"{board}.dtb"), "-o", str(out), str(overlay)])
        files[f"{board}.dtb"] = out
    env = work / "uboot.env"
    run(["mkenvimage", "-s", str(UBOOT_ENV_BYTES), "-o", str(env), str(IMAGE_DIR / "boot" / "uboot-rpi-env.txt")])
    files["uboot.env"] = env
    for licence in ("raspi-firmware", "u-boot-rpi"):
        files[f"licences/{licence}.copyright"] = pi / f"{licence}.copyright"
    return files


def assemble(root: Path, work: Path, out_img: Path) -> dict:
    files_mib = du_mib(root)
    root_mib = int(files_mib * ROOT_SLACK) + ROOT_EXTRA_MIB
    root_mib += -root_mib % ALIGN_MIB
    say(f"root file system: {files_mib} MiB of files in a {root_mib} MiB partition")
    root_img, boot_img, data_img = work / "root.ext4", work / "boot.vfat", work / "data.ext4"
    run(["mkfs.ext4", "-q", "-F", "-L", "APPROOT", "-d", str(root), "-E", "root_owner=0:0", str(root_img),
         f"{root_mib}M"])
    make_fat(boot_img, {**boot_files(root), **pi_boot_files(root, work)})
    data_dir = work / "data"
    uid, gid = passwd_ids(root, "appliance")
    (data_dir / "appliance").mkdir(parents=True)
    (data_dir / "log").mkdir()
    os.chown(data_dir / "appliance", uid, gid)
    os.chmod(data_dir / "appliance", 0o750)
    run(["mkfs.ext4", "-q", "-F", "-L", "APPDATA", "-d", str(data_dir), str(data_img), f"{DATA_MIB}M"])

    parts = [(boot_img, BOOT_MIB, "c", True), (root_img, root_mib, "83", False), (data_img, DATA_MIB, "83", False)]
    total = ALIGN_MIB + sum(size for _, size, _, _ in parts)
    out_img.unlink(missing_ok=True)
    with open(out_img, "wb") as f:
        f.truncate(total * MIB)
    table = ["label: dos", "label-id: 0x41505047", "unit: sectors"]
    start = ALIGN_MIB
    for _, size, kind, boot in parts:
        table.append(f"start={start * 2048}, size={size * 2048}, type={kind}{', bootable' if boot else ''}")
        start += size
    run(["sfdisk", "--quiet", str(out_img)], input="\n".join(table) + "\n", text=True)
    start = ALIGN_MIB
    for img, size, _, _ in parts:
        run(["dd", f"if={img}", f"of={out_img}", "bs=1M", f"seek={start}", "conv=notrunc,sparse", "status=none"])
        start += size
        img.unlink()
    return {"boot_mib": BOOT_MIB, "root_mib": root_mib, "data_mib": DATA_MIB, "image_mib": total}


def size_report(root: Path, out: Path) -> list[str]:
    """The root file system by what takes the room: each Debian package (its files as unpacked,
    so dpkg's path-excludes count), the venv's Python packages, and the rest; largest first."""
    owned: dict[str, str] = {}
    for listing in (root / "var/lib/dpkg/info").glob("*.list"):
        package = listing.stem.split(":")[0]
        for line in listing.read_text(errors="replace").splitlines():
            owned.setdefault(line, package)
    sizes: dict[str, int] = {}
    site = next((root / "opt/appliance/venv/lib").glob("python3*/site-packages"), None)
    for path in root.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        rel = "/" + str(path.relative_to(root))
        if site is not None and path.is_relative_to(site):
            top = path.relative_to(site).parts[0]
            top = top.split("-")[0].removesuffix(".libs")
            key = "python: " + {"cv2": "opencv_python_headless"}.get(top, top)
        else:
            # merged /usr: dpkg lists /lib/... for what lives in /usr/lib/...
            key = (owned.get(rel) or owned.get(rel.removeprefix("/usr"))
                   or ("(appliance)" if rel.startswith("/opt/appliance") else "(other)"))
        sizes[key] = sizes.get(key, 0) + path.stat().st_size
    ranked = sorted(sizes.items(), key=lambda kv: -kv[1])
    total = sum(sizes.values())
    lines = [f"{n / 2**20:8.1f} MiB  {key}" for key, n in ranked]
    out.write_text(f"{total / 2**20:8.1f} MiB  root file system (files)\n" + "\n".join(lines) + "\n")
    say("root file system, largest: " + ", ".join(f"{k} {n / 2**20:.0f} MiB" for k, n in ranked[:6]))
    return lines


def git_describe() -> str:
    """The commit the image was built from, '+dirty' when tracked files differed from it."""
    git = ["git", "-c", "safe.directory=*", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return head + ("+dirty" if dirty else "")


def build_time() -> str:
    """The commit's time (SOURCE_DATE_EPOCH if set): the SBOM of a commit does not change with the day."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        proc = subprocess.run(["git", "-c", "safe.directory=*", "-C", str(REPO), "log", "-1", "--format=%ct"],
                              capture_output=True, text=True)
        epoch = proc.stdout.strip() or "0"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(epoch)))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * MIB), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="base rootfs cache (default: %(default)s)")
    p.add_argument("--raw-only", action="store_true", help="skip the .xz and .bmap (what image-test needs)")
    p.add_argument("--record-manifest", action="store_true",
                   help=f"record this image's package manifest as {sbom.RECORDED.relative_to(REPO)}")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("image: needs root (mmdebstrap --mode=root, chroot, file ownership); run it with sudo")
    from appliance import __version__
    t0 = time.monotonic()
    ensure_binfmt()
    base, cached = build_base(args.cache)
    t_base = time.monotonic() - t0
    say(f"base {base.name} ({'cached' if cached else 'built'}, {t_base:.0f} s)")
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"appliance-{__version__}-arm64"
    img = args.out / f"{name}.img"
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        work = Path(tmp)
        root = stage_rootfs(base, work)
        changes = sbom.write(root, args.out, name, __version__, build_time(), args.record_manifest)
        sizes = size_report(root, args.out / "rootfs-sizes.txt")
        layout = assemble(root, work, img)
    t_img = time.monotonic() - t0
    info = {"image": img.name, "version": __version__, "base": base.name, "base_cached": cached,
            "base_s": round(t_base, 1), "layout_mib": layout, "apparent_bytes": img.stat().st_size,
            "allocated_bytes": img.stat().st_blocks * 512, "packages_moved": changes,
            "commit": git_describe(), "rootfs_top": sizes[:10]}
    outputs = [img]
    if not args.raw_only:
        say("compressing (xz) and mapping (bmaptool)")
        xz = args.out / f"{name}.img.xz"
        with open(xz, "wb") as f:
            run(["xz", "-T2", "-3", "-c", str(img)], stdout=f)
        bmap = args.out / f"{name}.bmap"
        run(["bmaptool", "create", "-o", str(bmap), str(img)])
        outputs += [xz, bmap]
        info["xz_bytes"] = xz.stat().st_size
    sums = "".join(f"{sha256(o)}  {o.name}\n" for o in outputs)
    (args.out / "SHA256SUMS").write_text(sums)
    info["total_s"] = round(time.monotonic() - t0, 1)
    info["image_s"] = round(t_img, 1)
    (args.out / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
    say(f"{img} ({layout['image_mib']} MiB, {info['allocated_bytes'] >> 20} MiB allocated)"
        + (f", {info['xz_bytes'] >> 20} MiB as .xz" if "xz_bytes" in info else "")
        + f" in {info['total_s']:.0f} s")
    if changes:
        say(f"{len(changes)} package(s) differ from {sbom.RECORDED.relative_to(REPO)} (build/image/manifest-moved.txt):")
        for line in changes:
            say(f"  {line}")
        if not args.record_manifest:
            say("record them with `make image RECORD_MANIFEST=1` once the image passes its tests")
    else:
        say(f"every package as recorded in {sbom.RECORDED.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
