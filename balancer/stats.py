"""Plain counters the hot path increments; snapshots are the scrape's work.

Invariants:
* The hot path only does attribute and dict increments on objects it already
  holds (`HostStats`, `BackendStats`); nothing here allocates per request
  except the first use of a new status code. A duration histogram's list
  item (a boxed int: past 256, a new object per increment) is added to only
  when a duration falls in another bucket than the one before (`Timed`).
* `snapshot()` returns plain JSON-able data; `merge_snapshots` sums the
  snapshots of several workers (see docs/ARCHITECTURE.md for the shape).
  A histogram is its cumulative counts, one list of ints; the bounds are
  named once per snapshot (``"bounds"``: BUCKETS). Bug: each count went with
  its bound (``[[0.005, n], ...]``), 15 lists a histogram: a snapshot of 20,000
  hosts was 340,000 objects the management process's garbage collector walks
  (17 a host, now 3), and a full collection with 4 snapshots held took 0.9 s.
* Only what the routing table serves is reported: the worker forgets the
  counters of a deleted host (`forget_hosts`) and of a backend its rule no
  longer names (`HostStats.keep_backends`) when the table is swapped.
* A backend's merged state is the worst of the workers' (down > probing > up).
* Nothing on a timer walks every host: a host is `mark`ed once per
  heavy-hitter interval, when a request to it begins (one flag read per
  request), into `Stats.dirty`; `TopTalkers.rotate` visits those only and
  `settle` moves them to `Stats.active` (every host that has seen a request,
  or whose backends an active check watches: what `/metrics` shows). A host
  with a request still open stays dirty, so every counter change happens
  while its host is dirty.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable
from typing import Any, Final

from balancer.sketch import NOTHING, TopTalkers

BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# BUCKETS again, iterated by `bucket_of` without boxing (mypyc boxes a Final tuple of
# floats anew on each use; it cannot be built from BUCKETS at import when compiled)
BOUNDS: Final[list[float]] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                              60.0]
OUTCOMES: Final = ("success", "connect_error", "tls_error", "timeout", "error")
FAILURES: Final = OUTCOMES[1:]  # `BackendStats.outcomes`' keys ("success" is `successes`)
TLS_OUTCOMES: Final = ("ok", "no_certificate", "protocol_error", "timeout")
STATE_RANK: Final = {"up": 0, "probing": 1, "down": 2}  # merging: the worst state wins


class Timed:
    """A histogram of durations over BUCKETS, and their sum. The durations of a
    run in one bucket (most are: the buckets are wide) are counted in a native
    int, `run`, and added to the list when one falls in another bucket: a
    list item is a boxed int, allocated anew at each increment past 256
    (~250 instructions a request)."""

    __slots__ = ("hist", "bucket", "run", "duration_sum")

    def __init__(self) -> None:
        self.hist = [0] * (len(BUCKETS) + 1)  # but the `run` of `bucket`
        self.bucket = 0
        self.run = 0
        self.duration_sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one duration (hot path)."""
        index = bucket_of(seconds)
        if index == self.bucket:
            self.run += 1
        else:
            hist = self.hist
            hist[self.bucket] += self.run
            self.bucket, self.run = index, 1
        self.duration_sum += seconds

    def durations(self) -> dict[str, Any]:
        """The histogram's snapshot (`histogram`)."""
        hist = list(self.hist)
        hist[self.bucket] += self.run
        return histogram(hist, self.duration_sum)


class BackendStats(Timed):
    """Counters of one backend address as seen by one host."""

    __slots__ = ("address", "in_flight", "tunnels", "failures", "successes", "outcomes",
                 "source", "bytes", "seen")

    def __init__(self, address: str) -> None:
        super().__init__()  # time to the response head, successes only
        self.address = address
        self.in_flight = 0
        self.tunnels = 0  # of in_flight: requests asking to upgrade (WebSocket tunnels)
        self.failures = 0
        # the outcome "success", a native int (a dict item costs ~500 instructions)
        self.successes = 0
        self.outcomes = dict.fromkeys(FAILURES, 0)  # the other outcomes
        self.source: Any = None  # the pool's Backend: its `health_state()` is the truth
        self.bytes = 0  # received and sent by the requests it answered (heavy hitters)
        self.seen: tuple[int, ...] = NOTHING  # the heavy hitters' totals at the interval's start

    def finished(self) -> int:
        """Requests it answered or failed (every outcome)."""
        return self.successes + sum(self.outcomes.values())

    def snapshot(self) -> dict[str, Any]:
        state = self.source.health_state() if self.source is not None else "up"
        snap = {"state": state, "in_flight": self.in_flight, "tunnels": self.tunnels,
                "failures": self.failures,
                "outcomes": {"success": self.successes, **self.outcomes},
                "duration": self.durations()}
        return with_problem(snap, self.problem())

    def problem(self) -> str:
        """The backend's problem (`Backend.health_problem`: why it is not up, or its
        health check's own failure), or ""."""
        return self.source.health_problem() if self.source is not None else ""


