"""`spin`: hold the request while the app deploys, and apply the next rule.

Invariants:
* A held request waits on the table holder's change event, so it wakes on
  the swap itself, never on a polling tick.
* On wake it re-resolves its host against the new table; a route that is
  still `spin` keeps it waiting until the first rule's deadline.
* At most `spin_max_waiting` requests are held per worker (503 `busy`
  beyond); a client that disconnects while held frees its slot at once.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Mapping
from typing import Any

from balancer.errors import Busy, ClientGone, SpinTimeout
from balancer.peek import CLOSED, READABLE, peek

DEFAULT_TIMEOUT = 120.0


class SpinAction:
    """Holds requests until the host's rule changes or `timeout` passes."""

    def __init__(self, rule: Mapping[str, Any], holder: Any) -> None:
        self.rule = rule
        self.timeout = float(rule.get("timeout", DEFAULT_TIMEOUT))
        self.holder = holder

    def handle(self, ex: Any) -> None:
        ctx = ex.conn.ctx
        waiting = ctx.spin_waiting
        if waiting[0] >= ctx.spin_max_waiting:
            raise Busy("too many held requests")
        waiting[0] += 1
        stats = ex.route.stats
        stats.spinning += 1
        ex.conn.disarm()
        try:
            route = self.hold(ex)
        finally:
            waiting[0] -= 1
            stats.spinning -= 1
        route.action.handle(ex)

    def hold(self, ex: Any) -> Any:
        """Wait until the host resolves to a non-spin route; return that route."""
        deadline = time.monotonic() + self.timeout
        holder, host = self.holder, ex.head.host
        watch_client = True
        while True:
            changed = holder.change_event()
            route = holder.table.lookup(host)
            if not isinstance(route.action, SpinAction):
                return route
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SpinTimeout(max(1, math.ceil(self.timeout / 4)))
            if watch_client:
                watch_client = wait_change(changed, ex.conn.sock, remaining)
            else:
                changed.wait(remaining)


def wait_change(changed: Any, sock: socket.socket, timeout: float) -> bool:
    """Wait for `changed` or a client hang-up; returns whether to keep watching the client.

    Under gevent the client socket is watched too, so a disconnect frees the
    slot at once (raises ClientGone). Elsewhere (threaded baseline) only the
    change is awaited.
    """
    try:
        from gevent import get_hub
        from gevent.event import Event
        from gevent.monkey import is_module_patched
    except ImportError:  # pragma: no cover - gevent is a dependency
        changed.wait(timeout)
        return False
    if not is_module_patched("socket"):
        changed.wait(timeout)
        return False
    wake = Event()
    watcher = get_hub().loop.io(sock.fileno(), 1)
    watcher.start(wake.set)
    link = lambda _event: wake.set()  # noqa: E731
    changed.rawlink(link)
    try:
        wake.wait(timeout)
    finally:
        changed.unlink(link)
        watcher.stop()
        watcher.close()
    if changed.is_set():
        return True
    return not _client_readable(sock)


def _client_readable(sock: socket.socket) -> bool:
    """True if the client sent more data; raises ClientGone if it hung up."""
    state = peek(sock)
    if state == CLOSED:
        raise ClientGone("client closed while held")
    return state == READABLE
