"""The local control socket: operators' commands against the running supervisor.

A unix stream socket at <data_dir>/control.sock, mode 0600 (only the appliance's user, and
root, may connect; the peer's uid is checked as well), served by threads in the supervisor
process. The serial console (appliance/console.py) is its main client; `socat - UNIX:...` works
as well.

Protocol (docs/console.md): line-oriented, UTF-8, any number of requests per connection.

    request:  one command line, ended by LF (CR LF accepted), at most 4096 bytes
    reply:    a status line, "OK" or "ERR"
              the body: text lines, none of them empty
              an empty line, which ends the reply

A request prefixed with "json " (e.g. `json status`) gets a body of exactly one line of JSON:
the command's data, or {"text": [lines]} for commands without structured data; an ERR body is
then {"error": "..."}.

Commands run in the connection's thread; they only read the supervisor's state or call its
thread-safe methods (ModuleHost.restart, Spool.tail, sup.reload_config, sup.load_module).
"""
from __future__ import annotations

import collections
import contextlib
import difflib
import json
import logging
import os
import platform
import shlex
import socket
import sqlite3
import shutil
import stat
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from appliance import __version__

log = logging.getLogger("appliance.control")

SOCKET_NAME = "control.sock"
MAX_LINE = 4096
MAX_CLIENTS = 8
CLIENT_IDLE_S = 15 * 60   # as the console's own idle logout
LOG_LINES = 1000          # the ring buffer behind `log tail`
RATE_PERIOD_S = 1.0       # how often the rate tracker samples the counters
RATE_SPAN = 6             # samples kept: rates are over the last ~5 s
TAIL_MAX = 1000


def socket_path(data_dir: Path | str) -> Path:
    return Path(data_dir) / SOCKET_NAME


# ------------------------------------------------------------------------------- replies

@dataclass
class Reply:
    ok: bool = True
    lines: list[str] = field(default_factory=list)
    data: Any = None

    def encode(self, as_json: bool) -> bytes:
        if as_json:
            if self.ok:
                payload = self.data if self.data is not None else {"text": self.lines}
            else:
                payload = {"error": "\n".join(self.lines)}
            body = [json.dumps(payload, default=str, separators=(",", ":"))]
        else:
            # An empty line ends a reply, so a body never has one; a lone space stands in.
            body = [(line.rstrip("\r") or " ") for text in self.lines for line in str(text).split("\n")]
        return ("\n".join(["OK" if self.ok else "ERR", *body, "", ""])).encode("utf-8", "replace")


class CommandError(Exception):
    """Raised by a command: the message goes back as an ERR reply."""


# ------------------------------------------------------------------------------ log ring

class LogRing(logging.Handler):
    """Keeps the last `capacity` log records, formatted, for `log tail`. It sees what the
    process logs at its configured level (`appliance run --log-level`)."""

    def __init__(self, capacity: int = LOG_LINES) -> None:
        super().__init__(logging.NOTSET)
        self.records: collections.deque[str] = collections.deque(maxlen=capacity)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                                            "%Y-%m-%d %H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append(self.format(record))
        except Exception:  # a broken record must not break the code that logged it
            self.handleError(record)

    def tail(self, n: int) -> list[str]:
        items = list(self.records)
        return items[-n:] if n > 0 else []


# ---------------------------------------------------------------------------- metrics

def _samples(registry) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of the registry by sample name (collected once per command)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = collections.defaultdict(list)
    for family in registry.collect():
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def _value(samples: dict, name: str, **labels: str) -> float:
    total = 0.0
    for have, value in samples.get(name, ()):
        if all(have.get(k) == v for k, v in labels.items()):
            total += value
    return total


def _by_label(samples: dict, name: str, label: str, **labels: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for have, value in samples.get(name, ()):
        if all(have.get(k) == v for k, v in labels.items()):
            out[have.get(label, "")] = out.get(have.get(label, ""), 0.0) + value
    return out


def _histogram(samples: dict, name: str, **labels: str) -> dict[str, Any]:
    """count, mean and bucket-bound quantiles (upper bounds, as Prometheus would say) of a histogram."""
    count = _value(samples, f"{name}_count", **labels)
    total = _value(samples, f"{name}_sum", **labels)
    buckets = sorted((float(le), v) for le, v in _by_label(samples, f"{name}_bucket", "le", **labels).items())
    out: dict[str, Any] = {"count": int(count), "mean": total / count if count else None}
    for q in (0.5, 0.99):
        bound = None
        if count:
            for le, cumulative in buckets:
                if cumulative >= q * count:
                    bound = le
                    break
        out[f"p{round(q * 100)}"] = bound
    return out


class RateTracker:
    """Samples the source and module counters every second; rates are over the last ~5 s."""

    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self._read = read
        self._history: collections.deque[tuple[float, dict[str, float]]] = collections.deque(maxlen=RATE_SPAN)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="control-rates", daemon=True)

    def start(self) -> None:
        self._sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)

    def _sample(self) -> None:
        try:
            values = self._read()
        except Exception:   # a scrape racing a reload: skip this sample
            log.debug("rate sample failed", exc_info=True)
            return
        with self._lock:
            self._history.append((time.monotonic(), values))

    def _run(self) -> None:
        while not self._stop.wait(RATE_PERIOD_S):
            self._sample()

    def rate(self, key: str) -> float | None:
        """Per second over the sampled span, ending now; None before there is a span."""
        now_values = self._read()
        now = time.monotonic()
        with self._lock:
            history = list(self._history)
        past = next(((t, v) for t, v in history if now - t >= 0.5 and key in v), None)
        if past is None or key not in now_values:
            return None
        return max(0.0, now_values[key] - past[1][key]) / (now - past[0])


