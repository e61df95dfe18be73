"""Clients that hang up while their request waits on its backend.

A long poll or a quiet event stream whose client goes away (a tab closed, a
page left) would otherwise hold its backend connection, and the backend's
work, until the backend writes again or `timeouts.backend_read` passes (then
counted against the backend as a timeout). The worker's watchdog
(`balancer.netio.GeventIO.expire`) hands each request that has waited on its
backend for `HANG_UP_AFTER`, its body all read (a client's end after a body the
balancer has not read yet is no hang-up), to `HangUps.watch`: its client socket joins one
epoll set, asked for `EPOLLRDHUP` (the peer ended its side: a FIN or a reset,
whatever bytes it sent before are still unread), and `HangUps.gone` polls that
set once per tick, with no wait. A request costs nothing here until it has
waited that long; one that has costs an `epoll_ctl` when it is first watched
and one when its exchange is over (none when its connection closed first: the
kernel drops a closed descriptor from the set), and every tick polls all of
them in one system call. Without epoll (not Linux) nothing is watched.
"""

from __future__ import annotations

import contextlib
import select
from typing import Any, Final

from gevent.monkey import get_original

# seconds a request waits on its backend before its client is watched
HANG_UP_AFTER: Final = 1.0
RDHUP: Final = getattr(select, "EPOLLRDHUP", 0)
# the OS's epoll (gevent's monkey-patched `select` has none); None: not Linux
EPOLL: Final[Any] = get_original("select", "epoll") if RDHUP else None


class HangUps:
    """The client sockets watched for their peer's end, each with the exchange it
    was watched for (a keep-alive connection's next request is watched anew)."""

    def __init__(self) -> None:
        self.epoll: Any = None  # made at the first watch (in the worker, after the fork)
        self.watched: dict[int, tuple[Any, Any]] = {}  # descriptor -> (connection, exchange)

    def watch(self, conn: Any, ex: Any) -> None:
        """Watch the client of `conn` while `ex` is its exchange."""
        fd = conn.sock.fileno()
        seen = self.watched.get(fd)
        if seen is not None and seen[0] is conn and seen[1] is ex:
            return
        if self.epoll is None:
            if EPOLL is None:
                return
            self.epoll = EPOLL()
        if seen is not None:  # the same descriptor, another connection or exchange
            self._forget(fd)
        try:
            self.epoll.register(fd, RDHUP)
        except OSError:  # (FileExistsError: already there, never forgotten: a bug)
            self.epoll.modify(fd, RDHUP)
        self.watched[fd] = (conn, ex)

    def gone(self) -> list[tuple[Any, Any]]:
        """The (connection, exchange) pairs whose client ended its side, of those
        still watched for the exchange in flight; the others are forgotten."""
        if not self.watched:
            return []
        for fd, (conn, ex) in list(self.watched.items()):
            if conn.exchange is not ex or conn.sock.fileno() != fd:  # over, or closed
                self._forget(fd)
        if not self.watched:
            return []
        found = []
        for fd, _events in self.epoll.poll(0):
            seen = self.watched.get(fd)
            if seen is not None:
                found.append(seen)
        return found

    def _forget(self, fd: int) -> None:
        del self.watched[fd]
        # closed (the kernel dropped it), or closed and its number reused
        with contextlib.suppress(OSError):
            self.epoll.unregister(fd)
