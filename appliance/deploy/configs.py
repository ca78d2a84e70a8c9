"""Config updates delivered by the fleet: validated, applied by live reload, kept only if the
sources and modules are healthy within a probation time, else the previous config again
(docs/fleet.md, "Config updates").

    <data_dir>/config/current.yaml     the delivered config that runs (committed)
    <data_dir>/config/current.json     its sha256, revision, and the sha256 of the card's YAML it replaced
    <data_dir>/config/candidate.*      the one on probation
    <data_dir>/config/rejected.json    delivered configs that were refused or rolled back

Which copy wins: the delivered config, as long as the card's YAML is the one it was delivered
over. A plant engineer who edits the card's YAML after that wins: at the next start or
`config reload`, the card's file runs and the delivered one is set aside (logged, reported).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.events.record import make_event

if TYPE_CHECKING:
    from appliance.core.supervisor import Supervisor

log = logging.getLogger("appliance.deploy")

MAX_CONFIG_BYTES = 1 << 20


def sha256_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ConfigStore:
    def __init__(self, folder: Path, card: Path) -> None:
        self.folder, self.card = folder, card

    def _json(self, name: str) -> dict:
        try:
            doc = json.loads((self.folder / name).read_bytes())
            return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            return {}

    @property
    def current(self) -> Path:
        return self.folder / "current.yaml"

    @property
    def candidate(self) -> Path:
        return self.folder / "candidate.yaml"

    def current_info(self) -> dict:
        return self._json("current.json")

    def rejected(self) -> dict:
        return self._json("rejected.json")

    def reject(self, sha: str, reason: str) -> None:
        rejected = self.rejected()
        rejected[sha] = {"reason": reason, "time": time.time()}
        _write(self.folder / "rejected.json", json.dumps(rejected, sort_keys=True).encode())

    def choose(self) -> Path:
        """The file to run now: the delivered one if the card's YAML has not changed since it was
        delivered, else the card's. A candidate left by a stop during its probation is dropped."""
        if self.candidate.exists():
            info = self._json("candidate.json")
            log.error("config: the gateway stopped while delivered config %s was on probation; it is dropped",
                      info.get("sha256", "?")[:12])
            self.reject(info.get("sha256", "?"), "the gateway stopped during its probation")
            for name in ("candidate.yaml", "candidate.json"):
                with contextlib.suppress(FileNotFoundError):
                    (self.folder / name).unlink()
        info = self.current_info()
        if not info or not self.current.exists():
            return self.card
        if info.get("card_sha256") != sha256_of(self.card):
            log.warning("config: %s was edited after the fleet delivered config %s: the card's file wins; the "
                        "delivered one is set aside", self.card, info.get("sha256", "?")[:12])
            os.replace(self.current, self.folder / "superseded.yaml")
            os.replace(self.folder / "current.json", self.folder / "superseded.json")
            return self.card
        return self.current