# ------------------------------------------------------------------------------ formatting

def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.2f}"


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _duration(s: float) -> str:
    s = int(s)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms" if seconds < 0.01 else f"{seconds * 1000:.0f} ms"


def _rate(r: float | None) -> str:
    return "-" if r is None else _si(r) if r >= 100 else f"{r:.1f}"


def _run_quietly(cmd: list[str]) -> str | None:
    """A read-only system command's output, or None where it is absent or fails (a dev machine)."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def process_uptime_s() -> float | None:
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def process_usage() -> dict[str, float]:
    """CPU seconds (self and reaped children) and resident memory of the supervisor process."""
    import resource
    own = resource.getrusage(resource.RUSAGE_SELF)
    out = {"cpu_seconds": own.ru_utime + own.ru_stime}
    try:
        with open("/proc/self/statm") as f:
            out["rss_bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    return out


_SECRET_KEYS = {"password", "password_hash", "secret", "token"}


def redact(value: Any, key: str = "") -> Any:
    """The config as shown to an operator: passwords, tokens and HTTP header values hidden."""
    if isinstance(value, dict):
        return {k: ("<hidden>" if key == "headers" and v is not None else redact(v, str(k)))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if key in _SECRET_KEYS and value is not None:
        return "<hidden>"
    return value


# -------------------------------------------------------------------------------- commands

HELP = [
    ("status", "gateway, sources, modules and events at a glance"),
    ("sensors", "each source: health, measured rate, errors"),
    ("modules [list]", "modules: state, windows, faults, restarts"),
    ("modules stats NAME", "one module: counters, call time, last features"),
    ("modules restart NAME", "restart now (also clears backoff and quarantine)"),
    ("modules disable NAME", "stop it until enabled (until the appliance restarts)"),
    ("modules enable NAME", "start a disabled module again"),
    ("modules load NAME FILE", "replace the module's .wasm (checked first)"),
    ("events [tail N]", "the last N events, newest last (default 10)"),
    ("events show ID", "one event in full (its id, or 6+ characters of it)"),
    ("events requeue", "offer the events the upstream refused (parked) again, e.g. after fixing a token"),
    ("config [show]", "the running configuration (secrets hidden)"),
    ("config validate [FILE]", "check the config file (or FILE); applies nothing"),
    ("config reload", "validate the config file, then apply it"),
    ("metrics [summary]", "key figures from the Prometheus metrics"),
    ("metrics raw [PREFIX]", "exposition lines (of metrics starting with PREFIX)"),
    ("log tail [N]", "the last N log lines (default 20)"),
    ("version", "software version"),
    ("system", "host name, uptime, memory, disks, addresses, the appliance's systemd services"),
    ("help [COMMAND]", "this list, or the lines of one command"),
]
TOP_LEVEL = ("help", "status", "sensors", "modules", "events", "config", "metrics", "log", "version", "system")
SERVICES = ("appliance.service", "appliance-console.service", "appliance-system.service",
            "appliance-grow-data.service")
SHORT_HELP = "commands: " + " ".join(TOP_LEVEL) + " (help COMMAND for details)"


def help_lines(topic: str | None = None) -> list[str]:
    rows = [(c, d) for c, d in HELP if topic is None or c.split()[0] == topic]
    if not rows:
        raise CommandError(f"no command {topic!r}; {SHORT_HELP}")
    width = max(len(c) for c, _ in rows)
    return [f"  {c:<{width}}  {d}" for c, d in rows]


class Commands:
    """The command interpreter: one line in, one Reply out. No I/O of its own besides the
    supervisor's objects, so it is easy to test and to reuse."""

    def __init__(self, sup, *, config_path: Path | str | None = None, ring: LogRing | None = None,
                 rates: RateTracker | None = None) -> None:
        self.sup = sup
        self._config_path = Path(config_path) if config_path else None
        self.ring = ring
        self.rates = rates
        self._changing = threading.Lock()   # one operator action at a time

    @property
    def config_path(self) -> Path | None:
        return self._config_path or (Path(p) if (p := getattr(self.sup, "config_path", None)) else None)

    # ---- entry point

    def execute(self, line: str, who: str = "") -> Reply:
        try:
            words = shlex.split(line)
        except ValueError as exc:
            return Reply(False, [f"cannot parse the line: {exc}"])
        if not words:
            return Reply(True, [])
        handler = getattr(self, f"cmd_{words[0].replace('-', '_')}", None) if words[0] in TOP_LEVEL else None
        if handler is None:
            near = difflib.get_close_matches(words[0], TOP_LEVEL, n=1, cutoff=0.6)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            return Reply(False, [f"unknown command '{words[0]}'.{hint} {SHORT_HELP}"])
        try:
            return handler(words[1:], who)
        except CommandError as exc:
            return Reply(False, str(exc).split("\n"))
        except Exception as exc:  # report, never kill the connection thread
            log.exception("control: command %r failed", line)
            return Reply(False, [f"internal error: {type(exc).__name__}: {exc}"])

    # ---- helpers

    def _module(self, name: str):
        modules = dict(self.sup.modules)
        if name not in modules:
            near = difflib.get_close_matches(name, list(modules), n=1, cutoff=0.6)
            hint = f"; did you mean '{near[0]}'?" if near else f" (modules: {', '.join(modules) or 'none'})"
            raise CommandError(f"no module '{name}'{hint}")
        return modules[name]

    @staticmethod
    def _count(args: list[str], default: int) -> int:
        if not args:
            return default
        if not args[0].isdigit() or not 1 <= int(args[0]) <= TAIL_MAX:
            raise CommandError(f"'{args[0]}' is not a count from 1 to {TAIL_MAX}")
        return int(args[0])

    @staticmethod
    def _usage(text: str) -> CommandError:
        return CommandError(f"usage: {text}")

    def _rate(self, key: str) -> float | None:
        return self.rates.rate(key) if self.rates else None

    # ---- help, version

    def cmd_help(self, args: list[str], who: str) -> Reply:
        if args:
            return Reply(True, help_lines(args[0]))
        return Reply(True, ["commands:", *help_lines()])

    def cmd_version(self, args: list[str], who: str) -> Reply:
        data = {"version": __version__, "gateway": self.sup.cfg.gateway.name, "python": platform.python_version(),
                "system": f"{platform.system()} {platform.release()} {platform.machine()}"}
        return Reply(True, [f"appliance {__version__} (gateway {data['gateway']}; Python {data['python']}; "
                            f"{data['system']})"], data)

    def cmd_system(self, args: list[str], who: str) -> Reply:
        """The machine around the appliance, for a service engineer on the serial line."""
        data: dict[str, Any] = {"hostname": socket.gethostname(), "kernel": platform.release()}
        lines = [f"host     {data['hostname']}, Linux {data['kernel']} {platform.machine()}"]
        with contextlib.suppress(OSError, ValueError, IndexError):
            up = float(Path("/proc/uptime").read_text().split()[0])
            load = Path("/proc/loadavg").read_text().split()[:3]
            data.update(uptime_s=up, load=[float(x) for x in load])
            lines.append(f"uptime   {_duration(up)}, load {' '.join(load)}")
        with contextlib.suppress(OSError, ValueError):
            mem = {k: int(v.split()[0]) * 1024 for k, v in
                   (line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)}
            data["memory"] = {"total": mem["MemTotal"], "available": mem["MemAvailable"]}
            lines.append(f"memory   {_bytes(mem['MemAvailable'])} available of {_bytes(mem['MemTotal'])}")
        disks = {}
        for label, path in (("root", Path("/")), ("data", self.sup.cfg.gateway.data_dir)):
            with contextlib.suppress(OSError):
                usage = shutil.disk_usage(path)
                disks[label] = {"path": str(path), "total": usage.total, "free": usage.free}
                lines.append(f"disk     {label:<5} {str(path):<18} {_bytes(usage.free)} free of {_bytes(usage.total)}")
        data["disks"] = disks
        addresses = _run_quietly(["ip", "-brief", "address", "show", "up"])
        if addresses is not None:
            data["addresses"] = [line.split() for line in addresses.splitlines() if line.strip()]
            lines += [f"address  {' '.join(words)}" for words in data["addresses"] if words[0] != "lo"]
        units = _run_quietly(["systemctl", "show", "--property=Id,ActiveState,SubState,NRestarts", *SERVICES])
        if units is not None:
            data["services"] = {}
            for block in units.strip().split("\n\n"):
                props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
                if props.get("Id"):
                    data["services"][props["Id"]] = props
                    lines.append(f"service  {props['Id']:<28} {props.get('ActiveState', '?')}/{props.get('SubState', '?')}"
                                 f", {props.get('NRestarts', '0')} restarts")
        else:
            lines.append("service  (not under systemd here)")
        return Reply(True, lines, data)

    # ---- status, sensors

    def cmd_status(self, args: list[str], who: str) -> Reply:
        sup = self.sup
        st = sup.status()
        spool = sup.spool.stats()
        uptime = process_uptime_s()
        data = {**st, "version": __version__, "uptime_s": uptime, "spool": spool}
        lines = [f"gateway  {st['gateway']}, appliance {__version__}"
                 + (f", up {_duration(uptime)}" if uptime is not None else "")]
        for name, s in st["sources"].items():
            lines.append(f"source   {name:<16} {s['health']:<9} {s['reason']}".rstrip())
        for name, m in st["modules"].items():
            note = m["reason"] if m["state"] != "running" else f"{m['processed']} windows, {m['reason']}"
            lines.append(f"module   {name:<16} {m['state']:<9} {note}".rstrip())
        age = f", oldest {_duration(spool['oldest_age_s'])}" if spool["depth"] else ""
        parked = f", {int(spool['parked'])} parked" if spool["parked"] else ""
        lines.append(f"events   {st['events_emitted']} since start; spool {int(spool['depth'])} "
                     f"({_bytes(spool['bytes'])}{age}{parked})")
        up = sup.cfg.uplink
        if up.transport == "none":
            lines.append("uplink   none")
        else:
            m = _samples(sup.metrics.registry)
            connected = _value(m, "appliance_upstream_connected")
            lines.append(f"uplink   {up.transport} {'connected' if connected else 'NOT connected'}, "
                         f"{_value(m, 'appliance_upstream_sent_events_total'):.0f} sent, "
                         f"{_value(m, 'appliance_upstream_failures_total'):.0f} failures")
        return Reply(True, lines, data)

    def cmd_sensors(self, args: list[str], who: str) -> Reply:
        sup = self.sup
        m = _samples(sup.metrics.registry)
        lines = [f"{'source':<16} {'type':<14} {'health':<8} {'rate':>9} {'nominal':>9}  {'errors':>6}  note"]
        data = {}
        for name, source in list(sup.sources.items()):
            health, reason = source.health
            try:
                info = source.info
                channels, nominal = len(info.channels), info.sample_rate
            except Exception:   # info of a source that never opened may be unknown
                channels, nominal = 0, None
            rate = self._rate(f"s:{name}")
            frames = rate / channels if rate is not None and channels else None
            errors = _value(m, "appliance_source_errors_total", source=name)
            driver = {k: v for k, v in _by_label(m, "appliance_source_driver_events_total", "event",
                                                 source=name).items() if v}
            note = ", ".join([reason] * bool(reason) + [f"{k} {v:.0f}" for k, v in driver.items()])
            data[name] = {"type": source.type_name or type(source).__name__, "health": health.value,
                          "reason": reason, "channels": channels, "frames_per_s": frames,
                          "nominal_hz": nominal, "samples": _value(m, "appliance_source_samples_total", source=name),
                          "errors": errors, "driver": driver}
            lines.append(f"{name:<16} {data[name]['type']:<14} {health.value:<8} {_rate(frames) + ' Hz':>9} "
                         f"{(_si(nominal) + ' Hz') if nominal else '-':>9}  {errors:>6.0f}  "
                         f"{channels} ch{'; ' + note if note else ''}")
        if not data:
            lines = ["no sources"]
        return Reply(True, lines, data)

    # ---- modules

    def cmd_modules(self, args: list[str], who: str) -> Reply:
        sub = args[0] if args else "list"
        usage = "modules [list | stats NAME | restart NAME | disable NAME | enable NAME | load NAME FILE.wasm]"
        need = {"list": 0, "stats": 1, "restart": 1, "disable": 1, "enable": 1, "load": 2}
        if sub not in need or len(args) - 1 != need[sub] and not (sub == "list" and len(args) <= 1):
            raise self._usage(usage)
        if sub == "list":
            return self._modules_list()
        if sub == "stats":
            return self._module_stats(self._module(args[1]))
        if sub == "load":
            return self._module_load(args[1], args[2], who)
        host = self._module(args[1])
        with self._changing:
            log.info("control: modules %s %s (%s)", sub, host.name, who or "operator")
            if sub == "restart":
                if not host.restart(f"restarted by operator{' (' + who + ')' if who else ''}"):
                    raise CommandError(f"module {host.name} is {host.state.value}; "
                                       f"{'enable it first' if host.state.value == 'disabled' else 'not restarted'}")
                return Reply(True, [f"module {host.name}: restarting"])
            if sub == "disable":
                return Reply(True, [disable_module(host, f"disabled by operator{' (' + who + ')' if who else ''}")])
            return Reply(True, [enable_module(host, f"enabled by operator{' (' + who + ')' if who else ''}")])

    def _modules_list(self) -> Reply:
        m = _samples(self.sup.metrics.registry)
        lines = [f"{'module':<16} {'state':<11} {'source':<12} {'windows':>8} {'/s':>6} {'dropped':>7} "
                 f"{'faults':>6} {'restarts':>8}"]
        data = {}
        for name, host in list(self.sup.modules.items()):
            dropped = _value(m, "appliance_module_windows_dropped_total", module=name)
            faults = _value(m, "appliance_module_faults_total", module=name)
            restarts = _value(m, "appliance_module_restarts_total", module=name)
            rate = self._rate(f"m:{name}")
            data[name] = {"state": host.state.value, "reason": host.reason, "source": host.cfg.source,
                          "processed": host.processed, "windows_per_s": rate, "dropped": dropped, "faults": faults,
                          "restarts": restarts, "last_fault": host.last_fault, "wasm": str(host.cfg.wasm)}
            lines.append(f"{name:<16} {host.state.value:<11} {host.cfg.source:<12} {host.processed:>8} "
                         f"{_rate(rate):>6} {dropped:>7.0f} {faults:>6.0f} {restarts:>8.0f}")
            if host.last_fault:
                lines.append(f"  last fault: {host.last_fault}")
        if not data:
            lines = ["no modules configured"]
        return Reply(True, lines, data)

    def _module_stats(self, host) -> Reply:
        name, cfg = host.name, host.cfg
        m = _samples(self.sup.metrics.registry)
        dropped = _by_label(m, "appliance_module_windows_dropped_total", "reason", module=name)
        faults = {k: v for k, v in _by_label(m, "appliance_module_faults_total", "kind", module=name).items() if v}
        calls = _histogram(m, "appliance_module_call_seconds", module=name)
        rate = self._rate(f"m:{name}")
        window = (f"window {cfg.window.size} frames, hop {cfg.window.hop_frames}" if cfg.window else "every frame")
        features = dict(host.last_features)
        data = {"state": host.state.value, "reason": host.reason, "wasm": str(cfg.wasm), "source": cfg.source,
                "processed": host.processed, "windows_per_s": rate,
                "rejected": _value(m, "appliance_module_windows_rejected_total", module=name),
                "dropped": dropped, "faults": faults, "calls": calls,
                "restarts": _value(m, "appliance_module_restarts_total", module=name),
                "quarantined": bool(_value(m, "appliance_module_quarantined", module=name)),
                "last_fault": host.last_fault, "features": features}
        lines = [
            f"module     {name}: {host.state.value}" + (f" ({host.reason})" if host.reason else ""),
            f"wasm       {cfg.wasm}",
            f"input      source {cfg.source}, {window}, deadline {cfg.deadline_ms:g} ms, queue {cfg.queue}",
            f"windows    {host.processed} processed ({_rate(rate)}/s), {data['rejected']:.0f} rejected",
            "dropped    " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(dropped.items())),
            "faults     " + (", ".join(f"{k} {v:.0f}" for k, v in sorted(faults.items())) or "none"),
            f"restarts   {data['restarts']:.0f}; quarantined {'yes' if data['quarantined'] else 'no'}",
            f"call time  mean {_ms(calls['mean'])}, p50 <= {_ms(calls['p50'])}, p99 <= {_ms(calls['p99'])} "
            f"({calls['count']} calls)",
            f"last fault {host.last_fault or '-'}",
        ]
        if features:
            items = [f"{k}={v:.4g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in features.items()]
            row = "features  "
            for item in items:
                if len(row) + len(item) > 78 and row.strip() != "features":
                    lines.append(row.rstrip())
                    row = " " * 10
                row += " " + item
            lines.append(row.rstrip())
        return Reply(True, lines, data)

    def _module_load(self, name: str, path: str, who: str) -> Reply:
        load = getattr(self.sup, "load_module", None)
        if load is None:
            raise CommandError("modules load: not available in this build")
        if not path.endswith(".wasm"):
            raise CommandError(f"{path} is not a .wasm file")
        from appliance.config import ConfigError
        with self._changing:
            log.info("control: modules load %s %s (%s)", name, path, who or "operator")
            try:
                return Reply(True, [str(load(name, path))])
            except ConfigError as exc:
                raise CommandError("\n".join(str(i) for i in exc.issues)) from None
            except (OSError, ValueError, RuntimeError) as exc:
                raise CommandError(f"modules load {name}: {exc}") from None

    # ---- events

    def cmd_events(self, args: list[str], who: str) -> Reply:
        sub = args[0] if args else "tail"
        if sub.isdigit():   # `events 5`
            sub, args = "tail", ["tail", *args]
        if sub == "tail" and len(args) <= 2:
            n = self._count(args[1:], 10)
            events = self.sup.spool.tail(n)
            lines = [f"{e['time']} {e['severity']:<8} {e['source']}/{e['module']}: {e['message']} [{e['id']}]"
                     for e in events]
            return Reply(True, lines or ["no events in the spool"], events)
        if sub == "show" and len(args) == 2:
            event = self._find_event(args[1])
            return Reply(True, json.dumps(event, indent=2, sort_keys=True).split("\n"), event)
        if sub == "requeue" and len(args) == 1:
            n = self.sup.spool.requeue_parked()
            log.info("control: events requeue (%s): %d parked event(s) offered upstream again", who, n)
            if n and getattr(self.sup, "forwarder", None) is not None:
                self.sup.forwarder.notify()
            return Reply(True, [f"{n} parked event(s) will be offered upstream again"], {"requeued": n})
        raise self._usage("events [tail N | show ID | requeue]")

    def _find_event(self, key: str) -> dict:
        key = key.strip().lower()
        if len(key) < 6 or any(c not in "0123456789abcdef-" for c in key):
            raise CommandError("an event id is hex digits and '-'; give it whole or at least 6 characters of it")
        path = Path(self.sup.spool.path)
        try:
            # A reader of its own: WAL lets it read beside the supervisor's writer.
            db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
        except sqlite3.Error as exc:
            raise CommandError(f"cannot read the spool: {exc}") from None
        try:
            rows = db.execute("SELECT body FROM events WHERE id = ? OR id LIKE ? OR id LIKE ? "
                              "ORDER BY seq DESC LIMIT 3", (key, key + "%", "%" + key)).fetchall()
        except sqlite3.Error as exc:
            raise CommandError(f"cannot read the spool: {exc}") from None
        finally:
            db.close()
        exact = [r for r in rows if json.loads(r[0])["id"] == key]
        if exact:
            rows = exact
        if not rows:
            raise CommandError(f"no event {key} in the spool (it may have gone upstream already)")
        if len(rows) > 1:
            raise CommandError(f"'{key}' matches several events; give more of the id")
        return json.loads(rows[0][0])

    # ---- config

    def cmd_config(self, args: list[str], who: str) -> Reply:
        sub = args[0] if args else "show"
        if sub == "show" and len(args) <= 1:
            import yaml
            data = redact(self.sup.cfg.model_dump(mode="json"))
            where = f"# running configuration (from {self.config_path})" if self.config_path else \
                "# running configuration"
            text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=78)
            return Reply(True, [where, "# defaults filled in, secrets hidden", *text.rstrip().split("\n")], data)
        if sub == "validate" and len(args) <= 2:
            return self._validate(Path(args[1]) if len(args) == 2 else self.config_path)
        if sub == "reload" and len(args) == 1:
            return self._reload(who)
        raise self._usage("config [show | validate [FILE] | reload]")

    def _validate(self, path: Path | None) -> Reply:
        if path is None:
            raise CommandError("this appliance's config file is not known here; give one: config validate FILE")
        from appliance.config import ConfigError, load_config_document
        from appliance.modcheck import check_modules
        try:
            doc, cfg = load_config_document(path)
            issues = check_modules(doc, cfg)
            if issues:
                raise ConfigError(issues)
        except ConfigError as exc:
            n = len(exc.issues)
            raise CommandError("\n".join([f"{n} error{'s' if n != 1 else ''} in {path}:",
                                          *(f"  {i}" for i in exc.issues)])) from None
        return Reply(True, [f"{path}: ok ({len(cfg.sources)} sources, {len(cfg.modules)} modules)"],
                     {"ok": True, "sources": len(cfg.sources), "modules": len(cfg.modules)})

    def _reload(self, who: str) -> Reply:
        reload = getattr(self.sup, "reload_config", None)
        if reload is None:
            raise CommandError("config reload: not available in this build")
        from appliance.config import ConfigError
        with self._changing:
            log.info("control: config reload (%s)", who or "operator")
            try:
                result = reload()
            except ConfigError as exc:
                n = len(exc.issues)
                raise CommandError("\n".join([f"not reloaded, still running the previous config; {n} "
                                              f"error{'s' if n != 1 else ''}:",
                                              *(f"  {i}" for i in exc.issues)])) from None
            except (OSError, ValueError, RuntimeError) as exc:
                raise CommandError(f"config reload failed: {type(exc).__name__}: {exc}") from None
        return Reply(True, str(result).split("\n"))

    # ---- metrics, log

    def cmd_metrics(self, args: list[str], who: str) -> Reply:
        sub = args[0] if args else "summary"
        if sub == "summary" and len(args) <= 1:
            return self._metrics_summary()
        if sub == "raw" and len(args) <= 2:
            from prometheus_client import generate_latest
            prefix = args[1] if len(args) == 2 else ""
            text = generate_latest(self.sup.metrics.registry).decode()
            lines = [line for line in text.split("\n") if line and
                     (line.split(" ", 3)[2] if line.startswith("#") and line.count(" ") >= 2 else line)
                     .startswith(prefix)]
            return Reply(True, lines or [f"no metric starting with '{prefix}'"])
        raise self._usage("metrics [summary | raw [PREFIX]]")

    def _metrics_summary(self) -> Reply:
        sup = self.sup
        m = _samples(sup.metrics.registry)
        lines = ["sources"]
        for name in list(sup.sources):
            rate = self._rate(f"s:{name}")
            lines.append(f"  {name:<16} up {_value(m, 'appliance_source_up', source=name):.0f}  "
                         f"samples {_si(_value(m, 'appliance_source_samples_total', source=name))} "
                         f"({_rate(rate)}/s)  bytes {_bytes(_value(m, 'appliance_source_bytes_total', source=name))}"
                         f"  errors {_value(m, 'appliance_source_errors_total', source=name):.0f}")
        lines.append("modules")
        for name in list(sup.modules):
            calls = _histogram(m, "appliance_module_call_seconds", module=name)
            lines.append(f"  {name:<16} up {_value(m, 'appliance_module_up', module=name):.0f}  "
                         f"windows {_value(m, 'appliance_module_windows_total', module=name):.0f}  "
                         f"dropped {_value(m, 'appliance_module_windows_dropped_total', module=name):.0f}  "
                         f"faults {_value(m, 'appliance_module_faults_total', module=name):.0f}  "
                         f"restarts {_value(m, 'appliance_module_restarts_total', module=name):.0f}  "
                         f"p99 <= {_ms(calls['p99'])}")
        severities = _by_label(m, "appliance_events_total", "severity")
        lines.append("events     " + ", ".join(f"{k} {v:.0f}" for k, v in severities.items()) +
                     f"; lost {_value(m, 'appliance_events_lost_total'):.0f}")
        lines.append(f"spool      {_value(m, 'appliance_spool_events'):.0f} events, "
                     f"{_bytes(_value(m, 'appliance_spool_bytes'))}, oldest "
                     f"{_duration(_value(m, 'appliance_spool_oldest_age_seconds'))}, "
                     f"{_value(m, 'appliance_spool_evicted_total'):.0f} evicted, "
                     f"{_value(m, 'appliance_spool_errors_total'):.0f} errors")
        lines.append(f"upstream   connected {_value(m, 'appliance_upstream_connected'):.0f}, "
                     f"sent {_value(m, 'appliance_upstream_sent_events_total'):.0f}, "
                     f"failed {_value(m, 'appliance_upstream_failures_total'):.0f}, "
                     f"bytes {_bytes(_value(m, 'appliance_upstream_bytes_total'))}, "
                     f"reduction {_value(m, 'appliance_data_reduction_ratio'):.0f}x")
        usage = process_usage()
        cpu = m.get("process_cpu_seconds_total") and _value(m, "process_cpu_seconds_total") or usage["cpu_seconds"]
        rss = m.get("process_resident_memory_bytes") and _value(m, "process_resident_memory_bytes") \
            or usage.get("rss_bytes", 0)
        lines.append(f"process    cpu {cpu:.1f} s, memory {_bytes(rss)}")
        return Reply(True, lines)

    def cmd_log(self, args: list[str], who: str) -> Reply:
        if not args or args[0] != "tail" or len(args) > 2:
            raise self._usage("log tail [N]")
        n = self._count(args[1:], 20)
        if self.ring is None:
            raise CommandError("no log buffer in this process")
        lines = self.ring.tail(n)
        return Reply(True, lines or ["(no log lines yet)"], lines)


