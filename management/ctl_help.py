"""Help texts of `balancerctl`: what each command's arguments are, each action's keys,
and the argument types that refuse a bad option value as a usage error (exit 2).

Invariant: `action_keys_help` lists every key `balancer.rules` accepts for an
action (from ``ACTION_KEYS``), so a key added to the validator shows up in
``balancerctl set --help`` even before it has a description here.
"""

from __future__ import annotations

import argparse
import math
import textwrap

from balancer.rules import (
    ACTION_KEYS,
    ACTIONS,
    ALGORITHMS,
    COMMON_KEYS,
    HEALTH_KEYS,
    validate_host,
)


def finite(text: str) -> float:
    """An argparse type: a finite number (`float` alone lets nan and inf through)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def host_key(text: str) -> str:
    """An argparse type: a routing-table key (`balancer.rules.validate_host`). Bug: an
    empty HOST (an unset shell variable) or one with a ``/`` named another API
    path: ``get ""`` printed the whole table's version as a host's, and
    ``delete "app.test/backends/ADDR"`` removed that backend, saying the host
    was deleted."""
    problems = validate_host(text)
    if problems:
        raise argparse.ArgumentTypeError(problems[0])
    return text


def seconds(text: str) -> float:
    """An argparse type: a time limit, more than 0 and at most a day."""
    value = finite(text)
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"expected seconds above 0 and at most 86400, "
                                         f"got {text!r}")
    return value


DESCRIPTION = "Change and inspect a running balancer's routing table through its management API."

EPILOG = """\
HOST is a routing-table key: a host name (app.example.com), *.suffix or *.
ADDR is host:port or [v6]:port; https://ADDR for a backend reached over TLS.

examples:
  balancerctl set app.example.com proxy --backend 127.0.0.1:9001 --backend 127.0.0.1:9002
  balancerctl set app.example.com spin timeout=120
  balancerctl add-backend app.example.com 127.0.0.1:9003 --weight 2
  balancerctl --json stats app.example.com
  balancerctl deploy app.example.com --backend 127.0.0.1:9004 --warmup 10

Each command has --help; `balancerctl set --help` lists every action's keys.
The management API listens on the balancer's [management] listen address
(default http://127.0.0.1:8081), not on the proxy port.
Reference: docs/api.md and docs/rules.md in the source tree."""

SET_DESCRIPTION = """\
Set HOST's rule to ACTION with the given keys (replacing the whole rule).
key=value pairs are parsed as JSON when they parse (status=503,
keep_path=true, backends='["a:1","b:2"]') and as text otherwise; a dotted key
(health.path=/up) sets a nested field. A key the action does not have is a
usage error (exit 2); the values are validated by the balancer: every problem
is listed (exit 1)."""

WIDTH = 79
KEY_HELP: dict[str, str] = {
    "backends": "backend addresses (or use --backend ADDR, repeatable); "
                '{"address": ADDR, "weight": 1-1000} for a weight',
    "algorithm": "one of " + ", ".join(ALGORITHMS) + " (default round_robin)",
    "retries": "further tries on other backends, 0-10 (default 2)",
    "retry_timeout": "seconds for all tries together (default 15)",
    "draining": "set by a deploy: the old backends, ramped down over warmup (docs/deploys.md)",
    "health": "active checks, one dotted key each: "
              + " ".join(f"health.{key}=..." for key in sorted(HEALTH_KEYS))
              + " (defaults path=/ interval=2 timeout=1 rise=2 fall=3; seconds: interval "
              "0.1-3600, timeout 0.01-3600)",
    "spin_when_down": "seconds to hold requests while every backend refuses",
    "max_body_bytes": "largest request body; above it 413",
    "backend_tls_verify": "false: do not verify https:// backends' certificates "
                          "(default true; docs/tls.md)",
    "timeout": "seconds to hold a request (default 120); 504 after",
    "status": "the HTTP status, 200-599 (default 200, or the page's own)",
    "body": "the response body (or page=NAME)",
    "page": "a built-in page: unknown, maintenance, bad-gateway, ...",
    "content_type": "Content-Type (default text/html; charset=utf-8)",
    "to": "required: the Location URL or path",
    "keep_path": "true: append the request's path and query to `to`",
}

ACTION_SUMMARY: dict[str, str] = {
    "proxy": "forward to one of the backends",
    "spin": "hold requests (the app is deploying) until the rule changes",
    "static": "a fixed response from a body or a built-in page",
    "redirect": "answer with a Location (302 by default; 301, 307, 308)",
    "empty": "a response with no body; status=N is required",
}

ACTION_KEY_HELP: dict[tuple[str, str], str] = {
    ("redirect", "status"): "301, 302, 307 or 308 (default 302)",
    ("empty", "status"): "required: the HTTP status, 200-599",
}

REQUIRED = {"proxy": ("backends",), "redirect": ("to",), "empty": ("status",)}


def action_keys_help() -> str:
    """The ``set --help`` epilog: every action with each key it accepts."""
    lines = ["actions and their keys:"]
    for action in ACTIONS:
        lines.append(f"  {action}: {ACTION_SUMMARY.get(action, '')}")
        for key in _ordered(action):
            text = ACTION_KEY_HELP.get((action, key)) or KEY_HELP.get(key, "")
            lines.extend(_wrapped(f"{key:<15} {text}".rstrip()))
    lines.append("  every action: subdomains=true also matches every name under HOST")
    lines.append("  every action: tls=acme gets HOST a certificate issued and renewed by ACME")
    lines.append("                https_redirect=true hsts=SECONDS (docs/tls.md)")
    lines.append("  every action: limits.rate=R limits.burst=B limits.per=client|host")
    lines.append("                limits.max_connections_per_client=N (over a limit: 429;")
    lines.append("                docs/rules.md)")
    lines.append("")
    lines.append("examples:")
    lines.append("  balancerctl set app.example.com proxy --backend 127.0.0.1:9001 \\\n"
                 "      algorithm=least_connections health.path=/up")
    lines.append("  balancerctl set app.example.com redirect to=https://example.com "
                 "status=301 keep_path=true")
    lines.append("  balancerctl set app.example.com static page=maintenance")
    lines.append("  balancerctl set gone.example.com empty status=410")
    return "\n".join(lines)


def _wrapped(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent="    ", subsequent_indent=" " * 20)


def _ordered(action: str) -> list[str]:
    keys = sorted(ACTION_KEYS[action] - COMMON_KEYS)
    first = [k for k in REQUIRED.get(action, ()) if k in keys]
    return first + [k for k in keys if k not in first]
