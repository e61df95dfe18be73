"""A backend connection's connect (`balancer.pool.Backend.connect` through the
worker's `IO.connect`): under gevent the OS socket, non-blocking, waited for
in the loop with no gevent socket and no Python code in the greenlet
(docs/performance.md, "requests in flight"); with the blocking `IO` the
socket module's. Same outcomes both ways: a connection, a refusal, a
timeout, each as `ConnectError` naming the backend."""

from __future__ import annotations

import _socket
import select
import socket
import time
from collections.abc import Iterator

import gevent
import gevent.monkey
import pytest

from balancer.addr import parse_backend_addr
from balancer.errors import ConnectError, ConnectOverdue, Overdue
from balancer.netio import IO, GeventIO
from balancer.pool import Backend
from loadtest.procs import HeldPort

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

CONNECT_TIMEOUT = 0.3


def backend(kind: str, port: int) -> Backend:
    return Backend(parse_backend_addr(f"127.0.0.1:{port}"), connect_timeout=CONNECT_TIMEOUT,
                   fail_timeout=1.0, io=GeventIO() if kind == "gevent" else IO())


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


@pytest.mark.parametrize("kind", ["blocking", "gevent"])
def test_a_connection_is_made_and_works(kind: str, listener: socket.socket) -> None:
    b = backend(kind, listener.getsockname()[1])
    upstream = b.connect()
    peer, _ = listener.accept()
    try:
        if kind == "gevent":  # the OS socket itself, non-blocking, Nagle off
            assert type(upstream.sock) is _socket.socket
            assert upstream.sock.gettimeout() == 0.0
        assert upstream.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        upstream.stream.write(b"ping")
        upstream.stream.finish()
        assert peer.recv(10) == b"ping"
        peer.sendall(b"pong")
        upstream.stream.wait_readable()
        assert upstream.stream.recv(10) == b"pong"
    finally:
        upstream.close()
        peer.close()


def test_a_connect_made_while_the_loop_stalled_past_its_timeout_is_kept(
        listener: socket.socket) -> None:
    """A loop stalled past the connect timeout (a loaded machine) runs the
    expired timer before the readiness polled with it; the connect, made long
    before, is a connection (bug: a ConnectError, so a 502 from a rule with one
    backend, and the backend saw a connection closed unused)."""
    stall = gevent.monkey.get_original("time", "sleep")
    gevent.spawn(stall, CONNECT_TIMEOUT * 2)  # runs once the connect waits
    start = time.monotonic()
    upstream = backend("gevent", listener.getsockname()[1]).connect()
    assert time.monotonic() - start > CONNECT_TIMEOUT  # the loop did stall past it
    peer, _ = listener.accept()
    try:
        assert not select.select([listener], [], [], 0)[0], "a second connection was made"
        upstream.stream.write(b"ping")
        upstream.stream.finish()
        assert peer.recv(10) == b"ping"
    finally:
        upstream.close()
        peer.close()


@pytest.mark.parametrize("kind", ["blocking", "gevent"])
def test_a_refused_connection_is_a_connect_error(kind: str, held_port: HeldPort) -> None:
    port = held_port.port  # bound, never listening: refused, and no one else's meanwhile
    with pytest.raises(ConnectError, match=f"127.0.0.1:{port}: Connection refused"):
        backend(kind, port).connect()


@pytest.mark.parametrize("kind", ["blocking", "gevent"])
def test_a_connect_that_hangs_times_out(kind: str) -> None:
    """A listener whose accept queue is full drops the SYN: connect hangs."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    queued = socket.create_connection(("127.0.0.1", port))  # fills the queue of one
    assert select.select([full], [], [], 5)[0], "the first connection never queued"
    ticks: list[float] = []
    ticker = gevent.spawn(lambda: [ticks.append(time.monotonic()) or gevent.sleep(0.02)
                                   for _ in range(1000)])
    try:
        start = time.monotonic()
        with pytest.raises(ConnectError, match=f"127.0.0.1:{port}: timed out"):
            backend(kind, port).connect()
        elapsed = time.monotonic() - start
        assert CONNECT_TIMEOUT - 0.05 < elapsed < CONNECT_TIMEOUT + 2.0
        if kind == "gevent":  # the loop ran meanwhile: only the greenlet waited
            assert len([t for t in ticks if start < t < start + elapsed]) >= 5
    finally:
        ticker.kill()
        queued.close()
        full.close()


def test_a_wait_for_a_connection_cut_short_leaves_nothing_watching() -> None:
    """An exception thrown into the waiting greenlet (the watchdog's `Overdue`:
    the client connection's deadline) ends the wait: the socket closes, its
    watchers stop, and it is a ConnectOverdue, not the backend's ConnectError."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    queued = socket.create_connection(("127.0.0.1", port))
    # the queue is full only once the server side took the handshake's last ACK (the
    # listener is readable): before, a second SYN is answered and its connect succeeds
    assert select.select([full], [], [], 5)[0], "the first connection never queued"
    b = Backend(parse_backend_addr(f"127.0.0.1:{port}"), connect_timeout=30.0,
                fail_timeout=1.0, io=GeventIO())
    hub = gevent.get_hub()
    gevent.sleep(0)  # what earlier tests left pending runs now: the count is the loop's own
    before = hub.loop.activecnt
    try:
        task = gevent.spawn(b.connect)
        deadline = time.monotonic() + 5
        while hub.loop.activecnt < before + 2:  # until its io watcher and timer wait
            assert time.monotonic() < deadline, "the connect never started waiting"
            gevent.sleep(0)
        active = hub.loop.activecnt
        # thrown from the hub, as `netio._time_out` does
        hub.loop.run_callback(task.throw, Overdue("deadline passed"))
        with pytest.raises(ConnectOverdue, match="deadline passed while connecting"):
            task.get(timeout=5)
        assert hub.loop.activecnt <= active - 2  # its io watcher and its timer
    finally:
        queued.close()
        full.close()
