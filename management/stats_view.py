"""The ``/api/v1/stats`` view of a merged stats snapshot (SPEC §5).

Per host: ``open_requests``, ``completed_requests``, ``bytes_received``,
``bytes_sent``, ``responses`` by class, ``spinning``, ``limited``, ``latency``
(p50/p95/p99 seconds of the whole request, since start); per backend:
``state``, ``in_flight``, ``failures``, ``outcomes``, ``latency`` (time to the
response head). Missing counters read as zero, so a host that has seen no
traffic has the same shape as a busy one (latencies are null).

A view costs the hosts it shows, not the table: a page of hosts in key order
(``?after=KEY&limit=N``, `PAGE_LIMIT` hosts by default, ``"next"`` naming the
key the next page starts after) or the hosts named (``?host=KEY``, repeatable).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from balancer.control import MAX_PAGE
from balancer.rules import normalize_host
from balancer.stats import OUTCOMES, shown_problem
from management.http import bad_request
from management.latency import percentiles

HOST_COUNTERS = ("open_requests", "completed_requests", "bytes_received", "bytes_sent",
                 "spinning", "limited")
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
PAGE_LIMIT = 1000  # hosts per page unless ?limit= says otherwise
FIRST_PAGE: dict[str, Any] = {"after": "", "limit": PAGE_LIMIT}


def stats_select(args: Mapping[str, Any]) -> dict[str, Any]:
    """The hosts a ``/api/v1/stats`` query asks for (a `Runtime.stats` select);
    400 `bad_request` for a bad ``limit``."""
    named = args.getlist("host") if hasattr(args, "getlist") else []
    if named:
        return {"hosts": sorted({normalize_host(h) for h in named})}
    text = args.get("limit", str(PAGE_LIMIT))
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 0 < limit <= MAX_PAGE:
        raise bad_request([f"limit: must be an integer from 1 to {MAX_PAGE}, got {text!r}"])
    return {"after": normalize_host(args.get("after", "")), "limit": limit}


def stats_view(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The whole ``/api/v1/stats`` body (``"next"``: null after the last page;
    ``"lagging"``: the workers left out because they do not answer, when any)."""
    view = {
        "routing_version": snapshot.get("routing_version", 0),
        "config_reloads": snapshot.get("config_reloads", 0),
        "open_connections": snapshot.get("open_connections", 0),
        "lingering_connections": snapshot.get("lingering_connections", 0),
        "store_up": snapshot.get("store_up", 0),
        "hosts": {host: host_stats(h) for host, h in sorted(snapshot.get("hosts", {}).items())},
        "next": snapshot.get("next"),
    }
    if snapshot.get("lagging"):
        view["lagging"] = snapshot["lagging"]
    return view


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
    """One backend's counters; `problem` (why it is not up, or its health check's
    own failure) when a worker said."""
    out = {"state": b.get("state", "up"), "in_flight": b.get("in_flight", 0),
           "tunnels": b.get("tunnels", 0), "failures": b.get("failures", 0),
           "outcomes": {**dict.fromkeys(OUTCOMES, 0), **b.get("outcomes", {})},
           "latency": percentiles(b.get("duration"))}
    if b.get("problem"):
        out["problem"] = shown_problem(b["problem"])
    return out
