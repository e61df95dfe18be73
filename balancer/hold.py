"""Holding requests: the per-worker cap, waiting without polling, and handing over.

Used by `spin` (the app is deploying) and by `proxy` rules with
`spin_when_down` (every backend is down or refusing).

Invariants:
* At most `spin_max_waiting` requests are held per worker at any moment
  (`Holds`, one per worker); beyond that a request gets `Busy` (503 `busy`).
  A held request counts in its host's `spinning` statistic while held.
* A held request waits on events (a table swap, a backend recovering), never
  on a polling tick (`balancer.netio.IO.wait_any`). Under gevent the client
  socket is watched as well, so a client that hangs up is noticed at once and
  frees its slot (`ClientGone`). A client that sent more while held (a body,
  a pipelined request) is no longer watched (its bytes stay unread for the
  next rule); its hang-up is then noticed within `GONE_CHECK` seconds from
  the kernel's TCP state (`balancer.peek.has_hung_up`): before, its slot and
  socket stayed held until the hold's own timeout (bug: a client could fill
  the cap with POSTs it hung up on, at no cost of its own).
* While held a request has no connection deadline (`disarm`); its own
  deadline bounds the wait. Before it is handed to the next action, the
  client deadline is armed again.
* When the worker stops (SIGTERM), `Holds.close` wakes every held request:
  each answers `ShuttingDown` (503 `maintenance` with Retry-After) at once,
  with `Connection: close` (the worker marks its responses closing before it
  calls `close`: `Worker.release_held`), and no new request is held. A
  worker replaced by a reload (SIGHUP) keeps its held requests until their
  rule changes or its drain time runs out.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from balancer.errors import Busy, ClientGone, ShuttingDown, SpinTimeout
from balancer.limits import act
from balancer.peek import has_hung_up
from balancer.spans import Piece
from balancer.table import Route, TableHolder

GONE_CHECK = 1.0  # seconds between looks at an unwatched held client's TCP state


class Holds:
    """The number of requests held in one worker (shared by all its actions)."""

    __slots__ = ("count", "closed", "_closing")

    def __init__(self) -> None:
        self.count = 0
        self.closed = False
        self._closing = threading.Event()

    def close(self) -> None:
        """The worker stops: wake every held request to answer 503, hold no more."""
        self.closed = True
        self._closing.set()

    def closing_event(self) -> threading.Event:
        """An event set by `close` (waited on with the table's change event)."""
        return self._closing

    def check_open(self) -> None:
        """Raise ShuttingDown once `close` was called (after every wake-up)."""
        if self.closed:
            raise ShuttingDown("the worker is stopping")

    @contextmanager
    def held(self, ex: Any) -> Iterator[None]:
        """Count `ex` as held for the `with` block; raises Busy at the cap and
        ShuttingDown once the worker stops."""
        self.check_open()
        if self.count >= ex.conn.ctx.spin_max_waiting:
            raise Busy("too many held requests")
        stats = ex.route.stats
        self.count += 1
        stats.spinning += 1
        ex.conn.disarm()
        try:
            yield
        finally:
            self.count -= 1
            stats.spinning -= 1

    def __repr__(self) -> str:
        return f"<Holds {self.count}>"


def retry_after(timeout: float) -> int:
    """The Retry-After seconds of a hold that timed out after `timeout`."""
    return max(1, math.ceil(timeout / 4))


class Hold:
    """One held request's loop state: its deadline, the table it follows, the
    worker's `Holds` and whether its client is still watched (what `spin` and
    `spin_when_down` share).

    Each round: `lookup` (the route now, and the event the next swap sets,
    taken first so that no swap is missed), `remaining` (raises SpinTimeout
    at the deadline), `wait`. Both `lookup` and `wait` raise ShuttingDown
    once the worker stops (`Holds.close`)."""

    __slots__ = ("ex", "holder", "holds", "timeout", "deadline", "watch_client")

    def __init__(self, ex: Any, holder: TableHolder, holds: Holds, timeout: float) -> None:
        self.ex = ex
        self.holder = holder
        self.holds = holds
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.watch_client = True

    def lookup(self) -> tuple[Route, threading.Event]:
        """The route the request's host resolves to now, and the next swap's event."""
        self.holds.check_open()
        changed = self.holder.change_event()
        return self.holder.table.lookup(self.ex.head.host), changed

    def remaining(self) -> float:
        """Seconds left to hold; raises SpinTimeout (504, Retry-After) when none."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise SpinTimeout(retry_after(self.timeout))
        return remaining

    def wait(self, events: Sequence[Any], seconds: float) -> None:
        """Wait up to `seconds` for any of `events` or the worker stopping (the
        worker's `IO.wait_any`, which watches the client while it can:
        ClientGone if it hangs up; once it is not watched, its TCP state is
        looked at every `GONE_CHECK` seconds instead)."""
        conn, holds = self.ex.conn, self.holds
        if not self.watch_client:
            seconds = min(seconds, GONE_CHECK)
        self.watch_client = conn.io.wait_any([*events, holds.closing_event()], conn.stream,
                                             seconds, self.watch_client)
        holds.check_open()
        if not self.watch_client and has_hung_up(conn.sock):
            raise ClientGone("client closed while held, after sending more")


def hand_over(route: Route, ex: Any, body: Piece | None) -> None:
    """Apply `route` to a request that was held.

    `body` is the request body if it was already read (buffered: bytes, or a
    `balancer.spans.Span` of the read it came in), else None.
    """
    conn = ex.conn
    conn.arm(conn.sock, conn.ctx.timeouts.client_idle)
    if route.limit is not None:
        route.limit.apply(ex, route, body)  # its limits, as a request arriving now meets
    else:
        act(ex, route, body)
