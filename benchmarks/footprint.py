"""Memory of the running appliance: PSS of the supervisor and every process under it (the zygote
and the module workers), for the default config on simulated sensors.

PSS divides each shared page among the processes that map it, so the sum is what the appliance
really costs the machine (RSS would count numpy and OpenCV once per worker).

  python benchmarks/footprint.py [--repo DIR] [--seconds 20]

--repo runs another checkout's appliance the same way (a before/after on one machine).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree(root: int) -> list[tuple[int, str]]:
    """The process and its descendants: (pid, command line)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out.append((pid, cmd))
        todo.extend(children.get(pid, []))
    return out


def measure(repo: Path, seconds: float) -> dict:
    text = (repo / "configs" / "appliance.yaml").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "appliance.yaml"
        cfg.write_text(text.replace("data_dir: ../var", f"data_dir: {tmp}/var").replace("../", f"{repo}/")
                       .replace("port: 9108", "port: 0"))
        env = {**os.environ, "PYTHONPATH": str(repo)}
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(cfg)], cwd=repo, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(seconds)
            procs = tree(proc.pid)
            rows = [(pid, cmd, pss_kb(pid)) for pid, cmd in procs]
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {"processes": len(rows), "pss_mb": sum(r[2] for r in rows) / 1024,
            "supervisor_mb": rows[0][2] / 1024 if rows else 0.0,
            "others": [(cmd.split()[-1] if "worker" in cmd or "zygote" in cmd else cmd[:40], kb / 1024)
                       for _, cmd, kb in rows[1:]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=REPO)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    r = measure(args.repo.resolve(), args.seconds)
    print(f"default config after {args.seconds:g} s: {r['processes']} processes, PSS {r['pss_mb']:.0f} MB "
          f"(supervisor {r['supervisor_mb']:.0f} MB)")
    for name, mb in r["others"]:
        print(f"  {name:<40} {mb:6.1f} MB")


if __name__ == "__main__":
    main()