def with_problem(snap: dict[str, Any], problem: str) -> dict[str, Any]:
    """`snap` with ``"problem"`` when there is one."""
    if problem:
        snap["problem"] = problem
    return snap


def bucket_of(seconds: float) -> int:
    """The histogram bucket of a duration: the first bound it does not exceed
    (`bisect_left` over BUCKETS, as a native loop: most requests stop at the
    first bound, and the bisect module's call cost ~2,000 instructions)."""
    index = 0
    for bound in BOUNDS:
        if seconds <= bound:
            return index
        index += 1
    return index


def histogram(hist: list[int], total: float) -> dict[str, Any]:
    """A histogram's snapshot: ``counts``, the cumulative count at each bound of
    BUCKETS and at +Inf (the bounds are the snapshot's, once: `Stats.snapshot`),
    sum, count."""
    cumulative, counts = 0, []
    for n in hist:
        cumulative += n
        counts.append(cumulative)
    return {"counts": counts, "sum": total, "count": cumulative}


class HostStats(Timed):
    """Counters of one routing-table key."""

    __slots__ = ("open_requests", "completed_requests", "bytes_received", "bytes_sent",
                 "ok", "codes", "spinning", "backends", "causes",
                 "last_failure", "limited", "paths", "marked", "seen")

    def __init__(self) -> None:
        super().__init__()  # requests' durations
        self.open_requests = 0
        self.completed_requests = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.ok = 0  # responses of status 200: a native int (a dict item costs ~400 instructions)
        self.codes: dict[int, int] = {}  # responses of any other status
        self.spinning = 0
        self.backends: dict[str, BackendStats] = {}
        self.causes: dict[str, int] = {}  # 502/504 by cause since the last failure report
        self.last_failure: Any = None  # the last of them (an exception, formatted only to log)
        self.limited = 0  # requests a rule's limits refused (429)
        self.paths: dict[bytes, str] = {}  # request target → heavy-hitter path key (bounded)
        self.marked = False  # in `Stats.dirty`: a request began in this heavy-hitter interval
        self.seen: tuple[int, ...] = NOTHING  # the heavy hitters' totals at the interval's start

    def finish(self, status: int, received: int, sent: int, seconds: float) -> None:
        """Count one completed request (hot path)."""
        self.open_requests -= 1
        self.completed_requests += 1
        self.bytes_received += received
        self.bytes_sent += sent
        if status == 200:
            self.ok += 1
        else:
            codes = self.codes
            codes[status] = codes.get(status, 0) + 1
        self.observe(seconds)

    def statuses(self) -> dict[int, int]:
        """Responses by status code."""
        return {200: self.ok, **self.codes} if self.ok else dict(self.codes)

    def backend(self, address: str) -> BackendStats:
        stats = self.backends.get(address)
        if stats is None:
            stats = self.backends[address] = BackendStats(address)
        return stats

    def keep_backends(self, addresses: set[str]) -> None:
        """Forget the counters of every backend not in `addresses` (removed from the rule)."""
        for address in [a for a in self.backends if a not in addresses]:
            del self.backends[address]

    def is_idle(self) -> bool:
        """Whether no request ever reached this host (its counters are all zero)."""
        return not (self.completed_requests or self.open_requests or self.spinning
                    or self.limited)

    def brief(self) -> dict[str, Any]:
        """An idle host's snapshot: its backends and their health states only
        (every counter left out reads as zero, as in `merge_snapshots`)."""
        backends: dict[str, Any] = {}
        for address, b in self.backends.items():
            state = b.source.health_state() if b.source is not None else "up"
            backends[address] = with_problem({} if state == "up" else {"state": state},
                                             b.problem())
        return {"backends": backends}

    def snapshot(self) -> dict[str, Any]:
        responses = {f"{c}xx": 0 for c in range(1, 6)}
        codes = self.statuses()
        for code, n in codes.items():
            responses[f"{code // 100}xx"] = responses.get(f"{code // 100}xx", 0) + n
        return {
            "open_requests": self.open_requests,
            "completed_requests": self.completed_requests,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "responses": responses,
            "codes": {str(c): n for c, n in codes.items()},
            "duration": self.durations(),
            "spinning": self.spinning,
            "limited": self.limited,
            "backends": {a: b.snapshot() for a, b in self.backends.items()},
        }


