"""How a Redis store's watcher applies what its messages announce
(`RedisChanges`, mixed into `balancer.stores.redis.RedisStore` through
`balancer.stores.redis_watch.RedisWatching`): the hosts they name, read alone,
or the whole table; and the writes that land during a whole read in slices.

Invariants:
* Messages that name hosts and follow on the version the consumer serves are
  applied by reading only those hosts (``HMGET``), so a one-host change costs
  the same with 100 or 100,000 hosts. A change is delivered at the version the
  rules were read at: a read that finds the store past the messages' version
  folds in the later messages (`AHEAD_READS`) and reads again.
* Messages up to the version served (told directly, or read) cost nothing; a
  whole-table write among them costs one ``GET``, to see the store is not
  behind it (then the whole table is read: the consumer judges the loss). It
  is read whole all the same while the table read last was corrupt (the write
  repairs it, and only a read clears the problem), and when its version was
  heard or read here before: a version published again by hand asks every
  balancer to look again.
* A message on the channel that is no version, or names a version the store
  does not hold, costs one ``GET``; only a bare version asks for a whole read.
* A whole read in slices that writes interrupted (`_scan_caught_up`) is
  finished, then the hosts the writes' messages name are read at the version
  the store is at, once every version between the read's and that one is
  announced with its hosts: every other field kept its value through the scan,
  which ``HSCAN`` then returned; so the table is the one a single read at that
  version gives, as many hosts as ``HLEN`` counts then (read with them: the
  check that nothing went without a message, a ``FLUSHDB``). Anything else
  (a whole-table write, a lost or strange message, a version gone back, a
  count that differs) reads the slices again.
* A whole-table write this process makes (the management API's) is told to
  its table directly: a watcher that hears its message first waits for the
  write's answer (`_own_writes_done`), and reads nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from balancer.rules import validate_table
from balancer.stores import strict_json
from balancer.stores.base import CorruptStore, ProblemLog, Store, TableChange, TableData
from balancer.stores.redis_answers import printable, utf8
from balancer.stores.redis_messages import (
    Inbox,
    is_bare_version,
    is_version_message,
    named_changes,
)

log = logging.getLogger("balancer.store.redis")

BACKOFF_FIRST = 0.1
MESSAGE_LAG = 0.05        # s a read that finds the version moved waits for its messages
AHEAD_READS = 4           # reads of named hosts that found the store past their messages
OWN_WRITE_WAIT = 5.0      # s a whole-table write's message waits for this process's writes
OWN_WRITE_POLL = 0.005    # ... looked at this often


@dataclass
class Seen:
    """Watcher state: the raw version last read, the version and table delivered
    (the table is None after a change was delivered), the backoff."""

    version: bytes | str | None = None
    delivered: TableData | None = None
    delivered_version: int = -1
    delay: float = BACKOFF_FIRST
    stranger_told: bool = False  # a message that is no version was logged
    bare_heard: int = -1  # the highest whole-table write's version heard (`_catch_up`)
    back_until: int = -1  # the store went back from it: read whole until past it
    unsubscribed_told: bool = False  # Redis's refusal of SUBSCRIBE was logged


def forget_delivered(seen: Seen) -> None:
    """A change the consumer failed to apply (its whole read, when the change did not
    count as the store's, cut short): the next resync tick, not finding the version
    read, reads the table whole (a whole table the consumer fails to apply is not
    read again until the store moves: a bug of the consumer, which each read would
    repeat). Bug (review): the change was taken as delivered, the tick did nothing
    and the table stayed stale until the next write."""
    seen.version, seen.delivered, seen.delivered_version = None, None, -1


class RedisChanges(Store):
    """What `RedisWatching` does with messages; `RedisStore` provides the rest."""

    client: redis.Redis
    display_url: str
    hosts_key: str
    version_key: str
    channel: str
    _problem: str | None  # the table read is corrupt
    _writes_in_flight: int  # this store's writes not answered yet (`RedisStore._write`)

    if TYPE_CHECKING:
        def _talking(self, what: str) -> AbstractContextManager[None]: ...
        def _version(self, raw: bytes | str | None) -> int: ...
        def _reload(self, inbox: Inbox, on_change: Callable[[Any], None], seen: Seen,
                    problems: ProblemLog, served: Callable[[], int] | None) -> None: ...

    def _catch_up(self, inbox: Inbox, messages: list[Any], on_change: Callable[[Any], None],
                  seen: Seen, problems: ProblemLog, served: Callable[[], int] | None) -> None:
        """Apply what `messages` announce: only the hosts they name when they follow on
        the version served, else the whole table."""
        if not messages:
            return
        if self._writes_in_flight and any(map(is_bare_version, messages)):
            self._own_writes_done()
        base = max(seen.delivered_version, served() if served is not None else -1)
        back = inbox.went_back()
        if back is not None:
            # read whole until past the version served: a read there is the store's
            # table, which the consumer takes. Bug (review): until past the version
            # heard, a stranger's too (PUBLISH NS:changes 999): every later write read
            # whole, in every process
            log.log(logging.DEBUG if self.quiet else logging.WARNING,
                    "%s: a write announced version %d after version %d: the store went "
                    "back (flushed, or restarted without its data) and is written again; "
                    "reading the whole table at each write until it passes version %d",
                    self.display_url, *back, base)
            seen.back_until = max(seen.back_until, base)
        if seen.back_until >= 0:  # the table served is not the store's at any version
            # up to it: only a whole read past it is (its hosts are then taken whole)
            self._reload(inbox, on_change, seen, problems, served)
            if seen.delivered_version > seen.back_until:
                seen.back_until = -1
            return
        named = named_changes(messages, base)
        bare = [int(m["data"]) for m in messages if is_bare_version(m)]
        heard, seen.bare_heard = seen.bare_heard, max([seen.bare_heard, *bare])
        if named is not None and named[1] <= base:  # told directly already, or read
            # a whole-table write read nonetheless when its version was heard or read
            # here before (published again by hand: "look again"), the table read
            # last was corrupt (only a read clears that: it repairs it), or the store
            # is behind it
            if bare and (min(bare) <= max(heard, seen.delivered_version)
                         or self._problem is not None or self._behind(base)):
                self._reload(inbox, on_change, seen, problems, served)
            else:
                seen.version = str(base)
            return
        for _ in range(AHEAD_READS):
            if named is None or named[0] != base + 1 or self._problem is not None:
                # a bare version asks for a whole reload: honoured, as always; anything
                # else only once the version is seen to have moved
                if self._problem is not None or any(map(is_bare_version, messages)) \
                        or self._moved(messages, seen, base):
                    self._reload(inbox, on_change, seen, problems, served)
                return
            change = self._read_hosts(base, named[1], named[2])
            if not isinstance(change, int):
                break
            # the store is past the messages: the later writes' messages were sent
            # before the read was answered (each in its write's transaction); read
            # again with their hosts. Bug: the rules read were labelled with the
            # messages' version, a later write's rule in the table at an earlier
            # version (GET /api/v1/hosts answered version N with N+1's rule)
            messages += inbox.within(MESSAGE_LAG)
            named = named_changes(messages, base)
        else:  # writes outran the reads
            log.debug("%s: the store stayed past its messages through %d reads of their "
                      "hosts (serving %d): reading the whole table", self.display_url,
                      AHEAD_READS, base)
            self._reload(inbox, on_change, seen, problems, served)
            return
        if change is None:  # announced but not there (or not valid: the reload says)
            if self._moved(messages, seen, base):
                self._reload(inbox, on_change, seen, problems, served)
            return
        seen.version, seen.delivered_version, seen.delivered = str(change.version), \
            change.version, None
        try:
            on_change(change)
        except Exception:
            log.exception("applying version %s from %s failed", change.version,
                          self.display_url)
            forget_delivered(seen)

    def _own_writes_done(self) -> None:
        """Until the writes this process makes through this store are answered (at
        most `OWN_WRITE_WAIT`): a whole-table write's message may reach the watcher
        before the writer hears it was made and tells the consumer (the management
        process's table, at once). Bug: the management process read the whole table
        again at each of its own whole-table writes."""
        deadline = time.monotonic() + OWN_WRITE_WAIT
        while self._writes_in_flight and time.monotonic() < deadline:
            time.sleep(OWN_WRITE_POLL)

    def _moved(self, messages: list[Any], seen: Seen, base: int) -> bool:
        """Whether the version moved from the one read or served: one ``GET`` before
        a whole reload for messages that are no version, or announce one the store
        does not hold. Bug: any such message on ``NS:changes`` (``PUBLISH
        balancer:changes hello``, from anyone) made every worker of every balancer
        read the whole table."""
        stranger = next((m for m in messages if not is_version_message(m)), None)
        if stranger is not None and not seen.stranger_told:
            seen.stranger_told = True
            log.log(logging.DEBUG if self.quiet else logging.WARNING,
                    "%s: a message on %s that is not a version (%s): only the store's "
                    "version is trusted; another program publishes on this channel",
                    self.display_url, self.channel, printable(str(stranger.get("data")))[:80])
        with self._talking("read"):
            raw = self.client.get(self.version_key)
        return raw not in (seen.version, str(base))

    def _behind(self, base: int) -> bool:
        """Whether the store's version is below `base` (one ``GET``): a whole-table
        write up to the version served then wrote a store that lost its table. Bug:
        this balancer's whole-table write, told directly to the management process
        and the worker, was read whole again by their watchers at its message."""
        with self._talking("read"):
            raw = self.client.get(self.version_key)
        return self._version(raw) < base

    def _hosts_at(self, hosts: list[str]) -> tuple[int, list[Any], int]:
        """The store's version, the stored rules of `hosts` (None: no rule) and the
        number of hosts, in one transaction."""
        with self._talking("read"), self.client.pipeline(transaction=True) as pipe:
            pipe.hmget(self.hosts_key, hosts)
            pipe.get(self.version_key)
            pipe.hlen(self.hosts_key)
            texts, raw_version, count = pipe.execute()
        return self._version(raw_version), texts, int(count)

    def _read_hosts(self, base: int, version: int, hosts: list[str]
                    ) -> TableChange | int | None:
        """The named hosts' rules at `version`; the store's version when it is past
        `version` (other hosts may have changed since: their messages are needed);
        None when the store is behind, or a rule does not validate (the whole reload
        reports it)."""
        found, texts, count = self._hosts_at(hosts)
        if found != version:
            return found if found > version else None
        rules: dict[str, Any] = {}
        for host, text in zip(hosts, texts, strict=True):
            if text is None:
                rules[host] = None
                continue
            try:
                rules[host] = strict_json.loads(utf8(text, host))
                if validate_table({host: rules[host]}, key_form=True):
                    return None
            except (ValueError, RecursionError):
                return None  # unreadable: the whole table is read and reported
        self.raise_floor(version)
        return TableChange(version, base, rules, count)

    def _scan_caught_up(self, inbox: Inbox, raw_hosts: dict[str, str], start_raw: Any,
                        after_raw: Any) -> str | None:
        """After a read in slices from version `start_raw` that found the store at
        `after_raw`: `raw_hosts` brought to the version the store is at (the hosts the
        writes between named, read again), and that version; None when the messages
        cannot say what changed (the module doc). Bug: every write that landed
        during a big table's read started it again (at 100,000 hosts, 1-2 s of CPU
        in every worker and management process, each time)."""
        try:
            start, target = self._version(start_raw), self._version(after_raw)
        except CorruptStore:
            return None  # read again: the next read reports it
        messages = inbox.within(0.0)  # (those put back first)
        try:
            for _ in range(AHEAD_READS if target > start else 0):
                named = named_changes(messages, start)
                if named is not None and named[1] < target:  # its messages on their way
                    messages += inbox.within(MESSAGE_LAG)
                    named = named_changes(messages, start)
                if named is None or named[0] != start + 1 or named[1] < target:
                    return None
                found, texts, count = self._hosts_at(named[2])
                if found < named[1]:
                    return None  # behind its messages: a stranger's, or a FLUSHDB
                if found == named[1]:
                    for host, text in zip(named[2], texts, strict=True):
                        if text is None:
                            raw_hosts.pop(host, None)
                        else:
                            raw_hosts[host] = text
                    # bug (review): a FLUSHDB during the scan, then one-host writes from
                    # a balancer that knew no version, up to the next version, was
                    # patched onto the slices read before it: hosts the store lost
                    return str(found) if len(raw_hosts) == count else None
                target = found  # written again meanwhile: those messages too
            return None
        finally:
            inbox.put_back(messages)
