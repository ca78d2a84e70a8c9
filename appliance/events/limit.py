"""A module may not flood the spool: a token bucket per module, and a summary of what it held back.

A module may raise up to 16 events per window; a careless or hostile one at 100 windows/s would
write 1,600 events/s into the spool (synchronous=FULL: the SD card wears) and up the uplink. The
bucket lets a burst through, then `per_minute` events; the rest are counted, and once a
`summary_s` interval has passed the supervisor raises one event saying how many were held back.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Suppressed:
    count: int = 0
    worst: int = 0            # the highest severity among them
    since: float = 0.0        # monotonic time of the first one


@dataclass
class EventBudget:
    per_minute: float
    burst: int
    summary_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _tokens: float = field(default=-1.0, init=False)
    _at: float = field(default=0.0, init=False)
    _held: Suppressed = field(default_factory=Suppressed, init=False)
    _last_summary: float = field(default=0.0, init=False)

    def take(self, severity: int) -> bool:
        """True if this event may go to the spool; False: it is held back and counted."""
        now = self.clock()
        if self._tokens < 0:
            self._tokens, self._at, self._last_summary = float(self.burst), now, now
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.per_minute / 60.0)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        if not self._held.count:
            self._held.since = now
        self._held.count += 1
        self._held.worst = max(self._held.worst, severity)
        return False

    def summary_due(self, force: bool = False) -> Suppressed | None:
        """What was held back, once per summary interval (and then forgotten); None if nothing is
        due. force: now, whatever the interval (the supervisor is stopping)."""
        now = self.clock()
        if not self._held.count or (now - self._last_summary < self.summary_s and not force):
            return None
        held, self._held = self._held, Suppressed()
        self._last_summary = now
        return held