class Stats:
    """Every counter of one worker process."""

    def __init__(self) -> None:
        self.hosts: dict[str, HostStats] = {}
        self.open_connections = 0
        # of those, closing connections reading what their client still sends
        # (balancer.lingering)
        self.lingering_connections = 0
        self.routing_version = 0
        self.config_reloads = 0
        self.store_up = 1
        self.last_reload = 0.0
        self.failing: dict[str, HostStats] = {}  # hosts with a 502/504 since the last report
        self.top = TopTalkers()  # heavy hitters (balancer.sketch); rotated by the worker
        self.tls_handshakes = dict.fromkeys(TLS_OUTCOMES, 0)  # by outcome (balancer.tls)
        self.order: list[str] | None = None  # `hosts`' keys sorted, until one comes or goes
        self.dirty: dict[str, HostStats] = {}  # hosts a request began on this interval
        self.active: dict[str, HostStats] = {}  # hosts that ever had one (or are watched)

    def note_failure(self, key: str, host: HostStats, cause: str, error: Any) -> None:
        """Count a 502/504 by its cause for the once-a-second report (no formatting)."""
        causes = host.causes
        causes[cause] = causes.get(cause, 0) + 1
        host.last_failure = error
        self.failing[key] = host

    def host(self, key: str) -> HostStats:
        """The counters of a table key (created on first use, at compile time)."""
        stats = self.hosts.get(key)
        if stats is None:
            stats = self.hosts[key] = HostStats()
            self.order = None
        return stats

    def mark(self, key: str, host: HostStats) -> None:
        """Note that a request to `key` began (the first of this heavy-hitter
        interval: the caller checked `host.marked`). A forgotten host (a request
        that began before its deletion) is not noted again."""
        if self.hosts.get(key) is host:
            host.marked = True
            self.dirty[key] = host

    def watch(self, key: str) -> None:
        """Count `key` as active before any request (its backends' health is
        checked actively: their state changes without traffic)."""
        self.active[key] = self.host(key)

    def settle(self) -> dict[str, HostStats]:
        """End the interval's dirty set (`TopTalkers.rotate`): its hosts become
        active; those with a request still open stay dirty. Returns the ended set."""
        ended = self.dirty
        self.active.update(ended)
        self.dirty = {k: h for k, h in ended.items() if h.open_requests > 0}
        for host in ended.values():
            host.marked = host.open_requests > 0
        return ended

    def forget_hosts(self, keys: set[str]) -> None:
        """Forget the counters of deleted host keys (in-flight requests of theirs
        finish on the forgotten objects)."""
        for key in keys:
            if self.hosts.pop(key, None) is not None:
                self.order = None
            self.dirty.pop(key, None)
            self.active.pop(key, None)

    def snapshot(self, keys: Iterable[str] | None = None) -> dict[str, Any]:
        """Every counter; with `keys`, only those hosts' (the others are left out),
        idle ones in `HostStats.brief` (the management process reads zeros there)."""
        hosts = self.hosts
        if keys is None:
            chosen = {k: h.snapshot() for k, h in hosts.items()}
        else:
            chosen = {}
            for k in keys:
                h = hosts.get(k)
                if h is not None:
                    chosen[k] = h.brief() if h.is_idle() else h.snapshot()
        return {
            "open_connections": self.open_connections,
            "lingering_connections": self.lingering_connections,
            "routing_version": self.routing_version,
            "config_reloads": self.config_reloads,
            "store_up": self.store_up,
            "last_reload": self.last_reload,
            "tls_handshakes": dict(self.tls_handshakes),
            "bounds": list(BUCKETS),  # every histogram's (`histogram`), once
            "hosts": chosen,
        }

    def page(self, after: str, limit: int) -> tuple[list[str], bool]:
        """The first `limit` host keys above `after` in sorted order, and whether
        more follow. The order is sorted once per change of the keys (at a table
        swap), so a page costs its own hosts, not the table's."""
        order = self.order
        if order is None:
            order = self.order = sorted(self.hosts)
        start = bisect_right(order, after) if after else 0
        return order[start:start + limit], start + limit < len(order)

    def active_keys(self) -> list[str]:
        """The hosts that have seen a request (the others' counters are all zero),
        and the watched ones: costs those hosts, not the table."""
        active = self.active
        active.update(self.dirty)
        return list(active)

    def totals(self) -> tuple[int, int]:
        """Open and completed requests over every host."""
        open_requests = completed = 0
        self.active_keys()  # idle hosts count zero: the active ones are enough
        for h in self.active.values():
            open_requests += h.open_requests
            completed += h.completed_requests
        return open_requests, completed


