"""A worker's answers to "what is piling up?", built when asked (control socket).

* ``top {"by", "group", "window"}``: the worker's heavy hitters
  (`balancer.sketch`) summed over the window, KEY → [count, error]; `in_flight`
  is counted from the requests open now.
* ``inflight {"min_age"}``: the requests open longer than `min_age` seconds,
  oldest first, at most `MAX_INFLIGHT`.

Invariants:
* Nothing here runs per request: the hot path only keeps
  `ClientConnection.exchange` and the sketches; this reads them.
* Answers are bounded whatever the traffic: the sketches are, and the
  in-flight list is cut at `MAX_INFLIGHT` (with the number left out).
"""

from __future__ import annotations

import time
from typing import Any

from balancer.sketch import (
    SLOT_SECONDS,
    SLOTS,
    client_address,
    client_of,
    path_key,
)
from balancer.top_names import BY, GROUPS

MAX_WINDOW = SLOT_SECONDS * SLOTS
MAX_INFLIGHT = 1000
MAX_PATH = 256  # characters of a request path shown (no query string)


class BadQuery(ValueError):
    """A top or inflight query the worker cannot answer; `problems` lists every reason."""

    def __init__(self, *problems: str) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


def check_top(by: object, group: object, window: object) -> tuple[str, str, float]:
    """The query's (by, group, window) or `BadQuery` naming every problem."""
    problems = []
    if by not in BY:
        problems.append(f"by: must be one of {', '.join(BY)}, got {by!r}")
    if group not in GROUPS:
        problems.append(f"group: must be one of {', '.join(GROUPS)}, got {group!r}")
    if (isinstance(window, bool) or not isinstance(window, int | float)
            or not 1 <= window <= MAX_WINDOW):
        problems.append(f"window: must be seconds from 1 to {MAX_WINDOW:g}, got {window!r}")
    if problems:
        raise BadQuery(*problems)
    return str(by), str(group), float(window)  # type: ignore[arg-type]


def top(worker: Any, query: dict[str, Any]) -> dict[str, list[int]]:
    """KEY → [count, error] of this worker for the query (see the module doc)."""
    by, group, window = check_top(query.get("by"), query.get("group"), query.get("window"))
    if by == "in_flight":
        return in_flight_by(worker, group)
    return worker.stats.top.export(by, group, window, time.monotonic(), worker.stats)


def in_flight_by(worker: Any, group: str) -> dict[str, list[int]]:
    """Requests open now, counted by `group`."""
    out: dict[str, list[int]] = {}
    for ex in open_exchanges(worker):
        if group == "client":
            key = client_of(ex)
        elif group == "host":
            key = ex.route.key
        elif group == "path":
            key = path_key(ex.route.key, ex.head.target)
        else:
            key = ex.backend
            if not key:
                continue
        out.setdefault(key, [0, 0])[0] += 1
    return out


def open_exchanges(worker: Any) -> list[Any]:
    """The requests the worker is handling now."""
    connections = getattr(worker.io, "connections", ())  # the GeventIO's live connections
    return [c.exchange for c in list(connections) if c.exchange is not None]


def inflight(worker: Any, query: dict[str, Any]) -> dict[str, Any]:
    """The requests open for at least `min_age` seconds, oldest first."""
    min_age = query.get("min_age", 0)
    if isinstance(min_age, bool) or not isinstance(min_age, int | float) or min_age < 0:
        raise BadQuery(f"min_age: must be a number of seconds >= 0, got {min_age!r}")
    now = time.monotonic()  # `Exchange.start`'s clock (`balancer.netio.CLOCK`)
    found = [ex for ex in open_exchanges(worker) if now - ex.start >= min_age]
    found.sort(key=lambda ex: ex.start)
    return {"requests": [describe(ex, now) for ex in found[:MAX_INFLIGHT]],
            "left_out": max(0, len(found) - MAX_INFLIGHT)}


def describe(ex: Any, now: float) -> dict[str, Any]:
    head = ex.head
    path = head.target.split(b"?", 1)[0].decode("latin-1")
    return {"host": head.host.decode("latin-1"), "rule": ex.route.key,
            "method": head.method.decode("latin-1"),
            "path": path[:MAX_PATH], "client": client_address(ex), "backend": ex.backend or None,
            "bytes_sent": ex.sent, "bytes_received": ex.received,
            "age": round(now - ex.start, 3), "status": ex.status or None,
            "request_id": ex.request_id.decode("latin-1")}
