"""Heavy hitters: which clients, hosts, paths and backends carry the traffic.

Invariants:
* Memory is bounded whatever the traffic. Clients and paths are counted in
  `SpaceSaving` sketches of at most `CAPACITY` keys (Metwally et al.'s
  Space-Saving: a new key takes the place of the smallest, inheriting its
  count as its error), one per measure per `Slot`; a worker keeps `SLOTS` + 1
  slots of `SLOT_SECONDS`: 100,000 distinct clients cost what 100 do. A key
  with more than 1/`CAPACITY` of an interval's traffic is always there.
* Hosts and backends are bounded by the routing table, and their counters
  already exist (`balancer.stats`): `rotate` records each interval's
  heaviest deltas of them (exact), so the hot path does nothing for them.
  It visits only the hosts a request began on in the interval (`Stats.dirty`,
  with the backends they name), never the whole table: each host and
  backend keeps its totals at the interval's start (`seen`).
* The hot path is `TopTalkers.note`, once per finished request: a dict
  lookup and a native increment per measure for the client and the path, and
  one dict lookup for the path's key (cached per host for `PATH_CACHE`
  request targets of at most `PATH_CACHE_TARGET` bytes: 64 KiB per host).
  A keep-alive connection remembers where its last request was counted
  (`Tally`: the interval, the client and path keys and their entries), so a
  next request with the same keys (a client's, on its connection, to the
  same target: the common case) only increments those entries, no lookup.
  An entry is taken out of its sketch only by `replace`, which marks it
  `gone`: a tally never counts into a key's old entry, and the counts are
  exactly those of the lookups.
  Errors and limited requests touch their sketches only when they happen.
  Nothing reads a clock: the worker's `rotate` starts the next interval.
* Sketch counts are estimates from above: `count - error` is a lower bound.
  `export` sums the intervals a window covers; the management process sums
  the workers'.
* On an internal (trusted) listener the client is the address the front
  proxy appended to X-Forwarded-For (its last entry), else the peer; either is
  counted by its key, as the limits hold it (`balancer.clients`: an IPv6
  address's /64).
"""

from __future__ import annotations

import heapq
import socket
import time
from typing import Any, Final

from balancer.clients import V4_MAPPED, client_key
from balancer.connection import Exchange
from balancer.http11 import mark_value
from balancer.top_names import MEASURES

CAPACITY: Final = 64        # keys per sketch, and hosts or backends kept per interval
SLOT_SECONDS: Final = 10.0  # one interval
SLOTS: Final = 30           # intervals kept before the current one: windows up to 300 s
PATH_PREFIX: Final = 48     # bytes of the path's first segment kept in a path key
PATH_CACHE: Final = 256     # request targets whose path key a host remembers
PATH_CACHE_TARGET: Final = 256  # bytes of the longest target remembered (bug: any
# length, up to limits.max_request_line: 2 MB per host, never freed, for 256 long ones)
MAX_CLIENT: Final = 64      # bytes of an X-Forwarded-For entry taken as a client key
NOTHING: Final = (0, 0, 0, 0)  # the counters of a host or backend not seen before
SLASH: Final = 47  # b"/"
QUERY: Final = 63  # b"?"


class Entry:
    """One key's counter in a sketch (native ints: counting allocates nothing)."""

    def __init__(self, count: int, error: int) -> None:
        self.count = count
        self.error = error  # over-estimate of the count (inherited from the key replaced)
        self.gone = False  # taken out of its sketch (`replace`): no `Tally` counts into it


