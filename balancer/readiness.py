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

What waiting first saves is measured in docs/ARCHITECTURE.md ("Hot path
notes").

An idle keep-alive client connection is `park`ed: no greenlet waits for
it; the readiness calls the function it was parked with (in the hub), which
hands the connection to a greenlet again (`balancer.netio.GeventIO.park`).

An idle pooled backend connection keeps its watcher started too
(`watch_idle`): a readiness nobody waits for then marks it `stirred` (the
backend wrote or closed on a connection with no request, or a readiness
from before it went idle arrived late), and the pool drops it instead of
handing it to the next request if the socket, peeked at, shows bytes or
EOF (`balancer.netio`); else it watches afresh (`rewatch_idle`). Such a
readiness also calls the socket's `on_stir`, if it has one (set once per
backend connection: the pool closes a stirred idle connection at once,
`balancer.pool.BackendRegistry.notice`); nothing is set or cleared when a
connection is taken or released.

Invariants:
* Only gevent's sockets have a `Readable` (`balancer.netio.EventedStream`);
  whoever owns the socket closes its watcher when closing it.
* Only its `Readable` starts and stops a socket's read watcher, so `watching`
  says whether it is started without asking gevent, with the two ways it
  stops otherwise: libev stops it when epoll refuses its descriptor (ENOMEM,
  ENOSPC: the callback is told EV_ERROR; a descriptor closed while watched,
  EBADF, aborts the process in libev's assertion) and gevent when the
  callback raised.
* One greenlet at a time waits on a `Readable`, and only while it is not
  parked. An exception thrown into it
  while it waits (the watchdog's TimeoutError) ends the wait, and the
  readiness then finds nobody waiting.
"""

from __future__ import annotations

import socket
from typing import Any, Final

from gevent import get_hub, getcurrent
from gevent.exceptions import BlockingSwitchOutError
from greenlet import greenlet

READ: Final = 1  # libev's EV_READ
ERROR: Final = -0x80000000  # libev's EV_ERROR, as gevent passes it (a C int)
# greenlet's own switch, called as SWITCH(target): no method looked up by name per
# call, and for the hub none of gevent's `Hub.switch` wrapper (its `switch_out`
# lookup on the current greenlet, which only the hub itself has: `wait` refuses
# to run in the hub as that wrapper would). Two of each per proxied request.
SWITCH: Final[Any] = greenlet.switch


class Readable:
    """A socket's read readiness, watched for the socket's whole life."""

    __slots__ = ("io", "hub", "watching", "waiter", "stirred", "on_ready", "ready_arg",
                 "on_stir")

    def __init__(self, sock: socket.socket) -> None:
        self.hub = get_hub()
        self.io: Any = self.hub.loop.io(sock.fileno(), READ)  # None once closed
        # whether `io` is started (libev's ``active``, read by name through gevent's
        # property: ~175 instructions, three times per proxied request), kept
        # exact as the module's invariants say
        self.watching = False
        self.waiter: Any = None  # the greenlet parked in `wait`
        self.stirred = False  # readable while nobody waited (since `watch_idle`)
        self.on_ready: Any = None  # called with ready_arg at the readiness (`park`)
        self.ready_arg: Any = None
        # called (in the hub, no argument) at a readiness nobody waited for
        self.on_stir: Any = None

    def _watch(self) -> None:
        """Start `io` (it is stopped); its callback is told the events."""
        self.io.start(self._ready, pass_events=True)
        self.watching = True

    def wait(self) -> None:
        """Park the current greenlet until the socket is readable."""
        if not self.watching:
            self._watch()
        current, hub = getcurrent(), self.hub
        if current is hub:
            raise BlockingSwitchOutError(
                "Impossible to call blocking function in the event loop callback")
        self.waiter = current
        try:
            SWITCH(hub)
        finally:
            self.waiter = None

    def _ready(self, events: int) -> None:
        """The loop's callback (in the hub): wake the waiter, call what the socket
        was parked with, or stop watching."""
        try:
            if events & ERROR:  # libev stopped `io` itself (epoll refused it: ENOMEM, ENOSPC)
                self.watching = False
            waiter = self.waiter
            if waiter is None:
                on_ready = self.on_ready
                if on_ready is not None:
                    arg = self.ready_arg
                    self.on_ready = self.ready_arg = None
                    on_ready(arg)
                    return
                self.io.stop()
                self.watching = False
                self.stirred = True
                on_stir = self.on_stir
                if on_stir is not None:
                    on_stir()
                return
            self.waiter = None
            SWITCH(waiter)
        except BaseException:
            self.watching = False  # gevent stops an io watcher whose callback raised
            raise

    def park(self, on_ready: Any, arg: Any) -> None:
        """Nobody waits, but the next readiness calls `on_ready(arg)` in the hub."""
        self.on_ready = on_ready
        self.ready_arg = arg
        if not self.watching:
            self._watch()

    def unpark(self) -> bool:
        """Forget what `park` was told; whether it was still parked."""
        parked = self.on_ready is not None
        self.on_ready = self.ready_arg = None
        return parked

    def watch_idle(self) -> None:
        """Nobody will wait for a while and nothing should arrive meanwhile:
        clear `stirred`, which any readiness from now on sets."""
        self.stirred = False
        if not self.watching:
            self._watch()

    def is_quiet(self) -> bool:
        """Whether no readiness came since `watch_idle`: none was seen, and none
        waits for its callback in this loop iteration (a readiness is only a
        hint: the socket says whether anything arrived, `rewatch_idle`)."""
        return not self.stirred and not self.io.pending

    def is_parked(self) -> bool:
        """Whether the next readiness calls what `park` was told."""
        return self.on_ready is not None and self.watching

    def rewatch_idle(self) -> None:
        """`watch_idle` again after a readiness found nothing to read (it came
        from before: the bytes it announced were read with no wait for it):
        its callback, if still to come in this loop iteration, is dropped
        (stopping a libev watcher clears its pending event), and a readiness
        from now on sets `stirred` again."""
        self.io.stop()
        self.stirred = False
        self._watch()

    def close(self) -> None:
        """Stop watching for good (again: nothing happens)."""
        self.on_ready = self.ready_arg = self.on_stir = None
        if self.io is not None:
            self.io.close()
            self.io = None
            self.watching = False

    @property
    def closed(self) -> bool:
        return self.io is None
