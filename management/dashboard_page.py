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
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from werkzeug.wrappers import Request, Response

from balancer.stores import Store, StoreError
from management import diagnosis
from management.http import file_response
from management.runtime import Runtime
from management.stats_view import FIRST_PAGE, stats_view

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


def initial_state(store: Store, runtime: Runtime, history: Any = None
                  ) -> dict[str, Any] | None:
    """``{"table", "stats", "info", "deploys", "history", "heavy"}`` as the API
    would answer now, or None."""
    try:
        data = store.load()
        state = {"table": {"version": data.version, "hosts": data.hosts},
                 "stats": stats_view(runtime.stats(FIRST_PAGE)), "info": runtime.info(),
                 "deploys": store.records().deploys()}
        if history is not None:
            state["history"] = history.view(CHART_SECONDS, time.time())
        state["heavy"] = heavy(runtime)
        return state
    except StoreError:
        return None
    except Exception:  # the page polls and shows the API's own error
        log.exception("dashboard: the initial state could not be read")
        return None


def heavy(runtime: Runtime) -> dict[str, Any]:
    """What the "what's heavy" panel polls (management/static/heavy.js), by requests."""
    tops = {group: diagnosis.top(runtime, {"by": "requests", "group": group,
                                           "window": "60", "limit": "5"})
            for group in ("client", "path", "backend")}
    return {"measure": "requests", "tops": tops,
            "slow": diagnosis.inflight(runtime, {"min_age": "5"})}


def embed(page: str, state: dict[str, Any] | None) -> str:
    """`page` with `state` in its initial-state element (unchanged when None)."""
    if state is None:
        return page
    data = (json.dumps(state, separators=(",", ":"), allow_nan=False)
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))
    return page.replace(PLACEHOLDER, PLACEHOLDER.replace(">null<", f">{data}<"), 1)


class DashboardRoutes:
    """``/`` and ``/static/*`` (a part of `ManagementApp`): public, carrying no data
    but the embedded state, which only a token-less API shows."""

    store: Store
    runtime: Runtime
    history: Any
    token: str | None

    def on_index(self, request: Request) -> Response:
        index = STATIC_DIR / "index.html"
        if not index.is_file():
            return Response(FALLBACK_INDEX, content_type="text/html; charset=utf-8")
        state = None if self.token else initial_state(self.store, self.runtime,
                                                                        self.history)
        response = Response(embed(index.read_text(), state),
                            content_type="text/html; charset=utf-8")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"  # no page frames the dashboard
        return response

    def on_static(self, request: Request, name: str) -> Response:
        return file_response(STATIC_DIR, name)
