"""Prometheus metrics (SPEC §7), built at scrape time from a stats snapshot.

Invariants:
* The hot path never touches prometheus-client: it bumps plain counters in
  `balancer.stats`; this collector turns one merged snapshot (every worker)
  into metric families when Prometheus scrapes.
* Every metric name of SPEC §7 is always exposed, even with no traffic.
* Each app has its own `CollectorRegistry`; nothing is registered globally.
* A scrape costs the hosts that have seen a request (`METRICS_SELECT`), not
  the table: an idle host's counters are all zero and it has no series
  until its first request (its backends' `balancer_backend_up` too, unless
  an active health check watches them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

Snapshot = dict[str, Any]
METRICS_SELECT: dict[str, Any] = {"active": True}  # the `Runtime.stats` select of a scrape


class SnapshotCollector(Collector):
    """Yields the SPEC §7 families from `snapshot()` on every collect."""

    def __init__(self, snapshot: Callable[[], Snapshot],
                 expiries: Callable[[], dict[str, float]] | None = None,
                 acme: Callable[[], dict[str, Any]] | None = None,
                 own_drops: Callable[[], dict[str, int]] | None = None) -> None:
        self.snapshot = snapshot
        self.expiries = expiries
        self.acme = acme  # `management.acme_api.figures`
        self.own_drops = own_drops  # process log lines dropped: {"management", "arbiter"}

    def describe(self) -> list:
        return []  # no collect() at registration time

    def collect(self) -> Iterator[Any]:
        snap = self.snapshot()
        hosts: dict[str, Any] = snap.get("hosts", {})
        yield from _per_host(hosts)
        yield from _per_backend(hosts)
        yield _gauge("balancer_open_connections", "Client connections open now.",
                     snap.get("open_connections", 0))
        yield _gauge("balancer_lingering_connections",
                     "Of the open client connections, those closing after their response "
                     "that read and discard what the client still sends (lingering close).",
                     snap.get("lingering_connections", 0))
        yield _gauge("balancer_routing_version", "Version of the routing table being served.",
                     snap.get("routing_version", 0))
        yield CounterMetricFamily("balancer_config_reloads_total",
                                  "Routing tables applied (summed over workers).",
                                  value=snap.get("config_reloads", 0))
        yield _gauge("balancer_store_up", "1 when the config store is reachable.",
                     snap.get("store_up", 0))
        yield CounterMetricFamily("balancer_access_log_dropped_records_total",
                                  "Access log records dropped because writing them failed "
                                  "(disk full, file size limit, closed pipe) or blocked.",
                                  value=snap.get("access_log_dropped", 0))
        yield self._process_log(snap)
        yield from self._tls(snap)
        yield from self._acme()

    def _process_log(self, snap: Snapshot) -> CounterMetricFamily:
        """Lines dropped by kind of process: the workers' summed (their snapshot),
        the management process's and the arbiter's (`own_drops`)."""
        dropped = CounterMetricFamily("balancer_process_log_dropped_lines_total",
                                      "Process log (stderr) lines dropped because stderr "
                                      "blocked or failed, by kind of process.",
                                      labels=["process"])
        own = self.own_drops() if self.own_drops is not None else {}
        dropped.add_metric(["worker"], snap.get("process_log_dropped", 0))
        for kind in ("management", "arbiter"):
            dropped.add_metric([kind], own.get(kind, 0))
        return dropped

    def _tls(self, snap: Snapshot) -> Iterator[Any]:
        handshakes = CounterMetricFamily("balancer_tls_handshakes_total",
                                         "TLS handshakes on TLS listeners, by outcome.",
                                         labels=["outcome"])
        for outcome, n in sorted(snap.get("tls_handshakes", {}).items()):
            handshakes.add_metric([outcome], n)
        yield handshakes
        expiry = GaugeMetricFamily("balancer_certificate_expiry_seconds",
                                   "Seconds until the stored certificate of a host expires "
                                   "(negative once expired).", labels=["host"])
        try:
            found = self.expiries() if self.expiries is not None else {}
        except Exception:  # the store is down: the other metrics still answer
            found = {}
        for host, seconds in sorted(found.items()):
            expiry.add_metric([host], seconds)
        yield expiry

    def _acme(self) -> Iterator[Any]:
        try:
            found: dict[str, Any] = self.acme() if self.acme is not None else {}
        except Exception:  # the store is down: the other metrics still answer
            found = {}
        issuances = CounterMetricFamily("balancer_acme_issuances_total",
                                        "ACME issuances this balancer's issuer finished, "
                                        "by outcome.", labels=["outcome"])
        for outcome in ("ok", "failed"):
            issuances.add_metric([outcome], found.get("issuances", {}).get(outcome, 0))
        yield issuances
        hosts = GaugeMetricFamily("balancer_acme_hosts",
                                  'Hosts whose rule has "tls": "acme", by issuance state.',
                                  labels=["state"])
        for state in ("pending", "issued", "failed"):
            hosts.add_metric([state], found.get("hosts", {}).get(state, 0))
        yield hosts
        upcoming = GaugeMetricFamily("balancer_acme_next_attempt_seconds",
                                     "Seconds until the ACME issuer acts on a host again "
                                     "(renewal or retry; 0: due now).", labels=["host"])
        for host, seconds in sorted(found.get("next_attempt", {}).items()):
            upcoming.add_metric([host], seconds)
        yield upcoming


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _per_host(hosts: dict[str, Any]) -> Iterator[Any]:
    requests = CounterMetricFamily("balancer_requests_total", "Completed requests.",
                                   labels=["host", "code"])
    duration = HistogramMetricFamily("balancer_request_duration_seconds",
                                     "Time from request head to last response byte.",
                                     labels=["host"])
    received = CounterMetricFamily("balancer_bytes_received_total",
                                   "Bytes received from clients.", labels=["host"])
    sent = CounterMetricFamily("balancer_bytes_sent_total", "Bytes sent to clients.",
                               labels=["host"])
    open_requests = GaugeMetricFamily("balancer_open_requests", "Requests in progress.",
                                      labels=["host"])
    spinning = GaugeMetricFamily("balancer_spinning_requests",
                                 "Requests held by a spin rule or spin_when_down.",
                                 labels=["host"])
    limited = CounterMetricFamily("balancer_limited_requests_total",
                                  "Requests refused 429 by the rule's limits.", labels=["host"])
    for host, h in sorted(hosts.items()):
        for code, n in sorted(h.get("codes", {}).items()):
            requests.add_metric([host, str(code)], n)
        hist = h.get("duration", {})
        if hist.get("buckets"):
            duration.add_metric([host], _buckets(hist["buckets"]), hist.get("sum", 0.0))
        received.add_metric([host], h.get("bytes_received", 0))
        sent.add_metric([host], h.get("bytes_sent", 0))
        open_requests.add_metric([host], h.get("open_requests", 0))
        spinning.add_metric([host], h.get("spinning", 0))
        limited.add_metric([host], h.get("limited", 0))
    yield from (requests, duration, received, sent, open_requests, spinning, limited)


def _per_backend(hosts: dict[str, Any]) -> Iterator[Any]:
    requests = CounterMetricFamily("balancer_backend_requests_total",
                                   "Requests sent to a backend, by outcome.",
                                   labels=["host", "backend", "outcome"])
    up = GaugeMetricFamily("balancer_backend_up", "1 when the backend is considered up.",
                           labels=["host", "backend"])
    for host, h in sorted(hosts.items()):
        for backend, b in sorted(h.get("backends", {}).items()):
            for outcome, n in sorted(b.get("outcomes", {}).items()):
                requests.add_metric([host, backend, outcome], n)
            up.add_metric([host, backend], 1 if b.get("state") == "up" else 0)
    yield from (requests, up)


def _buckets(buckets: list[list[Any]]) -> list[tuple[str, float]]:
    """Snapshot buckets ``[[bound, cumulative], ...]`` as (le, count), ending in +Inf."""
    out = []
    for bound, count in buckets:
        value = float(bound)  # JSON may carry the last bound as Infinity or "inf"
        out.append(("+Inf" if math.isinf(value) else floatToGoString(value), count))
    if not out or out[-1][0] != "+Inf":
        out.append(("+Inf", out[-1][1] if out else 0))
    return out


class Metrics:
    """The ``/metrics`` body for one app: a private registry over a snapshot source."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, snapshot: Callable[[], Snapshot],
                 expiries: Callable[[], dict[str, float]] | None = None,
                 acme: Callable[[], dict[str, Any]] | None = None,
                 own_drops: Callable[[], dict[str, int]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(snapshot, expiries, acme, own_drops))

    def render(self) -> bytes:
        """The Prometheus text exposition of the current snapshot."""
        return generate_latest(self.registry)
