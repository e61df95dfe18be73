"""`balancer.outbox`: writes held to the end of the loop iteration. Real gevent
socket pairs and gevent's real loop; nothing is mocked."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import gevent
import pytest
from gevent import socket as gsocket

from balancer.netio import IO, EventedStream, GeventIO
from balancer.outbox import BATCH_LIMIT, HOLD_LIMIT, Outbox, TLSWriter, Writer
from tests.support import loop_until

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

DEADLINE = 5.0


@pytest.fixture
def pair() -> Iterator[tuple[Writer, socket.socket, socket.socket]]:
    """The writer of `a`'s stream (with its worker's outbox), and `b`, the other end."""
    a, b = gsocket.socketpair()
    io = GeventIO()
    stream = io.stream(a)
    assert isinstance(stream, EventedStream)
    writer = stream.writer
    assert writer.outbox is io.outbox and writer.raw is not a
    yield writer, a, b
    stream.close()
    b.close()


def pending(sock: socket.socket) -> bytes:
    """What `sock` can read right now, without waiting (b"" if nothing)."""
    sock.setblocking(False)
    try:
        return sock.recv(1 << 20)
    except BlockingIOError:
        return b""
    finally:
        sock.setblocking(True)


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    with gevent.Timeout(DEADLINE):
        while len(data) < size:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data.extend(chunk)
    return bytes(data)


def test_a_held_write_goes_out_when_the_loop_runs_its_callbacks(pair) -> None:
    writer, a, b = pair
    writer.write_last(b"response")
    assert pending(b) == b"" and writer.held == b"response"  # nothing sent yet
    gevent.sleep(0)  # the greenlet waits: the loop iteration ends
    assert read_exactly(b, 8) == b"response" and writer.held == b""


def test_writes_held_in_one_iteration_go_out_together_and_in_order(pair) -> None:
    writer, a, b = pair
    writer.write_last(b"one,")
    writer.write_last(b"two,")  # a pipelined second response
    assert writer.held == b"one,two,"
    gevent.sleep(0)
    assert read_exactly(b, 8) == b"one,two,"


def test_a_direct_write_first_sends_what_is_held(pair) -> None:
    writer, a, b = pair
    writer.write_last(b"first,")
    writer.write(b"second")
    assert pending(b) == b"first,second"


def test_finish_sends_what_is_held_at_once(pair) -> None:
    writer, a, b = pair
    writer.write_last(b"before close")
    writer.finish()
    assert pending(b) == b"before close"


def test_a_full_batch_goes_out_at_once_without_waiting_for_the_loop() -> None:
    """A burst of greenlets (held requests released together) must not keep the
    first peers waiting until the last greenlet has run."""
    pairs = [gsocket.socketpair() for _ in range(BATCH_LIMIT)]
    outbox = Outbox(gevent.get_hub().loop)
    try:
        writers = [Writer(a._sock, outbox) for a, _ in pairs]
        for i, writer in enumerate(writers[:-1]):
            writer.write_last(b"%d" % i)
        assert all(pending(b) == b"" for _, b in pairs)  # held: the batch is not full
        writers[-1].write_last(b"last")  # fills it: every held write goes out now
        expected = [b"%d" % i for i in range(BATCH_LIMIT - 1)] + [b"last"]
        assert [pending(b) for _, b in pairs] == expected
        assert outbox.held == 0 and outbox.queue == [None] * BATCH_LIMIT
    finally:
        for a, b in pairs:
            a.close()
            b.close()


class HoldingWhileWritten:
    """An SSL object for a `TLSWriter` whose every write holds, meanwhile, a write
    on each of `writers` (as if a writer's write held another's)."""

    def __init__(self, writers: list[Writer]) -> None:
        self.writers = writers

    def write(self, data: bytes) -> int:
        for n, writer in enumerate(self.writers):
            writer.write_last(b"%d" % n)
        self.writers = []
        return len(data)


@pytest.mark.parametrize("count", [1, BATCH_LIMIT + 2])
def test_writes_held_while_the_outbox_writes_go_out_too(count: int) -> None:
    """The outbox's arrays are kept from flush to flush: writes held during a
    flush (a full batch of them too, flushed within it) are neither lost nor
    made twice, nor are those of the flush still to be made."""
    pairs = [gsocket.socketpair() for _ in range(count + 1)]
    outbox = Outbox(gevent.get_hub().loop)
    try:
        writers = [Writer(a._sock, outbox) for a, _ in pairs]
        first = TLSWriter(None, HoldingWhileWritten(writers[1:]), outbox)
        first.write_last(b"first")
        writers[0].write_last(b"second")  # held behind it, in the same flush
        expected = [b"second"] + [b"%d" % n for n in range(count)]
        got = [b""] * len(pairs)

        def arrived() -> bool:
            for n, (_, b) in enumerate(pairs):
                got[n] += pending(b)
            return got == expected
        assert loop_until(arrived), got
        assert outbox.held == 0
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_a_write_over_the_limit_is_not_held(pair) -> None:
    writer, a, b = pair
    data = b"x" * (HOLD_LIMIT + 1)
    reader = gevent.spawn(read_exactly, b, len(data))
    writer.write_last(data)
    assert writer.held == b""
    assert reader.get(timeout=DEADLINE) == data


def test_a_flush_the_socket_takes_in_part_is_finished_in_order(pair) -> None:
    """A peer that does not read fills the buffer: the flush sends what fits,
    a greenlet sends the rest, and a later write waits for it."""
    writer, a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    first = bytes(range(256)) * 200  # 51,200 bytes: held, far more than the buffers
    writer.write_last(first)
    gevent.sleep(0)
    assert writer.rest is not None  # the flush sent only part of it
    reader = gevent.spawn(read_exactly, b, len(first) + 5)
    writer.write(b"after")  # waits for the rest before its own bytes
    assert reader.get(timeout=DEADLINE) == first + b"after"
    assert writer.rest is None


def test_a_held_write_to_a_gone_peer_is_dropped_and_the_next_read_says_so(pair) -> None:
    writer, a, b = pair
    b.close()
    writer.write_last(b"nobody reads this")
    gevent.sleep(0)  # the flush fails quietly, in the hub
    assert writer.held == b"" and writer.rest is None
    with gevent.Timeout(DEADLINE):
        try:
            got = a.recv(10)  # EOF...
        except ConnectionResetError:
            got = b""  # ...or an error: either way the owner stops
    assert got == b""


def test_close_drops_what_is_held_and_stops_a_send_in_progress(pair) -> None:
    writer, a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    writer.write_last(b"y" * 60000)
    gevent.sleep(0)
    rest = writer.rest
    assert rest is not None
    writer.close()  # would block: the peer is not reading
    assert writer.held == b"" and writer.rest is None
    deadline = time.monotonic() + DEADLINE
    while not rest.dead and time.monotonic() < deadline:
        gevent.sleep(0.005)
    assert rest.dead


def test_a_write_larger_than_the_buffer_waits_until_the_peer_reads_it_all() -> None:
    """The writer's own write watcher: the OS socket is non-blocking, and a write
    the buffer cannot take waits in the loop, not in the kernel."""
    a, b = gsocket.socketpair()
    data = bytes(range(256)) * 40000  # 10 MB: far more than a socket buffer holds
    reader, stream = gevent.spawn(read_exactly, b, len(data)), GeventIO().stream(a)
    assert isinstance(stream, EventedStream)
    try:
        with gevent.Timeout(DEADLINE * 4):
            stream.writer.send(data)
        assert reader.get(timeout=DEADLINE * 4) == data
        assert stream.writer.watcher is not None  # it had to wait
    finally:
        reader.kill()
        stream.close()
        b.close()
    assert stream.writer.watcher is None  # closed with the stream


def test_an_accepted_os_socket_is_read_and_written_without_gevents_wrapper() -> None:
    """What `balancer.accepting.Listener` hands out on plain listeners: the OS socket,
    non-blocking; the stream writes past a full buffer and reads it all back."""
    raw, b = socket.socketpair()  # the stdlib's: not gevent's
    raw.setblocking(False)
    stream = GeventIO().stream(raw)
    assert isinstance(stream, EventedStream) and stream.raw is raw
    data = b"z" * (4 << 20)
    reader = gevent.spawn(read_exactly, gsocket.socket(fileno=b.detach()), len(data))
    try:
        with gevent.Timeout(DEADLINE * 4):
            stream.write(data)
        assert reader.get(timeout=DEADLINE * 4) == data
    finally:
        reader.kill()
        stream.close()
    assert raw.fileno() == -1


# a head and the end of a read (`balancer.spans`), sent side by side -----------------
READ = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody"  # the backend's read
START = READ.index(b"body")


def test_a_held_head_and_span_go_out_in_one_flush_the_read_not_copied(pair) -> None:
    writer, a, b = pair
    writer.write_last_span(b"HEAD|", (READ, START))
    assert writer.held == b"HEAD|" and writer.tail is not None
    assert writer.tail[0] is READ  # the read itself is held, not a slice of it
    assert pending(b) == b""
    gevent.sleep(0)
    assert read_exactly(b, 9) == b"HEAD|body"
    assert writer.held == b"" and writer.tail is None


def test_writes_after_a_held_span_join_it_in_order(pair) -> None:
    writer, a, b = pair
    writer.write_last_span(b"one|", (READ, START))
    writer.write_last(b",two")  # a pipelined second response
    writer.write_last_span(b",three|", (READ, START))  # behind held bytes: joined too
    assert writer.held == b"one|body,two,three|body" and writer.tail is None
    gevent.sleep(0)
    assert read_exactly(b, 23) == b"one|body,two,three|body"


def test_a_direct_write_and_finish_send_a_held_span_first(pair) -> None:
    writer, a, b = pair
    writer.write_last_span(b"first|", (READ, START))
    writer.write(b",second")
    assert pending(b) == b"first|body,second" and writer.tail is None
    writer.write_last_span(b"third|", (READ, START))
    writer.finish()
    assert pending(b) == b"third|body" and writer.held == b"" and writer.tail is None
    writer.write_span(b"now|", (READ, START))  # not held
    assert pending(b) == b"now|body"


def test_a_span_over_the_limit_is_sent_at_once(pair) -> None:
    writer, a, b = pair
    data = b"x" * 100 + bytes(range(256)) * (HOLD_LIMIT // 256 + 1)
    reader = gevent.spawn(read_exactly, b, 5 + len(data) - 100)
    writer.write_last_span(b"head|", (data, 100))
    assert writer.held == b"" and writer.tail is None
    assert reader.get(timeout=DEADLINE) == b"head|" + data[100:]


@pytest.mark.parametrize("head_size", [10, 20000])  # the flush stops in the body, in the head
def test_a_span_the_socket_takes_in_part_is_finished_in_order(pair, head_size: int) -> None:
    """A slow reader: the flush's sendmsg takes part of head and span, a greenlet
    sends the rest, and a later write waits for it."""
    writer, a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    head = bytes(range(97, 123)) * (head_size // 26 + 1)
    data = b"skip" + bytes(range(256)) * 150  # 38,400 bytes after the start: held
    writer.write_last_span(head, (data, 4))
    assert writer.tail is not None
    gevent.sleep(0)
    assert writer.rest is not None and writer.tail is None  # the flush sent only part
    expected = head + data[4:] + b"after"
    reader = gevent.spawn(read_exactly, b, len(expected))
    writer.write(b"after")
    assert reader.get(timeout=DEADLINE) == expected
    assert writer.rest is None


def test_a_direct_span_larger_than_the_buffer_waits_until_the_peer_reads_it_all() -> None:
    a, b = gsocket.socketpair()
    head, data = b"head|", b"skip" + bytes(range(256)) * 40000  # 10 MB
    reader, stream = gevent.spawn(read_exactly, b, len(head) + len(data) - 4), GeventIO().stream(a)
    try:
        with gevent.Timeout(DEADLINE * 4):
            stream.write_span(head, (data, 4))
        assert reader.get(timeout=DEADLINE * 4) == head + data[4:]
    finally:
        reader.kill()
        stream.close()
        b.close()


def test_close_drops_a_held_span(pair) -> None:
    writer, a, b = pair
    writer.write_last_span(b"never|", (READ, START))
    writer.close()
    assert writer.held == b"" and writer.tail is None
    gevent.sleep(0)
    assert pending(b) == b""


def test_a_held_span_to_a_gone_peer_is_dropped(pair) -> None:
    writer, a, b = pair
    b.close()
    writer.write_last_span(b"nobody|", (READ, START))
    gevent.sleep(0)
    assert writer.held == b"" and writer.tail is None and writer.rest is None


def test_a_blocking_stream_sends_a_span_joined() -> None:
    a, b = socket.socketpair()
    stream = IO().stream(a)
    try:
        stream.write_span(b"one|", (READ, START))
        stream.write_last_span(b",two|", (READ, 0))
        expected = b"one|body,two|" + READ
        assert read_exactly(b, len(expected)) == expected
    finally:
        stream.close()
        b.close()
