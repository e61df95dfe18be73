"""Latency percentiles from the stats' histograms (cumulative counts).

A histogram's ``counts`` are cumulative: one count at each bound of
`balancer.stats.BUCKETS` (a snapshot's ``"bounds"``), then the total (+Inf).
A quantile is interpolated linearly inside the bucket that holds it, as
Prometheus' `histogram_quantile` does; one that falls in the last bucket
(above the largest finite bound) reads as that bound. No requests: None.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from balancer.stats import BUCKETS

QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))


def quantile(counts: Sequence[int], q: float, bounds: Sequence[float] = BUCKETS
             ) -> float | None:
    """The `q` quantile (seconds) of cumulative `counts` at `bounds` and +Inf."""
    total = counts[-1] if counts else 0
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0
    for bound, count in zip(bounds, counts, strict=False):  # (the +Inf count left out)
        if count >= rank:
            if count == lower_count:
                return float(bound)
            share = (rank - lower_count) / (count - lower_count)
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


def percentiles(histogram: dict[str, Any] | None) -> dict[str, float | None]:
    """``{"p50", "p95", "p99"}`` (seconds, rounded to 0.1 ms) of a histogram snapshot."""
    counts = (histogram or {}).get("counts") or []
    out: dict[str, float | None] = {}
    for name, q in QUANTILES:
        value = quantile(counts, q)
        out[name] = None if value is None else round(value, 4)
    return out


def delta(now: list[int], before: list[int] | None) -> list[int]:
    """The counts of the requests counted between two snapshots (`before` may be None)."""
    if not before or len(before) != len(now):
        return now
    return [max(0, n - m) for n, m in zip(now, before, strict=True)]
