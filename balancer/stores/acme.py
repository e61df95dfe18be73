"""ACME state kept in the store (SPEC §9, docs/tls.md), shared by every balancer.

Five small collections, none of them read per request:
* the account: ``{"key": JWK JSON, "uri": ACCOUNT URL or ""}``, made once by the first
  issuer and reused by every later one (`keep_account` stores it only if none is);
* the issuer lock: ``{"owner", "expires"}``: one management process of the cluster
  issues at a time; the lock lapses at ``expires`` unless its owner extends it;
* challenges: KEY → ``{"type": "http-01", "host", "token", "key_authorization",
  "expires"}`` or ``{"type": "tls-alpn-01", "host", "chain", "key", "expires"}``,
  what the data plane answers the CA with (`balancer.challenges`);
* per-host state: HOST → ``{"state": "pending"|"issued"|"failed", ...}``, what the
  API and the dashboard show, and the backoff of failed hosts;
* acknowledgements: BALANCER → ``{"signature", "at"}``, the challenges signature
  each balancer's workers serve and when it last said so (a heartbeat): the issuer
  asks the CA once every live balancer serves what it published.

Storage:
* Redis: ``NS:acme-account`` (JSON, ``SET NX``), ``NS:acme-lock`` (the owner,
  ``SET NX PX``; extended and released by a script that checks the owner),
  ``NS:acme-challenges`` (hash) with ``NS:acme-challenges-version`` raised in the
  same transaction, ``NS:acme-state`` (hash), ``NS:acme-seen`` (hash).
* File store: ``PATH.acme.json`` (account, lock, state, acknowledgements) and
  ``PATH.challenges.json`` (what workers poll), both mode 0600, written whole
  (temp file, fsync, rename) under the routes file's writer lock, which also
  makes taking the lock atomic.

Invariants:
* `lock` is atomic: of several owners asking at once exactly one gets a free or
  lapsed lock; an owner extends only a lock it still holds.
* None of these writes touches the routing table, its version or the certificates.
* Reads and writes raise `StoreUnavailable` when the store cannot be reached;
  an unreadable record reads as absent.
* On Redis every write but the acknowledgements (a heartbeat, rewritten at
  the next look) goes through the store's `writing`, which waits for the
  replicas the store URL asks for (``replicas=N``); one that changed nothing
  (the lock another's, the account already there) says so (`Writing.wrote`)
  and waits for nothing.
"""

from __future__ import annotations

import contextlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from balancer.stores.atomic import file_signature, read_regular, write_store_file
from balancer.stores.base import StoreUnavailable

if TYPE_CHECKING:  # the file store never imports redis (balancer.preload)
    from balancer.stores.redis_replicas import WritingBlock

FILE_MODE = 0o600
UNREADABLE = (ValueError, RecursionError)


class Acme(ABC):
    """The ACME account, issuer lock, challenges and per-host state of one store."""

    @abstractmethod
    def account(self) -> dict[str, Any] | None:
        """The stored account, or None."""

    @abstractmethod
    def keep_account(self, record: dict[str, Any]) -> dict[str, Any]:
        """Store `record` as the account unless one is stored; the account stored."""

    @abstractmethod
    def set_account_uri(self, uri: str) -> None:
        """Note the account's URL at the CA (the key stays)."""

    @abstractmethod
    def lock(self, owner: str, ttl: float) -> bool:
        """Take the issuer lock for `ttl` seconds when it is free or lapsed, or extend
        it when `owner` holds it; whether `owner` holds it now."""

    @abstractmethod
    def unlock(self, owner: str) -> None:
        """Release the lock if `owner` holds it."""

    @abstractmethod
    def holder(self) -> dict[str, Any] | None:
        """``{"owner", "expires"}`` of the lock in force, or None."""

    @abstractmethod
    def put_challenge(self, key: str, record: dict[str, Any]) -> None:
        """Publish one challenge answer."""

    @abstractmethod
    def delete_challenge(self, key: str) -> None:
        """Withdraw one challenge answer (absent: nothing happens)."""

    @abstractmethod
    def challenges(self) -> dict[str, dict[str, Any]]:
        """KEY → record for every published challenge."""

    @abstractmethod
    def challenges_signature(self) -> object:
        """A cheap value that changes whenever a challenge is published or withdrawn."""

    @abstractmethod
    def put_state(self, host: str, record: dict[str, Any]) -> None:
        """Record `host`'s issuance state."""

    @abstractmethod
    def delete_state(self, host: str) -> None:
        """Forget `host`'s issuance state."""

    @abstractmethod
    def states(self) -> dict[str, dict[str, Any]]:
        """HOST → state for every host the issuer has seen."""

    @abstractmethod
    def acknowledge(self, balancer: str, record: dict[str, Any] | None) -> None:
        """Note that `balancer` serves the challenges as of ``record["signature"]``
        (at ``record["at"]``); None forgets the balancer (it stops)."""

    @abstractmethod
    def acknowledgements(self) -> dict[str, dict[str, Any]]:
        """BALANCER → its last acknowledgement."""


