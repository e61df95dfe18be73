"""Chunked request bodies through real sockets, against hostile clients: the body
goes on as its framing came (`balancer.chunks`), its size lines rewritten where
they were not canonical; bad framing is refused before any of it is forwarded;
a rule's `max_body_bytes` refuses a chunk at its size line (413), before its
data is sent (as nginx), and the backend never sees it."""

from __future__ import annotations

import contextlib
import socket

import pytest

from balancer.chunks import TOO_LARGE, ChunkedBody
from balancer.http11 import END, ProtocolError, RequestParser
from tests.rawpeer import RawBackend, read_through
from tests.support import Balancer, unchunk, wait_for

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

WAIT = 10.0
LIMIT = 1000  # limit.test's max_body_bytes
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def answer(conn: socket.socket, request: bytes) -> bool:
    conn.sendall(OK)
    return True


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    """``bal, backend``: app.test, limit.test (max_body_bytes LIMIT) and count.test
    (its own counters) proxy to a recording `RawBackend`."""
    backend = RawBackend(answer)
    bal = Balancer(tmp_path_factory.mktemp("chunked"),
                   {"app.test": {"action": "proxy", "backends": [backend.address]},
                    "limit.test": {"action": "proxy", "backends": [backend.address],
                                   "max_body_bytes": LIMIT},
                    "count.test": {"action": "proxy", "backends": [backend.address]}})
    yield bal, backend
    bal.stop()
    backend.stop()


def post(host: bytes = b"app.test", target: bytes = b"/up") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
            % (target, host))


def get(target: bytes) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: app.test\r\n\r\n" % target


def exchange(bal: Balancer, data: bytes, count: int = 1) -> bytes:
    """Send `data` on a new connection; what comes back, once `count` answers came
    (each ends with the backend's "ok" or a page's "</html>"), or the balancer closed."""
    with socket.create_connection(("127.0.0.1", bal.port), timeout=WAIT) as sock:
        sock.sendall(data)
        return read_answers(sock, count)


def read_answers(sock: socket.socket, count: int) -> bytes:
    answer_ = b""
    while answer_.count(b"HTTP/1.1 ") < count or not answer_.endswith((b"ok", b"</html>\n")):
        more = sock.recv(65536)
        if not more:
            break
        answer_ += more
    return answer_


def statuses(answer: bytes) -> list[bytes]:
    return [part[:3] for part in answer.split(b"HTTP/1.1 ")[1:]]


def body_at_backend(request: bytes) -> bytes:
    head, _, body = request.partition(b"\r\n\r\n")
    assert b"\r\nTransfer-Encoding: chunked" in head, head
    return body


def test_a_canonical_body_is_its_reads_not_copies() -> None:
    """The pieces of a body whose framing may go as it came are the reads (or
    spans of them) themselves; only what a rewritten size line splits, or the
    next request cuts off, is a slice."""
    head = post()
    first, second = head + b"5\r\nhello\r\n", b"3\r\nabc\r\n0\r\n\r\n"
    parser = RequestParser()
    parser.feed(first)
    parser.feed(second)
    pieces = parser.events[1:-1]
    assert pieces[0] == (first, len(head)) and pieces[0][0] is first
    assert pieces[1] is second and parser.events[-1] is END
    third = head + b"5;x\r\nhello\r\n0\r\n\r\n" + get(b"/next")
    parser.feed(third)
    assert parser.events[5:8] == [b"5\r\n", b"hello\r\n0\r\n\r\n", END]


def test_canonical_framing_goes_on_byte_for_byte(site) -> None:
    """Size lines as a client writes them, data that looks like heads and a last
    chunk: the backend gets the very bytes, and the request after it is answered."""
    bal, backend = site
    inner = b"\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app.test\r\n\r\n"
    framed = (b"%x\r\n%s\r\n" % (len(inner), inner) + b"A\r\n0123456789\r\n"
              + b"1000\r\n" + b"x" * 4096 + b"\r\n0\r\n\r\n")
    before = len(backend.requests)
    answer_ = exchange(bal, post() + framed + get(b"/after"), 2)
    assert statuses(answer_) == [b"200", b"200"], answer_
    sent = backend.requests[before:]
    assert body_at_backend(sent[0]) == framed
    assert sent[1].startswith(b"GET /after ") and len(sent) == 2


