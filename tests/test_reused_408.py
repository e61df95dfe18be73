"""A backend that times out an idle keep-alive connection with a `408` before it
closes it (Node.js, some Apache and Tomcat set-ups, Go servers): a request sent
on that pooled connection at that moment gets the 408 as its answer. It was not
processed (RFC 9110 §15.5.9), so the balancer drops it with its connection and
replays the request once on a fresh connection to the same backend, when the
request can be replayed (`balancer.relay.STALE`); a 408 on a fresh connection,
or to a request whose streamed body is gone, is the client's.

Scripted raw backends, a real balancer (one worker), real keep-alive clients:
a bodyless GET is served in the hub (`balancer.inline`), a POST by a greenlet;
a 408 with a Content-Length is whole when the hub reads it, a close-delimited
one (Node.js's) is handed to a greenlet before its end."""

from __future__ import annotations

import contextlib
import http.client
import random
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.rawpeer import read_request, serve_each
from tests.support import Balancer, in_threads

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

# Apache's and Tomcat's kind: framed, so the hub reads it whole
SIZED_408 = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
             b"Content-Length: 15\r\n\r\nRequest Timeout")
BARE_408 = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n"  # Node.js's
KEPT_408 = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 7\r\n\r\nexpired"  # kept open
FORMS = {"sized": SIZED_408, "bare": BARE_408}

# answer(connection number, requests it answered before, raw request): the bytes
# to send, and whether the connection stays open after them
Answer = Callable[[int, int, bytes], tuple[bytes, bool]]


def ok(number: int, request: bytes) -> bytes:
    """200 "conn N PATH BODY" (the body as the backend got it)."""
    head, _, body = request.partition(b"\r\n\r\n")
    text = b"conn %d %s %s" % (number, head.split(b" ", 2)[1], body)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text)


