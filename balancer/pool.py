"""Backends: keep-alive connection pools and passive health, keyed by address.

Invariants:
* One `Backend` per address per worker, shared by every host and every table
  version that names it (`BackendRegistry`), so pools and dead marks survive
  rule changes and are never keyed by list position.
* Pools do bookkeeping only: `acquire_idle` hands out an idle connection,
  `connect` opens a new one; `release` returns a connection known to be at a
  message boundary.
  Socket errors on connect become `ConnectError` here, at the edge; the
  watchdog's `Overdue` (the client connection's deadline) thrown into a
  connect's wait, `ConnectOverdue`, which is not the backend's failure.
* A new connection for a request is bounded by the connect timeout (a TLS
  handshake included: `connect_tls`); the caller arms the client
  connection's deadline to `connect_bound` first, from the clock
  (`balancer.relay.arm_connect`), so the connect's own timeout fires first
  and is the backend's failure (a name's lookup and its addresses included:
  `balancer.resolve`, whose `Unresolved` becomes `ResolveError` here). The
  watchdog's `Overdue` thrown into a connect past its own timeout (a stalled
  loop ran the watchdog first) is that timeout all the same (`_overdue`). A
  pooled connection is taken with no arming.
* Every new connection completes in `_completed` (the greenlet's connect, a
  TLS one before its handshake, the hub's `end_connect`, `resume_connect`):
  one that reaches the worker's own listener is closed there, nothing sent,
  as `SelfLoop` (`balancer.selves`), not the backend's failure.
* An idle connection on which anything arrived (a stray response, a `408`
  before the backend closes, EOF) is closed, never handed out: those bytes
  belong to no request. Each one handed out is peeked at first (`is_open`:
  one `recv(MSG_PEEK)` in C for a plain one), whatever the request: the
  pool's readiness watch (`balancer.netio.Stream.is_clean`) sees only what
  came before the loop last polled, and bytes that came since were read as
  the next GET's answer (before 2026-12-07 only a request that may not go
  twice was peeked for).
* An idle connection is kept at most `idle_timeout` seconds
  (`timeouts.backend_idle`). The worker's sweep (`BackendRegistry.sweep`, off
  the request path) closes those past it and those on which anything arrived,
  plain and TLS, so a backend that gets no more traffic gets its connections
  back (and none stays in CLOSE_WAIT) within `sweep_every` of the deadline;
  `acquire_idle` skips them meanwhile. `IdleBudget.idle` counts what the pools
  hold: a connection leaves its pool and the count together, with no switch
  between.
* Passive health: `fall` consecutive failures mark the backend down for
  `fail_timeout` seconds; after that one request probes it (half-open) and
  its outcome decides. A probe that never reports back (its request was
  cancelled) lets another probe go after `fail_timeout` more seconds.
* Active health (`balancer.health`) only sets `checked_down`; a backend the
  checks call down takes no request while another is available.
* A state change is logged once, with its reason (`log`): down after `fall`
  failures (the last error, kept as is and formatted only then), up again on
  the first success after failures. Nothing is formatted per request.
* Recovery wakes waiters: `recovered_event()` is set whenever the backend
  answers again after failures (passive) or rises (active), so requests held
  while every backend was down are released at once.
* No locks: list append/pop are atomic, so the threaded baseline can share a
  pool with no more than a harmless race on counters.
* Idle connections hold descriptors too: every backend's together keep only
  what the worker's open clients leave of its descriptors (`IdleBudget`: each
  client may hold two, itself and its backend connection, and one more client
  may come). A connection released beyond that is closed, and a new backend
  connection first closes the oldest idle ones the clients now need
  (nginx reuses its keep-alive connections' slots the same way).
* An https:// backend's connections are TLS (`balancer.backend_tls`): each is
  pooled under its pool key (the name its certificate was verified for), and
  handed out only to a request with the same key (`acquire_idle_tls`); a
  plain backend's pool is a slot for the connection released last and a list
  of the others (`acquire_idle`), handed out newest first as a TLS pool's
  list is. TLS pools count in the same budget.
* A connection (`Upstream`) keeps what belongs to it for its whole life: its
  stream (the socket as the worker's `balancer.netio.IO` made it) and the
  response parser that `balancer.relay` makes on first use and reuses for
  every response. `Upstream.close` closes both.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from errno import EINPROGRESS
from typing import Any, Final

from balancer.addr import Address, parse_backend_addr
from balancer.backend_tls import BackendTLS, keepable
from balancer.errors import (
    BackendTLSError,
    ConnectError,
    ConnectOverdue,
    Overdue,
    ProxyError,
    ResolveError,
    SelfLoop,
)
from balancer.netio import CLOCK, IO, NEVER, Stream, begin_connect, connect_blocking, connect_ended
from balancer.peek import OPEN, peek_under
from balancer.resolve import HOLD, Name, Unresolved
from balancer.response_parser import HeadMemo, ResponseParser
from balancer.selves import OwnListeners
from balancer.serving import Slots

log: Final = logging.getLogger("balancer.health")
CLIENT_DESCRIPTORS: Final = 2  # a client connection and its backend connection
UNBOUNDED: Final = 1 << 62
SWEEP_EVERY: Final = 5.0  # seconds between sweeps of idle connections, at most
# seconds the sweep loop waits, once woken, for more stirred connections: each
# backend's idle lists are gone through once for all of them (`drop_stirred`)
STIRRED_DELAY: Final = 0.05
UP: Final = "up"
DOWN: Final = "down"
PROBING: Final = "probing"
# seconds the client connection's deadline is armed past a new connection's
# connect timeout: more than the watchdog's tick (0.25 s at most), so the connect's
# own timeout normally fires first
CONNECT_MARGIN: Final = 0.5


class Upstream:
    """One connection to a backend and what lives as long as it does."""

    __slots__ = ("sock", "stream", "parser", "since", "pool", "fresh", "backend")

    def __init__(self, stream: Stream, pool: str = "") -> None:
        self.sock = stream.sock
        self.stream = stream
        self.parser: ResponseParser | None = None  # made on first use
        self.backend: Backend | None = None  # whose connection it is (`Backend._own`)
        self.since = 0.0  # when it went idle (monotonic)
        self.pool = pool  # "": plain; else the TLS pool key (`balancer.backend_tls.pool_key`)
        self.fresh = bool(pool)  # a TLS connection whose session was not kept yet

    def close(self) -> None:
        """Close the stream (socket, watcher, writer) and the parser."""
        self.stream.close()
        if self.parser is not None:
            self.parser.close()

    def heads(self) -> HeadMemo | None:
        """Its backend's last response head, shared by the backend's connections."""
        backend = self.backend
        return backend.heads if backend is not None else None

    def stirred(self) -> None:
        """A readiness nobody waited for (`Stream.on_stirred`): tell the backend's
        `notice` (a bound method per connection, not a `functools.partial` with
        its tuple and dict: 208 bytes)."""
        backend = self.backend
        if backend is not None and backend.notice is not None:
            backend.notice(backend, self)

    def __repr__(self) -> str:
        return f"<Upstream fd={self.sock.fileno()}>"


class IdleBudget:
    """The descriptors a worker's idle pooled connections may hold, shared by its
    backends: `descriptors` (what the limit leaves for clients and backend
    connections, `balancer.descriptors.connection_budget`) but what its open
    clients may need (`slots`: the worker's `Slots`; None counts no client)."""

    __slots__ = ("descriptors", "idle", "slots", "backends")

    def __init__(self, descriptors: int = UNBOUNDED) -> None:
        self.descriptors = descriptors
        self.idle = 0  # idle connections of every backend
        self.slots: Slots | None = None
        self.backends: dict[str, Backend] = {}  # the registry's: where the idle ones are

    def room(self, coming: int) -> int:
        """How many idle connections there may be with `coming` more clients."""
        slots = self.slots
        clients = slots.open if slots is not None else 0
        return self.descriptors - CLIENT_DESCRIPTORS * (clients + coming)

    def make_room(self) -> None:
        """Before a new backend connection: close the oldest idle connections
        the open clients need the descriptors of."""
        while self.idle > self.room(0):
            oldest: Upstream | None = None
            owner: Backend | None = None
            for backend in self.backends.values():
                for upstream in backend.oldest_idle():
                    if oldest is None or upstream.since < oldest.since:
                        oldest, owner = upstream, backend
            if oldest is None or owner is None:  # the rest are a removed backend's:
                return  # closed when it is
            owner.forget_idle(oldest)
            self.idle -= 1
            oldest.close()

    def __repr__(self) -> str:
        return f"<IdleBudget idle={self.idle} room={self.room(0)}>"


class Backend:
    """One backend address: its idle connections and its passive health."""

    def __init__(self, address: Address, *, connect_timeout: float, fail_timeout: float,
                 max_idle: int = 1024, idle_timeout: float = 30.0, dns_hold: float = HOLD,
                 io: IO | None = None, budget: IdleBudget | None = None,
                 tls: BackendTLS | None = None, listeners: OwnListeners | None = None,
                 notice: Callable[[Backend, Upstream], None] | None = None) -> None:
        self.address = address
        self.key = str(address)
        self.connect_timeout = connect_timeout
        # what the client connection's deadline is armed to for a new connection
        self.connect_bound = connect_timeout + CONNECT_MARGIN
        self.fail_timeout = fail_timeout
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.io = io if io is not None else IO()
        # the plain pool: the connection released last, and before it the others,
        # oldest first (`release`; the slot spares the list an append and a pop,
        # each reallocating its array, when one connection at a time is idle)
        self.last: Upstream | None = None
        self.idle: list[Upstream] = []
        self.budget = budget if budget is not None else IdleBudget()
        # the worker's listeners: a new connection to one of them is refused (`_completed`)
        self.listeners = listeners if listeners is not None else OwnListeners()
        # their ports (the same set, filled as they are added) and the backend's:
        # the test's first step, two native attributes in the compiled module
        self.own_ports = self.listeners.ports
        self.port: int = address.port
        # an https:// backend's TLS contexts, its idle connections by pool key,
        # and the TLS session of each key's last new connection (to resume)
        self.tls: BackendTLS | None = tls if address.tls else None
        self.idle_tls: dict[str, list[Upstream]] = {}
        self.tls_sessions: dict[str, object] = {}  # key → `keepable`
        self.is_literal = _is_ip_literal(address.host)
        # a backend named by a host name: its lookups and last good answer
        self.name = None if self.is_literal else Name(address.host, address.port, dns_hold)
        # called in the event loop when a connection is stirred (`Stream.on_stirred`)
        self.notice = notice
        # the last response head read from it, for its connections' next (`HeadMemo`)
        self.heads = HeadMemo()
        self.family = address.family  # (a property of the interpreted Address)
        self.in_flight = 0
        self.fails = 0
        self.down_until = 0.0
        self.state = UP
        self.down_since = 0.0  # monotonic time of the last UP -> DOWN change
        self.last_error: object = None  # the failure that counted last (formatted only to log)
        self.checked_down = False  # set by an active health check
        self.check_problem = ""  # why the last active check failed (`balancer.health`)
        self.check_failure = ""  # the check's own failure (a bug) while it lasts, up or down
        self._recovered = threading.Event()

    # pool ----------------------------------------------------------------
    def acquire_idle(self, now: float = 0.0) -> Upstream | None:
        """An idle connection nothing arrived on (peeked at: `is_open`), or None
        (the caller connects: `balancer.relay`, or the hub, `balancer.inline`):
        the newest, as `_take`.
        `now`: `CLOCK()` as read by the caller just before (it times the try from
        the same reading, `Flight.board`); 0.0: read here."""
        last = self.last
        if last is not None:
            self.last = None
            self.budget.idle -= 1
            if last.since > (now if now else CLOCK()) - self.idle_timeout \
                    and last.stream.is_untouched():
                return last
            last.close()
        idle = self.idle
        return self._take(idle, now) if idle else None

    def acquire_idle_tls(self, key: str, now: float = 0.0) -> Upstream | None:
        """`acquire_idle` for TLS pool `key` (`balancer.backend_tls.pool_key`: only
        a connection made, and verified, for the request's name is reused)."""
        idle = self.idle_tls.get(key)
        return self._take(idle, now) if idle else None

    def _take(self, idle: list[Upstream], now: float) -> Upstream | None:
        """The newest connection of `idle` that is neither too old nor touched
        (`is_open`; the others are closed on the way); `now` as `acquire_idle`'s."""
        oldest = (now if now else CLOCK()) - self.idle_timeout
        budget = self.budget
        while idle:
            try:
                upstream = idle.pop()
            except IndexError:
                break
            budget.idle -= 1
            if upstream.since > oldest and self.is_open(upstream):
                return upstream
            upstream.close()
        return None

    def connect(self) -> Upstream:
        """A new connection to the backend (idle ones of any backend closed first
        if the clients need their descriptors); errors become ConnectError."""
        return self._upstream(self._connected(CLOCK() + self.connect_timeout))

    def start_connect(self) -> tuple[socket.socket, int]:
        """`connect`'s first step, with no wait (the hub's, `balancer.inline`: only
        for a plain backend named by an IP address, under gevent): idle ones
        closed first as `connect` does, then the socket and how its connect
        went so far (`balancer.netio.begin_connect`). Raises ConnectError; the
        rest is `end_connect` or, in a greenlet, `resume_connect`."""
        self._make_room()
        addr = self.address
        try:
            return begin_connect(self.family, (addr.host, addr.port))
        except OSError as exc:
            raise self._connect_error(exc) from None

    def end_connect(self, sock: socket.socket, err: int) -> Upstream:
        """`connect`'s last step for a connect `start_connect` began, which ended
        with `err` (`balancer.netio.connect_outcome`'s): the connection, or
        ConnectError as `connect` raises it (`sock` closed)."""
        try:
            connect_ended(err)
        except OSError as exc:
            sock.close()
            raise self._connect_error(exc) from None
        return self._upstream(self._completed(sock))

    def resume_connect(self, sock: socket.socket, by: float) -> Upstream:
        """`connect`'s rest, in a greenlet, for a connect `start_connect` began and
        the hub stopped waiting for: it waits until `by` (monotonic), its
        connect timeout, as `connect` does; ConnectError as `connect` raises it."""
        io: Any = self.io
        try:
            io.complete_connect(sock, EINPROGRESS, by - CLOCK())
        except OSError as exc:
            raise self._connect_error(exc, by) from None
        return self._upstream(self._completed(sock))

    def _upstream(self, sock: socket.socket) -> Upstream:
        """The connection of connected `sock`."""
        return self._own(Upstream(self.io.stream(sock)))

    def connect_tls(self, key: str) -> Upstream:
        """A new TLS connection for pool `key`, handshaken within the connect
        timeout, resuming the key's last session; errors become ConnectError
        (BackendTLSError for TLS's own, ConnectOverdue for the watchdog's)."""
        deadline = time.monotonic() + self.connect_timeout
        tls = self.tls
        assert tls is not None  # only https:// backends have pool keys
        try:
            sock = tls.secure(self._connected(deadline, True), key, self.key, deadline,
                              self.io.bounded, self.tls_sessions.get(key))
        except Overdue:  # (`secure` closed the socket)
            raise self._overdue(BackendTLSError(f"{self.key}: TLS handshake timed out"),
                                deadline) from None
        sock.settimeout(None)  # waits are bounded by the connection's `arm`
        return self._own(Upstream(self.io.tls_stream(sock), key))

    def _own(self, upstream: Upstream) -> Upstream:
        """`upstream`, this backend's, whose readiness nobody waits for calls
        `notice`."""
        upstream.backend = self
        if self.notice is not None:
            upstream.stream.on_stirred(upstream.stirred)
        return upstream

    def renew(self, upstream: Upstream) -> Upstream:
        """A new connection like `upstream` (same backend, same pool)."""
        if upstream.pool:
            return self.connect_tls(upstream.pool)
        return self.connect()

    def _connected(self, by: float, tls: bool = False) -> socket.socket:
        """A TCP socket to the backend connected by `by` (monotonic: the connect
        timeout from now), the socket module's for `tls` (gevent's SSL wraps
        it); errors become ConnectError."""
        self._make_room()
        try:
            sock = self._open(tls, by)
        except OSError as exc:
            raise self._connect_error(exc, by) from None
        return self._completed(sock)

    def _completed(self, sock: socket.socket) -> socket.socket:
        """`sock`, a new connection's, connected: Nagle's algorithm off, or
        SelfLoop (`sock` closed, nothing sent) if it reaches one of the
        worker's own listeners (`balancer.selves`; the bug: a rule forwarding
        to the balancer itself took every descriptor for one request)."""
        if self.port in self.own_ports and self.listeners.reaches(sock):
            sock.close()
            raise SelfLoop(f"{self.key}: the backend is this balancer's own listener")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _make_room(self) -> None:
        """Before a new connection: idle ones closed if the clients need their
        descriptors (`IdleBudget.make_room`)."""
        budget = self.budget
        if budget.idle and budget.idle > budget.room(0):
            budget.make_room()

    def _connect_error(self, exc: OSError, by: float = NEVER) -> ProxyError:
        """The ConnectError of a connect that raised `exc`, or the watchdog's
        `Overdue` as `_overdue` judges it for a connect that times out at `by`
        (monotonic; a step that never waits has none), told apart only once
        raised."""
        if isinstance(exc, Overdue):
            return self._overdue(ConnectError(f"{self.key}: timed out"), by)
        if isinstance(exc, Unresolved):
            return ResolveError(f"{self.key}: {exc}")
        return ConnectError(f"{self.key}: {exc.strerror or exc}")

    def _overdue(self, timed_out: ConnectError, by: float) -> ProxyError:
        """What the watchdog's `Overdue` (the client connection's deadline passed)
        thrown into a connect that times out at `by` (monotonic) ends in: the
        request out of time (ConnectOverdue) only while `by` is ahead. Once `by`
        passed, `timed_out`, what the connect's own timeout raises there (the
        backend's failure): both passed (a loop stalled past them runs the
        watchdog's tick, or the Overdue it queued, before the connect's timer),
        and the connect's is what the request reports, whichever came first."""
        if CLOCK() < by:
            return ConnectOverdue(f"{self.key}: the request's deadline passed while "
                                  f"connecting")
        return timed_out

    def _open(self, tls: bool, by: float) -> socket.socket:
        """Connect by `by` (the connect timeout from now): an IP address through the
        worker's `IO` (gevent's: the OS socket, non-blocking), a name and a TLS
        connection with the socket module's socket (`dial`)."""
        addr = self.address
        if self.is_literal and not tls:
            return self.io.connect(self.family, (addr.host, addr.port), self.connect_timeout)
        return self.dial(by)

    def dial(self, deadline: float) -> socket.socket:
        """The socket module's socket connected to the backend by `deadline`
        (monotonic), a name's resolution included (`balancer.resolve.Name`),
        with no timeout once connected; raises OSError (`Unresolved` for a
        name that gave no usable address). A new connection's and a health
        check's."""
        name, addr = self.name, self.address
        if name is not None:
            return name.connect(deadline)
        return connect_blocking(self.family, (addr.host, addr.port), deadline - time.monotonic())

    def release(self, upstream: Upstream, now: float = 0.0) -> None:
        """Keep `upstream` for reuse: at most `max_idle` (per TLS pool key; the
        plain pool's slot counts), and only while the worker's idle connections
        fit in its descriptors (`IdleBudget`). `now`: `CLOCK()` as read by the
        caller with nothing awaited since (the hub's `_land`), its idle time's
        start; 0.0: read here."""
        pool = upstream.pool
        if pool:
            idle = self.idle_tls.setdefault(pool, [])
            held = len(idle)
        else:
            idle = self.idle
            held = len(idle) if self.last is None else len(idle) + 1
        budget, slots = self.budget, self.budget.slots  # `budget.room(1)`, inline
        clients = slots.open if slots is not None else 0
        if held < self.max_idle and budget.idle < budget.descriptors - \
                CLIENT_DESCRIPTORS * (clients + 1):
            upstream.since = now if now else CLOCK()
            parser = upstream.parser
            if parser is not None:
                parser.idle()  # its response's head goes (the backend's memo keeps one)
            upstream.stream.park()
            if pool:
                idle.append(upstream)
            else:  # the newest in the slot, the one it held after the others
                last = self.last
                if last is not None:
                    idle.append(last)
                self.last = upstream
            budget.idle += 1
        else:
            upstream.close()

    def keep_session(self, upstream: Upstream) -> None:
        """Keep the TLS session of `upstream` for the next connection of its pool
        (after its first answer: a TLS 1.3 session ticket has come by then)."""
        upstream.fresh = False
        kept = keepable(upstream.sock)
        if kept is not None:
            self.tls_sessions[upstream.pool] = kept

    def pooled(self) -> list[Upstream]:
        """The plain pool's idle connections, oldest first (a copy)."""
        last = self.last
        return [*self.idle] if last is None else [*self.idle, last]

    def oldest_idle(self) -> list[Upstream]:
        """The oldest idle connection of each pool that has one: the plain pool
        first, then the TLS pools."""
        idle, last = self.idle, self.last
        oldest = [idle[0]] if idle else [] if last is None else [last]
        oldest.extend(pool[0] for pool in self.idle_tls.values() if pool)
        return oldest

    def forget_idle(self, upstream: Upstream) -> None:
        """Take `upstream`, the oldest of its pool (`oldest_idle`), out of it (the
        caller counts and closes it)."""
        if upstream is self.last:
            self.last = None
        elif upstream.pool:
            self.idle_tls[upstream.pool].pop(0)
        else:
            self.idle.pop(0)

    def sweep(self, now: float) -> int:
        """Close the idle connections past `idle_timeout` at `now` (monotonic) and
        those on which anything arrived; returns how many."""
        oldest = now - self.idle_timeout
        return self._close_where(lambda u: u.since <= oldest or not u.stream.is_clean())

    def drop(self, stirred: set[Upstream]) -> int:
        """Close the connections of `stirred` still idle here on which anything
        arrived (the backend closed or wrote; not those taken, swept or released
        again since); how many. One pass over each idle list, however many
        there are (a backend that restarts closes them all at once)."""
        return self._close_where(lambda u: u in stirred and not u.stream.is_clean())

    def close_idle(self, older_than: float = 0.0) -> int:
        """Close idle connections unused for `older_than` seconds; returns how many."""
        cutoff = time.monotonic() - older_than
        return self._close_where(lambda u: u.since <= cutoff)

    def _close_where(self, doomed: Callable[[Upstream], bool]) -> int:
        """Close the idle connections (plain and TLS) for which `doomed` holds, in
        one pass over each list; an emptied TLS list goes. How many."""
        gone: list[Upstream] = []
        last = self.last
        for key, idle in [("", self.idle), *self.idle_tls.items()]:
            keep: list[Upstream] = []
            for upstream in idle:
                (gone if doomed(upstream) else keep).append(upstream)
            if len(keep) < len(idle):
                idle[:] = keep
            if key and not keep:
                del self.idle_tls[key]
            elif not key and last is not None and doomed(last):  # the newest, after them
                self.last = None
                gone.append(last)
        self.budget.idle -= len(gone)
        for upstream in gone:  # out of the lists first: closing may switch greenlets
            upstream.close()
        return len(gone)

    @staticmethod
    def is_open(upstream: Upstream) -> bool:
        """True if an idle pooled connection is as it was left: the backend has not
        closed, reset or written on it (for TLS: nothing waits in OpenSSL or on
        the TCP socket under it). Looked at before any request goes on it (`_take`,
        `acquire_idle`), so that such a connection costs a new one, not a stray
        response read as the request's answer, nor the 502 of a request that
        may not go twice (`balancer.relay.can_replay`)."""
        if upstream.pool:
            return upstream.stream.is_clean() and peek_under(upstream.sock) == OPEN
        return upstream.stream.is_untouched()

    # passive health ------------------------------------------------------
    def is_available(self) -> bool:
        """Whether a request may go here now; an expired down mark becomes the
        one half-open probe, so call this only for a backend you will use."""
        if self.state is UP and not self.checked_down:
            return True
        if self.checked_down:
            return False
        now = time.monotonic()
        if now >= self.down_until:  # DOWN expired, or a PROBING probe went silent
            self.state = PROBING
            self.down_until = now + self.fail_timeout
            return True
        return False

    @property
    def is_healthy(self) -> bool:
        """Up by every account (no side effect, unlike `is_available`)."""
        return self.state is UP and not self.checked_down

    def record_success(self) -> None:
        if self.fails or self.state is not UP:
            if self.state is not UP:
                log.info("backend %s is up again: a request succeeded after %.1f s down",
                         self.key, time.monotonic() - self.down_since)
            self.mark_up()

    def mark_up(self) -> None:
        """Clear the passive down mark and wake everything waiting for this backend."""
        self.fails = 0
        self.state = UP
        self.mark_recovered()

    def record_failure(self, fall: int, error: object = None) -> None:
        """Count a failed request (`error`: what failed, kept unformatted)."""
        self.fails += 1
        self.last_error = error
        if self.state is PROBING or self.fails >= fall:
            now = time.monotonic()
            if self.state is UP:
                self.down_since = now
                log.warning("backend %s is down: %d failure%s in a row, the last: %s; "
                            "one request tries it again in %g s", self.key, self.fails,
                            "" if self.fails == 1 else "s", error, self.fail_timeout)
            self.state = DOWN
            self.down_until = now + self.fail_timeout
            self.close_idle()

    def recovered_event(self) -> threading.Event:
        """An event set the next time this backend recovers (take it before trying)."""
        return self._recovered

    def mark_recovered(self) -> None:
        """Wake everything waiting for this backend to come back."""
        recovered, self._recovered = self._recovered, threading.Event()
        recovered.set()

    def health_state(self) -> str:
        """UP, DOWN or PROBING as an operator should see it now: a backend that
        failed is not up again until a request (or an active check) succeeded,
        however long ago its down mark expired."""
        if self.checked_down or self.state is DOWN:
            return DOWN
        return self.state

    def health_problem(self) -> str:
        """Why the backend is not up: the last failed active check's problem, or the
        last failed request's error (formatted here, for the API, never per
        request); while it is up, its health check's own failure (a bug: the
        verdict is kept, unchecked meanwhile), else ""."""
        if self.checked_down:
            return self.check_problem
        if self.state is UP:
            return self.check_failure
        return str(self.last_error or "")

    @property
    def is_idle(self) -> bool:
        return self.in_flight == 0

    def __repr__(self) -> str:
        idle = len(self.pooled()) + sum(len(pool) for pool in self.idle_tls.values())
        return (f"<Backend {self.key} {self.state} in_flight={self.in_flight} "
                f"idle={idle} fails={self.fails}>")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class BackendRegistry:
    """The worker's backends by address; created on first mention at compile time."""

    def __init__(self, *, connect_timeout: float, fail_timeout: float,
                 max_idle: int = 1024, idle_timeout: float = 30.0, io: IO | None = None,
                 budget: IdleBudget | None = None, ca_bundle: str = "",
                 listeners: OwnListeners | None = None,
                 dns_hold: float = HOLD) -> None:
        self.connect_timeout = connect_timeout
        self.fail_timeout = fail_timeout
        self.dns_hold = dns_hold  # `dns.hold`: each named backend's `Name.hold`
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        # seconds between sweeps: an idle connection is closed at most this late
        self.sweep_every = min(SWEEP_EVERY, idle_timeout / 4)
        self.io = io if io is not None else IO()
        self.tls = BackendTLS(ca_bundle)  # contexts made when an https:// backend connects
        self.budget = budget if budget is not None else IdleBudget()
        # the worker's listening addresses (`balancer.server.Worker.listen` adds them)
        self.listeners = listeners if listeners is not None else OwnListeners()
        self.backends: dict[str, Backend] = self.budget.backends
        # the worker's sweep loop sets it: called in the event loop when a
        # connection is queued in `stirred` (None: nothing is queued)
        self.wake: Callable[[], None] | None = None
        self.stirred: list[tuple[Backend, Upstream]] = []

    def get(self, address: str) -> Backend:
        addr = parse_backend_addr(address)
        key = str(addr)
        backend = self.backends.get(key)
        if backend is None:
            backend = self.backends[key] = Backend(
                addr, connect_timeout=self.connect_timeout, fail_timeout=self.fail_timeout,
                max_idle=self.max_idle, idle_timeout=self.idle_timeout,
                dns_hold=self.dns_hold, io=self.io,
                budget=self.budget, tls=self.tls, listeners=self.listeners, notice=self.notice)
        return backend

    def notice(self, backend: Backend, upstream: Upstream) -> None:
        """A readiness of `upstream` nobody waited for (in the event loop): if it
        may be idle (its last response complete) and bytes or EOF did arrive
        (`Stream.is_clean`: a late readiness from its last read is not enough),
        queue it for `drop_stirred` and wake the sweep loop."""
        wake, parser = self.wake, upstream.parser
        if wake is None or parser is None or not parser.complete or parser.upgraded:
            return  # in use: its relay reads what came
        if upstream.stream.is_clean():
            return  # a readiness from before it went idle: nothing came (watched afresh)
        self.stirred.append((backend, upstream))
        wake()

    def drop_stirred(self) -> int:
        """Close the queued connections still idle that the backend closed or
        wrote on (`Backend.drop`: one pass per backend); how many."""
        stirred, self.stirred = self.stirred, []
        by_backend: dict[Backend, set[Upstream]] = {}
        for backend, upstream in stirred:
            by_backend.setdefault(backend, set()).add(upstream)
        return sum(backend.drop(upstreams) for backend, upstreams in by_backend.items())

    def sweep(self) -> int:
        """Close every backend's idle connections past their idle timeout or on
        which anything arrived (`Backend.sweep`); how many."""
        if not self.budget.idle:
            return 0
        now = time.monotonic()
        return sum(backend.sweep(now) for backend in list(self.backends.values()))

    def prune(self, in_use: set[str]) -> None:
        """Forget backends no rule names any more (closing their idle sockets)."""
        for key in list(self.backends):
            if key not in in_use and self.backends[key].is_idle:
                self.backends.pop(key).close_idle()
