"""A response whose head repeats the last one's goes to the client from the read
it came in (`balancer.spans`: head and body side by side in one sendmsg, the
body neither sliced out nor joined): the client gets the same bytes as
through the full path, however the backend's bytes were split, pipelined,
to a slow reader, and among responses that take the full path (HEAD, 204,
304, chunked, close-delimited). A real balancer and a scripted backend; run
compiled (the C `send_span`) and interpreted (``socket.sendmsg``)."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable

import pytest

from tests.rawpeer import RawBackend

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

DEADLINE = 10.0
PAUSE = 0.05  # between two writes of a split response: the balancer reads them apart


def page(size: int) -> bytes:
    """`size` bytes, no two neighbours alike (a byte lost or doubled shows)."""
    return (bytes(range(33, 127)) * (size // 94 + 1))[:size]


def response(size: int) -> bytes:
    """An nginx-like response (hop-by-hop fields the balancer drops included)."""
    return (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 05 Dec 2026 21:00:00 GMT\r\n"
            b"Content-Type: text/html\r\nContent-Length: %d\r\nConnection: keep-alive\r\n"
            b"Keep-Alive: timeout=5\r\nETag: \"692d5a40-1194\"\r\n\r\n" % size) + page(size)


def split_points(data: bytes) -> list[int]:
    """Where a backend's response may be cut in two: in the status line, before
    and at the blank line, the head alone, one byte of body, mid-body, all but one."""
    head = data.index(b"\r\n\r\n")
    body = len(data) - head - 4
    points = [5, head + 2, head + 4]
    if body:
        points += [head + 5, head + 4 + body // 2, len(data) - 1]
    return sorted({p for p in points if 0 < p < len(data)})


def answer(conn: socket.socket, request: bytes) -> bool:
    """``GET /SIZE/SPLIT``: `response(SIZE)`, written in two at SPLIT (0: whole)."""
    _, size, split = request.split(b" ", 2)[1].split(b"/")[:3]
    data = response(int(size))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cut = int(split)
    if cut:
        conn.sendall(data[:cut])
        time.sleep(PAUSE)
    conn.sendall(data[cut:])
    return True


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: app.test\r\n\r\n".encode()


def read_response(sock: socket.socket, buffer: bytearray, recv_size: int = 65536) -> bytes:
    """One Content-Length response from `sock` (bytes past it stay in `buffer`)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            match = re.search(rb"\r\ncontent-length: *(\d+)", bytes(buffer[:end]).lower())
            assert match, bytes(buffer[:end])
            size = end + 4 + int(match.group(1))
            if len(buffer) >= size:
                data = bytes(buffer[:size])
                del buffer[:size]
                return data
        assert time.monotonic() < deadline, "the response never came whole"
        more = sock.recv(recv_size)
        assert more, f"closed after {bytes(buffer[:200])!r}"
        buffer += more


def masked(data: bytes) -> bytes:
    """The response with its request id (new per request) blanked."""
    return re.sub(rb"\r\nX-Request-Id: [^\r]*", b"\r\nX-Request-Id: -", data)


def exchange_all(port: int, paths: list[str],
                 configure: Callable[[socket.socket], None] | None = None) -> list[bytes]:
    """Each of `paths` in turn on one keep-alive client connection: the responses."""
    sock = socket.socket()
    if configure is not None:
        configure(sock)
    sock.settimeout(DEADLINE)
    sock.connect(("127.0.0.1", port))
    buffer = bytearray()
    with sock:
        out = []
        for path in paths:
            sock.sendall(get(path))
            out.append(read_response(sock, buffer))
        assert not buffer
    return out


@pytest.mark.parametrize("size", [0, 2, 4500, 60000, 200000])
def test_repeated_responses_reach_the_client_the_same_however_they_were_split(
        proxy_to, size: int) -> None:
    backend = RawBackend(answer)
    bal = proxy_to(backend)
    splits = split_points(response(size))
    # the first takes the full path (llhttp); the others repeat its head
    got = exchange_all(bal.port, [f"/{size}/0", f"/{size}/0"]
                       + [f"/{size}/{cut}" for cut in splits])
    first = masked(got[0])
    assert first.endswith(b"\r\n\r\n" + page(size))
    assert b"Keep-Alive" not in first and b"Content-Length: %d\r\n" % size in first
    for cut, data in zip([0, *splits], got[1:], strict=True):
        assert masked(data) == first, f"split at {cut}"
    assert len(backend.connections) == 1  # reused, however many reads the answer took


