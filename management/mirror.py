"""The management process's copy of the table the balancer serves.

It follows the store like a worker does (same loss guard, `judge`), and
is what the management API falls back on when the store cannot be trusted:
`GET /api/v1/hosts` while the store is down or lost its table, and
`POST /api/v1/restore`, which writes it back. It keeps the local snapshot
(`balancer.stores.snapshot`) and writes the operator's log lines about the
table: one per version change, with hosts added/changed/removed, one when
the store loses its table or is repaired (workers log those at debug level:
the balancer reports each once), and one per table loaded that holds
values below today's floors (health check times, `limits.rate`), loaded
raised (`raised`, shown by `/api/v1/info`: `balancer.stores.floors`).

Invariants:
* `table` is only replaced by a table at least as new as `highest`, never by
  another table at its own version (`rewritten`: the store was damaged); the
  management API's own writes are noted at once (`note_write`), so the
  watcher's later delivery of the same version changes nothing; a write made
  after another not delivered yet is left to a watcher that delivers changes
  (`Store.delivers_changes`: Redis), and read whole otherwise (the file store
  keeps what it wrote: no parse). Reads wait for the watcher
  (`management.table_reads`): read-your-writes holds either way.
* `wait_for` returns once the table is at a version (or a problem is found):
  every table installed and every problem found wakes its waiters, and tells
  the listeners (`listen`: the API's encoded answers, dropped then).
* `raised` is what the table served holds raised: set by each whole table
  loaded, and a host written since (a change, validated at its floor) drops out.
* The snapshot is rewritten after a change, at most once per `SAVE_EVERY`
  seconds (longer for a big table), once more when the process stops, and at
  start when one of its files (the run directory's copy) lacks the table
  loaded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import gevent
from gevent.event import Event

from balancer.rules import RULE_FLOORS
from balancer.stores.base import PAUSE_EVERY, Store, StoreError, TableChange, TableData
from balancer.stores.floors import Raised
from balancer.stores.snapshot import Snapshot, judge, rewritten
from balancer.turns import turn

log = logging.getLogger("balancer.routes")

SAVE_EVERY = 1.0  # seconds between snapshot writes while the table changes
SAVE_SHARE = 20  # ... and at least this many times the last write's duration
NAMES_LOGGED = 5  # host names listed in a version-change line
RAISED_LOGGED = 20  # raised values listed in a line about them
ERROR_LOOK = 0.05  # seconds between a catching-up read's looks at the store's error
FLOORS = ", ".join(f"{section}.{key} {floor:g} {unit}"
                   for section, key, floor, unit in RULE_FLOORS)


class Mirror:
    """The table served, followed from the store with the loss guard."""

    def __init__(self, store: Store, snapshot: Snapshot | None = None) -> None:
        self.store = store
        self.snapshot = snapshot
        self.table: TableData | None = None
        self.highest = 0
        self.problem: str | None = None  # the store lost its table (see `judge`)
        self.raised: tuple[Raised, ...] = ()  # stored values used raised to their floor
        self.stopped = False
        self.following = False  # started: the watcher delivers the store's changes
        self._moved = Event()  # set (and replaced) at each table installed, problem found
        self._listeners: list[Callable[[], None]] = []
        self._dirty = Event()
        self._stopping = Event()  # wakes the snapshot loop's pause at once on stop
        self._tasks: list[Any] = []

    @property
    def version(self) -> int:
        return self.table.version if self.table is not None else -1

    def start(self) -> None:
        """Start from the snapshot, then follow the store and keep the snapshot."""
        saved = self.snapshot.load() if self.snapshot is not None else None
        if saved is not None:
            self.table, self.highest = saved, saved.version
            self.store.raise_floor(saved.version)
            if self.snapshot is not None and self.snapshot.partial:
                self._dirty.set()  # bug: a store at the saved table left the run copy unwritten
        self.following = True
        self._tasks = [gevent.spawn(self.store.watch, self.on_store, lambda: self.stopped,
                                    lambda: self.version),
                       gevent.spawn(self.save_loop)]

    def save_again(self) -> None:
        """Write the snapshot soon, changed or not (its copy in the run directory,
        made again after it was deleted, is gone)."""
        self._dirty.set()

    def stop(self) -> None:
        self.stopped = True
        self.following = False
        self._stopping.set()
        self._dirty.set()
        gevent.joinall(self._tasks, timeout=5)

    def listen(self, listener: Callable[[], None]) -> None:
        """Call `listener` after each table installed and each problem found."""
        self._listeners.append(listener)

    def wait_for(self, version: int, timeout: float) -> None:
        """Until the table is at `version` or later, a problem is found, the store
        reports an error (looked at every `ERROR_LOOK` s: a watcher that found the
        store's newest table damaged keeps the last good one and delivers nothing;
        bug: a read that began just before it noticed waited all of `timeout`), or
        `timeout` seconds passed."""
        deadline = time.monotonic() + timeout
        while self.version < version and self.problem is None \
                and self.store.last_error() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._moved.wait(min(left, ERROR_LOOK))

    def _tell(self) -> None:
        moved, self._moved = self._moved, Event()
        moved.set()
        for listener in self._listeners:
            listener()

    # following the store ---------------------------------------------------
    def on_store(self, item: TableData | TableChange) -> None:
        if isinstance(item, TableChange):
            if self.table is not None and item.base <= self.table.version and not self.problem:
                # the change names every host written after the version held (a write
                # of its own noted while the watcher read the hosts: bug, that read
                # the whole table); one up to the version held changes nothing
                if item.version <= self.table.version:
                    return
                hosts = _changed(self.table.hosts, item.hosts)
                if not item.counts_otherwise(len(hosts)):
                    self._install(item.version, hosts, item.hosts)
                    return
                log.warning("store version %d holds %d hosts, but the table with its change "
                            "would hold %d: reading the whole table", item.version,
                            item.count, len(hosts))
            # (a read that fails raises to the watcher, which reads the table again at
            # its next resync tick; bug (review): told nothing, it took the change as
            # applied and this table stayed behind until the next write)
            item = self.store.load()
        self.on_table(item)

    def on_table(self, data: TableData) -> None:
        problem = self._problem_of(data)
        if problem is not None and self.problem is None:
            again = self._read_again()  # a damaged store, or a read that raced a write?
            if again is None:
                return
            data, problem = again, self._problem_of(again)
        if problem is not None:
            if problem != self.problem:
                log.error("%s", problem)
            self.problem = problem
            self._tell()
            return
        if self.problem is not None:
            log.warning("store %s: repaired at version %d; serving it", self.store.display_url,
                        data.version)
            self.problem = None
        if self.table is not None and data == self.table:
            if data.raised != self.raised:  # (the same table, from the snapshot first)
                self._note_raised(data.version, data.raised)
            return
        self._install(data.version, dict(data.hosts), None)
        self._note_raised(data.version, data.raised)

    def _problem_of(self, data: TableData) -> str | None:
        return judge(data, self.highest, self.store.display_url) or rewritten(
            data, self.table, self.store.display_url)

    def _read_again(self) -> TableData | None:
        """The store's table read now, to judge; None when this read raced a write.

        A table behind the version served (or another one at its version) is a
        damaged store, or a read that began before a write this process noted
        since: the API's writes are noted at once, and run beside the watcher
        (bug: 20 concurrent backend edits left "the store lost its table" for
        good, and every later one-host write answered 409 `store_lost`). A read
        that began after version `known` was noted and is behind it is a loss."""
        known = self.highest
        try:
            data = self.store.load()
        except StoreError as exc:
            log.debug("reading the table again failed: %s", exc)
            return None
        if known <= data.version < self.highest:
            return None  # another write was noted while reading: stale again, not lost
        return data

    def reload(self) -> None:
        """`Store.reload` for ``POST /api/v1/reload``, the table it read judged and
        held as one the watcher delivered. Bug: the store's problem ended without
        the table reaching this mirror, whose watcher (nothing left to read again)
        stayed behind until the next write: every read of the API waited
        `management.table_reads.CATCH_UP` for it."""
        self.on_table(self.store.reload())

    def note_write(self, version: int, changes: Mapping[str, Any] | None,
                   hosts: Mapping[str, Any] | None = None) -> None:
        """This process wrote `version`: `changes` (HOST → rule or None), or the whole
        table `hosts`."""
        if version <= self.version:
            return
        if changes is not None and self.table is not None and version == self.version + 1:
            self._install(version, _changed(self.table.hosts, changes), changes)
        elif changes is not None and self.table is not None and self.following \
                and self.store.delivers_changes:
            return  # written after another's write not delivered yet: the watcher delivers
            # both, reading their hosts (bug: two balancers racing one-host writes on one
            # Redis read the whole table for most of them, 1-2 s at 100,000 hosts)
        elif changes is not None:
            try:  # the watcher has not delivered a table yet (or missed one): read it
                self.on_table(self.store.load())
            except StoreError as exc:
                log.debug("reading the table after a write failed: %s", exc)
        elif hosts is not None:
            self.problem = None  # a whole table at a new version repairs a lost store
            self._install(version, dict(hosts), None)

    def _install(self, version: int, hosts: dict[str, Any],
                 changes: Mapping[str, Any] | None) -> None:
        old = self.table
        self.table = TableData(version, hosts)
        self.highest = max(self.highest, version)
        self.store.raise_floor(version)
        self._dirty.set()
        if changes is None:  # a whole table (`on_table` then says what it raised)
            self.raised = ()
        elif self.raised:
            self.raised = tuple(r for r in self.raised if r.host not in changes)
        log_change(old, self.table, changes)
        self._tell()

    def _note_raised(self, version: int, raised: tuple[Raised, ...]) -> None:
        """A whole table loaded at `version` with these values raised: log them."""
        self.raised = raised
        spelled = [r for r in raised if "backends[" in r.field]
        floors = [r for r in raised if "backends[" not in r.field]
        if floors:
            log.warning("routing table version %d: %d stored value(s) below "
                        "the floor (%s), used raised to it: %s. An earlier version stored "
                        "them; the API refuses them: write these rules again at or above the "
                        "floor", version, len(floors), FLOORS, _listed(floors))
        if spelled:
            log.warning("routing table version %d: %d stored backend address(es) an "
                        "earlier version took and the API refuses (a short IPv4 spelling, "
                        "one server listed twice), used as: %s. Write these rules again with "
                        "each server once, its address in full", version, len(spelled),
                        _listed(spelled))

    # the snapshot ----------------------------------------------------------
    def save_loop(self) -> None:
        """Write the snapshot after each change, at most every `SAVE_EVERY` seconds, and
        spending at most 1/`SAVE_SHARE` of the time writing it (a table of 100,000
        hosts takes a few hundred ms to write, and this process answers the API)."""
        while True:
            self._dirty.wait()
            self._dirty.clear()
            started = time.monotonic()
            if self.snapshot is not None and self.table is not None:
                self.snapshot.save(self.table)
            if self.stopped:
                return
            self._stopping.wait(max(SAVE_EVERY, (time.monotonic() - started) * SAVE_SHARE))


def _changed(hosts: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    new = dict(hosts)
    for host, rule in changes.items():
        if rule is None:
            new.pop(host, None)
        else:
            new[host] = rule
    return new


def log_change(old: TableData | None, new: TableData,
               changes: Mapping[str, Any] | None = None) -> None:
    """One line per version change: how many hosts were added, changed, removed
    (counted over `changes` when given, else over both tables, in slices: a write
    noted meanwhile may log its line before this one)."""
    before, after = old.hosts if old is not None else {}, new.hosts
    keys = after.keys() | before.keys() if changes is None else changes.keys()
    added, changed, removed = [], [], []
    for n, host in enumerate(keys):
        if n % PAUSE_EVERY == PAUSE_EVERY - 1:
            turn()  # a whole table: 100,000 hosts compared at once held the API up 0.4 s
        if host not in after:
            if host in before:
                removed.append(host)
        elif host not in before:
            added.append(host)
        elif before[host] != after[host]:
            changed.append(host)
    names = (added + changed + removed)[:NAMES_LOGGED]
    more = len(added) + len(changed) + len(removed) - len(names)
    listed = ", ".join(names) + (f" and {more} more" if more > 0 else "")
    log.info("routing table version %s -> %d: %d added, %d changed, %d removed%s",
             old.version if old is not None else "none", new.version, len(added),
             len(changed), len(removed), f" ({listed})" if listed else "")


def _listed(raised: list[Raised]) -> str:
    """The first `RAISED_LOGGED` of `raised` for a log line, and how many more."""
    more = len(raised) - RAISED_LOGGED
    return ", ".join(str(r) for r in raised[:RAISED_LOGGED]) + \
        (f" and {more} more" if more > 0 else "")
