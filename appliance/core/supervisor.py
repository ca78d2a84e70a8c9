"""The supervisor: the one place that owns the running appliance's state.

It opens the sources, cuts their streams into windows for each module, hosts every module in
its own worker (runtime/host.py), commits the events they raise to the spool and serves
metrics. Threads: one reader per source, one dispatcher per module; nothing else writes state.
"""
from __future__ import annotations

import collections
import gc
import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from typing import Any, Callable

from appliance.config.schema import AppConfig
from appliance.core import malloc
from appliance.events import evidence
from appliance.events.limit import EventBudget, Suppressed
from appliance.events.record import Attachment, iso_time, make_event
from appliance.events.spool import Spool
from appliance.ops.metrics import Metrics, SourceCounters, WorkerResources
from appliance.ops.system import in_test_rig
from appliance.runtime import zygote
from appliance.runtime.host import ModuleHost, ModuleResult, ModuleState, severity_name
from appliance.runtime.modcheck import engine_of
from appliance.runtime.process import deadline_grace_s
from appliance.core.windowing import FrameWindower, Window, Windower
from hal.registry import open_source
from hal.source import Health, Source

log = logging.getLogger("appliance.supervisor")
event_log = logging.getLogger("appliance.events")

SOURCE_BACKOFF_S = (0.5, 30.0)
UNSPOOLED_MAX = 10_000   # events held in memory while the spool cannot be written
MAINTENANCE_TICK_S = 2.0
# A full collection of reference cycles this often: CPython runs one by itself only once the
# objects that survived since the last one reach a quarter of all long-lived ones, which in a
# quiet supervisor (~280,000 objects) is hours apart, and cyclic garbage a library makes grows
# the heap until then. A collection takes some tens of milliseconds of the GIL.
FULL_COLLECTION_EVERY_S = 600.0
HANG_AFTER_S = 60.0      # silence beyond any bounded wait: the systemd watchdog is no longer fed


@dataclass
class Pipeline:
    module: ModuleHost
    windower: Windower
    source: str
    channel_names: tuple[str, ...]


