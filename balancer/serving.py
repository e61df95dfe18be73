"""The greenlets that serve client connections, kept from one connection to the next.

A new connection used to cost a new gevent `Greenlet` in a `Pool`: the
object, its link machinery, the pool's semaphore and set, a callback to
discard it when it ended, and a fresh C stack plus (CPython 3.11) a 16 KiB
frame data stack mapped and unmapped around it (an ``mmap``/``munmap`` pair
per connection under ``strace``). Here a plain greenlet serves a connection,
then parks in `Slots.idle` and serves the next one: accepting costs a switch.
And a plain listener's new connection (a gevent worker's) takes no greenlet at
all (`accept` with `parked`): it starts parked, and its first request is served in the hub
(`balancer.inline`) unless that hands it to a greenlet (`resume`).

A handler returns whether it left its connection open and parked (a
keep-alive connection between requests, `balancer.netio.GeventIO.park`):
such a connection holds no greenlet until `resume` hands it to one again.

Invariants:
* At most `size` connections are open at once (`is_full`), counted from
  `start` until a handler returns without parking its connection (or
  raises); listeners stop accepting while full and resume (`on_free`) as soon
  as a connection closes.
* A greenlet serves one connection at a time: whatever it was told about its
  last connection is over once that connection's handler returned (the
  connection detaches from the worker's `IO` first, so the watchdog no longer
  throws into it; a timeout thrown before that and delivered late is dropped
  while the greenlet is parked).
* At most `keep` greenlets are parked; past that a finished greenlet ends.
  `shrink` ends the oldest parked ones once a burst is over (the worker's
  `quiet_loop`): each holds its saved C stack and its frame stack chunk.
* An accept runs in the hub: the greenlet starts at once and returns to the
  hub at its first wait (see `start`); elsewhere it starts from the loop.
* A plain connection starts with no greenlet (`accept` with `parked`): it is counted open
  (`enter`) and its handler runs in the hub, where it is parked or served
  (`balancer.inline.serve_new`). Whoever closes an open connection frees its
  slot once: a greenlet's handler by returning without parking it, the hub by
  `leave`.
* `accept` takes connections while a slot is free and the accept
  queue is not empty, at most `limit` per call; an accept error other than an
  empty queue propagates to the listener (`balancer.accepting.Listener`), which
  knows what to do with it (pause when out of descriptors, skip an aborted one).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, Final

from gevent import get_hub, getcurrent, sleep
from gevent.event import Event
from greenlet import GreenletExit, greenlet

from balancer.sockcalls import accept_now

KEEP_IDLE: Final = 1024  # parked greenlets kept for the next burst of connections (see Slots)
KEEP_QUIET: Final = 64  # parked greenlets kept once a burst is over (see `Slots.shrink`)


class Slots:
    """Up to `size` greenlets serving connections, reused from one to the next."""

    def __init__(self, size: int, keep: int = KEEP_IDLE) -> None:
        self.size = size
        self.keep = keep
        self.hub: Any = get_hub()
        self.open = 0  # connections open: being served, or parked between requests
        self.busy: set[greenlet] = set()  # greenlets serving a connection now
        self.idle: list[greenlet] = []  # parked, each waiting for its next connection
        self.on_free: list[Callable[[], None]] = []  # told when a full set frees a slot
        self.empty = Event()  # set while no connection is open
        self.empty.set()
        self.run: Any = self._serve_loop  # bound once: every greenlet's run (72 bytes each)

    def __len__(self) -> int:
        return self.open

    def __repr__(self) -> str:
        return (f"<Slots open={self.open}/{self.size} busy={len(self.busy)} "
                f"idle={len(self.idle)}>")

    def is_full(self) -> bool:
        return self.open >= self.size

    def start(self, handle: Callable[..., Any], args: tuple) -> None:
        """Serve a new connection: `handle(*args)` in a parked greenlet, or a new one."""
        self.enter()
        self.resume(handle, args)

    def enter(self) -> None:
        """Count a new connection open (no greenlet serves it yet: `accept` with `parked`)."""
        self.open += 1
        self.empty.clear()

    def leave(self) -> None:
        """An open connection closed, not by a greenlet's handler (in the hub): its
        slot frees (a full set's listeners resume)."""
        was_full = self.open >= self.size
        self.open -= 1
        if not self.open:
            self.empty.set()
        if was_full:
            for resume in self.on_free:
                resume()

    def resume(self, handle: Callable[..., Any], args: tuple) -> None:
        """Go on with an open connection: `handle(*args)` in a greenlet."""
        task = self.idle.pop() if self.idle else greenlet(self.run, self.hub)
        self.busy.add(task)
        if getcurrent() is self.hub:
            task.switch(handle, args)
        else:
            self.hub.loop.run_callback(task.switch, handle, args)

    def accept(self, listener: Any, handle: Callable[..., Any], limit: int,
               parked: bool = False) -> int:
        """Accept up to `limit` connections waiting on `listener` (an OS socket,
        non-blocking) while a slot is free, and serve each as ``handle(sock,
        address)``, `sock` the OS socket, non-blocking; returns how many.
        `parked`: each is counted open and given to `handle` at once,
        in the hub, with no greenlet (the handler parks it or serves its first
        request there, `balancer.connection.Context.start`); what closes it
        later frees its slot (`leave`, or a greenlet's handler). Otherwise each
        starts in a greenlet (`start`).
        Raises the OSError of a failed accept (not of an empty queue)."""
        proto = listener.proto
        accepted = 0
        while accepted < limit and self.open < self.size:
            connection = accept_now(listener, proto)
            if connection is None:
                break
            accepted += 1
            if parked:
                self.enter()
                handle(*connection)
            else:
                self.start(handle, connection)
        return accepted

    def _serve_loop(self, handle: Callable[..., Any], args: tuple) -> None:
        me = getcurrent()
        while True:
            parked = False
            try:
                parked = bool(handle(*args))  # a handler that returns nothing closed its own
            except GreenletExit:
                self._finished(me, False)
                return
            except BaseException:  # noqa: BLE001 - reported as gevent reports a greenlet's
                self.hub.handle_error(me, *sys.exc_info())
            self._finished(me, parked)
            if len(self.idle) >= self.keep:
                return
            self.idle.append(me)
            handle, args = self._park()

    def _park(self) -> tuple[Callable[..., Any], tuple]:
        """Wait in the hub for the next connection (`start` switches it in)."""
        while True:
            try:
                return self.hub.switch()
            except TimeoutError:
                continue  # the watchdog's throw for the connection that just ended

    def _finished(self, task: greenlet, parked: bool) -> None:
        self.busy.discard(task)
        if not parked:
            self.leave()

    def shrink(self, keep: int = KEEP_QUIET) -> int:
        """End the parked greenlets beyond `keep`, the longest parked first (from
        the loop, as `kill` ends them); how many will end."""
        cut = len(self.idle) - keep
        if cut <= 0:
            return 0
        ending = self.idle[:cut]
        del self.idle[:cut]
        loop = self.hub.loop
        for task in ending:
            loop.run_callback(_end, task)
        return cut

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no connection is open (or `timeout`); whether none is."""
        return self.empty.wait(timeout)

    def kill(self, timeout: float = 1.0) -> None:
        """End every connection being served (GreenletExit in each) and every
        parked greenlet; waits up to `timeout` for the served ones to finish.
        (Connections parked between requests are closed with the process.)"""
        idle, self.idle, self.keep = self.idle, [], 0
        loop = self.hub.loop
        for task in [*idle, *self.busy]:  # thrown from the hub: each returns to it
            loop.run_callback(_end, task)
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            sleep(0.01)


def _end(task: greenlet) -> None:
    if not task.dead:
        task.throw(GreenletExit)
