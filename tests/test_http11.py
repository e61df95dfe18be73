"""Unit tests of the sans-IO HTTP/1.x parsers beyond the corpus: limits at their
exact boundaries, behaviour across feeds, resume after a refused upgrade,
bytes after a response, and the raw field-block helpers."""

from __future__ import annotations

import pytest

from balancer.fields import field_keys, field_list, without_fields
from balancer.http11 import (
    END,
    Limits,
    ProtocolError,
    RequestHead,
    RequestParser,
    connection_tokens,
)
from balancer.response_parser import ResponseHead, ResponseParser
from balancer.spans import span_bytes
from tests.support import unchunk

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

SMALL = Limits(max_request_line=64, max_header_bytes=192, max_headers=8)


def feed_all(parser, data: bytes, size: int | None = None) -> list:
    """Feed `data` whole or in `size`-byte pieces; the events, body pieces joined."""
    step = size or max(len(data), 1)
    for i in range(0, len(data), step):
        parser.feed(data[i:i + step])
    out: list = []
    for event in parser.events:
        if isinstance(event, bytes) and out and isinstance(out[-1], bytes):
            out[-1] += event
        else:
            out.append(event)
    return out


def request_with_line(length: int) -> bytes:
    """A GET whose request line (without CRLF) is exactly `length` bytes."""
    target = b"/" + b"a" * (length - len(b"GET / HTTP/1.1"))
    line = b"GET " + target + b" HTTP/1.1"
    assert len(line) == length
    return line + b"\r\nHost: h\r\n\r\n"


