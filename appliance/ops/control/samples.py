"""Reading the Prometheus registry for the console: samples, sums by label, histogram
quantiles, and rates of the source and module counters over the last seconds."""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger("appliance.control")

RATE_PERIOD_S = 1.0       # how often the rate tracker samples the counters
RATE_SPAN = 6             # samples kept: rates are over the last ~5 s


def metric_samples(registry) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of the registry by sample name (collected once per command)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = collections.defaultdict(list)
    for family in registry.collect():
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def metric_value(samples: dict, name: str, **labels: str) -> float:
    total = 0.0
    for have, value in samples.get(name, ()):
        if all(have.get(k) == v for k, v in labels.items()):
            total += value
    return total


def by_label(samples: dict, name: str, label: str, **labels: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for have, value in samples.get(name, ()):
        if all(have.get(k) == v for k, v in labels.items()):
            out[have.get(label, "")] = out.get(have.get(label, ""), 0.0) + value
    return out


def histogram(samples: dict, name: str, **labels: str) -> dict[str, Any]:
    """count, mean and bucket-bound quantiles (upper bounds, as Prometheus would say) of a histogram."""
    count = metric_value(samples, f"{name}_count", **labels)
    total = metric_value(samples, f"{name}_sum", **labels)
    buckets = sorted((float(le), v) for le, v in by_label(samples, f"{name}_bucket", "le", **labels).items())
    out: dict[str, Any] = {"count": int(count), "mean": total / count if count else None}
    for q in (0.5, 0.99):
        bound = None
        if count:
            for le, cumulative in buckets:
                if cumulative >= q * count:
                    bound = le
                    break
        out[f"p{round(q * 100)}"] = bound
    return out


class RateTracker:
    """Samples the source and module counters every second; rates are over the last ~5 s."""

    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self._read = read
        self._history: collections.deque[tuple[float, dict[str, float]]] = collections.deque(maxlen=RATE_SPAN)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="control-rates", daemon=True)

    def start(self) -> None:
        self._sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)

    def _sample(self) -> None:
        try:
            values = self._read()
        except Exception:   # a scrape racing a reload: skip this sample
            log.debug("rate sample failed", exc_info=True)
            return
        with self._lock:
            self._history.append((time.monotonic(), values))

    def _run(self) -> None:
        while not self._stop.wait(RATE_PERIOD_S):
            self._sample()

    def rate(self, key: str) -> float | None:
        """Per second over the sampled span, ending now; None before there is a span."""
        now_values = self._read()
        now = time.monotonic()
        with self._lock:
            history = list(self._history)
        past = next(((t, v) for t, v in history if now - t >= 0.5 and key in v), None)
        if past is None or key not in now_values:
            return None
        return max(0.0, now_values[key] - past[1][key]) / (now - past[0])
