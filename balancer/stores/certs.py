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
* Reads raise `StoreUnavailable` when the store cannot be reached. A store
  that comes back damaged or lost never reads as "no certificates" (which
  would make every worker drop every certificate): a certs file that cannot
  be parsed or has the wrong shape is `CertsCorrupt`; a certs file deleted
  after this object saw it, or a ``NS:certs-version`` below the highest this
  object saw (FLUSHDB, Redis restarted empty or from an older copy), is
  `CertsLost`. Writes are refused the same way (a one-certificate write would
  otherwise replace the lost rest); only `restore` or an operator's repair of
  the file ends it.
* One damaged record (not JSON, not an object, no ``chain``/``key`` text, or
  text no worker can serve, as far as a look without parsing tells:
  `balancer.certificates.unservable`) is left out of `all` and named in
  `damaged` with the reason; it never takes the other hosts down, and writes
  keep it as stored. Bug: a record OpenSSL refuses, stored before the balancer
  started, was reported only at its host's first handshake. Where `refusing`
  is set (the management process), so is a record that only OpenSSL refuses
  (`balancer.certificates.refused`: a key of another certificate).
* No error message or reason quotes stored text: private keys never reach a
  log line or an API answer through this module.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from balancer.certificates import unservable
from balancer.stores import strict_json
from balancer.stores.atomic import TooLarge, file_signature, read_regular, write_store_file
from balancer.stores.base import CorruptStore, StoreError, StoreUnavailable

if TYPE_CHECKING:  # the file store never imports redis (balancer.preload)
    from balancer.stores.redis_replicas import Writing, WritingBlock

FILE_MODE = 0o600
HOW_TO_FIX = ("run `balancerctl cert restore` (POST /api/v1/certs/restore) to write back the "
              "certificates this balancer last read, or repair the store by hand "
              "(docs/tls.md, \"When the certificate store is damaged\")")


class CertsCorrupt(StoreError):
    """The stored certificates cannot be read as a whole; nothing is served from them
    and nothing is written to them."""


class CertsLost(StoreError):
    """The store lost certificates it held (file deleted, Redis flushed or restored
    from an older copy); nothing is served from it and one-host writes are refused."""


class Certs(ABC):
    """The certificates of one store.

    `damaged` names the records the last `all` left out (HOST → reason);
    `last_good` is what the last successful `all` read, when `keep` is set
    (the management process: `restore` writes it back)."""

    #: a `StoreUnavailable` of this object is its own (a file the table's watch
    #: never reads), not the store's outage the table's watch reports
    own_outages = False

    def __init__(self) -> None:
        self.damaged: dict[str, str] = {}
        self.keep = False
        self.last_good: dict[str, dict[str, Any]] | None = None
        # HOST → why OpenSSL refuses it, of the records `all` found (None: not asked;
        # the management process asks: `management.certs_watch.refused_records`)
        self.refusing: Callable[[dict[str, dict[str, Any]]], dict[str, str]] | None = None
        self.begun = 0  # reads (`all`) and writes (`note`) begun, in order
        self.settled = 0  # the latest of them whose findings `damaged`, `last_good` hold

    @abstractmethod
    def _all(self) -> dict[str, Any]:
        """HOST → stored value (record or text), or `CertsCorrupt` / `CertsLost`."""

    def all(self) -> dict[str, dict[str, Any]]:
        """HOST → record for every stored certificate that can be read."""
        self.begun += 1
        begun = self.begun
        found, damaged = _records(self._all())
        for host, why in (self.refusing(found) if self.refusing else {}).items():
            del found[host]
            damaged[host] = f"the stored certificate cannot be served: {why}"
        if begun < self.settled:  # a later read, or a write (`note`), settled meanwhile
            return found  # (bug: this older read, `refusing` yielding, undid the write)
        self.settled = begun
        self.damaged = damaged
        if self.keep:  # a damaged record keeps its last good version (as workers do)
            before = self.last_good or {}
            self.last_good = {**{h: before[h] for h in self.damaged if h in before}, **found}
        return found

    def note(self, host: str, record: dict[str, Any] | None) -> None:
        """Keep `last_good` current after a write of this object (None: deleted); a
        read begun before it no longer settles anything (`all`)."""
        self.begun += 1
        self.settled = self.begun
        if self.keep and self.last_good is not None:
            if record is None:
                self.last_good.pop(host, None)
            else:
                self.last_good[host] = record

    @abstractmethod
    def put(self, host: str, record: dict[str, Any]) -> None:
        """Create or replace the certificate of `host`."""

    @abstractmethod
    def delete(self, host: str) -> bool:
        """Remove the certificate of `host`; whether there was one."""

    @abstractmethod
    def restore(self, records: Mapping[str, dict[str, Any]]) -> None:
        """Replace every stored certificate with `records` (repairs a damaged or
        lost store)."""

    @abstractmethod
    def signature(self) -> object:
        """A cheap value that changes whenever any certificate changes."""


