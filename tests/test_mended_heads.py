"""Response heads llhttp refuses that `balancer.response_parser` mends (a
Content-Length beside a Transfer-Encoding, an equal Content-Length repeated,
bare LFs): read the same however the backend's bytes are split, with one
framing for the client, and the connection never kept alive after them.

Defect found (review of branch http4): a 1xx head ended by bare LFs, mended,
then a final head in a later read: the final head was kept alive (its
connection reused), though it was not when both came in one read."""

from __future__ import annotations

import time

import pytest

from balancer.http11 import END, ProtocolError
from balancer.response_parser import ResponseParser
from balancer.spans import span_bytes

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

CHUNKED_ABC = b"3\r\nabc\r\n0\r\n\r\n"
SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"
MENDED = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_ABC,
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 30\r\n\r\n" + CHUNKED_ABC,
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc" + SMUGGLED,
    b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\nX-A: b\nContent-Length: 3\n\nabc" + SMUGGLED,
    b"\r\n\r\nHTTP/1.1 200 OK\nContent-Length: 3\r\n\nabc",
    # a bare LF in a field's value is a line's end both here and for the client:
    # the field after it frames the body, and the Content-Length goes
    b"HTTP/1.1 200 OK\r\nX: a\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
    + CHUNKED_ABC + SMUGGLED,
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: a\nTransfer-Encoding: chunked\r\n\r\n"
    + CHUNKED_ABC,
    # an interim head before or after the mended one
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\nContent-Length: 3\n\nabc",
    b"HTTP/1.1 100 Continue\n\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 100 Continue\n\nHTTP/1.1 200 OK\nContent-Length: 3\n\nabc",
]
REFUSED = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"HTTP/1.1 200 OK\nContent-Length: 3\nContent-Length: 4\n\nabcd",
    b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n3\nabc\n0\n\n",
    b"HTTP/1.1 200 OK\nX: a\rContent-Length: 3\n\nabc",
    b"HTTP/1.1 200 OK\nX: a\n Transfer-Encoding: chunked\nContent-Length: 3\n\nabc",
]


def read(pieces: list[bytes]) -> tuple[list, bool | None]:
    """The events of a parser fed `pieces` (heads as their status, forwarded
    block and framing; body pieces joined; a refusal as its status), and whether
    the last head stays keep-alive."""
    parser = ResponseParser()
    out: list = []
    try:
        for piece in pieces:
            parser.feed(piece)
        parser.feed_eof()
    except ProtocolError as exc:
        return [exc.status], None
    for event in parser.events:
        if isinstance(event, tuple):
            event = span_bytes(event)
        if isinstance(event, bytes) and out and isinstance(out[-1], bytes):
            out[-1] += event
        elif hasattr(event, "status"):
            out.append((event.status, event.forwarded, event.content_length, event.chunked))
        else:
            out.append(event)
    heads = [e for e in parser.events if hasattr(e, "status")]
    return out, heads[-1].keep_alive


def splits(data: bytes) -> list[list[bytes]]:
    """`data` in one read, cut in two at every byte, and byte by byte."""
    return ([[data]] + [[data[:cut], data[cut:]] for cut in range(1, len(data))]
            + [[data[i:i + 1] for i in range(len(data))]])


@pytest.mark.parametrize("response", MENDED)
def test_a_mended_head_reads_the_same_however_split_and_is_not_kept_alive(
        response: bytes) -> None:
    whole = read([response])
    events, keep_alive = whole
    assert keep_alive is False and events[-1] is END, events
    status, forwarded, length, chunked = [e for e in events if isinstance(e, tuple)][-1]
    assert status == 200 and (length is None) == chunked and events[-2] == b"abc", events
    low = forwarded.lower()  # one framing for the client: the balancer's own, or this
    assert b"transfer-encoding" not in low and low.count(b"content-length") == (not chunked)
    assert b"\n" not in forwarded.replace(b"\r\n", b""), forwarded
    for pieces in splits(response):
        assert read(pieces) == whole, pieces


@pytest.mark.parametrize("response", REFUSED)
def test_a_head_mending_cannot_save_is_refused_however_split(response: bytes) -> None:
    for pieces in splits(response):
        assert read(pieces)[0][-1] == 502, pieces


def test_a_large_head_held_to_be_mended_costs_no_more_for_many_small_reads() -> None:
    """Bug: each read of a held head joined and searched all the bytes held: a
    64 KiB head in 4-byte reads took ~1 s of CPU (byte by byte, 4 s); ~0.03 s now."""
    limit = ResponseParser()._limit
    data = b"HTTP/1.1 200 OK\nX-Pad: " + b"a" * (limit - 40) + b"\n\nabc"
    parser = ResponseParser()
    started = time.process_time()
    for at in range(0, len(data), 4):
        parser.feed(data[at:at + 4])
    parser.feed_eof()
    assert time.process_time() - started < 0.5
    assert span_bytes(parser.events[-2]) == b"abc"


@pytest.mark.parametrize("response", [
    b"\n\n" * 3000 + b"HTTP/1.1 200 OK\nContent-Length: 3\n\nabc",  # (llhttp skips them)
    b"HTTP/1.1 100 Continue\n\n" * 2700 + b"HTTP/1.1 200 OK\nContent-Length: 3\n\nabc",
], ids=["LF pairs", "1xx heads"])
def test_many_mended_heads_in_one_read_are_read_in_a_loop(response: bytes) -> None:
    """Bug: each mended head (each LF pair before a status line too) was parsed
    again by a recursive call: a RecursionError (interpreted), or a 502."""
    events, keep_alive = read([response])
    assert events[-3:] == [(200, b"\r\nContent-Length: 3", 3, False), b"abc", END]
    assert keep_alive is False