def request_with_head(size: int) -> bytes:
    """A GET whose head (request line to the blank line, CRLFs included) is `size` bytes."""
    start = b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad: "
    head = start + b"p" * (size - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == size
    return head


# errors ----------------------------------------------------------------------
def test_protocol_error_carries_status_and_reason() -> None:
    exc = ProtocolError(431, "too many headers")
    assert (exc.status, exc.reason, str(exc)) == (431, "too many headers", "431 too many headers")


def test_feeding_after_an_error_raises_the_same_protocol_error() -> None:
    parser = RequestParser()
    with pytest.raises(ProtocolError) as first:
        parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    with pytest.raises(ProtocolError) as again:
        parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert first.value.status == again.value.status == 400


# limits at their boundaries ------------------------------------------------------
@pytest.mark.parametrize("size", [None, 1, 7])
def test_request_line_limit_is_exact(size: int | None) -> None:
    events = feed_all(RequestParser(SMALL), request_with_line(64), size)
    assert events[0].target.startswith(b"/aaa") and events[1] is END
    with pytest.raises(ProtocolError) as info:
        feed_all(RequestParser(SMALL), request_with_line(65), size)
    assert info.value.status == 414


@pytest.mark.parametrize("size", [None, 1, 5, 64])
def test_head_limit_is_exact(size: int | None) -> None:
    limit = SMALL.max_header_bytes
    more = b"GET /more HTTP/1.1\r\nHost: h\r\n\r\n"  # so one read holds more than the head
    events = feed_all(RequestParser(SMALL), request_with_head(limit) + more, size)
    assert len(events[0].headers) == 2 and events[2].target == b"/more"
    with pytest.raises(ProtocolError) as info:
        feed_all(RequestParser(SMALL), request_with_head(limit + 1), size)
    assert info.value.status == 431


def test_head_limit_holds_for_the_second_request_of_one_read() -> None:
    limit = SMALL.max_header_bytes
    first = b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"
    parser = RequestParser(SMALL)
    parser.feed(first + request_with_head(limit))
    assert len([e for e in parser.events if e is END]) == 2
    with pytest.raises(ProtocolError) as info:
        RequestParser(SMALL).feed(first + request_with_head(limit + 1))
    assert info.value.status == 431


@pytest.mark.parametrize("first", [
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx",
    b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
], ids=["chunked", "length", "get"])
@pytest.mark.parametrize("size", [None, 1, 7, 100])
def test_request_line_limit_holds_for_an_unfinished_line_after_another_request(
        first: bytes, size: int | None) -> None:
    """Bug: a line beginning inside a feed, after another message, was never
    measured: a 431 at the head limit instead of a 414."""
    whole = request_with_line(64)
    events = feed_all(RequestParser(SMALL), first + b"\r\n" + whole, size)
    assert events[-2].target.startswith(b"/aaa") and events[-1] is END
    parser = RequestParser(SMALL)
    with pytest.raises(ProtocolError) as info:
        feed_all(parser, first + b"GET /" + b"a" * 90, size)
    assert info.value.status == 414 and parser.events[-1] is END


def test_request_line_limit_counts_from_the_line_not_the_empty_lines_before() -> None:
    with pytest.raises(ProtocolError) as info:
        feed_all(RequestParser(SMALL), b"\r\n" * 3 + request_with_line(65), 1)
    assert info.value.status == 414
    events = feed_all(RequestParser(SMALL), b"\r\n" * 40 + request_with_line(64), 1)
    assert events[-1] is END


@pytest.mark.parametrize("first", [b"", b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"],
                         ids=["first", "after-a-request"])
def test_empty_lines_before_a_request_are_not_kept(first: bytes) -> None:
    """Bug: uncounted (no part of the head's bytes), each read of them was kept
    for the head to come: a client sending empty lines grew its parser's memory
    without bound (nginx drops them too)."""
    import tracemalloc
    parser = RequestParser(SMALL)
    parser.feed(first + b"\r\n")
    tracemalloc.start()
    try:
        for n in range(400):
            parser.feed(b"\r\n" * (500 + n % 2))  # (a new object each time)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 20_000, held  # 400 KB fed
    parser.feed(request_with_line(64))
    assert parser.events[-1] is END and parser.events[-2].target.startswith(b"/aaa")


def test_header_count_limit_is_exact() -> None:
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(7))
    head = b"GET / HTTP/1.1\r\nHost: h\r\n" + fields + b"\r\n"
    assert len(feed_all(RequestParser(SMALL), head)[0].headers) == 8
    with pytest.raises(ProtocolError) as info:
        RequestParser(SMALL).feed(head.replace(b"\r\n\r\n", b"\r\nX-8: v\r\n\r\n"))
    assert info.value.status == 431


def test_an_endless_head_is_refused_once_it_passes_the_limit() -> None:
    parser = RequestParser()
    parser.feed(b"GET / HTTP/1.1\r\nHost: h\r\nX-Endless: ")
    fed = 0
    with pytest.raises(ProtocolError) as info:
        for _ in range(10):
            parser.feed(b"x" * 16384)
            fed += 16384
    assert info.value.status == 431
    assert fed <= Limits().max_header_bytes


def test_a_content_length_past_the_digits_int_reads_is_too_large() -> None:
    """Over 4,300 digits (leading zeros): the reason of other lengths past the
    limit (bug: "User callback error", `int` raising in the head's callback; the
    400 is the same: tests/test_probe_http_edges.py)."""
    parser = RequestParser()
    with pytest.raises(ProtocolError) as info:
        parser.feed(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: " + b"0" * 4400
                    + b"5\r\n\r\nhello")
    assert (info.value.status, info.value.reason) == (400, "Content-Length too large")


def test_a_head_held_for_its_repeated_content_length_is_bounded() -> None:
    """A head with a repeated Content-Length is held until it is whole (it is then
    parsed again with one): past the head limit, a 431 as for any head."""
    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n")
    fed = 0
    with pytest.raises(ProtocolError) as info:
        for _ in range(10):
            parser.feed(b"X-Long: " + b"x" * 16384 + b"\r\n")
            fed += 16384
    assert info.value.status == 431
    assert fed <= Limits().max_header_bytes


def test_an_endless_trailer_is_refused_instead_of_buffered() -> None:
    """httptools buffers a trailer value whole (quadratic copies): it must be bounded."""
    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n0\r\nX-Trailer: ")
    fed = 0
    with pytest.raises(ProtocolError) as info:
        for _ in range(100):
            parser.feed(b"t" * 65536)
            fed += 65536
    assert info.value.status == 400
    assert fed <= 2 * Limits().max_header_bytes


def test_a_large_chunked_body_in_many_reads_is_not_mistaken_for_trailers() -> None:
    parser = RequestParser(SMALL)
    parser.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    parser.feed(b"100000\r\n")  # one chunk of 1 MiB
    for _ in range(16):
        parser.feed(b"d" * 65536)
    parser.feed(b"\r\n0\r\nX-T: 1\r\n\r\n")
    events = list(parser.events)
    framed = b"".join(span_bytes(e) for e in events[1:-1])
    assert unchunk(framed + b"0\r\nX-T: 1\r\n\r\n") == b"d" * (1 << 20)
    assert events[-1] is END and events[0].trailers


# upgrade and connection close ------------------------------------------------------
def test_resume_after_a_refused_upgrade_parses_what_followed_the_head() -> None:
    parser = RequestParser()
    parser.feed(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
                b"GET /next HTTP/1.1\r\nHo")
    head = parser.events.pop(0)
    assert (head.upgrade, parser.upgraded, parser.leftover) == (
        b"websocket", True, b"GET /next HTTP/1.1\r\nHo")
    assert parser.events.pop(0) is END
    parser.resume()
    assert not parser.upgraded and parser.leftover == b""
    parser.feed(b"st: h\r\n\r\n")
    assert parser.events.pop(0).target == b"/next"
    assert parser.events.pop(0) is END


def test_nothing_is_parsed_after_a_request_that_closes_the_connection() -> None:
    parser = RequestParser()
    parser.feed(b"GET / HTTP/1.0\r\n\r\n")
    parser.feed(b"\x00garbage that would be a 400\r\n\r\n")
    parser.feed(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [e.target if isinstance(e, RequestHead) else e for e in parser.events] == [b"/", END]


def test_request_head_helpers() -> None:
    post = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi"
    head = feed_all(RequestParser(), post)[0]
    assert head.has_body and "POST" in repr(head)
    head = feed_all(RequestParser(), b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")[0]
    assert not head.has_body
    assert connection_tokens(b" Keep-Alive ,, Upgrade,") == frozenset({b"keep-alive", b"upgrade"})


# responses ------------------------------------------------------------------------------
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.mark.parametrize("after", [b"junk", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
@pytest.mark.parametrize("same_read", [True, False])
def test_bytes_after_a_response_keep_it_but_not_the_connection(after: bytes,
                                                               same_read: bool) -> None:
    parser = ResponseParser()
    if same_read:
        parser.feed(OK + after)
    else:
        parser.feed(OK)
        parser.feed(after)
    head, body, end = parser.events
    assert (body, end, parser.complete) == (b"ok", END, True)
    assert head.keep_alive is False


@pytest.mark.parametrize("same_read", [True, False])
def test_empty_lines_after_a_response_are_harmless(same_read: bool) -> None:
    parser = ResponseParser()
    if same_read:
        parser.feed(OK + b"\r\n")
    else:
        parser.feed(OK)
        parser.feed(b"\r\n")
    assert parser.events[0].keep_alive is True


def test_a_body_sent_for_head_makes_no_events_and_no_reuse() -> None:
    parser = ResponseParser(for_head=True)
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    head, end = parser.events
    assert end is END and parser.complete and head.no_body and not head.keep_alive


def test_feed_eof_completes_a_close_delimited_body_only() -> None:
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\n\r\nbody")
    parser.feed_eof()
    assert list(parser.events)[1:] == [b"body", END] and parser.complete
    parser.feed_eof()  # already complete: nothing happens
    assert list(parser.events)[-1] is END
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
    with pytest.raises(ProtocolError) as info:
        parser.feed_eof()
    assert info.value.status == 502


def test_a_response_head_too_large_in_one_read_is_refused() -> None:
    head = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"p" * 300 + b"\r\nContent-Length: 0\r\n\r\n"
    ResponseParser(Limits(max_request_line=64, max_header_bytes=512)).feed(head)
    with pytest.raises(ProtocolError) as info:
        ResponseParser(SMALL).feed(head)
    assert info.value.status == 502


def test_response_head_helpers() -> None:
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\nX-A:  1 \r\nConnection: close\r\n\r\n")
    head = parser.events[0]
    assert isinstance(head, ResponseHead) and repr(head) == "<ResponseHead 200>"
    assert head.headers == [(b"X-A", b"1"), (b"Connection", b"close")]
    assert head.close_delimited


# raw field blocks -------------------------------------------------------------------------
BLOCK = b"\r\nHost: a\r\nX-Drop: 1\r\nKeep: k\r\nx-drop:  2 \r\nConnection: x-drop"


def test_without_fields_cuts_exactly_the_named_fields() -> None:
    keys = field_keys([b"x-drop", b"connection"])
    assert keys == (b"\r\nx-drop:", b"\r\nconnection:")
    assert without_fields(BLOCK, BLOCK.lower(), keys) == b"\r\nHost: a\r\nKeep: k"
    assert without_fields(BLOCK, BLOCK.lower(), field_keys([b"absent"])) is BLOCK


def test_field_list_pairs_names_and_stripped_values() -> None:
    assert field_list(BLOCK)[:2] == [(b"Host", b"a"), (b"X-Drop", b"1")]
    assert field_list(b"") == []


# the request line's version, read from the bytes --------------------------------------
@pytest.mark.parametrize("data, versions", [
    (b"GET / HTTP/1.0\r\n\r\n", [b"1.0"]),
    (b"\r\r\n\nGET / HTTP/1.0\r\n\r\n", [b"1.0"]),  # empty lines before it
    (b"\r\rGET / HTTP/1.0\r\n\r\n", [b"1.0"]),  # bare CRs before it: llhttp skips them
    (b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.0\r\n\r\n", [b"1.1", b"1.0"]),
    (b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n",
     [b"1.0", b"1.1"]),
])
@pytest.mark.parametrize("size", [None, 1, 3, 20])
def test_the_version_is_the_request_lines_however_the_bytes_are_split(
        data: bytes, versions: list[bytes], size: int | None) -> None:
    heads = [e for e in feed_all(RequestParser(), data, size) if isinstance(e, RequestHead)]
    assert [head.version for head in heads] == versions


@pytest.mark.parametrize("data, status", [
    (b"GET /1.1\r\n\r\n", 505),  # HTTP/0.9: its target ends as a version would
    (b"GET /HTTP/1.1\r\n\r\n", 505),
    (b"GET HTTP/1.1\r\nHost: h\r\n\r\n", 400),  # llhttp refuses "HTTP/1.1" as a target
    (b"GET          HTTP/1.1\r\nHost: h\r\n\r\n", 400),
])
def test_a_line_that_only_ends_like_a_version_is_not_taken_for_one(data: bytes,
                                                                   status: int) -> None:
    with pytest.raises(ProtocolError) as info:
        RequestParser().feed(data)
    assert info.value.status == status


def test_the_version_after_a_refused_upgrade_is_read_again() -> None:
    parser = RequestParser()
    parser.feed(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
                b"GET /next HTTP/1.0\r\n\r\n")
    parser.resume()
    heads = [e for e in parser.events if isinstance(e, RequestHead)]
    assert [head.version for head in heads] == [b"1.1", b"1.0"]


def test_host_bytes_outside_rfc_3986_are_refused() -> None:
    allowed = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                  b"-._~%!$&'()*+,;=:[]")
    for byte in range(256):
        request = b"GET / HTTP/1.1\r\nHost: a" + bytes([byte]) + b"b\r\n\r\n"
        if byte in allowed:
            assert feed_all(RequestParser(), request)[0].host == b"a" + bytes([byte]) + b"b"
        else:
            with pytest.raises(ProtocolError) as info:
                RequestParser().feed(request)
            assert info.value.status == 400, byte


@pytest.mark.parametrize(("host", "status"), [
    (b"Host: a b\r\n", 400), (b"Host:\r\n", 400), (b"Host: \t\r\n", 400), (b"", 400),
    (b"Host: b.test\r\n", None), (b"Host: a.test \r\n", None),
])
def test_a_host_after_a_valid_one_is_checked_again_unless_it_is_the_same(
        host: bytes, status: int | None) -> None:
    """The parser remembers the last valid Host (a keep-alive client repeats it)."""
    parser = RequestParser()
    parser.feed(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
    request = b"GET /next HTTP/1.1\r\n" + host + b"\r\n"
    if status is None:
        parser.feed(request)
        assert parser.events[2].host == host[6:].strip()
    else:
        with pytest.raises(ProtocolError) as info:
            parser.feed(request)
        assert info.value.status == status


def test_connection_tokens_of_usual_values_are_the_split_ones() -> None:
    for value in (b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade"):
        assert connection_tokens(value) == frozenset({value.lower()})
    assert connection_tokens(b"") == frozenset()


# issue 15.7: what the parsers hand the relay --------------------------------------
def test_trailers_are_kept_on_their_request_head_in_every_split() -> None:
    data = (b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Sum: 1\r\nX-Other: two\r\n\r\n"
            b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n")
    for size in (None, 1, 7):
        heads = [e for e in feed_all(RequestParser(), data, size) if isinstance(e, RequestHead)]
        assert [(n, v) for n, _, v in heads[0].trailers] == [(b"X-Sum", b"1"),
                                                            (b"X-Other", b"two")]
        assert heads[1].trailers == ()


def test_a_chunked_head_is_its_raw_block_as_a_content_length_heads_is() -> None:
    """A chunked head is read raw once (as a Content-Length head): its block is the
    fields as they came, not rebuilt from per-field callbacks; and the body's
    framing is still checked by llhttp in every split, bad bytes right after the
    head included."""
    head = b"POST /a HTTP/1.1\r\nHost: h\r\nX-A:b \r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"3\r\nabc\r\n0\r\n\r\n"
    for size in (None, 1, 7, len(head)):
        events = feed_all(RequestParser(), head + body, size)
        assert events[0].block == b"\r\nHost: h\r\nX-A:b \r\nTransfer-Encoding: chunked"
        assert unchunk(b"".join(span_bytes(e) for e in events[1:-1])) == b"abc"
        assert events[-1] is END
        with pytest.raises(ProtocolError) as caught:
            feed_all(RequestParser(), head + b"3\r\nabcX\r\n0\r\n\r\n", size)
        assert caught.value.status == 400


def test_an_upgrade_pipelined_in_a_chunked_heads_read_pauses_after_its_body() -> None:
    """The raw parser reads on past a chunked head (ignored): an Upgrade head after
    the body in the same read stops it there; the body parser ends the chunked
    message, then the Upgrade head pauses parsing with the bytes after it."""
    data = (b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"
            b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
            b"tunnel bytes")
    parser = RequestParser()
    parser.feed(data)
    heads = [e for e in parser.events if isinstance(e, RequestHead)]
    assert [h.target for h in heads] == [b"/a", b"/ws"]
    assert parser.events.count(END) == 2
    assert parser.upgraded and parser.leftover == b"tunnel bytes"


@pytest.mark.parametrize(("upgrade", "left"), [
    (b"h2c", b""), (b"H2C", b""), (b"h2c, websocket", b"websocket"), (b"websocket", b"websocket"),
])
def test_an_h2c_upgrade_is_no_upgrade(upgrade: bytes, left: bytes) -> None:
    parser = RequestParser()
    parser.feed(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                b"Upgrade: " + upgrade + b"\r\nHTTP2-Settings: AAMAAABk\r\n\r\n")
    head = parser.events[0]
    assert head.upgrade == left
    assert b"http2-settings" in head.connection_tokens


@pytest.mark.parametrize(("status", "kept"), [(103, False), (204, False), (304, True),
                                              (200, True)])
def test_content_length_is_cut_from_1xx_and_204_only(status: int, kept: bool) -> None:
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 %d X\r\nLink: </a>\r\nContent-Length: 0\r\n\r\n" % status)
    head = parser.events[0]
    assert (b"Content-Length" in head.forwarded) is kept
    assert b"Link: </a>" in head.forwarded
