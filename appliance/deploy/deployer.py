"""Deploying a module bundle on a running gateway: verify, stage, check, swap, probation,
commit or roll back (docs/deploy.md). The console's `modules load NAME FILE.apb` and the fleet
channel both come here.

The supervisor owns the pipelines; the Deployer asks it to (re)build one with the version it
names (Supervisor.run_module_version) and is told about every window result and module state.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.deploy.bundle import Bundle, BundleRejected, check_signature, open_bundle
from appliance.deploy.keys import PublicKey, parse_public
from appliance.deploy.store import Installed, ModuleStore
from appliance.events.record import make_event

if TYPE_CHECKING:
    from appliance.config.schema import ModuleSection
    from appliance.core.supervisor import Supervisor

log = logging.getLogger("appliance.deploy")

ROLLBACK_STATES = ("backoff", "quarantined")   # a fault, a missed deadline, or too many of them
MAX_PROBATION_STARTS = 3   # a version on probation across this many gateway starts is what keeps it restarting


class DeployRefused(ValueError):
    """Nothing changed; the reason says why (verification, the module, the check worker)."""


@dataclass
class Probation:
    version: str
    previous: str | None
    left: int


class Deployer:
    def __init__(self, sup: "Supervisor") -> None:
        self.sup = sup
        cfg = sup.cfg
        self.store = ModuleStore(cfg.deploy.store_dir or cfg.gateway.data_dir / "modules")
        self.trusted: tuple[PublicKey, ...] = tuple(parse_public(line) for line in cfg.deploy.trusted_keys)
        self.allow_unsigned = cfg.deploy.allow_unsigned
        self._running: dict[str, Installed] = {}      # deployed versions that run, by module
        self._probation: dict[str, Probation] = {}
        self._published: dict[str, tuple] = {}         # the version_info labels set per module
        self.listeners: list = []                      # called with (module, what, detail) after each change
        self.last_rollback: dict | None = None
        self._lock = threading.RLock()                 # one deploy or rollback at a time
        self._actions: queue.Queue = queue.Queue()
        # Commits and rollbacks run here, not on a module's own dispatcher thread (a rollback stops it).
        threading.Thread(target=self._act, name="deploy", daemon=True).start()
        sup.metrics.allow_unsigned.set(1 if self.allow_unsigned else 0)
        if self.allow_unsigned:
            log.warning("deploy: deploy.allow_unsigned is on: unsigned module bundles run (development only)")
        for name in cfg.modules:
            installed, probation = self.store.resolve(name)
            if installed is None:
                continue
            if not self.trusts(installed):
                continue   # the YAML's own file runs; the store is left for an operator to see
            if probation is not None:
                starts = self.store.count_start(name)
                if starts >= MAX_PROBATION_STARTS:
                    reason = f"the gateway started {starts} times while it was on probation"
                    target = self.store.roll_back(name, reason)
                    log.error("deploy: module %s: version %s rolled back at start: %s", name, installed.version,
                              reason)
                    self.last_rollback = {"module": name, "version": installed.version,
                                          "to": target.version if target else None, "reason": reason,
                                          "time": time.time()}
                    if target is None or not self.trusts(target):
                        continue
                    installed, probation = target, None
            self._running[name] = installed
            if probation is not None:
                # The gateway stopped (or lost power) during probation: the new version is
                # watched again from the start.
                self._probation[name] = Probation(installed.version, probation.get("previous"),
                                                  int(probation.get("windows") or cfg.deploy.probation_windows))
            log.info("deploy: module %s runs deployed version %s%s", name, installed.version,
                     " (on probation)" if probation else "")

    def trusts(self, installed: Installed) -> bool:
        """A stored version runs only if today's trust settings accept its signature (a key taken
        out of deploy.trusted_keys, or allow_unsigned turned off, applies to what is on the card)."""
        try:
            check_signature(installed.signature, installed.index, self.trusted, self.allow_unsigned)
            return True
        except BundleRejected as exc:
            log.error("deploy: module %s version %s on the card is not run: %s", installed.module, installed.version,
                      exc)
            self.sup.metrics.deploys.labels(installed.module, "refused").inc()
            return False

    # ---- what runs -----------------------------------------------------------------------------

    def effective(self, name: str, mcfg: "ModuleSection") -> "ModuleSection":
        """The module's config as it runs: the YAML's, with the deployed version's file if there is one."""
        installed = self._running.get(name)
        return mcfg if installed is None else mcfg.model_copy(update={"wasm": installed.wasm})

    def describe(self, name: str) -> dict:
        installed = self._running.get(name)
        probation = self._probation.get(name)
        return {"origin": "deployed" if installed else "config", "version": installed.version if installed else None,
                "signer": (installed.signer or "unsigned") if installed else None,
                "probation_left": probation.left if probation else None,
                "rejected": self.store.rejected(name)}

    def publish_versions(self, name: str, version: str) -> None:
        """appliance_module_version_info for this module: one series, the one that runs."""
        installed = self._running.get(name)
        gauge = self.sup.metrics.module_version
        old = self._published.pop(name, None)
        if old is not None:
            gauge.remove(*old)
        labels = (name, installed.version if installed else version, "deployed" if installed else "config",
                  (installed.signer or "unsigned") if installed else "")
        gauge.labels(*labels).set(1)
        self._published[name] = labels

    # ---- deploying -------------------------------------------------------------------------------

    def deploy(self, source: Path | bytes, who: str = "", *, module: str | None = None, force: bool = False) -> str:
        """Verify, install, check in a throwaway worker, swap, start probation. DeployRefused if
        anything fails before the swap: then nothing changed. `module`: the name the bundle must
        carry (the console's `modules load NAME FILE.apb`)."""
        label = str(source) if isinstance(source, Path) else f"bundle of {len(source)} bytes"
        try:
            bundle = open_bundle(source, trusted=self.trusted, allow_unsigned=self.allow_unsigned)
        except BundleRejected as exc:
            self._refused(module or "-", f"{label}: {exc}")
        if module is not None and bundle.module != module:
            self._refused(module, f"{label} is a bundle of module {bundle.module!r}, not {module!r}")
        with self._lock:
            return self._deploy(bundle, who, force)

    def _deploy(self, bundle: Bundle, who: str, force: bool) -> str:
        name = bundle.module
        if name not in self.sup.cfg.modules:
            self._refused(name, f"the config has no module {name!r} (modules: {', '.join(self.sup.cfg.modules)})")
        running = self._running.get(name)
        if running is not None and running.digest == bundle.digest:
            return f"module {name}: version {bundle.version} already runs" + (
                " (on probation)" if name in self._probation else "")
        if name in self._probation:
            self._refused(name, f"version {self._probation[name].version} is on probation; deploy again once it is "
                          "kept or rolled back")
        rejected = self.store.rejected(name).get(bundle.version)
        if rejected and rejected.get("digest") == bundle.digest and not force:
            self._refused(name, f"version {bundle.version} was rolled back before ({rejected.get('reason')}); "
                          "deploy a new version")
        try:
            installed = self.store.install(bundle)
        except (OSError, ValueError) as exc:
            self._refused(name, f"version {bundle.version} could not be stored: {exc}")
        return self._start(installed, who)

    def deploy_installed(self, name: str, version: str, who: str = "") -> str:
        """Run a version that is already on the card (a fleet rollback names one without a bundle)."""
        with self._lock:
            if name not in self.sup.cfg.modules:
                self._refused(name, f"the config has no module {name!r}")
            running = self._running.get(name)
            if running is not None and running.version == version:
                return f"module {name}: version {version} already runs"
            if name in self._probation:
                self._refused(name, f"version {self._probation[name].version} is on probation")
            installed = self.store.installed(name, version)
            if installed is None:
                self._refused(name, f"version {version} is not on this gateway (send its bundle)")
            if not self.trusts(installed):
                self._refused(name, f"version {version} on this gateway is not signed by a trusted key")
            return self._start(installed, who)

    def _start(self, installed: Installed, who: str) -> str:
        name = installed.module
        if self.sup.stopping:
            self._refused(name, "the appliance is stopping")
        try:
            self.sup.check_module_file(name, installed.wasm)
        except ValueError as exc:
            self._refused(name, f"version {installed.version} failed its check: {exc}")
        windows = self.sup.cfg.deploy.probation_windows
        old = self.store.activate(installed, probation_windows=windows)
        self._running[name] = installed
        # On probation before the new worker starts: a fault in its first window counts.
        self._probation[name] = Probation(installed.version, old.version if old else None, windows)
        try:
            self.sup.run_module_version(name)
        except RuntimeError as exc:   # stopping: the store says what runs at the next start
            self._probation.pop(name, None)
            raise DeployRefused(str(exc)) from None
        self.sup.metrics.deploys.labels(name, "started").inc()
        self.sup.metrics.on_probation.labels(name).set(1)
        self.publish_versions(name, installed.version)
        signer = f"signed by {installed.signer}" if installed.signer else "UNSIGNED"
        log.warning("deploy: module %s: version %s (%s) running, on probation for %d windows (was %s)%s", name,
                    installed.version, signer, windows, old.version if old else "the config's file",
                    f" ({who})" if who else "")
        self._tell(name, "started", installed.version)
        return (f"module {name}: version {installed.version} ({signer}) running, on probation for {windows} windows; "
                f"it rolls back to {old.version if old else 'the configured file'} on a fault")

    def _refused(self, name: str, reason: str):
        self.sup.metrics.deploys.labels(name, "refused").inc()
        log.error("deploy: refused, nothing changed: %s", reason)
        self._tell(name, "refused", reason)
        raise DeployRefused(reason)

    def _tell(self, name: str, what: str, detail: str) -> None:
        for listener in self.listeners:
            try:
                listener(name, what, detail)
            except Exception:   # a listener's bug must not undo a deploy
                log.exception("deploy: listener %r failed", listener)

    def revert(self, name: str, who: str = "") -> str:
        """Back to the YAML's own file (the console's `modules revert`)."""
        with self._lock:
            if name not in self._running:
                return f"module {name}: runs its configured file already"
            was = self._running.pop(name).version
            self._probation.pop(name, None)
            self.store.drop(name)
            self.sup.metrics.on_probation.labels(name).set(0)
            self.sup.run_module_version(name)
            self.publish_versions(name, "")
            log.warning("deploy: module %s: deployed version %s dropped; the configured file runs%s", name, was,
                        f" ({who})" if who else "")
            self._tell(name, "reverted", was)
            return f"module {name}: deployed version {was} dropped, running {self.sup.cfg.modules[name].wasm}"

    # ---- probation ------------------------------------------------------------------------------

    def attach(self, name: str, host) -> None:
        """The supervisor built a host for `name` (metrics of what it runs)."""
        if name in self._probation:
            self.sup.metrics.on_probation.labels(name).set(1)
        version = ""
        if name not in self._running:
            from appliance.config.params import ManifestError, read_manifest
            try:
                manifest = read_manifest(host.cfg.wasm)
                version = manifest.version if manifest else ""
            except ManifestError:
                pass
        self.publish_versions(name, version)

    def _current(self, host) -> Probation | None:
        """The probation `host` answers for: only the module's running host counts (a retired
        one, or one a reload built but never started, does not)."""
        probation = self._probation.get(host.name)
        return probation if probation is not None and self.sup.modules.get(host.name) is host else None

    def on_result(self, host, result) -> None:
        probation = self._current(host)
        if probation is None:
            return
        probation.left -= 1
        if probation.left <= 0:
            self._queue(("commit", host.name, probation))

    def on_state(self, host, state: str, reason: str) -> None:
        probation = self._current(host)
        if probation is None or state not in ROLLBACK_STATES:
            return
        self._queue(("rollback", host.name, probation, reason))

    def _queue(self, action: tuple) -> None:
        self._actions.put(action)   # never blocks a module's dispatcher thread

    def _act(self) -> None:
        while True:
            action = self._actions.get()
            try:
                with self._lock:
                    if action[0] == "commit":
                        self._commit(*action[1:])
                    else:
                        self._roll_back(*action[1:])
            except Exception:  # the deploy thread must survive to handle the next one
                log.exception("deploy: %s of module %s failed", action[0], action[1])

    def _commit(self, name: str, probation: Probation) -> None:
        if self._probation.get(name) is not probation:
            return
        del self._probation[name]
        self.store.commit(name)
        self.sup.metrics.deploys.labels(name, "committed").inc()
        self.sup.metrics.on_probation.labels(name).set(0)
        log.warning("deploy: module %s: version %s passed probation; kept", name, probation.version)
        self._tell(name, "committed", probation.version)
        self.sup.emit(self._event(name, 0, "module_deployed",
                                  f"module {name}: version {probation.version} passed probation and is kept "
                                  f"(was {probation.previous or 'the configured file'})", {}))

    def _roll_back(self, name: str, probation: Probation, reason: str) -> None:
        if self._probation.get(name) is not probation or self.sup.stopping:
            return
        del self._probation[name]
        target = self.store.roll_back(name, reason)
        if target is None:
            self._running.pop(name, None)
        else:
            self._running[name] = target
        self.sup.run_module_version(name)
        self.sup.metrics.deploys.labels(name, "rolled_back").inc()
        self.sup.metrics.on_probation.labels(name).set(0)
        self.publish_versions(name, target.version if target else "")
        back_to = target.version if target else f"the configured file {self.sup.cfg.modules[name].wasm}"
        log.error("deploy: module %s: version %s rolled back to %s: %s", name, probation.version, back_to, reason)
        self.last_rollback = {"module": name, "version": probation.version, "to": target.version if target else None,
                              "reason": reason, "time": time.time()}
        self._tell(name, "rolled_back", reason)
        self.sup.emit(self._event(name, 2, "module_rolled_back",
                                  f"module {name}: version {probation.version} rolled back to {back_to} during "
                                  f"probation: {reason}", {"windows_left": float(probation.left)}))

    def _event(self, name: str, severity: int, kind: str, message: str, features: dict) -> dict:
        return make_event(gateway=self.sup.cfg.gateway.name, source=self.sup.cfg.modules[name].source, module=name,
                          severity=severity, score=0.0, kind=kind, message=message, window={}, features=features)
