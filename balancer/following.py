"""A worker's routing table, following its store (SPEC §6) and the management
process's direct messages: `TableFollower`.

Configuration flows one way: store → `watch` (or the management process,
over the worker's control socket) → `TableFollower.apply` / `apply_change`
(compile) → `TableHolder.swap`. A table that does not compile is reported
and the last good one keeps serving.

Invariants:
* A worker started while its store cannot be read (down, corrupt, its
  directory gone) serves the snapshot's table (`Snapshot.load`: the newest of
  `store.snapshot` and the run directory's copy, which a worker the arbiter
  starts again always has) and says so in `store_problem` until the store's
  first table is applied (`unconfirmed`: read whole, even at the version served).
* A store table older than the highest version this worker has known (its
  own, or the snapshot's at start) never replaces the served table
  (`balancer.stores.snapshot.judge`), nor does, at start, another table at the
  snapshot's own version (`rewritten`: the store was changed without raising
  it); `store_problem` says why until the store is repaired.
* Table updates run one at a time (`updating`). A change names the hosts it
  changed and costs what changed (`RoutingTable.with_changes`); it applies on
  the version served when that is its base or a later one below its own (a write
  told directly while the watcher read the change: the change names that write's
  hosts too, read at its version); only one beginning past the version served
  reads the whole table. A whole table that differs in few hosts is applied as a
  change; otherwise it is compiled in slices, the loop going round
  (`balancer.turns.turn`: requests, timers) every `PAUSE_EVERY` hosts, with no
  garbage collection meanwhile (`balancer.big_loads`).
* A change the management process tells directly (`catch_up`) that does not follow
  on the version served, on a store whose watcher delivers every write's hosts
  in order (`Store.delivers_changes`: Redis, where another balancer's message
  comes before any later write's), waits up to `FOLLOW_WAIT` for the watcher to
  deliver the versions between (reading their hosts), then applies on top; only
  a watcher that has not by then (its messages lost, Redis down) leaves the
  whole table to be read. A write told directly while the watcher reads the
  whole table (`Store.whole_load_since`) waits for that load (up to `LOAD_WAIT`
  from its start), never reads the table a second time beside it.
* Backends no rule names any more are forgotten once idle, and the counters
  of deleted hosts and removed backends go with the change that removed them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from balancer.big_loads import loading
from balancer.rules import RuleError, normalize_host
from balancer.stores.base import StoreError, TableChange, TableData
from balancer.stores.snapshot import Snapshot, judge, rewritten
from balancer.table import COMPACT_AT, PAUSE_EVERY, RoutingTable, TableHolder
from balancer.turns import turn

log = logging.getLogger("balancer")

FOLLOW_WAIT = 1.0  # seconds a change told directly waits for the watcher's versions before it
# seconds from its start a whole load of the watcher is waited for, at most (100,000
# hosts take 3-15 s on a loaded 2-core machine), and how often a waiter looks at it
LOAD_WAIT = 30.0
LOAD_POLL = 0.1


class TableFollower:
    """The table one worker serves, and how it follows the store."""

    def __init__(self, store: Any, holder: TableHolder, compiler: Any, registry: Any,
                 health: Any, stats: Any, snapshot: Snapshot) -> None:
        self.store = store
        self.holder = holder
        self.compiler = compiler
        self.registry = registry
        self.health = health
        self.stats = stats
        self.snapshot = snapshot
        self.loaded = False
        self.highest = 0  # the highest version known: a store behind it lost its table
        self.store_problem: str | None = None  # why the store's table is not served
        # started from the snapshot, the store unreadable: its first table is read whole
        # (even at the version served) to confirm it and clear `store_problem`
        self.unconfirmed = False
        self.updating = threading.RLock()  # one table update at a time
        self.moved = threading.Condition(self.updating)  # notified at each table installed
        self.following = False  # the store's watcher runs (`balancer.server.Worker.watch_loop`)
        self.backend_uses: Counter[str] = Counter()  # backend key → proxy routes naming it
        self.unused: set[str] = set()  # backends no route names, forgotten once idle
        self.health_rules = 0  # rules with active health checks (in the last whole table)

    def start_table(self) -> None:
        """The first table: the store's, or the last good one (the snapshot) when the
        store is unreachable or behind it. Raises `StoreError` when there is neither."""
        saved = self.snapshot.load()
        if saved is not None:
            self.highest = saved.version
            self.store.raise_floor(saved.version)
        try:
            data = self.store.load()
        except StoreError as exc:
            if saved is None:
                raise
            self.store_problem = (f"{self.store.told(exc)}; serving the last "
                                  f"good table, which may be stale (version {saved.version}, "
                                  f"from {self.snapshot.describe()}), until the store can "
                                  f"be read")
            log.warning("%s", self.store_problem)
            self.apply(saved, judged=False)
            self.unconfirmed = True
            return
        problem = rewritten(data, saved, self.store.display_url)
        if problem is not None and saved is not None:  # damaged at the version saved
            self.store_problem = problem
            self.apply(saved, judged=False)
            return
        if not self.apply(data) and saved is not None:
            self.apply(saved, judged=False)

    def apply(self, data: TableData, judged: bool = True) -> bool:
        """Compile and install a whole table; False (and the old table) if it is
        invalid or older than a version known (the store lost its table)."""
        with self.updating:
            if judged:
                problem = judge(data, self.highest, self.store.display_url)
                if problem is not None:
                    self.store_problem = problem
                    return False
                self.store_problem = None
                self.unconfirmed = False
            current = self.holder.table
            if self.loaded and data.version == current.version:
                return True  # a version names one table: the watcher's first delivery repeats
                # the table loaded at start (comparing 100,000 rules would stall the loop)
            changes = self._diff(current, data.hosts) if self.loaded else None
            if changes is not None:
                return self.apply_change(TableChange(data.version, current.version, changes))
            with loading():  # no garbage collection walks the objects it makes
                try:
                    table = RoutingTable.build(data.version, data.hosts, self.compiler.compile,
                                               self.compiler.fallbacks, previous=current,
                                               pause=turn)
                except RuleError as exc:
                    log.error("store version %s rejected, keeping version %s: %s",
                              data.version, current.version, "; ".join(exc.problems))
                    return False
                self.install(table, None)
            return True

    def apply_change(self, change: TableChange) -> bool:
        """Apply the hosts one or more writes changed, on the version served when it is
        the change's base or a later one: the change names every host written after
        its base, each read at its version, so the table served differs from the
        store's there in those hosts alone; a change beginning past the version
        served makes the whole table be read again. Bug: a watcher that read the
        hosts of writes N+1 and N+2 while the management process told the worker its
        own write N+1 delivered N+2 on N, which read the whole table (two balancers
        racing one-host writes on one store; tests/test_one_host_reads: 1 run in 8)."""
        with self.updating:
            current = self.holder.table
            if change.version <= current.version:
                return True
            if change.base <= current.version and self.store_problem is None:
                try:
                    table = current.with_changes(change.version, change.hosts,
                                                 self.compiler.compile, self.compiler.fallbacks)
                except RuleError as exc:
                    log.error("store version %s rejected, keeping version %s: %s",
                              change.version, current.version, "; ".join(exc.problems))
                    return False
                if not change.counts_otherwise(table.size):
                    self.install(table, change.hosts)
                    return True
                log.warning("store version %d holds %d hosts, but this worker's table would "
                            "hold %d with its change: reading the whole table", change.version,
                            change.count, table.size)
            return self.apply(self.store.load())

    def _diff(self, current: RoutingTable, hosts: Mapping[str, Any]
              ) -> dict[str, Any] | None:
        """The hosts a whole table changes from `current` (None for removed ones), in
        slices; None when they are many (or some key is not a valid host): build it."""
        changes: dict[str, Any] = {}
        keys: set[str] = set()
        for n, (host, rule) in enumerate(hosts.items()):
            if n % PAUSE_EVERY == PAUSE_EVERY - 1:
                turn()
            if not isinstance(host, str) or len(changes) > COMPACT_AT:
                return None
            key = normalize_host(host)
            if key in keys:
                return None  # names that collide once normalised: `build` reports them
            keys.add(key)
            route = current.route_for(key)
            if route is None or route.rule != rule:
                changes[key] = rule
        if len(keys) - sum(1 for k in changes if current.route_for(k) is None) != current.size:
            for n, key in enumerate(current.routes):
                if n % PAUSE_EVERY == PAUSE_EVERY - 1:
                    turn()
                if key not in keys:
                    changes[key] = None
        return changes if len(changes) <= COMPACT_AT else None

    def install(self, table: RoutingTable, changed: Mapping[str, Any] | None) -> None:
        """Swap `table` in and follow it: backend pools, health checks, counters."""
        old = self.holder.table
        self.holder.swap(table)
        self.highest = max(self.highest, table.version)
        self.store.raise_floor(table.version)
        keys = table.routes.keys() if changed is None else changed.keys()
        self.unused |= self._count_backends(old, table, keys, full=changed is None)
        self.prune_unused()
        if changed is None and (self.health.checkers or self.health_rules) \
                or changed is not None and _has_health(old, table, keys):
            self.health.on_swap(old, table)
        self.forget_removed(old, table, old.routes.keys() | keys if changed is None else keys)
        self.loaded = True
        self.moved.notify_all()
        stats = self.stats
        stats.routing_version = table.version
        stats.config_reloads += 1
        stats.last_reload = time.time()

    def _count_backends(self, old: RoutingTable, new: RoutingTable, keys: Any,
                        full: bool) -> set[str]:
        """Update `backend_uses` for the routes of `keys`; the backends no longer named."""
        if full:
            uses: Counter[str] = Counter()
            self.health_rules = 0
            for n, route in enumerate(new.routes.values()):
                if n % PAUSE_EVERY == PAUSE_EVERY - 1:
                    turn()
                uses.update(route.action.backend_keys())
                self.health_rules += "health" in route.rule
            self.backend_uses = uses
            return set(self.registry.backends) - set(uses)
        gone = set()
        for key in keys:
            before, after = old.route_for(key), new.route_for(key)
            if before is not None:
                for backend in before.action.backend_keys():
                    self.backend_uses[backend] -= 1
                    if self.backend_uses[backend] <= 0:
                        del self.backend_uses[backend]
                        gone.add(backend)
            if after is not None:
                self.backend_uses.update(after.action.backend_keys())
        return {b for b in gone if b not in self.backend_uses}

    def prune_unused(self) -> None:
        """Forget backends no rule names any more once idle (closing their sockets)."""
        backends = self.registry.backends
        for key in list(self.unused):
            backend = backends.get(key)
            if key in self.backend_uses or backend is None:
                self.unused.discard(key)
            elif backend.is_idle:
                backends.pop(key).close_idle()
                self.unused.discard(key)

    def forget_removed(self, old: RoutingTable, new: RoutingTable, keys: Any) -> None:
        """Drop the counters of the deleted hosts among `keys` (the changed ones)
        and of backends a changed rule no longer names, so no scrape reports them
        again."""
        deleted = set()  # (found in the slices: 100,000 hosts' look-up at once took 0.1 s)
        for n, key in enumerate(keys):
            if n % PAUSE_EVERY == PAUSE_EVERY - 1:
                turn()  # every host of a whole table (the new one is served meanwhile)
            route = new.route_for(key)
            prior = old.route_for(key)
            if route is None:
                deleted.add(key)
            elif prior is None or prior.action is not route.action:
                route.stats.keep_backends(set(route.action.backend_keys()))
        self.stats.forget_hosts(deleted)

    def reload(self) -> int:
        """Re-read the store now and apply it; returns the version served."""
        self.apply(self.store.reload())
        return self.holder.table.version

    def catch_up(self, version: int, changes: Mapping[str, Any] | None) -> int:
        """The management process wrote `version` (changing `changes`, or the whole
        table when None): serve it now; returns the version served."""
        if changes is not None:
            self._await_watcher(version - 1, FOLLOW_WAIT if self.store.delivers_changes
                                else 0.0)
            self.apply_change(TableChange(version, version - 1, changes))
        elif self.holder.table.version < version:
            # (bug: a worker told of its balancer's whole-table write before its watcher
            # heard of it read the table, and the watcher read it again at the message)
            self._await_watcher(version, FOLLOW_WAIT if self.store.delivers_changes
                                else 0.0)
            if self.holder.table.version < version:
                self.reload()
        return self.holder.table.version

    def _await_watcher(self, target: int, patience: float) -> None:
        """Until the table served is at `target`, while the store's watcher may deliver
        it: for `patience` seconds (on a store that `delivers_changes`, the versions
        before the management process's write), and while the watcher reads the whole
        table (`Store.whole_load_since`: up to `LOAD_WAIT` from the read's start),
        then `patience` more for the versions after it. Bugs: a worker whose balancer
        wrote right after another balancer's write, before its watcher had applied
        that one, read the whole table (1-2 s at 100,000 hosts) instead of the other
        write's hosts; and one whose watcher was reading the whole table then (after a
        whole-table write) read it a second time, at once or after `FOLLOW_WAIT`."""
        if not self.following:
            return
        deadline = time.monotonic() + patience
        told = False  # the wait is logged
        with self.moved:
            while self.holder.table.version < target and self.store_problem is None:
                now = time.monotonic()
                since = self.store.whole_load_since()
                whole_read = since is not None and now < since + LOAD_WAIT
                if whole_read:
                    deadline = max(deadline, now + patience)
                elif now >= deadline:
                    if told:
                        log.debug("the store's watcher did not deliver version %d in time: "
                                  "reading the whole table", target)
                    return
                if not told:
                    told = True
                    log.debug("version %d, which the store's watcher has not delivered yet "
                              "(this worker serves %d; %s): waiting for it", target,
                              self.holder.table.version,
                              "it reads the whole table" if whole_read else "its messages")
                # while it loads, looked at again: a load that delivers nothing notifies no one
                self.moved.wait(LOAD_POLL if whole_read else deadline - now)

    def served_version(self) -> int:
        """What the store's watcher may skip reading (-1: nothing, read it whole). Bug:
        a worker started from the snapshot while Redis was down never cleared its
        store problem once Redis was back at that version (the watcher skipped it)."""
        return -1 if self.unconfirmed else self.holder.table.version

    def on_store(self, item: TableData | TableChange) -> bool:
        """What the store's watcher delivers: a whole table or a change."""
        if isinstance(item, TableChange):
            return self.apply_change(item)
        return self.apply(item)


def _has_health(old: RoutingTable, new: RoutingTable, keys: Any) -> bool:
    """Whether a rule of `keys`, before or after, has active health checks."""
    for key in keys:
        for table in (old, new):
            route = table.route_for(key)
            if route is not None and "health" in route.rule:
                return True
    return False
