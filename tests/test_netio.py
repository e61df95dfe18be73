"""`balancer.netio`: the worker's I/O object and its streams, on real socket
pairs and gevent's real loop (blocking `IO` and `GeventIO` side by side)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import gevent
import pytest
from gevent import socket as gsocket

from balancer.addr import parse_backend_addr
from balancer.netio import IO, NEVER, EventedStream, GeventIO, Stream
from balancer.pool import Backend, Upstream
from tests.support import acquire, loop_until

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

DEADLINE = 5.0




def make_io(kind: str) -> IO:
    return GeventIO() if kind == "gevent" else IO()


@pytest.fixture(params=["blocking", "gevent"])
def pair(request) -> Iterator[tuple[Stream, socket.socket]]:
    """A stream of `a` made by each kind of `IO`, and `b`, the other end."""
    evented = request.param == "gevent"
    a, b = gsocket.socketpair() if evented else socket.socketpair()
    stream = make_io(request.param).stream(a)
    assert isinstance(stream, EventedStream) is evented
    yield stream, b
    stream.close()
    b.close()


def test_a_stream_reads_and_writes_its_socket(pair) -> None:
    stream, b = pair
    stream.write(b"direct,")
    stream.write_last(b"last")  # held under gevent until the loop runs
    stream.finish()
    assert not stream.has_held() and b.recv(100) == b"direct,last"
    b.send(b"answer")
    stream.wait_readable()
    assert stream.recv(100) == b"answer"
    b.close()
    assert stream.recv(100) == b""


def test_an_evented_stream_uses_the_os_socket_under_gevents() -> None:
    a, b = gsocket.socketpair()
    stream = GeventIO().stream(a)
    assert isinstance(stream, EventedStream)
    assert type(stream.raw) is not type(a) and stream.raw.fileno() == a.fileno()
    assert stream.raw.gettimeout() == 0.0  # non-blocking: EAGAIN instead of a wait
    gevent.spawn_later(0.05, b.send, b"late")
    with gevent.Timeout(DEADLINE):
        assert stream.recv(100) == b"late"  # EAGAIN first: waits on the readiness
    stream.close()
    b.close()
    assert a.fileno() == -1 and stream.watcher.closed


@pytest.mark.parametrize("arrival", [b"HTTP/1.1 200 OK\r\n\r\nPOISON", b""])
def test_a_parked_stream_is_clean_until_anything_arrives(pair, arrival: bytes) -> None:
    stream, b = pair
    stream.park()
    gevent.idle()  # the loop polled the parked socket: nothing arrived, nothing noted
    assert stream.is_clean()
    if arrival:
        b.send(arrival)
    else:
        b.close()  # EOF
    assert loop_until(lambda: not stream.is_clean())


def test_a_readiness_still_waiting_for_its_callback_already_counts() -> None:
    """Within one loop iteration the stray bytes' readiness may be polled but its
    callback not run yet when a request takes the connection: not clean either."""
    io = GeventIO()
    pairs = [gsocket.socketpair() for _ in range(2)]
    first, second = (io.stream(a) for a, _ in pairs)
    for stream in (first, second):
        stream.park()
    seen: list[bool] = []
    callbacks = [first.watcher.io, second.watcher.io]
    for watcher, other in zip(callbacks, (second, first), strict=True):
        watcher.stop()
        watcher.start(lambda other=other: seen.append(other.is_clean()))
    for _, b in pairs:
        b.send(b"x")
    assert loop_until(lambda: len(seen) >= 1)
    assert seen[0] is False  # the first callback saw the other's readiness pending
    for stream, (_, b) in zip((first, second), pairs, strict=True):
        stream.close()
        b.close()


def test_a_late_readiness_of_bytes_read_before_park_leaves_the_stream_clean() -> None:
    """The relay may read a response's last bytes whose readiness the loop
    already polled, its callback still to come; the connection goes back to
    its pool (`park`) and then the callback runs: nothing arrived while idle,
    so the stream is clean (the socket is peeked at), watched afresh, and
    what arrives later still counts."""
    io = GeventIO()
    observed = []
    for helper_first in (True, False):  # the loop's callback order: either side
        (a, b), (c, d) = gsocket.socketpair(), gsocket.socketpair()
        stream = io.stream(a)
        stream.park()
        seen: list[bool] = []

        def relay(stream: Stream = stream, seen: list[bool] = seen, c=c) -> None:
            c.recv(100)
            seen.append(stream.watcher.io.pending)  # the stream's callback still to come
            assert stream.read_ready(100) == b"tail"  # read with no wait for it
            stream.park()
        helper = gevent.get_hub().loop.io(c.fileno(), 1)  # the relay's turn, polled together
        helper.start(relay)
        for sender in ((d, b) if helper_first else (b, d)):
            sender.send(b"tail")
        assert loop_until(lambda seen=seen: bool(seen))
        gevent.idle()  # the stream's own callback, if it was still to come, ran
        observed.append(seen[0])
        assert stream.is_clean() and stream.watcher.io.active
        b.send(b"POISON")
        assert loop_until(lambda stream=stream: not stream.is_clean())
        helper.close()
        for sock in (b, c, d):
            sock.close()
        stream.close()
    assert any(observed)  # once at least, the callback came after the park


def test_park_starts_a_watcher_that_a_readiness_stopped() -> None:
    a, b = gsocket.socketpair()
    stream = GeventIO().stream(a)
    assert isinstance(stream, EventedStream)
    b.send(b"read while the owner was busy elsewhere")
    stream.watcher.wait()
    stream.recv(100)
    b.send(b"more")  # nobody waits: the watcher stops (no spinning on level-triggered epoll)
    assert loop_until(lambda: not stream.watcher.io.active)
    stream.recv(100)
    stream.park()  # back in the pool: watched again, from a clean slate
    assert stream.watcher.io.active and stream.is_clean()
    b.send(b"POISON")
    assert loop_until(lambda: not stream.is_clean())
    stream.close()
    b.close()


@pytest.mark.parametrize("kind", ["blocking", "gevent"])
def test_the_pool_drops_an_idle_connection_the_backend_wrote_on(kind: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        pool = Backend(parse_backend_addr(f"127.0.0.1:{port}"), connect_timeout=5,
                       fail_timeout=1, io=make_io(kind))
        upstream, _ = acquire(pool)
        peer, _ = listener.accept()
        clean, _ = acquire(pool)
        pool.release(clean)
        pool.release(upstream)  # the next acquire pops this one first
        peer.sendall(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n")
        peer.close()
        assert loop_until(lambda: not upstream.stream.is_clean())
        back, reused = acquire(pool)
        assert reused and back is clean and upstream.sock.fileno() == -1
        back.close()


def test_blocking_io_arms_socket_timeouts_and_gevent_io_deadlines() -> None:
    a, b = socket.socketpair()
    assert IO().arm(a, 2.5) == NEVER and a.gettimeout() == 2.5
    io = GeventIO()
    now = io.tick()
    assert io.arm(a, 2.5) == now + 2.5 and a.gettimeout() == 2.5  # untouched
    a.close()
    b.close()


class Conn:
    """What the watchdog reads of a client connection."""

    def __init__(self, deadline: float, idle: bool = False) -> None:
        self.deadline = deadline
        self.idle = idle
        self.task = None
        self.exchange = None  # (no request waiting on its backend: `balancer.hangups`)


def test_expire_throws_timeout_into_an_overdue_connection_only() -> None:
    io = GeventIO()
    overdue, later = Conn(0.0), Conn(NEVER)
    errors: list[BaseException] = []

    def serve(conn: Conn) -> None:
        io.attach(conn)
        try:
            gevent.sleep(DEADLINE)
        except TimeoutError as exc:
            errors.append(exc)
        finally:
            io.detach(conn)

    tasks = [gevent.spawn(serve, conn) for conn in (overdue, later)]
    assert loop_until(lambda: len(io.connections) == 2)
    io.expire(io.tick())
    assert loop_until(lambda: tasks[0].dead)
    assert len(errors) == 1 and overdue.deadline == NEVER and not tasks[1].dead
    tasks[1].kill()
    assert io.connections == set()


def test_close_idle_brings_forward_the_deadline_of_idle_connections_only() -> None:
    io = GeventIO()
    idle, busy = Conn(NEVER, idle=True), Conn(NEVER)
    io.connections |= {idle, busy}
    io.close_idle(by=42.0)
    assert (idle.deadline, busy.deadline) == (42.0, NEVER)


def test_an_upstream_closes_its_stream() -> None:
    a, b = gsocket.socketpair()
    upstream = Upstream(GeventIO().stream(a))
    upstream.close()
    assert a.fileno() == -1
    b.close()
