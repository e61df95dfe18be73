"""`management.collector.Collector`: full collections at a quiet moment."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import gevent

from management.collector import QUIET_GAP, Collector


@contextlib.contextmanager
def full_collections() -> Iterator[tuple[Collector, list[int]]]:
    """An installed `Collector` with a full collection due, and the full
    collections run meanwhile (one item each); CPython's thresholds restored."""
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
        yield collector, full
    finally:
        gc.set_threshold(*before)
        gc.callbacks.remove(note)


def test_holders_ending_together_make_one_full_collection() -> None:
    """Two holders that let go in the same turn of the loop, one after the other,
    make one full collection, `QUIET_GAP` apart from the next (bug: each
    scheduled one, and both ran, back to back)."""
    with full_collections() as (collector, full):
        def holder() -> None:  # (each alone: a HEAD's render, a small page)
            gevent.sleep(0)
            with collector.held():
                pass
        gevent.joinall([gevent.spawn(holder) for _ in range(2)], timeout=10, raise_error=True)
        gevent.sleep(0)
        gevent.sleep(0)
        assert full == [1]


def test_full_collections_wait_for_a_quiet_moment() -> None:
    """No full collection while a snapshot is held, one once none is (before:
    CPython ran one each time the survivors grew by a quarter, several a survey,
    each walking every snapshot alive)."""
    with full_collections() as (collector, full):
        def survey() -> None:
            with collector.held(), collector.held():
                snapshot = [[[n]] for n in range(300_000)]  # survivors: a snapshot's lists
                gevent.sleep(0)
                assert not full and len(snapshot) == 300_000
            gevent.sleep(0)
        gevent.spawn(survey).get(timeout=60)
        assert full == [1]
