"""Hostile probes of broken backends, through real sockets: scripted backends
that close a kept-alive connection at the worst moment, or answer health
checks with interim (1xx) responses without end, or weigh more than the
others together and go down, or are a deploy's old backends stopped before
its warmup ended.

A backend that reads a request on a connection taken from the pool and closes
it without an answer may have processed it (it crashed after a commit, or it
closes a connection after a fixed count of requests): the balancer cannot tell
that from a close that raced the request. A pooled connection found closed is
replayed on a fresh one for an idempotent request (the client never sees the
race), but a POST or a PATCH is never sent twice (RFC 9110 §9.2.2, RFC 9112
§9.3.1): the client gets a 502, as with nginx 1.22 and HAProxy 2.6 (both
compared on loopback with the same backend). Before 2026-12-07 such a POST
with its body in hand reached the backend twice.

A health check passes interim responses over (`103 Early Hints` before a
`200`), at most 32 of them as a request's relay does: a backend sending them
without end fails its check at once. Before 2026-12-07 the check read them
until its `timeout`, and as the socket always had data it never yielded: the
worker served nothing else for that long, every `interval`.

A backend that is down gets no request until its probe is due, whatever its
weight: with weighted round robin one that weighed more than the others
together got every request all the same (a refused connect each, retried; a
hung backend's `backend_read` each), until 2026-12-07; nor did a deploy's
warmup pass over old backends that are down (95 % of requests went to them
first at its start).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from balancer.relay import IDEMPOTENT, may_go_twice
from tests.rawpeer import RawBackend, read_through, serve_each
from tests.support import (
    Backend,
    Balancer,
    dead_address,
    raw_exchange,
    request,
    split_responses,
    wait_for,
)

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

HOST = "app.test"
CLOSING = "closing.test"
HINTS = "hints.test"
WEIGHTED = "weighted.test"
LIAR = "liar.test"
DEPLOYING = "deploying.test"
UPLOADS = "uploads.test"
STALLED = "stalled.test"
EARLY = "early.test"
BACKEND_READ = 1.5  # the balancer's timeouts.backend_read (client_idle: 75 s)
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n" * 64
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def first_answered(conn: socket.socket, raw: bytes) -> bool:
    """Answer a connection's first request (`/warm`) and keep it; read any other
    request whole, then close without an answer."""
    if raw.startswith(b"GET /warm "):
        conn.sendall(OK)
        return True
    return False


def answer_and_close(conn: socket.socket, _raw: bytes) -> bool:
    """Answer every request, then close without saying so (no `Connection: close`):
    the answer and the end of stream in one segment (corked), so that the close
    is there before the balancer reads the answer (a close that comes after it
    sent the next request on the connection is a 502, as with nginx)."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    conn.sendall(OK)
    conn.shutdown(socket.SHUT_WR)
    return False


@pytest.fixture(scope="module")
def backend() -> Iterator[RawBackend]:
    peer = RawBackend(first_answered)
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def closing() -> Iterator[RawBackend]:
    peer = RawBackend(answer_and_close)
    yield peer
    peer.stop()


def listening(serve: Callable[[socket.socket], None]) -> Iterator[str]:
    """A backend on 127.0.0.1:0 serving each connection with `serve` (a thread
    each): its address, until the generator is closed."""
    listener = socket.create_server(("127.0.0.1", 0))
    serve_each(listener, serve)
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


UPLOAD_LIMIT = 1000  # bytes of a body the `limiting` backend takes
TOO_LARGE = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n"


def refuses_large_uploads(conn: socket.socket) -> None:
    """Read each request's head; answer a body over `UPLOAD_LIMIT` with a 413 at
    once, keeping the connection (no `Connection: close`), then reset it 0.1 s
    later without reading the body (as servers that refuse a body they will not
    read: the reset is the kernel's, for the unread bytes); read a smaller one
    and answer 200."""
    conn.settimeout(5)
    try:
        while (data := read_through(conn)) is not None:
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(head.lower().partition(b"content-length:")[2].split(b"\r\n")[0] or 0)
            if length > UPLOAD_LIMIT:
                conn.sendall(TOO_LARGE)
                time.sleep(0.1)
                reset_by(conn)
                return
            while len(body) < length:
                more = conn.recv(65536)
                if not more:
                    return
                body += more
            conn.sendall(OK)
    except OSError:
        pass
    finally:
        conn.close()


