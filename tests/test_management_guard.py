"""The management API refuses web pages (SPEC §5, issue 15.3): Host, Origin, Content-Type.

Hostile peers: a browser page on another local port (scripted as the raw
request a `no-cors` fetch sends, and in a real headless Chromium), and a DNS
rebinding page (a foreign `Host`). All against a real `balancer serve`.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from management.guard import HostPolicy, split_authority
from tests.support import Balancer, wait_for

APP = {"action": "proxy", "backends": ["127.0.0.1:9001"]}
BACKENDS = "/api/v1/hosts/app.test/backends"
ATTACK = json.dumps({"address": "127.0.0.1:6666"}).encode()


@pytest.fixture(scope="module")
def bal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    tmp = tmp_path_factory.mktemp("guard")
    balancer = Balancer(tmp, {"app.test": APP},
                        config='[management]\nallowed_hosts = ["ops.example.com", ".corp.lan"]\n')
    yield balancer
    balancer.stop()


def send(port: int, method: str, path: str, headers: dict[str, str],
         body: bytes | None = None) -> tuple[int, Any]:
    """One request with exactly these headers (http.client adds only Host if absent)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host="Host" in headers, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw


def backends(bal: Balancer) -> list[Any]:
    return bal.api("GET", "/api/v1/hosts/app.test")[1]["rule"]["backends"]


# ---------------------------------------------------------------------------
# the browser's requests, scripted
# ---------------------------------------------------------------------------

def test_no_cors_text_plain_post_from_another_port_changes_nothing(bal: Balancer) -> None:
    # exactly what `fetch(url, {method: "POST", mode: "no-cors", body})` sends
    status, body = send(bal.mport, "POST", BACKENDS, {
        "Host": f"127.0.0.1:{bal.mport}", "Origin": "http://127.0.0.1:8000",
        "Content-Type": "text/plain;charset=UTF-8", "Sec-Fetch-Site": "same-site",
        "Sec-Fetch-Mode": "no-cors"}, ATTACK)
    assert (status, body["error"]) == (403, "cross_origin")
    assert backends(bal) == ["127.0.0.1:9001"]


def test_a_write_needs_the_json_content_type(bal: Balancer) -> None:
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        status, body = send(bal.mport, "POST", BACKENDS, {"Content-Type": kind}, ATTACK)
        assert (status, body["error"]) == (415, "unsupported_media_type"), kind
    status, body = send(bal.mport, "POST", BACKENDS, {}, ATTACK)  # a body, no type
    assert (status, body["error"]) == (415, "unsupported_media_type")
    assert backends(bal) == ["127.0.0.1:9001"]
    status, body = send(bal.mport, "POST", "/api/v1/reload", {})  # bodyless: no type needed
    assert status == 200 and "version" in body


def test_cross_origin_is_refused_same_origin_is_served(bal: Balancer) -> None:
    json_type = {"Content-Type": "application/json; charset=utf-8"}
    for origin in ("http://127.0.0.1:8000", "null", "http://evil.example",
                   f"http://127.0.0.1:{bal.mport + 1}", "http://localhost"):
        status, body = send(bal.mport, "POST", BACKENDS, {"Origin": origin, **json_type}, ATTACK)
        assert (status, body["error"]) == (403, "cross_origin"), origin
    status, body = send(bal.mport, "GET", "/api/v1/hosts", {"Sec-Fetch-Site": "cross-site"})
    assert (status, body["error"]) == (403, "cross_origin")
    assert backends(bal) == ["127.0.0.1:9001"]
    # the dashboard's own origin, as a browser sends it
    status, body = send(bal.mport, "PUT", "/api/v1/hosts/same.test", {
        "Host": f"localhost:{bal.mport}", "Origin": f"http://localhost:{bal.mport}",
        "Sec-Fetch-Site": "same-origin", **json_type}, b'{"action": "empty", "status": 204}')
    assert status == 200, body
    assert send(bal.mport, "DELETE", "/api/v1/hosts/same.test", {})[0] == 200


def test_dns_rebinding_host_is_refused(bal: Balancer) -> None:
    for host in ("rebind.evil.example", f"rebind.evil.example:{bal.mport}", "127.0.0.1.nip.io",
                 "localhost.evil.example", "evil.corp.lan.example", "a b", ""):
        status, body = send(bal.mport, "GET", "/api/v1/hosts", {"Host": host})
        assert (status, body["error"]) == (403, "host_not_allowed"), host
    status, body = send(bal.mport, "POST", BACKENDS, {
        "Host": "rebind.evil.example", "Content-Type": "application/json"}, ATTACK)
    assert status == 403 and backends(bal) == ["127.0.0.1:9001"]