@pytest.mark.parametrize("framed", [
    b"5;name=value\r\nhello\r\n0\r\n\r\n",  # an extension
    b'5;a="b;c";d=\r\nhello\r\n0\r\n\r\n',  # quoted, empty
    b"0005\r\nhello\r\n000\r\n\r\n",  # leading zeros (a backend reading 16 digits at most)
    b"5\r\nhello\r\n0;last=1\r\n\r\n",  # the last chunk's extension
    b"5;x\r\nhello\r\n0\r\nX-Sum: 5\r\n\r\n",  # trailers
], ids=["extension", "quoted", "leading-zeros", "last-extension", "trailers"])
def test_other_size_lines_reach_the_backend_rewritten(site, framed: bytes) -> None:
    bal, backend = site
    before = len(backend.requests)
    answer_ = exchange(bal, post() + framed + get(b"/after"), 2)
    assert statuses(answer_) == [b"200", b"200"], answer_
    body = body_at_backend(backend.requests[before])
    assert unchunk(body) == b"hello"  # every size line canonical, nothing after
    assert b";" not in body and b"0005" not in body
    assert body.endswith(b"0\r\nX-Sum: 5\r\n\r\n" if b"X-Sum" in framed else b"0\r\n\r\n")


@pytest.mark.parametrize("framed", [
    b"zz\r\n", b"\r\n", b"-1\r\n", b"0x5\r\nhello\r\n", b" 5\r\nhello\r\n",
    b"5 ;a=b\r\nhello\r\n",  # blanks before an extension
    b"10000000000000000\r\n" + b"x" * 64,  # over 64 bits
    b"1" + b"0" * 40 + b"\r\n",  # a huge hex size
    b"5\nhello\r\n0\r\n\r\n",  # bare LF after the size
    b"5\rhello\r\n0\r\n\r\n",  # bare CR
    b"5\r\nhelloXX0\r\n\r\n",  # data longer than its size
    b"5\r\nhello\n0\r\n\r\n",  # bare LF after the data
    b"5;a\nb\r\nhello\r\n0\r\n\r\n",  # bare LF in an extension
    b'5;a="x\r\ny"\r\nhello\r\n0\r\n\r\n',  # CRLF in a quoted extension
    b"5;\x00\r\nhello\r\n0\r\n\r\n",  # NUL in an extension
    b"5;\r\nhello\r\n0\r\n\r\n",  # an empty extension
    b"5\r\nhello\r\n0\n\r\n",  # bare LF after the last chunk
    b"5\r\nhello\r\n0\r\nX-T: 1\n\r\n",  # bare LF in a trailer
    b"5\r\nhello\r\n\r\n",  # no last chunk
], ids=lambda framed: repr(framed[:24]))
def test_bad_framing_is_refused_before_any_of_it_goes(site, framed: bytes) -> None:
    bal, backend = site
    seen = len(backend.inbound)
    answer_ = exchange(bal, post() + framed + get(b"/after"))
    assert statuses(answer_) == [b"400"], answer_
    assert bytes(backend.inbound[seen:]) == b""  # not even the head: refused whole