def reset_by(conn: socket.socket) -> None:
    """Close `conn` with an RST (SO_LINGER 0)."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


@pytest.fixture(scope="module")
def limiting() -> Iterator[str]:
    yield from listening(refuses_large_uploads)


ANSWERED_EARLY = threading.Event()  # `answers_at_head` sent a chunked upload's answer head


def answers_at_head(conn: socket.socket) -> None:
    """Answer a chunked upload's head at once with a 200 head and half its body,
    keeping the connection; end that answer once the whole upload came, and
    reset the connection when anything more comes (the next request). Read a
    Content-Length request whole and answer 200."""
    conn.settimeout(5)
    try:
        while (data := read_through(conn)) is not None:
            head, _, body = data.partition(b"\r\n\r\n")
            if b"chunked" not in head.lower():
                length = int(head.lower().partition(b"content-length:")[2].split(b"\r\n")[0])
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(OK)
                continue
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nok")
            ANSWERED_EARLY.set()
            while not body.endswith(b"0\r\n\r\n"):
                body += conn.recv(65536)
            conn.sendall(b"!!")
            if conn.recv(65536):
                reset_by(conn)
                return
    except OSError:
        pass
    finally:
        conn.close()


@pytest.fixture(scope="module")
def early() -> Iterator[str]:
    yield from listening(answers_at_head)


def never_reads(conn: socket.socket) -> None:
    """Read a request's head, then nothing more (and answer nothing) for 10 s."""
    read_through(conn)
    time.sleep(10)
    conn.close()


@pytest.fixture(scope="module")
def stalled() -> Iterator[str]:
    yield from listening(never_reads)


def hints_without_end(conn: socket.socket) -> None:
    """Read a request, then send `103 Early Hints` as fast as the socket takes
    them, until the peer goes (or 5 s)."""
    conn.settimeout(5)
    end = time.monotonic() + 5
    try:
        conn.recv(65536)
        while time.monotonic() < end:
            conn.sendall(EARLY_HINTS)
    except OSError:
        pass
    finally:
        conn.close()


@pytest.fixture(scope="module")
def hinting() -> Iterator[str]:
    yield from listening(hints_without_end)


def healthy_to_checks_only(conn: socket.socket, raw: bytes) -> bool:
    """Answer the health check's `GET /healthz`; reset every other request."""
    if raw.startswith(b"GET /healthz "):
        conn.sendall(OK)
        return True
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return False


@pytest.fixture(scope="module")
def liar() -> Iterator[RawBackend]:
    peer = RawBackend(healthy_to_checks_only)
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def light() -> Iterator[Backend]:
    peer = Backend("light")
    yield peer
    peer.stop()


HEAVY = dead_address()  # refuses connections
OLD = dead_address()  # a deploy's old backend, stopped before its warmup ended


@pytest.fixture(scope="module")
def bal(tmp_path_factory: pytest.TempPathFactory, backend: RawBackend,
        closing: RawBackend, hinting: str, light: Backend,
        liar: RawBackend, limiting: str, stalled: str, early: str) -> Iterator[Balancer]:
    # retries 0: only the pooled connection's own replay can send a request twice
    balancer = Balancer(tmp_path_factory.mktemp("backends"), {
        HOST: {"action": "proxy", "backends": [backend.address], "retries": 0},
        CLOSING: {"action": "proxy", "backends": [closing.address], "retries": 0},
        HINTS: {"action": "proxy", "backends": [hinting],
                "health": {"interval": 0.1, "timeout": 1.0, "fall": 1}},
        WEIGHTED: {"action": "proxy",
                   "backends": [{"address": HEAVY, "weight": 10}, light.address]},
        LIAR: {"action": "proxy", "backends": [liar.address, light.address],
               "health": {"path": "/healthz", "interval": 0.1, "rise": 1}},
        DEPLOYING: {"action": "proxy", "backends": [light.address],
                    "draining": {"backends": [OLD], "since": time.time(), "warmup": 3600}},
        UPLOADS: {"action": "proxy", "backends": [limiting], "retries": 0},
        STALLED: {"action": "proxy", "backends": [stalled], "retries": 0},
        EARLY: {"action": "proxy", "backends": [early], "retries": 0}},
        env={"BALANCER_TIMEOUTS_BACKEND_READ": str(BACKEND_READ)})
    yield balancer
    balancer.stop()


def sent(backend: RawBackend, method: str, path: str) -> int:
    """How many times the backend received `method path`."""
    line = f"{method} {path} ".encode()
    return sum(raw.startswith(line) for raw in backend.requests)


