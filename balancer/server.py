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
from gevent.event import Event

from balancer import inline
from balancer.accepting import Listener
from balancer.actions import ActionCompiler, fallback_routes
from balancer.challenges import Challenges
from balancer.challenges import follow as follow_challenges
from balancer.connection import Context, expire_client, handle_client, resume_client
from balancer.descriptors import connection_budget, connection_cap, soft_limit
from balancer.failures import FailureReport
from balancer.following import TableFollower
from balancer.health import HealthChecks
from balancer.heap import release as release_heap
from balancer.http11 import Limits
from balancer.limits import FILE_NAME as LIMITS_FILE
from balancer.limits import SharedBuckets
from balancer.lingering import Lingering
from balancer.netio import IO, TLSIO, GeventIO
from balancer.pages import Pages
from balancer.pool import STIRRED_DELAY, BackendRegistry, IdleBudget
from balancer.restarts import Restarts, every
from balancer.serving import KEEP_QUIET, Slots
from balancer.settings import Settings
from balancer.sketch import SLOT_SECONDS
from balancer.stats import Stats
from balancer.stores.base import StoreError, TableChange, TableData
from balancer.stores.snapshot import Snapshot
from balancer.table import RoutingTable, TableHolder, misdirected
from balancer.tls import TLSFront, collect, fill, follow, refresh

