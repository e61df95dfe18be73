"""Per-rule limits (`"limits"`), held for the whole balancer, not per worker.

A rule's `rate` (requests per second) and `burst` are a token bucket kept as
GCRA (one "theoretical arrival time" per key), `per` client or host; its
`max_connections_per_client` caps a client's requests in progress. Over a
limit a request gets the `busy` page with 429 and Retry-After.

Invariants:
* The counters live in `SharedBuckets`: a fixed-size hash table in a file of
  the run directory that every worker maps (`mmap`, MAP_SHARED), so a limit
  holds however many workers serve. Memory is fixed (`TABLE_SLOTS` keys at
  once); a key finds its slot within `PROBES` places; when all are taken by
  keys still limited, the one whose bucket refills soonest gives way. A slot
  with requests in progress never gives way (bug: when all 8 had some, the
  newcomer took one, and the evicted client's later release lowered the
  newcomer's count, so `max_connections_per_client` let extra requests
  through); a key that finds none is counted nowhere and its request goes
  (fails open, as an HAProxy stick table that cannot purge an entry tracks
  nothing).
* Every decision (find or claim the key's slot, read it, write it back) holds
  an exclusive record lock on that slot's bytes of the shared file (`fcntl`
  F_SETLKW, released at once; the kernel drops it with a dead process), so two
  workers never both admit a request only one should. Unlocked, a client whose
  pipelined batches reached both workers at once got up to 10 % over its limit
  with 2 workers. The lock costs two syscalls per request of a rule that has
  limits, none for the others; an anonymous map (one process) takes none.
* Times are CLOCK_MONOTONIC, the same in every process of the machine.
* The shared file and the journals have every block allocated when they are
  made (`posix_fallocate`), so a write to the map never needs one. Bug: they
  were sparse, and with the run directory's file system full (/tmp or /run
  on a full tmpfs) the first request to touch a new page killed its worker
  with SIGBUS, and each one started again (a crash loop). A file that cannot
  be made is logged, and the worker keeps its limits in memory of its own:
  per worker, not balancer-wide, until it starts again with room.
* Each worker journals its own requests in progress per slot (a file of its
  own beside the shared one); when it exits, however, the arbiter gives back
  what its journal still holds (`reclaim`), so a killed worker never leaves a
  client locked out by its `max_connections_per_client`.
* A refused request is counted in its host's `limited` counter and the heavy
  hitters' `limited` measure; it does not use up the bucket.
* A request released from a hold meets the limits of the rule it is released
  to (`Limit.apply`), as a request arriving then would (bug: they were
  skipped, so what a client sent during a deploy's `spin` went through
  whatever its rate).
* A client is limited by its IPv4 address, or by the /64 of its IPv6 address
  (`balancer.clients.client_key`, as the heavy hitters count it; an IPv4-mapped
  one by its IPv4 address): the smallest block a network hands one subscriber
  (RFC 6177), whose 2**64 addresses each drew a bucket of its own before (bug:
  one client dodged every per-client limit by changing the address it sent
  from within its /64).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import mmap
import os
import struct
import time
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

from balancer.pages import Page, Pages
from balancer.sketch import client_of
from balancer.spans import Piece

log = logging.getLogger("balancer.limits")

TABLE_SLOTS = 1 << 16  # keys limited at once, over the whole balancer
PROBES = 8
SLOT = struct.Struct("<Qdq8x")  # key hash, theoretical arrival time, requests in progress
TAT = struct.Struct("<d")
RULE = struct.Struct("<d")  # in the slot's last 8 bytes: the rule's reach (`take`), 0 unset
BUCKET = struct.Struct("<d8xd")  # from the arrival time to the reach, in one read
OPEN = struct.Struct("<q")
FILE_NAME = "limits.shm"
MAX_RETRY_AFTER = 3600
COUNT = struct.Struct("<i")  # a journal's entry: one process's requests in progress in a slot
TABLE_BYTES = TABLE_SLOTS * SLOT.size  # the shared file's size (2 MiB; a journal's is smaller)


class SharedBuckets:
    """The balancer-wide table of limit counters (see the module doc).

    `path` None: an anonymous map, for a single process (tests, tools); else
    with `journal` this process also keeps its own requests in progress per
    slot in its journal, `journal_path(path, pid)` (what `reclaim` gives back
    when it is gone)."""

    def __init__(self, path: str | None = None, journal: bool = True) -> None:
        self.fd = -1  # the shared file, kept open for its record locks
        self.journal: mmap.mmap | None = None
        if path is not None:
            try:
                self.fd, self.map = _shared_map(path, TABLE_BYTES)
            except OSError as exc:
                log.error("limits: cannot make the shared table %s: %s; each rule's limits "
                          "hold per worker, not for the whole balancer, until this worker "
                          "starts again with room", path, exc.strerror or exc)
            else:
                if journal:
                    self.journal = _journal(journal_path(path, os.getpid()))
                return
        self.map = mmap.mmap(-1, TABLE_BYTES)

    def close(self) -> None:
        """Unmap and close (a process done with the table)."""
        for mapped in (self.map, self.journal):
            if mapped is not None:
                mapped.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @contextlib.contextmanager
    def locked(self, key: bytes) -> Iterator[None]:
        """Hold the record lock of `key`'s home slot: every process probing for
        `key` starts there, so one decision on a key is made at a time."""
        if self.fd < 0:
            yield
            return
        digest = (zlib.crc32(key) | zlib.adler32(key) << 32) or 1
        start = (digest & (TABLE_SLOTS - 1)) * SLOT.size
        fcntl.lockf(self.fd, fcntl.LOCK_EX, SLOT.size, start)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, SLOT.size, start)

    def slot(self, key: bytes, now: float) -> int:
        """The byte offset of `key`'s slot (claimed for it if it had none);
        -1 when every place it may take holds requests in progress."""
        digest = (zlib.crc32(key) | zlib.adler32(key) << 32) or 1
        start = digest & (TABLE_SLOTS - 1)
        mem = self.map
        free, soonest, soonest_at = -1, -1, math.inf
        for i in range(PROBES):
            offset = ((start + i) & (TABLE_SLOTS - 1)) * SLOT.size
            held, tat, in_progress = SLOT.unpack_from(mem, offset)
            if held == digest:
                return offset
            if free < 0 and (held == 0 or tat <= now and in_progress <= 0):
                free = offset
            elif in_progress <= 0 and tat < soonest_at:
                soonest, soonest_at = offset, tat
        offset = free if free >= 0 else soonest
        if offset >= 0:
            SLOT.pack_into(mem, offset, digest, now, 0)
        return offset

    def take(self, offset: int, now: float, interval: float, tolerance: float) -> float:
        """GCRA: 0.0 if a request may go now (and count it), else seconds to wait.
        The slot keeps the rule it was counted under (its ``tolerance + interval``,
        the most the rule ever leaves between now and the arrival time): a decision
        under another rule first holds the arrival time to ``now`` plus the rule's
        own (bug: a rate raised from 0.001/s to 1,000/s, or limits removed and given
        again, left the clients refused before refused for up to 1,000 s more).
        Only then: a `now` read before the lock (a decision of another worker came
        in between) lowers no arrival time of the rule in force (that admitted 4 %
        more in the two-process test). Offset -1 (no slot): 0.0, uncounted."""
        if offset < 0:
            return 0.0
        stored, counted = BUCKET.unpack_from(self.map, offset + 8)
        tat = max(stored, now)
        reach = tolerance + interval
        if counted != reach:  # counted under another rule (or none: a slot just claimed)
            RULE.pack_into(self.map, offset + 24, reach)
            if tat > now + reach:
                tat = now + reach
                TAT.pack_into(self.map, offset + 8, tat)
        wait = tat - now - tolerance
        if wait > 0:
            return wait
        TAT.pack_into(self.map, offset + 8, tat + interval)
        return 0.0

    def enter(self, offset: int, cap: int) -> bool:
        """Count one more request in progress unless `cap` are (True uncounted
        at offset -1: no slot)."""
        if offset < 0:
            return True
        at = offset + 16
        current = OPEN.unpack_from(self.map, at)[0]
        if current >= cap:
            return False
        OPEN.pack_into(self.map, at, max(current, 0) + 1)
        self.note(offset, 1)
        return True

    def leave(self, offset: int) -> None:
        if offset < 0:
            return
        at = offset + 16
        OPEN.pack_into(self.map, at, max(OPEN.unpack_from(self.map, at)[0] - 1, 0))
        self.note(offset, -1)

    def give_back(self, counts: list[int]) -> None:
        """Take `counts` (a gone process's journal: per slot, its requests in
        progress) off the slots' counts, each under its key's lock."""
        for index, count in enumerate(counts):
            if count <= 0:
                continue
            offset = index * SLOT.size
            digest = SLOT.unpack_from(self.map, offset)[0]
            home = (digest & (TABLE_SLOTS - 1)) * SLOT.size
            fcntl.lockf(self.fd, fcntl.LOCK_EX, SLOT.size, home)
            try:
                at = offset + 16
                OPEN.pack_into(self.map, at, max(OPEN.unpack_from(self.map, at)[0] - count, 0))
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, SLOT.size, home)

    def note(self, offset: int, change: int) -> None:
        """Keep this process's own count of the slot at `offset` in its journal."""
        journal = self.journal
        if journal is not None:
            at = offset // SLOT.size * COUNT.size
            COUNT.pack_into(journal, at, COUNT.unpack_from(journal, at)[0] + change)


