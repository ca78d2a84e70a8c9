"""The command interpreter: one line in, one Reply out.

Each command group is a file here, its commands methods of one class (cmd_<word>); Commands
puts the groups together. Commands run in the connection's thread; they only read the
supervisor's state or call its thread-safe methods (ModuleHost.restart, Spool.tail,
sup.reload_config, sup.load_module). To add a command: a cmd_<word> method in the group it
belongs to (or a new group file, listed in Commands' bases), a HELP row and a TOP_LEVEL word.
"""
from __future__ import annotations

import difflib
import logging
import shlex
import threading
from pathlib import Path

from appliance.ops.control.commands.config import ConfigCommands
from appliance.ops.control.commands.events import EventCommands
from appliance.ops.control.commands.metrics import MetricsCommands
from appliance.ops.control.commands.modules import ModuleCommands
from appliance.ops.control.commands.status import StatusCommands
from appliance.ops.control.commands.system import SystemCommands
from appliance.ops.control.logring import LogRing
from appliance.ops.control.protocol import CommandError, Reply
from appliance.ops.control.samples import RateTracker

log = logging.getLogger("appliance.control")
TAIL_MAX = 1000


HELP = [
    ("status", "gateway, sources, modules and events at a glance"),
    ("sensors", "each source: health, measured rate, errors"),
    ("modules [list]", "modules: state, windows, faults, restarts"),
    ("modules stats NAME", "one module: counters, call time, last features"),
    ("modules restart NAME", "restart now (also clears backoff and quarantine)"),
    ("modules disable NAME", "stop it until enabled (until the appliance restarts)"),
    ("modules enable NAME", "start a disabled module again"),
    ("modules load NAME FILE", "deploy a signed bundle (.apb: checked, on probation, rolled back on a fault), "
                               "or run a .wasm from the modules directory until the next start"),
    ("modules revert NAME", "drop the deployed version: the module runs the file the config names"),
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


class Commands(SystemCommands, StatusCommands, ModuleCommands, EventCommands, ConfigCommands, MetricsCommands):
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

    def cmd_help(self, args: list[str], who: str) -> Reply:
        if args:
            return Reply(True, help_lines(args[0]))
        return Reply(True, ["commands:", *help_lines()])
