"""`balancer.evgil`: gevent's loop runs a batch of pending callbacks in one hold
of the GIL (the C extension `balancer._evgil`), and drops it while it polls.

Seen from another OS thread that spins while it holds the GIL: between two
callbacks of one batch it gets no turn (each callback took and dropped the GIL
before, and a thread waiting for it took it at every drop), yet it runs while
the loop waits, so a thread's work still completes.
"""

from __future__ import annotations

import socket
import threading
import time

import gevent
import pytest
from gevent import get_hub

from balancer import native
from balancer.evgil import hold_gil

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

SOCKETS = 20  # readinesses in one batch
DEADLINE = 5.0


@pytest.fixture
def held() -> None:
    if not hold_gil(get_hub().loop):
        if native.compiled():
            pytest.fail("a compiled build without balancer._evgil: setup.py builds it")
        pytest.skip("interpreted: callbacks take the GIL one by one, as gevent's own")


class Spinner:
    """Another OS thread counting while it holds the GIL."""

    def __init__(self) -> None:
        self.count = 0
        self.stop = False
        self.thread = threading.Thread(target=self.spin, daemon=True)

    def spin(self) -> None:
        while not self.stop:
            self.count += 1

    def __enter__(self) -> Spinner:
        self.thread.start()
        deadline = time.monotonic() + DEADLINE
        while not self.count and time.monotonic() < deadline:
            time.sleep(0.001)  # (drops the GIL: the thread gets going)
        assert self.count, "the spinning thread never ran"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop = True
        self.thread.join(DEADLINE)


def test_a_batch_of_readinesses_runs_in_one_hold_of_the_gil(held: None) -> None:
    loop = get_hub().loop
    pairs = [socket.socketpair() for _ in range(SOCKETS)]
    seen: list[int] = []
    watchers = []
    with Spinner() as spinner:
        done = gevent.event.Event()

        def ready(index: int) -> None:
            seen.append(spinner.count)
            pairs[index][1].recv(1)
            watchers[index].stop()
            if len(seen) == SOCKETS:
                done.set()

        for index, (a, b) in enumerate(pairs):
            watcher = loop.io(b.fileno(), 1)
            watcher.start(ready, index)
            watchers.append(watcher)
        for a, _ in pairs:
            a.send(b"x")  # all readable before the loop polls: one batch
        assert done.wait(DEADLINE)
    for a, b in pairs:
        a.close()
        b.close()
    turns = sum(1 for before, after in zip(seen, seen[1:]) if after != before)
    # without the hold, the thread counts between nearly every two callbacks; with
    # it, only if the batch outlasted the switch interval (5 ms: a stalled machine)
    assert turns <= 2, seen


def test_threads_still_run_while_the_loop_waits(held: None) -> None:
    with Spinner() as spinner:
        before = spinner.count
        gevent.sleep(0.05)  # the loop polls: the GIL is dropped meanwhile
        assert spinner.count > before
    result = get_hub().threadpool.spawn(sum, range(100000)).get(timeout=DEADLINE)
    assert result == sum(range(100000))