def _records(raw: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The records that can be served, and HOST → why for those that cannot."""
    found: dict[str, dict[str, Any]] = {}
    damaged: dict[str, str] = {}
    for host, value in raw.items():
        if isinstance(value, (str, bytes)):
            try:
                value = strict_json.loads(value)
            except strict_json.DuplicateKey as exc:
                damaged[host] = f"the stored record is damaged: {exc}"
                continue
            except (ValueError, RecursionError):
                damaged[host] = "the stored record is not JSON"
                continue
        if not isinstance(value, dict):
            damaged[host] = "the stored record is not a JSON object"
        elif not isinstance(value.get("chain"), str) or not isinstance(value.get("key"), str):
            damaged[host] = 'the stored record has no "chain" or "key" text'
        elif (why := unservable(value["chain"], value["key"])) is not None:
            damaged[host] = f"the stored certificate cannot be served: {why}"
        else:
            found[host] = value
    return found, damaged


class FileCerts(Certs):
    """Certificates in one JSON file (mode 0600), written whole under the writer lock.

    The file is only created by a write; once this object has seen it, a missing
    file is `CertsLost` (deleted under a running balancer), never "no certificates"."""

    own_outages = True  # (bug: a directory in its place was reported nowhere)

    def __init__(self, path: str, locked: Callable[[], Any]) -> None:
        super().__init__()
        self.path = path
        self.locked = locked
        self.seen = False  # the file existed at some read or write of this object

    def _all(self) -> dict[str, Any]:
        return self._read()

    def _read(self) -> dict[str, Any]:
        try:
            doc = strict_json.loads(read_regular(self.path))
        except FileNotFoundError:
            if self.seen:
                raise CertsLost(f"{self.path}: the certificates file was deleted while its "
                                f"certificates were served; keeping the certificates "
                                f"served. To fix it, {HOW_TO_FIX}") from None
            return {}
        except (ValueError, RecursionError) as exc:
            raise CertsCorrupt(self._corrupt(_why(exc))) from None
        except OSError as exc:
            raise StoreUnavailable(f"{self.path}: cannot read the certificates file: "
                                   f"{exc.strerror or exc}; keeping the certificates "
                                   f"served") from exc
        certs = doc.get("certs") if isinstance(doc, dict) else None
        if not isinstance(certs, dict) or set(doc) != {"certs"}:
            raise CertsCorrupt(self._corrupt('expected an object {"certs": {HOST: record}}'))
        self.seen = True
        return certs

    def _corrupt(self, why: str) -> str:
        return (f"{self.path}: the certificates file cannot be read ({why}); keeping the "
                f"certificates served and refusing certificate writes. To fix it, {HOW_TO_FIX}")

    def put(self, host: str, record: dict[str, Any]) -> None:
        with self.locked():
            certs = self._read()
            certs[host] = record
            self._write(certs)
        self.note(host, record)

    def delete(self, host: str) -> bool:
        with self.locked():
            certs = self._read()
            if certs.pop(host, None) is None:
                return False
            self._write(certs)
        self.note(host, None)
        return True

    def restore(self, records: Mapping[str, dict[str, Any]]) -> None:
        with self.locked():
            self._write(dict(records))

    def _write(self, certs: dict[str, Any]) -> None:
        body = json.dumps({"certs": certs}, indent=2, sort_keys=True).encode()
        write_store_file(self.path, body, FILE_MODE)
        self.seen = True

    def signature(self) -> object:
        return file_signature(self.path)


def _why(exc: BaseException) -> str:
    """A parse error's reason without the text it quotes (a private key might be there)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, strict_json.DuplicateKey):
        return str(exc)  # names a key (a host, "chain"), never a value
    if isinstance(exc, TooLarge):
        return str(exc)
    return "not UTF-8 JSON"


# Redis: each write checks the counter against the highest this object saw, in
# the same atomic step (a write onto a flushed store would leave one certificate).
_WRITE = """
local v = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if v < tonumber(ARGV[1]) then return {-1, v} end
local changed
if ARGV[2] == 'put' then changed = redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
else changed = redis.call('HDEL', KEYS[1], ARGV[3]) end
return {redis.call('INCR', KEYS[2]), changed}
"""
_RESTORE = """
local v = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
redis.call('DEL', KEYS[1])
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local n = math.max(v, tonumber(ARGV[1])) + 1
redis.call('SET', KEYS[2], n)
return n
"""


class RedisCerts(Certs):
    """Certificates in the hash ``NS:certs``; ``NS:certs-version`` counts changes."""

    def __init__(self, client: Any, namespace: str, talking: Callable[[str], Any],
                 writing: WritingBlock) -> None:
        super().__init__()
        self.client = client
        self.talking = talking
        self.writing = writing
        self.key = f"{namespace}:certs"
        self.version_key = f"{namespace}:certs-version"
        self.highest = 0  # the highest certs-version this object saw
        self._write = client.register_script(_WRITE)
        self._restore = client.register_script(_RESTORE)

    @contextlib.contextmanager
    def _talking(self, what: str) -> Iterator[None]:
        """The store's `talking`; a key of the wrong type (``SET NS:certs x``: the
        store's `CorruptStore`) is `CertsCorrupt` here."""
        with _corrupt_certs(), self.talking(what):
            yield

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[Writing]:
        """The store's `writing` (which waits for replicas), as `_talking`."""
        with _corrupt_certs(), self.writing(what) as writing:
            yield writing

    def _all(self) -> dict[str, Any]:
        with self._talking("read"), self.client.pipeline(transaction=True) as pipe:
            pipe.get(self.version_key)
            pipe.hgetall(self.key)
            version, raw = pipe.execute()
        self._judge(_counter(version))
        return {_text(k): v for k, v in raw.items()}

    def _judge(self, version: int) -> None:
        if version < self.highest:
            raise CertsLost(f"{self.version_key} is at {version} but this balancer has read "
                            f"certificates at {self.highest}: Redis lost its certificates "
                            f"(flushed, restarted empty or restored from an older copy); "
                            f"keeping the certificates served and refusing certificate "
                            f"writes. To fix it, {HOW_TO_FIX}")
        self.highest = version

    def put(self, host: str, record: dict[str, Any]) -> None:
        self._change("put", host, json.dumps(record, sort_keys=True))
        self.note(host, record)

    def delete(self, host: str) -> bool:
        removed = bool(self._change("delete", host, ""))
        self.note(host, None)
        return removed

    def _change(self, what: str, host: str, value: str) -> int:
        with self._writing(f"the certificate of {host}") as writing:
            version, changed = self._write(keys=[self.key, self.version_key],
                                           args=[self.highest, what, host, value],
                                           client=writing.client)
            writing.wrote = version >= 0  # below: refused (CertsLost), nothing written
        if version < 0:
            self._judge(changed)  # raises CertsLost
        self.highest = max(self.highest, version)
        return int(changed)

    def restore(self, records: Mapping[str, dict[str, Any]]) -> None:
        args: list[Any] = [self.highest]
        for host, record in records.items():
            args += [host, json.dumps(record, sort_keys=True)]
        with self._writing("the certificates' restore") as writing:
            self.highest = int(self._restore(keys=[self.key, self.version_key], args=args,
                                             client=writing.client))

    def signature(self) -> object:
        with self._talking("read"):
            return self.client.get(self.version_key)


@contextlib.contextmanager
def _corrupt_certs() -> Iterator[None]:
    """The store's `CorruptStore` (a key of the wrong type) as `CertsCorrupt`."""
    try:
        yield
    except CorruptStore as exc:
        raise CertsCorrupt(f"{exc}; keeping the certificates served and refusing "
                           f"certificate writes. To fix it, {HOW_TO_FIX}") from None


def _counter(value: Any) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