class ScriptedBackend:
    """Numbers its connections at their first request (a connection with none is
    no balancer's: under `pytest -n 4`, another test's probe of a port) and
    answers each request as `answer` says; notes every request (`requests`:
    connection number, raw request)."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list[tuple[int, bytes]] = []
        self.socks: list[socket.socket] = []
        serve_each(self.listener, self.serve)

    def serve(self, sock: socket.socket) -> None:
        sock.settimeout(10)
        self.socks.append(sock)
        number, answered = 0, 0
        with sock, contextlib.suppress(OSError):
            while request := read_request(sock):
                if not number:
                    with self.lock:
                        self.connections += 1
                        number = self.connections
                self.requests.append((number, request))
                data, keep = self.answer(number, answered, request)
                sock.sendall(data)
                answered += 1
                if not keep:
                    sock.shutdown(socket.SHUT_WR)
                    return

    def close(self) -> None:
        self.listener.close()
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[[Answer], tuple[ScriptedBackend, Balancer]]]:
    """A scripted backend and a one-worker balancer in front of it (app.test)."""
    made: list[ScriptedBackend | Balancer] = []

    def make(answer: Answer) -> tuple[ScriptedBackend, Balancer]:
        backend = ScriptedBackend(answer)
        made.append(backend)
        bal = Balancer(tmp_path, {"app.test": {"action": "proxy", "backends": [backend.address]}},
                       args=["--workers", "1"])
        made.append(bal)
        return backend, bal
    yield make
    for thing in reversed(made):
        if isinstance(thing, Balancer):
            thing.stop()
        else:
            thing.close()


def client(bal: Balancer) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", bal.port, timeout=10)


def ask(conn: http.client.HTTPConnection, method: str, path: str,
        body: bytes | None = None) -> tuple[int, bytes]:
    conn.request(method, path, body=body, headers={"Host": "app.test"})
    response = conn.getresponse()
    return response.status, response.read()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_408_on_a_reused_connection_is_replayed_on_a_fresh_one(start, method: str,
                                                                  form: str) -> None:
    """The backend answers each connection's first request, and the next one on
    that connection, once idle, with a 408 and a close: the client gets the
    second connection's answer to the same request (a POST's small body is
    buffered, so it goes again byte for byte)."""
    backend, bal = start(lambda number, answered, request: (
        (ok(number, request), True) if not answered else (FORMS[form], False)))
    conn = client(bal)
    assert ask(conn, "GET", "/first") == (200, b"conn 1 /first ")
    body = b"hello" if method == "POST" else None
    status, answer = ask(conn, method, "/second", body)
    assert (status, answer) == (200, b"conn 2 /second " + (body or b"")), answer
    assert [number for number, _ in backend.requests] == [1, 1, 2]
    (_, stale), (_, replayed) = backend.requests[1:]
    assert replayed == stale  # the same request, byte for byte
    stats = bal.host_stats("app.test")
    assert stats["completed_requests"] == stats["responses"]["2xx"] == 2
    assert stats["backends"][backend.address]["outcomes"]["error"] == 0  # not its failure
    conn.close()


def test_a_backend_that_always_answers_408_gets_its_408_to_the_client(start) -> None:
    """Every answer is a 408 that keeps the connection: the first request's (a new
    connection) is relayed; a later one is replayed exactly once (its pooled
    connection's 408 dropped), and the fresh connection's 408 relayed. A 408 to
    the POST (a refusal of a request with a body: it may lie unread) leaves its
    connection out of the pool, so the GET after it goes on a new one at once."""
    backend, bal = start(lambda number, answered, request: (KEPT_408, True))
    conn = client(bal)
    assert ask(conn, "GET", "/first") == (408, b"expired")
    assert [number for number, _ in backend.requests] == [1]
    assert ask(conn, "POST", "/second", b"hello") == (408, b"expired")
    assert [number for number, _ in backend.requests] == [1, 1, 2]
    assert ask(conn, "GET", "/third") == (408, b"expired")
    assert [number for number, _ in backend.requests] == [1, 1, 2, 3]
    stats = bal.host_stats("app.test")
    assert stats["completed_requests"] == stats["responses"]["4xx"] == 3
    conn.close()


def test_a_408_to_a_streamed_body_is_relayed(start) -> None:
    """A body behind `Expect: 100-continue` streams (the balancer's own 100, then the
    body as it comes), so it cannot go again: the reused connection's 408 is the
    client's answer, and the request went once."""
    backend, bal = start(lambda number, answered, request: (
        (ok(number, request), True) if not answered else (SIZED_408, False)))
    conn = client(bal)
    assert ask(conn, "GET", "/first") == (200, b"conn 1 /first ")
    conn.close()
    with socket.create_connection(("127.0.0.1", bal.port), timeout=10) as sock:
        # a second client: the first one's pooled connection is the one reused
        sock.sendall(b"POST /streamed HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        got = sock.recv(65536)
        assert got.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), got
        sock.sendall(b"hello")
        data = got[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
        while b"\r\n\r\n" not in data:  # its head
            more = sock.recv(65536)
            assert more, data
            data += more
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert [number for number, _ in backend.requests] == [1, 1]
    assert backend.requests[1][1].endswith(b"\r\n\r\nhello")


IDLE = 0.1  # seconds the racing backend keeps an idle connection
LAG = 0.03  # ... and takes to write its 408 once it decided to (requests that come
# meanwhile are read and dropped)
CLIENTS, ROUNDS = 16, 12


class TimingOutBackend:
    """Answers requests on a connection until it sits idle for `IDLE` seconds, then
    writes a 408 `LAG` seconds later and closes, whatever came meanwhile (a
    request then is `raced`)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        self.answered = 0
        self.raced = 0  # requests dropped, answered 408
        self.socks: list[socket.socket] = []
        serve_each(self.listener, self.serve)

    def serve(self, sock: socket.socket) -> None:
        sock.settimeout(10)
        self.socks.append(sock)
        with sock, contextlib.suppress(OSError):
            while True:
                readable, _, _ = select.select([sock], [], [], IDLE)
                if not readable:
                    self.time_out(sock)
                    return
                request = read_request(sock)
                if not request:
                    return
                with self.lock:
                    self.answered += 1
                sock.sendall(ok(0, request))

    def time_out(self, sock: socket.socket) -> None:
        time.sleep(LAG)
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            if sock.recv(65536):
                with self.lock:
                    self.raced += 1
        sock.settimeout(10)
        sock.sendall(BARE_408 if random.random() < 0.5 else SIZED_408)
        sock.shutdown(socket.SHUT_WR)
        select.select([sock], [], [], 1.0)  # the balancer's close (a request's bytes: dropped)

    def close(self) -> None:
        self.listener.close()
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def test_no_client_sees_the_408_of_a_backend_timing_out_idle_connections(tmp_path) -> None:
    """The race itself: keep-alive clients send a request each, in rounds, and pause
    about as long as the backend keeps an idle connection (a little less, so the
    pooled connection is reused as always; a little more, so its 408 came first
    and the pool drops it; or in between, so the request goes out as the 408
    comes). None of the 408s reaches a client."""
    backend = TimingOutBackend()
    bal = Balancer(tmp_path, {"app.test": {"action": "proxy", "backends": [backend.address]}},
                   args=["--workers", "1"])
    # every answer came: all pause together, as long as the round's `pause` says (a
    # pooled connection is the newest idle one, so one client pausing while others
    # send finds it just used)
    pause = [0.0]
    rounds = threading.Barrier(CLIENTS, timeout=10, action=lambda: pause.__setitem__(
        0, random.uniform(IDLE - LAG / 2, IDLE + LAG * 1.5)))
    started = time.monotonic()
    try:
        def one_client() -> list[int]:
            conn, statuses = client(bal), []
            for n in range(ROUNDS):
                statuses.append(ask(conn, "GET", f"/{n}")[0])
                rounds.wait()
                time.sleep(pause[0])  # (the backend's timer is what is tested)
            conn.close()
            return statuses
        statuses = [status for future in in_threads(CLIENTS, one_client)
                    for status in future.result(timeout=30)]
        assert len(statuses) == CLIENTS * ROUNDS
        assert statuses.count(408) == 0 and set(statuses) == {200}, statuses
        assert backend.raced, "no request came as a 408 was written: the race never ran"
        assert time.monotonic() - started < 30
    finally:
        bal.stop()
        backend.close()
