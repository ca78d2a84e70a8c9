"""Commands for the appliance at a glance: status, sensors."""
from __future__ import annotations

from appliance import __version__
from appliance.ops.control.protocol import Reply
from appliance.ops.control.samples import by_label, metric_samples, metric_value
from appliance.ops.control.sysinfo import process_uptime_s
from appliance.ops.control.text import duration, per_s, si, size


class StatusCommands:
    # ---- status, sensors

    def cmd_status(self, args: list[str], who: str) -> Reply:
        sup = self.sup
        st = sup.status()
        spool = sup.spool.stats()
        uptime = process_uptime_s()
        data = {**st, "version": __version__, "uptime_s": uptime, "spool": spool}
        lines = [f"gateway  {st['gateway']}, appliance {__version__}"
                 + (f", up {duration(uptime)}" if uptime is not None else "")]
        for name, s in st["sources"].items():
            lines.append(f"source   {name:<16} {s['health']:<9} {s['reason']}".rstrip())
        for name, m in st["modules"].items():
            note = m["reason"] if m["state"] != "running" else f"{m['processed']} windows, {m['reason']}"
            deployed = sup.deployer.describe(name)
            if deployed["version"]:
                note = f"v{deployed['version']}" + (" on probation" if deployed["probation_left"] is not None
                                                   else "") + (", UNSIGNED" if deployed["signer"] == "unsigned"
                                                               else "") + f", {note}"
            lines.append(f"module   {name:<16} {m['state']:<9} {note}".rstrip(" ,"))
        if sup.cfg.deploy.allow_unsigned:
            lines.append("deploy   UNSIGNED BUNDLES ALLOWED (deploy.allow_unsigned: development only)")
        age = f", oldest {duration(spool['oldest_age_s'])}" if spool["depth"] else ""
        parked = f", {int(spool['parked'])} parked" if spool["parked"] else ""
        lines.append(f"events   {st['events_emitted']} since start; spool {int(spool['depth'])} "
                     f"({size(spool['bytes'])}{age}{parked})")
        up = sup.cfg.uplink
        if up.transport == "none":
            lines.append("uplink   none")
        else:
            m = metric_samples(sup.metrics.registry)
            connected = metric_value(m, "appliance_upstream_connected")
            lines.append(f"uplink   {up.transport} {'connected' if connected else 'NOT connected'}, "
                         f"{metric_value(m, 'appliance_upstream_sent_events_total'):.0f} sent, "
                         f"{metric_value(m, 'appliance_upstream_failures_total'):.0f} failures")
        return Reply(True, lines, data)

    def cmd_sensors(self, args: list[str], who: str) -> Reply:
        sup = self.sup
        m = metric_samples(sup.metrics.registry)
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
            errors = metric_value(m, "appliance_source_errors_total", source=name)
            driver = {k: v for k, v in by_label(m, "appliance_source_driver_events_total", "event",
                                                 source=name).items() if v}
            note = ", ".join([reason] * bool(reason) + [f"{k} {v:.0f}" for k, v in driver.items()])
            data[name] = {"type": source.type_name or type(source).__name__, "health": health.value,
                          "reason": reason, "channels": channels, "frames_per_s": frames,
                          "nominal_hz": nominal, "samples": metric_value(m, "appliance_source_samples_total", source=name),
                          "errors": errors, "driver": driver}
            lines.append(f"{name:<16} {data[name]['type']:<14} {health.value:<8} {per_s(frames) + ' Hz':>9} "
                         f"{(si(nominal) + ' Hz') if nominal else '-':>9}  {errors:>6.0f}  "
                         f"{channels} ch{'; ' + note if note else ''}")
        if not data:
            lines = ["no sources"]
        return Reply(True, lines, data)
