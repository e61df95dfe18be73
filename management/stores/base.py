"""The store interface: where the routing table lives (SPEC §6).

Invariants:
* Writers validate rules with `balancer.rules` before calling a store; a
  store only persists and versions.
* Every successful write moves `version` up by exactly one and returns it.
* `watch` is a loop body for its own greenlet: it reports every version
  change through `on_change` and never raises; while the store is
  unreachable it retries with backoff and `is_reachable()` is False.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TableData:
    """One version of the whole table as stored."""

    version: int
    hosts: Mapping[str, Any] = field(default_factory=dict)


class StoreError(Exception):
    """Base of store errors."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or refused the write; nothing changed."""


class VersionConflict(StoreError):
    """An `If-Match` version no longer matches."""

    def __init__(self, current: int) -> None:
        super().__init__(f"the table is at version {current}")
        self.current = current


class CorruptStore(StoreError):
    """The stored table cannot be read (bad JSON, bad shape, invalid rules)."""


class Store:
    """Interface of every store."""

    kind = "abstract"

    def load(self) -> TableData:
        """The whole table now. Raises StoreUnavailable or CorruptStore."""
        raise NotImplementedError

    def replace(self, hosts: Mapping[str, Any], if_version: int | None = None) -> int:
        """Replace the whole table atomically; returns the new version."""
        raise NotImplementedError

    def put_host(self, host: str, rule: Mapping[str, Any], if_version: int | None = None) -> int:
        """Set one host's rule; returns the new version."""
        raise NotImplementedError

    def delete_host(self, host: str, if_version: int | None = None) -> int:
        """Remove one host (KeyError if absent); returns the new version."""
        raise NotImplementedError

    def watch(self, on_change: Callable[[TableData], None], stop: Callable[[], bool]) -> None:
        """Loop until `stop()`: call `on_change` with each new version of the table."""
        raise NotImplementedError

    def is_reachable(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections and stop watching."""
