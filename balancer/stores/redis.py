"""The Redis store: one source of truth for many balancers (SPEC §6).

Keys under the namespace NS: ``NS:hosts`` (hash HOST → rule JSON),
``NS:version`` (integer), channel ``NS:changes`` (the new version).

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
* Every socket operation has a timeout, so a dead Redis fails a write with
  `StoreUnavailable` in about `timeout` seconds, never hangs it.
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
from redis.sentinel import Sentinel

from balancer.stores.base import (
    CorruptStore,
    ProblemLog,
    Store,
    StoreUnavailable,
    TableChecker,
    TableData,
    VersionConflict,
)
from balancer.stores.urls import SENTINEL_SCHEME, StoreUrlError, parse_sentinel_url, redact_url

log = logging.getLogger("balancer.store.redis")

WAIT_TICK = 0.25          # longest wait for a message before checking stop() again
BACKOFF_FIRST = 0.1
BACKOFF_CAP = 5.0
WRITE_ATTEMPTS = 50       # optimistic-lock retries for writes without if_version
DRAIN_MAX = 1000          # queued messages folded into one reload


def connect(url: str, timeout: float) -> redis.Redis:
    """A client for ``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://``."""
    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                               "retry": Retry(NoBackoff(), 0), "decode_responses": True}
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
    """Watcher state: the raw version last read, the table delivered, the backoff."""

    version: str | None = None
    delivered: TableData | None = None
    delay: float = BACKOFF_FIRST


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
        self._problem: str | None = None
        self._checker = TableChecker()

    # reading ---------------------------------------------------------------
    def load(self) -> TableData:
        raw_hosts, raw_version = self._read_raw()
        return self._parse(raw_hosts, raw_version)

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
        for host, text in raw_hosts.items():
            try:
                hosts[host] = json.loads(text)
            except json.JSONDecodeError as exc:
                raise CorruptStore(f"{where}: {self.hosts_key}[{host}] is not valid JSON: "
                                   f"{exc}") from None
        return self._checker.check(where, version, hosts, raw_hosts)

    def _version(self, raw: str | None) -> int:
        try:
            return int(raw or 0)
        except ValueError:
            raise CorruptStore(f"{self.display_url}: {self.version_key} is not an integer: "
                               f"{raw!r}") from None

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

    def last_error(self) -> str | None:
        return self._problem

    # writing ---------------------------------------------------------------
    def replace(self, hosts: Mapping[str, Any], if_version: int | None = None) -> int:
        encoded = {h: json.dumps(r, sort_keys=True) for h, r in hosts.items()}

        def change(pipe: Any) -> None:
            pipe.delete(self.hosts_key)
            if encoded:
                pipe.hset(self.hosts_key, mapping=encoded)
        return self._write(change, if_version)

    def put_host(self, host: str, rule: Mapping[str, Any], if_version: int | None = None) -> int:
        encoded = json.dumps(rule, sort_keys=True)
        return self._write(lambda pipe: pipe.hset(self.hosts_key, host, encoded), if_version)

    def delete_host(self, host: str, if_version: int | None = None) -> int:
        def check(pipe: Any) -> None:
            if not pipe.hexists(self.hosts_key, host):
                raise KeyError(host)
        return self._write(lambda pipe: pipe.hdel(self.hosts_key, host), if_version, check)

    def _write(self, change: Callable[[Any], Any], if_version: int | None,
               check: Callable[[Any], None] | None = None) -> int:
        """Run `change` in one WATCH/MULTI/EXEC with INCR and PUBLISH; the new version."""
        with self._talking("write"):
            for _ in range(WRITE_ATTEMPTS):
                with self.client.pipeline(transaction=True) as pipe:
                    pipe.watch(self.version_key, self.hosts_key)
                    current = self._version(pipe.get(self.version_key))
                    if if_version is not None and if_version != current:
                        raise VersionConflict(current)
                    if check is not None:
                        check(pipe)
                    pipe.multi()
                    change(pipe)
                    pipe.execute_command("INCR", self.version_key)
                    pipe.publish(self.channel, current + 1)
                    try:
                        return int(pipe.execute()[-2])
                    except WatchError:
                        continue  # another writer won; re-read and try again
        raise StoreUnavailable(f"{self.display_url}: gave up after {WRITE_ATTEMPTS} "
                               f"conflicting concurrent writes")

    @contextlib.contextmanager
    def _talking(self, what: str) -> Iterator[None]:
        """Map Redis errors to `StoreUnavailable`; keep `is_reachable` current."""
        try:
            yield
        except (VersionConflict, KeyError, CorruptStore):
            self._reachable = True
            raise
        except WatchError:
            raise
        except (RedisError, OSError) as exc:
            self._reachable = False
            raise StoreUnavailable(f"{self.display_url}: cannot {what}: {exc}") from exc
        self._reachable = True

    # watching --------------------------------------------------------------
    def watch(self, on_change: Callable[[TableData], None], stop: Callable[[], bool]) -> None:
        problems = ProblemLog(log)
        seen = _Seen()
        self._watchers += 1
        try:
            while not stop():
                try:
                    self._follow(on_change, stop, seen, problems)
                except (RedisError, OSError, StoreUnavailable) as exc:
                    self._reachable = False
                    self._problem = f"{self.display_url}: unreachable: {exc}"
                    problems.report(f"{self._problem}; keeping the last table and "
                                    f"reconnecting with backoff")
                    _sleep(seen.delay * random.uniform(0.5, 1.0), stop)
                    seen.delay = min(seen.delay * 2, BACKOFF_CAP)
        finally:
            self._watchers -= 1

    def _follow(self, on_change: Callable[[TableData], None], stop: Callable[[], bool],
                seen: _Seen, problems: ProblemLog) -> None:
        """Subscribe, load, then apply messages and resync ticks until `stop()`."""
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.channel)
            self._reload(on_change, seen, problems)
            seen.delay = BACKOFF_FIRST
            next_check = time.monotonic() + self.resync_interval
            while not stop():
                message = pubsub.get_message(timeout=WAIT_TICK)
                if message is not None:
                    _drain(pubsub)
                    self._reload(on_change, seen, problems)
                    next_check = time.monotonic() + self.resync_interval
                elif time.monotonic() >= next_check:
                    self._resync(on_change, seen, problems)
                    next_check = time.monotonic() + self.resync_interval
        finally:
            pubsub.close()

    def _resync(self, on_change: Callable[[TableData], None], seen: _Seen,
                problems: ProblemLog) -> None:
        """Reload if the version moved without a message reaching us."""
        with self._talking("read"):
            version = self.client.get(self.version_key)
        if version != seen.version:
            log.info("%s: version moved to %s without a message; resyncing",
                     self.display_url, version)
            self._reload(on_change, seen, problems)

    def _reload(self, on_change: Callable[[TableData], None], seen: _Seen,
                problems: ProblemLog) -> None:
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
        if data == seen.delivered:
            return
        if seen.delivered is not None and data.version < seen.delivered.version:
            log.warning("%s: version went back from %s to %s (was Redis flushed or restored?)",
                        self.display_url, seen.delivered.version, data.version)
        seen.delivered = data
        try:
            on_change(data)
        except Exception:
            log.exception("applying version %s from %s failed", data.version, self.display_url)

    def close(self) -> None:
        self.client.close()


def _drain(pubsub: Any) -> None:
    """Swallow messages already queued: one reload covers them all."""
    for _ in range(DRAIN_MAX):
        if pubsub.get_message(timeout=0) is None:
            return


def _sleep(seconds: float, stop: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while not stop() and time.monotonic() < deadline:
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
