"""`RoutingTable.with_changes` (issue 14.9): a table changed host by host routes every
request exactly as the same table built whole, and costs the changed hosts only."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from typing import Any

import pytest

from balancer.rules import RuleError
from balancer.stats import HostStats
from balancer.table import COMPACT_AT, Route, RoutingTable

UNKNOWN = Route("(unknown)", {"action": "static", "page": "unknown"}, "unknown", HostStats())
NO_HOSTS = Route("(unknown)", {"action": "static", "page": "no-hosts"}, "no-hosts", HostStats())
FALLBACKS = (UNKNOWN, NO_HOSTS)
NAMES = ["a.test", "b.test", "*.b.test", "c.b.test", "sub.test", "x.sub.test", "*", "d.test",
         "*.test", "deep.x.sub.test"]
PROBES = [n.replace("*", "w") for n in NAMES] + ["x.c.b.test", "y.sub.test", "other.org",
                                                  "A.TEST:8080", "a.test.", "q.deep.x.sub.test"]


def compile_rule(key: str, rule: Mapping[str, Any], prior: Any) -> Route:
    return Route(key, rule, rule["body"], HostStats())


def rule(n: int, subdomains: bool = False) -> dict[str, Any]:
    found: dict[str, Any] = {"action": "static", "body": f"r{n}"}
    if subdomains:
        found["subdomains"] = True
    return found


def answers(table: RoutingTable) -> list[Any]:
    return [table.lookup(p.encode()).action for p in PROBES]


def test_changes_route_like_a_table_built_whole() -> None:
    rng = random.Random(14)
    hosts: dict[str, Any] = {}
    table = RoutingTable.build(1, hosts, compile_rule, FALLBACKS)
    for version in range(2, 3 * COMPACT_AT):
        name = rng.choice(NAMES)
        change = None if rng.random() < 0.3 else rule(version, rng.random() < 0.5)
        if change is None:
            hosts.pop(name, None)
        else:
            hosts[name] = change
        table = table.with_changes(version, {name: change}, compile_rule, FALLBACKS)
        whole = RoutingTable.build(version, hosts, compile_rule, FALLBACKS)
        assert answers(table) == answers(whole), f"version {version}: {name} -> {change}"
        assert table.size == len(hosts)
        assert table.hosts() == hosts


def test_a_bad_rule_in_a_change_keeps_nothing() -> None:
    table = RoutingTable.build(1, {"a.test": rule(1)}, compile_rule, FALLBACKS)
    with pytest.raises(RuleError):
        table.with_changes(2, {"b.test": {"action": "teleport"}}, compile_rule, FALLBACKS)
    assert table.lookup(b"a.test").action == "r1"


def test_a_one_host_change_costs_the_same_with_100_or_100000_hosts() -> None:
    def cost(size: int) -> float:
        table = RoutingTable.build(1, {f"h{n}.test": rule(n) for n in range(size)},
                                   compile_rule, FALLBACKS)
        started = time.perf_counter()
        for version in range(2, 202):
            table = table.with_changes(version, {f"h{version % 7}.test": rule(version)},
                                       compile_rule, FALLBACKS)
        return (time.perf_counter() - started) / 200
    small, big = cost(100), cost(100_000)
    # 1,000 times the hosts; a full copy per change would cost ~1,000 times as much
    assert big < small * 20 + 0.0005, (small, big)
