"""`management.collector.Collector`: full collections at a quiet moment."""

from __future__ import annotations

import gc
from typing import Any

import gevent

from management.collector import QUIET_GAP, Collector


def test_holders_ending_together_make_one_full_collection() -> None:
    """Two holders that let go in the same turn of the loop, one after the other,
    make one full collection, `QUIET_GAP` apart from the next (bug: each
    scheduled one, and both ran, back to back)."""
    before = gc.get_threshold()
    full: list[int] = []

    def note(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info["generation"] == 2:
            full.append(1)
    collector = Collector()
    gc.callbacks.append(note)
    try:
        collector.install()
        collector.last -= QUIET_GAP  # one is due

        def holder() -> None:  # (each alone: a HEAD's render, a small page)
            gevent.sleep(0)
            with collector.held():
                pass
        gevent.joinall([gevent.spawn(holder) for _ in range(2)], timeout=10, raise_error=True)
        gevent.sleep(0)
        gevent.sleep(0)
        assert full == [1]
    finally:
        gc.set_threshold(*before)
        gc.callbacks.remove(note)
