"""The dashboard page served with the current state in it, so its first paint has data.

Invariants:
* The state is the documents the page polls (``/api/v1/hosts``, ``/api/v1/deploys``,
  ``/api/v1/stats``, ``/api/v1/info``, the "what's heavy" panel's
  ``/api/v1/top`` and ``/api/v1/inflight``) and the last five minutes of
  ``/api/v1/history``, taken when the page is requested: the charts are full
  on first paint.
* It is embedded only when the management API has no token: the page itself
  is public, and with a token the data is fetched with the token as before.
* It is inert JSON in a ``<script type="application/json">`` element with
  ``<``, ``>`` and ``&`` escaped, so no host name or rule body can close the
  element or become markup. A state that cannot be read (store down, stats
  failing) is left out: the page then polls, and reports the failure itself.
* The workers are asked for the state's parts at once (one greenlet each, as
  `management.cluster` asks the workers): a worker that does not answer costs
  the page one ask's timeout (2 s), not one per part (six: 13 s).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
from werkzeug.wrappers import Request, Response

from balancer.descriptors import exhaustion
from balancer.stores import StoreError
from management import diagnosis
from management.http import ApiError, file_response
from management.runtime import Runtime
from management.stats_view import FIRST_PAGE, stats_view
from management.table_reads import TableReads

log = logging.getLogger("balancer.management")

STATIC_DIR = Path(__file__).parent / "static"
FALLBACK_INDEX = """<!doctype html>
<html><head><meta charset="utf-8"><title>balancer</title></head>
<body><h1>balancer management</h1>
<p>The dashboard is not installed. The JSON API is at
<a href="/api/v1/hosts">/api/v1/hosts</a>, <a href="/api/v1/stats">/api/v1/stats</a>,
<a href="/api/v1/info">/api/v1/info</a>; metrics at <a href="/metrics">/metrics</a>.</p>
</body></html>
"""
CHART_SECONDS = 300  # the charts' window (management/static/history.js WINDOW_MS)
PLACEHOLDER = '<script id="initial-state" type="application/json">null</script>'
HEAVY_GROUPS = ("client", "path", "backend")
# the dashboard's own files only: no inline script, style or style attribute
# (static/boot.js, dashboard.css), no other origin, no frame, no form posted
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                           "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")


def initial_state(reads: TableReads, runtime: Runtime, history: Any = None
                  ) -> tuple[bytes, dict[str, Any]] | None:
    """The table's list body as ``GET /api/v1/hosts`` answers it (encoded once per
    version, `TableReads.body`), and ``{"stats", "info", "deploys", "history",
    "heavy"}`` as the API would answer now; None while the store has a problem."""
    try:
        data, problem = reads.readable()
        if problem is not None:
            return None  # the page polls, and shows the problem
        state = {"deploys": reads.store.records().deploys()}
        if history is not None:
            state["history"] = history.view(CHART_SECONDS, time.time())
        state.update(from_workers(runtime))
        return reads.body(data), state
    except (StoreError, ApiError):  # the page polls, and shows the problem
        return None
    except Exception as exc:  # the page polls and shows the API's own error
        if exhaustion(exc) is None:  # (out of descriptors: the API's requests say so)
            log.exception("dashboard: the initial state could not be read")
        return None


def from_workers(runtime: Runtime) -> dict[str, Any]:
    """``{"stats", "info", "heavy"}``: the state's parts the workers answer, asked at
    once; "heavy" is what the "what's heavy" panel polls (management/static/heavy.js),
    by requests."""
    def top(group: str) -> Callable[[], dict[str, Any]]:
        return lambda: diagnosis.top(runtime, {"by": "requests", "group": group,
                                               "window": "60", "limit": "5"})
    asks: dict[str, Callable[[], Any]] = {
        "stats": lambda: stats_view(runtime.stats(FIRST_PAGE)), "info": runtime.info,
        "slow": lambda: diagnosis.inflight(runtime, {"min_age": "5"}),
        **{group: top(group) for group in HEAVY_GROUPS}}
    asked = {name: gevent.spawn(ask) for name, ask in asks.items()}
    gevent.joinall(list(asked.values()), raise_error=True)
    found = {name: job.value for name, job in asked.items()}
    return {"stats": found["stats"], "info": found["info"],
            "heavy": {"measure": "requests", "slow": found["slow"],
                      "tops": {group: found[group] for group in HEAVY_GROUPS}}}


def embed(page: str, state: tuple[bytes, dict[str, Any]] | None) -> str:
    """`page` with `state` (`initial_state`: the table's encoded body, the rest) in its
    initial-state element, as ``{"table": TABLE, ...}`` (unchanged when None)."""
    if state is None:
        return page
    table, rest = state
    others = json.dumps(rest, separators=(",", ":"), allow_nan=False)
    data = (f'{{"table":{table.decode().rstrip()}{"," if rest else ""}{others[1:]}'
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))
    return page.replace(PLACEHOLDER, PLACEHOLDER.replace(">null<", f">{data}<"), 1)


class DashboardRoutes:
    """``/`` and ``/static/*`` (a part of `ManagementApp`): public, carrying no data
    but the embedded state, which only a token-less API shows."""

    table_reads: TableReads
    runtime: Runtime
    history: Any
    token: str | None

    def on_index(self, request: Request) -> Response:
        index = STATIC_DIR / "index.html"
        if not index.is_file():
            return guarded(Response(FALLBACK_INDEX, content_type="text/html; charset=utf-8"))
        state = None if self.token else initial_state(self.table_reads, self.runtime,
                                                      self.history)
        response = Response(embed(index.read_text(), state),
                            content_type="text/html; charset=utf-8")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return guarded(response)

    def on_static(self, request: Request, name: str) -> Response:
        return guarded(file_response(STATIC_DIR, name))


def guarded(response: Response) -> Response:
    """`response` with the dashboard's Content-Security-Policy, and framed by no page."""
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Frame-Options"] = "DENY"
    return response
