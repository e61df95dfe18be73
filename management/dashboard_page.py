"""The dashboard page served with the current state in it, so its first paint has data.

Invariants:
* The state is the same three documents the page polls (``/api/v1/hosts``,
  ``/api/v1/stats``, ``/api/v1/info``), taken when the page is requested.
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
from typing import Any

from balancer.stores import Store, StoreError
from management.runtime import Runtime
from management.stats_view import stats_view

log = logging.getLogger("balancer.management")

PLACEHOLDER = '<script id="initial-state" type="application/json">null</script>'


def initial_state(store: Store, runtime: Runtime) -> dict[str, Any] | None:
    """``{"table", "stats", "info", "deploys"}`` as the API would answer now, or None."""
    try:
        data = store.load()
        return {"table": {"version": data.version, "hosts": data.hosts},
                "stats": stats_view(runtime.stats()), "info": runtime.info(),
                "deploys": store.records().deploys()}
    except StoreError:
        return None
    except Exception:  # the page polls and shows the API's own error
        log.exception("dashboard: the initial state could not be read")
        return None


def embed(page: str, state: dict[str, Any] | None) -> str:
    """`page` with `state` in its initial-state element (unchanged when None)."""
    if state is None:
        return page
    data = (json.dumps(state, separators=(",", ":"), allow_nan=False)
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))
    return page.replace(PLACEHOLDER, PLACEHOLDER.replace(">null<", f">{data}<"), 1)