def test_bad_framing_after_good_chunks_ends_the_request(site) -> None:
    """Chunks already forwarded stay forwarded; the bad size line is not, and the
    backend never gets a whole request (nor the one pipelined after it)."""
    bal, backend = site
    before, seen = len(backend.requests), len(backend.inbound)
    with socket.create_connection(("127.0.0.1", bal.port), timeout=WAIT) as sock:
        sock.sendall(post() + b"5\r\nhello\r\n")
        wait_for(lambda: bytes(backend.inbound[seen:]).endswith(b"\r\n\r\n5\r\nhello\r\n"),
                 WAIT, what="the first chunk at the backend")
        sock.sendall(b"5;a\nb\r\nworld\r\n0\r\n\r\n" + get(b"/after"))
        answer_ = read_through(sock, b"</html>")
    assert answer_ is not None and statuses(answer_) == [b"400"], answer_
    assert bytes(backend.inbound[seen:]).endswith(b"\r\n\r\n5\r\nhello\r\n")
    assert len(backend.requests) == before


def test_an_endless_chunk_extension_is_refused_not_buffered(site) -> None:
    """A size line whose extension never ends (llhttp takes any length of it): 400
    once the head's limit (64 KiB) of it came (`balancer.chunks`), none of it kept
    nor forwarded (bug: a 431, a head's status, in the middle of a body; HAProxy 400)."""
    bal, backend = site
    seen = len(backend.inbound)
    sent = 0
    with socket.create_connection(("127.0.0.1", bal.port), timeout=WAIT) as sock:
        sock.sendall(post() + b"5;a=")
        with contextlib.suppress(OSError):  # (the balancer may close while it is sent)
            while sent < 1 << 20:
                sock.sendall(b"b" * 16384)
                sent += 16384
        answer_ = read_answers(sock, 1)
    assert statuses(answer_) == [b"400"], answer_  # (the rest read and dropped: lingering)
    assert bytes(backend.inbound[seen:]).partition(b"\r\n\r\n")[2] == b""


