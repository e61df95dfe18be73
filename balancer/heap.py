"""Giving freed memory back to the system: after a burst (the worker's
`quiet_loop`), in the arbiter before each fork (`balancer.preload.freeze`) and
in the management process once set up (`management.process.run_management`
through `freeze`).

glibc's malloc keeps the pages of freed blocks inside its heap: a burst's
saved greenlet stacks and buffers, once freed, stay in the worker's resident
set. `release` asks it (``malloc_trim(0)``) to return every wholly free page;
a C library without it (musl) makes `release` do nothing.

Invariants:
* Called only when many blocks were just freed or before pages are shared,
  never per request: it walks the heap (about a millisecond for a worker's).
"""

from __future__ import annotations

import ctypes
from typing import Any


def _trim_function() -> Any:
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


_TRIM = _trim_function()


def release() -> bool:
    """Return the heap's wholly free pages to the system; whether it could."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
