"""``/api/v1/top``, ``/api/v1/inflight`` and ``/api/v1/history`` (SPEC §11).

Top and in-flight are every worker's answer, merged; the history is the
management process's own (`management.history`).

Invariants:
* A query is checked here with the workers' own checker
  (`balancer.diagnosis.check_top`) and refused 400 with every problem before
  any worker is asked. A number is plain decimal (``1e3`` and ``.5`` too; not
  ``1_0``, `` 5``, full-width digits, ``inf`` or ``nan``, which Python's
  `float` takes), a parameter given twice is a problem (never the first one
  silently), and a bad value is repeated in its problem cut at `SHOWN`
  characters.
* Heavy hitters merge by summing each key's count and error over the
  workers (Space-Saving sketches merge by addition); the answer is the
  `limit` heaviest keys. In-flight requests are listed oldest first, each
  with its worker's pid, at most `MAX_INFLIGHT`.
* A runtime without workers (the app alone) answers empty lists.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any

from balancer.diagnosis import MAX_INFLIGHT, BadQuery, check_top
from balancer.rules import normalize_host, validate_host
from management.history import INTERVAL, POINTS
from management.http import bad_request

HISTORY_SPAN = INTERVAL * POINTS  # seconds of history kept
DEFAULT_LIMIT = 10
MAX_LIMIT = 100
SHOWN = 40  # characters of a bad value repeated in its problem
NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _ask(runtime: Any, command: str, query: dict[str, Any]) -> list[dict[str, Any]]:
    ask_all = getattr(runtime, "ask_all", None)  # a runtime without workers has none
    if ask_all is None:
        return []
    return ask_all(command + " " + json.dumps(query, separators=(",", ":")))


def _lagging(runtime: Any, body: dict[str, Any]) -> dict[str, Any]:
    """`body` with ``"lagging"``: the workers left out because they do not answer, if any."""
    lagging = getattr(runtime, "lagging", None)  # only a runtime with workers has some
    found = lagging() if lagging is not None else []
    return {**body, "lagging": found} if found else body


def shown(text: str) -> str:
    """`text` quoted for a problem, cut at `SHOWN` characters."""
    return repr(text if len(text) <= SHOWN else text[:SHOWN] + "...")


def _one(args: Any, name: str, problems: list[str]) -> str | None:
    """Query parameter `name` (None when absent); a problem when given more than once."""
    values = args.getlist(name) if hasattr(args, "getlist") else \
        [args[name]] if name in args else []
    if len(values) > 1:
        problems.append(f"{name}: given {len(values)} times; give it once")
    return values[0] if values else None


def _number(args: Any, name: str, default: float, problems: list[str]) -> float:
    """Query parameter `name` as a finite number; `default` (and a problem) if it is not."""
    text = _one(args, name, problems)
    if text is None:
        return default
    value = float(text) if NUMBER.fullmatch(text) else math.nan
    if not math.isfinite(value):
        problems.append(f"{name}: must be a number, got {shown(text)}")
        return default
    return value


def top(runtime: Any, args: Any) -> dict[str, Any]:
    """The body of ``GET /api/v1/top`` for the query string `args`."""
    problems: list[str] = []
    by, group = _one(args, "by", problems), _one(args, "group", problems)
    by, group = by or "requests", group or "client"
    window = _number(args, "window", 60.0, problems)
    limit = _number(args, "limit", float(DEFAULT_LIMIT), problems)
    try:
        by, group, window = check_top(by[:SHOWN], group[:SHOWN], window)
    except BadQuery as exc:
        problems += exc.problems
    if not limit.is_integer() or not 1 <= limit <= MAX_LIMIT:
        problems.append(f"limit: must be an integer from 1 to {MAX_LIMIT}, got "
                        f"{shown(args.get('limit'))}")
    if problems:
        raise bad_request(problems)
    replies = _ask(runtime, "top", {"by": by, "group": group, "window": window})
    merged: dict[str, list[int]] = {}
    for reply in replies:
        for key, (count, error) in reply.get("counts", {}).items():
            entry = merged.setdefault(key, [0, 0])
            entry[0] += count
            entry[1] += error
    ranked = sorted(merged.items(), key=lambda kv: (-kv[1][0], kv[0]))[:int(limit)]
    return _lagging(runtime, {"by": by, "group": group, "window": window,
                              "workers": len(replies),
                              "top": [{"key": key, "count": count, "error": error}
                                      for key, (count, error) in ranked],
                              "sketch": _sketch(replies)})


def _sketch(replies: list[dict[str, Any]]) -> dict[str, int]:
    """What the workers' sketches hold (keys) and can hold at most (bound)."""
    entries = sum(r.get("sketch", {}).get("entries", 0) for r in replies)
    bound = sum(r.get("sketch", {}).get("bound", 0) for r in replies)
    return {"entries": entries, "bound": bound}


def inflight(runtime: Any, args: Any) -> dict[str, Any]:
    """The body of ``GET /api/v1/inflight`` for the query string `args`."""
    problems: list[str] = []
    min_age = _number(args, "min_age", 0.0, problems) + 0.0  # -0 is 0
    if min_age < 0:
        problems.append(f"min_age: must be >= 0 seconds, got {min_age:g}")
    if problems:
        raise bad_request(problems)
    replies = _ask(runtime, "inflight", {"min_age": min_age})
    found = [{**request, "pid": reply["pid"]} for reply in replies
             for request in reply.get("requests", [])]
    found.sort(key=lambda r: -r["age"])
    left_out = sum(r.get("left_out", 0) for r in replies) + max(0, len(found) - MAX_INFLIGHT)
    return _lagging(runtime, {"min_age": min_age, "requests": found[:MAX_INFLIGHT],
                              "left_out": left_out})


def history(kept: Any, args: Any) -> bytes:
    """The body of ``GET /api/v1/history`` as JSON (`kept`: the management process's
    `History`, which encodes a query once per sample)."""
    problems: list[str] = []
    since = _number(args, "since", HISTORY_SPAN, problems)
    if not 1 <= since <= HISTORY_SPAN:
        problems.append(f"since: must be seconds from 1 to {HISTORY_SPAN:g}, "
                        f"got {shown(args.get('since'))}")
    host = _one(args, "host", problems)
    if host is not None and validate_host(host):
        problems.append(f"host: must be a host name of the routing table, got {shown(host)}")
    if problems:
        raise bad_request(problems)
    return kept.encoded_view(since, time.time(), normalize_host(host) if host else None)
