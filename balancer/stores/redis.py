"""The Redis store: one source of truth for many balancers (SPEC §6).

Keys under the namespace NS: ``NS:hosts`` (hash HOST → rule JSON),
``NS:version`` (integer), channel ``NS:changes``. A message there is the new
version alone (SPEC §6). A write that changed named hosts publishes first, in
the same transaction, the version followed by those hosts separated by spaces
(``"13 app.example.com"``) on ``NS:changed-hosts``; a version on ``NS:changes``
not announced there (a whole-table write) means "reload the whole table". A
message of an older balancer, the version and its hosts on ``NS:changes``, is
read the same way.

Invariants:
* Every write is one ``MULTI``/``EXEC`` guarded by ``WATCH`` on both keys: it
  changes the hash, ``INCR``s the version and ``PUBLISH``es the new version.
  A concurrent write makes ``EXEC`` fail and the write is retried (or, with
  ``if_version``, answered by `VersionConflict`); a failed write changes
  nothing.
* Reads (`balancer.stores.redis_reads`) keep a table and its version together:
  ``HGETALL`` + ``GET`` in one transaction, a big table in slices (``HSCAN``)
  kept only if nothing touched its keys meanwhile (``WATCH``); a read of one host's rule is
  ``HGET`` + ``GET``. No ``KEYS``, and nothing here runs per proxied request:
  balancers keep the whole table in memory.
* Watching (following the table through ``NS:changes``) is
  `balancer.stores.redis_watch`; what Redis's answers mean is
  `balancer.stores.redis_answers`.
* Every socket operation has a timeout, so a dead Redis fails a write with
  `StoreUnavailable` in about `timeout` seconds, never hangs it. A write whose
  ``EXEC`` was sent and not answered is never retried (it may still run): the
  error says so. Redis refusing a command (``OOM``, ``READONLY``, ``MISCONF``)
  is a `StoreUnavailable` quoting it, and the store stays reachable.
* Through Sentinel, writes and resync ticks ask the sentinels for the master
  first (`_master_moved`): pooled connections to a demoted master are dropped.
* Every write block runs in `_writing`, which yields the client to write
  with: the store's, or with ``?replicas=N`` a client of one connection whose
  block ends with ``WAIT`` (`balancer.stores.redis_replicas`). Reads always
  use the store's client.
* A key of another type than the store keeps there (``SET NS:hosts x``,
  ``LPUSH NS:version 1``: Redis answers ``WRONGTYPE``) is damaged data, a
  `CorruptStore` naming the key, never "unreachable". A one-host write checks
  that ``NS:hosts`` is a hash before its ``MULTI`` (Redis does not roll back:
  the ``HSET`` failed inside ``EXEC`` while the ``INCR`` and ``PUBLISH`` went
  through, announcing a version that changed nothing); a whole-table write
  replaces the key, so it repairs it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import redis
from redis.exceptions import RedisError, WatchError
from redis.sentinel import SentinelConnectionPool

from balancer.stores.acme import Acme, RedisAcme
from balancer.stores.base import (
    CorruptStore,
    Store,
    StoreError,
    StoreLost,
    StoreUnavailable,
    TableChecker,
    VersionConflict,
    write_version,
)
from balancer.stores.certs import Certs, RedisCerts
from balancer.stores.floors import Raised
from balancer.stores.records import Claimed, Records
from balancer.stores.redis_answers import (
    is_refusal,
    is_wrong_type,
    lost_connection,
    nothing_sent_on_lost_connection,
    refusal,
    why,
)
from balancer.stores.redis_bounds import AnswerTooBig
from balancer.stores.redis_connect import DEFAULT_TIMEOUT, Connector
from balancer.stores.redis_reads import RedisReading
from balancer.stores.redis_records import Fence, RedisRecords
from balancer.stores.redis_replicas import Writers, Writing
from balancer.stores.redis_watch import RedisWatching
from balancer.stores.urls import StoreUrlError, redact_url, split_replication

log = logging.getLogger("balancer.store.redis")

WRITE_ATTEMPTS = 50       # optimistic-lock retries for writes without if_version
HASH_OR_NOTHING = ("hash", "none")


class RedisStore(RedisWatching, RedisReading, Store):
    """The routing table in Redis, shared by every balancer using the namespace."""

    kind = "redis"
    delivers_changes = True  # `NS:changes` names the hosts (`RedisWatching._catch_up`)

    def __init__(self, url: str, namespace: str = "balancer", resync_interval: float = 5.0,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        if not namespace or any(c.isspace() for c in namespace):
            raise StoreUrlError(f"store namespace must be a non-empty word, got {namespace!r}")
        if resync_interval <= 0:
            raise StoreUrlError(f"resync_interval must be > 0, got {resync_interval!r}")
        self.display_url = redact_url(url)
        self.namespace = namespace
        self.resync_interval = resync_interval
        self.hosts_key = f"{namespace}:hosts"
        self.version_key = f"{namespace}:version"
        self.channel = f"{namespace}:changes"
        self.hosts_channel = f"{namespace}:changed-hosts"
        bare, replication = split_replication(url)
        self._bare_url = redact_url(bare)
        self._reads = Connector(bare, timeout)  # through Sentinel, its connections
        self.client = self._reads()
        self._writers = None if replication is None else Writers(
            Connector(bare, timeout, replication.wait_ms / 1000, max_connections=1),
            replication, self.display_url, timeout)
        self._reachable = True
        self._watchers = 0
        self._whole_loads, self._whole_since = 0, 0.0
        self._writes_in_flight = 0  # `_write`s running (greenlets of this process)
        self._problem: str | None = None  # the table read is corrupt
        self._unreachable = ""  # why the store was last found unreachable
        self._checker = TableChecker()
        self._certs: RedisCerts | None = None

    # reading ---------------------------------------------------------------
    def identity(self) -> str:
        """Which store this is (the snapshot's owner): the replication options
        change how it is written, not which it is."""
        return f"{self._bare_url} namespace {self.namespace}"

    def is_reachable(self) -> bool:
        """The watcher's view while one runs; otherwise a PING now."""
        if self._watchers:
            return self._reachable
        try:
            self.client.ping()
        except RedisError:
            self._reachable = False
        else:
            self._reachable = True
        return self._reachable

    def raised(self) -> tuple[Raised, ...]:
        return self._checker.raised

    def last_error(self) -> str | None:
        """The corrupt table, or why the store is unreachable while it is.

        Derived from `_reachable`, so that it agrees with `is_reachable`: any
        successful contact (the deploy watcher's, the API's) clears an outage,
        not only the watcher's next reload. Bug fixed: after a Redis restart
        /readyz said ready (reachable) while `balancer_store_up` stayed 0 until
        the watcher's reconnect backoff (up to 5 s) ran out."""
        if self._problem is not None:
            return self._problem
        return None if self._reachable else self._unreachable or None

    def records(self) -> Records:
        """Deploy records in hashes under the namespace (`RedisRecords`)."""
        return RedisRecords(self.client, self.namespace, self._talking, self._writing)

    def certs(self) -> Certs:
        """Certificates in ``NS:certs`` (`balancer.stores.certs.RedisCerts`): one object
        per store, which remembers the highest certs version it saw (the loss guard)."""
        if self._certs is None:
            self._certs = RedisCerts(self.client, self.namespace, self._talking,
                                     self._writing)
        return self._certs

    def acme(self) -> Acme:
        """ACME account, lock, challenges and state under ``NS:acme-*`` (`RedisAcme`)."""
        return RedisAcme(self.client, self.namespace, self._talking, self._writing)

    # writing ---------------------------------------------------------------
    def replace(self, hosts: Mapping[str, Any], if_version: int | None = None) -> int:
        encoded = {h: json.dumps(r, sort_keys=True) for h, r in hosts.items()}

        def change(pipe: Any) -> None:
            pipe.delete(self.hosts_key)
            if encoded:
                pipe.hset(self.hosts_key, mapping=encoded)
        return self._write(change, if_version, named=None)

    def put_host(self, host: str, rule: Mapping[str, Any], if_version: int | None = None,
                 claimed: Claimed | None = None) -> int:
        """(`Store.put_host`) A `claimed` write's claim is read, watched and renewed in
        the write's own transaction (`redis_records.Fence`)."""
        encoded = json.dumps(rule, sort_keys=True)
        fence = Fence(self.namespace, host, claimed)

        def check(pipe: Any) -> None:  # an HSET failing inside EXEC would not stop the INCR
            kind = pipe.type(self.hosts_key)
            if kind not in HASH_OR_NOTHING:
                raise self._wrong_type_found([(self.hosts_key, "hash", kind)])
            fence.check(pipe)

        def change(pipe: Any) -> None:
            pipe.hset(self.hosts_key, host, encoded)
            fence.renew(pipe)
        return self._write(change, if_version, check, named=host)

    def delete_host(self, host: str, if_version: int | None = None) -> int:
        def check(pipe: Any) -> None:
            if not pipe.hexists(self.hosts_key, host):
                raise KeyError(host)
        return self._write(lambda pipe: pipe.hdel(self.hosts_key, host), if_version,
                           check, named=host)

    def _write(self, change: Callable[[Any], Any], if_version: int | None,
               check: Callable[[Any], None] | None = None, *, named: str | None) -> int:
        """Run `change` in one WATCH/MULTI/EXEC that moves the version up and PUBLISHes
        it (with the `named` host of a one-host write); the new version. Counted in
        `_writes_in_flight` meanwhile (`RedisChanges._own_writes_done`)."""
        self._writes_in_flight += 1
        try:
            return self._write_once(change, if_version, check, named=named)
        finally:
            self._writes_in_flight -= 1

    def _write_once(self, change: Callable[[Any], Any], if_version: int | None,
                    check: Callable[[Any], None] | None, *, named: str | None) -> int:
        with self._writing() as writing:
            client = writing.client
            self._master_moved()
            for _ in range(WRITE_ATTEMPTS):
                # the floor as it was before the read: another greenlet's write may
                # raise it while this one reads (bug: a one-host write that raced one
                # then saw the store "behind" it, answered 409 store_lost)
                floor = self.floor
                with client.pipeline(transaction=True) as pipe, \
                        nothing_sent_on_lost_connection():
                    pipe.watch(self.version_key, self.hosts_key)
                    current = self._version(pipe.get(self.version_key))
                    if if_version is not None and if_version != current:
                        raise VersionConflict(current)
                    if named is not None and current < floor:
                        raise StoreLost(f"{self.display_url} {self.namespace}", current,
                                        floor)
                    if check is not None:
                        check(pipe)
                    new = write_version(current, floor)
                    pipe.multi()
                    change(pipe)
                    if new == current + 1:
                        pipe.execute_command("INCR", self.version_key)
                    else:
                        pipe.set(self.version_key, new)  # above the floor: a repair
                    if named:  # before the version: a subscriber of both reads it first
                        pipe.publish(self.hosts_channel, f"{new} {named}")
                    pipe.publish(self.channel, str(new))
                    try:
                        pipe.execute()
                    except WatchError as exc:
                        lost = lost_connection(exc)
                        if lost is not None:
                            raise self._unanswered(lost) from exc
                        continue  # another writer won; re-read and try again
                    self.raise_floor(new)
                    writing.what = f"the write (version {new})"
                    return new
        raise StoreUnavailable(f"{self.display_url}: gave up after {WRITE_ATTEMPTS} "
                               f"conflicting concurrent writes")

    def _master_moved(self, client: redis.Redis | None = None) -> bool:
        """Through Sentinel, whether the sentinels name another master than the pooled
        connections of `client` (the store's by default) talk to (which are then
        dropped: redis-py asks the sentinels only for a new connection). Bug: after
        ``SENTINEL FAILOVER`` the old master answered writes for up to 10 s (until the
        sentinels demote it), every one lost with its data, and watchers kept reading
        it. Sentinels that do not answer are no news: the master may be fine, and it
        says so itself when it is not."""
        pool = (client or self.client).connection_pool
        if not isinstance(pool, SentinelConnectionPool):
            return False
        before = pool.master_address
        try:
            return pool.get_master_address() != before and before is not None
        except (RedisError, OSError) as exc:
            log.debug("%s: no sentinel answered: %s", self.display_url, exc)
            return False

    def _unanswered(self, lost: BaseException) -> StoreUnavailable:
        """The error for an ``EXEC`` sent without an answer (`lost`: a timeout, Redis
        paused or busy; the connection cut): it may still run, so the write is not
        retried (bug: it was taken for a race and retried up to 50 times, 2 s each, a
        management request hanging as long as Redis stayed paused)."""
        self._reachable = False
        cause = why(lost)
        self._unreachable = f"{self.display_url}: unreachable: {cause}"
        return StoreUnavailable(f"{self.display_url}: the write was sent but Redis did not "
                                f"answer ({cause}): it may still be applied; read the "
                                f"table before writing again")

    @contextlib.contextmanager
    def _writing(self, what: str = "the write") -> Iterator[Writing]:
        """`_talking("write")` around one block of writes, made with the `Writing`'s
        client. With ``replicas=N``, that client is one connection, and the block
        ends with ``WAIT`` on it (`StoreNotReplicated` when too few replicas
        acknowledged); a block that raised, or says it wrote nothing
        (`Writing.wrote`), waits for nothing."""
        with self._talking("write"):
            if self._writers is None:
                yield Writing(self.client, what)
                return
            with self._writers.held() as writer:
                self._master_moved(writer.client)  # drops a demoted master's connection
                since = writer.ready()  # before the block's first write
                writing = Writing(writer.client, what)
                yield writing
                if writing.wrote:
                    self._writers.wait(writer, since, writing.what)

    @contextlib.contextmanager
    def _talking(self, what: str) -> Iterator[None]:
        """Map Redis errors to `StoreUnavailable`; keep `is_reachable` current."""
        try:
            yield
        except AnswerTooBig as exc:  # (a CorruptStore without the store's name)
            self._reachable = True
            raise CorruptStore(f"{self.display_url} {self.namespace}: {exc}") from None
        except (VersionConflict, KeyError, CorruptStore, StoreLost):
            self._reachable = True
            raise
        except WatchError as exc:
            lost = lost_connection(exc)  # (bug: one lost while a claim or an abort request
            if lost is None:             # was watched went up as a 500, "internal error")
                raise  # a watched key that changed: the caller's race to retry
            raise self._failed(lost, what) from exc
        except (RedisError, OSError) as exc:
            raise self._failed(exc, what) from exc
        self._reachable = True

    def _failed(self, exc: BaseException, what: str) -> StoreError:
        """The store error for Redis's `exc` while trying to `what`; `is_reachable` kept."""
        if is_wrong_type(exc):
            self._reachable = True
            return self._wrong_type(exc)
        if is_refusal(exc):  # Redis answered: reachable, and the reason is its own
            self._reachable = True
            return StoreUnavailable(f"{self.display_url}: Redis refused to {what}: "
                                    f"{refusal(exc)}")
        self._reachable = False
        self._unreachable = f"{self.display_url}: unreachable: {why(exc)}"
        return StoreUnavailable(f"{self.display_url}: cannot {what}: {why(exc)}")

    def _wrong_type(self, exc: BaseException) -> CorruptStore:
        """The `CorruptStore` for a ``WRONGTYPE`` answer: which of the table's and the
        certificates' keys hold another type (one more round trip, on this error only),
        else Redis's own words (a pipeline's name the command and the key)."""
        expected = {self.hosts_key: "hash", self.version_key: "string",
                    f"{self.namespace}:certs": "hash",
                    f"{self.namespace}:certs-version": "string"}
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for key in expected:
                    pipe.type(key)
                kinds = pipe.execute()
        except (RedisError, OSError):
            kinds = ["none"] * len(expected)
        found = [(key, want, kind) for (key, want), kind in zip(expected.items(), kinds,
                                                               strict=True)
                 if kind not in (want, "none")]
        if found:
            return self._wrong_type_found(found)
        return CorruptStore(f"{self.display_url}: a key under {self.namespace}: holds another "
                            f"type of value than the balancer keeps there: {exc}")

    def _wrong_type_found(self, found: list[tuple[str, str, str]]) -> CorruptStore:
        named = "; ".join(f"{key} is a {kind}, not a {want}" for key, want, kind in found)
        return CorruptStore(f"{self.display_url}: {named} (something other than a balancer "
                            f"wrote it)")

    def close(self) -> None:
        """Close every connection the store made: the read client's, and through
        Sentinel its sentinel connections (bug: those were left open, one set per
        store closed, in a process that opens stores again and again)."""
        self.client.close()
        self._reads.close()
        if self._writers is not None:
            self._writers.close()
