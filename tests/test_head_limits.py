"""The head limits (SPEC §4: `max_header_bytes`, `max_headers`) on requests and
responses, at the boundary (limit - 1, limit, limit + 1), whatever the read
sizes: whole, byte by byte and in seeded random chunks (the corpus's splits),
then end to end through a balancer with a scripted client and backend.

Issue 15.2: a request with one 70,000-byte header was forwarded (the limit
was the request line's plus the fields'), and responses were not held to a
field count at all (150 header fields passed; HAProxy answers 502).
"""

from __future__ import annotations

import socket

import pytest

from balancer.http11 import END, Limits, ProtocolError, RequestParser
from balancer.response_parser import ResponseParser
from tests.rawpeer import RawBackend, client_exchange, read_through
from tests.test_http_corpus import splits

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

SMALL = Limits(max_request_line=128, max_header_bytes=1024, max_headers=10)
DEFAULT = Limits()
MORE = b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n"  # one read then holds more than the head


def request_of_size(size: int, host: bytes = b"h") -> bytes:
    """A request whose head (request line to the blank line) is exactly `size` bytes."""
    start = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nX-Pad: "
    head = start + b"p" * (size - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == size
    return head


def request_with_fields(count: int) -> bytes:
    return (b"GET / HTTP/1.1\r\nHost: h\r\n"
            + b"".join(b"X-%d: v\r\n" % i for i in range(count - 1)) + b"\r\n")


def response_of_size(size: int) -> bytes:
    """A response whose head (status line to the blank line) is exactly `size` bytes."""
    start = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: "
    head = start + b"p" * (size - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == size
    return head + b"ok"


def response_with_fields(count: int) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
            + b"".join(b"X-%d: v\r\n" % i for i in range(count - 1)) + b"\r\nok")


def parse_requests(chunks: list[bytes], limits: Limits) -> list:
    parser = RequestParser(limits)
    for chunk in chunks:
        parser.feed(chunk)
    return list(parser.events)


def parse_response(chunks: list[bytes], limits: Limits) -> list:
    parser = ResponseParser(limits)
    for chunk in chunks:
        parser.feed(chunk)
    return list(parser.events)


def few_splits(data: bytes, seed: str) -> list[list[bytes]]:
    """Whole, in random chunks, and in 1,000-byte reads (byte by byte at 64 KiB
    is slow through the interpreted parser; SMALL covers that split)."""
    every = splits(data, seed)
    return [every[0], *every[2:], [data[i:i + 1000] for i in range(0, len(data), 1000)]]


# requests ----------------------------------------------------------------------
@pytest.mark.parametrize("limits", [SMALL, DEFAULT], ids=["small", "default"])
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_request_head_bytes_at_the_limit(limits: Limits, delta: int) -> None:
    data = request_of_size(limits.max_header_bytes + delta)
    chosen = splits if limits is SMALL else few_splits
    for extra in (b"", MORE):
        for chunks in chosen(data + extra, f"req-bytes{delta}{len(extra)}"):
            if delta <= 0:
                events = parse_requests(chunks, limits)
                assert events[0].headers[-1][1] == b"x-pad" and events[1] is END
                assert len(events) == (4 if extra else 2)
            else:
                with pytest.raises(ProtocolError) as info:
                    parse_requests(chunks, limits)
                assert info.value.status == 431, [len(c) for c in chunks][:10]


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_request_head_bytes_at_the_limit_after_a_pipelined_request(delta: int) -> None:
    """The head begins inside a read (after a request with a body): measured exactly."""
    first = b"POST /1 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
    data = first + request_of_size(SMALL.max_header_bytes + delta)
    for chunks in splits(data, f"pipelined{delta}"):
        if delta <= 0:
            assert [e for e in parse_requests(chunks, SMALL) if e is END][1] is END
        else:
            with pytest.raises(ProtocolError) as info:
                parse_requests(chunks, SMALL)
            assert info.value.status == 431


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_request_field_count_at_the_limit(delta: int) -> None:
    data = request_with_fields(SMALL.max_headers + delta)
    for chunks in splits(data + MORE, f"req-count{delta}"):
        if delta <= 0:
            assert len(parse_requests(chunks, SMALL)[0].headers) == SMALL.max_headers + delta
        else:
            with pytest.raises(ProtocolError) as info:
                parse_requests(chunks, SMALL)
            assert info.value.status == 431


def test_one_70000_byte_header_is_refused_however_it_arrives() -> None:
    data = b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"b" * 70000 + b"\r\n\r\n"
    for chunks in few_splits(data, "issue-15-2"):
        with pytest.raises(ProtocolError) as info:
            parse_requests(chunks, DEFAULT)
        assert info.value.status == 431


# responses ---------------------------------------------------------------------
@pytest.mark.parametrize("limits", [SMALL, DEFAULT], ids=["small", "default"])
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_response_head_bytes_at_the_limit(limits: Limits, delta: int) -> None:
    data = response_of_size(limits.max_header_bytes + delta)
    chosen = splits if limits is SMALL else few_splits
    for interim in (b"", b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"):
        for chunks in chosen(interim + data, f"resp-bytes{delta}{len(interim)}"):
            if delta <= 0:
                events = parse_response(chunks, limits)
                heads = [e.status for e in events if not isinstance(e, bytes) and e is not END]
                assert heads[-1] == 200 and events[-1] is END
            else:
                with pytest.raises(ProtocolError) as info:
                    parse_response(chunks, limits)
                assert info.value.status == 502


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_response_field_count_at_the_limit(delta: int) -> None:
    data = response_with_fields(SMALL.max_headers + delta)
    for chunks in splits(data, f"resp-count{delta}"):
        if delta <= 0:
            events = parse_response(chunks, SMALL)
            assert len(events[0].headers) == SMALL.max_headers + delta
        else:
            with pytest.raises(ProtocolError) as info:
                parse_response(chunks, SMALL)
            assert info.value.status == 502


def test_empty_lines_before_a_response_do_not_grow_without_bound() -> None:
    parser = ResponseParser(SMALL)
    for _ in range(100):
        parser.feed(b"\r\n" * 500)
    parser.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert parser.events[0].status == 204 and parser.complete


# response trailers -------------------------------------------------------------
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"


def trailers_of_size(size: int) -> bytes:
    """A last chunk whose trailer fields (each with its CRLF) are `size` bytes."""
    start = b"X-Pad: "
    line = start + b"p" * (size - len(start) - 2)
    return b"0\r\n" + line + b"\r\n\r\n"


def last_chunk_of(chunks: list[bytes], limits: Limits) -> bytes:
    parser = ResponseParser(limits)
    for chunk in chunks:
        parser.feed(chunk)
    assert parser.complete
    return parser.last_chunk


@pytest.mark.parametrize("limits", [SMALL, DEFAULT], ids=["small", "default"])
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_response_trailer_bytes_at_the_limit(limits: Limits, delta: int) -> None:
    trailers = trailers_of_size(limits.max_header_bytes + delta)
    chosen = splits if limits is SMALL else few_splits
    for chunks in chosen(CHUNKED + trailers, f"trailer-bytes{delta}"):
        if delta <= 0:
            assert last_chunk_of(chunks, limits) == trailers
        else:
            with pytest.raises(ProtocolError) as info:
                last_chunk_of(chunks, limits)
            assert info.value.status == 502


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_response_trailer_count_at_the_limit(delta: int) -> None:
    trailers = b"0\r\n" + b"".join(b"X-%d: v\r\n" % i
                                   for i in range(SMALL.max_headers + delta)) + b"\r\n"
    for chunks in splits(CHUNKED + trailers, f"trailer-count{delta}"):
        if delta <= 0:
            assert last_chunk_of(chunks, SMALL) == trailers
        else:
            with pytest.raises(ProtocolError):
                last_chunk_of(chunks, SMALL)


def test_an_endless_trailer_section_is_cut_while_it_comes() -> None:
    parser = ResponseParser(DEFAULT)
    parser.feed(CHUNKED + b"0\r\nX-Big: ")
    with pytest.raises(ProtocolError) as info:
        for _ in range(1024):  # 1 MB in 1 KiB reads, never ending the field
            parser.feed(b"a" * 1024)
    assert info.value.status == 502 and not parser.complete


@pytest.mark.parametrize("section, kept", [
    (b"0\r\n\r\n", b"0\r\n\r\n"),
    (b"0;ext=1\r\nServer-Timing: db;dur=53\r\n\r\n", b"0\r\nServer-Timing: db;dur=53\r\n\r\n"),
    # what only a head may carry, hop-by-hop fields and X-Request-Id are dropped
    (b"0\r\nSet-Cookie: a=b\r\nConnection: close\r\n"
     b"X-Request-Id: 1\r\n0a: x\r\n\r\n", b"0\r\n0a: x\r\n\r\n"),
    (b"0\r\nContent-Type: x\r\n\r\n", b"0\r\n\r\n"),
])
def test_response_trailers_kept(section: bytes, kept: bytes) -> None:
    for chunks in splits(CHUNKED + section, "kept" + section.decode()):
        assert last_chunk_of(chunks, DEFAULT) == kept


def test_the_next_response_does_not_inherit_trailers() -> None:
    parser = ResponseParser(DEFAULT)
    parser.feed(CHUNKED + b"0\r\nX-A: 1\r\n\r\n")
    assert parser.last_chunk == b"0\r\nX-A: 1\r\n\r\n"
    parser.begin()
    parser.feed(CHUNKED + b"0\r\n\r\n")
    assert parser.complete and parser.last_chunk == b"0\r\n\r\n"


# end to end --------------------------------------------------------------------
@pytest.fixture
def echo(proxy_to, backend):
    return proxy_to(backend), backend


def send_in_pieces(port: int, data: bytes, piece: int) -> bytes:
    """Send `data` in `piece`-byte writes; the status line of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            for i in range(0, len(data), piece):
                sock.sendall(data[i:i + piece])
        except OSError:
            pass  # refused part-way: the answer is already there
        answer = read_through(sock, b"\r\n") or b""  # closed first: no status line
    return answer.partition(b"\r\n")[0]


def test_request_heads_through_the_balancer(echo) -> None:
    bal, backend = echo
    limit = DEFAULT.max_header_bytes
    for size, want in ((limit, b"200"), (limit + 1, b"431")):
        data = request_of_size(size, b"app.test")
        for piece in (len(data), 7000, 1000):
            assert want in send_in_pieces(bal.port, data, piece), (size, piece)
    one_big = b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: " + b"b" * 70000 + b"\r\n\r\n"
    before = backend.count
    assert b"431" in send_in_pieces(bal.port, one_big, 65536)
    fields = (b"GET / HTTP/1.1\r\nHost: app.test\r\n"
              + b"".join(b"X-%d: v\r\n" % i for i in range(DEFAULT.max_headers)) + b"\r\n")
    assert b"431" in send_in_pieces(bal.port, fields, 100)
    assert backend.count == before  # neither reached the backend


@pytest.mark.parametrize(("body", "want"), [
    (b"X-Big: " + b"b" * 70000 + b"\r\n", b"502"),
    (b"".join(b"X-%d: v\r\n" % i for i in range(150)), b"502"),
    (b"".join(b"X-%d: v\r\n" % i for i in range(DEFAULT.max_headers - 1)), b"200"),
], ids=["70KB-field", "150-fields", "100-fields"])
def test_response_heads_through_the_balancer(proxy_to, body: bytes, want: bytes) -> None:
    def script(conn: socket.socket, request: bytes) -> bool:
        data = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + body + b"\r\nok"
        for i in range(0, len(data), 4096):  # in many writes: split across reads
            conn.sendall(data[i:i + 4096])
        return True

    bal = proxy_to(RawBackend(script))
    answer = client_exchange(bal.port, b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n",
                             until=b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 " + want), answer[:100]
