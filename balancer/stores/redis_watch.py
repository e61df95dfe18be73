"""How a Redis store follows the table (`RedisWatching.watch`, mixed into
`balancer.stores.redis.RedisStore`): subscribe to ``NS:changes`` and
``NS:changed-hosts``, read, apply
what the messages announce (their format: `balancer.stores.redis`), re-check
the version, reconnect.

Invariants:
* `watch` subscribes before it reads, so no change between the read and the
  subscription is missed; it re-checks the version every `resync_interval`
  in case a message was lost, and reconnects with capped exponential backoff.
  Messages that name hosts and follow on the version the consumer serves are
  applied by reading only those hosts (``HMGET``), so a one-host change costs
  the same with 100 or 100,000 hosts. A change is delivered at the version the
  rules were read at: a read that finds the store past the messages' version
  folds in the later messages (`AHEAD_READS`) and reads again.
* A message on the channel that is no version, or names a version the store
  does not hold, costs one ``GET``; only a bare version asks for a whole read.
* Through Sentinel, each resync tick asks the sentinels for the master first:
  a new one is subscribed to again.
* A corrupt table or an unreachable Redis keeps the last table delivered; the
  watch ends only when `stop()` says so. A corrupt table (a key of the wrong type
  too) keeps the watch subscribed and stays reported until a read finds it good:
  the repair's message, or the version moving, reads it again.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from redis.exceptions import RedisError

from balancer.big_loads import loading
from balancer.rules import validate_table
from balancer.stores import strict_json
from balancer.stores.base import (
    CorruptStore,
    ProblemLog,
    Store,
    StoreUnavailable,
    TableChange,
    TableData,
)
from balancer.stores.redis_answers import printable, utf8, why

log = logging.getLogger("balancer.store.redis")

WAIT_TICK = 0.25          # longest wait for a message before checking stop() again
BACKOFF_FIRST = 0.1
BACKOFF_CAP = 5.0
DRAIN_MAX = 1000          # queued messages folded into one reload
MESSAGE_LAG = 0.05        # s a resync tick that finds the version moved waits for its message
AHEAD_READS = 4           # reads of named hosts that found the store past their messages


@dataclass
class _Seen:
    """Watcher state: the raw version last read, the version and table delivered
    (the table is None after a change was delivered), the backoff."""

    version: bytes | str | None = None
    delivered: TableData | None = None
    delivered_version: int = -1
    delay: float = BACKOFF_FIRST
    stranger_told: bool = False  # a message that is no version was logged
    announced: int = -1  # the version ``NS:changed-hosts`` last named hosts for


class RedisWatching(Store):
    """`watch` for `RedisStore`, which provides what is declared here: the client,
    its keys and channel, its reads, and the state `is_reachable` and `last_error`
    report."""

    client: redis.Redis
    display_url: str
    hosts_key: str
    version_key: str
    channel: str
    hosts_channel: str
    resync_interval: float
    _watchers: int  # watches running: `is_reachable` is then theirs to tell
    _whole_loads: int  # watches reading the whole table now (`whole_load_since`)
    _whole_since: float  # when the latest of them began
    _reachable: bool
    _unreachable: str
    _problem: str | None  # the table read is corrupt

    if TYPE_CHECKING:
        def _talking(self, what: str) -> AbstractContextManager[None]: ...
        def _read_raw(self) -> tuple[dict[str, str], str | None]: ...
        def _parse(self, raw_hosts: Mapping[str, str], raw_version: str | None
                   ) -> TableData: ...
        def _version(self, raw: bytes | str | None) -> int: ...
        def _master_moved(self) -> bool: ...

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
            pubsub.subscribe(self.channel, self.hosts_channel)
            if not self._serves_already(seen, served):
                self._reload(on_change, seen, problems, served)
            seen.delay = BACKOFF_FIRST
            next_check = time.monotonic() + self.resync_interval
            while not stop():
                message = pubsub.get_message(timeout=WAIT_TICK)
                if message is not None:
                    messages = [message, *_drain(pubsub)]
                    self._catch_up(pubsub, messages, on_change, seen, problems, served)
                    next_check = time.monotonic() + self.resync_interval
                elif time.monotonic() >= next_check:
                    if self._master_moved():
                        log.info("%s: the sentinels name a new master; following it",
                                 self.display_url)
                        return  # subscribe again, to the new master
                    self._resync(pubsub, on_change, seen, problems, served)
                    next_check = time.monotonic() + self.resync_interval
        finally:
            pubsub.close()

    def _catch_up(self, pubsub: Any, messages: list[Any], on_change: Callable[[Any], None],
                  seen: _Seen, problems: ProblemLog, served: Callable[[], int] | None) -> None:
        """Apply what `messages` announce: only the hosts they name when they follow on
        the version served, else the whole table."""
        messages = self._unannounced(messages, seen)
        if not messages:
            return
        base = max(seen.delivered_version, served() if served is not None else -1)
        named = _named_changes(messages, base)
        if named is not None and named[1] <= base:
            seen.version = str(base)  # told directly already: nothing to read
            return
        for _ in range(AHEAD_READS):
            if named is None or named[0] != base + 1 or self._problem is not None:
                # a bare version asks for a whole reload: honoured, as always; anything
                # else only once the version is seen to have moved
                if self._problem is not None or any(map(_is_bare_version, messages)) \
                        or self._moved(messages, seen, base):
                    self._reload(on_change, seen, problems, served)
                return
            change = self._read_hosts(base, named[1], named[2])
            if not isinstance(change, int):
                break
            # the store is past the messages: the later writes' messages were sent
            # before the read was answered (each in its write's transaction); read
            # again with their hosts. Bug: the rules read were labelled with the
            # messages' version, a later write's rule in the table at an earlier
            # version (GET /api/v1/hosts answered version N with N+1's rule)
            messages += self._unannounced(_within(pubsub, MESSAGE_LAG), seen)
            named = _named_changes(messages, base)
        else:
            self._reload(on_change, seen, problems, served)  # writes outrun the reads
            return
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

    def _unannounced(self, messages: list[Any], seen: _Seen) -> list[Any]:
        """`messages` without the versions on ``NS:changes`` that ``NS:changed-hosts``
        announced with their hosts (each write publishes both, hosts first, in one
        transaction: SPEC §6 has ``NS:changes`` carry the version alone). A version
        on ``NS:changes`` announced nowhere else is a whole-table write. Only the
        version announced last is skipped (its own message comes right after it):
        a stranger's announcement of a high version must not hide later writes."""
        kept = []
        for message in messages:
            words = str(message.get("data", "")).split()
            if message.get("channel") == self.hosts_channel:
                if len(words) > 1 and words[0].isdecimal():
                    seen.announced = int(words[0])
                kept.append(message)
            elif not (len(words) == 1 and words[0].isdecimal()
                      and int(words[0]) == seen.announced):
                kept.append(message)
        return kept

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

    def _read_hosts(self, base: int, version: int, hosts: list[str]
                    ) -> TableChange | int | None:
        """The named hosts' rules at `version`; the store's version when it is past
        `version` (other hosts may have changed since: their messages are needed);
        None when the store is behind, or a rule does not validate (the whole reload
        reports it)."""
        with self._talking("read"), self.client.pipeline(transaction=True) as pipe:
            pipe.hmget(self.hosts_key, hosts)
            pipe.get(self.version_key)
            texts, raw_version = pipe.execute()
        found = self._version(raw_version)
        if found != version:
            return found if found > version else None
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
        or kept across a reconnect): then the whole table need not be read again.
        Never while the table last read was corrupt: only a read clears that. Bug: a
        key of the wrong type (``SET NS:hosts x``) left the watcher, which came back
        after its backoff (0.1 s), found the version served, and cleared the problem:
        `store.problem` and `balancer_store_up` 0 lasted that long, the damage stayed."""
        if served is None or self._problem is not None:
            return False
        with self._talking("read"):
            raw = self.client.get(self.version_key)
        if self._version(raw) != served():
            return False
        seen.version, seen.delivered_version = raw, served()
        self._problem = None
        return True

    def _resync(self, pubsub: Any, on_change: Callable[[Any], None], seen: _Seen,
                problems: ProblemLog, served: Callable[[], int] | None) -> None:
        """Reload if the version moved without a message reaching us. The write's
        messages left Redis before the answer to the ``GET`` that found it moved (its
        ``PUBLISH`` ran in the write's transaction), but on the other connection, so
        they may still be on their way: the messages that come within
        `MESSAGE_LAG` are applied instead (bug: a write whose message arrived
        just after the tick's ``GET``, the watch's wait for messages just over, was
        read as a lost message: the whole table read, at 100,000 hosts 1-2 s of CPU
        in every worker)."""
        with self._talking("read"):
            version = self.client.get(self.version_key)
        if version == seen.version:
            return
        if served is not None and version is not None and version == str(served()):
            seen.version = version  # applied from a direct message
            return
        messages = _within(pubsub, MESSAGE_LAG)
        if messages:
            self._catch_up(pubsub, messages, on_change, seen, problems, served)
            return  # (the next tick looks again, should they not reach that version)
        log.info("%s: version moved to %s without a message; resyncing",
                 self.display_url, version)
        self._reload(on_change, seen, problems, served)

    def whole_load_since(self) -> float | None:
        return self._whole_since if self._whole_loads else None

    def _reload(self, on_change: Callable[[Any], None], seen: _Seen,
                problems: ProblemLog, served: Callable[[], int] | None) -> None:
        """Read the whole table and deliver it, marked meanwhile (`whole_load_since`)."""
        self._whole_loads += 1
        self._whole_since = time.monotonic()
        try:
            self._reload_whole(on_change, seen, problems, served)
        finally:
            self._whole_loads -= 1

    def _reload_whole(self, on_change: Callable[[Any], None], seen: _Seen,
                      problems: ProblemLog, served: Callable[[], int] | None) -> None:
        try:
            with loading():  # (`balancer.big_loads`: no garbage collection meanwhile)
                raw_hosts, raw_version = self._read_raw()  # a key of the wrong type: corrupt
                seen.version = raw_version
                data = self._parse(raw_hosts, raw_version)
        except CorruptStore as exc:  # still subscribed: the repair's message reads again
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

def _drain(pubsub: Any) -> list[Any]:
    """The messages already queued: one read covers them all."""
    queued = []
    for _ in range(DRAIN_MAX):
        message = pubsub.get_message(timeout=0)
        if message is None:
            break
        queued.append(message)
    return queued


def _within(pubsub: Any, seconds: float) -> list[Any]:
    """The messages that come within `seconds`, and those queued behind them."""
    message = pubsub.get_message(timeout=seconds)
    return [] if message is None else [message, *_drain(pubsub)]


def _is_version_message(message: Any) -> bool:
    words = str(message.get("data", "")).split()
    return bool(words) and words[0].isdecimal()


def _is_bare_version(message: Any) -> bool:
    return str(message.get("data", "")).strip().isdecimal()


def _named_changes(messages: list[Any], base: int) -> tuple[int, int, list[str]] | None:
    """(first version, last version, hosts) of the messages after version `base` when
    every message names its hosts and those versions are consecutive; None otherwise
    (reload the whole table). Messages up to `base` are served already (told
    directly). Bug: a batch that began at a version told directly was read whole (two
    balancers racing one-host writes on one store, the management processes' mirrors
    and the workers alike)."""
    versions: list[int] = []
    hosts: dict[str, None] = {}
    for message in messages:
        words = str(message.get("data", "")).split()
        if len(words) < 2 or not words[0].isdecimal():
            return None
        if int(words[0]) > base:
            versions.append(int(words[0]))
            hosts.update(dict.fromkeys(words[1:]))
    if not versions:
        return base, base, []
    versions.sort()
    if versions != list(range(versions[0], versions[0] + len(versions))):
        return None
    return versions[0], versions[-1], list(hosts)


def _sleep(seconds: float, stop: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while not stop() and time.monotonic() < deadline:
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
