"""`make soak`: the default config, accelerated, for a long time; every process's memory watched.

The embedded default config (configs/appliance.yaml) runs as `appliance run` in its own process,
with its simulated sensors as fast as the CPU allows: the vibration simulator unpaced, the
camera at 1000 fps, the Modbus bus polled 20 times a second at 115200 baud, the GPS at 50 fixes
a second. Every SAMPLE_S the harness reads VmRSS and PSS (smaps_rollup) of the supervisor and of
each worker, and scrapes /metrics for windows, restarts and faults.

After the warm-up, each process's memory at the end (the 10th percentile of its last tenth of
samples) is compared with its memory at the start (the same of its first tenth): more than
--max-growth (1 %) fails, and so does any restart or fault. A percentile low in the range reads
the floor a leak raises, not the spikes of short-lived arrays. The figures go to stdout and to build/soak/ (JSON, CSV,
and the supervisor's memory by kind over time in -supervisor.csv).

    python benchmarks/soak.py --minutes 10          # make soak (CI)
    python benchmarks/soak.py --minutes 120         # make soak-long (the closing-note figure)
    python benchmarks/soak.py --minutes 60 --realtime   # `make run` as it is, for an hour
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "appliance.yaml"
OUT = REPO / "build" / "soak"


def accelerate(config: Path, data_dir: Path, port: int, realtime: bool = False) -> dict:
    """The config with its simulated sensors unpaced or sped up (unless realtime: as `make run`
    runs it), paths made absolute."""
    doc = yaml.safe_load(config.read_text())
    base = config.resolve().parent
    doc["gateway"]["data_dir"] = str(data_dir)
    doc["metrics"] = {"listen": "127.0.0.1", "port": port}
    for name, mod in doc.get("modules", {}).items():
        mod["wasm"] = str((base / mod["wasm"]).resolve())
    if realtime:
        return doc
    for name, src in doc["sources"].items():
        kind = src["type"]
        if kind == "sim_vibration":
            src["realtime"] = False
        elif kind == "camera" and src.get("simulate"):
            src["fps"] = 1000
        elif kind == "modbus_rtu" and src.get("simulate"):
            src.update(poll_s=0.05, baudrate=115200)
        elif kind == "nmea" and src.get("simulate"):
            src.update(sample_rate=50, baudrate=115200)
        elif kind == "i2c_accel" and src.get("emulate"):
            pass   # paced by the emulated chip's own clock, like the real one
    return doc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Every descendant (the supervisor's zygote, and the zygote's workers)."""
    out = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            direct = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in direct:
            out += [child, *children(child)]
    return out


def memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes."""
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())[1]) << 10
    pss = int(re.search(r"^Pss:\s+(\d+) kB", Path(f"/proc/{pid}/smaps_rollup").read_text(), re.M)[1]) << 10
    return rss, pss


def label(pid: int, supervisor: int) -> str | None:
    if pid == supervisor:
        return "supervisor"
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if comm == "ap:spare":
        return None   # replaced at each worker start; a start is a restart, which fails the soak anyway
    if comm.startswith("ap:"):
        return "worker:" + comm[3:]   # worker.name_process: the module's name, 12 characters at most
    if b"appliance.runtime.zygote" in cmdline:
        return "zygote"
    return None


def scrape(port: int) -> tuple[dict[str, float], dict[str, float]]:
    """Sums per metric and module of the counters the soak judges; and the supervisor's memory
    by kind (appliance_supervisor_memory_bytes, _python_blocks), to say what grew."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    heap: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'(appliance_module_(?:windows|restarts|faults|windows_dropped)_total)\{([^}]*)\} (\S+)', line)
        if m:
            module = re.search(r'module="([^"]*)"', m[2])[1]
            key = f"{m[1]}:{module}"
            out[key] = out.get(key, 0.0) + float(m[3])
        m = re.match(r'appliance_supervisor_memory_bytes\{kind="([^"]*)"\} (\S+)', line)
        if m:
            heap[m[1]] = float(m[2])
        m = re.match(r'appliance_supervisor_python_blocks (\S+)', line)
        if m:
            heap["python_blocks"] = float(m[1])
    return out, heap


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--warmup-minutes", type=float, default=None, help="default: 30 %% of the run, at most 20")
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--max-growth", type=float, default=0.01, help="fraction (default 0.01 = 1 %%)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--realtime", action="store_true", help="the sensors at their own pace, as `make run` runs them")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # stop the appliance on the way out
    warmup = 60 * (args.warmup_minutes if args.warmup_minutes is not None else min(20.0, 0.3 * args.minutes))
    duration = 60 * args.minutes
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + ("-realtime" if args.realtime else "")

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        tmp = Path(tmp)
        port = free_port()
        cfg = tmp / "soak.yaml"
        cfg.write_text(yaml.safe_dump(accelerate(args.config, tmp / "var", port, args.realtime), sort_keys=False))
        log_path = OUT / f"soak-{stamp}.log"
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(cfg)],
                                    stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        print(f"soak: {args.minutes:g} min ({warmup / 60:g} min warm-up), "
              f"{'real time' if args.realtime else 'accelerated'}, supervisor pid {proc.pid}, "
              f"log {log_path.relative_to(REPO)}", flush=True)
        samples: list[dict] = []
        pids: dict[str, set[int]] = {}
        t0 = time.monotonic()
        counters0: dict[str, float] = {}
        failure = ""
        try:
            while time.monotonic() - t0 < duration:
                time.sleep(args.sample_s)
                if proc.poll() is not None:
                    failure = f"the supervisor exited ({proc.returncode})"
                    break
                t = time.monotonic() - t0
                row = {"t": round(t, 1)}
                for pid in [proc.pid, *children(proc.pid)]:
                    name = label(pid, proc.pid)
                    if name is None:
                        continue
                    try:
                        row[name] = memory(pid)
                    except (OSError, TypeError):
                        continue
                    pids.setdefault(name, set()).add(pid)
                try:
                    row["counters"], row["heap"] = scrape(port)
                except OSError as exc:
                    row["counters"], row["heap"] = {}, {}
                    print(f"soak: metrics unreadable at {t:.0f} s: {exc}", flush=True)
                if not counters0 and t >= warmup and row["counters"]:
                    counters0 = row["counters"]
                samples.append(row)
                if len(samples) % max(1, int(60 / args.sample_s)) == 0:
                    mem = ", ".join(f"{k} {v[0] >> 20} MiB" for k, v in row.items() if isinstance(v, tuple))
                    print(f"soak: {t / 60:5.1f} min  {mem}", flush=True)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    return report(samples, pids, counters0, warmup, args, stamp, failure)


def floor(values) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 10]


def supervisor_breakdown(after: list[dict], k: int) -> dict[str, tuple[float, float]]:
    """The supervisor's memory by kind, start and end floors like the RSS figures."""
    kinds = sorted({kind for s in after for kind in s.get("heap", {})})
    out = {}
    for kind in kinds:
        series = [s["heap"][kind] for s in after if kind in s.get("heap", {})]
        if len(series) >= 2 * k:
            out[kind] = (floor(series[:k]), floor(series[-k:]))
    return out


