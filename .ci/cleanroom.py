#!/usr/bin/env python3
"""`make cleanroom`: what a new user's fresh Debian 12 machine does with a clone of this repo.

A minimal Debian 12 amd64 root (mmdebstrap, variant minbase, plus `make` and `git`: what someone
who cloned the repo and types `make test` has) is built once and cached as a tarball keyed by what
goes into it. Each run unpacks it afresh, puts a `git clone` of HEAD in it (committed work only:
what a user clones), and runs `CI=true make test` there from nothing: the Makefile installs every
Debian and Python package itself, from the package registries, as on a new machine. Nothing of this
machine goes in but its network settings (resolv.conf and the certificate authorities it trusts, so
the registries are reachable the same way) and the recorded data, read-only at ../shared/data.

Needs root (mmdebstrap --mode=root, pivot_root, mounts); `make cleanroom` uses sudo when not root.
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
# A fresh machine has a shell, apt, make and git (the user cloned the repo); everything else is the
# Makefile's to install.
PACKAGES = ["make", "git"]
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


ROOM_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
            "LANG": "C.UTF-8", "TERM": "dumb", "CI": "true"}


def inside(root: Path, target: str) -> int:
    """The room itself: run in a mount and PID namespace of its own (main() starts it with
    unshare), so every mount made here, and every process left running in the room, ends when
    this does; nothing can outlive it on the machine."""
    run(["mount", "--make-rprivate", "/"])

    def mount(*args: str, target: str) -> None:
        path = root / target.lstrip("/")
        path.mkdir(parents=True, exist_ok=True)
        run(["mount", *args, str(path)])

    mount("-t", "proc", "proc", target="/proc")
    mount("-t", "sysfs", "sysfs", target="/sys")
    mount("--rbind", "/dev", target="/dev")          # ptys for the serial tests, /dev/shm
    mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", target="/run")
    if SHARED.is_dir():
        mount("--bind", "-o", "ro", str(SHARED), target="/work/shared")
        run(["mount", "-o", "remount,bind,ro", str(root / "work/shared")])
    # The network as this machine reaches it: the resolver and the authorities it trusts (a
    # proxy that inspects TLS signs with its own).
    resolv = root / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text(Path("/etc/resolv.conf").read_text())
    local_cas = Path("/usr/local/share/ca-certificates")
    if local_cas.is_dir():
        shutil.copytree(local_cas, root / "usr/local/share/ca-certificates", dirs_exist_ok=True)
    # pivot_root, not chroot: in a chroot the kernel refuses user namespaces, which every module
    # worker's sandbox creates; after pivot_root the room is its mount namespace's own root.
    run(["mount", "--rbind", str(root), str(root)])
    (root / ".old-root").mkdir(exist_ok=True)
    run(["pivot_root", str(root), str(root / ".old-root")])
    os.chdir("/")
    run(["umount", "-l", "/.old-root"])
    os.rmdir("/.old-root")
    return subprocess.run(["env", "-i", *[f"{k}={v}" for k, v in ROOM_ENV.items()],
                           "bash", "-c", f"cd /work/main && make {target}"]).returncode


def mounted_below(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    return [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1].startswith(prefix)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="test", help="make target to run in the clean room (default: test)")
    p.add_argument("--keep", action="store_true", help="keep the room's directory afterwards (for a look inside)")
    p.add_argument("--inside", type=Path, help=argparse.SUPPRESS)   # the namespaced half (see inside())
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("cleanroom: needs root (mmdebstrap --mode=root, pivot_root, mounts); run it with sudo")
    if args.inside:
        return inside(args.inside, args.target)
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
    root = work / "root"
    status, t_run = 1, 0.0
    try:
        root.mkdir()
        run(["tar", "-xpf", str(tar), "-C", str(root), "--numeric-owner"])
        run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(root / "work/main")])
        say(f"clone of {head} in {root / 'work/main'}; running `CI=true make {args.target}`")
        t1 = time.monotonic()
        status = subprocess.run(["unshare", "--mount", "--pid", "--fork", "--kill-child", sys.executable,
                                 str(Path(__file__).resolve()), "--inside", str(root),
                                 "--target", args.target]).returncode
        t_run = time.monotonic() - t1
    finally:
        left = mounted_below(work)   # the namespace took its mounts with it; never delete through one
        if left:
            say(f"not deleting {work}: still mounted below it: {', '.join(left)}")
        elif not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    total = time.monotonic() - t0
    verdict = "PASSED" if status == 0 else f"FAILED (exit {status})"
    say(f"{verdict}: make {args.target} in {t_run:.0f} s; base {t_base:.0f} s; {total:.0f} s in all")
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
