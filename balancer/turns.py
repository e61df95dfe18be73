"""Turns: a relay that never has to wait still leaves the loop to everyone else.

A relay whose backend keeps data ready and whose client's socket buffer
keeps room never waits, so it never returns to the hub: it copies a whole
response in one go while every other connection, and every new one, waits.
The kernel grows a loopback socket's send buffer past 1 MiB even toward a
client that reads 32 bytes a second, so slow readers (``slowhttptest -X``,
200 new ones a second) kept the worker copying in lumps of 1 MiB per client,
and a live request waited up to 0.7 s (`scripts/bench_slow_read.py`).

Invariants:
* A `Turn` belongs to one relay; `spend(n)` after moving `n` bytes parks the
  relay once it moved `TURN_BYTES` within one loop iteration, and only then:
  a relay that waited for its peers since, or a small response, never parks.
* Parked relays wait in their hub's `Bulk` queue, which resumes at most
  `BULK_TURNS` of them per loop iteration, in order, from an idle watcher of
  the highest priority: while relays are parked the loop polls without
  blocking and runs every iteration, but an iteration copies at most
  about BULK_TURNS × TURN_BYTES for them, so new connections and short
  requests are served between two rounds of bulk copying.
* A parked relay that gets an exception thrown in (its deadline) leaves the
  queue harmlessly: it waits on a `Waiter`, which ignores a late wake-up.
* Without a loop (the threaded baseline's blocking sockets) nothing parks.
* `turn` parks a long job (a big control answer, the history's encoding, a
  big table decoded and checked, many new certificates loaded, a big table
  compiled) between two slices the same way: one loop iteration, poll
  included. A thread with no hub (the threaded baseline's store watcher, the
  start-up check's unpatched child) has no loop to let go round: `turn` does
  nothing there, and makes no hub.
"""

from __future__ import annotations

import weakref
from collections import deque
from typing import Any, Final

from gevent._hub_local import get_hub_if_exists
from gevent.hub import Waiter

TURN_BYTES: Final = 65536  # bytes a relay moves per loop iteration before it parks
BULK_TURNS: Final = 32  # parked relays resumed per loop iteration (about 2 MiB)


class Bulk:
    """One hub's parked relays, resumed a few per loop iteration."""

    __slots__ = ("hub", "parked", "idle", "__weakref__")

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.parked: deque[Waiter] = deque()
        self.idle: Any = None

    def park(self) -> None:
        """Wait (in the calling greenlet) for a later loop iteration's turn."""
        waiter = Waiter(self.hub)
        self.parked.append(waiter)
        idle = self.idle
        if idle is None:
            idle = self.idle = self.hub.loop.idle()
            idle.priority = self.hub.loop.MAXPRI
        if not idle.active:
            idle.start(self.resume)
        waiter.get()

    def resume(self) -> None:
        """The idle watcher's callback (in the hub): the next few parked relays go on."""
        parked = self.parked
        for _ in range(min(len(parked), BULK_TURNS)):
            parked.popleft().switch(None)
        if not parked:
            self.idle.stop()


_BULKS: Final[weakref.WeakKeyDictionary[Any, Bulk]] = weakref.WeakKeyDictionary()


def bulk_for(hub: Any) -> Bulk:
    """The `Bulk` queue of `hub` (one per hub, made on first use)."""
    bulk = _BULKS.get(hub)
    if bulk is None:
        bulk = _BULKS[hub] = Bulk(hub)
    return bulk


class Turn:
    """The bytes one relay moved in the current loop iteration."""

    __slots__ = ("bulk", "loop", "iteration", "moved")

    def __init__(self, hub: Any) -> None:
        self.bulk = None if hub is None else bulk_for(hub)
        self.loop = None if hub is None else hub.loop
        self.iteration = -1
        self.moved = 0

    def spend(self, moved: int) -> None:
        """Count `moved` bytes; park when this iteration's turn is used up."""
        loop = self.loop
        if loop is None:
            return
        iteration = loop.iteration
        if iteration != self.iteration:
            self.iteration = iteration
            self.moved = moved
            return
        self.moved += moved
        if self.moved >= TURN_BYTES:
            self.bulk.park()  # type: ignore[union-attr]
            self.iteration = loop.iteration
            self.moved = 0


def turn() -> None:
    """Let the current hub's loop go round once (a poll: sockets, timers) before
    the caller goes on, parked as a relay is: the pause of a long job between
    two slices. ``gevent.sleep(0)`` is no such pause: the hub runs queued
    callbacks 50 at a time, looking at the clock only between batches, so up to
    50 pauses ran without a poll. Nothing happens in a thread with no hub."""
    hub = get_hub_if_exists()
    if hub is not None:
        bulk_for(hub).park()
