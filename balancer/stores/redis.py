"""The Redis store: one source of truth for many balancers (SPEC §6).

Keys under the namespace NS: ``NS:hosts`` (hash HOST → rule JSON),
``NS:version`` (integer), channel ``NS:changes``. A message is the new
version, followed, for a write that changed named hosts, by those hosts
separated by spaces (``"13 app.example.com"``); a bare version (a whole-table
write, or an older balancer) means "reload the whole table". Its first word is
always the version, so readers that only take the version keep working.

Invariants:
* Every write is one ``MULTI``/``EXEC`` guarded by ``WATCH`` on both keys: it
  changes the hash, ``INCR``s the version and ``PUBLISH``es the new version.
  A concurrent write makes ``EXEC`` fail and the write is retried (or, with
  ``if_version``, answered by `VersionConflict`); a failed write changes
  nothing.
* Reads are ``HGETALL`` + ``GET`` in one transaction, so a table and its
  version always belong together. No ``KEYS``/``SCAN``, and nothing here runs
  per proxied request: balancers keep the whole table in memory.
* `watch` subscribes before it reads, so no change between the read and the
  subscription is missed; it re-checks the version every `resync_interval`
  in case a message was lost, and reconnects with capped exponential backoff.
  Messages that name hosts and follow on the version the consumer serves are
  applied by reading only those hosts (``HMGET``), so a one-host change costs
  the same with 100 or 100,000 hosts.
* Every socket operation has a timeout, so a dead Redis fails a write with
  `StoreUnavailable` in about `timeout` seconds, never hangs it. A write whose
  ``EXEC`` was sent and not answered is never retried (it may still run): the
  error says so. Redis refusing a command (``OOM``, ``READONLY``, ``MISCONF``)
  is a `StoreUnavailable` quoting it, and the store stays reachable.
* Through Sentinel, writes and resync ticks ask the sentinels for the master
  first (`_master_moved`): pooled connections to a demoted master are dropped.
* A message on the channel that is no version, or names a version the store
  does not hold, costs one ``GET``; only a bare version asks for a whole read.
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
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, WatchError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from balancer.rules import validate_table
from balancer.stores import strict_json
from balancer.stores.acme import Acme, RedisAcme
from balancer.stores.base import (
    CorruptStore,
    ProblemLog,
    Store,
    StoreLost,
    StoreUnavailable,
    TableChange,
    TableChecker,
    TableData,
    VersionConflict,
    unreadable_is_corrupt,
    write_version,
)
from balancer.stores.certs import Certs, RedisCerts
from balancer.stores.floors import Raised
from balancer.stores.records import Records
from balancer.stores.redis_answers import (
    is_refusal,
    is_wrong_type,
    lost_connection,
    nothing_sent_on_lost_connection,
    printable,
    refusal,
    utf8,
    why,
)
from balancer.stores.redis_records import RedisRecords
from balancer.stores.urls import SENTINEL_SCHEME, StoreUrlError, parse_sentinel_url, redact_url

log = logging.getLogger("balancer.store.redis")

WAIT_TICK = 0.25          # longest wait for a message before checking stop() again
BACKOFF_FIRST = 0.1
BACKOFF_CAP = 5.0
WRITE_ATTEMPTS = 50       # optimistic-lock retries for writes without if_version
DRAIN_MAX = 1000          # queued messages folded into one reload
PAUSE_EVERY = 2000        # hosts parsed between yields to other greenlets (a big reload)
# Redis counts (INCR) up to 2**63 - 1: a version it cannot count past is corrupt.
# (Bug: a hand-set 10**22 was served, became every balancer's floor for versions,
# and no write, not even a whole-table PUT, could ever go above it.)
VERSION_LIMIT = 2**63 - 1
HASH_OR_NOTHING = ("hash", "none")


def connect(url: str, timeout: float) -> redis.Redis:
    """A client for ``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://``."""
    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                               "retry": Retry(NoBackoff(), 0), "decode_responses": True,
                               "encoding_errors": "surrogateescape"}
    if url.startswith(SENTINEL_SCHEME):
        target = parse_sentinel_url(url)
        sentinel = Sentinel(list(target.sentinels),
                            sentinel_kwargs={"socket_timeout": timeout,
                                             "socket_connect_timeout": timeout},
                            **options)
        return sentinel.master_for(target.service_name, db=target.db,
                                   username=target.username, password=target.password)
    try:
        return redis.Redis.from_url(url, **options)
    except ValueError as exc:
        raise StoreUrlError(f"{redact_url(url)}: {exc}") from None