class ConfigDeployer:
    """One delivered config at a time: validate, reload, watch, commit or roll back."""

    def __init__(self, sup: "Supervisor", store: ConfigStore, probation_s: float) -> None:
        self.sup, self.store, self.probation_s = sup, store, probation_s
        self._lock = threading.Lock()
        self.on_probation: dict | None = None
        self.listeners: list = []   # called with ("config", what, sha) after a commit or a rollback

    def running(self) -> dict:
        """What runs: {"source": "card" | "delivered", "path", "sha256", "revision"}."""
        path = self.sup.config_path
        if path is not None and path == self.store.current:
            info = self.store.current_info()
            return {"source": "delivered", "path": str(path), "sha256": info.get("sha256"),
                    "revision": info.get("revision"), "card": str(self.store.card)}
        return {"source": "card" if self.on_probation is None else "delivered, on probation",
                "path": str(path), "sha256": sha256_of(path) if path else None}

    def apply(self, text: bytes, who: str, revision: int | None = None) -> str:
        """Validate and reload now; the verdict comes within probation_s (an event says which).
        ValueError: refused, nothing changed."""
        from appliance.config.schema import ConfigError, load_config_document
        sha = hashlib.sha256(text).hexdigest()
        if len(text) > MAX_CONFIG_BYTES:
            raise ValueError(f"delivered config is {len(text)} bytes (at most {MAX_CONFIG_BYTES})")
        with self._lock:
            if self.on_probation is not None:
                raise ValueError("another delivered config is on probation; try again when it is judged")
            if self.running().get("sha256") == sha:
                return f"config {sha[:12]} already runs"
            if sha in self.store.rejected():
                raise ValueError(f"config {sha[:12]} was refused or rolled back before: "
                                 f"{self.store.rejected()[sha]['reason']}")
            self.store.folder.mkdir(parents=True, exist_ok=True)
            _write(self.store.candidate, text)
            _write(self.store.folder / "candidate.json",
                   json.dumps({"sha256": sha, "revision": revision, "who": who}).encode())
            previous = self.sup.config_path
            try:
                load_config_document(self.store.candidate, self.sup.config_base)   # file:line errors first
                summary = self.sup.reload_config(self.store.candidate)
            except (ConfigError, OSError, ValueError, RuntimeError) as exc:
                reason = "\n".join(str(i) for i in exc.issues) if isinstance(exc, ConfigError) else str(exc)
                self._drop_candidate(sha, f"refused: {reason}")
                raise ValueError(f"delivered config {sha[:12]} refused, nothing changed: {reason}") from None
            self.on_probation = {"sha256": sha, "revision": revision, "previous": str(previous),
                                 "deadline": time.monotonic() + self.probation_s, "since_windows": self._windows()}
            threading.Thread(target=self._watch, args=(sha, previous), name="config-probation", daemon=True).start()
            log.warning("config: delivered config %s applied (%s), on probation for %.0f s (%s)", sha[:12], summary,
                        self.probation_s, who)
            return f"config {sha[:12]} applied ({summary}); on probation for {self.probation_s:.0f} s"

    def _windows(self) -> dict[str, tuple[object, int]]:
        """Each module's host and its window count now: a module the reload restarted has a new
        host, which must process a window of its own."""
        return {n: (h, h.processed) for n, h in self.sup.modules.items()}

    def problems(self, since: dict[str, tuple[object, int]]) -> list[str]:
        """What is not healthy: a source not delivering, a module not running or not yet fed."""
        out = []
        for name, source in list(self.sup.sources.items()):
            health, reason = source.health
            if health.value != "ok":
                out.append(f"source {name} {health.value}" + (f" ({reason})" if reason else ""))
        for name, host in list(self.sup.modules.items()):
            if not host.cfg.enabled:
                continue
            if host.state.value != "running":
                out.append(f"module {name} {host.state.value}" + (f" ({host.reason})" if host.reason else ""))
            else:
                before_host, before = since.get(name, (None, 0))
                if host.processed <= (before if before_host is host else 0):
                    out.append(f"module {name} has processed no window yet")
        return out

    def _watch(self, sha: str, previous: Path | None) -> None:
        while not self.sup.stopping:
            probation = self.on_probation
            problems = self.problems(probation["since_windows"])
            if not problems:
                return self._commit(sha)
            if time.monotonic() > probation["deadline"]:
                return self._roll_back(sha, previous, "; ".join(problems))
            time.sleep(0.5)

    def _commit(self, sha: str) -> None:
        with self._lock:
            info = {"sha256": sha, "revision": self.on_probation.get("revision"),
                    "card_sha256": sha256_of(self.store.card), "since": time.time()}
            os.replace(self.store.candidate, self.store.current)
            _write(self.store.folder / "current.json", json.dumps(info).encode())
            with contextlib.suppress(FileNotFoundError):
                (self.store.folder / "candidate.json").unlink()
            self.sup.config_path = self.store.current
            self.on_probation = None
        log.warning("config: delivered config %s is healthy; kept", sha[:12])
        self._tell("committed", sha)
        self.sup.emit(self._event(0, "config_deployed", f"delivered config {sha[:12]} applied and healthy; kept"))

    def _roll_back(self, sha: str, previous: Path | None, reason: str) -> None:
        try:
            self.sup.reload_config(previous)
        except Exception as exc:   # the previous one ran a minute ago: say loudly if it no longer loads
            log.exception("config: going back to %s failed", previous)
            reason += f"; going back to {previous} failed too: {exc}"
        with self._lock:
            self._drop_candidate(sha, f"rolled back: {reason}")
            self.on_probation = None
        log.error("config: delivered config %s rolled back to %s: %s", sha[:12], previous, reason)
        self._tell("rolled_back", sha)
        self.sup.emit(self._event(2, "config_rolled_back",
                                  f"delivered config {sha[:12]} rolled back to {previous}: not healthy within "
                                  f"{self.probation_s:.0f} s: {reason}"))

    def _tell(self, what: str, sha: str) -> None:
        for listener in self.listeners:
            try:
                listener("config", what, sha)
            except Exception:   # a listener's bug must not undo a config
                log.exception("config: listener %r failed", listener)

    def _drop_candidate(self, sha: str, reason: str) -> None:
        self.store.reject(sha, reason)
        for name in ("candidate.yaml", "candidate.json"):
            with contextlib.suppress(FileNotFoundError):
                (self.store.folder / name).unlink()

    def _event(self, severity: int, kind: str, message: str) -> dict:
        return make_event(gateway=self.sup.cfg.gateway.name, source="gateway", module="config", severity=severity,
                          score=0.0, kind=kind, message=message, window={}, features={})
