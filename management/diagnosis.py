"""``/api/v1/top``, ``/api/v1/inflight`` and ``/api/v1/history`` (SPEC §11).

Top and in-flight are every worker's answer, merged; the history is the
management process's own (`management.history`).

Invariants:
* A query is checked here with the workers' own checker
  (`balancer.diagnosis.check_top`) and refused 400 with every problem before
  any worker is asked.
* Heavy hitters merge by summing each key's count and error over the
  workers (Space-Saving sketches merge by addition); the answer is the
  `limit` heaviest keys. In-flight requests are listed oldest first, each
  with its worker's pid, at most `MAX_INFLIGHT`.
* A runtime without workers (the app alone) answers empty lists.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from balancer.diagnosis import MAX_INFLIGHT, BadQuery, check_top
from balancer.rules import normalize_host
from management.history import INTERVAL, POINTS
from management.http import bad_request

HISTORY_SPAN = INTERVAL * POINTS  # seconds of history kept
DEFAULT_LIMIT = 10
MAX_LIMIT = 100


def _ask(runtime: Any, command: str, query: dict[str, Any]) -> list[dict[str, Any]]:
    ask_all = getattr(runtime, "ask_all", None)  # a runtime without workers has none
    if ask_all is None:
        return []
    return ask_all(command + " " + json.dumps(query, separators=(",", ":")))


def _number(args: Any, name: str, default: float, problems: list[str]) -> float:
    """Query parameter `name` as a finite number; `default` (and a problem) if it is not."""
    text = args.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        problems.append(f"{name}: must be a number, got {text!r}")
        return default
    return value


def top(runtime: Any, args: Any) -> dict[str, Any]:
    """The body of ``GET /api/v1/top`` for the query string `args`."""
    by, group = args.get("by", "requests"), args.get("group", "client")
    problems: list[str] = []
    window = _number(args, "window", 60.0, problems)
    limit = _number(args, "limit", float(DEFAULT_LIMIT), problems)
    try:
        by, group, window = check_top(by, group, window)
    except BadQuery as exc:
        problems += exc.problems
    if not limit.is_integer() or not 1 <= limit <= MAX_LIMIT:
        problems.append(f"limit: must be an integer from 1 to {MAX_LIMIT}, got {args['limit']!r}")
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
    return {"by": by, "group": group, "window": window, "workers": len(replies),
            "top": [{"key": key, "count": count, "error": error}
                    for key, (count, error) in ranked],
            "sketch": _sketch(replies)}


def _sketch(replies: list[dict[str, Any]]) -> dict[str, int]:
    """What the workers' sketches hold (keys) and can hold at most (bound)."""
    entries = sum(r.get("sketch", {}).get("entries", 0) for r in replies)
    bound = sum(r.get("sketch", {}).get("bound", 0) for r in replies)
    return {"entries": entries, "bound": bound}


def inflight(runtime: Any, args: Any) -> dict[str, Any]:
    """The body of ``GET /api/v1/inflight`` for the query string `args`."""
    problems: list[str] = []
    min_age = _number(args, "min_age", 0.0, problems)
    if min_age < 0:
        problems.append(f"min_age: must be >= 0 seconds, got {min_age:g}")
    if problems:
        raise bad_request(problems)
    replies = _ask(runtime, "inflight", {"min_age": min_age})
    found = [{**request, "pid": reply["pid"]} for reply in replies
             for request in reply.get("requests", [])]
    found.sort(key=lambda r: -r["age"])
    left_out = sum(r.get("left_out", 0) for r in replies) + max(0, len(found) - MAX_INFLIGHT)
    return {"min_age": min_age, "requests": found[:MAX_INFLIGHT], "left_out": left_out}


def history(kept: Any, args: Any) -> dict[str, Any]:
    """The body of ``GET /api/v1/history`` (`kept`: the management process's `History`)."""
    problems: list[str] = []
    since = _number(args, "since", HISTORY_SPAN, problems)
    if not 0 < since <= HISTORY_SPAN:
        problems.append(f"since: must be seconds from 1 to {HISTORY_SPAN:g}, "
                        f"got {args['since']!r}")
    if problems:
        raise bad_request(problems)
    host = args.get("host")
    return kept.view(since, time.time(), normalize_host(host) if host else None)
