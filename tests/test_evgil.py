"""`balancer.evgil`: gevent's loop runs a batch of pending callbacks in one hold
of the GIL (the C extension `balancer._evgil`), and drops it while it polls.

In this process's hub: a batch's callbacks are counted as run in one hold;
one that raises goes to the hub's `handle_error` and the rest of its batch
runs; one that switches out of the hub in the middle of its batch (a
SystemExit thrown into the main greenlet) leaves the loop whole when the hub
is switched back to; a thread, the thread pool's included, runs while the loop
polls. In a process of its own: after a fork (gevent's, which re-inits the
loop) the child's loop still runs its batches so, and a new hub's loop can be
set up after the old one is destroyed; without the extension, or with
gevent's cffi or libuv loop, nothing is set up and the loop runs as gevent's.
Through real balancers: tests/test_evgil_balancer.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import pytest
from gevent import get_hub

from balancer import native
from balancer.evgil import counts, hold_gil
from tests.support import ROOT

SOCKETS = 20  # readinesses in one batch
DEADLINE = 10.0


@pytest.fixture
def held() -> None:
    if not hold_gil(get_hub().loop):
        if native.compiled():
            pytest.fail("a compiled build without balancer._evgil: setup.py builds it")
        pytest.skip("interpreted: callbacks take the GIL one by one, as gevent's own")


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made = [socket.socketpair() for _ in range(SOCKETS)]
    yield made
    for a, b in made:
        a.close()
        b.close()


def run_batch(pairs: list[tuple[socket.socket, socket.socket]],
              ready: Callable[[int], None] = lambda index: None) -> list[int]:
    """Make every pair's second socket readable before the loop polls (one
    batch), and run `ready(index)` in each readiness callback; the indexes in
    the order their callbacks ran, once all did."""
    loop, seen, watchers = get_hub().loop, [], []
    done = gevent.event.Event()

    def callback(index: int) -> None:
        watchers[index].stop()
        pairs[index][1].recv(1)
        seen.append(index)
        if len(seen) == len(pairs):
            done.set()
        ready(index)

    for index, (_, b) in enumerate(pairs):
        watchers.append(loop.io(b.fileno(), 1))
        watchers[-1].start(callback, index)
    for a, _ in pairs:
        a.send(b"x")
    try:
        assert done.wait(DEADLINE), f"only {len(seen)} of {len(pairs)} callbacks ran"
    finally:
        for watcher in watchers:
            watcher.stop()
    return seen


def test_a_batch_of_readinesses_runs_in_one_hold_of_the_gil(held: None, pairs: list) -> None:
    before = counts()
    run_batch(pairs)
    after = counts()
    holds, ran = after["holds"] - before["holds"], after["held"] - before["held"]
    # one poll found them all; a second batch only if the hub ran meanwhile
    assert ran >= SOCKETS and holds <= 3, (before, after)


def test_a_callback_that_raises_goes_to_handle_error_and_its_batch_goes_on(
        held: None, pairs: list, monkeypatch: pytest.MonkeyPatch) -> None:
    hub, errors = get_hub(), []
    monkeypatch.setattr(hub, "handle_error", lambda context, kind, *rest: errors.append(kind))

    def ready(index: int) -> None:
        if index % 5 == 0:
            raise ValueError(index)

    seen = run_batch(pairs, ready)
    assert sorted(seen) == list(range(SOCKETS))
    assert errors == [ValueError] * (SOCKETS // 5)
    assert_threads_run_while_the_loop_polls()


def test_a_callback_that_switches_out_of_its_batch_leaves_the_loop_whole(
        held: None, pairs: list) -> None:
    """SystemExit in a callback: gevent's hub throws it into the main greenlet
    from inside the batch (`Hub.handle_system_error`), its hold of the GIL
    still open; switching back to the hub runs the rest of the batch."""
    thrown: list[int] = []

    def ready(index: int) -> None:
        if not thrown:
            thrown.append(index)
            raise SystemExit(index)

    with pytest.raises(SystemExit):
        run_batch(pairs, ready)
    before = counts()
    gevent.sleep(0.01)  # back to the hub, in the middle of its batch, then a poll
    assert thrown and counts()["alone"] + counts()["holds"] > before["alone"] + before["holds"]
    seen = run_batch(pairs[:5])  # the same loop, whole: the next batch
    assert sorted(seen) == list(range(5))
    assert_threads_run_while_the_loop_polls()


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


def assert_threads_run_while_the_loop_polls() -> None:
    """A thread that wants the GIL gets it while the hub waits in epoll_wait:
    one that held it there would stop the spinner for the whole sleep, and the
    pool's job could not end before its wait's timer."""
    with Spinner() as spinner:
        before = spinner.count
        gevent.sleep(0.05)  # the loop polls: the GIL is dropped meanwhile
        assert spinner.count > before
    started = time.monotonic()
    result = get_hub().threadpool.spawn(sum, range(300000)).get(timeout=DEADLINE)
    assert result == sum(range(300000)) and time.monotonic() - started < DEADLINE / 2


def test_threads_still_run_while_the_loop_waits(held: None) -> None:
    assert_threads_run_while_the_loop_polls()


# in a process of its own ------------------------------------------------------
FORK_AND_DESTROY = """
import os, socket, sys
import gevent, gevent.os
from balancer.evgil import counts, hold_gil
from tests.test_evgil import run_batch

def batch(name):
    pairs = [socket.socketpair() for _ in range(8)]
    before = counts()["held"]
    run_batch(pairs)
    print(name, counts()["held"] - before >= 8, flush=True)

assert hold_gil(gevent.get_hub().loop)
batch("parent")
pid = gevent.os.fork()  # the child's loop re-inits (ev_loop_fork): its hook stays
if pid == 0:
    batch("child")
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("child exit", status, flush=True)
gevent.get_hub().destroy(destroy_loop=True)
assert hold_gil(gevent.get_hub().loop)  # a new hub's new loop
batch("new loop")
"""


def run_script(script: str, *args: str, **env: str) -> str:
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_forked_child_and_a_new_loop_hold_the_gil_per_batch(held: None) -> None:
    assert run_script(FORK_AND_DESTROY).splitlines() == [
        "parent True", "child True", "child exit 0", "new loop True"]


FALLBACK = """
import sys
if sys.argv[-1] == "without":
    sys.modules["balancer._evgil"] = None  # as where it was not built
import gevent
from balancer.evgil import counts, hold_gil
from tests.test_evgil import run_batch
import socket
print(hold_gil(gevent.get_hub().loop), type(gevent.get_hub().loop).__module__)
print(sorted(run_batch([socket.socketpair() for _ in range(8)])) == list(range(8)), counts())
"""


@pytest.mark.data_plane  # the interpreted pass: no extension
@pytest.mark.parametrize("case", ["without", "libev-cffi", "libuv-cffi"])
def test_without_the_extension_or_another_loop_nothing_is_set_up(case: str) -> None:
    env: dict[str, Any] = {} if case == "without" else {"GEVENT_LOOP": case}
    out = run_script(FALLBACK, case, **env).splitlines()
    assert out[0].startswith("False")
    assert out[1] == "True {'holds': 0, 'held': 0, 'alone': 0}", out
