"""Certificates kept in the store (SPEC §9), beside the routing table.

HOST → record ``{"chain", "key", "not_after", "source"}`` (`balancer.certificates`):
* Redis: the hash ``NS:certs`` (HOST → record JSON) and the counter
  ``NS:certs-version``, raised in the same transaction as every change, which
  is what workers poll (one GET) to notice a change.
* File store: ``PATH.certs.json`` beside the routes file, created and kept
  mode 0600 (it holds private keys), replaced whole under the routes file's
  writer lock; its (inode, size, mtime) is what workers poll.

Invariants:
* Writers check records with `balancer.certificates` first; this module
  only persists them. A write never touches the routing table or its version.
* Reads raise `StoreUnavailable` when the store cannot be reached; a record
  that is not a JSON object is skipped (it cannot be served anyway).
"""

from __future__ import annotations

import contextlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from balancer.stores.atomic import write_atomically
from balancer.stores.base import StoreUnavailable

FILE_MODE = 0o600


class Certs(ABC):
    """The certificates of one store."""

    @abstractmethod
    def all(self) -> dict[str, dict[str, Any]]:
        """HOST → record for every stored certificate."""

    @abstractmethod
    def put(self, host: str, record: dict[str, Any]) -> None:
        """Create or replace the certificate of `host`."""

    @abstractmethod
    def delete(self, host: str) -> bool:
        """Remove the certificate of `host`; whether there was one."""

    @abstractmethod
    def signature(self) -> object:
        """A cheap value that changes whenever any certificate changes."""


def _records(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = {}
    for host, value in raw.items():
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        if isinstance(value, dict):
            found[host] = value
    return found


class FileCerts(Certs):
    """Certificates in one JSON file (mode 0600), written whole under the writer lock."""

    def __init__(self, path: str, locked: Callable[[], Any]) -> None:
        self.path = path
        self.locked = locked

    def _read(self) -> dict[str, Any]:
        try:
            with open(self.path) as f:
                doc = json.load(f)
        except FileNotFoundError:
            return {}
        except ValueError:
            return {}
        except OSError as exc:
            raise StoreUnavailable(f"{self.path}: cannot read: {exc.strerror or exc}") from exc
        certs = doc.get("certs") if isinstance(doc, dict) else None
        return certs if isinstance(certs, dict) else {}

    def all(self) -> dict[str, dict[str, Any]]:
        return _records(self._read())

    def put(self, host: str, record: dict[str, Any]) -> None:
        with self.locked():
            certs = self._read()
            certs[host] = record
            self._write(certs)

    def delete(self, host: str) -> bool:
        with self.locked():
            certs = self._read()
            if certs.pop(host, None) is None:
                return False
            self._write(certs)
            return True

    def _write(self, certs: dict[str, Any]) -> None:
        body = json.dumps({"certs": certs}, indent=2, sort_keys=True).encode()
        try:
            write_atomically(self.path, body, FILE_MODE)
        except OSError as exc:
            raise StoreUnavailable(f"{self.path}: cannot write: {exc.strerror or exc}") from exc

    def signature(self) -> object:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreUnavailable(f"{self.path}: {exc.strerror or exc}") from exc
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class RedisCerts(Certs):
    """Certificates in the hash ``NS:certs``; ``NS:certs-version`` counts changes."""

    def __init__(self, client: Any, namespace: str, talking: Callable[[str], Any]) -> None:
        self.client = client
        self.talking = talking
        self.key = f"{namespace}:certs"
        self.version_key = f"{namespace}:certs-version"

    def all(self) -> dict[str, dict[str, Any]]:
        with self.talking("read"):
            raw = self.client.hgetall(self.key)
        return _records(raw)

    def put(self, host: str, record: dict[str, Any]) -> None:
        with self.talking("write"), self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.key, host, json.dumps(record, sort_keys=True))
            pipe.incr(self.version_key)
            pipe.execute()

    def delete(self, host: str) -> bool:
        with self.talking("write"), self.client.pipeline(transaction=True) as pipe:
            pipe.hdel(self.key, host)
            pipe.incr(self.version_key)
            removed, _ = pipe.execute()
        return bool(removed)

    def signature(self) -> object:
        with self.talking("read"):
            return self.client.get(self.version_key)
