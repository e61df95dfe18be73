"""`balancer.sockcalls`: the C calls (`balancer._sockio`) and their Python
equivalents behave alike on real loopback sockets, against hostile peers
(exhausted descriptors at accept: tests/test_descriptors.py).

Every test runs once per implementation: "python" always, "c" where the
extension is built (a compiled build without it fails: setup.py builds both).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import struct
import time
from _socket import socket as RawSocket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from gevent import socket as gsocket

from balancer import native, sockcalls

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

DEADLINE = 5.0
Calls = tuple[Callable[[Any, int], bytes | None], Callable[[Any, Any], int]]
Accept = Callable[[Any, int], tuple[Any, Any] | None]


def sockio() -> Any:
    try:
        from balancer import _sockio
    except ImportError:
        if native.compiled():
            pytest.fail("a compiled build without balancer._sockio (setup.py builds both)")
        pytest.skip("balancer._sockio is not built (interpreted install)")
    return _sockio


def c_calls() -> Calls:
    module = sockio()
    return module.recv, module.send


@pytest.fixture(params=["python", "c"])
def calls(request: pytest.FixtureRequest) -> Calls:
    """(recv, send) of one implementation."""
    if request.param == "python":
        return sockcalls.recv_py, sockcalls.send_py
    return c_calls()


@pytest.fixture(params=["python", "c"])
def accept(request: pytest.FixtureRequest) -> Accept:
    """accept of one implementation."""
    return sockcalls.accept_py if request.param == "python" else sockio().accept


@pytest.fixture(params=["python", "c"])
def send_span(request: pytest.FixtureRequest) -> Callable[[Any, bytes, tuple], int]:
    """send_span of one implementation."""
    return sockcalls.send_span_py if request.param == "python" else sockio().send_span


@pytest.fixture(params=["python", "c"])
def peek(request: pytest.FixtureRequest) -> Callable[[Any], int]:
    """peek of one implementation."""
    return sockcalls.peek_py if request.param == "python" else sockio().peek


@pytest.fixture
def tcp() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected loopback TCP pair: ours (non-blocking) and the peer (blocking)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname(), timeout=DEADLINE)
        peer, _ = listener.accept()
    ours.setblocking(False)
    peer.settimeout(DEADLINE)
    yield ours, peer
    ours.close()
    peer.close()


def readable(sock: socket.socket) -> None:
    """Wait until `sock` is readable (data, EOF or an error), at most DEADLINE."""
    if not select.select([sock], [], [], DEADLINE)[0]:
        raise AssertionError("the socket never became readable")


def writable(sock: socket.socket) -> None:
    """Wait until `sock` has room to send, at most DEADLINE."""
    if not select.select([], [sock], [], DEADLINE)[1]:
        raise AssertionError("the socket never became writable")


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 20))
        assert chunk, "EOF before every byte came"
        data += chunk
    return bytes(data)


def reset_by(peer: socket.socket) -> None:
    """Close `peer` with an RST (SO_LINGER 0) instead of a FIN."""
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()


def test_the_c_calls_are_used_wherever_they_are_built() -> None:
    seam = (sockcalls.recv_now, sockcalls.send_now, sockcalls.send_span_now,
            sockcalls.accept_now, sockcalls.peek_now)
    try:
        from balancer import _sockio
    except ImportError:
        assert not native.compiled(), "a compiled build without balancer._sockio"
        assert not sockcalls.NATIVE
        assert seam == (sockcalls.recv_py, sockcalls.send_py, sockcalls.send_span_py,
                        sockcalls.accept_py, sockcalls.peek_py)
        return
    assert sockcalls.NATIVE
    assert seam == (_sockio.recv, _sockio.send, _sockio.send_span, _sockio.accept,
                    _sockio.peek)


# send_span: a head and the end of a read in one sendmsg --------------------------------
READ = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789"  # as a backend's read


@pytest.mark.parametrize("start", [0, 1, READ.index(b"0123"), len(READ) - 1, len(READ)])
@pytest.mark.parametrize("head", [b"", b"H", b"HTTP/1.1 200 OK\r\nX-Request-Id: r\r\n\r\n"])
def test_send_span_sends_the_head_then_the_read_from_start(send_span, tcp, head: bytes,
                                                          start: int) -> None:
    ours, peer = tcp
    expected = head + READ[start:]
    assert send_span(ours, head, (READ, start)) == len(expected)
    if expected:
        assert read_exactly(peer, len(expected)) == expected
    assert send_span(ours, b"end", (READ, len(READ))) == 3  # nothing more came between
    assert read_exactly(peer, 3) == b"end"


def test_send_span_into_a_full_buffer_takes_part_then_nothing(send_span, tcp) -> None:
    """What a full buffer takes of a span: part of it (in order, nothing doubled),
    then 0 once it is full, never BlockingIOError."""
    ours, peer = tcp
    head = b"head:"
    data = b"skipped" + bytes(range(256)) * 4096  # 1 MB after a 7-byte start
    sent_total, pieces = 0, []
    for _ in range(1_000):  # the buffers fill after a few MB
        sent = send_span(ours, head, (data, 7))
        if sent == 0:
            break
        pieces.append(sent)
        sent_total += sent
    else:
        raise AssertionError("the send buffer never filled")
    assert sent_total > 0
    got = read_exactly(peer, sent_total)
    whole = head + data[7:]
    offset = 0
    for sent in pieces:  # each call sent a prefix of head + span, in order
        assert got[offset:offset + sent] == whole[:sent]
        offset += sent


@pytest.mark.parametrize("span", [(READ, -1), (READ, len(READ) + 1)])
def test_a_start_outside_the_read_is_a_value_error(send_span, tcp, span) -> None:
    ours, peer = tcp
    with pytest.raises(ValueError, match="start out of its bytes"):
        send_span(ours, b"head", span)
    assert send_span(ours, b"x", (READ, len(READ))) == 1  # nothing went before
    assert read_exactly(peer, 1) == b"x"


def test_a_span_to_a_gone_peer_fails_as_send_does(send_span, tcp) -> None:
    ours, peer = tcp
    reset_by(peer)
    readable(ours)
    with pytest.raises(ConnectionResetError):
        send_span(ours, b"late", (READ, 0))
    with pytest.raises(BrokenPipeError) as broken:
        send_span(ours, b"later", (READ, 0))
    assert broken.value.errno == errno.EPIPE
    ours.close()
    with pytest.raises(OSError) as closed:
        send_span(ours, b"closed", (READ, 0))
    assert closed.value.errno == errno.EBADF


def test_send_span_refuses_what_is_not_a_head_and_a_span() -> None:
    send_span = sockio().send_span
    with socket.socket() as sock:
        for args in [(sock, b"h", [READ, 0]), (sock, b"h", (READ,)), (sock, b"h", (READ, 0, 1)),
                     (sock, "h", (READ, 0)), (sock, b"h", (bytearray(READ), 0)),
                     (3, b"h", (READ, 0))]:
            with pytest.raises(TypeError):
                send_span(*args)
        with pytest.raises(TypeError, match="exactly 3 arguments"):
            send_span(sock, b"h")


def test_bytes_then_eof(calls: Calls, tcp) -> None:
    recv, send = calls
    ours, peer = tcp
    assert send(ours, b"request") == 7 and read_exactly(peer, 7) == b"request"
    peer.sendall(b"answer")
    readable(ours)
    data = recv(ours, 65536)
    assert data == b"answer" and type(data) is bytes
    peer.shutdown(socket.SHUT_WR)
    readable(ours)
    assert recv(ours, 65536) == b""
    assert recv(ours, 65536) == b""  # EOF stays EOF


def test_nothing_to_read_is_none_and_a_full_buffer_is_zero(calls: Calls, tcp) -> None:
    recv, send = calls
    ours, peer = tcp
    assert recv(ours, 65536) is None
    chunk, total = b"x" * 65536, 0
    for _ in range(10_000):  # the buffers fill well before 655 MB
        sent = send(ours, chunk)
        if sent == 0:
            break
        total += sent
    else:
        raise AssertionError("the send buffer never filled")
    assert total > 0
    assert read_exactly(peer, total) == b"x" * total  # nothing lost or doubled


def test_a_huge_send_is_partial_and_its_rest_goes_from_a_memoryview(calls: Calls, tcp) -> None:
    recv, send = calls
    ours, peer = tcp
    data = bytes(range(256)) * (32 << 12)  # 32 MB: more than both buffers hold
    sent = send(ours, data)
    assert 0 < sent < len(data)
    assert read_exactly(peer, sent) == data[:sent]
    view = memoryview(data)[sent:]
    writable(ours)  # the peer drained what was sent
    got = send(ours, view[:65536])
    assert got and read_exactly(peer, got) == data[sent:sent + got]


def test_reads_larger_than_the_buffer_are_sized_exactly(calls: Calls, tcp) -> None:
    recv, _ = calls
    ours, peer = tcp
    data = bytes(range(256)) * 600  # 153,600 bytes
    peer.sendall(data)
    got = bytearray()
    deadline = time.monotonic() + DEADLINE
    while len(got) < len(data) and time.monotonic() < deadline:
        readable(ours)
        chunk = recv(ours, 1 << 20)  # beyond _sockio's 64 KB buffer
        assert chunk is not None and type(chunk) is bytes
        got += chunk
    assert got == data


def test_a_small_read_takes_only_what_was_asked(calls: Calls, tcp) -> None:
    recv, _ = calls
    ours, peer = tcp
    peer.sendall(b"0123456789")
    readable(ours)
    assert recv(ours, 4) == b"0123"
    assert recv(ours, 100) == b"456789"
    with pytest.raises(ValueError, match="negative buffersize"):
        recv(ours, -1)


def test_a_reset_peer_is_connection_reset_then_broken_pipe(calls: Calls, tcp) -> None:
    recv, send = calls
    ours, peer = tcp
    reset_by(peer)
    readable(ours)
    with pytest.raises(ConnectionResetError) as reset:
        recv(ours, 65536)
    assert reset.value.errno == errno.ECONNRESET
    assert recv(ours, 65536) == b""  # the error is reported once, then EOF
    with pytest.raises(BrokenPipeError) as broken:
        send(ours, b"late")
    assert broken.value.errno == errno.EPIPE


def test_a_send_to_a_reset_peer_is_connection_reset(calls: Calls, tcp) -> None:
    _, send = calls
    ours, peer = tcp
    reset_by(peer)
    readable(ours)
    with pytest.raises(ConnectionResetError):
        send(ours, b"late")


def test_a_write_after_shutdown_is_a_broken_pipe_not_a_signal(calls: Calls, tcp) -> None:
    _, send = calls
    ours, _ = tcp
    ours.shutdown(socket.SHUT_WR)
    with pytest.raises(BrokenPipeError) as broken:
        send(ours, b"after")
    assert broken.value.errno == errno.EPIPE


def test_a_closed_socket_is_ebadf_never_another_descriptor(calls: Calls, tcp) -> None:
    recv, send = calls
    ours, peer = tcp
    ours.close()
    other, other_peer = socket.socketpair()  # likely reuses the closed descriptor number
    try:
        other_peer.sendall(b"not yours")
        for call in (lambda: recv(ours, 100), lambda: send(ours, b"x")):
            with pytest.raises(OSError) as closed:
                call()
            assert closed.value.errno == errno.EBADF
        assert other.recv(100) == b"not yours"  # untouched by the failed calls
    finally:
        other.close()
        other_peer.close()


def test_geventss_os_socket_is_accepted(calls: Calls) -> None:
    recv, send = calls
    a, b = gsocket.socketpair()
    try:
        raw = a._sock  # a subclass of _socket.socket, non-blocking
        assert send(raw, b"ping") == 4
        assert b.recv(10) == b"ping"
        assert recv(raw, 10) is None
        b.sendall(b"pong")
        readable(raw)
        assert recv(raw, 10) == b"pong"
    finally:
        a.close()
        b.close()


def test_not_a_socket_is_refused() -> None:
    recv, send = c_calls()
    with pytest.raises(TypeError):
        recv(3, 10)
    with pytest.raises(TypeError):
        send(object(), b"x")
    with socket.socket() as sock, pytest.raises(TypeError, match="exactly 2 arguments"):
        recv(sock)  # type: ignore[call-arg]


def test_signals_during_the_calls_lose_nothing(calls: Calls, tcp) -> None:
    """SIGPROF every 200 µs of CPU while 16 MB go through, again until the handler
    ran (the kernel checks CPU timers at its clock tick: a quick transfer can end
    before the first fires): every byte arrives once, the handler runs, and its
    exception surfaces where Python code would see it. (SIGPROF: pytest-timeout's
    timer is SIGALRM's.) The calls pass MSG_DONTWAIT, so a signal cannot
    interrupt their syscall (EINTR) itself: it lands between calls, as it would
    with the socket module's."""
    recv, send = calls
    ours, peer = tcp
    peer.setblocking(False)
    fired = []

    def on_signal(signum: int, frame: Any) -> None:
        fired.append(signum)

    previous = signal.signal(signal.SIGPROF, on_signal)
    signal.setitimer(signal.ITIMER_PROF, 0.0002, 0.0002)
    try:
        data = bytes(range(256)) * (1 << 16)
        deadline = time.monotonic() + DEADLINE
        for _ in range(20):  # transfers, each checked whole
            offset, got = 0, bytearray()
            while len(got) < len(data):
                assert time.monotonic() < deadline, "the transfer stalled"
                if offset < len(data):
                    offset += send(ours, memoryview(data)[offset:offset + 262144])
                with contextlib.suppress(BlockingIOError):
                    got += peer.recv(1 << 20)
            assert got == data
            if fired:
                break
        peer.sendall(b"end")
        echoed = None
        while echoed is None:
            assert time.monotonic() < deadline, "the answer never came"
            echoed = recv(ours, 10)
        assert echoed == b"end"
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)
    assert fired

    def raises(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGPROF, raises)
    try:
        signal.setitimer(signal.ITIMER_PROF, 0.001)
        with pytest.raises(KeyboardInterrupt):
            for _ in range(10_000_000):
                recv(ours, 10)
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def listening(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, 0), family=family)
    listener.setblocking(False)
    return listener


