"""Tables for people: how `balancerctl` shows API answers without ``--json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; numbers right-aligned."""
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows)
               for i in range(len(header))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric,
                                                                       strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def summary(rule: dict[str, Any]) -> str:
    """One line saying what a rule does."""
    action = rule.get("action")
    if action == "proxy":
        backends = ", ".join(_backend(b) for b in rule.get("backends", []))
        return f"{backends}  ({rule.get('algorithm', 'round_robin')})"
    if action == "spin":
        return f"hold up to {rule.get('timeout', 'default')}s"
    if action == "static":
        what = f"page {rule['page']}" if "page" in rule else f"{len(rule.get('body', ''))} bytes"
        return f"{rule['status']} {what}" if "status" in rule else what
    if action == "redirect":
        keep = " +path" if rule.get("keep_path") else ""
        return f"{rule.get('status', 302)} -> {rule.get('to')}{keep}"
    if action == "empty":
        return str(rule.get("status"))
    return json.dumps(rule, sort_keys=True)


def _backend(entry: Any) -> str:
    if isinstance(entry, str):
        return entry
    weight = entry.get("weight", 1)
    return entry.get("address", "?") + (f" (w{weight})" if weight != 1 else "")


def format_hosts(answer: dict[str, Any]) -> str:
    hosts = answer.get("hosts", {})
    if not hosts:
        return f"no hosts (version {answer.get('version')})"
    rows = [(host, rule.get("action", "?") + (" +sub" if rule.get("subdomains") else ""),
             summary(rule)) for host, rule in sorted(hosts.items())]
    return (table(("HOST", "ACTION", "TARGET"), rows)
            + f"\n\nversion {answer.get('version')}, {len(hosts)} host(s)")


def format_rule(answer: dict[str, Any]) -> str:
    rule = answer.get("rule", {})
    rows: list[tuple[str, Any]] = [("host", answer.get("host")),
                                   ("version", answer.get("version"))]
    for key, value in rule.items():
        if key == "backends":
            value = ", ".join(_backend(b) for b in value)
        elif not isinstance(value, str) or not value.isprintable():
            # a static body may hold any text: escape control characters so that
            # none reaches the operator's terminal (ESC sequences) as is
            value = json.dumps(value, sort_keys=True)
        rows.append((key, value))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def format_stats(answer: dict[str, Any]) -> str:
    hosts = answer["hosts"] if "hosts" in answer else {answer.get("host", "?"): answer}
    rows, backend_rows = [], []
    for host, h in sorted(hosts.items()):
        r = h.get("responses", {})
        rows.append((host, h.get("open_requests", 0), h.get("completed_requests", 0),
                     h.get("bytes_received", 0), h.get("bytes_sent", 0), r.get("2xx", 0),
                     r.get("3xx", 0), r.get("4xx", 0), r.get("5xx", 0)))
        for address, b in sorted(h.get("backends", {}).items()):
            backend_rows.append((host, address, b.get("state", "?"), b.get("in_flight", 0),
                                 b.get("failures", 0)))
    if not rows:
        return "no traffic yet"
    out = table(("HOST", "OPEN", "DONE", "RECEIVED", "SENT", "2XX", "3XX", "4XX", "5XX"), rows)
    if backend_rows:
        out += "\n\n" + table(("HOST", "BACKEND", "STATE", "IN-FLIGHT", "FAILURES"),
                              backend_rows)
    if "open_connections" in answer:
        out += (f"\n\nopen connections {answer['open_connections']}, "
                f"routing version {answer.get('routing_version')}")
    return out
