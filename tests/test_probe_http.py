"""Hostile probes of the HTTP data plane found by replaying the same bytes through
HAProxy 2.6 and the balancer (a differential run), through real sockets: a
response whose ``Transfer-Encoding`` reads ``chunked`` to the balancer's head
check but not to llhttp, which frames its body.
"""

from __future__ import annotations

import socket

import pytest

from tests.rawpeer import RawBackend, client_exchange

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

WAIT = 10.0  # seconds any step may take before the test fails
GET = b"GET /%d HTTP/1.1\r\nHost: app.test\r\n\r\n"


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
