"""Prometheus metrics (SPEC §7), built at scrape time from a stats snapshot.

Invariants:
* The hot path never touches prometheus-client: it bumps plain counters in
  `balancer.stats`; this collector turns one merged snapshot (every worker)
  into metric families when Prometheus scrapes.
* Every metric name of SPEC §7 is always exposed, even with no traffic.
* Nothing is registered globally: each scrape's families are made from its
  snapshot (prometheus-client's metric families) and written as text by
  `management.metrics_text.families_text`, which writes what prometheus-client's
  `generate_latest` wrote. Its module, `prometheus_client.exposition`, and the
  package's `__init__` import its HTTP servers and push gateway client (1.3 MiB
  of the management process: `management.process.parts_only`).
* The families with a sample per host are written by `management.metrics_text`
  (quicker than prometheus-client, and pausing for other requests), as the
  body is sent: a scrape's text is never whole in memory. What can fail (the
  snapshot, the store's certificates) is asked before the body starts, so a
  failure is still an error response.
* A scrape costs the hosts that have seen a request (`METRICS_SELECT`), not
  the table: an idle host's counters are all zero and it has no series
  until its first request (its backends' `balancer_backend_up` too, unless
  an active health check watches them).
* At most `MOST_HELD` snapshots are held by the bodies being sent: a scrape
  that needs room cuts the bodies of the oldest (`metrics_text.Rows.cut`),
  which have been read the slowest. Scrapes at once share one snapshot
  (`management.cluster.ClusterRuntime.active`), so they count once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from balancer.turns import turn
from management.collector import COLLECTOR
from management.metrics_text import Cut, Rows, families_text, per_host_text

log = logging.getLogger("balancer.management")
Snapshot = dict[str, Any]
METRICS_SELECT: dict[str, Any] = {"active": True}  # the `Runtime.stats` select of a scrape
MOST_HELD = 4  # snapshots held by the bodies being sent (scrapes at once share theirs)
CUT_SHORT = b"balancer_scrape_cut_short{"  # a cut body's end: a line no parser takes


class SnapshotCollector:
    """Yields the SPEC §7 families with few samples from one snapshot, `snap`
    (those with a sample per host are `management.metrics_text`'s)."""

    def __init__(self, snap: Snapshot, expiries: Callable[[], dict[str, float]] | None = None,
                 acme: Callable[[], dict[str, Any]] | None = None,
                 own_drops: Callable[[], dict[str, int]] | None = None) -> None:
        self.snap = snap
        self.expiries = expiries
        self.acme = acme  # `management.acme_api.figures`
        self.own_drops = own_drops  # process log lines dropped: {"management", "arbiter"}

    def collect(self) -> Iterator[Metric]:
        snap = self.snap
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

    def _tls(self, snap: Snapshot) -> Iterator[Metric]:
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

    def _acme(self) -> Iterator[Metric]:
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


class Metrics:
    """The ``/metrics`` body for one app: each scrape's families made from its snapshot."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, snapshot: Callable[[], Snapshot],
                 expiries: Callable[[], dict[str, float]] | None = None,
                 acme: Callable[[], dict[str, Any]] | None = None,
                 own_drops: Callable[[], dict[str, int]] | None = None,
                 pause: Callable[[], None] = turn, most_held: int = MOST_HELD) -> None:
        self.snapshot = snapshot
        self.sources = (expiries, acme, own_drops)
        self.pause = pause  # lets other requests run during a big scrape
        self.most_held = most_held
        self.sending: list[tuple[Rows, float]] = []  # the bodies being sent, oldest first

    def render(self) -> Iterator[bytes]:
        """The Prometheus text exposition of the current snapshot, a slice at a
        time: the snapshot and the few families taken now, the per-host
        families written as they are iterated."""
        with COLLECTOR.held():  # (the body holds it from its first slice: `_sent`)
            snap = self.snapshot()
            few = families_text(SnapshotCollector(snap, *self.sources).collect())
            rows = Rows(snap.get("hosts", {}), snap, self.pause)  # (sorted in slices)
            return self._sent(rows, few)

    def held(self) -> list[Any]:
        """The snapshots the bodies being sent hold, oldest first."""
        held: list[Any] = []
        for rows, _ in self.sending:
            if not any(rows.source is snap for snap in held):
                held.append(rows.source)
        return held

    def make_room(self, snap: Snapshot) -> None:
        """Cut the bodies of the oldest snapshots held, leaving room for `snap`
        within `most_held`."""
        held = self.held()
        if any(snap is other for other in held):
            return
        for old in held[:max(0, len(held) + 1 - self.most_held)]:
            cut = [body for body in self.sending if body[0].source is old]
            for body in cut:
                body[0].cut()
                self.sending.remove(body)
            log.warning("metrics: %d scrape(s) still being sent after %.1f s cut short: "
                        "scrapes being sent may hold %d snapshots", len(cut),
                        time.monotonic() - cut[0][1], self.most_held)

    def _sent(self, rows: Rows, last: bytes) -> Iterator[bytes]:
        """The body, listed as being sent from its first slice on (bug: listed by
        `render`, a body never iterated, as HEAD's, stayed listed with its
        snapshot until four newer scrapes cut it: its `finally` never ran).
        A cut body ends with `CUT_SHORT` (bug: one sent to an HTTP/1.0 client,
        its end the connection's, ended at a line's end: a valid exposition)."""
        self.make_room(rows.source)
        body = (rows, time.monotonic())
        self.sending.append(body)
        try:
            with COLLECTOR.held():
                yield from per_host_text(rows, self.pause)
                yield last
        except Cut:
            yield CUT_SHORT
            raise
        finally:
            if body in self.sending:
                self.sending.remove(body)
