"""The routing table: an immutable snapshot, compiled once, swapped by one assignment.

Invariants:
* A `RoutingTable` never changes after `build`; a request reads
  `holder.table` once and uses that snapshot to the end.
* `build` validates every rule and raises `RuleError` listing every
  problem, so a bad update never replaces a good table. It calls `pause`
  every `PAUSE_EVERY` hosts, so a worker compiling a big table lets its
  requests run in between (the old table serves until the swap).
* `with_changes` builds the next table from this one and the hosts that
  changed: its cost is that of the changed hosts, not of the table (the base
  is shared; the overlay of changed keys is copied, and folded into a new
  base once it holds `COMPACT_AT` keys, so that cost is spread over as many
  changes).
* Lookup precedence (SPEC §3): exact name; the longest ``*.suffix`` key or
  the longest parent whose rule has ``subdomains: true``; ``*``; else the
  ``unknown`` route (404), or ``no-hosts`` (503) when the table is empty.
* A route's action is an `Action` (`balancer.actions`, one per module); the
  worker learns what it needs of a route from that interface (the backends
  it names: `backend_keys`), never from an action's own attributes.
* A Host value that names no host (`balancer.authority.is_valid_host`: an empty
  label, a port not digits or above 65535) gets the `INVALID_HOST` route, whose
  action raises `ProtocolError` 400, answered where every one is
  (`ClientConnection.fail`). It is checked when `lookup` resolves a value it
  has not remembered, unless it is a name the table has exactly, without a
  port (then valid: no key has an empty label, and one trailing dot at most is
  stripped). A request whose Host is cached pays nothing for it; the full check
  (~8,000 instructions compiled, a regular expression) is for the misses
  only: a port, a wildcard's or the catch-all's name, an unknown one.
* An IPv6 literal Host (``[::1]``, any port) is looked up in its key's form,
  its address shortest and lower-case (`rules.literal_key`): ``[0:0::1]`` finds
  the key ``[::1]``; on a cache miss only.
* A name's parents are looked up from the longest that can be a key
  (`PARENT_START`): a Host of thousands of labels costs its length, not its
  length times its labels (bug: a 60 KB ``a.a.a...`` Host held a worker for a
  second, each such request, as its walk copied and hashed every suffix).
* `lookup` remembers the route of up to `CACHED_HOSTS` Host values of at most
  `CACHED_HOST_BYTES` each (a name of 253 bytes and a port): at most ~3 MB
  whatever clients send (bug: any length, and 10,000 Host values of 60 KB
  each, sent in a few seconds, held 600 MB until the next table).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

from balancer.authority import is_valid_host
from balancer.http11 import ProtocolError
from balancer.rules import MAX_HOST_LEN, RuleError, literal_key, normalize_host, validate_table
from balancer.spans import Piece
from balancer.stats import HostStats

if TYPE_CHECKING:
    from balancer.connection import Exchange

UNKNOWN_KEY: Final = "(unknown)"  # stats key of requests no rule matched
PAUSE_EVERY: Final = 500  # hosts compiled between pauses (see `RoutingTable.build`)
COMPACT_AT: Final = 1024  # changed keys kept in a table's overlay before a new base
CACHED_HOSTS: Final = 10000  # Host values whose route `lookup` remembers
CACHED_HOST_BYTES: Final = 300  # the longest Host value remembered
# ":" as its value: `int in bytes` is a memchr, while `b":" in bytes` first fails to
# read b":" as an integer (an exception made and cleared)
COLON: Final = ord(":")
# how far before a name's end its parent walk starts: no key is longer than
# MAX_HOST_LEN, so neither is a parent that matches one (module doc)
PARENT_START: Final = MAX_HOST_LEN + 1
# the rule of the route a Host value that names no host gets (what it answers)
INVALID_HOST: Final[Mapping[str, Any]] = {"action": "static", "page": "bad-request"}
# the rule of a request whose Host the TLS connection's certificate is not for
# (`tls.refuse_domain_fronting`: `balancer.connection.ClientConnection.fronting`)
MISDIRECTED: Final[Mapping[str, Any]] = {"action": "static", "page": "misdirected-request"}


class Action(Protocol):
    """What a compiled rule does with a request (`balancer.actions`)."""

    rule: Mapping[str, Any]  # the rule it was compiled from (unchanged rule: same action)

    def handle(self, ex: Exchange) -> None:
        """Answer `ex`; errors are raised as the `ProxyError` family."""

    def resume(self, ex: Exchange, body: Piece) -> None:
        """Answer `ex`, a request handed over from a hold whose body was already
        read (`body`: bytes, or a `balancer.spans.Span`)."""

    def backend_keys(self) -> Iterable[str]:
        """The addresses of the backends it sends requests to (none for most)."""


class Route:
    """One compiled rule: what a request for a matching host gets."""

    __slots__ = ("key", "rule", "action", "stats", "limit")

    def __init__(self, key: str, rule: Mapping[str, Any], action: Action,
                 stats: HostStats, limit: Any = None) -> None:
        self.key = key
        self.rule = rule
        self.action = action
        self.stats = stats
        self.limit = limit  # the rule's `limits` (balancer.limits.Limit), or None

    def __repr__(self) -> str:
        return f"<Route {self.key} {self.rule.get('action')}>"


class Refused:
    """The action of a request refused before its rule: `status` and `reason`
    (a Host value that names no host, module doc: 400; a request a TLS
    connection made for another host carries: 421)."""

    def __init__(self, rule: Mapping[str, Any], status: int, reason: str) -> None:
        self.rule = rule
        self.status = status
        self.reason = reason

    def handle(self, ex: Exchange) -> None:
        raise ProtocolError(self.status, self.reason)

    def resume(self, ex: Exchange, body: Piece) -> None:
        raise ProtocolError(self.status, self.reason)

    def backend_keys(self) -> Iterable[str]:
        return ()


MISDIRECTED_ACTION: Final = Refused(MISDIRECTED, 421, "the connection's certificate is for "
                                                      "another host")


def misdirected(route: Route) -> Route:
    """`route` (its host's, counted there) answering 421 (`tls.refuse_domain_fronting`)."""
    return Route(route.key, MISDIRECTED, MISDIRECTED_ACTION, route.stats)


# compile(key, rule, previous_action_or_None) -> route
Compiler = Callable[[str, Mapping[str, Any], Action | None], Route]


class RoutingTable:
    """An immutable host → route mapping with SPEC §3 precedence.

    A table is a base (the routes and their indexes, shared by the tables made
    from it with `with_changes`, never modified) plus a small overlay of the
    keys changed since (a Route, or None for a removed key), read first."""

    def __init__(self, version: int, routes: dict[str, Route], fallback: Route,
                 base: RoutingTable | None = None,
                 overlay: dict[str, Route | None] | None = None, size: int = -1) -> None:
        self.version = version
        self.fallback = fallback
        if base is None:
            self._base = routes
            self._exact = {k.encode(): r for k, r in routes.items() if not k.startswith("*")}
            self._wild = {k[2:].encode(): r for k, r in routes.items() if k.startswith("*.")}
            self._sub = {k: r for k, r in self._exact.items()
                         if r.rule.get("subdomains") is True}
        else:
            self._base = base._base
            self._exact, self._wild, self._sub = base._exact, base._wild, base._sub
        self._overlay: dict[str, Route | None] = overlay if overlay is not None else {}
        self.size = size if size >= 0 else len(routes)
        self._catch_all = self.route_for("*")
        self._cache: dict[bytes, Route] = {}
        self._merged: dict[str, Route] | None = None
        self._invalid: Route | None = None  # the route of invalid Host values, made once

    @property
    def routes(self) -> dict[str, Route]:
        """Key → route of every host. With an overlay this is a merged copy, made at the
        first use (O(table)); lookups and changes use `route_for`."""
        if not self._overlay:
            return self._base
        if self._merged is None:
            merged = dict(self._base)
            for key, route in self._overlay.items():
                if route is None:
                    merged.pop(key, None)
                else:
                    merged[key] = route
            self._merged = merged
        return self._merged

    def route_for(self, key: str) -> Route | None:
        """The route of table key `key` (normalised), or None."""
        if key in self._overlay:
            return self._overlay[key]
        return self._base.get(key)

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
        """The next table: this one with `changes` (HOST → rule, None to remove) applied.

        Costs the changed hosts: the new table shares this one's base and copies only
        the overlay, which is folded into a new base every `COMPACT_AT` changed keys."""
        problems = validate_table({h: r for h, r in changes.items() if r is not None})
        if problems:
            raise RuleError(problems)
        overlay = dict(self._overlay)
        size = self.size
        for host, rule in changes.items():
            key = normalize_host(host)
            prior = self.route_for(key)
            if rule is None:
                overlay[key] = None
            else:
                overlay[key] = compile_rule(key, rule,
                                            prior.action if prior is not None else None)
            size += (overlay[key] is not None) - (prior is not None)
        unknown, no_hosts = fallbacks
        fallback = unknown if size else no_hosts
        if len(overlay) > COMPACT_AT:
            merged = RoutingTable(version, self._base, fallback, self, overlay, size).routes
            return RoutingTable(version, merged, fallback)
        return RoutingTable(version, self._base, fallback, self, overlay, size)

    def hosts(self) -> dict[str, Any]:
        """HOST → rule of every route (the table as stored)."""
        return {key: route.rule for key, route in self.routes.items()}

    def lookup(self, host: bytes) -> Route:
        """The route for a Host header value (any case, port allowed)."""
        route = self._cache.get(host)
        if route is None:
            route = self._resolve(host)
            if len(self._cache) < CACHED_HOSTS and len(host) <= CACHED_HOST_BYTES:
                self._cache[host] = route
        return route

    def _resolve(self, host: bytes) -> Route:
        name = host_name(host)
        if name[:1] == b"[":  # an IPv6 literal: its key's form (`rules.literal_key`)
            name = literal_key(name.decode("latin-1")).encode("latin-1")
        exact = self._exact_route(name)
        if exact is not None and COLON not in host and len(host) <= len(name) + 1:
            return exact  # a name the table has, no port, one trailing dot at most: valid
        if not is_valid_host(host):  # (module doc: only on a cache miss, and not the above)
            return self._invalid_host()
        if exact is not None:
            return exact
        return self._parent_over(name) if self._overlay else self._parent_route(name)

    def _exact_route(self, name: bytes) -> Route | None:
        """The route of the exact name, the overlay read before the base."""
        overlay = self._overlay
        if overlay:
            key = name.decode("latin-1")
            if key in overlay and not key.startswith("*"):
                return overlay[key]
        return self._exact.get(name)

    def _parent_route(self, name: bytes) -> Route:
        """The route of a name with no exact key: a parent's, `*`, or the fallback."""
        dot = name.find(b".", first_parent(name))
        while dot >= 0:
            parent = name[dot + 1:]
            route = self._wild.get(parent) or self._sub.get(parent)
            if route is not None:
                return route
            dot = name.find(b".", dot + 1)
        return self._catch_all or self.fallback

    def _invalid_host(self) -> Route:
        """The route of a Host value that names no host (counted as unknown hosts)."""
        route = self._invalid
        if route is None:
            fallback = self.fallback
            route = self._invalid = Route(fallback.key, INVALID_HOST,
                                          Refused(INVALID_HOST, 400, "invalid Host header"),
                                          fallback.stats)
        return route

    def _parent_over(self, name: bytes) -> Route:
        """`_parent_route` reading the overlay before the base."""
        overlay = self._overlay
        dot = name.find(b".", first_parent(name))
        while dot >= 0:
            parent = name[dot + 1:]
            key = parent.decode("latin-1")
            wild_key = "*." + key
            route = overlay[wild_key] if wild_key in overlay else self._wild.get(parent)
            if route is None:
                if key in overlay:
                    sub = overlay[key]
                    if sub is not None and sub.rule.get("subdomains") is True:
                        route = sub
                else:
                    route = self._sub.get(parent)
            if route is not None:
                return route
            dot = name.find(b".", dot + 1)
        return self._catch_all or self.fallback

    def __repr__(self) -> str:
        return f"<RoutingTable v{self.version} {self.size} hosts>"


def host_name(host: bytes) -> bytes:
    """The name a Host field's value is routed by: lower case, without its port
    or a trailing dot."""
    return _strip_port(host.lower()).rstrip(b".")


def first_parent(name: bytes) -> int:
    """Where the walk over `name`'s parents begins: the dot before its longest
    suffix that can be a table key (`PARENT_START`)."""
    start = len(name) - PARENT_START
    return start if start > 0 else 0


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
