"""Hostile and odd clients against the core proxy (a fourth outside round),
through a real balancer and a recording raw backend. Each case a defect found
and fixed (each test fails without its fix):

* ``curl --http2 -d DATA http://...`` (an h2c upgrade offer, which the balancer
  drops, on a request with a body) got a 400 "Upgrade request with a body":
  llhttp ends such a message at its head (the rest would be HTTP/2), and every
  Upgrade head with a body was refused to keep that body from being read as
  the next request. A head whose upgrade is none here (h2c alone, or any
  Upgrade of an HTTP/1.0 request, which is ignored) now has its body read as
  any body, and the requests after it. An upgrade the balancer does ask for
  (``websocket``) with a body is still a 400.
* A local answer (``static``, ``redirect``, ``empty``, the ``unknown`` page, a
  held request's page) to a request with a chunked body closed the connection
  even when the whole body had come with the head: the requests pipelined
  after it went unanswered (a body with a Content-Length up to 1 MiB was
  read and the connection kept). Such a body is now dropped and the
  connection kept; a chunked body still coming is not waited for (its end
  may never come): answered at once, the connection closed.
"""

from __future__ import annotations

import socket

import pytest

from tests.rawpeer import RawBackend, client_exchange, head_fields
from tests.support import Balancer, split_responses

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

H2C = (b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
       b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n")


def answer(conn: socket.socket, request: bytes) -> bool:
    """200 with the request's target and body length."""
    target = request.split(b" ", 2)[1]
    body = request.partition(b"\r\n\r\n")[2]
    text = b"%s %d" % (target, len(body))
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text))
    return True


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    """``bal, backend``: app.test proxies to a recording `RawBackend`."""
    backend = RawBackend(answer)
    bal = Balancer(tmp_path_factory.mktemp("probe-core-client"),
                   {"app.test": {"action": "proxy", "backends": [backend.address]},
                    "static.test": {"action": "static", "status": 503, "body": "later"}})
    yield bal, backend
    bal.stop()
    backend.stop()


def exchange(site, data: bytes, answers: int) -> tuple[list[tuple[int, bytes]], list[bytes]]:
    """(status, body) of each answer to `data` sent on one connection, and the
    requests the backend got meanwhile."""
    bal, backend = site
    before = len(backend.requests)
    got = client_exchange(bal.port, data, until=b"HTTP/1.1" if answers == 0 else None,
                          timeout=5)
    responses = split_responses(got)
    assert len(responses) == answers, got[:300]
    return [(status, body) for status, _, body in responses], backend.requests[before:]


@pytest.mark.parametrize("framing", [b"Content-Length: 5\r\n\r\nhello",
                                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"])
def test_an_h2c_offer_on_a_request_with_a_body_is_answered_in_http_1_1(site, framing) -> None:
    answers, sent = exchange(
        site, b"POST /upload HTTP/1.1\r\nHost: app.test\r\n" + H2C + framing
        + b"GET /next HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n", 2)
    assert answers[0][0] == 200 and answers[0][1].startswith(b"/upload ")
    assert answers[1] == (200, b"/next 0")
    upload = sent[0]
    names = {name for name, _ in head_fields(upload)}
    assert not names & {"upgrade", "http2-settings", "connection"}, names
    assert upload.endswith(b"hello") or upload.endswith(b"5\r\nhello\r\n0\r\n\r\n")


def test_curl_http2_upload_bytes_split_anywhere(site) -> None:
    """The head and its body in separate reads: the body still follows the head."""
    bal, backend = site
    before = len(backend.requests)
    with socket.create_connection(("127.0.0.1", bal.port), timeout=5) as sock:
        sock.sendall(b"POST /split HTTP/1.1\r\nHost: app.test\r\n" + H2C
                     + b"Content-Length: 11\r\n\r\n")
        for piece in (b"hello", b" ", b"world"):
            sock.sendall(piece)
        got = b""
        while b"/split 11" not in got:
            more = sock.recv(65536)
            assert more, got
            got += more
    assert got.startswith(b"HTTP/1.1 200 OK\r\n")
    assert backend.requests[before].endswith(b"\r\n\r\nhello world")


def test_an_http_1_0_upgrade_with_a_body_is_a_plain_request(site) -> None:
    answers, sent = exchange(
        site, b"POST /form HTTP/1.0\r\nHost: app.test\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nContent-Length: 5\r\n\r\nhello", 1)
    assert answers == [(200, b"/form 5")]
    assert b"\r\nUpgrade:" not in sent[0] and sent[0].endswith(b"\r\n\r\nhello")


def test_a_websocket_upgrade_with_a_body_is_still_refused(site) -> None:
    answers, sent = exchange(
        site, b"POST /ws HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nContent-Length: 41\r\n\r\n"
        b"GET /admin HTTP/1.1\r\nHost: internal\r\n\r\n", 1)
    assert answers[0][0] == 400 and sent == []


CHUNKED = b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"


@pytest.mark.parametrize("host", [b"static.test", b"nowhere.test"])
def test_a_whole_chunked_body_to_a_local_answer_keeps_the_connection(site, host) -> None:
    answers, sent = exchange(
        site, b"POST /form HTTP/1.1\r\nHost: " + host + b"\r\n" + CHUNKED
        + b"GET /next HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n", 2)
    assert answers[0][0] == (503 if host == b"static.test" else 404)
    assert answers[1] == (200, b"/next 0") and len(sent) == 1


def test_a_chunked_body_still_coming_is_not_waited_for(site) -> None:
    bal, _ = site
    with socket.create_connection(("127.0.0.1", bal.port), timeout=5) as sock:
        sock.sendall(b"POST /stream HTTP/1.1\r\nHost: static.test\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        got = b""
        while not got.endswith(b"later"):  # answered before the body's end
            more = sock.recv(65536)
            assert more, got
            got += more
    assert got.startswith(b"HTTP/1.1 503 ") and b"\r\nConnection: close\r\n" in got
