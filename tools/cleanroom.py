#!/usr/bin/env python3
"""`make cleanroom`: what a new user's fresh Debian 12 machine does with a clone of this repo.

A minimal Debian 12 amd64 root (mmdebstrap, variant minbase, plus `make`: what someone typing
`make test` has) is built once and cached as a tarball keyed by what goes into it. Each run
unpacks it afresh, puts a `git clone` of HEAD in it (committed work only: what a user clones),
and runs `CI=true make test` there from nothing: the Makefile installs every Debian and Python
package itself, from the package registries, as on a new machine. Nothing of this machine goes
in but its network settings (resolv.conf and the certificate authorities it trusts, so the
registries are reachable the same way) and the recorded data, read-only at ../shared/data.

Needs root (mmdebstrap --mode=root, chroot, mounts); `make cleanroom` uses sudo when not root.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = "bookworm"
MIRRORS = [
    f"deb http://deb.debian.org/debian {SUITE} main",
    f"deb http://deb.debian.org/debian {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
]
# A fresh machine has a shell, apt and make; everything else is the Makefile's to install.
PACKAGES = ["make"]
CACHE = Path(os.environ.get("CLEANROOM_CACHE", Path.home() / ".cache" / "appliance-cleanroom"))
SHARED = REPO.parent / "shared"
RECIPE_VERSION = "1"   # bump when the way the base is made changes


def say(msg: str) -> None:
    print(f"[cleanroom {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def base_key() -> str:
    h = hashlib.sha256("\0".join([RECIPE_VERSION, SUITE, *MIRRORS, *PACKAGES]).encode())
    return h.hexdigest()[:16]


def base_tarball() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    tar = CACHE / f"base-{base_key()}.tar"
    if tar.exists():
        say(f"base {tar.name} (cached)")
        return tar
    say(f"building the base {tar.name}: Debian 12 amd64 minbase + {', '.join(PACKAGES)} (mmdebstrap)")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        partial = Path(tmp) / "base.tar"
        run(["mmdebstrap", "--mode=root", "--variant=minbase", "--arch=amd64", f"--include={','.join(PACKAGES)}",
             "--aptopt=APT::Install-Recommends \"false\"", SUITE, str(partial), *MIRRORS])
        partial.rename(tar)
    for old in CACHE.glob("base-*.tar"):
        if old != tar:
            old.unlink()
    return tar


class Room:
    """An unpacked root with the kernel file systems a machine has, torn down on exit."""

    def __init__(self, tar: Path, work: Path) -> None:
        self.root = work / "root"
        self.root.mkdir()
        run(["tar", "-xpf", str(tar), "-C", str(self.root), "--numeric-owner"])

    def mount(self, *args: str, target: str) -> None:
        path = self.root / target.lstrip("/")
        path.mkdir(parents=True, exist_ok=True)
        run(["mount", *args, str(path)])

    def __enter__(self) -> "Room":
        self.mount("-t", "proc", "proc", target="/proc")
        self.mount("-t", "sysfs", "sysfs", target="/sys")
        # /dev as the machine has it (ptys for the serial tests, /dev/shm); slave, so nothing
        # done inside propagates out.
        self.mount("--rbind", "/dev", target="/dev")
        run(["mount", "--make-rslave", str(self.root / "dev")])
        self.mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", target="/run")
        # The network as this machine reaches it: the resolver and the authorities it trusts
        # (a proxy that inspects TLS signs with its own).
        shutil.copy2("/etc/resolv.conf", self.root / "etc/resolv.conf")
        local_cas = Path("/usr/local/share/ca-certificates")
        if local_cas.is_dir():
            shutil.copytree(local_cas, self.root / "usr/local/share/ca-certificates", dirs_exist_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        prefix = str(self.root) + "/"
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for target in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
            if subprocess.run(["umount", target], capture_output=True).returncode:
                subprocess.run(["umount", "-l", target], capture_output=True)

    def sh(self, script: str, env: dict[str, str]) -> int:
        base = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
                "LANG": "C.UTF-8", "TERM": "dumb"}
        return subprocess.run(["chroot", str(self.root), "env", "-i", *[f"{k}={v}" for k, v in {**base, **env}.items()],
                               "bash", "-c", script]).returncode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="test", help="make target to run in the clean room (default: test)")
    p.add_argument("--keep", action="store_true", help="keep the room's directory afterwards (for a look inside)")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("cleanroom: needs root (mmdebstrap --mode=root, chroot, mounts); run it with sudo")
    t0 = time.monotonic()
    tar = base_tarball()
    t_base = time.monotonic() - t0
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    if dirty:
        say("note: uncommitted changes are not in the clean room (it clones HEAD, as a user would)")
    work = Path(tempfile.mkdtemp(prefix="room-", dir=CACHE))
    status = 1
    try:
        room = Room(tar, work)
        with room:
            run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(room.root / "work/main")])
            if SHARED.is_dir():
                (room.root / "work/shared").mkdir(parents=True)
                run(["mount", "--bind", "-o", "ro", str(SHARED), str(room.root / "work/shared")])
                run(["mount", "-o", "remount,bind,ro", str(room.root / "work/shared")])
            say(f"clone of {head} in {work / 'root/work/main'}; running `CI=true make {args.target}`")
            t1 = time.monotonic()
            status = room.sh(f"cd /work/main && make {args.target}", {"CI": "true"})
            t_run = time.monotonic() - t1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    total = time.monotonic() - t0
    verdict = "PASSED" if status == 0 else f"FAILED (exit {status})"
    say(f"{verdict}: make {args.target} in {t_run:.0f} s; base {t_base:.0f} s; {total:.0f} s in all")
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