log = logging.getLogger("balancer")
# While draining, a keep-alive connection idle this long is closed. Not at
# once: a busy client's next request may be on the wire, and its response
# will carry `Connection: close` instead (the close race of RFC 9112 §9.6).
DRAIN_IDLE = 1.0
HELD_ANSWER_TIME = 1.0  # seconds held requests get to send their 503 before the cut
SHARED_ACCEPT_BATCH = 256  # accept() calls per wake-up when workers share a listener
QUIET_EVERY = 10.0  # seconds between looks for a burst's parked greenlets (`quiet_loop`)


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
                                        ca_bundle=settings.tls.backend_ca_bundle,
                                        dns_hold=settings.dns.hold)
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
                                    Snapshot.of(settings.store.snapshot, store, run_dir))
        self.access_log = (log_factory or _access_log)(settings)
        limits = settings.limits
        self.limits = Limits(limits.max_request_line, limits.max_header_bytes, limits.max_headers)
        self.servers: list[Listener] = []
        # closing connections whose client may still be sending read on, within bounds
        self.lingering = Lingering(timeouts.linger, timeouts.linger_idle,
                                   limits.max_linger_bytes, self.stats)
        self.slots = Slots(self.max_connections)  # the greenlets serving clients
        self.budget.slots = self.slots
        if isinstance(self.io, GeventIO):  # idle keep-alive connections wait with no greenlet
            self.io.resume = self.slots.resume
            self.io.on_wake = resume_client
            self.io.on_expire = expire_client
            self.io.serve_ready = inline.serve_ready  # a keep-alive request in the hub
            self.io.serve_new = inline.serve_new  # and a new connection's first one
            self.io.on_closed = self.slots.leave  # a connection closed in the hub
            self.io.on_overdue = inline.overdue
            self.io.servable = inline.servable
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
                       challenges=self.challenges,
                       shared_callbacks=isinstance(self.io, GeventIO),
                       lingering=self.lingering)

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
        self.tables.following = True
        try:
            self.store.watch(self.tables.on_store, lambda: self.stopping,
                             self.tables.served_version)
        finally:
            self.tables.following = False

    # listeners -----------------------------------------------------------
    def listen(self, sockets: list[tuple[socket.socket, str]]) -> None:
        """Serve clients on already-bound sockets; (socket, role) pairs."""
        for sock, role in sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                # accepted sockets inherit it: no setsockopt per connection
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.registry.listeners.add(sock)  # a backend connection to it is refused
            ctx = self.context(role)
            self.contexts.append(ctx)
            if role == "tls":  # its handshake in a greenlet
                front = self.front()
                if self.settings.tls.refuse_domain_fronting:
                    ctx.sni_certs, ctx.misdirected = front.certs, misdirected
                server = Listener(sock, partial(front.serve, ctx=ctx,
                                                serve_client=handle_client), self.slots)
            else:  # under gevent, parked at once: its first request served in the hub
                gevent_io = isinstance(self.io, GeventIO)
                server = Listener(sock, ctx.start if gevent_io else ctx.serve, self.slots,
                                  plain=True, parked=gevent_io)
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
        while draining, close idle keep-alive connections); each tick, whatever
        the last one raised (bug: an exception ended the watchdog, and with it
        every deadline of the worker's connections)."""
        tick = min(0.25, min(_waiting_timeouts(self.settings.timeouts)) / 4)
        every(tick, self.expire_overdue, lambda: self.stopping,
              _restarts("the watchdog", "its next tick"))

    def expire_overdue(self) -> None:
        """One tick of the watchdog."""
        io = self.io
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
        return len(self.tls.certs.records)

    def quiet_loop(self) -> None:
        """Once a burst is over (at most KEEP_QUIET / 4 connections served when
        looked at), end the parked greenlets beyond KEEP_QUIET and give what
        they held back to the system: what a request in flight used (~8.5 KiB,
        docs/performance.md) otherwise stays with the worker."""
        def quiet() -> None:
            if len(self.slots.busy) <= KEEP_QUIET // 4 and self.slots.shrink(KEEP_QUIET):
                gevent.sleep(0.1)  # the ended greenlets go first (from the loop)
                release_heap()

        every(QUIET_EVERY, quiet, lambda: self.stopping,
              _restarts("giving idle memory back", "the next look"))

    def sweep_loop(self) -> None:
        """Close idle pooled backend connections past `timeouts.backend_idle` or
        closed by their backend (`BackendRegistry.sweep`), off the request path;
        at once those whose backend closed or wrote while they were idle
        (`BackendRegistry.drop_stirred`, woken by `BackendRegistry.notice`)."""
        registry, stirred = self.registry, Event()
        registry.wake = stirred.set
        due = time.monotonic() + registry.sweep_every
        restarts = _restarts("the idle backend connections' sweep", "the next sweep")
        try:
            while not self.stopping:
                stirred.wait(max(0.0, due - time.monotonic()))
                try:
                    if stirred.is_set():
                        gevent.sleep(STIRRED_DELAY)  # those stirred together: one pass
                        stirred.clear()
                        registry.drop_stirred()
                    if time.monotonic() >= due:
                        due = time.monotonic() + registry.sweep_every
                        registry.sweep()
                except Exception as exc:  # (bug: the sweep ended: idle connections
                    restarts.failed(exc)  # kept past backend_idle, stirred ones reused)
        finally:
            registry.wake = None  # nothing is queued any more

    def missing_certs(self, hosts: list[str]) -> list[str]:
        """Those of `hosts` whose certificate this worker's TLS listeners do not
        serve (none without TLS listeners: it needs none)."""
        if self.tls is None:
            return []
        served = self.tls.certs.records
        return [host for host in hosts if host not in served]

    def fill_certs(self, signature: str, records: dict[str, dict[str, Any]]) -> int:
        """Serve certificates the store hides from this worker (`balancer.tls.fill`);
        how many were added."""
        if self.tls is None:
            return 0
        return fill(self.tls, self.store.certs(), signature, records)

    def collect_certs(self, signature: str) -> dict[str, Any]:
        """The records of the certificates this worker serves that the store hides
        (`balancer.tls.collect`): for a management process with none to hand over."""
        if self.tls is None:
            return {}
        return collect(self.tls, self.store.certs(), signature)

    def rotate_loop(self) -> None:
        """Start the heavy hitters' next interval every `SLOT_SECONDS`."""
        every(SLOT_SECONDS / 10, lambda: self.stats.top.rotate(time.monotonic(), self.stats),
              lambda: self.stopping, _restarts("the heavy hitters' rotation", "the next"))

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


def _restarts(loop: str, then: str) -> Restarts:
    """A worker loop's `Restarts`: "worker PID: LOOP failed unexpectedly (...); THEN"."""
    return Restarts(f"worker {os.getpid()}", log, quiet=False, loop=loop,
                    then=f"trying again at {then}")


def _is_reuseport(sock: socket.socket | None) -> bool:
    """Whether `sock` is one worker slot's own listening socket (SO_REUSEPORT)."""
    option = getattr(socket, "SO_REUSEPORT", None)
    return sock is not None and option is not None and \
        bool(sock.getsockopt(socket.SOL_SOCKET, option))


def _waiting_timeouts(timeouts: Any) -> list[float]:
    """The values of the timeouts that bound client and backend waits."""
    return [timeouts.client_header, timeouts.client_idle, timeouts.backend_connect,
            timeouts.backend_read, timeouts.linger_idle]


def _access_log(settings: Settings) -> Any:
    from balancer.accesslog import AccessLog

    return AccessLog(settings.log.access_log, settings.log.access_format)
