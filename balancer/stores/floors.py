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
Backends of one list that are one server spelt two ways (``LOCALHOST:1`` beside
``localhost:1``, ``https://x`` beside ``https://x:443``: `balancer.rules.backend_identity`),
which earlier versions stored as two, are loaded as one entry holding both
weights (the server's share of traffic unchanged). A server a rule lists both in
``backends`` and under ``draining`` (a deploy of earlier versions that kept it
under another spelling) is loaded serving, not draining (``draining`` goes when
nothing is left in it). A deploy record of earlier versions is loaded the same
way when it is resumed (`management.deploy_steps.loaded_record`).

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

from balancer.addr import AddrError, full_spelling
from balancer.rules import RULE_FLOORS, backend_identity


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
    backends, found = loaded_backends(host, "", rule.get("backends"))
    if found:
        rule, raised = {**rule, "backends": backends}, raised + found
    draining = rule.get("draining")
    if isinstance(draining, Mapping):
        backends, found = loaded_backends(host, "draining.", draining.get("backends"))
        backends, serving = _not_serving(host, rule.get("backends"), backends)
        if found or serving:
            rule, raised = _with_draining(rule, {**draining, "backends": backends}), \
                raised + found + serving
    return rule, tuple(raised)


def _with_draining(rule: Mapping[str, Any], draining: Mapping[str, Any]) -> dict[str, Any]:
    """`rule` with `draining`, or without it when it has no backend left."""
    if draining.get("backends") == []:
        return {k: v for k, v in rule.items() if k != "draining"}
    return {**rule, "draining": draining}


def _not_serving(host: str, serving: object, draining: object) -> tuple[Any, list[Raised]]:
    """`draining` without the entries naming a server `serving` lists (in any
    spelling: `backend_identity`), which earlier versions stored (a deploy from
    ``127.0.0.1:P`` to ``[::ffff:127.0.0.1]:P``, or ``0x7f.1:P``): the server serves,
    and drains nothing. Bug: the whole table was refused ("duplicate backend")."""
    if not isinstance(serving, list) or not isinstance(draining, list) or not draining:
        return draining, []
    kept: dict[str, str] = {}
    for entry in serving:
        given = entry.get("address") if isinstance(entry, Mapping) else entry
        identity = _identity(given)
        if identity is not None:
            kept.setdefault(identity, str(given))
    out: list[Any] = []
    raised: list[Raised] = []
    for i, entry in enumerate(draining):
        given = entry.get("address") if isinstance(entry, Mapping) else entry
        identity = _identity(given)
        if identity in kept:
            raised.append(Raised(host, f"draining.backends[{i}]", str(given),
                                 f"dropped: it serves as {kept[identity]!r}"))
        else:
            out.append(entry)
    return out, raised


def _identity(given: object) -> str | None:
    """`backend_identity` of an address, None when it is not a valid one."""
    try:
        return backend_identity(given) if isinstance(given, str) else None
    except AddrError:
        return None


def loaded_backends(host: str, prefix: str, backends: object) -> tuple[Any, list[Raised]]:
    """`backends` spelt in full (`_spelled_in_full`) and one server's entries merged
    (`_merged`), and what was changed."""
    out, raised = _spelled_in_full(host, prefix, backends)
    if isinstance(out, list) and len(out) > 1 and (raised or _maybe_respelt(out)):
        out, merged = _merged(host, prefix, out)
        raised += merged
    return out, raised


def _maybe_respelt(backends: list[Any]) -> bool:
    """Whether two of `backends` could be one server spelt two ways: a letter in
    upper case, an IPv6 literal or a scheme (the rest are compared as written, so
    the common table pays a few string tests a rule at each load, no parsing)."""
    for entry in backends:
        text = entry.get("address") if isinstance(entry, Mapping) else entry
        if isinstance(text, str) and (text != text.lower() or "[" in text or "//" in text):
            return True
    return False


def _merged(host: str, prefix: str, backends: list[Any]) -> tuple[list[Any], list[Raised]]:
    """`backends` with each later entry of a server already listed folded into the
    first (weights added, at most 1,000), and what was. Entries that do not parse
    are kept for validation to name."""
    first: dict[str, int] = {}  # identity -> index in out
    out: list[Any] = []
    raised: list[Raised] = []
    for i, entry in enumerate(backends):
        given = entry.get("address") if isinstance(entry, Mapping) else entry
        identity = _identity(given)
        if identity is None or identity not in first:
            if identity is not None:
                first[identity] = len(out)
            out.append(entry)
            continue
        j = first[identity]
        weights = (_weight(out[j]), _weight(entry))
        if None in weights:  # (an invalid weight: left for validation to name)
            out.append(entry)
            continue
        weight = min(1000, sum(w for w in weights if w is not None))
        kept = out[j]["address"] if isinstance(out[j], Mapping) else out[j]
        out[j] = {**out[j], "weight": weight} if isinstance(out[j], Mapping) \
            else {"address": kept, "weight": weight}
        raised.append(Raised(host, f"{prefix}backends[{i}]", str(given),
                             f"merged into {kept!r} (weight {weight})"))
    return out, raised


def _weight(entry: Any) -> int | None:
    """An entry's weight, None when it is not a valid one."""
    weight = entry.get("weight", 1) if isinstance(entry, Mapping) else 1
    valid = isinstance(weight, int) and not isinstance(weight, bool) and 1 <= weight <= 1000
    return weight if valid else None


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
