"""The routing table: an immutable snapshot, compiled once, swapped by one assignment.

Invariants:
* A `RoutingTable` never changes after `build`; a request reads
  `holder.table` once and uses that snapshot to the end.
* `build` validates every rule and raises `RuleError` listing every
  problem, so a bad update never replaces a good table. It calls `pause`
  every `PAUSE_EVERY` hosts, so a worker compiling a big table lets its
  requests run in between (the old table serves until the swap).
* `with_changes` builds the next table from this one and the hosts that
  changed: its cost is that of the changed hosts (plus copying the indexes'
  references), not of re-compiling the table.
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
PAUSE_EVERY: Final = 500  # hosts compiled between pauses (see `RoutingTable.build`)


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


Indexes = tuple[dict[bytes, Route], dict[bytes, Route], dict[bytes, Route]]


class RoutingTable:
    """An immutable host → route mapping with SPEC §3 precedence."""

    def __init__(self, version: int, routes: dict[str, Route], fallback: Route,
                 indexes: Indexes | None = None) -> None:
        self.version = version
        self.routes = routes
        self.fallback = fallback
        if indexes is None:
            exact = {k.encode(): r for k, r in routes.items() if not k.startswith("*")}
            wild = {k[2:].encode(): r for k, r in routes.items() if k.startswith("*.")}
            sub = {k: r for k, r in exact.items() if r.rule.get("subdomains") is True}
            indexes = (exact, wild, sub)
        self._exact, self._wild, self._sub = indexes
        self._catch_all = routes.get("*")
        self._cache: dict[bytes, Route] = {}

    @classmethod
    def build(cls, version: int, hosts: Mapping[str, Any], compile_rule: Compiler,
              fallbacks: tuple[Route, Route], previous: RoutingTable | None = None,
              pause: Callable[[], None] | None = None) -> RoutingTable:
        """Validate and compile `hosts`; `fallbacks` is (unknown, no_hosts)."""
        if not isinstance(hosts, Mapping):
            raise RuleError(validate_table(hosts))
        old = previous.routes if previous is not None else {}
        routes: dict[str, Route] = {}
        problems: list[str] = []
        for n, (host, rule) in enumerate(hosts.items()):
            if pause is not None and n % PAUSE_EVERY == PAUSE_EVERY - 1:
                pause()
            found = validate_table({host: rule})
            if found:
                problems += found
                continue
            key = normalize_host(host)
            if key in routes:
                problems.append(f"host {host!r}: duplicates {key!r}")
                continue
            prior = old.get(key)
            routes[key] = compile_rule(key, rule, prior.action if prior is not None else None)
        if problems:
            raise RuleError(problems)
        unknown, no_hosts = fallbacks
        return cls(version, routes, unknown if routes else no_hosts)

    def with_changes(self, version: int, changes: Mapping[str, Any], compile_rule: Compiler,
                     fallbacks: tuple[Route, Route]) -> RoutingTable:
        """The next table: this one with `changes` (HOST → rule, None to remove) applied."""
        problems = validate_table({h: r for h, r in changes.items() if r is not None})
        if problems:
            raise RuleError(problems)
        routes = dict(self.routes)
        exact, wild, sub = dict(self._exact), dict(self._wild), dict(self._sub)
        for host, rule in changes.items():
            key = normalize_host(host)
            prior = routes.pop(key, None)
            name = key[2:].encode() if key.startswith("*.") else key.encode()
            if key.startswith("*."):
                wild.pop(name, None)
            else:
                exact.pop(name, None)
                sub.pop(name, None)
            if rule is None:
                continue
            route = compile_rule(key, rule, prior.action if prior is not None else None)
            routes[key] = route
            if key.startswith("*."):
                wild[name] = route
            elif not key.startswith("*"):
                exact[name] = route
                if rule.get("subdomains") is True:
                    sub[name] = route
        unknown, no_hosts = fallbacks
        return RoutingTable(version, routes, unknown if routes else no_hosts, (exact, wild, sub))

    def hosts(self) -> dict[str, Any]:
        """HOST → rule of every route (the table as stored)."""
        return {key: route.rule for key, route in self.routes.items()}

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
