"""The systemd service protocol (sd_notify(3)) without libsystemd: one datagram per message.

Under `Type=notify` systemd waits for READY=1 before it counts the service as started, shows
STATUS= in `systemctl status`, and with `WatchdogSec=` kills and restarts a service that stops
sending WATCHDOG=1. Outside systemd (no $NOTIFY_SOCKET) every call is a no-op.
"""
from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("appliance.systemd")


def notify(*fields: str) -> bool:
    """Send 'KEY=value' fields to the service manager; False when there is none (or it failed)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not fields:
        return False
    if address.startswith("@"):          # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
        return True
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False


def watchdog_interval_s() -> float | None:
    """The WatchdogSec= systemd set for this process, or None (not enabled, or meant for another PID)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


class Watchdog:
    """Pings WATCHDOG=1 at half the interval, but only while `problems()` finds nothing wrong: a
    supervisor whose threads are stuck is then killed and restarted by systemd, not kept alive by
    a main loop that merely still runs."""

    def __init__(self, problems, interval_s: float | None = None) -> None:
        self.problems = problems
        self.interval_s = interval_s if interval_s is not None else watchdog_interval_s()
        self._next = 0.0
        self._withheld: list[str] = []

    @property
    def enabled(self) -> bool:
        return self.interval_s is not None

    def tick(self) -> None:
        if not self.enabled or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.interval_s / 2
        problems = self.problems()
        if problems:
            if problems != self._withheld:
                log.error("watchdog: not reporting alive (%s); systemd restarts the service if this lasts "
                          "%.0f s", "; ".join(problems), self.interval_s)
            self._withheld = problems
            notify("STATUS=unhealthy: " + "; ".join(problems)[:200])
            return
        if self._withheld:
            log.warning("watchdog: healthy again")
            self._withheld = []
        notify("WATCHDOG=1")
