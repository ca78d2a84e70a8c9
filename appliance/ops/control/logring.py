"""The last log lines of the process, for the console's `log tail`."""
from __future__ import annotations

import collections
import logging

LOG_LINES = 1000          # the ring buffer behind `log tail`


class LogRing(logging.Handler):
    """Keeps the last `capacity` log records, formatted, for `log tail`. It sees what the
    process logs at its configured level (`appliance run --log-level`)."""

    def __init__(self, capacity: int = LOG_LINES) -> None:
        super().__init__(logging.NOTSET)
        self.records: collections.deque[str] = collections.deque(maxlen=capacity)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                                            "%Y-%m-%d %H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append(self.format(record))
        except Exception:  # a broken record must not break the code that logged it
            self.handleError(record)

    def tail(self, n: int) -> list[str]:
        items = list(self.records)
        return items[-n:] if n > 0 else []
