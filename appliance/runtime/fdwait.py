"""Waiting on a descriptor without select(): the supervisor's side of its workers and zygote.

Standard library only: the zygote imports it before it has made BLAS and OpenCV single-threaded."""
from __future__ import annotations

import select


def readable(fd, timeout_s: float | None) -> bool:
    """fd (a number or a socket) is readable or hung up within timeout_s (None: wait). poll, not
    select: select refuses descriptors past 1023 (FD_SETSIZE), which a supervisor with a few
    hundred workers holds (make bench's real-time trial at 256 accelerometers died of it)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout_s is None else max(0.0, timeout_s) * 1000.0))
