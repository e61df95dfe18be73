"""The store interface: where the routing table lives (SPEC §6).

Invariants:
* Writers validate rules with `balancer.rules` before calling a store; a
  store only persists and versions. Host keys arrive normalised
  (`balancer.rules.normalize_host`).
* Every successful write moves `version` up and returns it: to the store's
  version + 1, or, when the store is behind what this balancer has known
  (`floor`: flushed, restored or deleted), above `floor`. Versions never
  repeat or go back. A one-host write to a store behind `floor` raises
  `StoreLost` (it would turn a lost table into a one-host table); only a
  whole-table `replace` repairs it. A failed write (`StoreUnavailable`,
  `VersionConflict`, `StoreLost`) changes nothing, except `StoreNotReplicated`:
  applied by a Redis master whose replicas did not acknowledge it.
* `load` returns only tables that pass `validate_table` (`key_form`: keys in
  key form); anything else is a
  `CorruptStore` naming where and why, whatever a hand-edited value holds
  (bad JSON or UTF-8, a number of 4,300+ digits, nesting deep enough to
  exhaust the recursion limit: `unreadable_is_corrupt`). A value (health
  check times, `limits.rate`) an earlier version stored below today's floor
  is loaded raised to it, and said in `TableData.raised`
  (`balancer.stores.floors`).
* `watch` is a loop body for its own greenlet (or thread): it delivers the
  first table it reads, then every change, through `on_change`, and never
  raises. An exception no branch of it expects (a bug) is a store problem
  (`last_error`: ``balancer_store_up`` 0, ``store.problem``), logged with its
  traceback once, and the watch goes on after a pause (`balancer.restarts`), reading
  the table whole again; only that read clears it. Bug: one ended the file's
  watcher for good, silently (`store.problem` null, ``balancer_store_up`` 1).
  While the store is unreachable it retries with backoff, keeps the
  last table (no `on_change`) and `is_reachable()` is False. Besides whole
  tables it may deliver a `TableChange` (the hosts one write changed), which
  the consumer applies on top of version `change.version - 1` or, when it
  serves another version, answers by asking for the whole table (`load`).
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from balancer.restarts import Restarts
from balancer.rules import normalize_host, validate_table
from balancer.stores.floors import Raised, raise_rule, raise_to_floors
from balancer.turns import turn

if TYPE_CHECKING:
    from balancer.stores.acme import Acme
    from balancer.stores.certs import Certs
    from balancer.stores.records import Claimed, Records

# Versions are below 2**63 - 1 in every store: Redis counts (INCR) that far. A
# version past it is corrupt. (Bug: a hand-set 10**22 was served, became every
# balancer's floor for versions, and no write, not even a whole-table PUT, could
# ever go back below it; in the routes file too, where it also left Redis out of
# reach and `balancer_routing_version`, a float, unchanged by a write.)
VERSION_LIMIT = 2**63 - 1
PAUSE_EVERY = 500  # hosts checked between two turns of the loop (`balancer.turns.turn`): ~10 ms


@dataclass(frozen=True)
class TableData:
    """One version of the whole table as stored."""

    version: int
    hosts: Mapping[str, Any] = field(default_factory=dict)
    # stored values below a floor, loaded raised (`hosts` holds the values used)
    raised: tuple[Raised, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class HostRule:
    """One host's rule as stored (None: no such host) at the table's `version`."""

    version: int
    rule: Mapping[str, Any] | None


@dataclass(frozen=True)
class TableChange:
    """The hosts one or more consecutive writes changed, up to `version`:
    HOST → rule, or None for a deleted host. `base` is the version it applies on.
    `count`: how many hosts the store holds at `version`, when read with the
    hosts; a table that counts otherwise once changed is not the store's (it
    lost hosts without a version going back: `counts_otherwise`)."""

    version: int
    base: int
    hosts: Mapping[str, Any] = field(default_factory=dict)
    count: int | None = None

    def counts_otherwise(self, size: int) -> bool:
        """Whether a table of `size` hosts with this change is not the store's: read
        it whole. Bug: Redis flushed under a balancer serving version N, then a
        balancer that knew no version wrote hosts one at a time from 1; at N + 1 the
        first balancer applied that host on its lost table and served the mix, at
        the store's version, with no problem reported."""
        return self.count is not None and size != self.count


