"""Request lines get the same answer however the head around them is read
(`balancer/http11.py`): alone (a raw head), as a chunked request's head (read
again field by field for its trailers), or pipelined after a chunked request in
the same bytes or split anywhere (where llhttp took RTSP/1.0 as HTTP/1.0). Every
request line is read by one function, `RequestParser._request_line`."""

from __future__ import annotations

import re
import socket

import pytest

from balancer.http11 import ProtocolError, RequestHead, RequestParser
from balancer.spans import span_bytes
from tests.rawpeer import RawBackend
from tests.support import unchunk

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

# (request line, the status it gets: 200 for one that is served)
LINES = [
    (b"GET / HTTP/1.1", 200),
    (b"GET / HTTP/1.0", 200),
    (b"GET   /a?b   HTTP/1.1", 200),  # several spaces between the parts (llhttp takes them)
    (b"OPTIONS * HTTP/1.1", 200),
    (b"GET http://app.test/p?q HTTP/1.1", 200),  # absolute-form
    (b"GET HTTP://app.test HTTP/1.1", 200),
    (b"DELETE /x HTTP/1.1", 200),
    (b"PURGE /x HTTP/1.1", 200),
    (b"GET / RTSP/1.0", 505),
    (b"DESCRIBE / RTSP/1.0", 505),
    (b"SOURCE / ICE/1.0", 505),
    (b"GET / HTTP/2.0", 505),
    (b"GET / HTTP/0.9", 505),
    (b"GET / HTTP/3.0", 505),  # (llhttp refused it: a 400)
    (b"GET / HTTP/9.9", 505),
    (b"GET /", 505),  # HTTP/0.9: a line alone
    (b"GET /a\nX: HTTP/1.1", 505),  # HTTP/0.9 ending at a bare LF
    (b"GET / HTTP/1.1\n", 400),  # a bare LF after the version
    (b"GET / HTTP/1.2", 200),  # RFC 9110 §2.5: as HTTP/1.1 (nginx, HAProxy; was a 400)
    (b"GET / HTTP/1.9", 200),
    (b"GET / HTTP/1.10", 400),
    (b"GET / http/1.1", 400),
    (b"GET / HTTP/1.1 ", 400),
    (b"GET /a b HTTP/1.1", 400),  # a space in the target
    (b"GET\t/ HTTP/1.1", 400),
    (b" GET / HTTP/1.1", 400),
    (b"get / HTTP/1.1", 400),
    (b"FOO / HTTP/1.1", 400),
    (b"DESCRIBE / HTTP/1.1", 400),  # an RTSP method
    (b"PRI * HTTP/2.0", 400),
    (b"GET /a#b HTTP/1.1", 400),  # a fragment
    (b"GET # HTTP/1.1", 400),
    (b"GET http://app.test/a#b HTTP/1.1", 400),
    (b"GET * HTTP/1.1", 400),  # * with another method than OPTIONS
    (b"GET a HTTP/1.1", 400),
    (b"GET ftp://app.test/ HTTP/1.1", 400),
    (b"GET http://u@app.test/ HTTP/1.1", 400),  # userinfo
    (b"GET http:/// HTTP/1.1", 400),
    (b"GET /\x7f HTTP/1.1", 400),
    (b"GET / HTTP/1.1\rX", 400),  # a bare CR
    (b"CONNECT app.test:443 HTTP/1.1", 501),
]
FIELDS = b"\r\nHost: app.test\r\n"
CHUNKED = (b"POST /up HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n0\r\n\r\n")


def status_of(feeds: list[bytes], nth: int) -> int:
    """The status the `nth` head (from 0) of what `feeds` give gets: 200 when it
    is parsed, else the ProtocolError's (which must come after the heads before)."""
    parser = RequestParser()
    try:
        for data in feeds:
            parser.feed(data)
    except ProtocolError as exc:
        heads = [e for e in parser.events if isinstance(e, RequestHead)]
        assert len(heads) == nth, (feeds, heads)
        return exc.status
    heads = [e for e in parser.events if isinstance(e, RequestHead)]
    assert len(heads) > nth, feeds
    return 200


@pytest.mark.parametrize(("line", "status"), LINES, ids=[repr(line) for line, _ in LINES])
def test_a_request_line_gets_the_same_status_on_both_paths(line: bytes, status: int) -> None:
    request = line + FIELDS + b"\r\n"
    assert status_of([request], 0) == status
    # pipelined after a chunked request: in the same feed, and split at every byte
    both = CHUNKED + request
    assert status_of([both], 1) == status
    for cut in range(1, len(both)):
        assert status_of([both[:cut], both[cut:]], 1) == status, cut
    # as a chunked request's head (an HTTP/1.0 one is refused for its chunked body)
    chunked = line + FIELDS + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    want = 400 if status == 200 and line.endswith(b"HTTP/1.0") else status
    assert status_of([chunked], 0) == want
    assert status_of([CHUNKED + chunked], 1) == want


def test_a_chunked_body_that_looks_like_its_end_is_read_whole() -> None:
    """A chunk whose data holds CRLF CRLF and a last chunk look-alike stays body,
    forwarded as it came (one piece per feed: its framing, up to the last chunk,
    which has trailers), and the head after the real end is read raw."""
    data = b"\r\n\r\n0\r\n\r\nGET / RTSP/1.0\r\n\r\n"
    body = b"%x\r\n%s\r\n0\r\nX-T: 1\r\n\r\n" % (len(data), data)
    head = b"POST /up HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    parser = RequestParser()
    parser.feed(head + body + b"GET /next HTTP/1.1" + FIELDS + b"\r\n")
    events = parser.events
    assert [e.target for e in events if isinstance(e, RequestHead)] == [b"/up", b"/next"]
    assert [e for e in events if isinstance(e, bytes)] == [body[:body.index(b"0\r\nX-T")]]
    assert events[0].trailers == ((b"X-T", b"x-t", b"1"),)
    assert not parser._fielded
    for cut in range(1, len(head + body)):  # the end found across two feeds too
        parser = RequestParser()
        whole = head + body + b"GET / RTSP/1.0" + FIELDS + b"\r\n"
        with pytest.raises(ProtocolError) as caught:
            parser.feed(whole[:cut])
            parser.feed(whole[cut:])
        assert caught.value.status == 505, cut
        framed = b"".join(span_bytes(e) for e in parser.events if isinstance(e, (bytes, tuple)))
        assert unchunk(framed + b"0\r\nX-T: 1\r\n\r\n") == data, cut


# through the balancer -----------------------------------------------------------------
def answer_ok(conn: socket.socket, request: bytes) -> bool:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    return True


def statuses(port: int, data: bytes) -> list[int]:
    """The statuses of the responses to `data`, sent at once on a new connection
    (read until the balancer closes it)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(data)
        while more := conn.recv(65536):
            received += more
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", received)]


def test_a_balancer_answers_the_same_status_alone_and_after_a_chunked_request(proxy_to) -> None:
    bal = proxy_to(RawBackend(answer_ok))
    port = bal.ports["proxy"]
    for line, status in LINES:
        request = line + FIELDS + b"Connection: close\r\n\r\n"
        alone = statuses(port, request)
        after = statuses(port, CHUNKED + request)
        assert alone == [status], (line, alone)
        assert after == [200, status], (line, after)