def report(samples: list[dict], pids: dict[str, set[int]], counters0: dict, warmup: float, args, stamp: str,
           failure: str) -> int:
    after = after_warmup = [s for s in samples if s["t"] >= warmup]
    problems = [failure] if failure else []
    if len(after) < 6:
        problems.append(f"only {len(after)} samples after the warm-up")
    k = max(3, len(after) // 10)
    names = sorted({n for s in samples for n, v in s.items() if isinstance(v, tuple)})
    rows = []
    for name in names:
        series = [s[name] for s in after if name in s]
        if len(series) < 2 * k:
            problems.append(f"{name}: too few samples ({len(series)})")
            continue
        # The floor (10th percentile) of each stretch: a leak raises it, while the supervisor's
        # large short-lived arrays (mapped and unmapped a thousand times a second) only add spikes.
        start_rss, end_rss = floor(v[0] for v in series[:k]), floor(v[0] for v in series[-k:])
        start_pss, end_pss = floor(v[1] for v in series[:k]), floor(v[1] for v in series[-k:])
        growth = end_rss / start_rss - 1
        rows.append({"process": name, "pids": sorted(pids[name]), "rss_start": start_rss, "rss_end": end_rss,
                     "pss_start": start_pss, "pss_end": end_pss, "rss_growth": growth})
        if growth > args.max_growth:
            problems.append(f"{name}: RSS grew {growth:.1%} after the warm-up "
                            f"({start_rss / 2**20:.1f} -> {end_rss / 2**20:.1f} MiB)")
        if len(pids[name]) > 1:
            problems.append(f"{name}: ran as {len(pids[name])} processes (restarted)")
    final = samples[-1].get("counters", {}) if samples else {}
    modules = sorted({key.split(":", 1)[1] for key in final})
    windows = {m: final.get(f"appliance_module_windows_total:{m}", 0.0) for m in modules}
    for m in modules:   # a module that stopped getting windows would leak nothing: it must work throughout
        after = windows[m] - counters0.get(f"appliance_module_windows_total:{m}", 0.0)
        if after <= 0:
            problems.append(f"{m}: no window processed after the warm-up")
    for m in modules:
        for counter in ("appliance_module_restarts_total", "appliance_module_faults_total"):
            n = final.get(f"{counter}:{m}", 0.0)
            if n:
                problems.append(f"{m}: {counter.split('_')[2]} = {n:g}")
    print(f"\n{'process':<26} {'RSS start':>10} {'RSS end':>10} {'growth':>8} {'PSS start':>10} {'PSS end':>10}")
    for r in rows:
        print(f"{r['process']:<26} {r['rss_start'] / 2**20:>9.1f}M {r['rss_end'] / 2**20:>9.1f}M "
              f"{r['rss_growth']:>7.2%} {r['pss_start'] / 2**20:>9.1f}M {r['pss_end'] / 2**20:>9.1f}M")
    total = sum(r["pss_end"] for r in rows)
    print(f"{'all processes (PSS)':<26} {'':>10} {'':>10} {'':>8} {sum(r['pss_start'] for r in rows) / 2**20:>9.1f}M "
          f"{total / 2**20:>9.1f}M")
    heap_rows = supervisor_breakdown(after_warmup, k)
    if heap_rows:
        print("\nsupervisor by kind (floor of the first and last tenth after the warm-up):")
        for kind, (a, b) in heap_rows.items():
            unit = 1 if kind == "python_blocks" else 2**20
            print(f"  {kind:<16} {a / unit:>12,.1f} -> {b / unit:>12,.1f}" + ("" if unit == 1 else " MiB"))
    print("\nwindows processed: " + ", ".join(f"{m} {int(n):,}" for m, n in windows.items()))
    restarts = sum(final.get(f"appliance_module_restarts_total:{m}", 0.0) for m in modules)
    print(f"restarts: {int(restarts)}")
    result = {"minutes": args.minutes, "warmup_minutes": warmup / 60, "max_growth": args.max_growth,
              "realtime": args.realtime,
              "processes": rows, "supervisor_by_kind": heap_rows, "windows": windows, "restarts": restarts, "problems": problems}
    (OUT / f"soak-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(OUT / f"soak-{stamp}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "process", "rss", "pss"])
        for s in samples:
            for n in names:
                if n in s:
                    w.writerow([s["t"], n, *s[n]])
    with open(OUT / f"soak-{stamp}-supervisor.csv", "w", newline="") as f:
        kinds = sorted({kind for s in samples for kind in s.get("heap", {})})
        w = csv.writer(f)
        w.writerow(["t", *kinds])
        for s in samples:
            if s.get("heap"):
                w.writerow([s["t"], *(s["heap"].get(kind, "") for kind in kinds)])
    if problems:
        print("\nSOAK FAILED:\n  " + "\n  ".join(problems))
        return 1
    print(f"\nsoak passed: no process grew more than {args.max_growth:.0%} after the warm-up, no restart")
    return 0


if __name__ == "__main__":
    sys.exit(main())
