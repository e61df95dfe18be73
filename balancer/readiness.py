"""Waiting for a socket to become readable before reading it (gevent only).

gevent's ``socket.recv`` tries the syscall first and waits only after
EAGAIN. On a proxy's two hot reads, a backend's response right after the
request went out and a client's next request right after a response, the
data is almost never there yet: that first try is a wasted syscall and an
exception. A `Readable` is kept for a socket's whole life; its `wait`
parks the greenlet until the socket is readable, and the ``recv`` that
follows finds the data.

Its io watcher stays started between waits. Starting a libev watcher again
costs an ``epoll_ctl`` that always fails with EEXIST (libev keeps stopped fds
registered and re-adds them lazily): two wasted syscalls per proxied
request, one per wait. A readiness nobody waits for (pipelined bytes, or a
peer that closed while the greenlet waits elsewhere) stops the watcher, so
level-triggered epoll cannot spin on it; the next wait starts it again.

Measured with the bare relay of scripts/bench_proxy.py (wrk -c100, 4.5 KB
page): 114–135 µs of CPU per request with recv-first, 63–79 µs waiting first.

Invariants:
* Outside gevent a socket has no `Readable` (None: the threaded baseline's
  blocking sockets wait in ``recv``); every caller treats None as "just read".
* Whoever owns the socket closes its watcher (`unwatch`) when closing it.
* One greenlet at a time waits on a `Readable`. An exception thrown into it
  while it waits (the watchdog's TimeoutError) ends the wait, and the
  readiness then finds nobody waiting.
"""

from __future__ import annotations

import socket
from typing import Any, Final

from gevent import get_hub, getcurrent
from gevent.monkey import is_module_patched

READ: Final = 1  # libev's EV_READ


class Readable:
    """A socket's read readiness, watched for the socket's whole life."""

    __slots__ = ("io", "hub", "waiter")

    def __init__(self, sock: socket.socket) -> None:
        self.hub = get_hub()
        self.io: Any = self.hub.loop.io(sock.fileno(), READ)  # None once closed
        self.waiter: Any = None  # the greenlet parked in `wait`

    def wait(self) -> None:
        """Park the current greenlet until the socket is readable."""
        io = self.io
        if not io.active:
            io.start(self._ready)
        self.waiter = getcurrent()
        try:
            self.hub.switch()
        finally:
            self.waiter = None

    def _ready(self) -> None:
        """The loop's callback (in the hub): wake the waiter, or stop watching."""
        waiter = self.waiter
        if waiter is None:
            self.io.stop()
            return
        self.waiter = None
        waiter.switch()

    def close(self) -> None:
        """Stop watching for good (again: nothing happens)."""
        if self.io is not None:
            self.io.close()
            self.io = None

    @property
    def closed(self) -> bool:
        return self.io is None


def raw_socket(sock: socket.socket, watcher: Readable | None) -> Any:
    """The socket to read and write: with a `watcher` (gevent), the OS socket
    under gevent's, non-blocking; without one, `sock` itself.

    The hot path calls it directly: gevent's ``recv`` and ``send`` are Python
    wrappers, a frame each per call. Its reads then go through `receive`
    (EAGAIN waits on the socket's `Readable`), its sends through
    `balancer.outbox.send_all` (EAGAIN falls back to gevent's sendall)."""
    return sock if watcher is None else getattr(sock, "_sock", sock)


def receive(raw: Any, watcher: Readable | None, size: int) -> bytes:
    """``raw.recv(size)``, waiting on `watcher` while no data is there yet."""
    while True:
        try:
            return raw.recv(size)
        except BlockingIOError:
            if watcher is None:  # a blocking socket does not raise this
                raise
            watcher.wait()


def is_evented() -> bool:
    """Whether sockets are gevent's (this process is monkey-patched)."""
    return is_module_patched("socket")


def unwatch(watcher: Readable | None) -> None:
    """Close a socket's `Readable` (None is fine)."""
    if watcher is not None:
        watcher.close()