class Limit:
    """One rule's limits, compiled with its route."""

    def __init__(self, key: str, limits: Mapping[str, Any], buckets: SharedBuckets,
                 page: Page) -> None:
        self.key = key.encode()
        self.buckets = buckets
        self.page = too_many(page)
        rate = limits.get("rate")
        self.interval = 1.0 / rate if rate else 0.0
        burst = limits.get("burst", default_burst(rate or 0))
        self.tolerance = (burst - 1) * self.interval
        self.per_client = limits.get("per", "client") == "client"
        self.connections = limits.get("max_connections_per_client", 0)

    def run(self, ex: Any) -> None:
        """Hand `ex` to its route's action, or answer 429 when over a limit."""
        self.apply(ex, ex.route, None)

    def apply(self, ex: Any, route: Any, body: Piece | None) -> None:
        """Hand `ex` to `route`'s action (`resume` with `body`, when a hold read
        it: `balancer.hold.hand_over`), or answer 429 when over a limit."""
        client = client_of(ex)
        now = time.monotonic()
        buckets = self.buckets
        if self.interval:
            name = self.key + b"\0" + client.encode() if self.per_client else self.key
            with buckets.locked(name):
                wait = buckets.take(buckets.slot(name, now), now, self.interval, self.tolerance)
            if wait:
                return self.refuse(ex, route, client, wait)
        if not self.connections:
            act(ex, route, body)
            return
        key = self.key + b"\1" + client.encode()
        with buckets.locked(key):
            offset = buckets.slot(key, now)
            entered = buckets.enter(offset, self.connections)
        if not entered:
            return self.refuse(ex, route, client, 1.0)
        try:
            act(ex, route, body)
        finally:
            with buckets.locked(key):
                buckets.leave(offset)

    def refuse(self, ex: Any, route: Any, client: str, wait: float) -> None:
        """The 429 answer (the `busy` page) and its counting."""
        route.stats.limited += 1
        ex.conn.ctx.stats.top.note_limited(ex, client)
        seconds = min(max(1, math.ceil(wait)), MAX_RETRY_AFTER)
        ex.respond(429, self.page.body, self.page.content_type,
                   ((b"Retry-After", b"%d" % seconds),))