@pytest.mark.parametrize(("method", "body"), [
    ("POST", b"order=1"),  # its body in hand: a greenlet's
    ("POST", None),        # bodyless: served in the hub
    ("PATCH", b"x" * 100),
])
def test_a_non_idempotent_request_is_never_sent_twice(bal: Balancer, backend: RawBackend,
                                                      method: str, body: bytes | None) -> None:
    path = f"/{method.lower()}-{len(body or b'')}"
    assert request(bal.port, path="/warm")[0] == 200  # a connection now in the pool
    status, _, _ = request(bal.port, method, path, body=body)
    assert (status, sent(backend, method, path)) == (502, 1)


@pytest.mark.parametrize("method", [
    b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE",  # RFC 9110 §9.2.2
    b"POST", b"PATCH", b"LOCK", b"CONNECT", b"get", b"Put", b"GET ", b"",  # (case counts)
])
def test_what_may_go_twice_is_what_rfc_9110_calls_idempotent(method: bytes) -> None:
    assert may_go_twice(method) == (method in IDEMPOTENT)
    assert may_go_twice(method) == (method in {b"GET", b"HEAD", b"PUT", b"DELETE",
                                               b"OPTIONS", b"TRACE"})


def test_an_idempotent_request_is_replayed_once_on_a_fresh_connection(
        bal: Balancer, backend: RawBackend) -> None:
    """The replay stays for what may go twice: the GET reaches the backend on
    the pooled connection, then once more on a new one (where it is the
    connection's first request, not `/warm`: closed unanswered too)."""
    assert request(bal.port, path="/warm")[0] == 200
    status, _, _ = request(bal.port, "PUT", "/put", body=b"v=1")
    assert (status, sent(backend, "PUT", "/put")) == (502, 2)


