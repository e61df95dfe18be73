"""gevent's event loop runs its callbacks in one hold of the GIL per batch.

gevent runs libev with the GIL released, and each callback into Python (a
socket's readiness, gevent's own queued callbacks) takes the GIL and drops it
again: ~500 instructions each, two readinesses per proxied keep-alive
request (the client's, the backend's). `hold_gil(loop)` has the loop take
the GIL once for all the callbacks pending after a poll, and once for the
prepare phase (the C extension `balancer._evgil`: libev's
``invoke_pending_cb``); the GIL is still dropped while the loop polls, so
other threads (gevent's thread pool: the access log's writes, name
resolution) run then. What it saves is measured in docs/performance.md.

Only gevent's default loop implementation, ``gevent.libev.corecext`` (libev
linked into that extension, whose API it exports), can; with gevent's cffi
or libuv loops, or without the extension (``BALANCER_PURE=1``), callbacks
take the GIL one by one as before. Callbacks run the same, in the same order.
"""

from __future__ import annotations

import sys
from typing import Any

CORECEXT = "gevent.libev.corecext"  # the loop module whose libev this drives


def _extension() -> Any:
    """`balancer._evgil`, or None where it was not built or will not load."""
    try:
        from balancer import _evgil
    except ImportError:
        return None
    return _evgil


_EVGIL = _extension()


def hold_gil(loop: Any) -> bool:
    """Make gevent's `loop` run its pending callbacks in one hold of the GIL;
    whether it does (False: not a corecext loop, or no extension)."""
    module = sys.modules.get(type(loop).__module__)
    if _EVGIL is None or module is None or module.__name__ != CORECEXT:
        return False
    return bool(_EVGIL.hold_gil(module.__file__, loop.ptr))


def counts() -> dict[str, int]:
    """What the loops `hold_gil` set up ran, in this process since it started
    (a forked child starts from its parent's counts): `holds`, batches run in
    one hold of the GIL; `held`, the callbacks pending when they began;
    `alone`, lone callbacks, which took the GIL themselves. All 0 without the
    extension."""
    holds, held, alone = _EVGIL.counts() if _EVGIL is not None else (0, 0, 0)
    return {"holds": holds, "held": held, "alone": alone}
