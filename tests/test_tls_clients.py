"""Clients of a TLS listener beyond one request: held requests whose client hangs up,
WebSocket tunnels (to plain and to https:// backends), and a real browser."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import socket
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from tests.support import Backend, Balancer, wait_for
from tests.test_tls import CA, client_context, put_cert, tls_connect
from tests.test_websocket import CLOSE, TEXT, Reader, WsEcho, encode_frame, handshake, read_frame
from tests.tlsbackend import server_context

HOSTS = ("spin.test", "ws.test", "wss.test", "app.test")


class TLSWsEcho(WsEcho):
    """The WebSocket echo backend behind TLS (for https:// backends)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        # as nginx: a TCP end without close_notify is the peer's end of stream (the
        # balancer half-closes a TLS peer so); OpenSSL 3 would fail the connection
        context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
        self.context = context
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError):
            conn.close()
            return
        super().serve(tls)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls-clients")


@pytest.fixture(scope="module")
def servers(tmp: Path) -> Iterator[tuple[Balancer, WsEcho, TLSWsEcho, Backend]]:
    echo, secure_echo = WsEcho(), TLSWsEcho(server_context(CA, tmp, "wss.test"))
    backend = Backend("page")
    routes = tmp / "routes.json"
    routes.write_text(json.dumps({"version": 1, "hosts": {
        "spin.test": {"action": "spin", "timeout": 60},
        "ws.test": {"action": "proxy", "backends": [echo.address]},
        "wss.test": {"action": "proxy", "backends": [f"https://{secure_echo.address}"]},
        "app.test": {"action": "proxy", "backends": [backend.address]}}}))
    for host in HOSTS:
        put_cert(routes, host)
    config = (f'[tls]\nbackend_ca_bundle = "{CA.write(tmp)}"\n'
              "[timeouts]\ntunnel_idle = 5.0\n")
    bal = Balancer(tmp, args=["--tls-listen", "127.0.0.1:0"], config=config)
    yield bal, echo, secure_echo, backend
    bal.stop()
    echo.stop()
    secure_echo.stop()
    backend.stop()


# held requests ----------------------------------------------------------------------
def held_tls(bal: Balancer, tmp: Path) -> ssl.SSLSocket:
    before = bal.spinning("spin.test")
    tls = tls_connect(bal.ports["tls"], "spin.test", client_context(tmp))
    tls.sendall(b"GET /held HTTP/1.1\r\nHost: spin.test\r\n\r\n")
    wait_for(lambda: bal.spinning("spin.test") == before + 1, what="the request held")
    return tls


def client_errors(bal: Balancer) -> int:
    return bal.host_stats("spin.test").get("responses", {}).get("4xx", 0)


@pytest.mark.parametrize("how", ["fin", "close_notify", "reset"])
def test_a_tls_client_hanging_up_while_held_frees_its_slot(servers: Any, tmp: Path,
                                                           how: str) -> None:
    bal = servers[0]
    errors = client_errors(bal)
    tls = held_tls(bal, tmp)
    if how == "close_notify":
        tls.settimeout(5)
        # close_notify, the TCP connection kept open: unwrap then waits for the
        # balancer's close_notify, and gets the balancer's close instead
        with pytest.raises(ssl.SSLEOFError):
            tls.unwrap()
        wait_for(lambda: bal.spinning("spin.test") == 0, timeout=3,
                 what="the slot freed by close_notify")
        tls.close()
    else:
        if how == "reset":
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        tls.close()  # Python sends no close_notify: the TCP connection just ends
        wait_for(lambda: bal.spinning("spin.test") == 0, timeout=3,
                 what="the slot of the client that hung up")
    wait_for(lambda: client_errors(bal) == errors + 1, timeout=3,
             what="the hang-up counted as 499")


