"""Store-and-forward: committed events leave the spool only once the far side acknowledged them.

One thread. It connects the transport (retrying with exponential backoff), sends pending
events most severe first and oldest first within a severity, deletes each one after its
acknowledgement, parks an event the far side refuses for good (kept, counted, logged; never
dropped), and publishes a health summary at a slow rate. A kill at any instant loses nothing:
an event is either still in the spool (and is sent again, with the same id: a duplicate at
most) or was acknowledged before it was deleted.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from appliance.events.spool import Spool
from appliance.ops.metrics import Metrics
from appliance.uplink.transport import PermanentError, TransientError, Transport

log = logging.getLogger("appliance.uplink")


class Forwarder:
    def __init__(self, spool: Spool, transport: Transport, metrics: Metrics, *, backoff_s: float = 1.0,
                 backoff_max_s: float = 60.0, batch: int = 50, health_interval_s: float = 60.0,
                 health: Callable[[], dict[str, Any]] | None = None) -> None:
        self.spool, self.transport, self.metrics = spool, transport, metrics
        self.backoff_s, self.backoff_max_s, self.batch = backoff_s, backoff_max_s, batch
        self.health_interval_s, self._health = health_interval_s, health
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"uplink-{transport.name}", daemon=True)
        self._delay = backoff_s
        self._next_health = 0.0
        self.sent = 0
        self.last_error = ""

    def start(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        """A new event was committed: send it now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        try:
            if self.transport.connected:
                self.transport.publish_status(False)   # a clean stop says so; a crash leaves the last will
        except (TransientError, OSError):
            pass
        self.transport.close()
        self.metrics.upstream_connected.set(0)

    # ---- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.transport.connected:
                    self.transport.connect()
                    self.transport.publish_status(True)
                    log.info("uplink %s: connected", self.transport.name)
                self.metrics.upstream_connected.set(1)
                self._maybe_publish_health()
                if not self._send_pending():
                    self._wake.wait(1.0)
                    self._wake.clear()
                self._delay = self.backoff_s
            except TransientError as exc:
                self._back_off(exc)
            except Exception as exc:  # a bug must not end delivery: log, back off, carry on
                log.exception("uplink %s: unexpected error", self.transport.name)
                self._back_off(TransientError(f"{type(exc).__name__}: {exc}"))

    def _send_pending(self) -> bool:
        """Send one batch; False when there was nothing to send."""
        batch = self.spool.pending(self.batch)
        for event, attachments in batch:
            if self._stop.is_set():
                return True
            try:
                nbytes = self.transport.send(event, attachments)
            except PermanentError as exc:
                self.spool.park(event["id"], str(exc))
                self.metrics.upstream_failed.labels("permanent").inc()
                log.error("uplink %s: event %s refused for good, parked in the spool: %s", self.transport.name,
                          event["id"], exc)
                continue
            self.spool.delete(event["id"])   # only after the acknowledgement
            self.sent += 1
            self.metrics.upstream_sent.inc()
            self.metrics.upstream_bytes.inc(nbytes)
        return bool(batch)

    def _maybe_publish_health(self) -> None:
        if self._health is None or time.monotonic() < self._next_health:
            return
        self._next_health = time.monotonic() + self.health_interval_s
        self.metrics.upstream_bytes.inc(self.transport.publish_health(self._health()))

    def _back_off(self, exc: TransientError) -> None:
        self.metrics.upstream_connected.set(0)
        self.metrics.upstream_failed.labels("transient").inc()
        # Honour Retry-After, within our own bounds: 0 must not spin, a day must not stall.
        delay = self._delay if exc.retry_after_s is None else \
            min(max(exc.retry_after_s, self.backoff_s), self.backoff_max_s)
        if str(exc) != self.last_error:   # say it once per distinct error, not every retry
            log.warning("uplink %s: %s; retrying in %.1f s (events wait in the spool)", self.transport.name,
                        exc, delay)
        self.last_error = str(exc)
        try:
            self.transport.close()
        except OSError:
            pass
        self._stop.wait(delay)
        self._delay = min(self._delay * 2, self.backoff_max_s)
