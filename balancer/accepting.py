"""The worker's listening sockets and what accepts on them.

Invariants:
* Each accepted connection holds one of the worker's `Slots`: a plain one
  starts parked with no greenlet (`parked`: `Slots.accept` with `parked`, its first request
  served in the hub like a keep-alive one, `balancer.inline`), a TLS one in a
  greenlet (its handshake); a full worker stops accepting (`Listener.full`),
  so the kernel's queue (or another worker's socket) holds what it cannot
  take yet.
* Accept outlives running out of descriptors: an exhausted accept logs one
  line per episode and rests `ACCEPT_PAUSE` seconds on a fresh timer (a
  fired gevent timer started again fires at once); aborted connections are
  skipped, at most `SKIPPED_IN_A_ROW` per wake-up.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent.server import StreamServer

from balancer.addr import Address
from balancer.descriptors import ACCEPT_PAUSE, is_exhausted, is_skipped
from balancer.serving import Slots

log = logging.getLogger("balancer")
# Listen queue length: the kernel caps it at net.core.somaxconn. A short queue
# drops handshakes of a burst of new connections (5,000 at once from wrk:
# TcpExtListenOverflows), and each dropped one costs its client a SYN-ACK
# retransmission, 1 s and more, before its first request is even read.
BACKLOG = 65535
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
                 plain: bool = False, parked: bool = False) -> None:
        super().__init__(sock, handle, spawn=None)
        self.slots = slots
        slots.on_free.append(self.resume)
        self.plain = plain  # hand out OS sockets, not gevent's (see `do_read`)
        # with `plain`: `handle` runs in the hub, no greenlet (`Slots.accept` with `parked`)
        self.parked = parked
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
        its own per connection (issue 21). A `parked` one gives each to its
        handler in the hub (`Slots.accept` with `parked`): it starts parked, with no greenlet.
        Others (TLS) go through gevent's loop and `do_read`, with gevent's
        sockets."""
        if not self.plain:
            super()._do_read()
            return
        listener = self.socket
        raw = getattr(listener, "_sock", listener)
        handle, slots = self._handle, self.slots
        parked = self.parked
        for _ in range(SKIPPED_IN_A_ROW):
            try:
                if slots.accept(raw, handle, self.max_accept, parked):
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
