"""Prometheus metrics of the appliance (catalog in docs/metrics.md).

One Metrics object per supervisor, with its own registry: tests run several supervisors in one
process, and the default global registry would make them collide. Label sets are bounded: the
names come from the config file, the reasons and kinds from fixed lists in this code.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client import GCCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

import os
import sys

from appliance import __version__
from appliance.core import malloc
from appliance.events.spool import sqlite_memory_used

# Round trip of one window through a worker; wasm3 calls range from ~20 µs to the deadline.
CALL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

FAULT_KINDS = ("trap", "deadline", "crash", "load", "abi", "params", "memory", "engine", "protocol", "sandbox")
HOST_ERRORS = ("state", "evidence", "oversize")   # the host's failures around a module, never its faults
DROP_REASONS = ("overflow", "unavailable", "fault", "stopped")
SEVERITIES = ("info", "warning", "alarm", "critical")


class SourceCounters:
    """Collects each driver's own counters at scrape time (bounded: a driver declares them)."""

    def __init__(self, sources: dict) -> None:
        self.sources = sources

    def collect(self):
        family = CounterMetricFamily("appliance_source_driver_events",
                                     "Driver-specific events: FIFO overruns, Modbus timeouts, CRC errors and "
                                     "exception responses, NMEA bad lines and checksums, ...",
                                     labels=["source", "event"])
        for name, source in self.sources.items():
            for counter in source.COUNTERS:
                family.add_metric([name, counter], float(getattr(source, counter, 0) or 0))
        yield family


class WorkerResources:
    """Memory and CPU of each module's worker process, read from /proc at scrape time."""

    def __init__(self, modules: dict) -> None:
        self.modules = modules
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._tick = os.sysconf("SC_CLK_TCK")

    def collect(self):
        memory = GaugeMetricFamily("appliance_module_memory_bytes", "Resident memory of the module's worker process",
                                   labels=["module"])
        cpu = CounterMetricFamily("appliance_module_cpu_seconds", "CPU time of the module's current worker process "
                                  "(starts again at a restart)", labels=["module"])
        for name, host in self.modules.items():
            pid = host.worker_pid
            if pid is None:
                continue
            try:
                rss_pages = int(open(f"/proc/{pid}/statm").read().split()[1])
                fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            except (OSError, IndexError, ValueError):
                continue   # the worker just exited
            memory.add_metric([name], rss_pages * self._page)
            cpu.add_metric([name], (int(fields[11]) + int(fields[12])) / self._tick)
        yield memory
        yield cpu