# ---------------------------------------------------------------- disable / enable (host level)

def disable_module(host, reason: str = "disabled by operator") -> str:
    """Stop a module's worker and keep it stopped; windows meant for it count as dropped."""
    done = host.disable(reason)
    if done is False:
        raise CommandError(f"module {host.name} is {host.state.value}; not disabled")
    return done if isinstance(done, str) else f"module {host.name}: disabled (until enabled or the appliance restarts)"


def enable_module(host, reason: str = "enabled by operator") -> str:
    done = host.enable(reason)
    if done is False:
        raise CommandError(f"module {host.name} is {host.state.value}, not disabled")
    return done if isinstance(done, str) else f"module {host.name}: enabled, starting"


# ---------------------------------------------------------------------------------- server

class ControlServer:
    """Serves Commands on a unix socket. start() binds (refusing if another live appliance
    already serves that path), stop() closes every connection and removes the socket."""

    def __init__(self, sup, path: Path | str | None = None, *, config_path: Path | str | None = None) -> None:
        self.sup = sup
        self.path = Path(path) if path else socket_path(sup.cfg.gateway.data_dir)
        self.ring = LogRing()
        self.rates = RateTracker(self._counters)
        self.commands = Commands(sup, config_path=config_path, ring=self.ring, rates=self.rates)
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._clients: dict[socket.socket, threading.Thread] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="control-accept", daemon=True)

    def _counters(self) -> dict[str, float]:
        reg = self.sup.metrics.registry
        out = {}
        for name in list(self.sup.sources):
            out[f"s:{name}"] = reg.get_sample_value("appliance_source_samples_total", {"source": name}) or 0.0
        for name in list(self.sup.modules):
            out[f"m:{name}"] = reg.get_sample_value("appliance_module_windows_total", {"module": name}) or 0.0
        return out

    def start(self) -> "ControlServer":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            # Before listen(): until then a connect() is refused, so nobody gets in while the
            # file still has the umask's mode.
            os.chmod(self.path, 0o600)
            sock.listen(MAX_CLIENTS)
        except OSError:
            sock.close()
            raise
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        sock.settimeout(0.25)
        self._sock = sock
        logging.getLogger().addHandler(self.ring)
        self.rates.start()
        self._thread.start()
        log.info("control socket at %s", self.path)
        return self

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{self.path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink()   # left by a process that died: nobody listens
            return
        finally:
            probe.close()
        raise OSError(f"another appliance serves {self.path}; not starting a second control socket")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        with self._lock:
            clients = list(self._clients.items())
        for conn, _ in clients:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for _, thread in clients:
            thread.join(2.0)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:   # only our own socket: a newer process may have bound the path since
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    self.path.unlink()
            except FileNotFoundError:
                pass
        self.rates.stop()
        logging.getLogger().removeHandler(self.ring)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                log.exception("control: accept failed")
                time.sleep(0.5)
                continue
            who = self._peer(conn)
            if who is None:
                conn.close()
                continue
            conn.settimeout(CLIENT_IDLE_S)   # an idle client gives its slot back
            with self._lock:
                if len(self._clients) >= MAX_CLIENTS:
                    with contextlib.suppress(OSError):
                        conn.sendall(Reply(False, [f"too many control connections ({MAX_CLIENTS})"]).encode(False))
                    conn.close()
                    continue
                thread = threading.Thread(target=self._serve, args=(conn, who), name="control-client", daemon=True)
                self._clients[conn] = thread
            thread.start()

    @staticmethod
    def _peer(conn: socket.socket) -> str | None:
        """'uid U pid P' of the peer; None (refused) unless it is our own user or root."""
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _ = struct.unpack("3i", creds)
        except OSError:
            return None   # who it is cannot be told: refuse
        if uid not in (0, os.getuid()):
            log.warning("control: refused a connection from uid %d (pid %d)", uid, pid)
            return None
        return f"pid {pid}"

    def _serve(self, conn: socket.socket, who: str) -> None:
        try:
            reader = conn.makefile("rb")
            while not self._stop.is_set():
                try:
                    raw = reader.readline(MAX_LINE + 1)
                except OSError:
                    return
                if not raw:
                    return
                if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
                    conn.sendall(Reply(False, [f"request longer than {MAX_LINE} bytes"]).encode(False))
                    return
                line = raw.decode("utf-8", "replace").strip()
                as_json = line.startswith("json ") or line == "json"
                if as_json:
                    line = line[4:].strip()
                # A client may announce what it is (e.g. "console /dev/ttyGS0") for the log.
                if line.startswith("hello "):
                    who = f"{line[6:].strip()[:80]}, {who}"
                    reply = Reply(True, [f"appliance {__version__}"])
                else:
                    reply = self.commands.execute(line, who)
                conn.sendall(reply.encode(as_json))
        except OSError:
            return
        finally:
            with self._lock:
                self._clients.pop(conn, None)
            with contextlib.suppress(OSError):
                conn.close()


# ---------------------------------------------------------------------------------- client

class ControlError(Exception):
    """The control socket cannot be reached or answered nonsense."""


class ControlClient:
    """One connection to a ControlServer, (re)opened on demand."""

    def __init__(self, path: Path | str, timeout_s: float = 120.0, hello: str | None = None) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.hello = hello
        self._sock: socket.socket | None = None
        self._reader = None

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            reason = "no such socket" if isinstance(exc, FileNotFoundError) else \
                "nobody listening" if isinstance(exc, ConnectionRefusedError) else exc.strerror or str(exc)
            raise ControlError(f"the appliance is not running (control socket {self.path}: {reason})") from None
        self._sock, self._reader = sock, sock.makefile("rb")
        if self.hello:
            self._exchange(f"hello {self.hello}")

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._reader.close()
                self._sock.close()
        self._sock = self._reader = None

    def _exchange(self, line: str) -> Reply:
        self._sock.sendall(line.replace("\n", " ").encode() + b"\n")
        status = self._reader.readline()
        if not status:
            raise ConnectionResetError("the appliance closed the connection")
        status = status.rstrip(b"\r\n")
        if status not in (b"OK", b"ERR"):
            raise ControlError(f"unexpected reply from {self.path}: {status[:80]!r}")
        lines = []
        while True:
            raw = self._reader.readline()
            if not raw:
                raise ConnectionResetError("the appliance closed the connection mid-reply")
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not text:
                return Reply(status == b"OK", lines)
            lines.append(text)

    def request(self, line: str) -> Reply:
        """Send one command; reconnect once if the appliance restarted since the last one."""
        for attempt in (0, 1):
            try:
                if self._sock is None:
                    self._connect()
                return self._exchange(line)
            except socket.timeout:
                self.close()
                raise ControlError(f"no answer from the appliance within {self.timeout_s:.0f} s") from None
            except ControlError:
                self.close()
                raise
            except OSError:
                self.close()
                if attempt:
                    raise ControlError("the appliance closed the connection") from None
        raise AssertionError("unreachable")
