"""Slow readers do not starve live requests (issue 15.8, `balancer/turns.py`).

Hostile peers: clients that ask for a big response and read it slowly
(``slowhttptest -X``: a 4 KB receive buffer), in a burst, in front of a
backend that always has data ready; and relays that never wait. The worker
runs in this process, where what its loop wrote to each connection in each
iteration can be read from the kernel: a count of bytes, which no load
changes (the CPU time of an iteration was 0.06-0.32 s without turns on a
busy machine, against a 0.15 s bound: the test could pass without them).
"""

from __future__ import annotations

import contextlib
import fcntl
import select
import socket
import struct
import termios
from collections import Counter
from collections.abc import Iterator

import gevent
import gevent.socket as gsocket
import pytest

from balancer.readiness import Readable
from balancer.relay import RECV_SIZE
from balancer.server import Worker
from balancer.turns import BULK_TURNS, TURN_BYTES, Turn
from tests.rawpeer import serve_each
from tests.support import Backend, InProcessWorkers, TableStore, loop_until

BIG = 4 * 1024 * 1024
READERS = 200
HEAD_ROOM = 256  # the response head, written with the body's first bytes


class FastBackend:
    """Answers every request with BIG bytes in one sendall (the kernel copies)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (BIG, b"x" * BIG)
        serve_each(self.listener, self.serve)

    def serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while conn.recv(65536):
                    conn.sendall(self.answer)
            except OSError:
                pass

    def stop(self) -> None:
        self.listener.close()


@pytest.fixture
def worker() -> Iterator[Worker]:
    """A gevent worker in this process (the one the test measures) in front of a
    `FastBackend` (slow.test) and a live `Backend` (live.test)."""
    big, live, workers = FastBackend(), Backend(), InProcessWorkers()
    yield workers.start(TableStore({
        "slow.test": {"action": "proxy", "backends": [big.address]},
        "live.test": {"action": "proxy", "backends": [live.address]}}), {})
    workers.close()
    big.stop()
    live.stop()


# struct tcp_info's tcpi_bytes_acked (u64, Linux 4.1+): bytes the peer acknowledged
BYTES_ACKED = 120


def written(sock: socket.socket) -> int:
    """Bytes this process wrote to TCP socket `sock` so far: those its peer
    acknowledged and those still in its send queue (SIOCOUTQ)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, BYTES_ACKED + 8)
    queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
    return struct.unpack_from("Q", info, BYTES_ACKED)[0] + struct.unpack("i", queued)[0]


@contextlib.contextmanager
def most_written_in_a_turn(w: Worker) -> Iterator[list[int]]:
    """[the most bytes the worker wrote to one client connection in one loop
    iteration] while the block runs (counted before each poll, by a prepare
    watcher of the lowest priority: after the loop's own): what a relay moved
    in one turn."""
    most, seen = [0], {}

    def note() -> None:  # before each poll
        for conn in list(w.io.connections):
            with contextlib.suppress(OSError):  # (closed in this iteration)
                now = written(conn.sock)
                most[0] = max(most[0], now - seen.get(conn, 0))
                seen[conn] = now

    loop = gevent.get_hub().loop
    prepare = loop.prepare()
    prepare.priority = loop.MINPRI
    prepare.start(note)
    try:
        yield most
    finally:
        prepare.stop()


def live_request(address: tuple[str, int]) -> bytes:
    with gsocket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: live.test\r\nConnection: close\r\n\r\n")
        data = b""
        while more := sock.recv(65536):
            data += more
        return data


def test_live_requests_are_served_while_slow_readers_fill_their_buffers(worker: Worker) -> None:
    address = worker.servers[0].address
    readers = []
    try:
        with most_written_in_a_turn(worker) as most:
            for _ in range(READERS):  # queued (the loop runs at the next wait below)
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(address)
                sock.sendall(b"GET /big HTTP/1.1\r\nHost: slow.test\r\n\r\n")
                readers.append(sock)
            for _ in range(20):
                assert live_request(address).startswith(b"HTTP/1.1 200")
            # the slow ones are being served: each has its answer's first bytes
            assert loop_until(lambda: len(select.select(readers, [], [], 0)[0]) == READERS, 30)
        assert readers[0].recv(12) == b"HTTP/1.1 200"
    finally:
        for sock in readers:
            sock.close()
    # in turns a relay moves at most two steps (a read of RECV_SIZE, 64 KiB, and
    # its write) per loop iteration: TURN_BYTES, and the step that went past it;
    # starved (no turns), each reader's first megabyte went in one iteration
    assert 0 < most[0] <= TURN_BYTES + RECV_SIZE + HEAD_ROOM, most


def test_a_relay_that_never_waits_parks_after_its_turn() -> None:
    """Relays woken by I/O in one loop iteration, each with 4 MiB ready to move:
    they take turns over many iterations instead of all moving everything in one."""
    hub = gevent.get_hub()
    pairs = [socket.socketpair() for _ in range(4 * BULK_TURNS)]
    steps_in: Counter[int] = Counter()  # loop iteration -> 64 KiB steps made in it

    def relay(sock: socket.socket) -> None:
        Readable(sock).wait()  # as a relay waits: woken in the loop's pending phase
        turn = Turn(hub)
        for _ in range(64):  # data always ready, never a wait
            steps_in[hub.loop.iteration] += 1
            turn.spend(65536)  # one recv of the relay

    try:
        relays = [gevent.spawn(relay, theirs) for _, theirs in pairs]
        gevent.sleep(0)  # every relay waits for its socket
        for ours, _ in pairs:
            ours.send(b"x")
        gevent.joinall(relays, timeout=30)
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
    assert all(r.dead for r in relays) and sum(steps_in.values()) == 64 * len(pairs)
    # the wake-up: one step each plus the one that used the turn up; then
    # BULK_TURNS relays of two steps per iteration
    assert max(steps_in.values()) <= 2 * len(pairs), steps_in
    assert len(steps_in) >= 64 * len(pairs) // (2 * BULK_TURNS), len(steps_in)


def test_without_a_hub_a_turn_never_parks() -> None:
    turn = Turn(None)
    for _ in range(10):
        turn.spend(10 * TURN_BYTES)  # returns at once: blocking sockets, no loop