def test_loopback_names_and_allowed_hosts_are_served(bal: Balancer) -> None:
    for host in (f"127.0.0.1:{bal.mport}", "localhost", "LOCALHOST.", "[::1]:8081",
                 "127.0.0.2", "ops.example.com", "Ops.Example.com:443", "corp.lan",
                 "api.corp.lan"):
        assert send(bal.mport, "GET", "/api/v1/hosts", {"Host": host})[0] == 200, host


def test_http10_request_without_host_is_served(bal: Balancer) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", bal.mport), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:100]


# ---------------------------------------------------------------------------
# the rules, unit by unit
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(("bound", "allowed", "ok", "refused"), [
    ("127.0.0.1", (), ["localhost", "127.0.0.1", "127.8.9.1", "::1"],
     ["10.0.0.1", "example.com", "localhost.example.com"]),
    ("::1", (), ["localhost", "::1", "127.0.0.1"], ["::2", "evil"]),
    ("0.0.0.0", (), ["10.1.2.3", "::1", "localhost", "192.168.1.1"], ["mgmt", "evil.example"]),
    ("::", ("mgmt",), ["fe80::1", "mgmt"], ["mgmt.evil"]),
    ("10.0.0.5", (), ["10.0.0.5"], ["10.0.0.6", "localhost", "127.0.0.1"]),
    ("10.0.0.5", ("*",), ["anything.example", "10.0.0.6"], []),
    ("10.0.0.5", (".corp.lan",), ["corp.lan", "a.b.corp.lan"], ["xcorp.lan", "corp.lan.evil"]),
])
def test_host_policy(bound: str, allowed: tuple[str, ...], ok: list[str],
                     refused: list[str]) -> None:
    policy = HostPolicy(bound, allowed)
    assert [name for name in ok if not policy.allows(name)] == []
    assert [name for name in refused if policy.allows(name)] == []


def test_split_authority() -> None:
    assert split_authority("Example.COM:8081") == ("example.com", 8081)
    assert split_authority("[::1]:80") == ("::1", 80)
    assert split_authority("[::1]") == ("::1", None)
    assert split_authority("localhost.") == ("localhost", None)
    for bad in ("", ":80", "a:b", "[zz]:1", "a b", "x/y", "u@h", "h:123456"):
        assert split_authority(bad) is None, bad


# ---------------------------------------------------------------------------
# a real browser
# ---------------------------------------------------------------------------

EVIL_PAGE = """<!doctype html><title>loading</title><script>
const target = "http://127.0.0.1:%(port)d%(path)s";
async function attack() {
  const results = [];
  try {
    await fetch(target, {method: "POST", mode: "no-cors",
                         headers: {"Content-Type": "text/plain"}, body: '%(body)s'});
    results.push("no-cors sent");
  } catch (e) { results.push("no-cors failed"); }
  try {
    await fetch(target, {method: "POST", headers: {"Content-Type": "application/json"},
                         body: '%(body)s'});
    results.push("cors read");
  } catch (e) { results.push("cors blocked"); }
  document.title = results.join(", ");
}
attack();
</script>"""


class EvilPage(BaseHTTPRequestHandler):
    page = b""

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(self.page)))
        self.end_headers()
        self.wfile.write(self.page)


@pytest.mark.slow
def test_page_on_another_port_cannot_add_a_backend_in_chromium(tmp_path: Path,
                                                              chromium: Any) -> None:
    bal = Balancer(tmp_path, {"app.test": APP})
    page = EVIL_PAGE % {"port": bal.mport, "path": BACKENDS, "body": ATTACK.decode()}
    handler = type("Page", (EvilPage,), {"page": page.encode()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        chromium.get(f"http://127.0.0.1:{server.server_address[1]}/")
        wait_for(lambda: "," in chromium.title, what="the page's two requests")
        assert chromium.title == "no-cors sent, cors blocked"
        assert backends(bal) == ["127.0.0.1:9001"]
        # the dashboard itself, same-origin on the management address, still works
        chromium.get(f"http://127.0.0.1:{bal.mport}/")
        wait_for(lambda: "Live" in chromium.find_element("id", "status").text,
                 what="the dashboard to go live")
    finally:
        server.shutdown()
        server.server_close()
        bal.stop()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    from tests.test_dashboard import chromium as dashboard_chromium

    yield from dashboard_chromium.__wrapped__()