def _objects(raw: Any) -> dict[str, dict[str, Any]]:
    """The JSON objects of a mapping of texts or objects (anything else is skipped)."""
    found: dict[str, dict[str, Any]] = {}
    if not isinstance(raw, dict):
        return found
    for name, value in raw.items():
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except UNREADABLE:
                continue
        if isinstance(value, dict):
            found[name] = value
    return found


def decide_lock(held: Any, owner: str, now: float) -> bool:
    """Whether `owner` may write the lock over `held`."""
    if not isinstance(held, dict):
        return True
    if held.get("owner") == owner:
        return True
    expires = held.get("expires")
    return not isinstance(expires, (int, float)) or expires <= now


class FileAcme(Acme):
    """ACME state in ``PATH.acme.json`` and ``PATH.challenges.json`` (mode 0600)."""

    def __init__(self, routes_path: str, locked: Callable[[], Any]) -> None:
        self.path = routes_path + ".acme.json"
        self.challenges_path = routes_path + ".challenges.json"
        self.locked = locked

    def _read(self, path: str) -> dict[str, Any]:
        try:
            doc = json.loads(read_regular(path))
        except FileNotFoundError:
            return {}
        except UNREADABLE:
            return {}  # unreadable: start over rather than stop issuing
        except OSError as exc:
            raise StoreUnavailable(f"{path}: cannot read: {exc.strerror or exc}") from exc
        return doc if isinstance(doc, dict) else {}

    def _write(self, path: str, doc: dict[str, Any]) -> None:
        write_store_file(path, json.dumps(doc, sort_keys=True).encode(), FILE_MODE)

    @contextlib.contextmanager
    def _changing(self, path: str) -> Iterator[dict[str, Any]]:
        with self.locked():
            doc = self._read(path)
            yield doc
            self._write(path, doc)

    def account(self) -> dict[str, Any] | None:
        found = self._read(self.path).get("account")
        return found if isinstance(found, dict) else None

    def keep_account(self, record: dict[str, Any]) -> dict[str, Any]:
        with self._changing(self.path) as doc:
            if not isinstance(doc.get("account"), dict):
                doc["account"] = record
            return dict(doc["account"])

    def set_account_uri(self, uri: str) -> None:
        with self._changing(self.path) as doc:
            if isinstance(doc.get("account"), dict):
                doc["account"]["uri"] = uri

    def lock(self, owner: str, ttl: float) -> bool:
        with self._changing(self.path) as doc:
            now = time.time()
            if not decide_lock(doc.get("lock"), owner, now):
                return False
            doc["lock"] = {"owner": owner, "expires": now + ttl}
            return True

    def unlock(self, owner: str) -> None:
        with self._changing(self.path) as doc:
            held = doc.get("lock")
            if isinstance(held, dict) and held.get("owner") == owner:
                del doc["lock"]

    def holder(self) -> dict[str, Any] | None:
        held = self._read(self.path).get("lock")
        if not isinstance(held, dict) or decide_lock(held, "", time.time()):
            return None
        return held

    def put_challenge(self, key: str, record: dict[str, Any]) -> None:
        with self._changing(self.challenges_path) as doc:
            doc.setdefault("challenges", {})[key] = record

    def delete_challenge(self, key: str) -> None:
        with self._changing(self.challenges_path) as doc:
            found = doc.get("challenges")
            if isinstance(found, dict):
                found.pop(key, None)

    def challenges(self) -> dict[str, dict[str, Any]]:
        return _objects(self._read(self.challenges_path).get("challenges"))

    def challenges_signature(self) -> object:
        return file_signature(self.challenges_path)

    def put_state(self, host: str, record: dict[str, Any]) -> None:
        with self._changing(self.path) as doc:
            states = doc.get("state")
            doc["state"] = {**(states if isinstance(states, dict) else {}), host: record}

    def delete_state(self, host: str) -> None:
        with self._changing(self.path) as doc:
            states = doc.get("state")
            if isinstance(states, dict):
                states.pop(host, None)

    def states(self) -> dict[str, dict[str, Any]]:
        return _objects(self._read(self.path).get("state"))

    def acknowledge(self, balancer: str, record: dict[str, Any] | None) -> None:
        with self._changing(self.path) as doc:
            seen = doc.get("seen")
            seen = dict(seen) if isinstance(seen, dict) else {}
            if record is None:
                seen.pop(balancer, None)
            else:
                seen[balancer] = record
            doc["seen"] = seen

    def acknowledgements(self) -> dict[str, dict[str, Any]]:
        return _objects(self._read(self.path).get("seen"))


