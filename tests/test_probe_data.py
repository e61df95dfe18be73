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
from pathlib import Path

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


@pytest.mark.parametrize("fields", [
    b"Transfer_Encoding: chunked\r\nContent-Length: 5\r\n\r\nhello",
    b"Content_Length: 5\r\n\r\nhello",
    b"Transfer-Encoding: chunked\r\nCONTENT_length: 5\r\n\r\n0\r\n\r\n",
], ids=["te-beside-cl", "cl-alone", "cl-beside-chunked"])
def test_framing_fields_spelt_with_an_underscore_are_refused(site, fields: bytes) -> None:
    bal, backend = site
    before = len(backend.inbound)
    answer = client_exchange(bal.port, b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n"
                             b"POST / HTTP/1.1\r\nHost: app.test\r\n" + fields)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:80]  # the one before
    assert b"HTTP/1.1 400 Bad Request\r\n" in answer and b"\r\nConnection: close\r\n" in answer
    assert b"POST" not in backend.inbound[before:]  # nothing of it reached the backend

def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def worker_pid(bal: Balancer) -> int:
    (process,) = bal.api("GET", "/api/v1/info")[1]["processes"]
    return process["pid"]


def answered(sock: socket.socket, heads: list[bytes], status: bytes) -> None:
    """Send `heads` pipelined on `sock` and read one `status` answer for each."""
    sock.sendall(b"".join(heads))
    got = b""
    while got.count(status) < len(heads):
        more = sock.recv(1 << 20)
        assert more, got[-200:]
        got += more


# Each case sends ~60 MB of keys the worker would keep (the bug: RSS grew by
# as much); the bound leaves room for the worker's own noise.
GROWTH_BOUND_KIB = 16 * 1024


def test_long_host_values_are_not_remembered(tmp_path: Path) -> None:
    bal = Balancer(tmp_path, {"app.test": {"action": "empty", "status": 204}})
    try:
        pid = worker_pid(bal)
        with socket.create_connection(("127.0.0.1", bal.port), timeout=10) as sock:
            answered(sock, [b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n"], b" 204 ")
            before = rss_kib(pid)
            for batch in range(10):  # each a distinct Host of 60 KB: 404s (no such site)
                answered(sock, [b"GET / HTTP/1.1\r\nHost: %06d%s\r\n\r\n"
                                % (batch * 100 + i, b"a" * 60000) for i in range(100)],
                         b" 404 ")
            assert rss_kib(pid) - before < GROWTH_BOUND_KIB
    finally:
        bal.stop()


def test_long_request_targets_are_not_remembered_per_host(tmp_path: Path) -> None:
    hosts = [b"h%d.test" % i for i in range(30)]
    bal = Balancer(tmp_path, {h.decode(): {"action": "empty", "status": 204} for h in hosts})
    try:
        pid = worker_pid(bal)
        with socket.create_connection(("127.0.0.1", bal.port), timeout=10) as sock:
            answered(sock, [b"GET / HTTP/1.1\r\nHost: h0.test\r\n\r\n"], b" 204 ")
            before = rss_kib(pid)
            for host in hosts:  # 256 distinct targets of 8,000 bytes each
                answered(sock, [b"GET /%03d%s HTTP/1.1\r\nHost: %s\r\n\r\n"
                                % (i, b"a" * 8000, host) for i in range(256)], b" 204 ")
            assert rss_kib(pid) - before < GROWTH_BOUND_KIB
    finally:
        bal.stop()
