"""Hostile-peer probes (a second outside round) through a real balancer, with a
scripted raw backend that records what reaches it: each case a defect found
and fixed, so each fails without its fix.

* A fragment in a request target (``/index.html#.png``) gets a 400: RFC 9112
  §3.2 has none in a request, and a cache or router behind the balancer could
  read the path otherwise than the backend (HAProxy 2.8.2 and later refuse it).
* ``*`` is a target of OPTIONS only (RFC 9112 §3.2.4): ``GET *`` gets a 400.
* A 101 reaches the client with the backend's ``Upgrade`` (it carried the
  client's offer, ``foo/2, websocket`` for ``websocket``), and a 101 to a
  protocol the client did not offer is a 502 (RFC 9110 §7.8), not a tunnel.
* Management API: a JSON name twice in one object is a 400 `invalid_json`
  (json kept the last value silently: a reviewer reading the first saw another
  rule), and a non-ASCII host name a 400 naming its ASCII form (it was lowered
  first, and ``\u212a.test``, KELVIN SIGN, became ``k.test``).
"""

from __future__ import annotations

import http.client
import json
import socket
from urllib.parse import quote

import pytest

from tests.rawpeer import RawBackend, client_exchange
from tests.support import Balancer

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def answer_ok(conn: socket.socket, request: bytes) -> bool:
    """200 "ok"; to ``GET /switch/PROTOCOLS`` a 101 with ``Upgrade: PROTOCOLS``."""
    if request.startswith(b"GET /switch/"):
        chosen = request.split(b" ", 2)[1][len(b"/switch/"):].replace(b"%20", b" ")
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                     b"Upgrade: " + chosen + b"\r\n\r\n")
        return False
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


def write(bal: Balancer, method: str, path: str, raw: bytes) -> tuple[int, dict]:
    """A management write with a raw JSON body."""
    conn = http.client.HTTPConnection("127.0.0.1", bal.mport, timeout=10)
    try:
        conn.request(method, path, body=raw, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.parametrize(("path", "raw", "twice"), [
    ("/api/v1/hosts/dup.test",
     b'{"action": "static", "status": 200, "body": "a", "body": "b"}', "body"),
    ("/api/v1/hosts",
     b'{"hosts": {"app.test": {"action": "empty", "status": 204}, "app.test": '
     b'{"action": "empty", "status": 403}}}', "app.test"),
], ids=["rule", "table"])
def test_a_json_name_twice_is_refused_and_changes_nothing(site, path: str, raw: bytes,
                                                          twice: str) -> None:
    bal, _ = site
    before = bal.api("GET", "/api/v1/hosts")[1]
    status, body = write(bal, "PUT", path, raw)
    assert status == 400 and body["error"] == "invalid_json", body
    assert repr(twice) in body["message"] and "twice" in body["message"]
    assert bal.api("GET", "/api/v1/hosts")[1] == before


@pytest.mark.parametrize(("host", "ascii_form"), [
    ("\u212a.test", "k.test"),  # KELVIN SIGN: lower() made it ASCII "k"
    ("b\u00fccher.test", "xn--bcher-kva.test"),
])
def test_a_non_ascii_host_is_refused_naming_its_ascii_form(site, host: str,
                                                          ascii_form: str) -> None:
    bal, _ = site
    before = bal.api("GET", "/api/v1/hosts")[1]
    status, body = write(bal, "PUT", "/api/v1/hosts/" + quote(host),
                         b'{"action": "empty", "status": 204}')
    assert status == 400 and body["error"] == "invalid_rule", body
    assert "not ASCII" in body["details"][0] and repr(ascii_form) in body["details"][0]
    assert bal.api("GET", "/api/v1/hosts")[1] == before


def switch(port: int, offered: bytes, chosen: bytes) -> bytes:
    """An upgrade request offering `offered` to a backend that switches to `chosen`."""
    return client_exchange(port, b"GET /switch/" + chosen.replace(b" ", b"%20") +
                           b" HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\n"
                           b"Upgrade: " + offered + b"\r\n\r\n", until=b"\r\n\r\n")


@pytest.mark.parametrize(("offered", "chosen"), [
    (b"foo/2, websocket", b"websocket"),
    (b"websocket", b"WebSocket"),
    (b"foo/2", b"foo"),
])
def test_a_101_names_what_the_backend_switched_to(site, offered: bytes, chosen: bytes) -> None:
    bal, _ = site
    answer = switch(bal.port, offered, chosen)
    assert answer.startswith(b"HTTP/1.1 101 "), answer[:80]
    assert b"\r\nUpgrade: " + chosen + b"\r\n" in answer


@pytest.mark.parametrize(("offered", "chosen"), [
    (b"websocket", b"h2c"),
    (b"h2c, websocket", b"h2c"),  # the balancer never offers h2c (it drops it)
    (b"websocket", b"websocket, evil"),
])
def test_a_101_to_a_protocol_not_offered_is_a_bad_gateway(site, offered: bytes,
                                                          chosen: bytes) -> None:
    bal, _ = site
    assert switch(bal.port, offered, chosen).startswith(b"HTTP/1.1 502 ")
