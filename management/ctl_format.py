"""Tables for people: how `balancerctl` shows API answers without ``--json``."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import datetime, tzinfo
from typing import Any


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; numbers right-aligned. A
    cell's control characters are escaped (`shown`)."""
    cells = [list(map(shown, header))] + [[shown(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows)
               for i in range(len(header))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric,
                                                                       strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def shown(value: Any) -> str:
    """`value` as text for a terminal: a control character (C0, DEL, C1 such as
    U+009B, the one-byte CSI: a client's X-Forwarded-For or path bytes 0x80-0xff
    arrive as Latin-1) is escaped, so none reaches the operator's terminal as is."""
    text = str(value)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def terminal(text: str) -> str:
    """`text`, lines kept, with each line holding a control character escaped
    (`shown`): whatever a formatter missed, nothing from a hostile server's
    answer reaches the terminal as is."""
    if text.isprintable():
        return text
    return "\n".join(line if line.isprintable() else shown(line) for line in text.split("\n"))


def warn(message: Any) -> None:
    """``balancerctl: warning: MESSAGE`` on stderr, one line (`shown`)."""
    print(f"balancerctl: warning: {shown(message)}", file=sys.stderr)


def moment(seconds: Any, fmt: str, tz: tzinfo | None = None) -> str:
    """The Unix time `seconds` as `fmt` has it (local time unless `tz`); ValueError
    out of range. Bug: a time past year 9999 from a server (``1e17``) raised
    OSError (EOVERFLOW), a traceback where every other misshapen answer is one line."""
    try:
        return datetime.fromtimestamp(float(seconds), tz).strftime(fmt)
    except (OSError, OverflowError) as exc:
        raise ValueError(f"the time {seconds!r} is out of range ({exc})") from None


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
    hosts, version = answer["hosts"], answer["version"]  # (missing: another API's answer)
    if not hosts:
        return f"no hosts (version {shown(version)})"
    rows = [(host, rule.get("action", "?") + (" +sub" if rule.get("subdomains") else ""),
             summary(rule)) for host, rule in sorted(hosts.items())]
    return (table(("HOST", "ACTION", "TARGET"), rows)
            + f"\n\nversion {shown(version)}, {len(hosts)} host(s)")


def format_rule(answer: dict[str, Any]) -> str:
    rule = answer["rule"]
    rows: list[tuple[str, Any]] = [("host", answer["host"]), ("version", answer["version"])]
    for key, value in rule.items():
        if key == "backends":
            value = ", ".join(_backend(b) for b in value)
        elif not isinstance(value, str) or not value.isprintable():
            # a static body may hold any text: escape control characters so that
            # none reaches the operator's terminal (ESC sequences) as is
            value = json.dumps(value, sort_keys=True)
        rows.append((key, value))
    shown_rows = [(shown(k), shown(v)) for k, v in rows]
    width = max(len(k) for k, _ in shown_rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in shown_rows)


PERCENTILES = ("p50", "p95", "p99")


def _ms(seconds: Any) -> str:
    """A latency for people: "12.5ms", "-" when there were no requests."""
    return f"{seconds * 1000:.1f}ms" if _is_number(seconds) else "-"


def format_stats(answer: dict[str, Any]) -> str:
    hosts = answer["hosts"] if "hosts" in answer else {answer["host"]: answer}
    rows, backend_rows = [], []
    for host, h in sorted(hosts.items()):
        r = h.get("responses", {})
        latency = h.get("latency") or {}
        rows.append((host, h.get("open_requests", 0), h.get("completed_requests", 0),
                     h.get("bytes_received", 0), h.get("bytes_sent", 0), r.get("2xx", 0),
                     r.get("3xx", 0), r.get("4xx", 0), r.get("5xx", 0), h.get("limited", 0),
                     *(_ms(latency.get(p)) for p in PERCENTILES)))
        for address, b in sorted(h.get("backends", {}).items()):
            latency = b.get("latency") or {}
            backend_rows.append((host, address, b.get("state", "?"), b.get("in_flight", 0),
                                 b.get("failures", 0), *(_ms(latency.get(p)) for p in PERCENTILES)))
    if not rows:
        return "no traffic yet"
    out = table(("HOST", "OPEN", "DONE", "RECEIVED", "SENT", "2XX", "3XX", "4XX", "5XX",
                 "LIMITED", "P50", "P95", "P99"), rows)
    if backend_rows:
        out += "\n\n" + table(("HOST", "BACKEND", "STATE", "IN-FLIGHT", "FAILURES",
                               "P50", "P95", "P99"), backend_rows)
    if "open_connections" in answer:
        out += (f"\n\nopen connections {shown(answer['open_connections'])}, "
                f"routing version {shown(answer.get('routing_version'))}")
    return out


def format_top(answer: dict[str, Any]) -> str:
    rows = [(n, row["key"], row["count"], row["error"])
            for n, row in enumerate(answer["top"], 1)]
    what = f"{shown(answer.get('group'))} by {shown(answer.get('by'))}"
    if answer.get("by") != "in_flight":
        what += f" over {answer.get('window', 0):g} s"
    if not rows:
        return f"nothing yet ({what})"
    return table(("#", answer.get("group", "key").upper(), answer.get("by", "count").upper(),
                  "±"), rows) + f"\n\n{what}, {shown(answer.get('workers', 0))} worker(s)"


def format_inflight(answer: dict[str, Any]) -> str:
    requests = answer["requests"]
    if not requests:
        return f"no request open for {answer.get('min_age', 0):g} s or more"
    rows = [(f"{r['age']:.1f}s", r["host"], r["method"], r["path"], r["client"],
             r.get("backend") or "-", r["bytes_sent"], r["bytes_received"], r["pid"])
            for r in requests]
    out = table(("AGE", "HOST", "METHOD", "PATH", "CLIENT", "BACKEND", "SENT", "RECEIVED",
                 "PID"), rows)
    if answer.get("left_out"):
        out += f"\n\n{shown(answer['left_out'])} more not shown"
    return out
