"""Hostile-peer probes of the data plane (a third outside round) through a real
balancer, with scripted raw clients and backends: each case a defect found
and fixed, so each fails without its fix.

* An ``Upgrade`` in an HTTP/1.0 request is ignored (RFC 9110 §7.8): it was
  forwarded as an HTTP/1.1 upgrade, its client got a ``101`` (no 1xx may go to
  an HTTP/1.0 client, §15.2) and a tunnel.
* A ``Connection`` field in a chunked response's trailer section: llhttp reads
  it as a head's, and after ``close`` refuses the next response on that
  connection ("Data after `Connection: close`"); the connection was pooled,
  and the next request on it got a 502.
"""

from __future__ import annotations

import socket

import pytest

from tests.rawpeer import RawBackend, client_exchange
from tests.support import Balancer

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def answer(conn: socket.socket, request: bytes) -> bool:
    """``/upgrade``: a 101 to any offer, then "tunnel" (and the connection ends);
    ``/trailer``: a chunked 200 whose trailer section has ``Connection: close``,
    the connection kept open; else 200 "ok"."""
    target = request.split(b" ", 2)[1]
    if target == b"/upgrade" and b"\r\nUpgrade: " in request:
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                     b"Upgrade: websocket\r\n\r\ntunnel")
        return False
    if target == b"/trailer":
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"2\r\nok\r\n0\r\nConnection: close\r\nX-Sum: 1\r\n\r\n")
        return True
    conn.sendall(OK)
    return True


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    """``bal, backend``: app.test proxies to a recording `RawBackend`."""
    backend = RawBackend(answer)
    bal = Balancer(tmp_path_factory.mktemp("probe-data"),
                   {"app.test": {"action": "proxy", "backends": [backend.address]}})
    yield bal, backend
    bal.stop()
    backend.stop()


UPGRADE = b"Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n"


def test_an_upgrade_in_an_http_1_0_request_is_ignored(site) -> None:
    bal, backend = site
    before = len(backend.requests)
    answer = client_exchange(
        bal.port, b"GET /upgrade HTTP/1.0\r\nHost: app.test\r\n" + UPGRADE + b"\r\n"
        b"GET /next HTTP/1.0\r\nHost: app.test\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:80]
    assert b" 101 " not in answer and b"tunnel" not in answer
    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 2  # the keep-alive connection stays HTTP
    sent = backend.requests[before:]
    assert [r.split(b"\r\n", 1)[0] for r in sent] == [b"GET /upgrade HTTP/1.1",
                                                       b"GET /next HTTP/1.1"]
    assert b"\r\nUpgrade:" not in sent[0] and b"\r\nConnection:" not in sent[0]


def test_an_upgrade_in_an_http_1_1_request_still_tunnels(site) -> None:
    bal, _ = site
    answer = client_exchange(bal.port, b"GET /upgrade HTTP/1.1\r\nHost: app.test\r\n"
                             + UPGRADE + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), answer[:80]
    assert answer.endswith(b"\r\n\r\ntunnel")


def test_a_connection_trailer_closes_the_backend_connection(site) -> None:
    bal, _ = site
    with socket.create_connection(("127.0.0.1", bal.port), timeout=10) as sock:
        for _ in range(3):  # each on the connection the last one would have left pooled
            sock.sendall(b"GET /trailer HTTP/1.1\r\nHost: app.test\r\n\r\n")
            got = b""
            while not got.endswith(b"\r\n0\r\nX-Sum: 1\r\n\r\n"):
                more = sock.recv(65536)
                assert more, got
                got += more
                assert not got.startswith(b"HTTP/1.1 502 "), got[:80]
            assert got.startswith(b"HTTP/1.1 200 OK\r\n"), got
            assert b"Connection: close" not in got  # not forwarded, the client's stays open