class SupervisorMemory:
    """Where the supervisor's own memory is, read at scrape time: resident pages by kind (a leak
    raises anonymous memory; library pages come and go with the page cache), malloc's heaps
    (in use, and free but kept), and the interpreter's allocated blocks. The soak (make soak)
    uses them to say which of these grew."""

    KINDS = {"RssAnon": "rss_anon", "RssFile": "rss_file", "RssShmem": "rss_shmem"}

    def collect(self):
        memory = GaugeMetricFamily("appliance_supervisor_memory_bytes", "The supervisor process's memory by kind: "
                                   "rss_anon, rss_file, rss_shmem (resident), malloc_in_use, malloc_free, sqlite "
                                   "(SQLite's own count, part of malloc_in_use)",
                                   labels=["kind"])
        try:
            for line in open("/proc/self/status"):
                key, _, value = line.partition(":")
                if key in self.KINDS:
                    memory.add_metric([self.KINDS[key]], int(value.split()[0]) * 1024)
        except (OSError, ValueError, IndexError):
            pass
        heap = malloc.stats()
        if heap is not None:
            memory.add_metric(["malloc_in_use"], heap["in_use"])
            memory.add_metric(["malloc_free"], heap["free"])
        in_sqlite = sqlite_memory_used()
        if in_sqlite is not None:
            memory.add_metric(["sqlite"], in_sqlite)
        yield memory
        yield GaugeMetricFamily("appliance_supervisor_python_blocks", "Memory blocks the supervisor's Python "
                                "interpreter has allocated (sys.getallocatedblocks)", value=sys.getallocatedblocks())


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)   # process_cpu_seconds_total, process_resident_memory_bytes, ...
        GCCollector(registry=r)        # python_gc_{objects_collected,objects_uncollectable,collections}_total
        r.register(SupervisorMemory())
        self.build = Info("appliance_build", "Version of the appliance software", registry=r)
        self.build.info({"version": __version__})
        self.source_samples = Counter("appliance_source_samples", "Samples read from a source (frames x channels)",
                                      ["source"], registry=r)
        self.source_bytes = Counter("appliance_source_bytes", "Bytes of sample data read from a source",
                                    ["source"], registry=r)
        self.source_errors = Counter("appliance_source_errors", "Source open/read errors", ["source"], registry=r)
        self.source_up = Gauge("appliance_source_up", "1 while the source delivers data, else 0",
                               ["source"], registry=r)
        self.windows = Counter("appliance_module_windows", "Windows a module processed", ["module"], registry=r)
        self.windows_dropped = Counter("appliance_module_windows_dropped",
                                       "Windows cut for a module but never processed, by reason",
                                       ["module", "reason"], registry=r)
        self.windows_rejected = Counter("appliance_module_windows_rejected",
                                        "Windows the module returned an error for", ["module"], registry=r)
        self.call_seconds = Histogram("appliance_module_call_seconds",
                                      "Round trip of one window through the module's worker",
                                      ["module"], buckets=CALL_BUCKETS, registry=r)
        self.faults = Counter("appliance_module_faults", "Module faults by kind", ["module", "kind"], registry=r)
        self.restarts = Counter("appliance_module_restarts", "Worker restarts after a fault or by an operator",
                                ["module"], registry=r)
        self.quarantined = Gauge("appliance_module_quarantined", "1 while the module is quarantined",
                                 ["module"], registry=r)
        self.module_up = Gauge("appliance_module_up", "1 while the module's worker is running", ["module"],
                               registry=r)
        self.events = Counter("appliance_events", "Events committed to the spool", ["module", "severity"],
                              registry=r)
        self.events_suppressed = Counter("appliance_events_suppressed", "Events a module raised beyond its rate "
                                         "limit (events.module_rate_per_min), summarised in one event per minute",
                                         ["module"], registry=r)
        self.host_errors = Counter("appliance_module_host_errors", "The host's own failures around a module "
                                   "(saving its state, its evidence, a window too large): not the module's faults",
                                   ["module", "what"], registry=r)
        self.sandbox_layers = Gauge("appliance_worker_sandbox_layers", "1 for each sandbox layer the module's "
                                    "worker runs in, 0 for one this kernel or machine lacks", ["module", "layer"],
                                    registry=r)
        self.spool_errors = Counter("appliance_spool_errors", "Failed commits to the event spool (events are held "
                                    "in memory and retried)", registry=r)
        self.events_lost = Counter("appliance_events_lost", "Events that never reached the spool (written to "
                                   "the log instead)", registry=r)
        self.spool_recoveries = Counter("appliance_spool_recoveries", "Damaged spools moved aside and salvaged "
                                        "at start", registry=r)
        self.spool_salvage_lost = Counter("appliance_spool_salvage_lost_events", "Events a damaged spool held that "
                                          "could not be read back (an estimate)", registry=r)
        self.deploys = Counter("appliance_module_deploys", "Module bundles by outcome: refused (verification or "
                               "check failed, nothing changed), started (on probation), committed, rolled_back",
                               ["module", "outcome"], registry=r)
        self.on_probation = Gauge("appliance_module_on_probation", "1 while a deployed version is on probation",
                                  ["module"], registry=r)
        self.module_version = Gauge("appliance_module_version_info", "1 for the version each module runs and where "
                                    "it came from (origin: config or deployed; signer: the key, or unsigned)",
                                    ["module", "version", "origin", "signer"], registry=r)
        self.allow_unsigned = Gauge("appliance_deploy_allow_unsigned", "1 when deploy.allow_unsigned lets unsigned "
                                    "bundles run (development only)", registry=r)
        self.spool_depth = Gauge("appliance_spool_events", "Events held in the local spool", registry=r)
        self.spool_bytes = Gauge("appliance_spool_bytes", "Bytes of events and attachments in the spool", registry=r)
        self.spool_age = Gauge("appliance_spool_oldest_age_seconds", "Age of the oldest event waiting in the spool",
                               registry=r)
        self.spool_parked = Gauge("appliance_spool_parked_events",
                                  "Events the upstream refused for good, kept in the spool", registry=r)
        self.spool_evicted = Counter("appliance_spool_evicted", "Events evicted because the spool was full "
                                     "(oldest of the lowest severity first)", registry=r)
        self.upstream_connected = Gauge("appliance_upstream_connected", "1 while the uplink is connected",
                                        registry=r)
        self.upstream_sent = Counter("appliance_upstream_sent_events", "Events the upstream acknowledged",
                                     registry=r)
        self.upstream_failed = Counter("appliance_upstream_failures", "Failed deliveries: transient (retried) or "
                                       "permanent (parked)", ["reason"], registry=r)
        self.upstream_bytes = Counter("appliance_upstream_bytes", "Bytes sent upstream (events, evidence, health)",
                                      registry=r)
        self.data_reduction = Gauge("appliance_data_reduction_ratio",
                                    "Bytes read from sensors per byte sent upstream", registry=r)
        for reason in ("transient", "permanent"):
            self.upstream_failed.labels(reason)

    def declare_module(self, name: str) -> None:
        """Create every labelled child up front, so dashboards see zeros rather than gaps."""
        self.windows.labels(name)
        self.windows_rejected.labels(name)
        self.restarts.labels(name)
        self.quarantined.labels(name).set(0)
        self.module_up.labels(name).set(0)
        for reason in DROP_REASONS:
            self.windows_dropped.labels(name, reason)
        for kind in FAULT_KINDS:
            self.faults.labels(name, kind)
        for sev in SEVERITIES:
            self.events.labels(name, sev)
        self.events_suppressed.labels(name)
        for what in HOST_ERRORS:
            self.host_errors.labels(name, what)

    def declare_source(self, name: str) -> None:
        self.source_samples.labels(name)
        self.source_bytes.labels(name)
        self.source_errors.labels(name)
        self.source_up.labels(name).set(0)
