"""What the management app may ask of the live data plane (the `Runtime` protocol).

`balancer serve` passes an implementation backed by its workers; `StaticRuntime`
stands in when the app runs alone under another WSGI server (no data plane:
empty statistics, and "reload" only re-reads the store).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from balancer.control import select_hosts
from balancer.stats import Stats
from balancer.stores.base import Store, StoreError


@runtime_checkable
class Runtime(Protocol):
    """The data plane as seen by the management API."""

    def stats(self, select: dict[str, Any] | None = None) -> dict[str, Any]:
        """A merged stats snapshot of every worker (shape: docs/ARCHITECTURE.md):
        of every host (None), or only those `select` names,
        at the cost of those hosts: ``{"hosts": [KEY...]}``; ``{"after": KEY,
        "limit": N}``, a page in key order, the snapshot then carrying ``"next"``
        (the key the next page starts after, None at the end); ``{"active":
        True}``, the hosts that have seen a request or are health-checked (what
        /metrics exports: `balancer.control`)."""
        ...

    def reload(self) -> int:
        """Re-read the store now and apply it; the version now served.

        Raises `StoreUnavailable` or `CorruptStore` when the store cannot be read."""
        ...

    def is_ready(self) -> bool:
        """Whether a routing table has been loaded."""
        ...

    def publish(self, version: int, changes: Mapping[str, Any] | None) -> list[dict[str, Any]]:
        """Make every worker serve `version` now (a write just made: `changes` maps
        HOST → rule or None, None for a whole table); the workers that do not serve it
        within ``[management] apply_timeout``: ``{"pid", "version", "reason"}``."""
        ...

    def highest_version(self) -> int:
        """The highest version any worker has served or known."""
        ...

    def ask_all(self, command: str) -> list[dict[str, Any]]:
        """Every live worker's reply to a control command (`balancer.control`)."""
        ...

    def info(self) -> dict[str, Any]:
        """``{"workers": N, "store": {"kind", "url" (redacted), "reachable",
        "version", "last_reload" (unix time, 0 if never)}}``."""
        ...


class StaticRuntime:
    """A `Runtime` without a data plane: the app alone over a store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.version = 0
        self.last_reload = 0.0
        self.reloads = 0

    def stats(self, select: dict[str, Any] | None = None) -> dict[str, Any]:
        snapshot = snapshot_of(Stats(), select)  # no data plane: no host has counters
        snapshot["routing_version"] = self.version
        snapshot["config_reloads"] = self.reloads
        snapshot["last_reload"] = self.last_reload
        snapshot["store_up"] = int(self.store.is_reachable())
        return snapshot

    def reload(self) -> int:
        self.version = self.store.reload().version
        self.reloads += 1
        self.last_reload = time.time()
        return self.version

    def publish(self, version: int, changes: Mapping[str, Any] | None) -> list[dict[str, Any]]:
        self.version = max(self.version, version)
        return []  # no workers

    def highest_version(self) -> int:
        return self.version

    def ask_all(self, command: str) -> list[dict[str, Any]]:
        return []  # no workers

    def is_ready(self) -> bool:
        """Ready once the store has been read (tried on first ask)."""
        if not self.reloads:
            try:
                self.reload()
            except StoreError:
                return False
        return True

    def info(self) -> dict[str, Any]:
        return {"workers": 0,
                "store": {"kind": self.store.kind, "url": self.store.display_url,
                          "reachable": self.store.is_reachable(), "version": self.version,
                          "last_reload": self.last_reload,
                          "problem": self.store.last_error()}}


def snapshot_of(counters: Stats, select: dict[str, Any] | None) -> dict[str, Any]:
    """One process's `counters` as `Runtime.stats` answers for `select`."""
    if select is None:
        return counters.snapshot()
    keys, more = select_hosts(counters, select)
    snapshot = counters.snapshot(keys)
    if "limit" in select:
        snapshot["next"] = keys[-1] if more and keys else None
    return snapshot