def test_a_held_tls_client_that_pipelines_stays_held(servers: Any, tmp: Path) -> None:
    bal, _, _, backend = servers
    tls = held_tls(bal, tmp)
    hosts = json.loads(bal.routes.read_text())["hosts"]
    try:
        tls.sendall(b"GET /next HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        tls.settimeout(0.5)
        with pytest.raises(TimeoutError):  # still held: no answer, not closed
            tls.recv(1)
        assert bal.spinning("spin.test") == 1
        # released: the held request, then the one read through OpenSSL while it was held
        bal.write_routes({**hosts, "spin.test": {"action": "static", "body": "released"}})
        tls.settimeout(10)
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    finally:
        tls.close()
        bal.write_routes(hosts)
    first, _, second = data.partition(b"released")
    assert first.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 200 " in second
    assert json.loads(second.partition(b"\r\n\r\n")[2])["path"] == "/next"
    assert backend.requests[-1][1] == "/next"


# WebSocket ---------------------------------------------------------------------------
def open_ws(bal: Balancer, tmp: Path, host: str) -> tuple[ssl.SSLSocket, Reader]:
    tls = tls_connect(bal.ports["tls"], host, client_context(tmp))
    reader = Reader(tls)
    tls.sendall(handshake(host) + encode_frame(TEXT, b"early", mask=True))
    head = reader.until(b"\r\n\r\n")
    assert head is not None and head.startswith(b"HTTP/1.1 101 "), head
    return tls, reader


@pytest.mark.parametrize("host", ["ws.test", "wss.test"])
def test_websocket_through_the_tls_listener(servers: Any, tmp: Path, host: str) -> None:
    bal, echo, secure_echo, _ = servers
    tls, reader = open_ws(bal, tmp, host)
    with tls:
        assert read_frame(reader) == (TEXT, b"early")
        for payload in (b"hello", "wörld".encode(), bytes(range(256)) * 600):
            tls.sendall(encode_frame(TEXT, payload, mask=True))
            assert read_frame(reader) == (TEXT, payload)
        tls.sendall(encode_frame(CLOSE, b"\x03\xe8", mask=True))
        assert read_frame(reader) == (CLOSE, b"\x03\xe8")
        assert reader.exactly(1) is None  # the backend closed: so does the tunnel
    backend = secure_echo if host == "wss.test" else echo
    seen = backend.handshakes[-1]
    assert seen["host"] == host and seen["x-forwarded-proto"] == "https"


@pytest.mark.parametrize("host", ["ws.test", "wss.test"])
def test_websocket_half_close_over_tls(servers: Any, tmp: Path, host: str) -> None:
    bal, echo, secure_echo, _ = servers
    backend = secure_echo if host == "wss.test" else echo
    backend.closed_by_peer.clear()
    tls, reader = open_ws(bal, tmp, host)
    with tls:
        assert read_frame(reader) == (TEXT, b"early")
        socket.socket.shutdown(tls, socket.SHUT_WR)  # TCP half-close under TLS
        assert backend.closed_by_peer.wait(5)
        assert read_frame(reader) == (TEXT, b"bye")  # the other way still flows
        assert reader.exactly(1) is None


# a real browser -------------------------------------------------------------------------
def spki_hash(pem: str) -> str:
    """base64(sha256(SubjectPublicKeyInfo)): Chromium's --ignore-certificate-errors-spki-list."""
    from cryptography import x509

    key = x509.load_pem_x509_certificate(pem.encode()).public_key()
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def test_chromium_loads_a_page_over_https(servers: Any) -> None:
    from tests.test_dashboard import CHROME_FLAGS, CHROMEDRIVER, CHROMIUM, require_chromium

    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    bal, _, _, backend = servers
    profile = tempfile.mkdtemp(prefix="tls-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")  # a fresh profile
    # trust the test CA only (its key is in the chain the balancer sends)
    options.add_argument(f"--ignore-certificate-errors-spki-list={spki_hash(CA.pem)}")
    options.add_argument("--host-resolver-rules=MAP app.test 127.0.0.1")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    try:
        driver.get(f"https://app.test:{bal.ports['tls']}/page?from=chromium")
        assert driver.execute_script("return location.protocol") == "https:"
        assert driver.execute_script("return window.isSecureContext") is True
        seen = json.loads(driver.find_element("tag name", "body").text)
        assert seen["path"] == "/page?from=chromium"
        assert seen["headers"]["X-Forwarded-Proto"] == "https"
        assert seen["headers"]["Host"] == f"app.test:{bal.ports['tls']}"
        seen_by_backend = [headers for _, path, headers in backend.requests
                           if path == "/page?from=chromium"]
        assert seen_by_backend and seen_by_backend[-1]["X-Forwarded-Proto"] == "https"
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
