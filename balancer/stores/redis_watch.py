"""How a Redis store follows the table (`RedisWatching.watch`, mixed into
`balancer.stores.redis.RedisStore`): subscribe to ``NS:changes`` and
``NS:changed-hosts``, read, apply what the messages announce (their format:
`balancer.stores.redis`; what a batch of them says:
`balancer.stores.redis_messages`; how it is applied:
`balancer.stores.redis_changes`), re-check the version, reconnect.

Invariants:
* `watch` subscribes before it reads, so no change between the read and the
  subscription is missed; it re-checks the version every `resync_interval`
  in case a message was lost, and reconnects with capped exponential backoff.
* A whole read is one table at one version: a big one read in slices that
  writes interrupted is finished and the hosts they named read again
  (`RedisChanges._scan_caught_up`), not read again whole.
* Through Sentinel, each resync tick asks the sentinels for the master first:
  a new one is subscribed to again.
* A corrupt table or an unreachable Redis keeps the last table delivered; the
  watch ends only when `stop()` says so, an unexpected exception included
  (`balancer.restarts.Restarts`: reported, then subscribed and read again).
  A corrupt table (a key of the wrong type too) keeps the watch subscribed and
  stays reported until a read finds it good: the repair's message, or the
  version moving, reads it again.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from balancer.big_loads import loading
from balancer.restarts import nap
from balancer.stores.base import (
    CorruptStore,
    ProblemLog,
    StoreUnavailable,
    TableData,
    watcher_restarts,
)
from balancer.stores.redis_answers import is_refusal, refusal, why
from balancer.stores.redis_changes import BACKOFF_FIRST, MESSAGE_LAG, RedisChanges, Seen
from balancer.stores.redis_messages import Inbox

if TYPE_CHECKING:
    from balancer.stores.redis_reads import CaughtUp

log = logging.getLogger("balancer.store.redis")

WAIT_TICK = 0.25          # longest wait for a message before checking stop() again
SUBSCRIBED_WAIT = 2.0     # s the first answer to SUBSCRIBE is waited for, at most
BACKOFF_CAP = 5.0


class RedisWatching(RedisChanges):
    """`watch` for `RedisStore`, which provides what is declared here: the client,
    its keys and channel, its reads, and the state `is_reachable` and `last_error`
    report."""

    hosts_channel: str
    resync_interval: float
    _watchers: int  # watches running: `is_reachable` is then theirs to tell
    _whole_loads: int  # watches reading the whole table now (`whole_load_since`)
    _whole_since: float  # when the latest of them began
    _reachable: bool
    _unreachable: str

    if TYPE_CHECKING:
        def _read_raw(self, caught_up: CaughtUp | None = None
                      ) -> tuple[dict[str, str], str | None]: ...
        def _parse(self, raw_hosts: Mapping[str, str], raw_version: str | None
                   ) -> TableData: ...
        def _master_moved(self) -> bool: ...

    def watch(self, on_change: Callable[[Any], None], stop: Callable[[], bool],
              served: Callable[[], int] | None = None) -> None:
        problems = ProblemLog(log, self.quiet)
        seen = Seen()
        restarts = watcher_restarts(self.display_url, log, self.quiet)
        self._watchers += 1
        told = self.quiet  # the other databases: the management process tells, once
        try:
            while not stop():
                try:
                    if not told:
                        told = True  # (guarded: bug, an answer it did not expect ended
                        self._tell_other_databases()  # the watch before it began)
                    self._follow(on_change, stop, seen, problems, served)
                except CorruptStore as exc:  # bug: the watcher ended on a bad version
                    self._found(str(exc))
                    problems.report(f"{exc}; keeping the last good table")
                    nap(seen.delay * random.uniform(0.5, 1.0), stop)
                    seen.delay = min(seen.delay * 2, BACKOFF_CAP)
                except (RedisError, OSError, StoreUnavailable) as exc:
                    self._note_outage(exc, problems)
                    nap(seen.delay * random.uniform(0.5, 1.0), stop)
                    seen.delay = min(seen.delay * 2, BACKOFF_CAP)
                except Exception as exc:  # a bug: reported, and followed again (module doc)
                    self._failure = self._found(restarts.failed(exc))
                    nap(restarts.pause, stop)
        finally:
            self._watchers -= 1

    def _tell_other_databases(self) -> None:
        """Warn once when this database holds no table while others of the same Redis
        hold keys: the /N of store.url may be wrong, and nothing else would say so (a
        snapshot belongs to one database: the empty table is served, a write starts a
        new one). Silent when Redis cannot be asked: the watch reports that."""
        db = int(self.client.connection_pool.connection_kwargs.get("db") or 0)
        try:
            if self.client.exists(self.version_key, self.hosts_key):
                return
            others = sorted(int(name[2:]) for name in self.client.info("keyspace")
                            if name[2:].isdecimal() and int(name[2:]) != db)
        except (RedisError, OSError):
            return
        if others:
            log.warning("%s: database %d holds no routing table (no %s), and database%s %s "
                        "of this Redis hold%s keys: if the table is there, the /N of "
                        "store.url is wrong (a write here starts a new table)",
                        self.display_url, db, self.version_key, "s" if len(others) > 1 else "",
                        ", ".join(map(str, others)), "" if len(others) > 1 else "s")

    def _note_outage(self, exc: Exception, problems: ProblemLog) -> None:
        """Report what ended the watch's contact with Redis: Redis's refusal (it
        answered: a database it does not have, a command this user may not run), or
        no answer (unreachable). Bug: a refusal was "unreachable" (``/99`` of 16)."""
        refused = exc if is_refusal(exc) else exc.__cause__
        if refused is not None and is_refusal(refused):  # one `_talking` made unavailable
            self._reachable = True
            self._found(f"{self.display_url}: Redis refused to be followed: "
                        f"{refusal(refused)}")
            problems.report(f"{self._problem}; keeping the last table and trying again "
                            f"with backoff")
            return
        self._reachable = False
        self._unreachable = f"{self.display_url}: unreachable: {why(exc)}"
        problems.report(f"{self._unreachable}; keeping the last table and reconnecting "
                        f"with backoff")

    def _follow(self, on_change: Callable[[Any], None], stop: Callable[[], bool],
                seen: Seen, problems: ProblemLog, served: Callable[[], int] | None) -> None:
        """Subscribe, load, then apply messages and resync ticks until `stop()`."""
        pubsub: Any = self.client.pubsub()  # (its replies to SUBSCRIBE: dropped by the inbox)
        try:
            pubsub.subscribe(self.channel, self.hosts_channel)
            if not self._subscribed(pubsub, seen):
                pubsub.close()
                pubsub = NoMessages()
            inbox = Inbox(pubsub, self.hosts_channel)
            if not self._serves_already(seen, served):
                self._reload(inbox, on_change, seen, problems, served)
            steady = time.monotonic() + BACKOFF_CAP  # (`_steady`)
            next_check = time.monotonic() + self.resync_interval
            while not stop():
                steady = _steady(seen, steady)
                messages = inbox.within(WAIT_TICK)
                if messages:
                    self._catch_up(inbox, messages, on_change, seen, problems, served)
                    next_check = time.monotonic() + self.resync_interval
                elif time.monotonic() >= next_check:
                    if self._master_moved():
                        log.info("%s: the sentinels name a new master; following it",
                                 self.display_url)
                        return  # subscribe again, to the new master
                    if self._resync(inbox, on_change, seen, problems, served) \
                            and not isinstance(pubsub, NoMessages):
                        log.info("%s: a message was lost: subscribing again, on a new "
                                 "connection", self.display_url)
                        return
                    next_check = time.monotonic() + self.resync_interval
        finally:
            pubsub.close()

    def _subscribed(self, pubsub: Any, seen: Seen) -> bool:
        """Whether Redis took the subscription: False when it refused ``SUBSCRIBE``
        (a Redis that disabled it, ``rename-command SUBSCRIBE ""``; a proxy without
        pub/sub), told once: the table is then followed by the version checks alone.
        Bug: the refusal, raised at the first look for a message, was taken for
        Redis unreachable, and the watcher reconnected with backoff for good: other
        balancers' writes were never served."""
        try:
            pubsub.get_message(timeout=SUBSCRIBED_WAIT)  # its answer (dropped) or error
        except RedisError as exc:
            if not is_refusal(exc):
                raise
            if not seen.unsubscribed_told:
                seen.unsubscribed_told = True
                log.log(logging.DEBUG if self.quiet else logging.WARNING,
                        "%s: Redis refused to subscribe to %s (%s): following the table by "
                        "its version alone, looked at every %g s (store.resync_interval), "
                        "each change read whole", self.display_url, self.channel, why(exc),
                        self.resync_interval)
            return False
        return True

    def _serves_already(self, seen: Seen, served: Callable[[], int] | None) -> bool:
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

    def _resync(self, inbox: Inbox, on_change: Callable[[Any], None], seen: Seen,
                problems: ProblemLog, served: Callable[[], int] | None) -> bool:
        """Reload if the version moved without a message reaching us; whether it did
        (a message lost: the subscription is not to be trusted. Bug: a network that
        dropped the idle subscription without a word, a NAT's or a firewall's idle
        timeout, left it dead for good while the version checks' connection worked:
        every later write was found by the check, up to `resync_interval` late, and
        read whole). The write's
        messages left Redis before the answer to the ``GET`` that found it moved (its
        ``PUBLISH`` ran in the write's transaction), but on the other connection, so
        they may still be on their way: the messages that come within
        `MESSAGE_LAG` are applied instead (bug: a write whose message arrived
        just after the tick's ``GET``, the watch's wait for messages just over, was
        read as a lost message: the whole table read, at 100,000 hosts 1-2 s of CPU
        in every worker). A version the consumer serves is not read again, unless a
        problem is reported: only a read clears it (bug: ``NS:version`` repaired by
        hand to the version served stayed reported until the next write)."""
        with self._talking("read"):
            version = self.client.get(self.version_key)
        if version == seen.version:
            return False
        if (served is not None and version is not None and version == str(served())
                and self._problem is None):
            seen.version = version  # applied from a direct message
            return False
        messages = inbox.within(MESSAGE_LAG)
        if messages:
            self._catch_up(inbox, messages, on_change, seen, problems, served)
            return False  # (the next tick looks again, should they not reach that version)
        log.info("%s: version moved to %s without a message; resyncing",
                 self.display_url, version)
        self._reload(inbox, on_change, seen, problems, served)
        return True

    def whole_load_since(self) -> float | None:
        return self._whole_since if self._whole_loads else None

    def _reload(self, inbox: Inbox, on_change: Callable[[Any], None], seen: Seen,
                problems: ProblemLog, served: Callable[[], int] | None) -> None:
        """Read the whole table and deliver it, marked meanwhile (`whole_load_since`)."""
        self._whole_loads += 1
        self._whole_since = time.monotonic()
        try:
            self._reload_whole(inbox, on_change, seen, problems, served)
        finally:
            self._whole_loads -= 1

    def _reload_whole(self, inbox: Inbox, on_change: Callable[[Any], None], seen: Seen,
                      problems: ProblemLog, served: Callable[[], int] | None) -> None:
        try:
            with loading():  # (`balancer.big_loads`: no garbage collection meanwhile)
                # (a key of the wrong type: corrupt)
                raw_hosts, raw_version = self._read_raw(partial(self._scan_caught_up, inbox))
                seen.version = raw_version
                data = self._parse(raw_hosts, raw_version)
        except CorruptStore as exc:  # still subscribed: the repair's message reads again
            self._found(str(exc))
            problems.report(f"{exc}; keeping the last good table")
            return
        self._problem = None
        inbox.read_at(data.version, MESSAGE_LAG)
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


def _steady(seen: Seen, steady: float) -> float:
    """The reconnect backoff starts again once a subscription has lasted `BACKOFF_CAP`
    (at `steady`); the next `steady` (infinite once done). Bug (review): it started
    again at each subscription that worked, so a network that cut each one just
    after (a flapping link, a proxy dropping pub/sub connections) had every
    watcher subscribe and ask the version ~25 times a second, for good."""
    if time.monotonic() < steady:
        return steady
    seen.delay = BACKOFF_FIRST
    return float("inf")


class NoMessages:
    """The subscription of a Redis that refused ``SUBSCRIBE``: no message ever comes
    (`RedisWatching._subscribed`)."""

    def get_message(self, timeout: float = 0.0) -> None:
        time.sleep(timeout)

    def close(self) -> None:
        """Nothing to close."""
