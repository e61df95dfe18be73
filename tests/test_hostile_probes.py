"""Hostile-peer probes (a second outside round) through a real balancer, with a
scripted raw backend that records what reaches it: each case a defect found
and fixed, so each fails without its fix.

* A fragment in a request target (``/index.html#.png``) gets a 400: RFC 9112
  §3.2 has none in a request, and a cache or router behind the balancer could
  read the path otherwise than the backend (HAProxy 2.8.2 and later refuse it).
* ``*`` is a target of OPTIONS only (RFC 9112 §3.2.4): ``GET *`` gets a 400.
"""

from __future__ import annotations

import socket

import pytest

from tests.rawpeer import RawBackend, client_exchange
from tests.support import Balancer

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def answer_ok(conn: socket.socket, request: bytes) -> bool:
    conn.sendall(OK)
    return True


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    """``bal, backend``: app.test proxies to a recording `RawBackend`."""
    backend = RawBackend(answer_ok)
    bal = Balancer(tmp_path_factory.mktemp("probes"),
                   {"app.test": {"action": "proxy", "backends": [backend.address]}})
    yield bal, backend
    bal.stop()
    backend.stop()


@pytest.mark.parametrize("request_line", [
    b"GET /index.html#.png HTTP/1.1",
    b"GET /#/admin HTTP/1.1",
    b"GET http://app.test/a#b HTTP/1.1",
    b"GET * HTTP/1.1",
    b"POST * HTTP/1.1",
], ids=["fragment", "fragment-root", "fragment-absolute", "asterisk-get", "asterisk-post"])
def test_targets_no_backend_may_read_apart_are_refused(site, request_line: bytes) -> None:
    bal, backend = site
    before = len(backend.inbound)
    answer = client_exchange(bal.port, request_line + b"\r\nHost: app.test\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
    assert b"\r\nConnection: close\r\n" in answer
    assert len(backend.inbound) == before  # nothing reached the backend


def test_options_asterisk_and_plain_targets_still_pass(site) -> None:
    bal, backend = site
    for line in (b"OPTIONS * HTTP/1.1", b"GET /a?b=c%23d HTTP/1.1"):
        answer = client_exchange(bal.port, line + b"\r\nHost: app.test\r\n"
                                 b"Connection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:80]
        assert backend.requests[-1].startswith(line + b"\r\n")
