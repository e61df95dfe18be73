"""`balancer.readiness.Readable`: a socket's read readiness watched for its whole
life. Real socket pairs and gevent's real loop; nothing is mocked."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import gevent
import pytest
from gevent.libev.corecext import ERROR, EVENTS

from balancer.readiness import READ, Readable
from tests.support import loop_until

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

DEADLINE = 5.0
WRITE = 2  # libev's EV_WRITE


@pytest.fixture
def pair() -> Iterator[tuple[Readable, socket.socket, socket.socket]]:
    """The readiness of `a`, and `b`, the other end."""
    a, b = socket.socketpair()
    readable = Readable(a)
    yield readable, a, b
    readable.close()
    a.close()
    b.close()


def wait_for(readable: Readable, sender: socket.socket, data: bytes) -> None:
    """Wait on `readable` while a greenlet sends `data` to it."""
    gevent.spawn(sender.send, data)
    with gevent.Timeout(DEADLINE):
        readable.wait()




def test_a_wait_ends_when_the_socket_becomes_readable(pair) -> None:
    readable, a, b = pair
    wait_for(readable, b, b"x")
    assert a.recv(1) == b"x"


def test_the_watcher_stays_started_between_waits(pair) -> None:
    """Restarting a libev watcher costs a failing epoll_ctl: it is not stopped."""
    readable, a, b = pair
    for byte in (b"1", b"2", b"3"):
        wait_for(readable, b, byte)
        assert readable.io.active and a.recv(1) == byte


def test_readiness_nobody_waits_for_stops_the_watcher_until_the_next_wait(pair) -> None:
    readable, a, b = pair
    wait_for(readable, b, b"1")
    a.recv(1)
    b.send(b"unread")  # e.g. a pipelined request while the greenlet is elsewhere
    assert loop_until(lambda: not readable.io.active)  # level-triggered: must not spin
    with gevent.Timeout(DEADLINE):
        readable.wait()  # the data is still there: the restarted watcher fires at once
    assert a.recv(16) == b"unread" and readable.io.active


def test_an_exception_thrown_into_the_waiter_ends_the_wait(pair) -> None:
    readable, _, b = pair
    waiter = gevent.spawn(readable.wait)
    assert loop_until(lambda: readable.waiter is waiter)
    gevent.get_hub().loop.run_callback(waiter.throw, TimeoutError("deadline passed"))
    waiter.join(DEADLINE)
    assert isinstance(waiter.exception, TimeoutError) and readable.waiter is None
    b.send(b"late")  # nobody waits any more: the watcher stops instead of waking a ghost
    assert loop_until(lambda: not readable.io.active)


# `Readable.watching` says whether the watcher is started without asking gevent;
# the two ways it is stopped by others are followed, or the next park or wait
# would never be woken.

def test_a_park_after_libev_stopped_the_watcher_itself_starts_it_again(pair) -> None:
    """libev stops an io watcher whose descriptor epoll refused (ENOMEM, ENOSPC:
    `fd_kill`) and calls its callback with EV_ERROR, EV_READ and EV_WRITE; that
    is done here by hand (no test can make epoll refuse a descriptor)."""
    readable, a, b = pair
    woken: list[str] = []
    readable.park(woken.append, "first")
    readable.io.stop()
    readable.io.feed(ERROR | READ | WRITE, readable._ready, EVENTS)
    assert loop_until(lambda: woken == ["first"])
    readable.park(woken.append, "second")
    b.send(b"x")
    assert loop_until(lambda: woken == ["first", "second"]) and a.recv(1) == b"x"


def test_a_park_after_a_callback_that_raised_starts_the_watcher_again(pair, monkeypatch) -> None:
    """gevent stops an io watcher whose callback raised (after reporting it)."""
    readable, a, b = pair
    hub = gevent.get_hub()
    monkeypatch.setattr(hub, "exception_stream", None)  # (the report)

    def bug(_: object) -> None:
        raise RuntimeError("a bug in what the socket was parked with")

    readable.park(bug, None)
    b.send(b"x")
    assert loop_until(lambda: not readable.io.active)
    woken: list[str] = []
    readable.park(woken.append, "next")
    assert loop_until(lambda: woken == ["next"]) and a.recv(1) == b"x"
