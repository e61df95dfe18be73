"""Content-Length request bodies are queued as the reads they came in (no copy)
and reach the backend byte for byte however they were split
(`balancer.http11`'s module doc, `balancer.relay.send_request`)."""

from __future__ import annotations

import hashlib
import json
import socket
import time

import pytest

from balancer.http11 import END, ProtocolError, RequestHead, RequestParser
from balancer.spans import span_bytes
from tests.support import Backend, Balancer, split_responses

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

# A body that looks like heads and chunk framing: none of it may be read as such.
BODY = (b'{"a": "\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n0\r\n\r\n"}' * 3)[:150]
POST = b"POST /up HTTP/1.1\r\nHost: app.test\r\nContent-Length: %d\r\n\r\n" % len(BODY)
GET = b"GET /next HTTP/1.1\r\nHost: app.test\r\n\r\n"


def messages(parser: RequestParser) -> list[tuple[bytes, bytes, bool]]:
    """(target, body, complete) per request in `parser.events`."""
    out: list[list] = []
    for event in parser.events:
        if isinstance(event, RequestHead):
            out.append([event.target, b"", False])
        elif event is END:
            out[-1][2] = True
        else:
            out[-1][1] += span_bytes(event)
    return [tuple(message) for message in out]


def test_pieces_are_the_reads_they_came_in() -> None:
    parser = RequestParser()
    first = POST + BODY[:100]
    parser.feed(first)
    rest = BODY[100:]
    parser.feed(rest)
    head, span, alone, end = parser.events
    assert isinstance(head, RequestHead) and end is END
    assert span == (first, len(POST)) and span[0] is first  # a span of the head's read
    assert alone is rest  # a read that is all body: itself


def test_a_body_in_the_heads_read_is_one_span() -> None:
    parser = RequestParser()
    data = POST + BODY
    parser.feed(data)
    assert parser.events[1] == (data, len(POST)) and parser.events[1][0] is data
    assert parser.events[2] is END


def test_a_body_before_a_pipelined_head_ends_where_its_length_says() -> None:
    parser = RequestParser()
    parser.feed(POST + BODY + GET)
    assert messages(parser) == [(b"/up", BODY, True), (b"/next", b"", True)]
    assert type(parser.events[1]) is bytes  # sliced: another message follows


@pytest.mark.parametrize("after", [b"", GET, POST + BODY])
def test_split_at_every_byte(after: bytes) -> None:
    whole = POST + BODY + after
    expected = [(b"/up", BODY, True)] + ([(b"/next", b"", True)] if after == GET else []) + (
        [(b"/up", BODY, True)] if after.startswith(b"POST") else [])
    for cut in range(1, len(whole)):
        parser = RequestParser()
        parser.feed(whole[:cut])
        parser.feed(whole[cut:])
        assert messages(parser) == expected, cut
    for cut in range(1, len(whole) - 1, 7):  # three pieces: one cut inside the other's
        for second in range(cut + 1, len(whole)):
            parser = RequestParser()
            for piece in (whole[:cut], whole[cut:second], whole[second:]):
                parser.feed(piece)
            assert messages(parser) == expected, (cut, second)


def test_byte_by_byte() -> None:
    parser = RequestParser()
    for i in range(len(POST + BODY + GET)):
        parser.feed((POST + BODY + GET)[i:i + 1])
    assert messages(parser) == [(b"/up", BODY, True), (b"/next", b"", True)]


@pytest.mark.parametrize("data, status", [
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"abc", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -3\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n", 400),
])
def test_smuggling_defences_hold_for_large_feeds(data: bytes, status: int) -> None:
    """A feed over the head split's window (a body follows) is refused as a small one."""
    for padded in (data, data + b"x" * 8192):
        parser = RequestParser()
        with pytest.raises(ProtocolError) as caught:
            parser.feed(padded)
        assert caught.value.status == status


def test_a_head_over_the_window_is_split_whole() -> None:
    """A head with many fields and a body, in one feed larger than the window."""
    fields = b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 40) for i in range(90))
    head = POST.replace(b"\r\n\r\n", b"\r\n" + fields + b"\r\n")
    body = BODY * 40
    head = head.replace(b"Content-Length: %d" % len(BODY), b"Content-Length: %d" % len(body))
    parser = RequestParser()
    parser.feed(head + body + GET)
    assert messages(parser) == [(b"/up", body, True), (b"/next", b"", True)]
    assert len(parser.events[0].headers) == 92


# through a real balancer to a real backend ---------------------------------------
@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    backend = Backend("a")
    bal = Balancer(tmp_path_factory.mktemp("bodies"),
                   {"app.test": {"action": "proxy", "backends": [backend.address]}})
    yield bal
    bal.stop()
    backend.stop()


def read_responses(sock: socket.socket, count: int, timeout: float = 20.0) -> list:
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            answers = split_responses(data)
        except (ValueError, IndexError):  # a head not complete yet
            answers = []
        if len(answers) == count and all(len(body) == int(h["content-length"])
                                         for _, h, body in answers):
            return answers
        more = sock.recv(1 << 20)
        if not more:
            break
        data += more
    raise AssertionError(f"{count} responses not read: {data[:300]!r}")


def upload(port: int, body: bytes, *, apart: bool = False, after: bytes = b"",
           count: int = 1) -> list:
    """POST `body` (with its head in one write, or `apart`), then `after`; the
    `count` answers."""
    head = b"POST /up HTTP/1.1\r\nHost: app.test\r\nContent-Length: %d\r\n\r\n" % len(body)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if apart:
            sock.sendall(head)
            time.sleep(0.05)  # (not synchronisation: only makes a separate read likely)
            sock.sendall(body + after)
        else:
            sock.sendall(head + body + after)
        return read_responses(sock, count)


def seen(answer: tuple) -> tuple[str, int, str]:
    described = json.loads(answer[2])
    return described["path"], described["body_len"], described["body_sha"]


@pytest.mark.parametrize("size", [200, 600, 16 * 1024, 3 * 1024 * 1024 + 7])
@pytest.mark.parametrize("apart", [False, True])
def test_uploads_reach_the_backend_byte_for_byte(proxy, size: int, apart: bool) -> None:
    body = (hashlib.sha256(b"%d" % size).digest() * (size // 32 + 1))[:size]
    answers = upload(proxy.port, body, apart=apart)
    assert answers[0][0] == 200
    assert seen(answers[0]) == ("/up", size, hashlib.sha256(body).hexdigest())


@pytest.mark.parametrize("size", [100, 16 * 1024, 200 * 1024])
def test_a_request_pipelined_after_a_body_is_answered_after_it(proxy, size: int) -> None:
    body = bytes(range(256)) * (size // 256) + b"\r\n\r\n" * 4
    answers = upload(proxy.port, body, after=GET + POST + BODY, count=3)
    assert [seen(answer) for answer in answers] == [
        ("/up", len(body), hashlib.sha256(body).hexdigest()),
        ("/next", 0, hashlib.sha256(b"").hexdigest()),
        ("/up", len(BODY), hashlib.sha256(BODY).hexdigest())]


def test_a_body_sent_byte_by_byte(proxy) -> None:
    data = POST + BODY + GET
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            sock.sendall(data[i:i + 1])
        answers = read_responses(sock, 2)
    assert [seen(answer)[:2] for answer in answers] == [("/up", len(BODY)), ("/next", 0)]
    assert seen(answers[0])[2] == hashlib.sha256(BODY).hexdigest()
