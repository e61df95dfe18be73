"""Interoperability (issue 15.7), each through a real balancer with a scripted
raw backend and a scripted client: 1xx responses forwarded to HTTP/1.1 clients
as they come; no Content-Length on a 204 (kept on a 304); a slow small body
does not hold its head back; request trailers and `TE: trailers` reach the
backend; response trailers reach HTTP/1.1 clients (not HTTP/1.0 ones), and
bad ones (too large, malformed) cut the response; an HTTP/1.0 request without
Host; h2c upgrades dropped whole.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.rawpeer import RawBackend, client_exchange, head_fields
from tests.support import Balancer, wait_for

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

WAIT = 10.0  # seconds any step may take before the test fails


@pytest.fixture(scope="module")
def shared_bal(tmp_path_factory):
    """One balancer for the module (no host between tests: `stack`)."""
    bal = Balancer(tmp_path_factory.mktemp("interop"), {})
    yield bal
    bal.stop()


@pytest.fixture
def stack(shared_bal):
    """``bal, backend = stack(script)``: the module's balancer in front of a new
    `RawBackend`: `host`'s rule written, and taken by the worker, before it
    returns; removed after the test (a start saved a test, ~0.6 CPU-s)."""
    started: list[tuple[str, RawBackend]] = []

    def start(script, host: str = "app.test"):
        backend = RawBackend(script)
        started.append((host, backend))
        status, answer = shared_bal.api("PUT", f"/api/v1/hosts/{host}",
                                        {"action": "proxy", "backends": [backend.address]})
        assert status == 200, answer
        shared_bal.wait_version(answer["version"])
        return shared_bal, backend
    yield start
    for host, backend in reversed(started):
        assert shared_bal.api("DELETE", f"/api/v1/hosts/{host}")[0] == 200
        backend.stop()


class Reader:
    """A client connection that reads until a marker shows up, with a deadline."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.data = b""

    def _recv(self, deadline: float, failure: str) -> bytes:
        """One read before `deadline` (b"" once the balancer closed); else fails."""
        while True:
            left = deadline - time.monotonic()
            assert left > 0, failure
            self.sock.settimeout(left)
            try:
                return self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                return b""

    def until(self, marker: bytes, timeout: float = WAIT) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.data:
            chunk = self._recv(deadline, f"no {marker!r} in {self.data[:300]!r}")
            assert chunk, f"closed before {marker!r}: {self.data[:300]!r}"
            self.data += chunk
        return self.data

    def until_closed(self, timeout: float = WAIT) -> bytes:
        """Everything until the balancer closes the connection (which it must)."""
        deadline = time.monotonic() + timeout
        while chunk := self._recv(deadline, f"still open after {timeout} s: "
                                            f"{self.data[-300:]!r}"):
            self.data += chunk
        return self.data

    def close(self) -> None:
        self.sock.close()


