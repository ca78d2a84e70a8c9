"""Commands on modules: list, stats, restart, disable, enable, load."""
from __future__ import annotations

import logging
from pathlib import Path

from appliance.ops.control.protocol import CommandError, Reply
from appliance.ops.control.samples import by_label, histogram, metric_samples, metric_value
from appliance.ops.control.text import ms, per_s

log = logging.getLogger("appliance.control")

class ModuleCommands:
    # ---- modules

    def cmd_modules(self, args: list[str], who: str) -> Reply:
        sub = args[0] if args else "list"
        usage = ("modules [list | stats NAME | restart NAME | disable NAME | enable NAME | load NAME FILE.apb|FILE.wasm"
                 " | revert NAME]")
        need = {"list": 0, "stats": 1, "restart": 1, "disable": 1, "enable": 1, "load": 2, "revert": 1}
        if sub not in need or len(args) - 1 != need[sub] and not (sub == "list" and len(args) <= 1):
            raise self._usage(usage)
        if sub == "list":
            return self._modules_list()
        if sub == "stats":
            return self._module_stats(self._module(args[1]))
        if sub == "load":
            return self._module_load(args[1], args[2], who)
        host = self._module(args[1])
        if sub == "revert":
            fleet = getattr(self.sup, "fleet", None)
            wanted = fleet.wanted().get(host.name) if fleet is not None else None
            if wanted is not None:
                raise CommandError(f"module {host.name}: the fleet's desired state asks for version "
                                   f"{wanted[1]['version']}, which would come back at once; change it there "
                                   "(appliance fleet rollback)")
            with self._changing:
                log.info("control: modules revert %s (%s)", host.name, who or "operator")
                return Reply(True, [self.sup.deployer.revert(host.name, who)])
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
        m = metric_samples(self.sup.metrics.registry)
        lines = [f"{'module':<16} {'state':<11} {'source':<12} {'windows':>8} {'/s':>6} {'dropped':>7} "
                 f"{'faults':>6} {'restarts':>8}"]
        data = {}
        for name, host in list(self.sup.modules.items()):
            dropped = metric_value(m, "appliance_module_windows_dropped_total", module=name)
            faults = metric_value(m, "appliance_module_faults_total", module=name)
            restarts = metric_value(m, "appliance_module_restarts_total", module=name)
            rate = self._rate(f"m:{name}")
            data[name] = {"state": host.state.value, "reason": host.reason, "source": host.cfg.source,
                          "processed": host.processed, "windows_per_s": rate, "dropped": dropped, "faults": faults,
                          "restarts": restarts, "last_fault": host.last_fault, "wasm": str(host.cfg.wasm),
                          "deploy": self.sup.deployer.describe(name)}
            lines.append(f"{name:<16} {host.state.value:<11} {host.cfg.source:<12} {host.processed:>8} "
                         f"{per_s(rate):>6} {dropped:>7.0f} {faults:>6.0f} {restarts:>8.0f}")
            if host.last_fault:
                lines.append(f"  last fault: {host.last_fault}")
        if not data:
            lines = ["no modules configured"]
        return Reply(True, lines, data)

    def _module_stats(self, host) -> Reply:
        name, cfg = host.name, host.cfg
        m = metric_samples(self.sup.metrics.registry)
        dropped = by_label(m, "appliance_module_windows_dropped_total", "reason", module=name)
        faults = {k: v for k, v in by_label(m, "appliance_module_faults_total", "kind", module=name).items() if v}
        calls = histogram(m, "appliance_module_call_seconds", module=name)
        rate = self._rate(f"m:{name}")
        window = (f"window {cfg.window.size} frames, hop {cfg.window.hop_frames}" if cfg.window else "every frame")
        features = dict(host.last_features)
        data = {"state": host.state.value, "reason": host.reason, "wasm": str(cfg.wasm), "source": cfg.source,
                "processed": host.processed, "windows_per_s": rate,
                "rejected": metric_value(m, "appliance_module_windows_rejected_total", module=name),
                "dropped": dropped, "faults": faults, "calls": calls,
                "restarts": metric_value(m, "appliance_module_restarts_total", module=name),
                "quarantined": bool(metric_value(m, "appliance_module_quarantined", module=name)),
                "last_fault": host.last_fault, "features": features}
        deployed = self.sup.deployer.describe(name)
        data["deploy"] = deployed
        lines = [
            f"module     {name}: {host.state.value}" + (f" ({host.reason})" if host.reason else ""),
            f"wasm       {cfg.wasm}",
            "version    " + (f"{deployed['version']} (deployed, signed by {deployed['signer']}" if deployed["version"]
                             else "the configured file (no deployed version") + (
                f"; on probation, {deployed['probation_left']} windows to go)" if deployed["probation_left"] is not None
                else ")"),
            f"input      source {cfg.source}, {window}, deadline {cfg.deadline_ms:g} ms, queue {cfg.queue}",
            f"windows    {host.processed} processed ({per_s(rate)}/s), {data['rejected']:.0f} rejected",
            "dropped    " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(dropped.items())),
            "faults     " + (", ".join(f"{k} {v:.0f}" for k, v in sorted(faults.items())) or "none"),
            f"restarts   {data['restarts']:.0f}; quarantined {'yes' if data['quarantined'] else 'no'}",
            f"call time  mean {ms(calls['mean'])}, p50 <= {ms(calls['p50'])}, p99 <= {ms(calls['p99'])} "
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
        """A bundle (.apb) is deployed: verified, checked, swapped, on probation, rolled back on a
        fault (docs/deploy.md). A bare .wasm from the modules directory runs until the next start."""
        if path.endswith(".apb"):
            from appliance.deploy.deployer import DeployRefused
            bundle = self._in_modules_dir(path)
            with self._changing:
                log.info("control: modules load %s %s (%s)", name, bundle, who or "operator")
                try:
                    return Reply(True, [self.sup.deployer.deploy(bundle, who, module=name)])
                except DeployRefused as exc:
                    raise CommandError(f"modules load {name}: refused, nothing changed: {exc}") from None
        load = getattr(self.sup, "load_module", None)
        if load is None:
            raise CommandError("modules load: not available in this build")
        if not path.endswith(".wasm"):
            raise CommandError(f"{path} is neither a module bundle (.apb) nor a .wasm file")
        path = str(self._in_modules_dir(path))
        from appliance.config.schema import ConfigError
        with self._changing:
            log.info("control: modules load %s %s (%s)", name, path, who or "operator")
            try:
                return Reply(True, [str(load(name, path))])
            except ConfigError as exc:
                raise CommandError("\n".join(str(i) for i in exc.issues)) from None
            except (OSError, ValueError, RuntimeError) as exc:
                raise CommandError(f"modules load {name}: {exc}") from None

    def _in_modules_dir(self, path: str) -> Path:
        """A module file from the modules directory and nowhere else (a name there, or a path
        that resolves inside it, links followed): the console must not run any readable file."""
        cfg = self.sup.cfg
        dirs = ([cfg.runtime.modules_dir] if cfg.runtime.modules_dir else
                sorted({Path(m.wasm).resolve().parent for m in cfg.modules.values()}))
        if not dirs:
            raise CommandError("modules load: no modules directory (set runtime.modules_dir)")
        allowed = [d.resolve() for d in dirs]
        candidate = Path(path)
        resolved = (candidate if candidate.is_absolute() else allowed[0] / candidate).resolve()
        if not any(resolved.is_relative_to(d) for d in allowed):
            raise CommandError(f"{path}: modules load takes modules from {', '.join(map(str, allowed))} only "
                               "(runtime.modules_dir)")
        return resolved


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
