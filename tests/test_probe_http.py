"""Hostile probes of the HTTP data plane found by replaying the same bytes through
HAProxy 2.6 and the balancer (a differential run), through real sockets: a
response whose ``Transfer-Encoding`` reads ``chunked`` to the balancer's head
check but not to llhttp, which frames its body; a Content-Length past 63 bits,
or with blanks after it; a chunk size line longer than the head limit in one
read; a ``Transfer-Encoding`` with an empty list element.
"""

from __future__ import annotations

import socket

import pytest

from tests.rawpeer import RawBackend, client_exchange, refused
from tests.support import wait_for

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

WAIT = 10.0  # seconds any step may take before the test fails
GET = b"GET /%d HTTP/1.1\r\nHost: app.test\r\n\r\n"
POST = b"POST /up HTTP/1.1\r\nHost: app.test\r\n"


def answer_ok(conn: socket.socket, _request: bytes) -> bool:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    return True


@pytest.mark.parametrize("value", [b"chunked\t", b"chunked \t", b"Chunked\t "])
def test_chunked_with_a_trailing_tab_is_a_bad_gateway_not_a_garbled_body(
        proxy_to, value: bytes) -> None:
    """llhttp reads a response body to the close when a tab follows ``chunked``
    (its own reading of a coding it does not know), while the head check stripped
    the tab and framed it for the client as chunked (bug: the client got a 200
    whose body was the backend's chunk framing, in chunks of its own, and no end
    while the backend kept its connection). Such a response is refused as a
    request with it is (llhttp: 400)."""
    def script(conn: socket.socket, request: bytes) -> bool:
        if request.startswith(b"GET /1 "):
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + value
                         + b"\r\n\r\n2\r\nok\r\n0\r\n\r\n")
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
        return True

    bal = proxy_to(RawBackend(script))
    answer = client_exchange(bal.port, GET % 1 + GET % 2, until=b"\r\n\r\nnext", timeout=WAIT)
    assert answer.startswith(b"HTTP/1.1 502 "), answer[:200]
    assert b"2\r\nok\r\n0\r\n\r\n" not in answer, answer  # no framing reached the client
    assert answer.endswith(b"\r\n\r\nnext"), answer[-200:]  # and the client kept its connection


@pytest.mark.parametrize("length", [1 << 63, (1 << 64) - 1])
def test_a_content_length_past_63_bits_is_refused_never_forwarded(proxy_to, length: int) -> None:
    """llhttp takes a Content-Length up to 2^64 - 1; HAProxy, and servers that
    read it as a signed 64-bit number, refuse or wrap one past 2^63 - 1 (bug: it
    was forwarded, and the balancer waited for its body): a 400, the connection
    closed, nothing of it at the backend. 2^63 - 1 itself goes on."""
    backend = RawBackend(answer_ok)
    bal = proxy_to(backend)
    answer, closed = refused(bal.port, POST + b"Content-Length: %d\r\n\r\nab" % length)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert closed
    assert bytes(backend.inbound) == b""
    with socket.create_connection(("127.0.0.1", bal.port), timeout=WAIT) as sock:
        sock.sendall(POST + b"Content-Length: %d\r\n\r\nab" % ((1 << 63) - 1))
        wait_for(lambda: bytes(backend.inbound).endswith(b"\r\n\r\nab"), WAIT,
                 what="the largest length at the backend")
    assert b"\r\nContent-Length: 9223372036854775807\r\n" in bytes(backend.inbound)


@pytest.mark.parametrize("value", [b"2\t", b"2 ", b"2 \t ", b"02", b"0002\t"])
def test_a_content_length_goes_on_without_blanks_after_it_or_leading_zeros(
        proxy_to, value: bytes) -> None:
    """RFC 9110 §5.5: the blanks after a value are no part of it; llhttp takes
    them (bug: ``2<TAB>`` reached the backend as it came, which a backend may
    refuse or read otherwise). The backend gets ``Content-Length: 2``, as HAProxy
    sends; and leading zeros go too (HAProxy forwards them: a backend's
    ``strtol(value, 0)`` reads ``010`` as 8)."""
    backend = RawBackend(answer_ok)
    bal = proxy_to(backend)
    with socket.create_connection(("127.0.0.1", bal.port), timeout=WAIT) as sock:
        sock.sendall(POST + b"Content-Length: " + value + b"\r\nX-After: a\r\n\r\nab" + GET % 2)
        answer = b""
        while answer.count(b"\r\n\r\nok") < 2:  # (the GET after it read as one)
            more = sock.recv(65536)
            assert more, answer
            answer += more
    assert answer.count(b"HTTP/1.1 200 ") == 2, answer
    head, _, body = backend.requests[0].partition(b"\r\n\r\n")
    assert b"\r\nContent-Length: 2\r\n" in head + b"\r\n", head
    assert b"\r\nX-After: a\r\n" in head + b"\r\n", head  # (the fields after it kept)
    assert body == b"ab"