def accepted(accept: Accept, listener: socket.socket) -> tuple[Any, Any]:
    readable(listener)
    got = accept(listener, listener.proto)
    assert got is not None
    return got


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_accept_hands_out_a_non_blocking_os_socket_and_its_address(
        accept: Accept, host: str) -> None:
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        listener = listening(host)
    except OSError as exc:
        pytest.skip(f"no {host} here: {exc}")
    with listener, socket.create_connection(listener.getsockname()[:2], timeout=DEADLINE) as client:
        sock, address = accepted(accept, listener)
        try:
            assert address == client.getsockname() and type(address) is tuple
            assert type(sock) is RawSocket and sock.family == listener.family
            assert sock.type == socket.SOCK_STREAM and sock.proto == listener.proto
            assert sock.gettimeout() == 0.0
            assert fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
            assert fcntl.fcntl(sock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            client.sendall(b"hello")
            readable(sock)
            assert sock.recv(10) == b"hello"
        finally:
            sock.close()  # an OS socket is no context manager
        assert accept(listener, listener.proto) is None  # the queue is empty


def test_a_connection_reset_before_accept_is_handed_out_and_reads_as_reset(
        accept: Accept) -> None:
    with listening("127.0.0.1") as listener:
        client = socket.create_connection(listener.getsockname(), timeout=DEADLINE)
        reset_by(client)
        sock, _ = accepted(accept, listener)
        try:
            readable(sock)
            with pytest.raises(ConnectionResetError):
                sock.recv(10)
        finally:
            sock.close()


def test_accept_on_a_closed_listener_is_ebadf(accept: Accept) -> None:
    listener = listening("127.0.0.1")
    listener.close()
    with pytest.raises(OSError) as closed:
        accept(listener, 0)
    assert closed.value.errno == errno.EBADF


# peek: what waits on an idle connection, nothing read ------------------------------
def test_peek_tells_nothing_bytes_and_end_and_reads_nothing(peek, tcp) -> None:
    ours, peer = tcp
    assert peek(ours) == sockcalls.NOTHING
    peer.sendall(b"stray")
    readable(ours)
    assert [peek(ours), peek(ours)] == [sockcalls.WAITING] * 2
    peer.shutdown(socket.SHUT_WR)
    assert peek(ours) == sockcalls.WAITING  # (bytes before the end: still bytes)
    assert ours.recv(100) == b"stray"  # every byte still there
    readable(ours)
    assert peek(ours) == sockcalls.ENDED


def test_peek_of_a_reset_or_closed_socket_is_its_end_never_an_error(peek, tcp) -> None:
    ours, peer = tcp
    reset_by(peer)
    readable(ours)
    assert [peek(ours), peek(ours)] == [sockcalls.ENDED] * 2
    ours.close()
    assert peek(ours) == sockcalls.ENDED  # (EBADF)


def test_peek_never_waits_on_a_blocking_socket(peek, tcp) -> None:
    ours, _peer = tcp
    ours.setblocking(True)
    started = time.monotonic()
    assert peek(ours) == sockcalls.NOTHING
    assert time.monotonic() - started < 1.0


def test_peek_never_waits_on_a_socket_with_a_timeout(peek, tcp) -> None:
    """(The socket module's recv waits for readability first where the socket has
    a timeout: the Python call waited for it, then told a TimeoutError: ENDED.)"""
    ours, _peer = tcp
    ours.settimeout(3.0)
    started = time.monotonic()
    assert peek(ours) == sockcalls.NOTHING
    assert time.monotonic() - started < 1.0
    assert ours.gettimeout() == 3.0  # (left as it was)
    ours.close()
    assert peek(ours) == sockcalls.ENDED


def test_peek_refuses_what_is_not_a_socket() -> None:
    with pytest.raises(TypeError):
        sockio().peek(3)
