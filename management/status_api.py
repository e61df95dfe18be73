"""The data-plane routes of the management API (SPEC §5, §11): statistics,
reload, info, diagnosis, history, health, readiness and metrics.

Invariants:
* Every answer comes from the runtime (the workers' control sockets) at the
  moment of the request, and costs what it shows, not the table
  (`management.stats_view`).
* prometheus-client is imported at the first scrape (`StatusRoutes.exporter`),
  so a management process nobody scrapes never holds it (`balancer.preload`);
  an exporter that cannot be imported answers 503 ``metrics_unavailable``
  and the next scrape tries again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from werkzeug.wrappers import Request, Response

from balancer import processlog
from balancer.rules import normalize_host
from balancer.stores import Store
from management import certs_api, diagnosis
from management.certs_watch import CertsWatch
from management.history import History
from management.http import ApiError, json_response, version_headers
from management.mirror import Mirror
from management.runtime import Runtime
from management.stats_view import host_stats, stats_select, stats_view
from management.table_reads import TableReads

log = logging.getLogger("balancer.management")


class StatusRoutes:
    """The `on_<endpoint>` methods of the data plane's routes (a part of `ManagementApp`)."""

    store: Store
    runtime: Runtime
    mirror: Mirror
    table_reads: TableReads
    certs_watch: CertsWatch
    history: History
    metrics: Any  # `management.metrics.Metrics`, made by `exporter` at the first scrape
    acme_figures: Callable[[], dict[str, Any]]

    def on_stats(self, request: Request) -> Response:
        return json_response(stats_view(self.runtime.stats(stats_select(request.args))))

    def on_host_stats(self, request: Request, host: str) -> Response:
        key = normalize_host(host)
        snapshot = self.runtime.stats({"hosts": [key]})
        found = snapshot.get("hosts", {}).get(key)
        if found is None and key not in self.table_reads.readable()[0].hosts:
            raise ApiError(404, "not_found", f"no statistics for host {key!r}")
        lagging = {"lagging": snapshot["lagging"]} if snapshot.get("lagging") else {}
        return json_response({"host": key, **host_stats(found or {}), **lagging})

    def on_reload(self, request: Request) -> Response:
        version = self.runtime.reload()
        return json_response({"version": version}, headers=version_headers(version))

    def on_info(self, request: Request) -> Response:
        info = self.runtime.info()
        store = info.setdefault("store", {})
        store["problem"] = self.mirror.problem or store.get("problem")
        store["certs_problem"] = self.certs_watch.problem
        # (the management process's mirror follows the store; the app alone has the
        # store's last load)
        raised = self.mirror.raised if self.mirror.table is not None else self.store.raised()
        store["raised"] = [r._asdict() for r in raised]
        return json_response(info)

    def on_top(self, request: Request) -> Response:
        return json_response(diagnosis.top(self.runtime, request.args))

    def on_inflight(self, request: Request) -> Response:
        return json_response(diagnosis.inflight(self.runtime, request.args))

    def on_history(self, request: Request) -> Response:
        return json_response(diagnosis.history(self.history, request.args))

    def on_healthz(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    def on_readyz(self, request: Request) -> Response:
        reasons = []
        gone = getattr(self.runtime, "run_dir_gone", lambda: None)()  # a ClusterRuntime's
        if gone is not None:
            reasons.append(gone)  # no worker can be asked (it said "no table loaded yet")
        elif not self.runtime.is_ready():
            reasons.append("no routing table loaded yet")
        if not self.store.is_reachable():
            problem = self.store.last_error()
            reasons.append(f"store unreachable: {problem}" if problem else "store unreachable")
        if reasons:
            return json_response({"ready": False, "reasons": reasons}, status=503)
        return json_response({"ready": True, "reasons": []})

    def on_metrics(self, request: Request) -> Response:
        metrics = self.exporter()
        return Response(metrics.render(), content_type=metrics.content_type,
                        headers={"Cache-Control": "no-store"},  # live figures, as every answer
                        direct_passthrough=True)  # streamed: sent as written, never joined

    def exporter(self) -> Any:
        """The Prometheus exporter (`management.metrics.Metrics`), made at the
        first scrape: per-host series for the hosts that have seen a request (or
        are health-checked), the certificates' expiries and ACME's figures."""
        if self.metrics is None:
            try:
                from management.metrics import METRICS_SELECT, Metrics
            except ImportError as exc:  # a broken installation: every other route still works
                log.error("metrics: cannot import the Prometheus exporter: %s", exc)
                raise ApiError(503, "metrics_unavailable",
                               f"the Prometheus exporter cannot be imported: {exc}") from None
            runtime = self.runtime
            arbiter = getattr(runtime, "arbiter_log_dropped", lambda: 0)  # a ClusterRuntime's
            self.metrics = Metrics(lambda: runtime.stats(METRICS_SELECT),
                                   lambda: certs_api.expiries(self.store), self.acme_figures,
                                   lambda: {"management": processlog.dropped(),
                                            "arbiter": arbiter()})
        return self.metrics
