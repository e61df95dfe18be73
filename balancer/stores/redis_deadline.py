"""Redis answers read whole within the connection's timeout (`balancer.stores.redis_connect`).

redis-py bounds each ``recv`` by ``socket_timeout``, not an answer: a peer that
sends a byte a second (a Redis behind a stalling proxy, a ``redis://`` URL
naming a service that trickles) held a command for good. Bug: a worker started
against one never said it served (the balancer never listened), and a write
through the API never answered.

Invariants:
* Every answer a connection reads, its handshake's included (``AUTH``,
  ``SELECT``, ``HELLO``), is read whole within `WHOLE` times ``socket_timeout``
  seconds (10 s: a 100,000-host table's ``HGETALL`` may take more than the 2 s
  that bound each wait for a byte on a loaded machine), or the connection is
  dropped and the command fails with redis-py's ``TimeoutError``, as when nothing
  came at all.
* A read given its own ``timeout`` (redis-py's) is left to it.
* Only where gevent patched the socket module (the worker and management
  processes): elsewhere a recv cannot be interrupted, and redis-py's bound stands.
"""

from __future__ import annotations

from typing import Any

import gevent
from gevent import monkey

WHOLE = 5
_MADE: dict[type, type] = {}


class WholeAnswers:
    """Mixed into a redis-py connection class: `read_response` within `WHOLE` timeouts."""

    socket_timeout: float | None

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        read = super().read_response  # type: ignore[misc]
        if (self.socket_timeout is None or "timeout" in kwargs
                or not monkey.is_module_patched("socket")):
            return read(*args, **kwargs)
        bound = WHOLE * self.socket_timeout
        with gevent.Timeout(bound, TimeoutError(f"no whole answer within {bound:g} s")):
            return read(*args, **kwargs)


def whole_answers(kind: type) -> type:
    """`kind`, a redis-py connection class, reading each answer whole in its timeout."""
    made = _MADE.get(kind)
    if made is None:
        made = _MADE[kind] = type(f"Whole{kind.__name__}", (WholeAnswers, kind), {})
    return made