class SpaceSaving:
    """The heaviest keys of one measure, in `capacity` counters."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: dict[str, Entry] = {}
        # the smallest keys with their counts as last sorted, smallest last
        self.victims: list[tuple[str, int]] = []

    def add(self, key: str, weight: int) -> Entry:
        """Count `weight` more for `key`; its entry (`key`'s until `Entry.gone`)."""
        entry = self.entries.get(key)
        if entry is not None:
            entry.count += weight
            return entry
        if len(self.entries) < self.capacity:
            entry = self.entries[key] = Entry(weight, 0)
            return entry
        return self.replace(key, weight)

    def replace(self, key: str, weight: int) -> Entry:
        """`key` takes the place of the smallest key (amortised: sorted once per
        capacity/4 replacements; a victim counted since is skipped)."""
        entries = self.entries
        while True:
            victims = self.victims
            if not victims:
                self.refill()
                continue
            try:
                victim, recorded = victims.pop()
            except IndexError:  # taken meanwhile by another thread (the threaded baseline)
                continue
            entry = entries.get(victim)
            if entry is not None and entry.count == recorded:
                break
        entries.pop(victim, None)
        entry.gone = True
        added = entries[key] = Entry(recorded + weight, recorded)
        return added

    def refill(self) -> None:
        ordered = sorted(self.entries.items(), key=_count)[:max(1, self.capacity // 4)]
        self.victims = [(key, entry.count) for key, entry in reversed(ordered)]

    def counts(self) -> dict[str, list[int]]:
        """KEY → [count, error]."""
        return {key: [e.count, e.error] for key, e in self.entries.items()}

    def __len__(self) -> int:
        return len(self.entries)


def _count(item: tuple[str, Entry]) -> int:
    return item[1].count


def _more(entry: Entry | None, sketch: SpaceSaving, key: str, weight: int) -> Entry:
    """Count `weight` more for `key` into `entry`, its entry in `sketch` when a
    `Tally` took it, unless it is gone since (then looked up again)."""
    if entry is None or entry.gone:
        return sketch.add(key, weight)
    entry.count += weight
    return entry


class Slot:
    """One interval: the client and path sketches of each measure, and the
    heaviest host and backend deltas (filled when the interval ends)."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.requests = (SpaceSaving(CAPACITY), SpaceSaving(CAPACITY))  # client, path
        self.bytes = (SpaceSaving(CAPACITY), SpaceSaving(CAPACITY))
        self.errors = (SpaceSaving(CAPACITY), SpaceSaving(CAPACITY))
        self.limited = (SpaceSaving(CAPACITY), SpaceSaving(CAPACITY))
        self.exact: dict[str, dict[str, int]] = {}  # "measure group" → key → count

    def sketch(self, measure: str, group: str) -> SpaceSaving:
        pair = (self.requests if measure == "requests" else self.bytes if measure == "bytes"
                else self.errors if measure == "errors" else self.limited)
        return pair[0] if group == "client" else pair[1]

    def entries(self) -> int:
        return sum(len(s) for pair in (self.requests, self.bytes, self.errors, self.limited)
                   for s in pair) + sum(len(d) for d in self.exact.values())


class Tally:
    """Where a keep-alive connection's last request was counted (`TopTalkers.note`):
    the interval (`TopTalkers.rotations` then), its client and path keys, and
    their entries in that interval's requests and bytes sketches (None: not
    taken). It holds no interval, cache or big target: an idle connection
    pins none of them."""

    def __init__(self, rotation: int) -> None:
        self.rotation = rotation
        self.client = ""
        self.host = ""  # the path key's host and target (`is` compared; at most
        self.target = b""  # PATH_CACHE_TARGET bytes, else b"": never the same)
        self.path = ""
        self.client_requests: Entry | None = None
        self.client_bytes: Entry | None = None
        self.path_requests: Entry | None = None
        self.path_bytes: Entry | None = None


class TopTalkers:
    """One worker's heavy hitters over the last `SLOTS` intervals."""

    def __init__(self, now: float = -1.0) -> None:
        self.current = Slot(now if now >= 0 else time.monotonic())
        self.slots: list[Slot] = [self.current]  # oldest first
        self.rotations = 0  # intervals ended (a `Tally` of an earlier one is stale)

    def note(self, ex: Exchange, paths: dict[bytes, str]) -> None:
        """Count one finished request (hot path); `paths` is its host's path-key cache."""
        slot = self.current
        conn = ex.conn
        tally = conn.tally
        if tally is None or tally.rotation != self.rotations:
            if not ex.keep_alive:  # the connection's last request: nothing to remember
                self.count(slot, ex, paths)
                return
            tally = conn.tally = Tally(self.rotations)
        client = client_of(ex)
        target = ex.head.target
        size = ex.sent + ex.received
        requests, sizes = slot.requests, slot.bytes
        if client != tally.client:
            tally.client = client
            tally.client_requests = requests[0].add(client, 1)
            tally.client_bytes = sizes[0].add(client, size) if size else None
        else:
            tally.client_requests = _more(tally.client_requests, requests[0], client, 1)
            if size:
                tally.client_bytes = _more(tally.client_bytes, sizes[0], client, size)
        host = ex.route.key
        if target is not tally.target or host != tally.host:
            path = self.path(ex, paths, target)
            tally.host, tally.path = host, path
            tally.target = target if len(target) <= PATH_CACHE_TARGET else b""
            tally.path_requests = requests[1].add(path, 1)
            tally.path_bytes = sizes[1].add(path, size) if size else None
        else:
            path = tally.path
            tally.path_requests = _more(tally.path_requests, requests[1], path, 1)
            if size:
                tally.path_bytes = _more(tally.path_bytes, sizes[1], path, size)
        if ex.status >= 400:
            errors = slot.errors
            errors[0].add(client, 1)
            errors[1].add(path, 1)

    def count(self, slot: Slot, ex: Exchange, paths: dict[bytes, str]) -> None:
        """`note` without a tally: each key looked up in each sketch."""
        client = client_of(ex)
        path = self.path(ex, paths, ex.head.target)
        requests = slot.requests
        requests[0].add(client, 1)
        requests[1].add(path, 1)
        size = ex.sent + ex.received
        if size:
            sizes = slot.bytes
            sizes[0].add(client, size)
            sizes[1].add(path, size)
        if ex.status >= 400:
            errors = slot.errors
            errors[0].add(client, 1)
            errors[1].add(path, 1)

    def path(self, ex: Exchange, paths: dict[bytes, str], target: bytes) -> str:
        """The path key of `ex`'s request `target`, from its host's cache `paths`."""
        path = paths.get(target)
        if path is None:
            path = path_key(ex.route.key, target)
            if len(paths) < PATH_CACHE and len(target) <= PATH_CACHE_TARGET:
                paths[target] = path
        return path

    def note_limited(self, ex: Exchange, client: str) -> None:
        """Count a request a limit refused (`note` counts it as a 429 as well)."""
        limited = self.current.limited
        limited[0].add(client, 1)
        limited[1].add(path_key(ex.route.key, ex.head.target), 1)

    def rotate(self, now: float, stats: Any) -> None:
        """End the current interval if it is `SLOT_SECONDS` old: record its host and
        backend deltas (`stats`: the worker's `balancer.stats.Stats`, whose dirty
        hosts are the only ones visited) and start the next one."""
        if now - self.current.start < SLOT_SECONDS:
            return
        self.current.exact = self.deltas(stats.dirty, True)
        stats.settle()
        self.current = Slot(now)
        self.rotations += 1
        self.slots.append(self.current)
        if len(self.slots) > SLOTS + 1:
            del self.slots[0]

    def deltas(self, dirty: dict[str, Any], keep: bool) -> dict[str, dict[str, int]]:
        """The heaviest hosts and backends since the interval began, per measure,
        from the hosts a request began on (`dirty`: key → HostStats; `keep`: the
        interval ends, the counters now are the next one's start)."""
        grown = _grown(dirty, keep)
        out: dict[str, dict[str, int]] = {}
        for n, measure in enumerate(MEASURES):
            for group in ("host", "backend"):
                heaviest = heapq.nlargest(CAPACITY, ((v[n], k) for k, v in grown[group].items()
                                                     if v[n] > 0))
                out[f"{measure} {group}"] = {k: v for v, k in heaviest}
        return out

    def export(self, measure: str, group: str, window: float, now: float,
               stats: Any) -> dict[str, list[int]]:
        """KEY → [count, error] summed over the intervals that overlap the last
        `window` seconds (the current one included)."""
        out: dict[str, list[int]] = {}
        exact = group in ("host", "backend")
        for slot in self.slots:
            if slot.start + SLOT_SECONDS <= now - window:
                continue
            if exact:
                exact_counts = (slot.exact if slot is not self.current
                                else self.deltas(stats.dirty, False)).get(f"{measure} {group}", {})
                counts = {key: [n, 0] for key, n in exact_counts.items()}
            else:
                counts = slot.sketch(measure, group).counts()
            for key, (count, error) in counts.items():
                entry = out.setdefault(key, [0, 0])
                entry[0] += count
                entry[1] += error
        return out

    def entries(self) -> int:
        """Keys held in every interval (bounded: see the module doc)."""
        return sum(slot.entries() for slot in self.slots)


def _grown(dirty: dict[str, Any], keep: bool) -> dict[str, dict[str, tuple[int, ...]]]:
    """"host" / "backend" → KEY or ADDR → growth of (requests, bytes, errors,
    limited) since `seen`, over the `dirty` hosts and their backends (a backend
    several hosts name sums theirs); `keep`: `seen` becomes now."""
    hosts: dict[str, tuple[int, ...]] = {}
    backends: dict[str, tuple[int, ...]] = {}
    for key, h in list(dirty.items()):
        errors = sum(n for code, n in h.codes.items() if code >= 400)
        now = (h.completed_requests, h.bytes_received + h.bytes_sent, errors, h.limited)
        hosts[key] = _minus(now, h.seen)
        if keep:
            h.seen = now
        for address, b in h.backends.items():
            mine = (b.finished(), b.bytes, b.failures, 0)
            grown = _minus(mine, b.seen)
            if keep:
                b.seen = mine
            seen = backends.get(address)
            backends[address] = grown if seen is None else _plus(seen, grown)
    return {"host": hosts, "backend": backends}


def _minus(now: tuple[int, ...], then: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x - y for x, y in zip(now, then, strict=True))


def _plus(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def client_of(ex: Exchange) -> str:
    """The client a request is counted (and limited) by: the key
    (`balancer.clients.client_key`: an IPv6 address's /64) of its peer, or on
    a trusted listener of the last X-Forwarded-For entry (what the front proxy saw)."""
    conn = ex.conn
    if not conn.ctx.trusted:
        return conn.client_key
    forwarded = forwarded_client(ex)
    return client_key(forwarded) if forwarded else conn.client_key


def client_address(ex: Exchange) -> str:
    """The address of a request's client, as `client_of` finds it, not keyed."""
    conn = ex.conn
    forwarded = forwarded_client(ex) if conn.ctx.trusted else ""
    return forwarded or conn.client_ip


def forwarded_client(ex: Exchange) -> str:
    """The address of the last X-Forwarded-For entry of the request ("" for none,
    one longer than `MAX_CLIENT` bytes, or one that is no IP address: `address_only`)."""
    found = b""
    head = ex.head
    for mark in head.marks:
        if mark[0] == b"x-forwarded-for":
            found = mark_value(head, mark)
    last = found.rpartition(b",")[2].strip()
    return address_only(last.decode("latin-1")) if len(last) <= MAX_CLIENT else ""


def address_only(entry: str) -> str:
    """The IP address of an X-Forwarded-For entry, without the port a proxy may
    write after it: ``1.2.3.4:5678`` is ``1.2.3.4``, ``[::1]:80`` and ``[::1]``
    are ``::1`` (bug: `ip_hash` hashed the entry as written, so one client's ports
    spread it over the backends); "" for an entry that is no IP address
    (``unknown``, ``:80``, ``[]``, a zone id), which then names no client: the
    peer's address counts, as with nginx's realip module and HAProxy's
    ``hdr_ip`` (bug: ``:80`` named none and ``unknown`` or ``a:80`` each one
    client, ``unknown`` and ``a``). Strict: an IPv4 or IPv6 address, ``[IPv6]``,
    or either with ``:PORT`` (1 to 65535 in decimal digits, as nginx's realip),
    nothing else (bug: ``[::1]junk`` was ``::1`` and ``1.2.3.4:abc`` ``1.2.3.4``).
    An IPv6 address is written as the socket writes a peer's (``2001:DB8:0::1`` is
    ``2001:db8::1``), an IPv4-mapped one (``::ffff:1.2.3.4``) as its IPv4 address,
    as `client_key` keys it."""
    family = socket.AF_INET
    if ":" in entry:
        if entry[0] == "[":
            close = entry.find("]")
            if close < 0 or (close + 1 < len(entry)
                             and (entry[close + 1] != ":" or not _is_port(entry[close + 2:]))):
                return ""
            entry, family = entry[1:close], socket.AF_INET6
        elif entry.count(":") == 1:  # an IPv4 address and a port
            colon = entry.find(":")
            if not _is_port(entry[colon + 1:]):
                return ""
            entry = entry[:colon]
        else:  # an IPv6 address without brackets: its colons are no port
            family = socket.AF_INET6
    try:
        packed = socket.inet_pton(family, entry)
    except (OSError, ValueError):  # (ValueError: a NUL byte)
        return ""
    if family == socket.AF_INET:  # (inet_pton takes the dotted quad alone: as written)
        return entry
    if packed[:12] == V4_MAPPED:  # one client however written (bug: each spelling was
        return socket.inet_ntop(socket.AF_INET, packed[12:])  # `ip_hash`ed apart)
    return socket.inet_ntop(socket.AF_INET6, packed)


def _is_port(text: str) -> bool:
    """Whether `text` is a port: 1 to 65535 in ASCII decimal digits (``str.isdigit``
    alone takes ``²``, a Latin-1 byte of a field)."""
    return 0 < len(text) <= 5 and text.isascii() and text.isdigit() and 0 < int(text) < 65536


def path_key(host: str, target: bytes) -> str:
    """``HOST/SEGMENT``: the host and the first segment of the request path
    (at most `PATH_PREFIX` bytes, no query)."""
    end = min(len(target), PATH_PREFIX)
    for i in range(1, end):  # to the first "/" or "?" (a native loop: find is a method call)
        byte = target[i]
        if byte in (SLASH, QUERY):
            end = i
            break
    if not target or target[0] != SLASH:
        return host + " " + target[:end].decode("latin-1")  # "*" or an absolute form
    return host + target[:end].decode("latin-1")


def describe(top: Any) -> dict[str, int]:
    """How much the sketches hold (for the control socket: memory stays flat)."""
    per_slot = len(MEASURES) * (2 * CAPACITY + 2 * CAPACITY)
    return {"entries": top.entries(), "slots": len(top.slots), "bound": (SLOTS + 1) * per_slot}
