"""`balancer.readiness.Readable`: a socket's read readiness watched for its whole
life. Real socket pairs and gevent's real loop; nothing is mocked."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import gevent
import pytest

from balancer.readiness import Readable
from tests.support import loop_until

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

DEADLINE = 5.0


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
