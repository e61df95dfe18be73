"""Edits of one proxy rule's backend list (pure functions over rule dicts).

Invariants:
* A rule passed in is never mutated; a new rule dict is returned.
* Backends are compared as the rules' duplicate check compares them
  (`balancer.rules.backend_identity`), so ``Example.com:80`` and
  ``example.com:80``, ``[::1]:80`` and ``[0:0::1]:80`` are one backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from balancer.addr import AddrError
from balancer.rules import backend_identity
from management.http import ApiError


def parse_backend_body(body: object) -> tuple[str, int | None]:
    """``(address, weight)`` from ``{"address": ADDR, "weight": N}`` or a bare ``"ADDR"``."""
    if isinstance(body, str):
        return body, None
    if not isinstance(body, dict):
        raise _invalid(['body: must be {"address": "host:port", "weight": N}'])
    problems = [f"{key}: unknown field" for key in body if key not in ("address", "weight")]
    address = body.get("address")
    if not isinstance(address, str) or not address:
        problems.append("address: required, a string 'host:port'")
    weight = body.get("weight")
    if weight is not None and (not isinstance(weight, int) or isinstance(weight, bool)):
        problems.append(f"weight: must be an integer from 1 to 1000, got {weight!r}")
    if problems:
        raise _invalid(problems)
    return address, weight


def require_proxy(host: str, rule: Mapping[str, Any]) -> None:
    if rule.get("action") != "proxy":
        raise _invalid([f"{host}: action is {rule.get('action')!r}; only proxy rules "
                        f"have backends"])


def with_backend(rule: Mapping[str, Any], address: str, weight: int | None) -> dict[str, Any]:
    """`rule` with `address` added, or its weight replaced when already present."""
    entry: Any = address if weight is None else {"address": address, "weight": weight}
    backends = list(rule.get("backends", []))
    for i, existing in enumerate(backends):
        if _same(_address_of(existing), address):
            backends[i] = entry
            break
    else:
        backends.append(entry)
    return {**rule, "backends": backends}


def without_backend(host: str, rule: Mapping[str, Any], address: str) -> dict[str, Any]:
    """`rule` without `address`; `ApiError` 404 when it has no such backend."""
    backends = [b for b in rule.get("backends", []) if not _same(_address_of(b), address)]
    if len(backends) == len(rule.get("backends", [])):
        raise ApiError(404, "not_found", f"host {host!r} has no backend {address!r}")
    if not backends:  # bug: refused as "backends: must be a non-empty list", naming no way out
        raise _invalid([f"backends: {address} is {host}'s last backend, and a proxy rule needs "
                        f"one: add another first, or delete the host or give it another rule"])
    return {**rule, "backends": backends}


def _address_of(entry: Any) -> str:
    return entry if isinstance(entry, str) else str(entry.get("address", ""))


def _canonical(address: str) -> str:
    try:
        return backend_identity(address)
    except AddrError:
        return address.lower()


def _same(a: str, b: str) -> bool:
    return _canonical(a) == _canonical(b)


def _invalid(problems: list[str]) -> ApiError:
    return ApiError(400, "invalid_rule", _count(problems), problems)


def _count(problems: list[str]) -> str:
    n = len(problems)
    return f"the rule is invalid ({n} problem{'s' if n != 1 else ''})"
