"""Supervisor side of one module: its worker process, window queue, deadline, restarts, quarantine.

One ModuleHost owns one module's runtime state; one dispatcher thread per host talks to the
worker, so a slow or hung module never stalls a source or another module.
"""
from __future__ import annotations

import base64
import collections
import contextlib
import enum
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


from appliance.config.schema import ModuleSection, RestartPolicy, RuntimeSection
from appliance.ops.metrics import Metrics
from appliance.core.windowing import Window
from appliance.runtime.process import LEVELS, ModuleFault, WorkerProcess
from appliance.runtime.validate import ModuleRejected, read_module
from appliance.runtime.wire import FORMATS, HEADER, pack_header
from appliance.runtime.artifacts import ArtifactCache
from appliance.runtime.modcheck import load_for, module_file

log = logging.getLogger("appliance.module")

class ModuleState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"          # faulted; restarts after a delay
    QUARANTINED = "quarantined"  # too many faults; waits for an operator
    DISABLED = "disabled"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ModuleResult:
    rc: int
    features: dict[str, float]
    events: list[tuple[int, float, str]]
    call_seconds: float


_SEVERITY_NAMES = ("info", "warning", "alarm", "critical")


class ModuleHost:
    """Runs one configured module. submit() never blocks a live source: when the queue is full
    the oldest window is dropped and counted (or, for offline replay with overflow: block,
    the source waits)."""

    def __init__(self, name: str, cfg: ModuleSection, runtime: RuntimeSection, window_bytes: int,
                 metrics: Metrics, on_result: Callable[["ModuleHost", Window, ModuleResult], None],
                 on_state: Callable[["ModuleHost", ModuleState, str], None] | None = None,
                 state_dir: Path = Path("state"), cache_dir: Path | None = None) -> None:
        self.name, self.cfg, self.runtime = name, cfg, runtime
        self.policy: RestartPolicy = cfg.restart or runtime.restart
        self.metrics = metrics
        self._on_result, self._on_state = on_result, on_state
        self._shm_bytes = HEADER.size + window_bytes
        self._queue: collections.deque[Window] = collections.deque()
        self._cond = threading.Condition()
        self._state = ModuleState.DISABLED if not cfg.enabled else ModuleState.STARTING
        self._reason = "disabled in config" if not cfg.enabled else ""
        self._worker: WorkerProcess | None = None
        self._faults: collections.deque[float] = collections.deque()
        self._consecutive = 0
        self._next_start = 0.0
        self._last_seq = -1
        self._busy = False                 # a window is in the worker right now
        self._restart_requested: str | None = None
        self._reset_checked = 0.0
        self.loaded_sha256: str | None = None
        self.pipeline = None   # set by the supervisor: the source and channels this module serves
        self.state_dir = state_dir
        self._artifacts = ArtifactCache(cache_dir / "wasmtime") if cache_dir is not None else None
        # Made once: a Path built every second interned its file name anew each time (pathlib
        # interns parts; the string died with the Path), and that churn grew CPython's table of
        # interned strings by one ~1 MiB step after half an hour (found with tracemalloc).
        self._state_file = state_dir / f"{name}.state"
        self._reset_file = state_dir / f"{name}.reset"
        self._state_changes: list[tuple[ModuleState, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"module-{name}", daemon=True)
        self._starts = 0
        self.last_turn = time.monotonic()   # the dispatcher's heartbeat (the systemd watchdog reads it)
        self.processed = 0
        self.last_features: dict[str, float] = {}
        self.last_fault = ""
        metrics.declare_module(name)

    # ---- public, any thread ----------------------------------------------------------------

    @property
    def state(self) -> ModuleState:
        return self._state

    @property
    def reason(self) -> str:
        return self._reason

    def wasm_changed(self) -> bool:
        """The module file on disk differs from what runs (a new build was dropped in place)."""
        if self.loaded_sha256 is None:
            return False
        try:
            return hashlib.sha256(read_module(module_file(self.cfg, self.runtime))).hexdigest() != self.loaded_sha256
        except ModuleRejected:
            return True

    @property
    def busy(self) -> bool:
        """A window is in the worker right now."""
        return self._busy

    @property
    def worker_pid(self) -> int | None:
        worker = self._worker
        return worker.pid if worker is not None else None

    def start(self) -> None:
        self._thread.start()

    def submit(self, window: Window) -> None:
        with self._cond:
            if self._state not in (ModuleState.STARTING, ModuleState.RUNNING) and not (
                    self.cfg.overflow == "block" and self._state == ModuleState.BACKOFF):
                self.metrics.windows_dropped.labels(self.name, "unavailable").inc()
                return
            if self.cfg.overflow == "block":
                while len(self._queue) >= self.cfg.queue and not self._stop.is_set() \
                        and self._state in (ModuleState.STARTING, ModuleState.RUNNING, ModuleState.BACKOFF):
                    self._cond.wait(0.5)
            elif len(self._queue) >= self.cfg.queue:
                self._queue.popleft()
                self.metrics.windows_dropped.labels(self.name, "overflow").inc()
            self._queue.append(window)
            self._cond.notify_all()

    def restart(self, reason: str = "operator request") -> bool:
        """Start afresh now, clearing backoff and quarantine (the console's `modules restart`).
        The dispatcher owns the worker and does the restart; a window in flight is abandoned
        (counted as dropped, not as a fault). False if the module is disabled or stopped."""
        with self._cond:
            if self._state in (ModuleState.DISABLED, ModuleState.STOPPED):
                return False
            self._faults.clear()
            self._consecutive = 0
            self._next_start = 0.0
            self._restart_requested = reason
            self.metrics.quarantined.labels(self.name).set(0)
            self._set_state(ModuleState.STARTING, reason)
            if self._busy and self._worker is not None:
                self._worker.signal_kill()   # unblocks the dispatcher now rather than at the deadline
            self._cond.notify_all()
        return True

    def disable(self, reason: str = "disabled by an operator") -> str | bool:
        """Stop processing until enable(): the worker stops, queued windows are dropped (counted)."""
        with self._cond:
            if self._state is ModuleState.STOPPED:
                return False
            if self._state is ModuleState.DISABLED:
                return f"module {self.name} is already disabled"
            queued = len(self._queue)
            self._queue.clear()
            self._restart_requested = reason   # the dispatcher stops the worker, then idles
            self._set_state(ModuleState.DISABLED, reason)
            self.metrics.quarantined.labels(self.name).set(0)
            if self._busy and self._worker is not None:
                self._worker.signal_kill()
            self._cond.notify_all()
        if queued:
            self.metrics.windows_dropped.labels(self.name, "unavailable").inc(queued)
        return True

    def enable(self, reason: str = "enabled by an operator") -> str | bool:
        with self._cond:
            if self._state is not ModuleState.DISABLED:
                return f"module {self.name} is not disabled ({self._state.value})"
            self._faults.clear()
            self._consecutive = 0
            self._next_start = 0.0
            self._set_state(ModuleState.STARTING, reason)
            self._cond.notify_all()
        return True

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        with self._cond:
            if self._busy and self._worker is not None:
                self._worker.signal_kill()   # the window in flight is abandoned, not waited for
            self._cond.notify_all()
        if self._thread.is_alive():       # it never started if the supervisor failed to start
            self._thread.join(timeout_s)
        with self._cond:
            worker, self._worker = self._worker, None
            left = len(self._queue)
            self._queue.clear()
            self._set_state(ModuleState.STOPPED, "stopped")
        if left:
            self.metrics.windows_dropped.labels(self.name, "stopped").inc(left)
        if worker:
            worker.stop()
        self._deliver_state()
        self.metrics.module_up.labels(self.name).set(0)

    def wait_idle(self, timeout_s: float) -> bool:
        """True once the queue is empty and nothing is in flight (for replay and tests)."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._busy:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    # ---- dispatcher thread -------------------------------------------------------------------

    def _set_state(self, state: ModuleState, reason: str) -> None:
        """Call with the lock held; the callback runs later, from _deliver_state, without it
        (it may commit to the spool, and the source thread must not wait for that)."""
        if state != self._state:
            self._state_changes.append((state, reason))
        self._state, self._reason = state, reason

    def _deliver_state(self) -> None:
        with self._cond:
            changes, self._state_changes = self._state_changes, []
        if self._on_state:
            for state, reason in changes:
                self._on_state(self, state, reason)

    def hung_for(self) -> float:
        """Seconds the dispatcher has not come round its loop (a turn is bounded by the window
        deadline or a 0.5 s wait); infinite if its thread died while it should run."""
        if self._stop.is_set():
            return 0.0
        if self._thread.ident is not None and not self._thread.is_alive():
            return float("inf")
        return time.monotonic() - self.last_turn

    def _run(self) -> None:
        while not self._stop.is_set():
            self.last_turn = time.monotonic()
            try:
                self._step()
            except Exception as exc:  # a bug here must not silently end this module's thread
                log.exception("module %s: internal error in the host", self.name)
                self._fault(ModuleFault("protocol", f"host error: {type(exc).__name__}: {exc}"))
            self._deliver_state()

    def _step(self) -> None:
        """One turn: wait, (re)start the worker, or process one window."""
        if self._worker is not None:
            self._check_reset_request()
        with self._cond:
            stale = None
            if self._restart_requested:
                self._restart_requested = None
                stale, self._worker = self._worker, None
        if stale is not None:
            stale.stop()
            self.metrics.module_up.labels(self.name).set(0)
        with self._cond:
            if self._state in (ModuleState.QUARANTINED, ModuleState.DISABLED):
                self._cond.wait(0.5)
                return
            if self._worker is None:
                delay = self._next_start - time.monotonic()
                if delay > 0:
                    self._cond.wait(min(delay, 0.5))
                    return
        if self._worker is None:
            self._start_worker()
            return
        with self._cond:
            if not self._queue:
                self._cond.wait(0.5)
                return
            window = self._queue.popleft()
            self._busy = True
            self._cond.notify_all()
        try:
            self._process(window)
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _start_worker(self) -> None:
        if self._starts:
            self.metrics.restarts.labels(self.name).inc()
        self._starts += 1
        try:
            # Read here, check in the worker: the file is read once, so what was checked is
            # what runs, and the checking cost falls under the worker's limits.
            wasm = read_module(module_file(self.cfg, self.runtime))
            worker = WorkerProcess(self.name, wasm, self._shm_bytes, load_for(self.cfg, self.runtime, self._saved_state()),
                                   artifact_cache=self._artifacts)
        except ModuleRejected as exc:
            self._fault(ModuleFault("load", str(exc)))
            return
        except ModuleFault as exc:
            self._fault(exc)
            return
        for level, text in worker.load_logs:
            log.log(LEVELS.get(level, logging.INFO), "module %s: %s", self.name, text)
        if worker.state_note == "accepted":
            log.info("module %s: resumed its saved state (%s)", self.name, self._state_file)
        elif worker.state_note:
            log.warning("module %s: saved state %s; it starts afresh", self.name, worker.state_note)
            self._state_file.unlink(missing_ok=True)
        with self._cond:
            if self._stop.is_set() or self._state in (ModuleState.QUARANTINED, ModuleState.DISABLED):
                worker.stop()
                return
            # Before the worker is visible: whoever sees its pid can compare the file with what runs.
            self.loaded_sha256 = hashlib.sha256(wasm).hexdigest()
            self._worker = worker
            self.metrics.module_up.labels(self.name).set(1)
            self._set_state(ModuleState.RUNNING, f"worker pid {worker.pid}")
        missing = [layer for layer, held in worker.sandbox_layers.items() if not held]
        for layer, held in worker.sandbox_layers.items():
            self.metrics.sandbox_layers.labels(self.name, layer).set(1 if held else 0)
        if missing and self._starts == 1:
            log.warning("module %s: its worker runs without the sandbox layers %s (see the worker's notes above)",
                        self.name, ", ".join(missing))
        engine = worker.engine + (f", code {worker.artifact_note}" if worker.artifact_note else "")
        log.info("module %s: running in worker pid %d on %s (sha256 %s; memory: %d MiB of libraries, capped at %d MiB)",
                 self.name, worker.pid, engine, self.loaded_sha256[:12], worker.footprint_bytes >> 20,
                 worker.memory_cap_bytes >> 20)

    def _process(self, window: Window) -> None:
        dropped = max(0, window.seq - self._last_seq - 1) if self._last_seq >= 0 else window.seq
        height, width = window.image or (0, 0)
        header = pack_header(window.data.shape[0], window.data.shape[1], window.sample_rate, window.seq,
                             window.start_ns, dropped, FORMATS[window.data.dtype], width, height)
        if len(header) + window.data.nbytes > self._shm_bytes:
            # The sources bound what they deliver (a camera's max_frame); if one does not, it is
            # the host's error, not the module's.
            self.metrics.host_errors.labels(self.name, "oversize").inc()
            self.metrics.windows_dropped.labels(self.name, "unavailable").inc()
            log.error("module %s: window %d of %d bytes is larger than its shared buffer (%d bytes); dropped",
                      self.name, window.seq, len(header) + window.data.nbytes, self._shm_bytes)
            return
        t0 = time.perf_counter()
        try:
            reply = self._worker.process(header, window.data, self.cfg.deadline_ms / 1000.0)
        except ModuleFault as fault:
            if self._stop.is_set():   # stop() killed it
                self.metrics.windows_dropped.labels(self.name, "stopped").inc()
                return
            if self._restart_requested:   # the operator's restart killed it: not the module's fault
                self.metrics.windows_dropped.labels(self.name, "unavailable").inc()
                return
            self.metrics.windows_dropped.labels(self.name, "fault").inc()
            self._fault(fault)
            return
        elapsed = time.perf_counter() - t0
        self._last_seq = window.seq
        self._consecutive = 0
        self.processed += 1
        self.metrics.windows.labels(self.name).inc()
        self.metrics.call_seconds.labels(self.name).observe(elapsed)
        for level, text in reply.get("l", []):
            log.log(LEVELS.get(level, logging.INFO), "module %s: %s", self.name, text)
        if reply.get("ld"):
            log.warning("module %s: %d log lines dropped in one window", self.name, reply["ld"])
        if reply["rc"] != 0:
            self.metrics.windows_rejected.labels(self.name).inc()
        self.last_features = reply["f"]
        result = ModuleResult(reply["rc"], reply["f"], [tuple(e) for e in reply["e"]], elapsed)
        # The window's events are committed before its state is saved: a state that has learned
        # from a window whose events were lost would never raise them again.
        self._on_result(self, window, result)
        if reply.get("s"):
            self._save_state(base64.b64decode(reply["s"]))

    # ---- persistent state (ABI.md, "Persistent state") -----------------------------------------

    def _saved_state(self) -> bytes | None:
        if self._reset_file.exists():
            # An operator asked for a fresh baseline (appliance baseline reset).
            self._state_file.unlink(missing_ok=True)
            self._reset_file.unlink(missing_ok=True)
            log.warning("module %s: saved state discarded on request; learning afresh", self.name)
            return None
        try:
            return self._state_file.read_bytes()
        except FileNotFoundError:
            return None

    def _save_state(self, blob: bytes) -> None:
        """Atomic: a power cut leaves the old state or the new one, never half of one. A failure
        here (a full or read-only /data) is the host's: the module keeps running with its state
        in memory, the error is logged and counted, and the next change tries again."""
        tmp = self._state_file.with_suffix(".tmp")
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._state_file)
        except OSError as exc:
            with contextlib.suppress(OSError):   # a read-only /data cannot even lose the temporary file
                tmp.unlink(missing_ok=True)
            self.metrics.host_errors.labels(self.name, "state").inc()
            log.error("module %s: its state (%d bytes) could not be saved to %s: %s; the module keeps running "
                      "and the next change tries again", self.name, len(blob), self._state_file,
                      exc.strerror or exc)
            return
        log.info("module %s: state saved (%d bytes)", self.name, len(blob))

    def _check_reset_request(self) -> None:
        now = time.monotonic()
        if now - self._reset_checked < 1.0:
            return
        self._reset_checked = now
        if self._reset_file.exists():
            self.restart("baseline reset requested")

    def _fault(self, fault: ModuleFault) -> None:
        now = time.monotonic()
        survived = fault.alive and self._survived(fault, now)
        if survived:
            return
        with self._cond:
            worker, self._worker = self._worker, None
        if worker:
            worker.kill()
        self.metrics.module_up.labels(self.name).set(0)
        self.metrics.faults.labels(self.name, fault.kind).inc()
        with self._cond:
            self.last_fault = f"{fault.kind}: {fault.reason}"
            if self._state in (ModuleState.DISABLED, ModuleState.STOPPED):
                return   # an operator disabled it (or it is stopping) meanwhile: that decision stands
            if not fault.alive:
                self._faults.append(now)
                while self._faults and now - self._faults[0] > self.policy.fault_window_s:
                    self._faults.popleft()
            self._consecutive += 1
            if len(self._faults) >= self.policy.max_faults:
                dropped = len(self._queue)
                self._queue.clear()
                if dropped:
                    self.metrics.windows_dropped.labels(self.name, "unavailable").inc(dropped)
                self.metrics.quarantined.labels(self.name).set(1)
                log.error("module %s: %s fault: %s; quarantined after %d faults in %.0f s "
                          "(restart it from the console to try again)", self.name, fault.kind, fault.reason,
                          len(self._faults), self.policy.fault_window_s)
                self._set_state(ModuleState.QUARANTINED, self.last_fault)
            else:
                delay = min(self.policy.backoff_s * 2 ** (self._consecutive - 1), self.policy.backoff_max_s)
                self._next_start = now + delay
                log.error("module %s: %s fault: %s; restarting in %.1f s (%d of %d faults allowed in %.0f s)",
                          self.name, fault.kind, fault.reason, delay, len(self._faults), self.policy.max_faults,
                          self.policy.fault_window_s)
                self._set_state(ModuleState.BACKOFF, self.last_fault)
            self._cond.notify_all()


    def _survived(self, fault: ModuleFault, now: float) -> bool:
        """A fault the worker lived through (wasmtime stopped a window at its deadline): counted
        like any other, and it counts towards quarantine, but the worker (same pid) carries on
        with a fresh instance, no backoff. False: too many faults, quarantine (the caller goes on)."""
        with self._cond:
            self._faults.append(now)
            while self._faults and now - self._faults[0] > self.policy.fault_window_s:
                self._faults.popleft()
            if len(self._faults) >= self.policy.max_faults:
                return False   # _fault counts it, with the fault time already in _faults
            self.last_fault = f"{fault.kind}: {fault.reason}"
        self.metrics.faults.labels(self.name, fault.kind).inc()
        log.error("module %s: %s fault: %s; the worker (pid %d) goes on with a fresh instance (%d of %d faults "
                  "allowed in %.0f s)", self.name, fault.kind, fault.reason, self.worker_pid or -1,
                  len(self._faults), self.policy.max_faults, self.policy.fault_window_s)
        return True


def severity_name(level: int) -> str:
    return _SEVERITY_NAMES[level]