def test_pipelined_requests_get_their_responses_in_order(proxy_to) -> None:
    backend = RawBackend(answer)
    bal = proxy_to(backend)
    paths = ["/4500/0", "/4500/0", "/4500/300", "/60000/0", "/60000/0", "/2/0", "/2/0"]
    with socket.create_connection(("127.0.0.1", bal.port), timeout=DEADLINE) as sock:
        sock.sendall(b"".join(get(path) for path in paths))
        buffer = bytearray()
        got = [read_response(sock, buffer) for _ in paths]
    for path, data in zip(paths, got, strict=True):
        size = int(path.split("/")[1])
        assert data.startswith(b"HTTP/1.1 200 OK\r\n")
        assert data.endswith(b"\r\n\r\n" + page(size)), path
    assert masked(got[0]) == masked(got[1]) == masked(got[2])
    assert masked(got[3]) == masked(got[4]) and masked(got[5]) == masked(got[6])


def test_a_slow_reader_with_a_tiny_buffer_gets_every_byte_in_order(proxy_to) -> None:
    """Responses larger than the client's socket buffers: the balancer's send of
    head and body is taken in part and finished as the client reads, in small
    reads after a pause."""
    backend = RawBackend(answer)
    bal = proxy_to(backend)

    def tiny(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting

    sock = socket.socket()
    tiny(sock)
    sock.settimeout(DEADLINE)
    sock.connect(("127.0.0.1", bal.port))
    buffer = bytearray()
    got = []
    with sock:
        for path in ["/60000/0", "/60000/0", "/60000/900", "/60000/0"]:
            sock.sendall(get(path))
            time.sleep(PAUSE)  # the balancer fills the buffers meanwhile
            got.append(read_response(sock, buffer, recv_size=1000))
    assert all(masked(data) == masked(got[0]) for data in got)
    assert got[0].endswith(b"\r\n\r\n" + page(60000))


RESPONSES = {
    b"/page": response(4500),
    b"/head": response(4500)[:-4500],  # HEAD: the same head, no body
    b"/204": b"HTTP/1.1 204 No Content\r\nServer: nginx\r\n\r\n",
    b"/304": b"HTTP/1.1 304 Not Modified\r\nServer: nginx\r\nContent-Length: 4500\r\n\r\n",
    b"/chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
    b"/close": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end",
}


def answer_kinds(conn: socket.socket, request: bytes) -> bool:
    target = request.split(b" ", 2)[1]
    conn.sendall(RESPONSES[target])
    return target != b"/close"


def test_other_responses_between_repeated_ones_keep_their_framing(proxy_to) -> None:
    backend = RawBackend(answer_kinds)
    bal = proxy_to(backend)
    sequence = [("GET", "/page"), ("GET", "/page"), ("HEAD", "/head"), ("GET", "/page"),
                ("GET", "/204"), ("GET", "/page"), ("GET", "/304"), ("GET", "/page"),
                ("GET", "/chunked"), ("GET", "/page"), ("GET", "/page"), ("GET", "/close")]
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", bal.port, timeout=DEADLINE)
    seen = []
    for method, path in sequence:
        conn.request(method, path, headers={"Host": "app.test"})
        resp = conn.getresponse()
        seen.append((path, resp.status, resp.getheader("Content-Length"),
                     resp.getheader("Transfer-Encoding"), resp.read()))
    conn.close()
    body = page(4500)
    assert seen == [
        ("/page", 200, "4500", None, body), ("/page", 200, "4500", None, body),
        ("/head", 200, "4500", None, b""), ("/page", 200, "4500", None, body),
        ("/204", 204, None, None, b""), ("/page", 200, "4500", None, body),
        ("/304", 304, "4500", None, b""), ("/page", 200, "4500", None, body),
        ("/chunked", 200, None, "chunked", b"hello world"), ("/page", 200, "4500", None, body),
        ("/page", 200, "4500", None, body), ("/close", 200, None, "chunked", b"until the end"),
    ]