# 1xx ---------------------------------------------------------------------------
def early_hints_then(go: threading.Event):
    def script(conn: socket.socket, request: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        go.wait(WAIT)  # the final answer only once the client saw the hints (or never)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True
    return script


def test_103_early_hints_reach_an_http11_client_before_the_response(stack) -> None:
    go = threading.Event()
    bal, _ = stack(early_hints_then(go))
    client = Reader(bal.port)
    try:
        client.sock.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        hints = client.until(b"\r\n\r\n", timeout=WAIT / 3)
        assert hints.startswith(b"HTTP/1.1 103 Early Hints\r\n")
        assert b"Link: </style.css>; rel=preload\r\n" in hints
        go.set()
        data = client.until(b"\r\n\r\nok")
        assert data.count(b"HTTP/1.1 200 OK\r\n") == 1
    finally:
        client.close()


def test_an_http10_client_gets_no_1xx(stack) -> None:
    go = threading.Event()
    go.set()
    bal, _ = stack(early_hints_then(go))
    answer = client_exchange(bal.port, b"GET / HTTP/1.0\r\nHost: app.test\r\n\r\n",
                             until=b"\r\n\r\nok")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b" 103 " not in answer


def continue_then_ok(conn: socket.socket, request: bytes) -> bool:
    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    return True


def test_a_backends_100_is_forwarded_but_never_twice(stack) -> None:
    bal, backend = stack(continue_then_ok)
    head = (b"PUT / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n")
    # the body came with the head: the balancer sent no 100 of its own
    answer = client_exchange(bal.port, head + b"hello", until=b"\r\n\r\nok")
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"), answer
    # the client waits for a 100 before its body: it gets one (the balancer's), once
    client = Reader(bal.port)
    try:
        client.sock.sendall(head)
        assert client.until(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.sock.sendall(b"hello")
        data = client.until(b"\r\n\r\nok")
        assert data.count(b" 100 Continue") == 1 and b"HTTP/1.1 200 OK" in data
    finally:
        client.close()
    assert backend.requests[-1].endswith(b"\r\n\r\nhello")


# 204 / 304 ---------------------------------------------------------------------
@pytest.mark.parametrize(("status", "kept"), [(204, False), (304, True)])
def test_content_length_on_bodyless_statuses(stack, status: int, kept: bool) -> None:
    def script(conn: socket.socket, request: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 %d X\r\nContent-Length: 1234\r\nETag: \"e\"\r\n\r\n" % status)
        return True

    bal, _ = stack(script)
    client = Reader(bal.port)
    try:
        for _ in range(2):  # the connection stays usable: nothing was taken for a body
            client.data = b""
            client.sock.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
            head = client.until(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 %d" % status) and b'ETag: "e"' in head
            assert (b"Content-Length: 1234" in head) is kept
            assert b"content-length" not in head.lower().replace(b"content-length: 1234", b"")
    finally:
        client.close()


# a slow small body --------------------------------------------------------------
def test_a_slow_small_body_does_not_hold_its_head_back(stack) -> None:
    go = threading.Event()

    def script(conn: socket.socket, request: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n" + b"a" * 10)
        go.wait(WAIT)  # the rest only once the client has the head and the first bytes
        for _ in range(4):
            conn.sendall(b"b" * 10)
        return True

    bal, _ = stack(script)
    client = Reader(bal.port)
    try:
        client.sock.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        data = client.until(b"a" * 10, timeout=WAIT / 3)  # the backend waits WAIT
        assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 50" in data
        go.set()
        assert client.until(b"b" * 40).endswith(b"a" * 10 + b"b" * 40)
    finally:
        go.set()
        client.close()


# trailers ------------------------------------------------------------------------
def test_request_trailers_and_te_reach_the_backend(stack) -> None:
    def script(conn: socket.socket, request: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    bal, backend = stack(script)
    head = (b"POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n"
            b"TE: trailers\r\nConnection: TE\r\n\r\n")
    trailers = (b"0\r\nX-Checksum: abc\r\nX_Real_IP: 6.6.6.6\r\n"
                b"X-Forwarded-For: 6.6.6.6\r\n\r\n")
    # whole (the body came with the head), then streamed (it came later)
    answer = client_exchange(bal.port, head + b"5\r\nhello\r\n" + trailers, until=b"ok")
    assert answer.startswith(b"HTTP/1.1 200")
    client = Reader(bal.port)
    try:
        client.sock.sendall(head + b"5\r\nhello\r\n")
        wait_for(lambda: b"hello" in backend.inbound, what="the streamed first chunk")
        client.sock.sendall(b"6\r\n world\r\n" + trailers)
        client.until(b"ok")
    finally:
        client.close()
    for request in backend.requests:
        fields = head_fields(request)
        assert ("te", "trailers") in fields and ("connection", "te") in fields
        end = request[request.rindex(b"\r\n0\r\n") + 2:]
        assert end == b"0\r\nX-Checksum: abc\r\n\r\n", end


RESPONSE_HEAD = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                 b"Trailer: Server-Timing, X-Checksum\r\n\r\n5\r\nhello\r\n")
TRAILERS = (b"0\r\nServer-Timing: db;dur=53\r\nContent-Type: text/evil\r\n"
            b"X-Checksum: abc\r\n\r\n")
FORWARDED_TRAILERS = b"0\r\nServer-Timing: db;dur=53\r\nX-Checksum: abc\r\n\r\n"


def answer_with(*pieces: bytes):
    """A backend script sending a response in these pieces (a read apart at most)."""
    def script(conn: socket.socket, request: bytes) -> bool:
        for piece in pieces:
            conn.sendall(piece)
        return True
    return script


def test_response_trailers_reach_an_http11_client(stack) -> None:
    bal, backend = stack(answer_with(RESPONSE_HEAD, TRAILERS[:20], TRAILERS[20:]))
    client = Reader(bal.port)
    try:  # with TE: trailers, then without: an HTTP/1.1 client parses trailers either way
        for te in (b"TE: trailers\r\nConnection: TE\r\n", b""):
            client.data = b""
            client.sock.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\n" + te + b"\r\n")
            data = client.until(b"\r\n0\r\n")
            data = client.until(b"\r\n\r\n", timeout=WAIT) if data.endswith(b"0\r\n") else data
            data = client.until(FORWARDED_TRAILERS)
            head, _, body = data.partition(b"\r\n\r\n")
            assert b"\r\nTrailer: Server-Timing, X-Checksum" in head
            assert b"\r\nTransfer-Encoding: chunked" in head
            assert body == b"5\r\nhello\r\n" + FORWARDED_TRAILERS, body
    finally:
        client.close()
    assert len(backend.connections) == 1  # the backend connection was reused


def test_response_trailers_are_dropped_for_an_http10_client(stack) -> None:
    bal, _ = stack(answer_with(RESPONSE_HEAD, TRAILERS))
    client = Reader(bal.port)
    try:
        client.sock.sendall(b"GET / HTTP/1.0\r\nHost: app.test\r\nTE: trailers\r\n\r\n")
        data = client.until_closed()
    finally:
        client.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in head
    assert b"Trailer" not in head and b"Transfer-Encoding" not in head
    assert body == b"hello"


@pytest.mark.parametrize("trailers", [
    b"0\r\n" + b"X-Big: " + b"a" * 1024 * 1024 + b"\r\n\r\n",  # 1 MB: over max_header_bytes
    b"0\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n",  # max_headers
    b"0\r\nX-Bad: a\nb\r\n\r\n",  # a bare LF
    b"0\r\nX-Bad: a\rb\r\n\r\n",  # a bare CR
    b"0\r\nNo colon here\r\n\r\n",
    b"0\r\nX Bad: y\r\n\r\n",  # a space in the name
], ids=["1MB", "101-fields", "bare-LF", "bare-CR", "no-colon", "bad-name"])
def test_bad_response_trailers_cut_the_response(stack, trailers: bytes) -> None:
    bal, _ = stack(answer_with(RESPONSE_HEAD, trailers))
    client = Reader(bal.port)
    try:  # Connection: close, so that a 502 page closes too
        client.sock.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        data = client.until_closed()
    finally:
        client.close()
    assert b"X-Bad" not in data and b"X-Big" not in data
    if data.startswith(b"HTTP/1.1 502 "):  # it all came in the head's read: a 502, then close
        return
    # the head and body went out; the response then ends without its last chunk,
    # so the client knows it is incomplete
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"5\r\nhello\r\n" in data
    assert not data.endswith(b"\r\n\r\n")
    assert bal.api("GET", "/api/v1/stats")[0] == 200  # the balancer still serves
    assert bal.proc.poll() is None


# HTTP/1.0 without Host -------------------------------------------------------------
def test_an_http10_request_without_host_names_the_backend(stack) -> None:
    def script(conn: socket.socket, request: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    bal, backend = stack(script, host="*")
    answer = client_exchange(bal.port, b"GET /old HTTP/1.0\r\n\r\n", until=b"ok")
    assert answer.startswith(b"HTTP/1.1 200")
    fields = head_fields(backend.requests[0])
    assert [value for name, value in fields if name == "host"] == [backend.address]
    assert "x-forwarded-host" not in dict(fields)
    assert all(value for _, value in fields), fields


# h2c -------------------------------------------------------------------------------
def test_an_h2c_upgrade_is_dropped_with_its_settings(stack) -> None:
    def script(conn: socket.socket, request: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    bal, backend = stack(script)
    client = Reader(bal.port)
    try:
        client.sock.sendall(b"GET /1 HTTP/1.1\r\nHost: app.test\r\n"
                            b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
        assert client.until(b"ok").startswith(b"HTTP/1.1 200 OK\r\n")
        client.data = b""
        client.sock.sendall(b"GET /2 HTTP/1.1\r\nHost: app.test\r\n"  # still HTTP/1.1
                            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
        assert client.until(b"ok").startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        client.close()
    for request in backend.requests:
        names = {name for name, _ in head_fields(request)}
        assert not names & {"upgrade", "http2-settings", "connection"}, names
