"""The routing table: an immutable snapshot, compiled once, swapped by one assignment.

Invariants:
* A `RoutingTable` never changes after `build`; a request reads
  `holder.table` once and uses that snapshot to the end.
* `build` validates every rule first and raises `RuleError` listing every
  problem, so a bad update never replaces a good table.
* Lookup precedence (SPEC §3): exact name; the longest ``*.suffix`` key or
  the longest parent whose rule has ``subdomains: true``; ``*``; else the
  ``unknown`` route (404), or ``no-hosts`` (503) when the table is empty.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, Final

from balancer.rules import RuleError, normalize_host, validate_table
from balancer.stats import HostStats

UNKNOWN_KEY: Final = "(unknown)"  # stats key of requests no rule matched


class Route:
    """One compiled rule: what a request for a matching host gets."""

    __slots__ = ("key", "rule", "action", "stats")

    def __init__(self, key: str, rule: Mapping[str, Any], action: Any, stats: HostStats) -> None:
        self.key = key
        self.rule = rule
        self.action = action
        self.stats = stats

    def __repr__(self) -> str:
        return f"<Route {self.key} {self.rule.get('action')}>"


# compile(key, rule, previous_action_or_None) -> action
Compiler = Callable[[str, Mapping[str, Any], Any], Any]


class RoutingTable:
    """An immutable host → route mapping with SPEC §3 precedence."""

    def __init__(self, version: int, routes: dict[str, Route], fallback: Route) -> None:
        self.version = version
        self.routes = routes
        self.fallback = fallback
        self._exact = {k.encode(): r for k, r in routes.items() if not k.startswith("*")}
        self._wild = {k[2:].encode(): r for k, r in routes.items() if k.startswith("*.")}
        self._sub = {k: r for k, r in self._exact.items() if r.rule.get("subdomains") is True}
        self._catch_all = routes.get("*")
        self._cache: dict[bytes, Route] = {}

    @classmethod
    def build(cls, version: int, hosts: Mapping[str, Any], compile_rule: Compiler,
              fallbacks: tuple[Route, Route], previous: RoutingTable | None = None
              ) -> RoutingTable:
        """Validate and compile `hosts`; `fallbacks` is (unknown, no_hosts)."""
        problems = validate_table(hosts)
        if problems:
            raise RuleError(problems)
        old = previous.routes if previous is not None else {}
        routes = {}
        for host, rule in hosts.items():
            key = normalize_host(host)
            prior = old.get(key)
            prior_action = prior.action if prior is not None else None
            routes[key] = compile_rule(key, rule, prior_action)
        unknown, no_hosts = fallbacks
        return cls(version, routes, unknown if routes else no_hosts)

    def lookup(self, host: bytes) -> Route:
        """The route for a Host header value (any case, port allowed)."""
        route = self._cache.get(host)
        if route is None:
            route = self._resolve(host)
            if len(self._cache) < 10000:
                self._cache[host] = route
        return route

    def _resolve(self, host: bytes) -> Route:
        name = _strip_port(host.lower()).rstrip(b".")
        route = self._exact.get(name)
        if route is not None:
            return route
        dot = name.find(b".")
        while dot >= 0:
            parent = name[dot + 1:]
            route = self._wild.get(parent) or self._sub.get(parent)
            if route is not None:
                return route
            dot = name.find(b".", dot + 1)
        return self._catch_all or self.fallback

    def __repr__(self) -> str:
        return f"<RoutingTable v{self.version} {len(self.routes)} hosts>"


def _strip_port(host: bytes) -> bytes:
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[: end + 1] if end > 0 else host
    colon = host.rfind(b":")
    return host[:colon] if colon >= 0 else host


class TableHolder:
    """Holds the current table; swapping wakes everything waiting for a change."""

    def __init__(self, table: RoutingTable) -> None:
        self.table = table
        self._changed = threading.Event()
        self.on_swap: list[Callable[[RoutingTable, RoutingTable], None]] = []

    def swap(self, table: RoutingTable) -> None:
        """Install `table` (one assignment) and wake every waiter."""
        old, self.table = self.table, table
        changed, self._changed = self._changed, threading.Event()
        changed.set()
        for hook in self.on_swap:
            hook(old, table)

    def change_event(self) -> threading.Event:
        """An event set at the next swap (take it before re-checking the table)."""
        return self._changed
