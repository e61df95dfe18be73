"""Backend host names: resolved for each new connection (and each health
check), bounded in time, shared, and connected to one usable address after
another.

Only a new connection to a backend named by a host name comes here (never a
request on a pooled connection, never an IP backend: the hot path).

Invariants:
* One lookup at a time per backend name per worker (`Name`): every new
  connection and health check that needs the name meanwhile waits for that
  one. A lookup holds one of gevent's resolver threads (10 per worker, shared
  with the access log's writes) for as long as the system resolver takes,
  10 s and more when the DNS never answers; one per name, the pool is never
  filled by one hung name (bug: 10 requests to it starved every other name).
* At most `MAX_LOOKUPS` lookups run at once per worker, whatever the names
  (`SLOTS`): a DNS server that answers nothing leaves the rest of the
  resolver threads to the access log's write and the store's connects. A
  constant, not a setting: its safe range is set by gevent's pool (10
  threads), which the operator neither sees nor sizes, and raising it helps
  only a DNS already too slow.
* A lookup that finds every slot taken queues for the next one freed (first
  come, first served), in the hub: it holds no thread, and its waiters wait
  for it as for one under way (bug: it failed at once, so a burst of new
  connections to more than 5 names, at start-up or a reload, got 502s with
  a healthy DNS). A queued lookup has a waiter, or its name a held answer
  (`Lookup.kept_until`: bug, the lookup refreshing a held answer left the
  queue with its waiter, so while every slot stayed taken the answer was
  never refreshed and each new connection waited 1 s for a lookup that never
  ran): the last waiter to leave (its deadline passed) takes it out of the
  queue unless its name holds an answer, and the first slot freed after that
  answer's hold drops it. So the queue holds at most one lookup per name,
  each for its waiters' deadlines or its name's hold at most, and a name the
  DNS never answers costs one slot, never more.
* A slot taken is always handed on: a lookup whose thread cannot start ends
  with that problem at once (`launch`; bug: the slot was held, and the name's
  lookup never ended, for the worker's life).
* A wait is bounded by its caller's deadline (the connect timeout, a check's
  timeout), a wait for a slot included; a lookup under way goes on alone and
  its answer is kept for the next.
* The last good answer is kept for the name's `hold` seconds (`dns.hold`,
  `HOLD` unless set; HAProxy's `hold`, RFC 8767's serve-stale): when a lookup
  fails (no such name, server failure, an answer the system resolver cannot
  read) or has not answered `STALE_AFTER` seconds after it began (or in half
  the time the caller has left), the held addresses are used instead. Once
  older than `hold` (at once with 0), the failure is the connection's.
* Only usable addresses are tried: unspecified (`0.0.0.0`, `::`: Linux
  connects those to this host; DNS sinkholes answer them), broadcast and
  multicast addresses are dropped, and at most `MAX_ADDRESSES` of an answer
  are tried, in its order, sharing the deadline (each the rest of it over
  the addresses left, `MIN_SLICE` at least): an answer of hundreds of silent
  addresses costs one connect timeout, not hundreds.
* Every failure to resolve raises `Unresolved` (an OSError: the connect's
  error family, mapped once in `balancer.pool`), its text naming the name
  and what happened.
"""

from __future__ import annotations

import _thread
import ipaddress
import logging
import socket
import threading
import time
from collections import deque
from typing import Any, Final

from balancer.errors import Overdue
from balancer.netio import connect_blocking

log: Final = logging.getLogger("balancer.health")
HOLD: Final = 30.0  # seconds a good answer stands in for failed lookups (`dns.hold`)
STALE_AFTER: Final = 1.0  # seconds a held answer waits for a lookup, at most
MAX_ADDRESSES: Final = 16  # of an answer, tried in turn
MAX_LOOKUPS: Final = 5  # half of gevent's resolver threads
MIN_SLICE: Final = 1.0  # seconds each address may take, while the deadline allows
Addresses = list[tuple[int, tuple[Any, ...]]]  # (family, sockaddr)


class Unresolved(OSError):
    """A backend name gave no usable address in time."""