@pytest.mark.parametrize(("line", "value"), [
    (b"f" * 16, (1 << 64) - 1),  # the largest llhttp takes: exact
    (b"0" * 1000 + b"3e9", 0x3E9),  # leading zeros: any number of them
    (b"1" + b"0" * 16, TOO_LARGE),
    (b"f" * 65536, TOO_LARGE),  # (bug: a bignum of 256 Kibit, shifted per digit)
], ids=lambda x: repr(x[:20]) if isinstance(x, bytes) else hex(x))
def test_a_size_past_64_bits_stops_growing(line: bytes, value: int) -> None:
    """A size line of more hex digits than 64 bits hold (llhttp refuses it: a 400)
    costs no more than its length: past 64 bits its size stays `TOO_LARGE`,
    exact below, cut across reads or not."""
    for cut in (len(line), len(line) // 2):
        body = ChunkedBody(1 << 20)
        assert body.scan(line[:cut], 0, []) == -1
        body.scan(line[cut:] + b"\r\n", 0, [])
        assert body.value == body.declared == value
    parser = RequestParser()
    if value == TOO_LARGE:
        with pytest.raises(ProtocolError) as refused:
            parser.feed(post() + line + b"\r\n")
        assert refused.value.status == 400


def test_framing_split_at_every_byte(site) -> None:
    """Sent a byte at a time (reads cut anywhere, a size line across reads): what
    the backend gets is canonical and carries the same data and trailers."""
    bal, backend = site
    framed = b"0003;e=1\r\nabc\r\n1A\r\n" + b"z" * 26 + b"\r\n0\r\nX-Sum: 1\r\n\r\n"
    data = post() + framed + get(b"/after")
    before = len(backend.requests)
    with socket.create_connection(("127.0.0.1", bal.port), timeout=WAIT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            sock.sendall(data[i:i + 1])
        answer_ = read_answers(sock, 2)
    assert statuses(answer_) == [b"200", b"200"], answer_
    body = body_at_backend(backend.requests[before])
    assert unchunk(body) == b"abc" + b"z" * 26 and body.endswith(b"0\r\nX-Sum: 1\r\n\r\n")


def test_bytes_received_count_the_data_without_the_framing(site) -> None:
    """The body goes on as its framing, but `bytes_received` counts its data
    (docs/api.md), however the reads and size lines were cut."""
    bal, _ = site
    framed = (b"0100;e=1\r\n" + b"a" * 256 + b"\r\n2bc\r\n" + b"b" * 700
              + b"\r\n0\r\nX-Sum: 1\r\n\r\n")
    with socket.create_connection(("127.0.0.1", bal.port), timeout=WAIT) as sock:
        sock.sendall(post(b"count.test") + framed[:7])  # (a size line cut)
        sock.sendall(framed[7:])
        assert statuses(read_answers(sock, 1)) == [b"200"]
    assert exchange(bal, post(b"count.test") + b"2c\r\n" + b"c" * 44 + b"\r\n0\r\n\r\n")
    wait_for(lambda: bal.host_stats("count.test").get("bytes_received") == 1000, WAIT,
             what="1,000 body bytes counted")


# max_body_bytes at the size line ------------------------------------------------
def refused_at_size_line(bal: Balancer, backend: RawBackend, first: bytes,
                         then: bytes = b"") -> bytes:
    """Send `first`; if `then`, once the backend has the head, send it too. Then
    wait (sending nothing more) for the answer: returns it, checked to be a 413
    that closes the connection. No body byte reached the backend."""
    seen = len(backend.inbound)
    with socket.create_connection(("127.0.0.1", bal.port), timeout=WAIT) as sock:
        sock.sendall(first)
        if then:
            wait_for(lambda: bytes(backend.inbound[seen:]).endswith(b"\r\n\r\n"), WAIT,
                     what="the head at the backend")
            sock.sendall(then)
        answer_ = read_through(sock, b"</html>")
        assert answer_ is not None and statuses(answer_) == [b"413"], answer_
        assert b"\r\nConnection: close\r\n" in answer_
        assert sock.recv(65536) == b""  # then closed (what else was sent, unread)
    forwarded = bytes(backend.inbound[seen:])
    assert forwarded.partition(b"\r\n\r\n")[2] == b"", forwarded
    return forwarded


@pytest.mark.parametrize("line", [b"3e9\r\n", b"100000\r\n", b"ffffffffffffffff\r\n",
                                  b"100000;ext=1\r\n", b"00000000000003e9\r\n"])
def test_a_chunk_over_the_limit_is_refused_at_its_size_line(site, line: bytes) -> None:
    bal, backend = site
    assert refused_at_size_line(bal, backend, post(b"limit.test") + line) == b""  # not even
    # the head: refused before the backend was chosen


def test_a_size_line_after_the_head_is_refused_before_its_data(site) -> None:
    bal, backend = site
    forwarded = refused_at_size_line(bal, backend, post(b"limit.test"), b"3e9\r\n")
    assert forwarded.startswith(b"POST /up HTTP/1.1\r\n")  # the head went, nothing after


def test_a_size_line_split_across_reads_is_refused_when_whole(site) -> None:
    bal, backend = site
    refused_at_size_line(bal, backend, post(b"limit.test") + b"10", b"000\r\n")


def test_chunks_whose_sizes_add_up_over_the_limit(site) -> None:
    """The first chunk fits, the second's size line takes the total over: refused
    there, before its data (and in one read, before anything was forwarded)."""
    bal, backend = site
    first = b"200\r\n" + b"a" * 512 + b"\r\n"
    assert refused_at_size_line(bal, backend, post(b"limit.test") + first + b"1f0\r\n") == b""


def test_chunks_up_to_the_limit_pass(site) -> None:
    bal, backend = site
    before = len(backend.requests)
    framed = b"200\r\n" + b"a" * 512 + b"\r\n1e8\r\n" + b"b" * 488 + b"\r\n0\r\n\r\n"
    answer_ = exchange(bal, post(b"limit.test") + framed)
    assert statuses(answer_) == [b"200"], answer_
    assert unchunk(body_at_backend(backend.requests[before])) == b"a" * 512 + b"b" * 488