class Supervisor:
    def __init__(self, cfg: AppConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        if cfg.events.spool_durability != "full" and not in_test_rig():
            raise ValueError(f"events.spool_durability: {cfg.events.spool_durability!r} loses committed events at "
                             "a power cut; it is only for the image rig (appliance.testrig on the kernel command line)")
        self.spool = Spool(cfg.gateway.data_dir / "spool.db", cfg.events.spool_max_mb << 20,
                           on_evict=self.metrics.spool_evicted.inc, recover=True,
                           durability=cfg.events.spool_durability)
        m = self.metrics
        m.spool_depth.set_function(self.spool.depth)
        m.spool_bytes.set_function(lambda: self.spool.stats()["bytes"])
        m.spool_age.set_function(lambda: self.spool.stats()["oldest_age_s"])
        m.spool_parked.set_function(lambda: self.spool.stats()["parked"])
        m.data_reduction.set_function(self._data_reduction)
        self.sources: dict[str, Source] = {}
        self.pipelines: dict[str, list[Pipeline]] = {}
        self.modules: dict[str, ModuleHost] = {}
        self.events_emitted = 0
        self._unspooled: collections.deque[tuple[dict[str, Any], list]] = collections.deque()
        self._emit_lock = threading.Lock()
        self._event_budgets: dict[str, EventBudget] = {}
        zygote.configure(str(cfg.runtime.zygote or zygote.service_socket() or "") or None)
        self._subscribers: tuple[Callable[[str, Window, ModuleResult], None], ...] = ()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ended: set[str] = set()
        self._metrics_server = None
        self.metrics_port: int | None = None
        self.forwarder = self._make_forwarder()
        self.fleet = None
        if self.spool.recovery is not None:
            self._report_spool_recovery(self.spool.recovery)

        self._source_stops: dict[str, threading.Event] = {}
        self._source_threads: dict[str, threading.Thread] = {}
        self.control = None
        self._reload_lock = threading.Lock()
        self.config_path: Path | None = None   # the file that runs (the card's, or one the fleet delivered)
        self.config_base: Path | None = None   # where relative paths start: the card's YAML's folder
        self.configs = None                    # delivered configs (use_config_files)
        self.last_maintenance = time.monotonic()
        self._maintenance: threading.Thread | None = None

        for name, scfg in cfg.sources.items():
            self.sources[name] = open_source(name, scfg)
            self.pipelines[name] = []
            self.metrics.declare_source(name)
        self.metrics.registry.register(SourceCounters(self.sources))
        self.metrics.registry.register(WorkerResources(self.modules))
        from appliance.deploy.deployer import Deployer
        self.deployer = Deployer(self)   # which deployed version each module runs, if any
        if cfg.fleet.enabled:
            from appliance.deploy.channel import FleetChannel
            self.fleet = FleetChannel(self, self.forwarder.transport, cfg.fleet.groups)
        for name, mcfg in cfg.modules.items():
            pipe = self._build_pipeline(name, mcfg)
            self.modules[name] = pipe.module
            self.pipelines[mcfg.source].append(pipe)

    def _build_pipeline(self, name: str, mcfg, sources: dict[str, Source] | None = None,
                        cfg: AppConfig | None = None) -> Pipeline:
        """A module's host and windower for its source (not started): the YAML's section, with
        the file of the version deployed for it if there is one."""
        cfg = cfg or self.cfg
        mcfg = self.deployer.effective(name, mcfg)
        info = (sources or self.sources)[mcfg.source].info
        missing = [c for c in (mcfg.channels or []) if c not in info.channels]
        if missing:
            raise ValueError(f"module {name}: {', '.join(map(repr, missing))} not among the channels of source "
                             f"{mcfg.source!r} ({', '.join(info.channels)})")
        picked = [info.channels.index(c) for c in mcfg.channels] if mcfg.channels else None
        names = tuple(mcfg.channels) if mcfg.channels else info.channels
        if info.kind == "video":
            # The camera's max_frame per channel; the memfd stays sparse until written.
            window_bytes = len(names) * (info.frame_pixels or 4096 * 4096)
            windower = FrameWindower(mcfg.window.hop_frames if mcfg.window else 1, info.sample_rate, picked)
        else:
            window_bytes = 4 * len(names) * mcfg.window.size
            windower = Windower(mcfg.window.size, mcfg.window.hop_frames, info.sample_rate, picked)
        host = ModuleHost(name, mcfg, cfg.runtime, window_bytes, self.metrics,
                          on_result=self._on_result, on_state=self._on_module_state,
                          state_dir=cfg.gateway.data_dir / "state",
                          cache_dir=cfg.gateway.data_dir / "cache")
        pipe = Pipeline(host, windower, mcfg.source, names)
        host.pipeline = pipe   # results in flight after a reload retired it still find their source
        self.deployer.attach(name, host)
        return pipe

    def _make_forwarder(self):
        up = self.cfg.uplink
        if up.transport == "none":
            return None
        from appliance.uplink.forwarder import Forwarder
        if up.transport == "mqtt":
            from appliance.uplink.mqtt import MqttTransport
            transport = MqttTransport(up.mqtt, self.cfg.gateway.name)
        else:
            from appliance.uplink.http import HttpTransport
            transport = HttpTransport(up.http)
        return Forwarder(self.spool, transport, self.metrics, backoff_s=up.backoff_s, backoff_max_s=up.backoff_max_s,
                         batch=up.batch, health_interval_s=up.health_interval_s, health=self.health_summary)

    def health_summary(self) -> dict[str, Any]:
        """What goes upstream at a slow rate: states and counts, never raw data."""
        status = self.status()
        return {"gateway": self.cfg.gateway.name, "time": iso_time(time.time_ns()),
                "sources": status["sources"], "modules": {n: {"state": m["state"], "processed": m["processed"]}
                                                          for n, m in status["modules"].items()},
                "spool": self.spool.stats(), "events_emitted": self.events_emitted}

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self.cfg.metrics.enabled:
            from prometheus_client import start_http_server
            server, _ = start_http_server(self.cfg.metrics.port, self.cfg.metrics.listen,
                                          registry=self.metrics.registry)
            self._metrics_server = server
            self.metrics_port = server.server_port
            log.info("metrics on http://%s:%d/metrics", self.cfg.metrics.listen, self.metrics_port)
        for host in self.modules.values():
            host.start()
        parked = self.spool.requeue_parked()
        if parked:   # refused before; the uplink's config may have been fixed since
            log.warning("spool: %d parked event(s) will be offered upstream again", parked)
        if self.fleet is not None:
            self.fleet.start()
        if self.forwarder is not None:
            self.forwarder.start()
        self._maintenance = threading.Thread(target=self._maintain, name="maintenance", daemon=True)
        self._maintenance.start()
        from appliance.ops.control.server import ControlServer
        try:
            self.control = ControlServer(self).start()
        except OSError as exc:   # the console is for service; the appliance runs without it
            log.error("control socket not available: %s", exc)
        for name in self.sources:
            self._start_source(name)

    def stop(self, drain_s: float = 1.0) -> None:
        """Stop reading, give the modules a bounded time to finish queued windows, stop them."""
        self._stop.set()
        got = self._reload_lock.acquire(timeout=60)   # a reload in progress finishes first
        try:
            self._stop_locked(drain_s)
        finally:
            if got:
                self._reload_lock.release()

    def _stop_locked(self, drain_s: float) -> None:
        if self.control is not None:
            self.control.stop()
        self._stop.set()
        for stop in self._source_stops.values():
            stop.set()                    # wakes a reader waiting out a backoff
        for source in self.sources.values():
            self._close_quietly(source)   # wakes a reader blocked in read()
        # Readers first: a window a reader still cuts once the modules drain would be lost. Closing
        # a source wakes its reader at once; the bound is for a driver stuck in the kernel.
        for t in self._threads:
            t.join(10.0)
            if t.is_alive():
                log.warning("%s did not stop within 10 s; its last block may be dropped", t.name)
        end = time.monotonic() + drain_s
        for host in self.modules.values():
            if host.state is ModuleState.RUNNING:
                host.wait_idle(max(0.0, end - time.monotonic()))
        for host in self.modules.values():
            host.stop()
        for name, budget in self._event_budgets.items():   # what was held back is said before the end
            host = self.modules.get(name)
            self._summarise_suppressed(name, host.cfg.source if host else "", budget.summary_due(force=True))
        if self.fleet is not None:
            self.fleet.stop()
        if self.forwarder is not None:
            self.forwarder.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        with self._emit_lock:
            self._flush_unspooled()
            for event, _ in self._unspooled:
                # Last resort before exit: the log keeps what the spool could not.
                self.metrics.events_lost.inc()
                log.error("spool: event never committed, logged here instead: %s", json.dumps(event))
        self.spool.close()

    # ---- live reload -------------------------------------------------------------------------

    LIVE_SECTIONS = ("sources", "modules")

    def use_config_files(self, card: Path, running: Path) -> None:
        """The card's YAML and the file that runs (cli: ConfigStore.choose() picked it); from here
        the fleet may deliver configs, and `config reload` applies the same choice."""
        from appliance.deploy.configs import ConfigDeployer, ConfigStore
        self.config_path, self.config_base = running, card.resolve().parent
        self.configs = ConfigDeployer(self, ConfigStore(self.cfg.gateway.data_dir / "config", card),
                                      self.cfg.deploy.config_probation_s)

    def reload_config(self, path: Path | None = None) -> str:
        """Apply a new config file without a restart: validate it first (a bad file changes
        nothing and raises ConfigError with file:line), then restart only the sources and modules
        whose section changed (or whose .wasm bytes changed). Unchanged pipelines keep running
        and lose no sample. Returns what was done, in words."""
        from appliance.config.schema import ConfigError, load_config_document
        from appliance.runtime.modcheck import check_modules
        if path is None and self.configs is not None:
            path = self.configs.store.choose()   # the card's file, if it was edited since a delivery
        path = Path(path or self.config_path or "")
        doc, new = load_config_document(path, self.config_base)
        with self._reload_lock:
            if self._stop.is_set():
                raise RuntimeError("the appliance is stopping; reload refused")
            old = self.cfg
            src_changed = {n for n in new.sources.keys() & old.sources.keys() if new.sources[n] != old.sources[n]}
            src_added, src_removed = new.sources.keys() - old.sources.keys(), old.sources.keys() - new.sources.keys()
            mod_changed = {n for n in new.modules.keys() & old.modules.keys()
                           if new.modules[n] != old.modules[n] or n not in self.modules
                           or self.modules[n].wasm_changed()
                           or new.modules[n].source in src_changed}
            mod_added, mod_removed = new.modules.keys() - old.modules.keys(), old.modules.keys() - new.modules.keys()
            judged = new.model_copy(update={"modules": {n: new.modules[n] for n in mod_added | mod_changed}})
            issues = check_modules(doc, judged)   # the modules judge their new params before any swap
            if issues:
                raise ConfigError(issues)
            frozen = [k for k in type(new).model_fields if k not in self.LIVE_SECTIONS
                      and getattr(new, k) != getattr(old, k)]
            merged = new.model_copy(update={k: getattr(old, k) for k in frozen})
            # Prepare everything new without touching what runs: a failure here changes nothing.
            new_sources = {n: open_source(n, new.sources[n]) for n in src_added | src_changed}
            sources = {**{n: s for n, s in self.sources.items() if n not in src_removed | src_changed},
                       **new_sources}
            new_pipes = [self._build_pipeline(n, new.modules[n], sources, merged) for n in sorted(mod_added | mod_changed)]
            # Commit.
            for name in mod_removed | mod_changed:
                self._retire_module(name, old.modules[name].source)
            for name in src_removed | src_changed:
                self._stop_source(name)
            for name, source in new_sources.items():
                self.sources[name] = source
                self.pipelines[name] = []
                self.metrics.declare_source(name)
            self.cfg = merged
            for pipe in new_pipes:
                self.modules[pipe.module.name] = pipe.module
                pipe.module.start()
                # One assignment: a source thread sees the old list or the new one, never half.
                self.pipelines[pipe.source] = [*self.pipelines.get(pipe.source, []), pipe]
            for name in new_sources:
                self._start_source(name)
        done = [f"{what} {', '.join(sorted(names))}" for what, names in (
            ("restarted sources", src_changed), ("added sources", src_added), ("removed sources", src_removed),
            ("restarted modules", mod_changed), ("added modules", mod_added), ("removed modules", mod_removed))
            if names]
        summary = "; ".join(done) or "nothing changed"
        if frozen:
            summary += f" (changes to {', '.join(frozen)} take effect at the next start)"
        log.info("config %s reloaded: %s", path, summary)
        return summary

    def check_module_file(self, name: str, path: Path) -> None:
        """Start `path` as module `name` in a throwaway worker (its params judged by ap_init) and
        stop it; ValueError with the reason if it does not start."""
        from appliance.runtime.modcheck import try_start
        from appliance.runtime.process import ModuleFault
        from appliance.runtime.validate import ModuleRejected
        if name not in self.cfg.modules:
            raise ValueError(f"no module {name!r} (modules: {', '.join(self.cfg.modules)})")
        try:
            try_start(name, self.cfg.modules[name].model_copy(update={"wasm": path}), self.cfg.runtime)
        except (ModuleRejected, ModuleFault) as exc:
            raise ValueError(f"{path} not loaded: {exc}") from None

    def load_module(self, name: str, path: str | Path) -> str:
        """Run another build of a module now (the console's `modules load` of a .wasm from the
        modules directory): checked in a throwaway worker first, then swapped in like a reload.
        Until the YAML names the new file, the next reload or start goes back to the configured
        one. Bundles (.apb) take the deploy path instead (self.deployer.deploy)."""
        path = Path(path).resolve()
        running = self.deployer.describe(name)["version"] if name in self.cfg.modules else None
        if running:
            raise ValueError(f"module {name} runs deployed version {running}, which a .wasm would not replace: "
                             f"`modules revert {name}` first, or load a bundle (.apb)")
        with self._reload_lock:
            self.check_module_file(name, path)
            new = self.cfg.modules[name].model_copy(update={"wasm": path})
            self.cfg = self.cfg.model_copy(update={"modules": {**self.cfg.modules, name: new}})
            self._swap_pipeline(name)
        log.info("module %s: now running %s", name, path)
        return f"module {name}: loaded {path}"

    def run_module_version(self, name: str):
        """Rebuild module `name` with what the deployer says runs now; the new host."""
        with self._reload_lock:
            if self._stop.is_set():
                raise RuntimeError("the appliance is stopping")
            return self._swap_pipeline(name)

    def _swap_pipeline(self, name: str):
        mcfg = self.cfg.modules[name]
        self._retire_module(name, mcfg.source)
        pipe = self._build_pipeline(name, mcfg)
        self.modules[name] = pipe.module
        pipe.module.start()
        self.pipelines[pipe.source] = [*self.pipelines.get(pipe.source, []), pipe]
        return pipe.module

    def _retire_module(self, name: str, source: str) -> None:
        host = self.modules.pop(name)
        self.pipelines[source] = [p for p in self.pipelines.get(source, []) if p.module is not host]
        host.stop()

    def _stop_source(self, name: str) -> None:
        stop = self._source_stops.pop(name, None)
        if stop is not None:
            stop.set()
        source = self.sources.pop(name)
        self._close_quietly(source)
        thread = self._source_threads.pop(name, None)
        if thread is not None:
            thread.join(2.0)      # its last block must not reach the replacement's pipelines
        self.pipelines.pop(name, None)
        self.metrics.source_up.labels(name).set(0)

    @staticmethod
    def _close_quietly(source: Source) -> None:
        try:
            source.close()
        except Exception:  # closing is best effort; the process is going away
            log.exception("closing source %s", source.name)

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def all_sources_ended(self) -> bool:
        return len(self._ended) == len(self.sources)

    def wait_until_done(self, timeout_s: float | None = None) -> bool:
        """For finite (replay) sources: wait until they ended and every module is idle."""
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.all_sources_ended():
            if self._stop.wait(0.05) or (end is not None and time.monotonic() > end):
                return False
        waiting = (ModuleState.RUNNING, ModuleState.STARTING, ModuleState.BACKOFF)
        for host in self.modules.values():
            left = 3600.0 if end is None else max(0.0, end - time.monotonic())
            if host.state in waiting and not host.wait_idle(left):
                return False
        return True

    # ---- sources -----------------------------------------------------------------------------

    def _start_source(self, name: str) -> None:
        stop = self._source_stops[name] = threading.Event()
        t = threading.Thread(target=self._read_source, args=(name, self.sources[name], stop), name=f"source-{name}",
                             daemon=True)
        self._threads.append(t)
        self._source_threads[name] = t
        t.start()

    def _read_source(self, name: str, source: Source, stop: threading.Event) -> None:
        samples = self.metrics.source_samples.labels(name)
        nbytes = self.metrics.source_bytes.labels(name)
        up = self.metrics.source_up.labels(name)
        delay = SOURCE_BACKOFF_S[0]
        stopped = lambda: self._stop.is_set() or stop.is_set()   # noqa: E731
        while not stopped():
            try:
                source.open()
                if stopped():             # closed (stop or reload) while it was opening
                    self._close_quietly(source)
                    return
                source.set_health(Health.OK)
                up.set(1)
                for p in self.pipelines.get(name, ()):
                    p.windower.reset()
                while not stopped():
                    block = source.read()
                    if stopped():
                        return   # stopped (or replaced by a reload) while reading: drop the block
                    if block is None:
                        source.set_health(Health.ENDED, "end of recording")
                        up.set(0)
                        log.info("source %s: ended", name)
                        self._ended.add(name)
                        return
                    samples.inc(block.data.size)
                    nbytes.inc(block.data.nbytes)
                    delay = SOURCE_BACKOFF_S[0]
                    # Read the list each block: a reload swaps it in one assignment.
                    for p in self.pipelines.get(name, ()):
                        for window in p.windower.push(block):
                            p.module.submit(window)
            except Exception as exc:  # any driver failure: count, report, back off, reopen
                if stopped():
                    return   # stop() closed the source under a blocked read: not a failure
                self.metrics.source_errors.labels(name).inc()
                up.set(0)
                source.set_health(Health.FAILED, f"{type(exc).__name__}: {exc}")
                log.error("source %s: %s: %s; reopening in %.1f s", name, type(exc).__name__, exc, delay)
                try:
                    source.close()
                except Exception:
                    log.exception("source %s: close after failure", name)
                stop.wait(delay)
                delay = min(delay * 2, SOURCE_BACKOFF_S[1])

    # ---- results -----------------------------------------------------------------------------

    @staticmethod
    def _pipeline_of(host: ModuleHost) -> Pipeline:
        return host.pipeline

    def subscribe(self, on_result: Callable[[str, Window, ModuleResult], None]) -> Callable[[], None]:
        """Call on_result(module name, window, result) for every window a module processed, from
        that module's dispatcher thread, once the supervisor has committed the window's events.
        For evaluations, benchmarks and tests. Returns the function that unsubscribes."""
        with self._emit_lock:
            self._subscribers = (*self._subscribers, on_result)

        def unsubscribe() -> None:
            with self._emit_lock:
                self._subscribers = tuple(s for s in self._subscribers if s is not on_result)
        return unsubscribe

    def _on_result(self, host: ModuleHost, window: Window, result: ModuleResult) -> None:
        if result.events:
            self._commit_events(host, window, result)
        budget = self._event_budgets.get(host.name)
        if budget is not None:
            self._summarise_suppressed(host.name, host.cfg.source, budget.summary_due())
        self.deployer.on_result(host, result)
        for subscriber in self._subscribers:
            try:
                subscriber(host.name, window, result)
            except Exception:   # a watcher's bug must not stop the module's results
                log.exception("result subscriber %r failed", subscriber)

    def _commit_events(self, host: ModuleHost, window: Window, result: ModuleResult) -> None:
        pipe = self._pipeline_of(host)
        info = {"seq": window.seq, "start": iso_time(window.start_ns), "frames": int(window.data.shape[1]),
                "sample_rate": window.sample_rate, "channels": list(pipe.channel_names)}
        if window.image is not None:
            info["width"], info["height"] = window.image[1], window.image[0]
        attached: list[Attachment] = []
        ev = self.cfg.events
        budget = self._event_budgets.get(host.name)
        if budget is None:
            budget = self._event_budgets[host.name] = EventBudget(ev.module_rate_per_min, ev.module_burst,
                                                                  ev.suppressed_summary_s)
        for severity, score, message in result.events:
            if not budget.take(severity):
                self.metrics.events_suppressed.labels(host.name).inc()
                continue
            if severity > 0 and not attached:
                attached = self._evidence(host, window, result)
            attachments = attached if severity > 0 else []
            self.emit(make_event(gateway=self.cfg.gateway.name, source=pipe.source, module=host.name,
                                  severity=severity, score=score, message=message, window=info,
                                  features=result.features, attachments=attachments), attachments)

    def _summarise_suppressed(self, module: str, source: str, held: Suppressed | None) -> None:
        if held is None:
            return
        ev = self.cfg.events
        self.emit(make_event(gateway=self.cfg.gateway.name, source=source, module=module, severity=1,
                             score=float(held.count), kind="events_suppressed", window={},
                             features={"suppressed": float(held.count), "worst_severity": float(held.worst)},
                             message=f"module {module} suppressed {held.count} events (the worst: "
                                     f"{severity_name(held.worst)}) beyond its limit of {ev.module_burst} at once "
                                     f"and {ev.module_rate_per_min:g} per minute"))

    def _evidence(self, host: ModuleHost, window: Window, result: ModuleResult) -> list[Attachment]:
        """The window's evidence; if the host cannot make it, the event goes without (said, counted)."""
        try:
            return evidence.attachments(window.data, window.image, result.features,
                                        max_bytes=self.cfg.events.attachment_max_kb << 10,
                                        attach_window=self.cfg.events.attach_window,
                                        sample_rate=window.sample_rate,
                                        dropped=lambda name, why: self.metrics.host_errors.labels(
                                            host.name, "evidence").inc())
        except Exception as exc:   # evidence is the host's job: never the module's fault, never a lost event
            self.metrics.host_errors.labels(host.name, "evidence").inc()
            log.error("module %s: evidence for window %d could not be made (%s: %s); the event goes without it",
                      host.name, window.seq, type(exc).__name__, exc)
            return []

    def _report_spool_recovery(self, recovery) -> None:
        self.metrics.spool_recoveries.inc()
        self.metrics.spool_salvage_lost.inc(recovery.lost)
        self.emit(make_event(gateway=self.cfg.gateway.name, source="gateway", module="spool", severity=2,
                             score=float(recovery.lost), kind="spool_damaged", window={},
                             features={"recovered": float(recovery.recovered), "lost": float(recovery.lost),
                                       "evidence_lost": float(recovery.attachments_lost)},
                             message=recovery.describe()))

    def _on_module_state(self, host: ModuleHost, state: ModuleState, reason: str) -> None:
        self.deployer.on_state(host, state.value, reason)
        if state is ModuleState.QUARANTINED:
            # Operators must hear about a module that stopped watching its machine.
            self.emit(make_event(gateway=self.cfg.gateway.name, source=host.cfg.source, module=host.name,
                                  severity=2, score=0.0, kind="module_quarantined",
                                  message=f"module {host.name} quarantined: {reason}", window={}, features={}))

    @property
    def events_waiting(self) -> int:
        """Events emitted by modules but not yet committed (the spool failed; retried)."""
        return len(self._unspooled)

    def emit(self, event: dict[str, Any], attachments: list[Attachment] | tuple = ()) -> None:
        """Commit an event to the spool (the one path every event takes); if the spool fails,
        it waits in memory (bounded) and is retried."""
        """Commit, then count and log. If the spool cannot take it (disk full, I/O error) the
        event waits in memory, in order, and goes in at the next successful commit."""
        with self._emit_lock:   # module dispatcher threads emit concurrently
            if len(self._unspooled) >= UNSPOOLED_MAX:
                lost, _ = self._unspooled.popleft()
                self.metrics.events_lost.inc()
                log.error("spool: %d events waiting in memory; this one is only in the log: %s",
                          UNSPOOLED_MAX, json.dumps(lost))
            self._unspooled.append((event, attachments))
            self._flush_unspooled()

    def _flush_unspooled(self) -> None:
        while self._unspooled:
            event, attachments = self._unspooled[0]
            try:
                self.spool.append(event, attachments)
            except (sqlite3.Error, OSError) as exc:
                self.metrics.spool_errors.inc()
                log.error("spool: cannot commit event %s (%s); %d event(s) wait in memory", event["id"], exc,
                          len(self._unspooled))
                return
            self._unspooled.popleft()
            self.events_emitted += 1
            if self.forwarder is not None:
                self.forwarder.notify()
            self.metrics.events.labels(event["module"], event["severity"]).inc()
            if self.cfg.events.log:
                event_log.warning("EVENT %s %s/%s score=%s: %s [id %s]", event["severity"].upper(),
                                  event["source"], event["module"], _fmt(event["score"]), event["message"],
                                  event["id"])

    def _maintain(self) -> None:
        """A slow tick: events held in memory (the disk was full) go in as soon as they can,
        not only at the next anomaly; the spool's age bound is applied."""
        next_expiry = 0.0
        next_collection = time.monotonic() + FULL_COLLECTION_EVERY_S
        while not self._stop.wait(MAINTENANCE_TICK_S):
            self.last_maintenance = time.monotonic()
            if self._unspooled:
                with self._emit_lock:
                    self._flush_unspooled()
            if time.monotonic() >= next_collection:
                next_collection = time.monotonic() + FULL_COLLECTION_EVERY_S
                gc.collect()
            if time.monotonic() >= next_expiry:
                next_expiry = time.monotonic() + 60.0
                # Freed memory scattered through the heaps goes back to the kernel: the
                # supervisor's resident size follows what it holds, not what it once held.
                malloc.trim()
                try:
                    self.spool.expire(self.cfg.events.spool_max_age_h * 3600)
                except (sqlite3.Error, OSError) as exc:
                    log.error("spool: age bound not applied: %s", exc)

    def hang_problems(self) -> list[str]:
        """What makes this supervisor hung rather than busy (empty when healthy): the maintenance
        tick (it takes the emit lock, so a deadlock there stops it) or a module dispatcher that has
        not come round its loop in far longer than any window deadline allows. A failing sensor is
        not a hang: sources fail, back off and reopen by themselves."""
        if self.stopping:
            return []
        problems = []
        if self._maintenance is not None:
            age = time.monotonic() - self.last_maintenance
            if not self._maintenance.is_alive() or age > HANG_AFTER_S:
                problems.append(f"maintenance thread silent for {age:.0f} s")
        for name, host in list(self.modules.items()):
            stuck = host.hung_for()
            if stuck > self.hang_limit_s(host):
                problems.append(f"module {name} dispatcher stuck for {stuck:.0f} s")
        return problems

    def hang_limit_s(self, host: ModuleHost) -> float:
        """How long a module's dispatcher may go without a turn before the supervisor counts as
        hung: beyond its window deadline, and on wasmtime beyond the grace the worker has past it
        to say the engine stopped the call."""
        deadline = host.cfg.deadline_ms / 1000
        grace = deadline_grace_s(deadline) if engine_of(host.cfg, self.cfg.runtime) == "wasmtime" else 0.0
        return HANG_AFTER_S + deadline + grace

    def _data_reduction(self) -> float:
        sample_bytes = sum(self.metrics.registry.get_sample_value("appliance_source_bytes_total", {"source": n}) or 0
                           for n in self.sources)
        sent = self.metrics.registry.get_sample_value("appliance_upstream_bytes_total") or 0
        return sample_bytes / sent if sent else 0.0

    # ---- status (CLI, console) ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "gateway": self.cfg.gateway.name,
            "sources": {n: {"health": s.health[0].value, "reason": s.health[1]} for n, s in list(self.sources.items())},
            "modules": {n: {"state": h.state.value, "reason": h.reason, "processed": h.processed,
                            "last_fault": h.last_fault} for n, h in list(self.modules.items())},
            "events_emitted": self.events_emitted,
            "spool_depth": self.spool.depth(),
        }


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"