@dataclass
class _Seen:
    """Watcher state: the raw version last read, the version and table delivered
    (the table is None after a change was delivered), the backoff."""

    version: bytes | str | None = None
    delivered: TableData | None = None
    delivered_version: int = -1
    delay: float = BACKOFF_FIRST
    stranger_told: bool = False  # a message that is no version was logged


class RedisStore(Store):
    """The routing table in Redis, shared by every balancer using the namespace."""

    kind = "redis"

    def __init__(self, url: str, namespace: str = "balancer", resync_interval: float = 5.0,
                 timeout: float = 2.0) -> None:
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
        self.client = connect(url, timeout)
        self._reachable = True
        self._watchers = 0
        self._problem: str | None = None  # the table read is corrupt
        self._unreachable = ""  # why the store was last found unreachable
        self._checker = TableChecker()
        self._certs: RedisCerts | None = None

    # reading ---------------------------------------------------------------
    def identity(self) -> str:
        return f"{self.display_url} namespace {self.namespace}"

    def load(self) -> TableData:
        raw_hosts, raw_version = self._read_raw()
        data = self._parse(raw_hosts, raw_version)
        self.raise_floor(data.version)
        return data

    def _read_raw(self) -> tuple[dict[str, str], str | None]:
        with self._talking("read"), self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.hosts_key)
            pipe.get(self.version_key)
            raw_hosts, raw_version = pipe.execute()
        return raw_hosts, raw_version

    def _parse(self, raw_hosts: Mapping[str, str], raw_version: str | None) -> TableData:
        where = f"{self.display_url} {self.namespace}"
        version = self._version(raw_version)
        hosts = {}
        for n, (host, text) in enumerate(raw_hosts.items()):
            if n % PAUSE_EVERY == PAUSE_EVERY - 1:
                time.sleep(0)  # a big table: let the worker's other greenlets run
            try:
                hosts[host] = strict_json.loads(utf8(text, host))
            except strict_json.DuplicateKey as exc:
                raise CorruptStore(f"{where}: {self.hosts_key}[{printable(host)}] has the key "
                                   f"{json.dumps(exc.key)} twice"
                                   f"{strict_json.where_in(exc.path)}") from None
            except (ValueError, RecursionError):  # the field named only then, not per host
                with unreadable_is_corrupt(f"{where}: {self.hosts_key}[{printable(host)}]"):
                    raise
        with unreadable_is_corrupt(f"{where}: the table"):
            return self._checker.check(where, version, hosts, raw_hosts)

    def _version(self, raw: bytes | str | None) -> int:
        try:
            version = int(raw or 0)
        except ValueError:
            version = -1
        if 0 <= version < VERSION_LIMIT:
            return version
        shown = repr(raw) if raw is None or len(raw) <= 40 \
            else f"{raw[:40]!r}... ({len(raw)} characters)"
        raise CorruptStore(f"{self.display_url}: {self.version_key} is not an integer from 0 "
                           f"to {VERSION_LIMIT - 1}: {shown}")

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
        return RedisRecords(self.client, self.namespace, self._talking)

    def certs(self) -> Certs:
        """Certificates in ``NS:certs`` (`balancer.stores.certs.RedisCerts`): one object
        per store, which remembers the highest certs version it saw (the loss guard)."""
        if self._certs is None:
            self._certs = RedisCerts(self.client, self.namespace, self._talking)
        return self._certs

    def acme(self) -> Acme:
        """ACME account, lock, challenges and state under ``NS:acme-*`` (`RedisAcme`)."""
        return RedisAcme(self.client, self.namespace, self._talking)

    # writing ---------------------------------------------------------------
    def replace(self, hosts: Mapping[str, Any], if_version: int | None = None) -> int:
        encoded = {h: json.dumps(r, sort_keys=True) for h, r in hosts.items()}

        def change(pipe: Any) -> None:
            pipe.delete(self.hosts_key)
            if encoded:
                pipe.hset(self.hosts_key, mapping=encoded)
        return self._write(change, if_version, named=None)

    def put_host(self, host: str, rule: Mapping[str, Any], if_version: int | None = None) -> int:
        encoded = json.dumps(rule, sort_keys=True)

        def check(pipe: Any) -> None:  # an HSET failing inside EXEC would not stop the INCR
            kind = pipe.type(self.hosts_key)
            if kind not in HASH_OR_NOTHING:
                raise self._wrong_type_found([(self.hosts_key, "hash", kind)])
        return self._write(lambda pipe: pipe.hset(self.hosts_key, host, encoded), if_version,
                           check, named=host)

    def delete_host(self, host: str, if_version: int | None = None) -> int:
        def check(pipe: Any) -> None:
            if not pipe.hexists(self.hosts_key, host):
                raise KeyError(host)
        return self._write(lambda pipe: pipe.hdel(self.hosts_key, host), if_version,
                           check, named=host)

    def _write(self, change: Callable[[Any], Any], if_version: int | None,
               check: Callable[[Any], None] | None = None, *, named: str | None) -> int:
        """Run `change` in one WATCH/MULTI/EXEC that moves the version up and PUBLISHes
        it (with the `named` host of a one-host write); the new version."""
        with self._talking("write"):
            self._master_moved()
            for _ in range(WRITE_ATTEMPTS):
                # the floor as it was before the read: another greenlet's write may
                # raise it while this one reads (bug: a one-host write that raced one
                # then saw the store "behind" it, answered 409 store_lost)
                floor = self.floor
                with self.client.pipeline(transaction=True) as pipe, \
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
                    pipe.publish(self.channel, f"{new} {named}" if named else str(new))
                    try:
                        pipe.execute()
                    except WatchError as exc:
                        lost = lost_connection(exc)
                        if lost is not None:
                            raise self._unanswered(lost) from exc
                        continue  # another writer won; re-read and try again
                    self.raise_floor(new)
                    return new
        raise StoreUnavailable(f"{self.display_url}: gave up after {WRITE_ATTEMPTS} "
                               f"conflicting concurrent writes")

    def _master_moved(self) -> bool:
        """Through Sentinel, whether the sentinels name another master than the pooled
        connections talk to (which are then dropped: redis-py asks the sentinels only
        for a new connection). Bug: after ``SENTINEL FAILOVER`` the old master answered
        writes for up to 10 s (until the sentinels demote it), every one lost with its
        data, and watchers kept reading it. Sentinels that do not answer are no news:
        the master may be fine, and it says so itself when it is not."""
        pool = self.client.connection_pool
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
    def _talking(self, what: str) -> Iterator[None]:
        """Map Redis errors to `StoreUnavailable`; keep `is_reachable` current."""
        try:
            yield
        except (VersionConflict, KeyError, CorruptStore, StoreLost):
            self._reachable = True
            raise
        except WatchError:
            raise
        except (RedisError, OSError) as exc:
            if is_wrong_type(exc):
                self._reachable = True
                raise self._wrong_type(exc) from None
            if is_refusal(exc):  # Redis answered: reachable, and the reason is its own
                self._reachable = True
                raise StoreUnavailable(f"{self.display_url}: Redis refused to {what}: "
                                       f"{refusal(exc)}") from exc
            self._reachable = False
            self._unreachable = f"{self.display_url}: unreachable: {why(exc)}"
            raise StoreUnavailable(f"{self.display_url}: cannot {what}: {why(exc)}") from exc
        self._reachable = True

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

    # watching --------------------------------------------------------------
    def watch(self, on_change: Callable[[Any], None], stop: Callable[[], bool],
              served: Callable[[], int] | None = None) -> None:
        problems = ProblemLog(log, self.quiet)
        seen = _Seen()
        self._watchers += 1
        try:
            while not stop():
                try:
                    self._follow(on_change, stop, seen, problems, served)
                except CorruptStore as exc:  # bug: the watcher ended on a bad version
                    self._problem = str(exc)
                    problems.report(f"{exc}; keeping the last good table")
                    _sleep(seen.delay * random.uniform(0.5, 1.0), stop)
                    seen.delay = min(seen.delay * 2, BACKOFF_CAP)
                except (RedisError, OSError, StoreUnavailable) as exc:
                    self._reachable = False
                    self._unreachable = f"{self.display_url}: unreachable: {why(exc)}"
                    problems.report(f"{self._unreachable}; keeping the last table and "
                                    f"reconnecting with backoff")
                    _sleep(seen.delay * random.uniform(0.5, 1.0), stop)
                    seen.delay = min(seen.delay * 2, BACKOFF_CAP)
        finally:
            self._watchers -= 1

    def _follow(self, on_change: Callable[[Any], None], stop: Callable[[], bool],
                seen: _Seen, problems: ProblemLog, served: Callable[[], int] | None) -> None:
        """Subscribe, load, then apply messages and resync ticks until `stop()`."""
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.channel)
            if not self._serves_already(seen, served):
                self._reload(on_change, seen, problems, served)
            seen.delay = BACKOFF_FIRST
            next_check = time.monotonic() + self.resync_interval
            while not stop():
                message = pubsub.get_message(timeout=WAIT_TICK)
                if message is not None:
                    messages = [message, *_drain(pubsub)]
                    self._catch_up(messages, on_change, seen, problems, served)
                    next_check = time.monotonic() + self.resync_interval
                elif time.monotonic() >= next_check:
                    if self._master_moved():
                        log.info("%s: the sentinels name a new master; following it",
                                 self.display_url)
                        return  # subscribe again, to the new master
                    self._resync(on_change, seen, problems, served)
                    next_check = time.monotonic() + self.resync_interval
        finally:
            pubsub.close()

    def _catch_up(self, messages: list[Any], on_change: Callable[[Any], None], seen: _Seen,
                  problems: ProblemLog, served: Callable[[], int] | None) -> None:
        """Apply what `messages` announce: only the hosts they name when they follow on
        the version served, else the whole table."""
        base = max(seen.delivered_version, served() if served is not None else -1)
        named = _named_changes(messages)
        if named is not None and named[1] <= base:
            seen.version = str(base)  # told directly already: nothing to read
            return
        if named is None or named[0] != base + 1 or self._problem is not None:
            # a bare version asks for a whole reload: honoured, as always; anything
            # else only once the version is seen to have moved
            if self._problem is not None or any(map(_is_bare_version, messages)) \
                    or self._moved(messages, seen, base):
                self._reload(on_change, seen, problems, served)
            return
        change = self._read_hosts(base, named[1], named[2])
        if change is None:  # announced but not there (or not valid: the reload says)
            if self._moved(messages, seen, base):
                self._reload(on_change, seen, problems, served)
            return
        seen.version, seen.delivered_version, seen.delivered = str(change.version), \
            change.version, None
        try:
            on_change(change)
        except Exception:
            log.exception("applying version %s from %s failed", change.version,
                          self.display_url)

    def _moved(self, messages: list[Any], seen: _Seen, base: int) -> bool:
        """Whether the version moved from the one read or served: one ``GET`` before
        a whole reload for messages that are no version, or announce one the store
        does not hold. Bug: any such message on ``NS:changes`` (``PUBLISH
        balancer:changes hello``, from anyone) made every worker of every balancer
        read the whole table."""
        stranger = next((m for m in messages if not _is_version_message(m)), None)
        if stranger is not None and not seen.stranger_told:
            seen.stranger_told = True
            log.log(logging.DEBUG if self.quiet else logging.WARNING,
                    "%s: a message on %s that is not a version (%s): only the store's "
                    "version is trusted; another program publishes on this channel",
                    self.display_url, self.channel, printable(str(stranger.get("data")))[:80])
        with self._talking("read"):
            raw = self.client.get(self.version_key)
        return raw not in (seen.version, str(base))

    def _read_hosts(self, base: int, version: int, hosts: list[str]) -> TableChange | None:
        """The named hosts' rules at `version` or later; None when the store is not there
        (behind, or a rule that does not validate: the whole reload reports it)."""
        with self._talking("read"), self.client.pipeline(transaction=True) as pipe:
            pipe.hmget(self.hosts_key, hosts)
            pipe.get(self.version_key)
            texts, raw_version = pipe.execute()
        if self._version(raw_version) < version:
            return None
        rules: dict[str, Any] = {}
        for host, text in zip(hosts, texts, strict=True):
            if text is None:
                rules[host] = None
                continue
            try:
                rules[host] = strict_json.loads(utf8(text, host))
                if validate_table({host: rules[host]}):
                    return None
            except (ValueError, RecursionError):
                return None  # unreadable: the whole table is read and reported
        self.raise_floor(version)
        return TableChange(version, base, rules)

    def _serves_already(self, seen: _Seen, served: Callable[[], int] | None) -> bool:
        """Whether the consumer serves the version the store is at (loaded at start,
        or kept across a reconnect): then the whole table need not be read again."""
        if served is None:
            return False
        with self._talking("read"):
            raw = self.client.get(self.version_key)
        if self._version(raw) != served():
            return False
        seen.version, seen.delivered_version = raw, served()
        self._problem = None
        return True

    def _resync(self, on_change: Callable[[Any], None], seen: _Seen,
                problems: ProblemLog, served: Callable[[], int] | None) -> None:
        """Reload if the version moved without a message reaching us."""
        with self._talking("read"):
            version = self.client.get(self.version_key)
        if version == seen.version:
            return
        if served is not None and version is not None and version == str(served()):
            seen.version = version  # applied from a direct message
            return
        log.info("%s: version moved to %s without a message; resyncing",
                 self.display_url, version)
        self._reload(on_change, seen, problems, served)

    def _reload(self, on_change: Callable[[Any], None], seen: _Seen,
                problems: ProblemLog, served: Callable[[], int] | None) -> None:
        raw_hosts, raw_version = self._read_raw()
        seen.version = raw_version
        try:
            data = self._parse(raw_hosts, raw_version)
        except CorruptStore as exc:
            self._problem = str(exc)
            problems.report(f"{exc}; keeping the last good table")
            return
        self._problem = None
        problems.clear(f"{self.display_url}: back to normal at version {data.version}")
        behind = served is not None and data.version < served()
        if not behind and (data == seen.delivered or (
                seen.delivered is None and data.version == seen.delivered_version)):
            return  # a store behind the consumer's version (told directly) is always
            # delivered, even as the table delivered before: the consumer judges the loss
        seen.delivered, seen.delivered_version = data, data.version
        try:
            on_change(data)
        except Exception:
            log.exception("applying version %s from %s failed", data.version, self.display_url)

    def close(self) -> None:
        self.client.close()


def _drain(pubsub: Any) -> list[Any]:
    """The messages already queued: one read covers them all."""
    queued = []
    for _ in range(DRAIN_MAX):
        message = pubsub.get_message(timeout=0)
        if message is None:
            break
        queued.append(message)
    return queued


def _is_version_message(message: Any) -> bool:
    words = str(message.get("data", "")).split()
    return bool(words) and words[0].isdecimal()


def _is_bare_version(message: Any) -> bool:
    return str(message.get("data", "")).strip().isdecimal()


def _named_changes(messages: list[Any]) -> tuple[int, int, list[str]] | None:
    """(first version, last version, hosts) when every message names its hosts and
    the versions are consecutive; None otherwise (reload the whole table)."""
    versions: list[int] = []
    hosts: dict[str, None] = {}
    for message in messages:
        words = str(message.get("data", "")).split()
        if len(words) < 2 or not words[0].isdecimal():
            return None
        versions.append(int(words[0]))
        hosts.update(dict.fromkeys(words[1:]))
    versions.sort()
    if versions != list(range(versions[0], versions[0] + len(versions))):
        return None
    return versions[0], versions[-1], list(hosts)


def _sleep(seconds: float, stop: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while not stop() and time.monotonic() < deadline:
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
