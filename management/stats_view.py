"""The ``/api/v1/stats`` view of a merged stats snapshot (SPEC §5).

Per host: ``open_requests``, ``completed_requests``, ``bytes_received``,
``bytes_sent``, ``responses`` by class, ``spinning``, ``limited``, ``latency``
(p50/p95/p99 seconds of the whole request, since start); per backend:
``state``, ``in_flight``, ``failures``, ``outcomes``, ``latency`` (time to the
response head). Missing counters read as zero, so a host that has seen no
traffic has the same shape as a busy one (latencies are null).
"""

from __future__ import annotations

from typing import Any

from management.latency import percentiles

HOST_COUNTERS = ("open_requests", "completed_requests", "bytes_received", "bytes_sent",
                 "spinning", "limited")
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def stats_view(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The whole ``/api/v1/stats`` body."""
    return {
        "routing_version": snapshot.get("routing_version", 0),
        "config_reloads": snapshot.get("config_reloads", 0),
        "open_connections": snapshot.get("open_connections", 0),
        "store_up": snapshot.get("store_up", 0),
        "hosts": {host: host_stats(h) for host, h in sorted(snapshot.get("hosts", {}).items())},
    }


def host_stats(h: dict[str, Any]) -> dict[str, Any]:
    """One host's counters and its backends."""
    out: dict[str, Any] = {name: h.get(name, 0) for name in HOST_COUNTERS}
    responses = h.get("responses", {})
    out["responses"] = {c: responses.get(c, 0) for c in CLASSES}
    out["latency"] = percentiles(h.get("duration"))
    out["backends"] = {address: backend_stats(b)
                       for address, b in sorted(h.get("backends", {}).items())}
    return out


def backend_stats(b: dict[str, Any]) -> dict[str, Any]:
    return {"state": b.get("state", "up"), "in_flight": b.get("in_flight", 0),
            "tunnels": b.get("tunnels", 0), "failures": b.get("failures", 0),
            "outcomes": dict(b.get("outcomes", {})), "latency": percentiles(b.get("duration"))}