def test_a_post_behind_a_closed_pooled_connection_goes_on_a_fresh_one(
        bal: Balancer, closing: RawBackend) -> None:
    """A backend that closes after each answer without saying so: a POST
    pipelined right behind a GET takes the GET's connection from the pool
    before the worker saw its close (no loop iteration between), and is not
    replayed once sent. The pool's connection is peeked at first for a request
    that may not go twice, and a new one is made: the POST is answered and
    reaches the backend once (without the peek, a 502)."""
    for turn in range(5):
        post = b"order=%d" % turn
        answers = raw_exchange(
            bal.port, b"GET /warm HTTP/1.1\r\nHost: closing.test\r\n\r\n"
            b"POST /p HTTP/1.1\r\nHost: closing.test\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(post), post))
        assert [status for status, _, _ in split_responses(answers)] == [200, 200]
        assert sum(raw.endswith(post) for raw in closing.requests) == 1


@pytest.mark.parametrize("size", [
    UPLOAD_LIMIT + 1,  # in hand: sent with its head in one write
    70 * 1024,         # streamed (over 64 KiB), all in the sockets' buffers before the 413
    1024 * 1024,       # streamed, the 413 seen while it goes
])
def test_an_upload_after_an_early_refusal_is_not_sent_on_its_connection(
        bal: Balancer, size: int) -> None:
    """A backend that answers 413 to an upload it will not read, keeps the
    connection (no `Connection: close`) and resets it a little later: after a
    refusal of a request with a body the connection goes back to no pool, and
    the next upload gets a new one. Before 2026-12-07 it was pooled (unless the
    413 came while the body was still going) and the next POST sent on it was
    reset unanswered: a 502 (never replayed)."""
    for turn in range(3):
        with socket.create_connection(("127.0.0.1", bal.port), timeout=5) as sock:
            sock.sendall(b"POST /big HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n"
                         % (UPLOADS.encode(), size) + b"x" * size)
            assert read_through(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 413 ")
        assert request(bal.port, "POST", f"/small-{turn}", host=UPLOADS, body=b"v=1")[0] == 200


def test_a_connection_whose_answer_began_before_the_upload_ended_is_not_reused(
        bal: Balancer) -> None:
    """A backend that answers an upload's head before its body is all sent: the
    connection is not reused, whatever the status (as nginx keeps no
    connection whose request body was not all sent, `request_body_sent`): such
    a backend may never read the body and reset the connection later. This one
    ends its answer once the upload came and resets on the next request: before
    2026-12-07 its connection went back to the pool, and the next POST, sent on
    it, got a 502 (never replayed)."""
    for turn in range(2):
        ANSWERED_EARLY.clear()
        with socket.create_connection(("127.0.0.1", bal.port), timeout=5) as sock:
            sock.sendall(b"POST /up HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n"
                         b"\r\n5\r\nhello\r\n" % EARLY.encode())
            assert ANSWERED_EARLY.wait(5)
            sock.sendall(b"0\r\n\r\n")
            assert read_through(sock, b"ok!!").startswith(b"HTTP/1.1 200 ")
        status, _, body = request(bal.port, "POST", f"/small-{turn}", host=EARLY, body=b"v=1")
        assert (status, body) == (200, b"ok")


def test_an_upload_a_backend_stops_reading_times_out_after_backend_read(
        bal: Balancer) -> None:
    """A backend that reads a head and none of its 8 MiB body: the body's sends
    wait at most `backend_read` (as nginx's `proxy_send_timeout`), then a 504.
    Before 2026-12-07 they were bounded by `client_idle` (75 s), the timeout
    of the client's reads between them."""
    size = 8 << 20
    with socket.create_connection(("127.0.0.1", bal.port), timeout=10) as sock:
        started = time.monotonic()
        sender = threading.Thread(target=send_quietly, daemon=True, args=(
            sock, b"POST /up HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n"
            % (STALLED.encode(), size) + b"x" * size))
        sender.start()
        head = read_through(sock)
        took = time.monotonic() - started
    assert head is not None and head.startswith(b"HTTP/1.1 504 ")
    # (a deadline counts from the watchdog's last tick, up to a quarter second before)
    assert BACKEND_READ - 0.5 <= took < BACKEND_READ + 2.0


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """`sendall`, a failure (the balancer closed first) ignored."""
    with contextlib.suppress(OSError):
        sock.sendall(data)


def test_interim_answers_without_end_fail_a_health_check_at_once(bal: Balancer,
                                                                 hinting: str) -> None:
    """While the hinting backend is checked every 0.1 s, other hosts' requests are
    served at once, and its check fails naming the cause, not a timeout. Bug: the
    worker stalled for the check's 1 s timeout every 1.1 s: requests sent one after
    another for 1.2 s (a stall begins in any 1.1 s) met one, and one of them took
    1.0-1.2 s (10 requests, 0.03 s, could all pass between two stalls). Now each
    takes a few ms; 0.5 s leaves a loaded machine's scheduling room."""
    took: list[float] = []
    end = time.monotonic() + 1.2
    while time.monotonic() < end:
        began = time.monotonic()
        assert request(bal.port, path="/warm", host=CLOSING)[0] == 200
        took.append(time.monotonic() - began)
    assert max(took) < 0.5, sorted(took)[-5:]
    wait_for(lambda: bal.host_stats(HINTS)["backends"][hinting].get("problem") ==
             "invalid response: more than 32 interim (1xx) responses", timeout=10,
             what="the check's problem named")


@pytest.mark.parametrize(("host", "down"), [(WEIGHTED, HEAVY), (DEPLOYING, OLD)],
                         ids=["weighted", "deploying"])
def test_a_backend_down_gets_no_request(bal: Balancer, host: str, down: str) -> None:
    """Its `fall` (3) refused connects mark it down (each request retried on the
    light backend); the next requests go to the light one alone."""
    for _ in range(13):
        assert request(bal.port, host=host)[0] == 200
    stats = bal.host_stats(host)["backends"][down]
    assert (stats["state"], stats["outcomes"]["connect_error"]) == ("down", 3)


def test_checks_that_pass_do_not_clear_what_requests_found(bal: Balancer,
                                                           liar: RawBackend) -> None:
    """A backend healthy to its checks (every 0.1 s) that resets every request:
    its `fall` (3) resets mark it down, and the checks passing meanwhile do not
    bring it back before `fail_timeout` (10 s): one probe then, not one per
    check. Every request is answered (a GET: retried on the other backend)."""
    for _ in range(13):
        assert request(bal.port, host=LIAR)[0] == 200
    wait_for(lambda: sum(raw.startswith(b"GET /healthz ") for raw in liar.requests) >= 5,
             timeout=2, what="checks passing after the mark")
    assert request(bal.port, host=LIAR)[0] == 200
    stats = bal.host_stats(LIAR)["backends"][liar.address]
    assert (stats["state"], stats["outcomes"]["error"]) == ("down", 3)