def test_a_chunk_size_line_over_the_head_limit_in_one_read_is_a_400(proxy_to) -> None:
    """A chunk extension llhttp takes at any length: a size line is bounded by
    the head limit (64 KiB) however it came (bug: one that came in the read of
    its chunk went on, its extension cut; one over several reads got a 431, a
    head's status, in the middle of a body). HAProxy answers 400 to both."""
    backend = RawBackend(answer_ok)
    bal = proxy_to(backend)
    line = b"2;x=" + b"a" * 70000 + b"\r\nab\r\n0\r\n\r\n"
    answer, closed = refused(bal.port, POST + b"Transfer-Encoding: chunked\r\n\r\n" + line)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert closed
    assert backend.requests == []


@pytest.mark.parametrize("value", [b", chunked", b",chunked", b" ,, chunked", b"chunked,",
                                   b"chunked, ,"])
def test_a_transfer_encoding_with_an_empty_element_is_refused(proxy_to, value: bytes) -> None:
    """RFC 9110 §5.6.1 asks recipients to take empty list elements, but llhttp
    reads ``, chunked`` as chunked and refuses ``chunked,``, and HAProxy 2.6
    refuses the first (422) and forwards the second as it came, which an llhttp
    backend refuses: a framing field is not where a lenient reading is safe
    (docs/proxying.md). A 400, the connection closed, nothing forwarded."""
    backend = RawBackend(answer_ok)
    bal = proxy_to(backend)
    answer, closed = refused(bal.port, POST + b"Transfer-Encoding: " + value
                             + b"\r\n\r\n2\r\nab\r\n0\r\n\r\n" + GET % 2)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert closed
    assert bytes(backend.inbound) == b""


def test_a_response_content_length_past_63_bits_is_a_bad_gateway(proxy_to) -> None:
    """A backend's Content-Length of 2^63 (llhttp takes up to 2^64 - 1) went to the
    client as it came, and the client's connection waited for that body for ever
    (bug; HAProxy 502): a 502, the client's connection kept, the backend's never
    reused."""
    def script(conn: socket.socket, request: bytes) -> bool:
        if request.startswith(b"GET /1 "):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9223372036854775808\r\n\r\nok")
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
        return True

    backend = RawBackend(script)
    bal = proxy_to(backend)
    answer = client_exchange(bal.port, GET % 1 + GET % 2, until=b"\r\n\r\nnext", timeout=WAIT)
    assert answer.startswith(b"HTTP/1.1 502 "), answer[:200]
    assert b"9223372036854775808" not in answer
    assert answer.endswith(b"\r\n\r\nnext"), answer[-200:]
    assert len(backend.connections) == 2  # the second request on a new one


@pytest.mark.parametrize("value", [b"2\t", b"2 ", b"2 \t"])
def test_a_response_content_length_reaches_the_client_without_blanks_after_it(
        proxy_to, value: bytes) -> None:
    """RFC 9110 §5.5: the blanks after a value are no part of it (bug: the
    client got ``Content-Length: 2<TAB>`` as the backend sent it; HAProxy sends
    ``2``). The fields after it are kept."""
    def script(conn: socket.socket, _request: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\nX-After: a\r\n\r\nok")
        return True

    bal = proxy_to(RawBackend(script))
    answer = client_exchange(bal.port, GET % 1, until=b"\r\n\r\nok", timeout=WAIT)
    head = answer.partition(b"\r\n\r\n")[0] + b"\r\n"
    assert b"\r\nContent-Length: 2\r\n" in head, answer
    assert b"\r\nX-After: a\r\n" in head, answer