def act(ex: Any, route: Any, body: Piece | None) -> None:
    """`route`'s action on `ex`: `handle`, or `resume` with the body a hold read."""
    if body is None:
        route.action.handle(ex)
    else:
        route.action.resume(ex, body)


def default_burst(rate: float) -> int:
    """A tenth of a second's worth of requests (at least 1): without it, requests
    that arrive in small clumps (a page and its assets, a batch of pipelined
    requests) lose a turn to a few milliseconds' jitter, and get less than `rate`."""
    return max(1, math.ceil(rate / 10))


def too_many(page: Page) -> Page:
    """The `busy` page as a 429 says it: the built-in one's "503 Service
    Unavailable" heading becomes "429 Too Many Requests" (an operator's own
    busy.html is sent as it is)."""
    body = page.body
    for old, new in ((b"<title>503 Service Unavailable</title>",
                      b"<title>429 Too Many Requests</title>"),
                     (b"<span>503</span>Service Unavailable",
                      b"<span>429</span>Too Many Requests")):
        body = body.replace(old, new)
    return Page(page.name, 429, body, page.content_type)


def compile_limit(key: str, rule: Mapping[str, Any], buckets: SharedBuckets,
                  pages: Pages) -> Limit | None:
    """The rule's `Limit`, or None when it has no limits."""
    limits = rule.get("limits")
    if not limits:
        return None
    return Limit(key, limits, buckets, pages.get("busy"))


def journal_path(path: str, pid: int) -> str:
    """The journal of process `pid` beside the shared file `path`."""
    return f"{path}.{pid}"


def _journal(path: str) -> mmap.mmap | None:
    """This process's journal at `path`, mapped; None (logged) if it cannot be made."""
    try:
        fd, journal = _shared_map(path, TABLE_SLOTS * COUNT.size)
    except OSError as exc:
        log.error("limits: cannot make the journal %s: %s; if this worker is killed, its "
                  "requests in progress stay counted against max_connections_per_client",
                  path, exc.strerror or exc)
        return None
    os.close(fd)
    return journal


def _shared_map(path: str, size: int) -> tuple[int, mmap.mmap]:
    """The file `path` (made at least `size` bytes long, zeros, every block
    allocated: see the module doc) open and mapped shared. Raises OSError."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise


def reclaim(path: str, pid: int) -> int:
    """Give back the requests in progress that process `pid`, gone, still counted
    in the shared file `path` (its journal's), and delete its journal; how many.

    Called by the arbiter for each worker that exits (`balancer.arbiter`): one
    killed (a crash, the OOM killer, a drain's end) left its requests counted
    for good, and a client at its `max_connections_per_client` got 429 for
    every request after (bug). The journal is claimed by a rename first, so it
    is given back once."""
    claimed = journal_path(path, pid) + ".reclaimed"
    try:
        os.rename(journal_path(path, pid), claimed)
    except OSError:
        return 0  # none (not a worker, or given back already)
    # the run directory may be deleted meanwhile (bug: the arbiter died of the
    # FileNotFoundError): what is gone with it counts against nobody
    try:
        with open(claimed, "rb") as file:
            journal = file.read()
        if journal.count(0) == len(journal):
            return 0  # nothing in progress (most exits): not unpacked, one count per slot
        counts = [count for (count,) in COUNT.iter_unpack(journal)]
        given = sum(count for count in counts if count > 0)
        if given:
            buckets = SharedBuckets(path, journal=False)
            try:
                buckets.give_back(counts)
            finally:
                buckets.close()
        return given
    except OSError:
        return 0
    finally:
        with contextlib.suppress(OSError):
            os.unlink(claimed)
