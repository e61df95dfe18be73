"""One worker: listeners, the store watcher, the access log and the routing table.

The composition root of a gevent worker (the caller has monkey-patched).
Configuration flows one way: store → `watch` (or the management process,
directly over the control socket) → the worker's `TableFollower`
(`balancer.following`: loss guard, compile) → `TableHolder.swap`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import gevent
from gevent.server import StreamServer

from balancer.actions import ActionCompiler, fallback_routes
from balancer.addr import Address
from balancer.challenges import Challenges
from balancer.challenges import follow as follow_challenges
from balancer.connection import Context, expire_client, handle_client, resume_client
from balancer.descriptors import (
    ACCEPT_PAUSE,
    connection_budget,
    connection_cap,
    is_exhausted,
    is_skipped,
    soft_limit,
)
from balancer.failures import FailureReport
from balancer.following import TableFollower
from balancer.health import HealthChecks
from balancer.heap import release as release_heap
from balancer.http11 import Limits
from balancer.limits import FILE_NAME as LIMITS_FILE
from balancer.limits import SharedBuckets
from balancer.netio import IO, TLSIO, GeventIO
from balancer.pages import Pages
from balancer.pool import BackendRegistry, IdleBudget
from balancer.serving import KEEP_QUIET, Slots
from balancer.settings import Settings
from balancer.sketch import SLOT_SECONDS
from balancer.stats import Stats
from balancer.stores.base import StoreError, TableChange, TableData
from balancer.stores.snapshot import Snapshot, snapshot_path
from balancer.table import RoutingTable, TableHolder
from balancer.tls import TLSFront, fill, follow, refresh

log = logging.getLogger("balancer")
# Listen queue length: the kernel caps it at net.core.somaxconn. A short queue
# drops handshakes of a burst of new connections (5,000 at once from wrk:
# TcpExtListenOverflows), and each dropped one costs its client a SYN-ACK
# retransmission, 1 s and more, before its first request is even read.
BACKLOG = 65535
# While draining, a keep-alive connection idle this long is closed. Not at
# once: a busy client's next request may be on the wire, and its response
# will carry `Connection: close` instead (the close race of RFC 9112 §9.6).
DRAIN_IDLE = 1.0
HELD_ANSWER_TIME = 1.0  # seconds held requests get to send their 503 before the cut
SHARED_ACCEPT_BATCH = 256  # accept() calls per wake-up when workers share a listener
QUIET_EVERY = 10.0  # seconds between looks for a burst's parked greenlets (`quiet_loop`)
SKIPPED_IN_A_ROW = 64  # aborted connections skipped per wake-up before the loop goes on


class Listener(StreamServer):
    """gevent's StreamServer that serves each connection in one of the worker's
    `Slots` and whose accept outlives running out of descriptors.

    Accepted connections start at once in a reused greenlet
    (`balancer.serving`), not from gevent's callback queue, which runs for at
    most the switch interval (5 ms) per loop iteration, measured from the loop
    time cached before the iteration's I/O: once that I/O took 230 ms (5,000
    busy connections) about 50 queued greenlets started per iteration, and a
    burst of 5,000 new connections took 10 s to be served. While the slots are
    full the listener stops accepting; the slot that frees resumes it.

    gevent logs a traceback for every failed accept (once a second under
    EMFILE, outside the log format) and retries within 10 ms. Here an
    exhausted accept logs one line per episode and rests `ACCEPT_PAUSE`
    seconds, as nginx does (`balancer.descriptors`).
    """

    def __init__(self, sock: socket.socket, handle: Callable[..., Any], slots: Slots,
                 plain: bool = False) -> None:
        super().__init__(sock, handle, spawn=None)
        self.slots = slots
        slots.on_free.append(self.resume)
        self.plain = plain  # hand out OS sockets, not gevent's (see `do_read`)
        self.exhausted_since: float | None = None  # the episode under way
        self.pause_timer: Any = None

    def full(self) -> bool:
        return self.slots.is_full()

    def do_handle(self, *args: Any) -> None:
        """Serve an accepted (socket, address) in a slot (the handler closes the socket)."""
        self.slots.start(self._handle, args)

    def _do_read(self) -> None:
        """The listening socket is readable: accept what waits (the loop's callback).

        A `plain` listener accepts in `Slots.accept` (compiled, no Python frame
        per connection) and hands out the OS socket, non-blocking, not gevent's
        socket object: the connection's `balancer.netio.EventedStream` reads,
        writes and waits on it itself, and gevent's wrapper cost a Python-level
        set-up and close, two io watchers (an fcntl each) and a getsockname of
        its own per connection (issue 21). Others (TLS) go through gevent's
        loop and `do_read`, with gevent's sockets."""
        if not self.plain:
            super()._do_read()
            return
        listener = self.socket
        raw = getattr(listener, "_sock", listener)
        handle, slots = self._handle, self.slots
        for _ in range(SKIPPED_IN_A_ROW):
            try:
                if slots.accept(raw, handle, self.max_accept):
                    self.exhausted_since = None
            except OSError as exc:
                if not is_skipped(exc):  # out of descriptors (or worse): pause
                    self.rest(exc)
                    return
                continue  # that one connection was aborted: go on with the queue
            break
        if slots.is_full():
            self.stop_accepting()  # the slot that frees resumes it (`resume`)

    def do_read(self) -> Any:
        """One accepted (gevent socket, address) or None (TLS listeners)."""
        try:
            accepted = super().do_read()
        except OSError as exc:
            if is_exhausted(exc):
                self.rest(exc)
            elif not is_skipped(exc):
                raise
            return None
        if accepted is not None and self.exhausted_since is not None:
            self.exhausted_since = None
        return accepted

    def rest(self, exc: OSError) -> None:
        """Stop accepting for ACCEPT_PAUSE seconds; log when an episode starts."""
        if self.exhausted_since is None:
            self.exhausted_since = time.monotonic()
            log.error("accept on %s failed: %s; pausing accepts for %.1f s at a time until "
                      "descriptors free up (%d connections open)", self.address,
                      exc.strerror or exc, ACCEPT_PAUSE, len(self.slots))
        self.stop_accepting()
        if self.pause_timer is not None and self.pause_timer.active:
            return
        if self.pause_timer is not None:  # a gevent timer started again once it fired
            self.pause_timer.close()      # fires at once: accepts retried in a busy loop
        self.pause_timer = gevent.get_hub().loop.timer(ACCEPT_PAUSE)
        self.pause_timer.start(self.resume)

    def resume(self) -> None:
        if self.started and not self.full():
            self.start_accepting()

    def close(self) -> None:
        if self.resume in self.slots.on_free:
            self.slots.on_free.remove(self.resume)
        if self.pause_timer is not None:
            self.pause_timer.close()
            self.pause_timer = None
        super().close()


def bind(address: Address, backlog: int = BACKLOG, reuseport: bool = False) -> socket.socket:
    """A listening TCP socket on `address` (raises OSError naming nothing; callers do);
    `reuseport`: one of a SO_REUSEPORT group (`balancer.listening`)."""
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if address.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    # accepted sockets inherit it: no Nagle delay on split writes (gevent's WSGI server)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((address.host, address.port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class Worker:
    """Everything one worker process runs; built from read-only settings.

    `io` is how it waits and moves bytes (`balancer.netio`): gevent's unless
    given (the threaded baseline gives the blocking `IO`)."""

    def __init__(self, settings: Settings, store: Any,
                 log_factory: Callable[[Settings], Any] | None = None,
                 io: IO | None = None, run_dir: str | None = None) -> None:
        self.settings = settings
        self.io = io if io is not None else GeventIO()
        self.store = store
        self.stats = Stats()
        self.pages = Pages.load(settings.server.pages_dir)
        timeouts = settings.timeouts
        # what the descriptor limit allows (balancer.descriptors; the arbiter logs it)
        limit = soft_limit()
        self.max_connections = connection_cap(settings.server.max_connections, limit)
        # idle pooled connections get what the open clients leave of the descriptors
        self.budget = IdleBudget(connection_budget(limit))
        self.registry = BackendRegistry(connect_timeout=timeouts.backend_connect,
                                        fail_timeout=timeouts.fail_timeout,
                                        max_idle=self.max_connections,
                                        idle_timeout=timeouts.backend_idle,
                                        io=self.io, budget=self.budget,
                                        ca_bundle=settings.tls.backend_ca_bundle)
        _, no_hosts = fallback_routes(self.pages, self.stats)
        self.holder = TableHolder(RoutingTable(0, {}, no_hosts))
        # rules' limits: counters shared by every worker of the run directory
        buckets = SharedBuckets(os.path.join(run_dir, LIMITS_FILE) if run_dir else None)
        self.compiler = ActionCompiler(registry=self.registry, pages=self.pages,
                                       stats=self.stats, holder=self.holder, buckets=buckets)
        self.health = HealthChecks(self.registry)  # active checks follow the table
        self.failure_report = FailureReport(self.stats)  # 502/504 summed up once a second
        self.tables = TableFollower(store, self.holder, self.compiler, self.registry,
                                    self.health, self.stats,
                                    Snapshot(snapshot_path(settings.store.snapshot, store),
                                             store.identity()))
        self.access_log = (log_factory or _access_log)(settings)
        limits = settings.limits
        self.limits = Limits(limits.max_request_line, limits.max_header_bytes, limits.max_headers)
        self.servers: list[Listener] = []
        self.slots = Slots(self.max_connections)  # the greenlets serving clients
        self.budget.slots = self.slots
        if isinstance(self.io, GeventIO):  # idle keep-alive connections wait with no greenlet
            self.io.resume = self.slots.resume
            self.io.on_wake = resume_client
            self.io.on_expire = expire_client
        self.contexts: list[Context] = []
        self.tls: TLSFront | None = None  # with TLS listeners (`front`)
        self.challenges = Challenges()  # ACME answers, followed from the store
        self.draining = False  # stopped accepting; every response closes its connection
        self.stopping = False  # the watcher and the watchdog end

    def context(self, role: str) -> Context:
        """What the connections of one listener share; `role`: proxy, internal or tls."""
        return Context(holder=self.holder, pages=self.pages, stats=self.stats,
                       access_log=self.access_log, trusted=role == "internal",
                       limits=self.limits, timeouts=self.settings.timeouts,
                       io=TLSIO(self.io) if role == "tls" else self.io,
                       spin_max_waiting=self.settings.limits.spin_max_waiting,
                       scheme=b"https" if role == "tls" else b"http",
                       challenges=self.challenges)

    # routing table -------------------------------------------------------
    def apply(self, data: TableData | TableChange) -> bool:
        """Install a whole table or a change the store delivered (`TableFollower`);
        False if it is not served (invalid, or the store lost its table)."""
        return self.tables.on_store(data)

    def reload(self) -> int:
        """Re-read the store now and apply it; returns the version served."""
        return self.tables.reload()

    @property
    def loaded(self) -> bool:
        return self.tables.loaded

    def watch_loop(self) -> None:
        """Follow the store until the worker stops."""
        self.store.watch(self.tables.on_store, lambda: self.stopping,
                         self.tables.served_version)

    # listeners -----------------------------------------------------------
    def listen(self, sockets: list[tuple[socket.socket, str]]) -> None:
        """Serve clients on already-bound sockets; (socket, role) pairs."""
        for sock, role in sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                # accepted sockets inherit it: no setsockopt per connection
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ctx = self.context(role)
            self.contexts.append(ctx)
            handler = (partial(self.front().serve, ctx=ctx, serve_client=handle_client)
                       if role == "tls" else partial(handle_client, ctx=ctx))
            server = Listener(sock, handler, self.slots, plain=role != "tls")
            server.max_accept = self.accept_batch(sock)
            server.start()
            self.servers.append(server)

    def accept_batch(self, sock: socket.socket | None = None) -> int:
        """Connections taken from the accept queue per wake-up of a listener.

        A wake-up comes once per loop iteration, and under load an iteration
        lasts as long as the work of every ready connection (230 ms at 5,000
        busy connections). gevent's default of 100 then admitted a burst of
        5,000 new connections over 10 s, the last ones waiting that long for
        their first request to be read; one worker takes every connection
        waiting (as nginx `multi_accept on`). Workers sharing one accept queue
        take a batch each, so that a burst spreads over them: the less loaded
        worker iterates more often and takes more. With 2 workers and a burst
        of 5,000, batches of 16 still left 700 unaccepted after 5 s (583 wrk
        timeouts); 256 took all within the first second (0 timeouts, the
        connections split 2,356 / 2,644). A worker's own SO_REUSEPORT socket
        (`balancer.listening`) holds only its share: it takes every connection.
        """
        if self.settings.effective_workers() > 1 and not _is_reuseport(sock):
            return SHARED_ACCEPT_BATCH
        return self.max_connections

    def front(self) -> TLSFront:
        """The TLS front (made with the first TLS listener), serving the store's
        certificates from then on."""
        if self.tls is None:
            self.tls = TLSFront(self.settings.tls, self.stats.tls_handshakes, self.challenges)
            certs = self.store.certs()
            with contextlib.suppress(StoreError):  # `follow` reports it and keeps trying
                self.tls.update(certs.all(), certs.damaged)
            gevent.spawn(follow, self.tls, certs, lambda: self.stopping)
        return self.tls

    def watchdog_loop(self) -> None:
        """Raise TimeoutError in every connection whose deadline passed (and,
        while draining, close idle keep-alive connections)."""
        tick = min(0.25, min(_waiting_timeouts(self.settings.timeouts)) / 4)
        io = self.io
        while not self.stopping:
            gevent.sleep(tick)
            now = io.tick()
            if self.draining:
                io.close_idle(now + DRAIN_IDLE)
            io.expire(now)

    def start(self) -> None:
        self.access_log.start()
        gevent.spawn(self.watch_loop)
        gevent.spawn(self.watchdog_loop)
        gevent.spawn(self.failure_report.report_loop, lambda: self.stopping)
        gevent.spawn(self.rotate_loop)
        gevent.spawn(self.quiet_loop)
        gevent.spawn(self.sweep_loop)
        gevent.spawn(follow_challenges, self.challenges, self.store.acme(), lambda: self.stopping)

    def reload_challenges(self) -> int:
        """Read the store's ACME challenges now (the issuer just published one);
        how many are served."""
        self.challenges.update(self.store.acme().challenges())
        return len(self.challenges.tokens) + len(self.challenges.alpn)

    def reload_certs(self) -> int:
        """Serve the store's certificates now (the management process just wrote
        one); how many are served (0 without TLS listeners)."""
        if self.tls is None:
            return 0
        refresh(self.tls, self.store.certs())
        return len(self.tls.by_host)

    def quiet_loop(self) -> None:
        """Once a burst is over (at most KEEP_QUIET / 4 connections served when
        looked at), end the parked greenlets beyond KEEP_QUIET and give what
        they held back to the system: ~16 KiB per request in flight otherwise
        stays with the worker (docs/performance.md)."""
        while not self.stopping:
            gevent.sleep(QUIET_EVERY)
            if len(self.slots.busy) <= KEEP_QUIET // 4 and self.slots.shrink(KEEP_QUIET):
                gevent.sleep(0.1)  # the ended greenlets go first (from the loop)
                release_heap()

    def sweep_loop(self) -> None:
        """Close idle pooled backend connections past `timeouts.backend_idle` or
        closed by their backend (`BackendRegistry.sweep`), off the request path."""
        registry = self.registry
        while not self.stopping:
            gevent.sleep(registry.sweep_every)
            registry.sweep()

    def missing_certs(self, hosts: list[str]) -> list[str]:
        """Those of `hosts` whose certificate this worker's TLS listeners do not
        serve (none without TLS listeners: it needs none)."""
        if self.tls is None:
            return []
        loaded = self.tls.loaded
        return [host for host in hosts if host not in loaded]

    def fill_certs(self, signature: str, records: dict[str, dict[str, Any]]) -> int:
        """Serve certificates the store hides from this worker (`balancer.tls.fill`);
        how many were added."""
        if self.tls is None:
            return 0
        return fill(self.tls, self.store.certs(), signature, records)

    def rotate_loop(self) -> None:
        """Start the heavy hitters' next interval every `SLOT_SECONDS`."""
        while not self.stopping:
            gevent.sleep(SLOT_SECONDS / 10)
            self.stats.top.rotate(time.monotonic(), self.stats)

    def release_held(self) -> None:
        """Answer every held request 503 now and hold no more (stopping for good).

        The contexts are marked draining first, so that each 503 closes its
        connection. Bug fixed: on SIGTERM this runs in the signal's greenlet
        before `stop` sets `draining`; a `spin_when_down` request whose backoff
        timer or connect failure resumed it in between saw the holds closed but
        not the drain, and answered its 503 keep-alive (no `Connection: close`)."""
        self.close_every_response()
        self.compiler.holds.close()

    def close_every_response(self) -> None:
        """From now on every response closes its connection."""
        for ctx in self.contexts:
            ctx.draining = True

    def stop(self, graceful: float) -> None:
        """Drain: stop accepting, answer in-flight requests (each response then
        closes its connection), close idle keep-alive connections. Held
        requests stay held (a reload's old worker still releases them) until
        `release_held`, called at once on SIGTERM and at the latest after
        `graceful` seconds; whatever is still open then is cut."""
        self.draining = True
        self.close_every_response()
        for server in self.servers:
            server.close()
        self.slots.join(timeout=graceful)
        if self.compiler.holds.count:  # still held at the end of a reload's drain
            self.release_held()  # each gets its 503, never an empty reply
            self.slots.join(timeout=HELD_ANSWER_TIME)
        self.stopping = True
        self.failure_report.report()  # the last second's 502/504
        self.slots.kill(timeout=1)
        self.health.stop()
        self.access_log.close()
        self.store.close()


def _is_reuseport(sock: socket.socket | None) -> bool:
    """Whether `sock` is one worker slot's own listening socket (SO_REUSEPORT)."""
    option = getattr(socket, "SO_REUSEPORT", None)
    return sock is not None and option is not None and \
        bool(sock.getsockopt(socket.SOL_SOCKET, option))


def _waiting_timeouts(timeouts: Any) -> list[float]:
    """The values of the timeouts that bound client and backend waits."""
    return [timeouts.client_header, timeouts.client_idle, timeouts.backend_connect,
            timeouts.backend_read]


def _access_log(settings: Settings) -> Any:
    from balancer.accesslog import AccessLog

    return AccessLog(settings.log.access_log, settings.log.access_format)
