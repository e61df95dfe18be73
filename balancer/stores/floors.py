"""Stored rules below today's floors (issue 21's leftovers).

`health.interval`, `health.timeout` and `limits.rate` have floors
(`balancer.rules.RULE_FLOORS`): a rule written through the API below one is
refused (400 `invalid_rule`), but earlier versions took any number > 0, so a
table they stored may hold smaller values. Refusing that table whole would
leave an upgraded balancer serving only `no-hosts`; instead such a value is
loaded raised to its floor, as a proxy keeps serving a config it can make
sense of (nginx and HAProxy clamp such values). So is a backend address an
earlier version took as a host name that the system resolver reads as an IPv4
address (``0x7f.1:80``: `balancer.addr.full_spelling`): loaded written in full
(``127.0.0.1:80``, where it always connected), not refused with the whole table.

Invariants:
* Only a finite number > 0 below its floor is raised; anything else (a string,
  0, a negative number, NaN) stays as stored and fails validation as before.
* The stored table is never changed here: a copy of each raised rule is made,
  and every raise is listed (`Raised`) for the operator's log line and the
  management API's ``/api/v1/info`` (`management.mirror.Mirror.raised`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from balancer.addr import full_spelling
from balancer.rules import RULE_FLOORS


class Raised(NamedTuple):
    """A stored value below its floor, or a backend address in a short IPv4
    spelling, and the value used instead."""

    host: str
    field: str  # "health.interval", "health.timeout", "limits.rate", "backends[I]"...
    stored: float | str
    used: float | str

    def __str__(self) -> str:
        return f"{self.host} {self.field} {self.stored!r} -> {self.used!r}"


def _below_floor(value: object, floor: float) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and 0 < value < floor)


def raise_rule(host: str, rule: Any) -> tuple[Any, tuple[Raised, ...]]:
    """`rule` with each value below its floor raised to it (the same object
    when none is), and what was raised."""
    if not isinstance(rule, Mapping):
        return rule, ()
    raised: list[Raised] = []
    for section, key, floor, _ in RULE_FLOORS:
        part = rule.get(section)
        if isinstance(part, Mapping) and _below_floor(part.get(key), floor):
            raised.append(Raised(host, f"{section}.{key}", part[key], floor))
            rule = {**rule, section: {**part, key: floor}}
    backends, found = _spelled_in_full(host, "", rule.get("backends"))
    if found:
        rule, raised = {**rule, "backends": backends}, raised + found
    draining = rule.get("draining")
    if isinstance(draining, Mapping):
        backends, found = _spelled_in_full(host, "draining.", draining.get("backends"))
        if found:
            rule, raised = {**rule, "draining": {**draining, "backends": backends}}, \
                raised + found
    return rule, tuple(raised)


def _spelled_in_full(host: str, prefix: str, backends: object) -> tuple[Any, list[Raised]]:
    """`backends` with each address in a short IPv4 spelling written in full, and
    what was (`full_spelling`)."""
    if not isinstance(backends, list):
        return backends, []
    raised: list[Raised] = []
    out = list(backends)
    for i, entry in enumerate(backends):
        given = entry.get("address") if isinstance(entry, Mapping) else entry
        full = full_spelling(given)
        if full is not None:
            raised.append(Raised(host, f"{prefix}backends[{i}]", str(given), full))
            out[i] = {**entry, "address": full} if isinstance(entry, Mapping) else full
    return out, raised


def raise_to_floors(hosts: Mapping[str, Any]) -> tuple[Mapping[str, Any], tuple[Raised, ...]]:
    """`hosts` with `raise_rule` applied to each rule (the same mapping when nothing
    is raised), and what was raised."""
    raised: list[Raised] = []
    copy: dict[str, Any] | None = None
    for host, rule in hosts.items():
        used, found = raise_rule(str(host), rule)
        if found:
            if copy is None:
                copy = dict(hosts)
            copy[host] = used
            raised += found
    return (hosts if copy is None else copy), tuple(raised)
