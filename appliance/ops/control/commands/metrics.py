"""Commands on the metrics and the log: metrics, log."""
from __future__ import annotations

from appliance.ops.control.protocol import CommandError, Reply
from appliance.ops.control.samples import by_label, histogram, metric_samples, metric_value
from appliance.ops.control.sysinfo import process_usage
from appliance.ops.control.text import duration, ms, per_s, si, size


class MetricsCommands:
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
        m = metric_samples(sup.metrics.registry)
        lines = ["sources"]
        for name in list(sup.sources):
            rate = self._rate(f"s:{name}")
            lines.append(f"  {name:<16} up {metric_value(m, 'appliance_source_up', source=name):.0f}  "
                         f"samples {si(metric_value(m, 'appliance_source_samples_total', source=name))} "
                         f"({per_s(rate)}/s)  bytes {size(metric_value(m, 'appliance_source_bytes_total', source=name))}"
                         f"  errors {metric_value(m, 'appliance_source_errors_total', source=name):.0f}")
        lines.append("modules")
        for name in list(sup.modules):
            calls = histogram(m, "appliance_module_call_seconds", module=name)
            lines.append(f"  {name:<16} up {metric_value(m, 'appliance_module_up', module=name):.0f}  "
                         f"windows {metric_value(m, 'appliance_module_windows_total', module=name):.0f}  "
                         f"dropped {metric_value(m, 'appliance_module_windows_dropped_total', module=name):.0f}  "
                         f"faults {metric_value(m, 'appliance_module_faults_total', module=name):.0f}  "
                         f"restarts {metric_value(m, 'appliance_module_restarts_total', module=name):.0f}  "
                         f"p99 <= {ms(calls['p99'])}")
        severities = by_label(m, "appliance_events_total", "severity")
        lines.append("events     " + ", ".join(f"{k} {v:.0f}" for k, v in severities.items()) +
                     f"; lost {metric_value(m, 'appliance_events_lost_total'):.0f}")
        lines.append(f"spool      {metric_value(m, 'appliance_spool_events'):.0f} events, "
                     f"{size(metric_value(m, 'appliance_spool_bytes'))}, oldest "
                     f"{duration(metric_value(m, 'appliance_spool_oldest_age_seconds'))}, "
                     f"{metric_value(m, 'appliance_spool_evicted_total'):.0f} evicted, "
                     f"{metric_value(m, 'appliance_spool_errors_total'):.0f} errors")
        lines.append(f"upstream   connected {metric_value(m, 'appliance_upstream_connected'):.0f}, "
                     f"sent {metric_value(m, 'appliance_upstream_sent_events_total'):.0f}, "
                     f"failed {metric_value(m, 'appliance_upstream_failures_total'):.0f}, "
                     f"bytes {size(metric_value(m, 'appliance_upstream_bytes_total'))}, "
                     f"reduction {metric_value(m, 'appliance_data_reduction_ratio'):.0f}x")
        usage = process_usage()
        cpu = m.get("process_cpu_seconds_total") and metric_value(m, "process_cpu_seconds_total") or usage["cpu_seconds"]
        rss = m.get("process_resident_memory_bytes") and metric_value(m, "process_resident_memory_bytes") \
            or usage.get("rss_bytes", 0)
        lines.append(f"process    cpu {cpu:.1f} s, memory {size(rss)}")
        return Reply(True, lines)

    def cmd_log(self, args: list[str], who: str) -> Reply:
        if not args or args[0] != "tail" or len(args) > 2:
            raise self._usage("log tail [N]")
        n = self._count(args[1:], 20)
        if self.ring is None:
            raise CommandError("no log buffer in this process")
        lines = self.ring.tail(n)
        return Reply(True, lines or ["(no log lines yet)"], lines)
