"""How a Redis store reads its table (`RedisReading`, mixed into
`balancer.stores.redis.RedisStore`): whole, or one host's rule, and checked.

Invariants:
* A table and its version always belong together. A table of up to
  `SCAN_ABOVE` hosts is read with ``HGETALL`` + ``GET`` in one transaction. A
  bigger one is read `SCAN_COUNT` fields at a time (``HSCAN``), the loop going
  round between two slices, on a connection that ``WATCH``es the hash and the
  version from before its ``GET`` of the version, and kept only if an empty
  ``MULTI``/``EXEC`` after the last slice goes through: Redis refuses it when
  anything touched either key (any write, a ``FLUSHDB``, an eviction, whatever
  the version then reads), and ``HSCAN`` returns every field of a hash that did
  not change during the scan. A watcher's scan that writes interrupted is
  brought to the version after them from their messages when they say which
  hosts changed (`balancer.stores.redis_changes`). Another scan a write
  interrupted is made again, and after `SCAN_ATTEMPTS` of them the table is
  read in one ``HGETALL``. (Bug: the reply of one ``HGETALL`` of 100,000
  fields was parsed in one call, 110-180 ms during which a worker served
  nothing.)
* A whole read, its decoding and its check run in `balancer.big_loads.loading`
  (no garbage collection walks what they make, in a proxy worker).
* A read of one host's rule (`host_rule`: a backend edit, a deploy) is
  ``HGET`` + ``GET`` in one transaction, checked as `load` checks the table.
* Every rule is decoded strictly (`balancer.stores.strict_json`) and the table
  checked (`TableChecker`): anything else is a `CorruptStore` naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import redis

from balancer.big_loads import loading
from balancer.stores import strict_json
from balancer.stores.base import (
    VERSION_LIMIT,
    CorruptStore,
    HostRule,
    Store,
    TableChecker,
    TableData,
    check_table,
    unreadable_is_corrupt,
)
from balancer.stores.redis_answers import (
    lost_connection,
    nothing_sent_on_lost_connection,
    printable,
    utf8,
)
from balancer.turns import turn

PAUSE_EVERY = 2000        # hosts parsed between two turns of the loop (a big reload)
SCAN_ABOVE = 4000         # hosts: a bigger table is read in slices (``HSCAN``)
SCAN_COUNT = 1000         # fields asked per ``HSCAN``
SCAN_ATTEMPTS = 3         # scans writes may interrupt before one ``HGETALL``
# what brings a scan writes interrupted to one version: (hosts read, the version before the
# scan, the version after it) -> that version (the hosts updated), or None: scan again
CaughtUp = Callable[[dict[str, str], Any, Any], "str | None"]


class RedisReading(Store):
    """The reads of `RedisStore`, which provides what is declared here."""

    client: redis.Redis
    display_url: str
    namespace: str
    hosts_key: str
    version_key: str
    _checker: TableChecker

    if TYPE_CHECKING:
        def _talking(self, what: str) -> AbstractContextManager[None]: ...

    def load(self) -> TableData:
        with loading():
            raw_hosts, raw_version = self._read_raw()
            data = self._parse(raw_hosts, raw_version)
        self.raise_floor(data.version)
        return data

    def current_shape(self) -> tuple[int, int]:
        with self._talking("read"):
            raw_version, count = self._raw_shape()
        return self._version(raw_version), count

    def _raw_shape(self) -> tuple[str | None, int]:
        """The version as stored and the number of hosts, in one transaction."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.get(self.version_key)
            pipe.hlen(self.hosts_key)
            raw_version, count = pipe.execute()
        return raw_version, int(count)

    def _read_raw(self, caught_up: CaughtUp | None = None
                  ) -> tuple[dict[str, str], str | None]:
        """The hash and the version it belongs to (see the module doc). `caught_up`
        (a watcher's) may bring a scan that writes interrupted to one version."""
        with self._talking("read"):
            _, count = self._raw_shape()
            for _ in range(SCAN_ATTEMPTS if count > SCAN_ABOVE else 0):
                raw_hosts, raw_version, untouched = self._scan()
                if untouched:  # neither key changed since the version was read: one table
                    return raw_hosts, raw_version
                # touched: writes, which their messages may account for (`caught_up`),
                # or anything else (the version unmoved: nothing does; scanned again)
                after: Any = self.client.get(self.version_key)  # (decoded: a str or None)
                caught = None if caught_up is None else caught_up(raw_hosts, raw_version,
                                                                  after)
                if caught is not None:
                    return raw_hosts, caught
            with self.client.pipeline(transaction=True) as pipe:
                pipe.hgetall(self.hosts_key)
                pipe.get(self.version_key)
                raw_hosts, raw_version = pipe.execute()
        return raw_hosts, raw_version

    def _scan(self) -> tuple[dict[str, str], Any, bool]:
        """Every field of the hash, `SCAN_COUNT` a round trip, the loop going round
        between two (a field may come twice: the dict keeps one); the version read
        before the first; and whether neither key changed meanwhile: both are
        ``WATCH``ed before that read and an empty ``MULTI``/``EXEC`` follows the last
        slice, which Redis refuses when anything touched them (a write, a ``FLUSHDB``,
        an eviction). Bug: a ``FLUSHDB`` during the scan, then a write that brought
        ``NS:version`` back to the same number (a balancer that knew no version), was
        kept: the slices read before it and the host after, at the version read."""
        raw_hosts: dict[str, str] = {}
        with self.client.pipeline(transaction=True) as pipe, \
                nothing_sent_on_lost_connection():
            pipe.watch(self.hosts_key, self.version_key)  # commands run at once until multi
            raw_version: Any = pipe.get(self.version_key)
            cursor = 0
            while True:
                reply: Any = pipe.hscan(self.hosts_key, cursor, count=SCAN_COUNT)
                cursor, found = reply
                raw_hosts.update(found)
                if cursor == 0:
                    break
                turn()
            pipe.multi()
            try:
                pipe.execute()
            except redis.WatchError as exc:
                if lost_connection(exc) is not None:
                    raise
                return raw_hosts, raw_version, False
        return raw_hosts, raw_version, True

    def _parse(self, raw_hosts: Mapping[str, str], raw_version: str | None) -> TableData:
        where = f"{self.display_url} {self.namespace}"
        version = self._version(raw_version)
        hosts = {}
        for n, (host, text) in enumerate(raw_hosts.items()):
            if n % PAUSE_EVERY == PAUSE_EVERY - 1:
                turn()  # a big table: the loop polls (requests, timers) between slices
            hosts[host] = self._decoded(where, host, text)
        with unreadable_is_corrupt(f"{where}: the table"):
            return self._checker.check(where, version, hosts, raw_hosts)

    def host_rule(self, host: str) -> HostRule:
        with self._talking("read"), self.client.pipeline(transaction=True) as pipe:
            pipe.hget(self.hosts_key, host)
            pipe.get(self.version_key)
            text, raw_version = pipe.execute()
        version = self._version(raw_version)
        rule = None
        if text is not None:  # checked as `load` checks the table's rules
            where = f"{self.display_url} {self.namespace}"
            with unreadable_is_corrupt(f"{where}: the table"):
                one = {host: self._decoded(where, host, text)}
                rule = check_table(where, version, one).hosts[host]
        self.raise_floor(version)
        return HostRule(version, rule)

    def _decoded(self, where: str, host: str, text: str) -> Any:
        """The stored rule `text` of `host` decoded, or `CorruptStore` naming the field."""
        try:
            return strict_json.loads(utf8(text, host))
        except strict_json.DuplicateKey as exc:
            raise CorruptStore(f"{where}: {self.hosts_key}[{printable(host)}] has the key "
                               f"{json.dumps(exc.key)} twice"
                               f"{strict_json.where_in(exc.path)}") from None
        except (ValueError, RecursionError):  # the field named only then, not per host
            with unreadable_is_corrupt(f"{where}: {self.hosts_key}[{printable(host)}]"):
                raise

    def _version(self, raw: bytes | str | None) -> int:
        # digits as INCR reads them: Python's int() also takes " 5", "+5", "5_0"
        # and "05", which INCR refuses (bug: served, and every write failed, 503
        # "Redis refused to write", with no problem reported)
        digits = raw.encode() if isinstance(raw, str) else raw or b"0"
        counted = (len(digits) <= 19 and digits.isdigit()  # (2**63 - 1 has 19)
                   and (digits[:1] != b"0" or digits == b"0"))
        version = int(digits) if counted else -1
        if 0 <= version < VERSION_LIMIT:
            return version
        shown = repr(raw) if raw is None or len(raw) <= 40 \
            else f"{raw[:40]!r}... ({len(raw)} characters)"
        raise CorruptStore(f"{self.display_url}: {self.version_key} is not an integer from 0 "
                           f"to {VERSION_LIMIT - 1}: {shown}")
