"""The figures of one measured level, in the shape results.json keeps.

A level is a plain dict (JSON as is)::

    {"generator": "wrk", "connections": 1000, "keepalive": true, "duration_s": 10.0,
     "requests": 91234, "rps": 9123.4, "bytes": 1234,
     "latency_ms": {"p50": 1.2, "p90": 3.4, "p99": 9.9, "max": 20.1},
     "errors": {"connect": 0, "read": 0, "timeout": 0, "non2xx": 0}, "error_total": 0}

The built-in generator keeps latencies in a log-bucketed histogram (4% wide
buckets from 1 µs to 100 s), so its percentiles are exact to within 2%.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

HIST_STEP = math.log(1.04)
HIST_BUCKETS = 480
ERROR_KINDS = ("connect", "read", "timeout", "non2xx")


def bucket_of(latency_us: float) -> int:
    """The histogram bucket of a latency in microseconds."""
    if latency_us <= 1.0:
        return 0
    return min(HIST_BUCKETS - 1, int(math.log(latency_us) / HIST_STEP))


def percentile_us(hist: Sequence[int], fraction: float) -> float:
    """The latency (µs) below which `fraction` of the recorded requests fall."""
    total = sum(hist)
    if total == 0:
        return 0.0
    wanted = fraction * total
    seen = 0
    for index, count in enumerate(hist):
        seen += count
        if seen >= wanted:
            return math.exp((index + 0.5) * HIST_STEP)
    return math.exp(HIST_BUCKETS * HIST_STEP)


def max_us(hist: Sequence[int]) -> float:
    """Upper edge of the highest non-empty bucket."""
    for index in range(len(hist) - 1, -1, -1):
        if hist[index]:
            return math.exp((index + 1) * HIST_STEP)
    return 0.0


def level(*, generator: str, connections: int, keepalive: bool, duration_s: float,
          requests: int, bytes_read: int, latency_us: dict[str, float],
          errors: dict[str, int]) -> dict:
    """Assemble one level's figures (latencies given in µs, stored in ms)."""
    errors = {kind: int(errors.get(kind, 0)) for kind in ERROR_KINDS}
    duration_s = max(duration_s, 1e-9)
    return {
        "generator": generator, "connections": connections, "keepalive": keepalive,
        "duration_s": round(duration_s, 3), "requests": int(requests),
        "rps": round(requests / duration_s, 1), "bytes": int(bytes_read),
        "latency_ms": {k: round(v / 1000.0, 3) for k, v in latency_us.items()},
        "errors": errors, "error_total": sum(errors.values()),
    }


def error_rate(row: dict) -> float:
    """Errors per attempted request (0 when nothing was attempted)."""
    attempts = row.get("requests", 0) + row.get("errors", {}).get("connect", 0) \
        + row.get("errors", {}).get("read", 0) + row.get("errors", {}).get("timeout", 0)
    return row.get("error_total", 0) / attempts if attempts else 0.0


def latency_line(times_ms: Sequence[float]) -> str:
    """One line of latencies in milliseconds: count, p50, p99 and max."""
    if not times_ms:
        return "n 0"
    ordered = sorted(times_ms)
    n = len(ordered)
    return (f"n {n}  p50 {statistics.median(ordered):.2f}  "
            f"p99 {ordered[min(n - 1, int(n * 0.99))]:.2f}  max {ordered[-1]:.2f} ms")
