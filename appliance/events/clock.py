"""How old an event is, on a gateway whose wall clock cannot be trusted.

A Raspberry Pi has no real-time clock: it boots with a stale time and NTP jumps it forward,
maybe by years. The spool must never expire an unsent event because of such a jump, so an
event's age is measured two ways and only trusted ones count:

- **run time**: the time the appliance has been running since the event was committed, counted
  with the monotonic boot clock and carried across restarts in the spool itself. It never jumps,
  but it does not see time the gateway spent switched off, so it can only under-state an age.
- **wall time**: now minus the commit time, only when the wall clock was synchronised (NTP) both
  when the event was committed and now.

An event's age is the larger of the two; with an unsynchronised clock it is the run time alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import time
from dataclasses import dataclass
from typing import Callable

# systemd's rule for NTPSynchronized (timedatectl): the kernel's maximum error is under 16 s.
# STA_UNSYNC alone is not used: it may be set on purpose to keep the kernel off the RTC.
MAX_SYNC_ERROR_US = 16_000_000
_TIMEX_SIZE = 256            # struct timex is 208 bytes on 64-bit Linux; room to spare
_MAXERROR_OFFSET = 24        # unsigned int modes (+pad), long offset, long freq, long maxerror
# One array type for the process: ctypes keeps c_char * n types only weakly, so a
# create_string_buffer per call made a type that died as garbage for the cyclic collector.
_TIMEX_BUFFER = ctypes.c_char * _TIMEX_SIZE


try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:
    _LIBC = None
_SYNC_CACHE_S = 1.0          # a commit asks; the kernel's answer cannot change faster than NTP polls
_last_answer: tuple[float, bool] = (-1e9, False)


def _kernel_says_synchronised() -> bool:
    """adjtimex(2) read-only: what timedatectl shows as "System clock synchronized"."""
    global _last_answer
    now = time.monotonic()
    if now - _last_answer[0] < _SYNC_CACHE_S:
        return _last_answer[1]
    answer = False
    if _LIBC is not None:
        buf = _TIMEX_BUFFER()   # zeroed, modes = 0: read, change nothing
        if _LIBC.adjtimex(buf) >= 0:
            maxerror = ctypes.c_long.from_buffer(buf, _MAXERROR_OFFSET).value
            answer = 0 <= maxerror < MAX_SYNC_ERROR_US
    _last_answer = (now, answer)
    return answer


@dataclass
class SpoolClock:
    """The three readings the spool needs; tests inject their own."""
    wall_ns: Callable[[], int] = time.time_ns
    # CLOCK_BOOTTIME keeps counting while the system is suspended; it never jumps.
    steady_ns: Callable[[], int] = lambda: time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    synchronised: Callable[[], bool] = _kernel_says_synchronised