_MAX_KEYS: Final = {"routing_version", "last_reload"}
_MIN_KEYS: Final = {"store_up"}
MERGE_SLICE: Final = 200  # hosts merged between two calls of `merge_snapshots`' pause
PROBLEMS_SHOWN: Final = 3  # distinct problems of a backend `shown_problem` words


def merge_snapshots(snapshots: list[dict[str, Any]], in_place: bool = False,
                    pause: Callable[[], None] | None = None) -> dict[str, Any]:
    """Sum worker snapshots (max for versions, min for `store_up`). `in_place`:
    the first snapshot is the caller's to give (just decoded): the others are
    summed into it instead of into a copy. `pause`: called between two slices
    of `MERGE_SLICE` hosts (the management process answers meanwhile; bug: a
    worker's held counters of 20,000 hosts were merged in one go, 1-3.5 s)."""
    if not snapshots:
        return Stats().snapshot()
    merged: dict[str, Any] = snapshots[0] if in_place else {}
    for snap in snapshots[1:] if in_place else snapshots:
        hosts = snap.get("hosts")
        if pause is None or not isinstance(hosts, dict):
            _merge_into(merged, snap)
            continue
        _merge_into(merged, {k: v for k, v in snap.items() if k != "hosts"})
        _merge_hosts(merged.setdefault("hosts", {}), hosts, pause)
    return merged


def _merge_hosts(into: dict[str, Any], hosts: dict[str, Any], pause: Callable[[], None]) -> None:
    for n, (key, host) in enumerate(list(hosts.items())):
        if n and n % MERGE_SLICE == 0:
            pause()
        mine = into.get(key)
        if mine is None:
            into[key] = _copy(host)
        elif isinstance(host, dict):
            _merge_into(mine, host)


def _merge_into(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if key not in into:
            into[key] = _copy(value)
        elif isinstance(value, dict):
            _merge_into(into[key], value)
        elif key == "counts":
            into[key] = [n + m for n, m in zip(into[key], value, strict=True)]
        elif key in _MAX_KEYS:
            into[key] = max(into[key], value)
        elif key in _MIN_KEYS:
            into[key] = min(into[key], value)
        elif key == "state":
            if STATE_RANK.get(value, 2) > STATE_RANK.get(into[key], 2):
                into[key] = value
        elif key == "problem":
            into[key] = _problems(into[key], value)
        elif isinstance(value, int | float):
            into[key] = into[key] + value


def _problems(mine: Any, other: Any) -> list[str]:
    """The distinct problems workers say of one backend, in the order met (a
    worker's is a text; merged ones a list: `shown_problem` words them). Bug:
    the first worker's hid the others' (a backend a worker finds down for
    another reason)."""
    merged = list(mine) if isinstance(mine, list) else [mine]
    for problem in other if isinstance(other, list) else [other]:
        if problem not in merged:
            merged.append(problem)
    return merged


def shown_problem(problem: str | list[str]) -> str:
    """A merged ``problem`` (`_problems`) as one text: the first `PROBLEMS_SHOWN`
    distinct problems and how many more."""
    if isinstance(problem, str):
        return problem
    more = len(problem) - PROBLEMS_SHOWN
    return " | ".join(problem[:PROBLEMS_SHOWN]) + (f" (and {more} more)" if more > 0 else "")


def latest_snapshot(one: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Two snapshots of one worker's counters (`control.counters_only`), taken at
    different times, as one: each counter at the higher of its values, which is the
    later one's (a worker's counters only grow), what only one has kept."""
    latest = _copy(one)
    _max_into(latest, other)
    return latest


def _max_into(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        mine = into.get(key)
        if mine is None:
            into[key] = _copy(value)
        elif isinstance(value, dict) and isinstance(mine, dict):
            _max_into(mine, value)
        elif key == "counts":
            into[key] = [max(n, m) for n, m in zip(mine, value, strict=True)]
        elif isinstance(value, int | float) and isinstance(mine, int | float):
            into[key] = max(mine, value)


def only_known(snapshot: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """`snapshot` (retired workers' counters) cut to the hosts and backends that
    `live` (the merged live workers) reports: deleted ones are not shown again.
    Costs the hosts of `live` (a page of them, or the active ones)."""
    retired = snapshot.get("hosts", {})
    hosts: dict[str, Any] = {}
    for key, known in live.get("hosts", {}).items():
        host = retired.get(key)
        if host is not None:
            backends = known.get("backends", {})
            hosts[key] = {**host, "backends": {a: b for a, b in host.get("backends", {}).items()
                                               if a in backends}}
    return {**snapshot, "hosts": hosts}


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
