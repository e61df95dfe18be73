"""Hostile probes of peers that stall, through real sockets.

A backend: `backend_read` bounds each read of a response head from the one
before (as nginx's `proxy_read_timeout` and HAProxy's `timeout server`), not
the whole head: a head sent in pieces, or 1xx heads (`102 Processing`, `103
Early Hints`) long before the final answer, is relayed, not a 504, on both
paths (the hub's first read of a GET, the greenlet's reads of a POST's answer).

A client: one that stops sending its request body is closed after
`client_idle` with no answer and counted as a 408 (nginx's
`client_body_timeout`), not as a 499 (a client that left); one that reads
nothing of its answer is closed after `client_idle` (nginx's `send_timeout`),
at once: it does not linger.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest

from tests.rawpeer import read_request, serve_each
from tests.support import Balancer, wait_for

HOST = "slow.test"
READ = 1.0  # timeouts.backend_read
IDLE = 0.5  # timeouts.client_idle
BIG = 1 << 30  # an answer no socket buffer holds
GAP = 0.5  # between two pieces of an answer: within READ of the one before
HINT = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
PIECES = {
    "/hints": [HINT, HINT, OK],
    "/pieces": [b"HTTP/1.1 200 OK\r\n", b"X-Slow: 1\r\n", b"Content-Length: 2\r\n\r\nok"],
    # empty lines, which llhttp skips before a status line (no byte of a head):
    # no read of them re-arms backend_read, else a trickle held the request for ever
    "/empty": [b"\r\n", b"\n", b"\r\n", b"\r\n", OK],
    "/hint-empty": [HINT, b"\r\n", b"\r\n", b"\r\n", OK],
}
NO_HEAD = {"/empty": [], "/hint-empty": [b"HTTP/1.1 103 Early Hints"]}  # then a 504


def answer_in_pieces(conn: socket.socket) -> None:
    """Each answer's pieces `GAP` apart, the first `GAP` after the request: the
    whole answer comes later than `READ` after it (the connection kept)."""
    with conn, contextlib.suppress(OSError):  # (a failing balancer closes it)
        conn.settimeout(10)
        for _ in range(10):
            request = read_request(conn)
            if not request:
                return
            path = request.split(b" ")[1].decode()
            if path == "/big":  # written until the balancer closes the connection
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
                for _ in range(BIG // 65536):
                    conn.sendall(bytes(65536))
                return
            for piece in PIECES[path]:
                time.sleep(GAP)
                conn.sendall(piece)


@pytest.fixture(scope="module")
def bal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    listener = socket.create_server(("127.0.0.1", 0))
    serve_each(listener, answer_in_pieces)
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    balancer = Balancer(tmp_path_factory.mktemp("reads"),
                        {HOST: {"action": "proxy", "backends": [address], "retries": 0}},
                        env={"BALANCER_TIMEOUTS_BACKEND_READ": str(READ),
                             "BALANCER_TIMEOUTS_CLIENT_IDLE": str(IDLE)})
    yield balancer
    balancer.stop()
    listener.close()


def answer(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while more := sock.recv(65536):
            received += more
        return received


@pytest.mark.parametrize("path", ["/hints", "/pieces"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_each_read_of_an_answers_head_has_backend_read_from_the_one_before(
        bal: Balancer, path: str, method: str) -> None:
    body = b"Content-Length: 5\r\n\r\nhello" if method == "POST" else b"\r\n"
    got = answer(bal.port, f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n"
                           f"Connection: close\r\n".encode() + body)
    statuses = [line for line in got.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]
    hints = [b"HTTP/1.1 103 Early Hints"] * 2 if path == "/hints" else []
    assert statuses == [*hints, b"HTTP/1.1 200 OK"], got
    assert got.endswith(b"\r\n\r\nok")


@pytest.mark.parametrize("path", sorted(NO_HEAD))
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_reads_of_empty_lines_before_a_head_do_not_extend_backend_read(
        bal: Balancer, path: str, method: str) -> None:
    body = b"Content-Length: 5\r\n\r\nhello" if method == "POST" else b"\r\n"
    started = time.monotonic()
    got = answer(bal.port, f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n"
                           f"Connection: close\r\n".encode() + body)
    statuses = [line for line in got.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]
    assert statuses == [*NO_HEAD[path], b"HTTP/1.1 504 Gateway Timeout"], got
    # READ from the request, or from the 103 (GAP after it), and a watchdog tick
    assert time.monotonic() - started < READ + GAP * len(NO_HEAD[path]) + READ / 2


def statuses(bal: Balancer) -> dict[str, float]:
    """The host's requests counted as 408 and 499 (0 before the first)."""
    series = bal.metrics()
    return {code: series.get(("balancer_requests_total", (("code", code), ("host", HOST))), 0.0)
            for code in ("408", "499")}


@pytest.mark.parametrize(("leaves", "code"), [(False, "408"), (True, "499")])
def test_a_client_that_stops_sending_its_body_is_a_408_and_one_that_leaves_a_499(
        bal: Balancer, leaves: bool, code: str) -> None:
    before = statuses(bal)
    with socket.create_connection(("127.0.0.1", bal.port), timeout=10) as sock:
        sock.sendall(f"POST /pieces HTTP/1.1\r\nHost: {HOST}\r\n"
                     f"Content-Length: 100\r\n\r\n0123456789".encode())
        if leaves:
            sock.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        assert sock.recv(65536) == b""  # closed with no answer
        assert time.monotonic() - started < IDLE + 1.0
    wait_for(lambda: statuses(bal)[code] == before[code] + 1, 5, what=f"a {code} counted")
    assert statuses(bal) == {**before, code: before[code] + 1}


def open_connections(bal: Balancer) -> float:
    return bal.metrics()[("balancer_open_connections", ())]


def test_a_client_that_reads_nothing_of_its_answer_is_closed_after_client_idle(
        bal: Balancer) -> None:
    with socket.create_connection(("127.0.0.1", bal.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(f"GET /big HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        wait_for(lambda: open_connections(bal) == 1, 5, what="the request served")
        # client_idle, a watchdog tick (IDLE / 4) and a scrape: not another
        # client_idle for what is held of the answer, then linger_idle (5 s)
        wait_for(lambda: open_connections(bal) == 0, IDLE + 1.0, what="the connection closed")