class StoreError(Exception):
    """Base of store errors."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or refused the write; nothing changed."""


class StoreFull(StoreUnavailable):
    """The write found no room (the disk full, a quota, the file size limit);
    nothing changed."""


class StoreNotReplicated(StoreUnavailable):
    """The master applied the write, but fewer replicas than the store's
    ``replicas=N`` acknowledged it in time (or the wait got no answer): it is
    served, and a failover now may lose it. `where`: the store; `reason`: what
    the replicas did ("the store wants 1 replica to acknowledge every write and
    0 of them did within 600 ms"), for a caller that words its own error."""

    def __init__(self, message: str, where: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.where = where
        self.reason = reason


class VersionConflict(StoreError):
    """An `If-Match` version no longer matches."""

    def __init__(self, current: int) -> None:
        super().__init__(f"the table is at version {current}")
        self.current = current


class StoreLost(StoreError):
    """The store is behind the table this balancer serves (flushed, restored, deleted):
    a one-host write would leave a one-host table, so it is refused."""

    def __init__(self, where: str, current: int, floor: int) -> None:
        super().__init__(
            f"{where} is at version {current} but this balancer has served version {floor}: "
            f"the store lost its table (flushed, restarted empty, restored from an older "
            f"copy or deleted). Run `balancerctl restore` to write the served table back "
            f"(or PUT a whole table to /api/v1/hosts), then retry")
        self.current = current
        self.floor = floor


class CorruptStore(StoreError):
    """The stored table cannot be read (bad JSON, bad shape, invalid rules)."""


class TableChecker:
    """`validate_table` that remembers: a host whose rule text has not changed since
    the previous check is not validated again (a reload of a big table with one
    change costs one rule's validation, not N)."""

    def __init__(self) -> None:
        # (host, rule text) → the problems of its rule and what `raise_rule` raised
        self._known: dict[tuple[str, str], tuple[list[str], tuple[Raised, ...]]] = {}
        self.raised: tuple[Raised, ...] = ()  # what the last table checked held raised

    def check(self, where: str, version: object, hosts: object,
              texts: Mapping[str, str] | None = None, key_form: bool = True) -> TableData:
        """A `TableData` from stored values, or `CorruptStore` naming `where` and why.

        `texts` maps each host to its rule's stored text (the memo key); without
        it the whole table is validated, its keys in key form unless not
        `key_form`."""
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise CorruptStore(f"{where}: version must be an integer >= 0, got {version!r}")
        if version >= VERSION_LIMIT:
            from decimal import Decimal  # (this rare message only: no process holds it)

            # (bug, review: as a float, a version of 309 digits or more raised
            # OverflowError, and the file's watcher died: the store no longer followed)
            raise CorruptStore(f"{where}: version must be below {VERSION_LIMIT}, got "
                               f"{Decimal(version):.3e}")
        raised: tuple[Raised, ...] = ()
        if not isinstance(hosts, Mapping):
            problems = validate_table(hosts)
        elif texts is None:
            hosts, raised = raise_to_floors(hosts)
            problems = validate_table(hosts, key_form)
        else:
            hosts, raised, problems = self._checked(hosts, texts)
        if problems:
            raise CorruptStore(f"{where}: invalid table: {'; '.join(problems)}")
        assert isinstance(hosts, Mapping)
        self.raised = raised
        return TableData(version, dict(hosts), raised)

    def _checked(self, hosts: Mapping[str, Any], texts: Mapping[str, str]
                 ) -> tuple[dict[str, Any], tuple[Raised, ...], list[str]]:
        """The rules used (`raise_rule`), what was raised, and every problem."""
        known: dict[tuple[str, str], tuple[list[str], tuple[Raised, ...]]] = {}
        problems: list[str] = []
        used: dict[str, Any] = {}
        raised: list[Raised] = []
        names: set[str] = set()  # the hosts normalised: two that collide are a problem
        for n, (host, rule) in enumerate(hosts.items()):
            if n % PAUSE_EVERY == PAUSE_EVERY - 1:
                turn()  # a big table: the loop polls (requests, timers) between slices
            if isinstance(host, str):
                names.add(normalize_host(host))
            key = (host, texts[host])
            found = self._known.get(key)
            if found is None:
                rule, lifted = raise_rule(str(host), rule)
                found = (validate_table({host: rule}, key_form=True), lifted)
            elif found[1]:  # (a copy of this load's rule, raised again)
                rule = raise_rule(str(host), rule)[0]
            known[key] = found
            problems += found[0]
            used[host] = rule
            raised += found[1]
        self._known = known  # only the current table is remembered
        if len(names) != len(hosts):  # (normalised in the slices: 0.1 s of 100,000 at once)
            problems = validate_table(used, key_form=True)  # names that collide once normalised
        return used, tuple(raised), problems


@contextlib.contextmanager
def unreadable_is_corrupt(what: str) -> Iterator[None]:
    """Turn what decoding and checking a stored value can raise besides `CorruptStore`
    into `CorruptStore` ("`what` is not valid JSON: why"): `ValueError` (bad JSON or
    UTF-8, an integer of more than 4,300 digits) and `RecursionError` (deep nesting)."""
    try:
        yield
    except RecursionError:
        raise CorruptStore(f"{what} is not valid JSON: nested too deeply") from None
    except ValueError as exc:
        why = str(exc).split("; use sys.", 1)[0]  # the int limit's advice is for programmers
        raise CorruptStore(f"{what} is not valid JSON: {why}") from None


def check_table(where: str, version: object, hosts: object, key_form: bool = True
                ) -> TableData:
    """`TableChecker.check` without memory: validates the whole table."""
    return TableChecker().check(where, version, hosts, key_form=key_form)


class ProblemLog:
    """Logs each distinct store problem once, until the store recovers.

    `quiet` (a proxy worker: the management process reports the same problem
    once for the whole balancer) logs at debug level."""

    def __init__(self, logger: logging.Logger, quiet: bool = False) -> None:
        self.logger = logger
        self.current: str | None = None
        self.quiet = quiet

    def report(self, problem: str) -> None:
        if problem != self.current:
            self.current = problem
            self.logger.log(logging.DEBUG if self.quiet else logging.ERROR, "%s", problem)

    def clear(self, recovered: str) -> None:
        if self.current is not None:
            self.current = None
            self.logger.log(logging.DEBUG if self.quiet else logging.WARNING, "%s", recovered)


def write_version(current: int, floor: int) -> int:
    """The version a write makes: above the store's and above every version known."""
    return max(current, floor) + 1


class Store(ABC):
    """Interface of every store; see the module invariants."""

    kind = "abstract"
    #: the store URL with any password replaced by ``***``
    display_url = ""
    #: the highest version this balancer has known (served, written or read); a
    #: write goes above it, and a one-host write to a store behind it is `StoreLost`
    floor = 0
    #: `watch` delivers every write as the hosts it changed (`TableChange`), in order,
    #: reading only those: a consumer behind a write it made itself can leave the
    #: versions written before it to the watcher instead of reading the whole table
    delivers_changes = False
    #: log store problems at debug level (set in proxy workers: the management
    #: process reports them once for the whole balancer)
    quiet = False
    #: the problem `last_error` reports (set by the store and its watch)
    _problem: str | None = None
    #: the watch's last unexpected failure (`balancer.restarts`), which `reload` leaves
    _failure: str | None = None
    #: problems found so far (`_found`): a reload ends only one found before its read
    _found_count = 0

    def identity(self) -> str:
        """What names this store's table (for the local snapshot of it)."""
        return self.display_url

    def told(self, exc: BaseException) -> str:
        """``store URL: REASON`` with the store named once: a store's own errors
        begin with its URL or path (bug: "store redis://h/99: redis://h/99: Redis
        refused to read: ...")."""
        text = str(exc)
        for own in self.own_names():
            if own and text.startswith(own + ": "):
                text = text[len(own) + 2:]
                break
        return f"store {self.display_url}: {text}"

    def own_names(self) -> tuple[str, ...]:
        """How this store's own error messages may begin."""
        return (self.display_url,)

    def raise_floor(self, version: int) -> None:
        """Note a version known elsewhere (a snapshot, a worker); writes go above it."""
        self.floor = max(self.floor, version)

    @abstractmethod
    def load(self) -> TableData:
        """The whole table now. Raises StoreUnavailable or CorruptStore."""

    def reload(self) -> TableData:
        """`load` for an operator's reload (``POST /api/v1/reload``): the table read
        whole and valid ends the problem it disproves (corrupt, unreadable), as an
        nginx or HAProxy reload reports on the configuration it just read (bug: the
        problem stayed until the watch's next read, its backoff up to 10 s away). A
        watch's unexpected failure (`balancer.restarts`) stays: only the watch's own
        next read says it works again. Neither does a problem found while this read
        ran (by the watch, reading meanwhile: it may have read the damage after this
        read, bug: the damage was ended unseen); the watch's next read judges it."""
        found = self._found_count
        data = self.load()
        if self._problem is not None and self._problem != self._failure \
                and self._found_count == found:
            self._problem = None
        return data

    def _found(self, problem: str) -> str:
        """Report `problem`, found by a read (`last_error`); returns it."""
        self._problem = problem
        self._found_count += 1
        return problem

    def current_shape(self) -> tuple[int, int]:
        """The table's version and number of hosts now, without reading the table where
        the store can (Redis: ``GET`` and ``HLEN`` in one transaction); the file
        store's `load` is cheap while the file is unchanged. A table with another
        number of hosts than the one known at its version was changed without raising
        it (`balancer.stores.snapshot.rewritten`). Raises StoreUnavailable or
        CorruptStore."""
        data = self.load()
        return data.version, len(data.hosts)

    def host_rule(self, host: str) -> HostRule:
        """One host's rule and the table's version, read together, without reading the
        rest of the table where the store can (Redis: ``HGET`` and ``GET`` in one
        transaction, the rule checked as `load` checks it); the file store's `load` is
        cheap while the file is unchanged. What a read-modify-write of one host needs:
        its write, conditional on this version, fails if anything changed since. Raises
        StoreUnavailable or CorruptStore."""
        data = self.load()
        return HostRule(data.version, data.hosts.get(host))

    @abstractmethod
    def replace(self, hosts: Mapping[str, Any], if_version: int | None = None) -> int:
        """Replace the whole table atomically; returns the new version."""

    @abstractmethod
    def put_host(self, host: str, rule: Mapping[str, Any], if_version: int | None = None,
                 claimed: Claimed | None = None) -> int:
        """Set one host's rule; returns the new version. With `claimed` (a deploy's
        write), only while that deploy holds the host's claim, renewed in the same
        atomic step (`balancer.stores.records`); else `HandedOver`, nothing written."""

    @abstractmethod
    def delete_host(self, host: str, if_version: int | None = None) -> int:
        """Remove one host (KeyError if absent); returns the new version."""

    @abstractmethod
    def watch(self, on_change: Callable[[Any], None], stop: Callable[[], bool],
              served: Callable[[], int] | None = None) -> None:
        """Loop until `stop()`: call `on_change` with the first and each new table
        (`TableData`) or change (`TableChange`). `served()` is the version the
        consumer serves already (applied from a direct message): a store that is
        at that version need not be read again."""

    def whole_load_since(self) -> float | None:
        """When (`time.monotonic`) this process's `watch` began the whole read of the
        table it is loading now (read, decode, and delivery: until `on_change`
        returns), or None when it is not reading it whole: a consumer told of a
        version meanwhile waits for that load rather than read the table again."""
        return None

    @abstractmethod
    def is_reachable(self) -> bool:
        """Whether the latest contact with the store succeeded."""

    @abstractmethod
    def records(self) -> Records:
        """The deploy records kept beside the table (`balancer.stores.records`)."""

    @abstractmethod
    def certs(self) -> Certs:
        """The TLS certificates kept beside the table (`balancer.stores.certs`)."""

    @abstractmethod
    def acme(self) -> Acme:
        """ACME account, issuer lock, challenges and state (`balancer.stores.acme`)."""

    def last_error(self) -> str | None:
        """The current problem with the store (unreachable or corrupt), if any."""
        return None

    def raised(self) -> tuple[Raised, ...]:
        """What the last table loaded held below a floor, used raised (module doc)."""
        return ()

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections; a running `watch` ends at its next `stop()` check."""


def watcher_restarts(where: str, logger: logging.Logger, quiet: bool) -> Restarts:
    """A store watcher's `Restarts` (`balancer.restarts`): its problem says the
    last table keeps serving while the store is read again."""
    return Restarts(where, logger, quiet, loop="the store's watcher",
                    then="keeping the last table and reading the store again with backoff")
