"""Reading the server's /metrics: parse the exposition and sample it periodically during a run.

`parse_metrics(text) -> {(name, labels_tuple): value}` with label tuples sorted by label name;
`series(samples, name, **match)` sums matching samples; `histogram_quantile(samples, name, q, **match)`
interpolates a quantile from cumulative buckets as Prometheus does. `MetricsSampler(url, every_s)`
is a background thread that records `(t, samples)` snapshots; windowed rates come from
differences of consecutive snapshots (ab_stats.py). Test: `pytest tests/test_ab_stats.py`.
"""

from __future__ import annotations

import math
import threading
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def series(samples: Samples, name: str, **match: str) -> float:
    """Sum of the samples called `name` whose labels include `match`."""
    total = 0.0
    for (n, labels), v in samples.items():
        if n == name and all(dict(labels).get(k) == str(val) for k, val in match.items()):
            total += v
    return total


def label_values(samples: Samples, name: str, label: str) -> list[str]:
    return sorted({dict(l)[label] for (n, l) in samples if n == name and label in dict(l)})


def histogram_quantile(samples: Samples, name: str, q: float, **match: str) -> float | None:
    """Quantile q of histogram `name` (cumulative `_bucket` samples), linear within a bucket."""
    buckets: dict[float, float] = {}
    for (n, labels), v in samples.items():
        d = dict(labels)
        if n == f"{name}_bucket" and all(d.get(k) == str(val) for k, val in match.items()):
            le = math.inf if d["le"] in ("+Inf", "inf") else float(d["le"])
            buckets[le] = buckets.get(le, 0.0) + v
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        if buckets[b] >= rank:
            if math.isinf(b):
                return prev_bound  # Prometheus returns the highest finite bound
            width = buckets[b] - prev_count
            return prev_bound + (b - prev_bound) * ((rank - prev_count) / width if width else 1.0)
        prev_bound, prev_count = b, buckets[b]
    return prev_bound


def diff(after: Samples, before: Samples) -> Samples:
    """Counter increase between two snapshots (new series count from zero)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def fetch(url: str, timeout_s: float = 10.0) -> Samples:
    r = httpx.get(url.rstrip("/") + "/metrics", timeout=timeout_s)
    r.raise_for_status()
    return parse_metrics(r.text)


class MetricsSampler:
    """Snapshots of /metrics every `every_s` seconds on a daemon thread (bounded by stop())."""

    def __init__(self, url: str, every_s: float = 5.0):
        if every_s <= 0:
            raise ValueError("the sampling interval must be positive")
        self.url, self.every_s = url, every_s
        self.snapshots: list[tuple[float, Samples]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-sampler", daemon=True)

    def start(self) -> "MetricsSampler":
        self._take()
        self._thread.start()
        return self

    def _take(self) -> None:
        try:
            self.snapshots.append((time.monotonic(), fetch(self.url)))
        except httpx.HTTPError:
            self.errors += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._take()

    def stop(self) -> list[tuple[float, Samples]]:
        self._stop.set()
        self._thread.join(timeout=self.every_s + 15)
        self._take()
        return self.snapshots
