"""The cyclic garbage collector around a big load in a proxy worker (`loading`).

A worker reading, decoding and compiling a table of 100,000 hosts makes
millions of container objects, nearly all of which live on in the new table.
Python's collector, counting allocations, walked them again and again
meanwhile: young collections over everything made since the last one, and
full collections over everything the process holds (two tables then), each
0.1-0.4 s during which the worker served nothing (docs/performance.md).
Garbage cycles are rare there: requests make none (`balancer.workers.tune_gc`).

Invariants:
* Nothing happens until `enable()` (a proxy worker, after its start-up freeze):
  in any other process `loading()` is an empty block.
* While any `loading()` block runs (nested, or in several greenlets at once),
  the collector is off; when the last one ends, every object the process holds
  is frozen (`gc.freeze`, as the start-up objects are) and the collector is on
  again: the new table is never walked by a collection, and the allocations
  the load counted are forgotten. Frozen objects are still freed by reference
  counting (a replaced table is); only a garbage cycle made during a load, or
  one frozen object's cycle, stays for the process's life. (Measured: a
  worker's table replaced, its backends and health checks removed, leaves no
  garbage cycle once its loop has run.)
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_enabled = False
_depth = 0  # `loading` blocks running


def enable(on: bool = True) -> None:
    """Pause the collector during big loads from now on (a proxy worker), or not."""
    global _enabled
    _enabled = on


@contextmanager
def loading() -> Iterator[None]:
    """A big load: no collection during it; what it made frozen after it."""
    global _depth
    if not _enabled:
        yield
        return
    if _depth == 0:
        gc.collect()  # pending garbage, not to be frozen (see the invariants)
        gc.disable()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            gc.freeze()
            gc.enable()