# Redis: extend or release the lock only while `owner` holds it (one round trip, atomic)
EXTEND = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
          "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end")
RELEASE = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
           "return redis.call('del', KEYS[1]) else return 0 end")


class RedisAcme(Acme):
    """ACME state under ``NS:acme-*`` keys (see the module doc)."""

    def __init__(self, client: Any, namespace: str, talking: Callable[[str], Any],
                 writing: WritingBlock) -> None:
        self.client = client
        self.talking = talking
        self.writing = writing
        self.account_key = f"{namespace}:acme-account"
        self.lock_key = f"{namespace}:acme-lock"
        self.challenges_key = f"{namespace}:acme-challenges"
        self.version_key = f"{namespace}:acme-challenges-version"
        self.state_key = f"{namespace}:acme-state"
        self.seen_key = f"{namespace}:acme-seen"

    def account(self) -> dict[str, Any] | None:
        with self.talking("read"):
            text = self.client.get(self.account_key)
        return _objects({"a": text}).get("a") if text else None

    def keep_account(self, record: dict[str, Any]) -> dict[str, Any]:
        with self.writing("the ACME account") as writing:
            writing.wrote = bool(writing.client.set(self.account_key,
                                                    json.dumps(record, sort_keys=True), nx=True))
        return self.account() or record

    def set_account_uri(self, uri: str) -> None:
        found = self.account()
        if found is not None:
            with self.writing("the ACME account") as writing:
                writing.wrote = bool(writing.client.set(
                    self.account_key, json.dumps({**found, "uri": uri}, sort_keys=True), xx=True))

    def lock(self, owner: str, ttl: float) -> bool:
        millis = max(1, int(ttl * 1000))
        with self.writing("the ACME issuer lock") as writing:
            if writing.client.set(self.lock_key, owner, nx=True, px=millis):
                return True
            writing.wrote = bool(writing.client.eval(EXTEND, 1, self.lock_key, owner, millis))
            return writing.wrote

    def unlock(self, owner: str) -> None:
        with self.writing("the ACME issuer lock") as writing:
            writing.wrote = bool(writing.client.eval(RELEASE, 1, self.lock_key, owner))

    def holder(self) -> dict[str, Any] | None:
        with self.talking("read"), self.client.pipeline(transaction=True) as pipe:
            pipe.get(self.lock_key)
            pipe.pttl(self.lock_key)
            owner, left = pipe.execute()
        if owner is None or left is None or left < 0:
            return None
        return {"owner": owner, "expires": time.time() + left / 1000}

    def put_challenge(self, key: str, record: dict[str, Any]) -> None:
        with self.writing("the ACME challenge") as writing, \
                writing.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.challenges_key, key, json.dumps(record, sort_keys=True))
            pipe.incr(self.version_key)
            pipe.execute()

    def delete_challenge(self, key: str) -> None:
        with self.writing("the ACME challenge") as writing, \
                writing.client.pipeline(transaction=True) as pipe:
            pipe.hdel(self.challenges_key, key)
            pipe.incr(self.version_key)
            pipe.execute()

    def challenges(self) -> dict[str, dict[str, Any]]:
        with self.talking("read"):
            return _objects(self.client.hgetall(self.challenges_key))

    def challenges_signature(self) -> object:
        with self.talking("read"):
            return self.client.get(self.version_key)

    def put_state(self, host: str, record: dict[str, Any]) -> None:
        with self.writing(f"the ACME state of {host}") as writing:
            writing.client.hset(self.state_key, host, json.dumps(record, sort_keys=True))

    def delete_state(self, host: str) -> None:
        with self.writing(f"the ACME state of {host}") as writing:
            writing.wrote = bool(writing.client.hdel(self.state_key, host))

    def states(self) -> dict[str, dict[str, Any]]:
        with self.talking("read"):
            return _objects(self.client.hgetall(self.state_key))

    def acknowledge(self, balancer: str, record: dict[str, Any] | None) -> None:
        with self.talking("write"):  # a heartbeat: not waited for (the module's doc)
            if record is None:
                self.client.hdel(self.seen_key, balancer)
            else:
                self.client.hset(self.seen_key, balancer, json.dumps(record, sort_keys=True))

    def acknowledgements(self) -> dict[str, dict[str, Any]]:
        with self.talking("read"):
            return _objects(self.client.hgetall(self.seen_key))
