"""Request heads kept as raw field blocks (issue 21): what a backend gets is
what it got when the parser called back per field, byte for byte, however the
client's bytes were split (tests/data/forwarded_heads.json, made with the
per-field parser: tests/forward_cases.py). The one difference: a field's blanks
after its colon go as the client sent them (`BLANKS`), where the per-field
parser wrote ``Name: value``."""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
from pathlib import Path

import httptools
import pytest

from balancer.http11 import END, WINDOW, ProtocolError, RequestHead, RequestParser
from balancer.spans import span_bytes
from tests.forward_cases import BLANKS, CASES, forwarded
from tests.rawpeer import RawBackend, read_until
from tests.support import unchunk

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

GOLDEN = json.loads((Path(__file__).parent / "data" / "forwarded_heads.json").read_text())
LARGE = 2048  # cases longer than this are split at fewer places


def split_feeds(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def forwarded_in(pieces: list[bytes], trusted: bool) -> list:
    """`forward_cases.forwarded`, with the bytes fed in `pieces`."""
    return forwarded(pieces, trusted)


def cut_points(data: bytes) -> range | list[int]:
    if len(data) <= LARGE:
        return range(1, len(data))
    end = data.find(b"\r\n\r\n")
    return sorted({*range(1, len(data), 997), *range(max(1, end - 8), min(len(data), end + 8))})


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_backend_gets_the_same_bytes_split_anywhere(name: str) -> None:
    data = CASES[name]
    for role in ("external", "trusted"):
        want = GOLDEN[name][role]
        assert forwarded_in([data], role == "trusted") == want
        for cut in cut_points(data):
            got = forwarded_in(split_feeds(data, [cut]), role == "trusted")
            assert got == merged_bodies(want, got), (name, role, cut)


def merged_bodies(want: list, got: list) -> list:
    """`want` with its body pieces as `got` split them (a body's pieces follow the feeds)."""
    if [x for x in want if not isinstance(x, str) or x.startswith(("GET", "POST", "OPTIONS"))
            or x == "END"] != [x for x in got if not isinstance(x, str)
                               or x.startswith(("GET", "POST", "OPTIONS")) or x == "END"]:
        return want
    return got if "".join(x for x in got if isinstance(x, str)) == "".join(
        x for x in want if isinstance(x, str)) else want


def test_small_heads_fed_a_byte_at_a_time() -> None:
    for name in ("browser", "pipelined", "pipelined after a body", "pipelined after chunked",
                 "chunked with crlfs in data", "empty lines before", "like special"):
        data = CASES[name]
        got = forwarded_in([data[i:i + 1] for i in range(len(data))], False)
        assert "".join(x for x in got if isinstance(x, str)) == "".join(
            x for x in GOLDEN[name]["external"] if isinstance(x, str)), name


def test_three_way_splits_of_pipelined_heads() -> None:
    data = CASES["pipelined after a body"]
    want = "".join(GOLDEN["pipelined after a body"]["external"])
    for a in range(1, len(data), 3):
        for b in range(a + 1, len(data), 5):
            got = forwarded_in(split_feeds(data, [a, b]), False)
            assert "".join(x for x in got if isinstance(x, str)) == want, (a, b)


@pytest.mark.parametrize("name", sorted(BLANKS))
def test_blanks_after_the_colon_go_as_the_client_sent_them(name: str) -> None:
    data = BLANKS[name]
    for role in ("external", "trusted"):
        got = forwarded_in([data], role == "trusted")
        assert re.sub(r"\r\n([!-9;-~]+):[ \t]*", r"\r\n\1: ", got[0]) == GOLDEN[name][role][0]
        for line in data.split(b"\r\n")[1:]:
            if line and not line.lower().startswith(b"host:"):
                assert b"\r\n" + line + b"\r\n" in got[0].encode("latin-1")


def test_a_head_keeps_its_block_and_lists_its_fields_on_demand() -> None:
    parser = RequestParser()
    parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-A:  v \t\r\nx-a:\r\nX-Host: h\r\n\r\n")
    head = parser.events[0]
    assert head.block == b"\r\nHost: a\r\nX-A:  v \t\r\nx-a:\r\nX-Host: h"
    assert head.marks == [(b"host", 0, 9)]
    assert head.headers == [(b"Host", b"host", b"a"), (b"X-A", b"x-a", b"v \t"),
                            (b"x-a", b"x-a", b""), (b"X-Host", b"x-host", b"h")]
    assert head.field(b"x-a") == b"" and head.field(b"x-b") is None


def test_httptools_calls_no_field_callback_for_a_raw_head() -> None:
    """The raw parser's protocol object has no on_header, on_url nor
    on_message_begin: httptools then makes no bytes and no call for them. The
    field parser's has on_header only (every request line is read raw)."""
    from balancer.http11 import RequestCallbacks
    callbacks = RequestCallbacks()
    for name in ("on_header", "on_url", "on_message_begin"):
        assert getattr(callbacks, name, None) is None
        assert (getattr(callbacks.fields, name, None) is not None) == (name == "on_header")


def test_rtsp_and_http_2_request_lines_are_refused() -> None:
    for line in (b"GET / RTSP/1.0", b"GET / HTTP/2.0", b"GET /"):
        with pytest.raises(ProtocolError) as caught:
            RequestParser().feed(line + b"\r\nHost: a\r\n\r\n")
        assert caught.value.status == 505, line


def test_an_http_0_9_line_ending_in_a_bare_lf_is_refused() -> None:
    """llhttp ends an HTTP/0.9 request line at a bare LF and reads fields after it:
    split at CRLFs, that line and the next field looked like one HTTP/1.1 request
    line (a target with a LF in it, forwarded; the field in it hidden from the marks)."""
    for data in (b"GET /a\nX: HTTP/1.1\r\nHost: a\r\n\r\n",
                 b"GET /a\nConnection: x HTTP/1.1\r\nHost: a\r\n\r\n"):
        for prefix in (b"", CASES["host only"]):  # the head beginning a feed, or pipelined
            parser = RequestParser()
            with pytest.raises(ProtocolError) as caught:
                parser.feed(prefix + data)
            assert caught.value.status == 505, (prefix, data)


class _PerField:
    """A reference: what llhttp itself reads, field by field (trailers not counted)."""

    def __init__(self) -> None:
        self.heads: list[tuple[bytes, list[tuple[bytes, bytes]]]] = []
        self.url, self.fields, self.in_head = b"", [], True

    def on_message_begin(self) -> None:
        self.url, self.fields, self.in_head = b"", [], True

    def on_url(self, part: bytes) -> None:
        self.url += part

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:
            self.fields.append((name.lower(), value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        self.heads.append((self.url, self.fields))
        self.in_head = False


def test_heads_are_what_llhttp_read_for_mutated_pipelines() -> None:
    """Pipelined requests (bodyless, Content-Length, chunked, long, empty lines between) with
    bytes inserted and fed in three pieces: every head the parser gives has the target
    and fields llhttp read at that place (none hidden in another line, none invented)."""
    bases = (b"GET /a HTTP/1.1\r\nHost: a\r\nX: y\r\n\r\n",
             b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
             b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"3\r\nabc\r\n0\r\n\r\n", b"\r\n", b"GET /z\n")  # (HTTP/0.9, a bare LF)
    inserts = (b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b" HTTP/1.1", b"X: y HTTP/1.1\r\n",
               b"Transfer-Encoding: chunked", b"Content-Length: 3", b"Connection: x",
               b"Host: b", b"abc", b"0\r\n\r\n", b"\r\n\r\n")
    rng = random.Random(21)
    compared = 0
    for _ in range(1500):
        long = (b"GET /w HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"p" * (WINDOW - 35 + rng.randint(-9, 9))
                + b"\r\nX: y\r\n\r\n")  # (a pipelined head across its 4 KiB window's end)
        data = bytearray(b"".join(rng.choice((*bases, long)) for _ in range(rng.randint(1, 4))))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.choice(inserts)
        reference = _PerField()
        with contextlib.suppress(httptools.HttpParserError):
            httptools.HttpRequestParser(reference).feed_data(bytes(data))
        cuts = sorted(rng.sample(range(1, len(data)), 2))
        parser = RequestParser()
        with contextlib.suppress(ProtocolError):
            for piece in split_feeds(bytes(data), cuts):
                parser.feed(piece)
        heads = [(e.target, [(n, v.strip(b" \t")) for _, n, v in e.headers])
                 for e in parser.events if isinstance(e, RequestHead)]
        assert heads == reference.heads[:len(heads)], (bytes(data), cuts)
        compared += len(heads)
    assert compared > 400  # (a third of the mutated pipelines give heads to compare)


def test_spaces_between_the_request_lines_parts() -> None:
    parser = RequestParser()
    parser.feed(b"GET   /a?b   HTTP/1.1\r\nHost: a\r\n\r\n")
    head = parser.events[0]
    assert (head.method, head.target, head.version) == (b"GET", b"/a?b", b"1.1")


def test_a_chunked_request_then_raw_heads_again() -> None:
    """After a chunked request, the next head is raw again, in the same feed too
    (its block as the client sent it, blanks included)."""
    parser = RequestParser()
    chunked = CASES["chunked"]
    parser.feed(chunked + b"GET /x HTTP/1.1\r\nHost:  app.test\r\n\r\nGET /y HTTP/1.1\r\n")
    assert not parser._fielded
    parser.feed(b"Host: app.test\r\n\r\n")
    parser.feed(b"GET /z HTTP/1.1\r\nHost: app.test\r\nX-Z: 1\r\n\r\n")
    heads = [e for e in parser.events if isinstance(e, RequestHead)]
    assert [h.target for h in heads] == [b"/up", b"/x", b"/y", b"/z"]
    assert heads[1].block == b"\r\nHost:  app.test"
    assert heads[3].block == b"\r\nHost: app.test\r\nX-Z: 1"
    assert parser.events[-1] is END


def test_a_chunked_body_with_heads_inside_is_not_read_as_heads() -> None:
    """Chunk data that looks like a head (and a blank line) stays body."""
    inner = b"GET /evil HTTP/1.1\r\nHost: evil\r\nContent-Length: 5\r\n\r\n"
    data = (b"POST /up HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % len(inner) + inner + b"\r\n0\r\n\r\n"
            + b"GET /ok HTTP/1.1\r\nHost: app.test\r\n\r\n")
    for cut in range(1, len(data)):
        parser = RequestParser()
        parser.feed(data[:cut])
        parser.feed(data[cut:])
        heads = [e for e in parser.events if isinstance(e, RequestHead)]
        body = b"".join(span_bytes(e) for e in parser.events if isinstance(e, (bytes, tuple)))
        assert [h.target for h in heads] == [b"/up", b"/ok"] and unchunk(body) == inner, cut


def test_many_pipelined_heads_in_one_feed() -> None:
    """2,000 heads in one feed (each found in a 4 KiB window, not in a copy of the
    rest), then one whose head is larger than the window."""
    heads = [b"GET /%d HTTP/1.1\r\nHost: app.test\r\nX-N: %d\r\n\r\n" % (n, n)
             for n in range(2000)]
    big = b"GET /big HTTP/1.1\r\nHost: app.test\r\nX-Pad: " + b"p" * 9000 + b"\r\n\r\n"
    parser = RequestParser()
    parser.feed(b"".join(heads) + big + heads[0])
    found = [e for e in parser.events if isinstance(e, RequestHead)]
    assert [h.target for h in found] == [b"/%d" % n for n in range(2000)] + [b"/big", b"/0"]
    assert found[1999].block == b"\r\nHost: app.test\r\nX-N: 1999"
    assert found[2000].block.endswith(b"p" * 9000)


@pytest.mark.parametrize("after", [b"Transfer-Encoding: chunked\r\n", b"Host: b\r\n",
                                   b"Content-Length: 5\r\n", b"X-Forwarded-For: 6.6.6.6\r\n"])
def test_a_pipelined_head_whose_window_ends_after_a_field(after: bytes) -> None:
    """The 4 KiB a pipelined head is first looked for in end just after a field's CRLF:
    the empty piece after it is not the head's blank line (the fields after the window
    were lost: a chunked head given as bodyless, its body read as the next request's)."""
    line = b"GET /2 HTTP/1.1\r\nHost: a\r\n"
    pad = b"X-Pad: " + b"p" * (4096 - len(line) - 9) + b"\r\n"
    head = line + pad + after + b"\r\n"
    body = b"5\r\nhello\r\n0\r\n\r\n" if b"chunked" in after else b"hello" * (b"5" in after)
    data = CASES["host only"] + head + body + CASES["host only"]
    assert data.find(pad) + len(pad) == len(CASES["host only"]) + 4096  # the window's end
    reference = _PerField()
    httptools.HttpRequestParser(reference).feed_data(data)
    parser = RequestParser()
    try:
        parser.feed(data)
    except ProtocolError as exc:
        assert exc.status == 400 and b"Host: b" in after  # (the repeated Host)
    heads = [e for e in parser.events if isinstance(e, RequestHead)]
    assert [(h.target, [(n, v) for _, n, v in h.headers]) for h in heads] == reference.heads[
        :len(heads)]
    if b"Host: b" not in after:
        assert len(heads) == 3 and heads[1].block.endswith(b"\r\n" + after[:-2])
        framed = b"chunked" in after or b"Content-Length" in after
        body = b"".join(span_bytes(e) for e in parser.events if isinstance(e, (bytes, tuple)))
        assert (unchunk(body) if b"chunked" in after else body) == (
            b"hello" if framed else b"")


def test_a_pipelined_head_too_large_or_with_too_many_fields() -> None:
    for extra, status in ((b"X-Pad: " + b"p" * 70000 + b"\r\n", 431),
                          (b"".join(b"X-%d: v\r\n" % i for i in range(120)), 431)):
        parser = RequestParser()
        with pytest.raises(ProtocolError) as caught:
            parser.feed(CASES["host only"] + b"GET / HTTP/1.1\r\nHost: a\r\n" + extra + b"\r\n")
        assert caught.value.status == status
        assert isinstance(parser.events[0], RequestHead)


# through the balancer -----------------------------------------------------------------
def answer_ok(conn: socket.socket, request: bytes) -> bool:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    return True


@pytest.mark.parametrize("internal", [False, True])
def test_a_real_backend_gets_the_same_bytes(proxy_to, internal) -> None:
    backend = RawBackend(answer_ok)
    bal = proxy_to(backend, internal=internal)
    role = "trusted" if internal else "external"
    names = ("browser", "client fields", "repeated fields", "like special", "connection names")
    with socket.create_connection(("127.0.0.1", bal.ports["internal" if internal else "proxy"]),
                                  timeout=10) as conn:
        for name in names:
            data = CASES[name]
            for piece in (data[:7], data[7:40], data[40:]):  # split across reads
                conn.sendall(piece)
            read_until(conn, b"ok")
    assert len(backend.requests) == len(names)
    for name, got in zip(names, backend.requests, strict=True):
        want = GOLDEN[name][role][0].split("|")[0].encode("latin-1")
        got = re.sub(rb"X-Request-Id: [^\r]*", b"X-Request-Id: RID", got)
        assert got == want.replace(b"192.0.2.7", b"127.0.0.1"), name
