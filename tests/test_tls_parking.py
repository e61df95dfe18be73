"""Idle keep-alive TLS connections wait parked, with no greenlet, as plain ones do
(in-process gevent worker; the TLS front's `ssl` is gevent's, as after monkey-patching)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.socket as gsocket
import gevent.ssl as gssl
import pytest

import balancer.tls
from balancer.accepting import bind
from balancer.addr import parse_addr
from balancer.certificates import make_record
from balancer.server import Worker
from balancer.settings import load_settings
from tests.rawpeer import read_until
from tests.test_worker_tuning import GET, StaticStore, until
from tests.tlsca import TestCA

CA = TestCA()


class Certs:
    """The store's certificates: one for app.test."""

    def __init__(self) -> None:
        chain, key = CA.issue("app.test")
        self.records = {"app.test": make_record("app.test", chain, key)}
        self.damaged: dict[str, str] = {}  # the records `all` left out (none here)

    def all(self) -> dict[str, Any]:
        return self.records

    def signature(self) -> int:
        return 1


class TLSStore(StaticStore):
    def certs(self) -> Certs:
        return Certs()


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[Worker]:
    """A TLS worker in this process, client_idle 1 s: an idle connection parks
    after half of it, and a client (this process, busy under load) has the other
    half to send its next request (0.3 s with client_idle 0.6 s before)."""
    monkeypatch.setattr(balancer.tls, "ssl", gssl)  # cooperative handshakes and I/O
    w = Worker(load_settings(flags={"timeouts.client_idle": 1.0, "timeouts.client_header": 5.0},
                             env={"BALANCER_STORE_SNAPSHOT": "off"}), TLSStore())
    assert w.apply(w.store.load())
    w.listen([(bind(parse_addr("127.0.0.1:0")), "tls")])
    watchdog = gevent.spawn(w.watchdog_loop)
    yield w
    w.stopping = True
    for server in w.servers:
        server.close()
    watchdog.join(timeout=5)


def connect(w: Worker, tmp: Path) -> Any:
    context = gssl.SSLContext(gssl.PROTOCOL_TLS_CLIENT)  # gevent's: cooperative
    context.load_verify_locations(str(CA.write(tmp)))
    sock = gsocket.create_connection(w.servers[0].address, timeout=5)
    tls = context.wrap_socket(sock, server_hostname="app.test")
    tls.settimeout(5)
    return tls


def read_response(conn: Any) -> bytes:
    return read_until(conn, b"\r\n\r\nok")


def test_an_idle_tls_connection_parks_and_serves_its_next_request(served: Worker,
                                                                 tmp_path: Path) -> None:
    slots = served.slots
    conn = connect(served, tmp_path)
    for _ in range(3):
        conn.sendall(GET)
        assert read_response(conn).startswith(b"HTTP/1.1 200")
        (client,) = served.io.connections
        assert until(lambda c=client: c.task is None and not slots.busy)  # parked: no greenlet
        assert slots.open == 1 and client.idle
    conn.sendall(GET * 2)  # pipelined: both read through OpenSSL, both answered
    data = b""
    while data.count(b"\r\n\r\nok") < 2:
        more = conn.recv(65536)
        assert more
        data += more
    conn.close()
    assert until(lambda: slots.open == 0 and served.stats.open_connections == 0)


def test_a_parked_tls_connection_is_closed_when_client_idle_passes(served: Worker,
                                                                   tmp_path: Path) -> None:
    conn = connect(served, tmp_path)
    clock, sent = served.io.now, time.monotonic()  # the watchdog's clock: its last tick
    conn.sendall(GET)
    read_response(conn)
    (client,) = served.io.connections
    assert until(lambda: client.task is None)  # parked, once idle for half of client_idle
    # its deadline: client_idle (1 s) from the answer on the watchdog's clock (at
    # that tick or a later one, however late the watchdog ran; before: 0.7 s at
    # least from `sent`, 0.657 s under load); not client_header (5 s)
    armed = client.deadline
    assert clock + 1.0 <= armed < sent + 3, (armed - clock, armed - sent)
    assert conn.recv(100) == b""  # closed by the balancer, not by our timeout (5 s)
    # at that deadline, not before, however late this process ran (before: at
    # least 0.2 s after this process saw it parked, which under load it saw late)
    assert time.monotonic() >= armed
    assert until(lambda: served.slots.open == 0 and not served.io.connections)


def test_a_tls_connection_with_decrypted_bytes_waiting_is_not_parked(tmp_path: Path) -> None:
    from balancer.netio import GeventIO

    chain, key = CA.issue("app.test")
    pem = tmp_path / "server.pem"
    pem.write_text(key + chain)
    server_context = gssl.SSLContext(gssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(str(pem))
    client_context = gssl.SSLContext(gssl.PROTOCOL_TLS_CLIENT)
    client_context.load_verify_locations(str(CA.write(tmp_path)))
    a, b = gsocket.socketpair()
    server = gevent.spawn(server_context.wrap_socket, a, server_side=True)
    client = client_context.wrap_socket(b, server_hostname="app.test")
    tls = server.get(timeout=5)
    stream = GeventIO().tls_stream(tls)
    try:
        assert stream.can_park()  # nothing decrypted, nothing held
        client.sendall(GET)
        assert stream.recv(4) == GET[:4]  # the rest of the record waits in OpenSSL
        assert not stream.can_park()
        assert stream.recv(65536) == GET[4:]
        assert stream.can_park()
    finally:
        stream.close()
        client.close()
