"""The management process's full garbage collections, run when little is alive.

Bug: a snapshot of 20,000 hosts is ~340,000 objects the collector tracks
(each host's dicts and its histogram's lists), and a scrape or a history
sample makes one every few seconds. CPython runs a full collection whenever
the objects that survived young collections grew by a quarter: with the
snapshots the only long-lived objects of note, several per survey, each
walking every snapshot alive in one go (0.2-1 s on a loaded machine): in an
in-process loop of 12 surveys of 20,000 hosts, 23 full collections took
13.9 s of 24.2, the longest 1.0 s, and `/healthz` waited for each. (Since,
histograms are sent as counts, `balancer.stats.histogram`: ~60,000 objects,
and the forced collection below with 4 snapshots held walks a sixth as many.)

Invariants:
* Young collections (generations 0 and 1) run as CPython's thresholds make
  them: each walks what was made since the last, a few thousand objects.
* Automatic full collections never run (`THRESHOLDS`). One runs at the first
  quiet moment (no snapshot `held`: no survey of the active hosts under way,
  no scrape's body being sent, no history sample) at least `QUIET_GAP`
  seconds after the last, when it walks little; and whatever is held, at
  least every `FULL_EVERY` seconds (`collect_loop`), so garbage cycles that
  reached the old generation are freed within that.
* Nothing changes outside the management process (`install` is called there
  only): elsewhere `held` only counts.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator

THRESHOLDS = (700, 10, 1 << 30)  # CPython's young thresholds; the oldest's out of reach
QUIET_GAP = 30.0  # seconds from one full collection to the next at a quiet moment
FULL_EVERY = 300.0  # seconds at most between two full collections, whatever is held


class Collector:
    """Counts what holds a big snapshot; collects fully when nothing does."""

    def __init__(self) -> None:
        self.holding = 0  # snapshots held now
        self.last = time.monotonic()  # the last full collection
        self.installed = False

    def install(self) -> None:
        """Take full collections over (in the management process, once set up)."""
        gc.set_threshold(*THRESHOLDS)
        self.installed = True

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Count a snapshot as held for the block's length."""
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1
            if self.installed and not self.holding \
                    and time.monotonic() - self.last >= QUIET_GAP:
                from gevent import get_hub

                get_hub().loop.run_callback(self.collect_if_quiet)  # once the holder is gone

    def collect_if_quiet(self) -> None:
        """Collect if nothing is held and the last was `QUIET_GAP` ago (bug: two
        holders let go in one turn of the loop both collected, back to back)."""
        if not self.holding and time.monotonic() - self.last >= QUIET_GAP:
            self.collect()

    def collect(self) -> None:
        gc.collect()
        self.last = time.monotonic()

    def collect_loop(self) -> None:
        """A full collection at least every `FULL_EVERY` seconds."""
        import gevent

        while True:
            gevent.sleep(max(1.0, self.last + FULL_EVERY - time.monotonic()))
            if time.monotonic() - self.last >= FULL_EVERY:
                self.collect()


COLLECTOR = Collector()  # the process's one
