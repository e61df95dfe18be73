"""Actions: what a compiled rule does with a request (one action per module).

Every action is a `balancer.table.Action`. `ActionCompiler.compile` turns a
validated rule into a `Route` once per table build. An unchanged rule keeps
its previous action object, so balancer state and backend pools carry over
across table versions. Every action of one worker shares one `Holds` count
(the `spin_max_waiting` cap is per worker).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from balancer.actions.empty import EmptyAction
from balancer.actions.proxy import ProxyAction
from balancer.actions.redirect import RedirectAction
from balancer.actions.secure import secure
from balancer.actions.spin import SpinAction
from balancer.actions.static import StaticAction
from balancer.hold import Holds
from balancer.limits import SharedBuckets, compile_limit
from balancer.table import UNKNOWN_KEY, Action, Route, TableHolder


def fallback_routes(pages: Any, stats: Any) -> tuple[Route, Route]:
    """The `unknown` (404) and `no-hosts` (503) routes."""
    host_stats = stats.host(UNKNOWN_KEY)
    unknown = {"action": "static", "page": "unknown"}
    no_hosts = {"action": "static", "page": "no-hosts"}
    return (Route(UNKNOWN_KEY, unknown, StaticAction(unknown, pages), host_stats),
            Route(UNKNOWN_KEY, no_hosts, StaticAction(no_hosts, pages), host_stats))


class ActionCompiler:
    """Compiles rules into routes for one worker; `holder` is the worker's table
    holder (held requests follow its swaps)."""

    def __init__(self, *, registry: Any, pages: Any, stats: Any, holder: TableHolder,
                 buckets: SharedBuckets | None = None) -> None:
        self.registry = registry
        self.buckets = buckets if buckets is not None else SharedBuckets()  # rules' limits
        self.pages = pages
        self.stats = stats
        self.holder = holder
        self.holds = Holds()  # requests held (spin, spin_when_down) in this worker
        self.fallbacks = fallback_routes(pages, stats)  # (unknown, no_hosts)

    def compile(self, key: str, rule: Mapping[str, Any], prior: Action | None) -> Route:
        """The route of table key `key` (reusing `prior` when the rule is unchanged)."""
        action = prior if prior is not None and prior.rule == rule else None
        if action is None:
            action = secure(rule, self.make_action(key, rule))
        return Route(key, rule, action, self.stats.host(key),
                     compile_limit(key, rule, self.buckets, self.pages))

    def make_action(self, key: str, rule: Mapping[str, Any]) -> Action:
        kind = rule["action"]
        if kind == "proxy":
            if "health" in rule:  # its backends' state changes without traffic: on /metrics
                self.stats.watch(key)
            return ProxyAction(rule, self.registry, self.stats.host(key), self.holder, self.holds)
        if kind == "spin":
            return SpinAction(rule, self.holder, self.holds)
        if kind == "static":
            return StaticAction(rule, self.pages)
        if kind == "redirect":
            return RedirectAction(rule)
        return EmptyAction(rule)