class Slots:
    """The worker's `MAX_LOOKUPS` lookup slots and the lookups queued for one.
    `lock` guards every field here and each lookup's `waiters`, `queued` and `begun`
    (for the threads of the unit tests): it is never held across a greenlet
    switch, so a worker never waits for it, whether it is gevent's or the
    plain one (the arbiter imports this module before a worker patches)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.running = 0  # lookups holding a slot
        self.queue: deque[Lookup] = deque()  # each with a waiter, one per name at most
        self.lock = threading.Lock()

    def take(self, lookup: Lookup) -> bool:
        """A slot for `lookup` now (True), or `lookup` queued for the next one freed."""
        with self.lock:
            if self.running < self.size:
                self.running += 1
                lookup.begun = True
                return True
            lookup.queued = True
            self.queue.append(lookup)
            return False

    def hand_on(self) -> Lookup | None:
        """A lookup ended: the queued lookup that takes its slot over (None: the
        slot is free again). Those left by their waiters whose name's hold ran
        out meanwhile are dropped on the way, never run."""
        now = time.monotonic()
        dropped = []
        with self.lock:
            while self.queue:
                lookup = self.queue.popleft()
                lookup.queued = False
                if lookup.waiters or lookup.kept_until > now:
                    lookup.begun = True
                    break
                dropped.append(lookup)
            else:
                lookup = None
                self.running -= 1
        for gone in dropped:
            gone.end("every waiter left, and the held answer ran out, before a lookup slot "
                     "was free")
        return lookup

    def join(self, lookup: Lookup) -> None:
        with self.lock:
            lookup.waiters += 1

    def leave(self, lookup: Lookup) -> bool:
        """One waiter of `lookup` gone; True if it was the last one of a queued
        lookup whose name holds no answer, now out of the queue for good."""
        with self.lock:
            lookup.waiters -= 1
            if lookup.waiters or not lookup.queued or lookup.kept_until > time.monotonic():
                return False
            lookup.queued = False
            self.queue.remove(lookup)
            return True


SLOTS: Final = Slots(MAX_LOOKUPS)


class Lookup:
    """One getaddrinfo of a name, in its own thread (a raw greenlet once gevent
    has patched `_thread`: no `threading.Thread` and its events to start) once
    it has one of the `SLOTS`: its outcome is `addresses` or `problem` once
    `done`. Created with its first waiter (`SLOTS.join` the others; each
    `SLOTS.leave`s), it waits in the queue for a slot while `queued` (left by
    them, while its name's held answer lasts: `kept_until`)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.started = time.monotonic()
        self.done = threading.Event()
        self.addresses: Addresses = []
        self.problem = ""
        self.waiters = 1
        self.queued = False
        self.begun = False  # given a slot
        # monotonic time until which it stays queued without waiters: its name's
        # held answer lasts until then, and this lookup is what refreshes it
        self.kept_until = 0.0

    def start(self) -> None:
        """Begin, or queue for a slot (the caller has made this the name's
        lookup first: should starting its thread switch, none begins another
        meanwhile)."""
        if SLOTS.take(self):
            launch(self)

    def run(self) -> None:
        try:
            self.resolve()
        finally:
            self.done.set()
            following = SLOTS.hand_on()
            if following is not None:
                launch(following)

    def end(self, problem: str) -> None:
        """Done without an answer (never run: no thread, no slot left for it)."""
        self.problem = problem
        self.done.set()

    def resolve(self) -> None:
        try:
            answer = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            self.problem = exc.strerror or str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure is the lookup's outcome
            self.problem = str(exc) or type(exc).__name__
        else:
            self.addresses, dropped = usable(answer)
            if not self.addresses:
                self.problem = f"no usable address in the answer ({', '.join(dropped)})"

    def wait(self, timeout: float) -> bool:
        """True once `done` within `timeout` seconds; this waiter leaves either
        way (the last to leave a queued lookup ends it unrun)."""
        try:
            return self.done.wait(timeout)
        finally:
            if SLOTS.leave(self):
                self.end("every waiter left before a lookup slot was free")


def launch(lookup: Lookup | None) -> None:
    """Start the thread of `lookup`, which holds a slot; one that cannot start
    (no memory, a thread limit) ends its lookup with that problem, and the
    slot goes to the next queued lookup (or is freed)."""
    while lookup is not None:
        try:
            _thread.start_new_thread(lookup.run, ())
        except Exception as exc:  # noqa: BLE001 - RuntimeError, MemoryError: the lookup's outcome
            lookup.end(f"its thread could not start ({str(exc) or type(exc).__name__})")
            lookup = SLOTS.hand_on()
        else:
            return


def usable(answer: list[tuple[Any, ...]]) -> tuple[Addresses, list[str]]:
    """The addresses of a getaddrinfo answer worth connecting to (at most
    `MAX_ADDRESSES`, duplicates dropped), and the ones dropped as unusable."""
    kept: Addresses = []
    dropped: list[str] = []
    for family, _, _, _, sockaddr in answer:
        ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        if ip.is_unspecified or ip.is_multicast or ip == BROADCAST:
            dropped.append(str(ip))
        elif (family, sockaddr) not in kept and len(kept) < MAX_ADDRESSES:
            kept.append((family, sockaddr))
    return kept, dropped


BROADCAST: Final = ipaddress.ip_address("255.255.255.255")


class Name:
    """A backend's host name and port: the lookup under way, the last good answer
    (used for `hold` seconds while lookups fail)."""

    def __init__(self, host: str, port: int, hold: float = HOLD) -> None:
        self.host = host
        self.port = port
        self.hold = hold
        self.lookup: Lookup | None = None
        self.held: Addresses = []
        self.held_at = 0.0  # monotonic time of the held answer
        self.holding = False  # the held answer stands in now (logged once per spell)

    def addresses(self, deadline: float) -> Addresses:
        """The name's addresses, waiting for its lookup until `deadline`
        (monotonic) at most; raises `Unresolved`."""
        lookup = self.lookup
        if lookup is None or lookup.done.is_set():
            if lookup is not None and lookup.addresses:  # answered after its waiters left
                self.answered(lookup.addresses)
            lookup = self.lookup = Lookup(self.host, self.port)  # this caller its waiter
            lookup.start()
        else:
            SLOTS.join(lookup)
        now = time.monotonic()
        held = self.held if now - self.held_at < self.hold else []
        if held:  # queued, it outlives its waiters while the answer lasts: it refreshes it
            lookup.kept_until = self.held_at + self.hold
        # with a held answer, a lookup gets `STALE_AFTER` at most, and never
        # more than half the time left: the connect needs the rest
        until = min(lookup.started + STALE_AFTER, (now + deadline) / 2) if held else deadline
        if lookup.wait(max(0.0, until - now)):
            if lookup.addresses:
                return self.answered(lookup.addresses)
            problem = lookup.problem
        else:
            problem = f"no answer within {max(0.0, until - lookup.started):.1f} s"
            if not lookup.begun:
                problem += (f": still waiting for one of the {MAX_LOOKUPS} lookup slots, "
                            "all held by lookups of other names")
        if held:
            return self.stood_in(held, problem)
        raise Unresolved(f"DNS lookup of {self.host} failed: {problem}")

    def answered(self, addresses: Addresses) -> Addresses:
        if self.holding:
            self.holding = False
            log.info("DNS lookup of %s answers again", self.host)
        self.held, self.held_at = addresses, time.monotonic()
        return addresses

    def stood_in(self, held: Addresses, problem: str) -> Addresses:
        if not self.holding:
            self.holding = True
            log.warning("DNS lookup of %s failed (%s): using its last good answer, "
                        "%.0f s old, for up to %g s", self.host, problem,
                        time.monotonic() - self.held_at, self.hold)
        return held

    def connect(self, deadline: float) -> socket.socket:
        """A socket connected to one of the name's addresses by `deadline`
        (raises `Unresolved`, the last address's OSError, or the watchdog's
        `Overdue` at once: gevent's `create_connection` took it for that
        address's failure and tried the next). No timeout once connected."""
        addresses = self.addresses(deadline)
        error: OSError = TimeoutError(f"no time left to connect to {self.host}")
        for left in range(len(addresses), 0, -1):
            family, sockaddr = addresses[-left]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                return connect_blocking(family, sockaddr, max(remaining / left,
                                                              min(MIN_SLICE, remaining)))
            except Overdue:
                raise
            except OSError as exc:
                error = exc
        raise error

    def __repr__(self) -> str:
        return f"<Name {self.host}:{self.port} held={len(self.held)}>"
