"""Latency percentiles from the stats' histograms (cumulative buckets).

A quantile is interpolated linearly inside the bucket that holds it, as
Prometheus' `histogram_quantile` does; one that falls in the last bucket
(above the largest finite bound) reads as that bound. No requests: None.
"""

from __future__ import annotations

import math
from typing import Any

QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))


def quantile(buckets: list[list[Any]], q: float) -> float | None:
    """The `q` quantile (seconds) of cumulative ``[[bound, count], ...]`` buckets."""
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0
    for bound, count in buckets:
        bound = float(bound)
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            share = (rank - lower_count) / (count - lower_count)
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


def percentiles(histogram: dict[str, Any] | None) -> dict[str, float | None]:
    """``{"p50", "p95", "p99"}`` (seconds, rounded to 0.1 ms) of a histogram snapshot."""
    buckets = (histogram or {}).get("buckets") or []
    out: dict[str, float | None] = {}
    for name, q in QUANTILES:
        value = quantile(buckets, q)
        out[name] = None if value is None else round(value, 4)
    return out


def delta(now: list[list[Any]], before: list[list[Any]] | None) -> list[list[Any]]:
    """The buckets of the requests counted between two snapshots (`before` may be None)."""
    if not before or len(before) != len(now):
        return now
    return [[b, max(0, n - m)] for (b, n), (_, m) in zip(now, before, strict=True)]
