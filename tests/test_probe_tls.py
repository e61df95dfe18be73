"""Hostile probes of TLS, both sides, through a real balancer (SPEC §9).

The TLS listener: bytes that are no ClientHello, a ClientHello cut short,
SNI names that are huge, odd, IP literals or unknown, ALPN offers with no
``http/1.1``, a client renegotiating, many handshakes left hanging at once.
Each ends in a clear outcome (an alert, a close, a 400, a counted
``balancer_tls_handshakes_total`` outcome) and the worker serves on.
The backend side: a TLS 1.2 backend that renegotiates mid-request is refused
(502 at once, never pooled), whether it honours the refusal or not.
Handshakes here are made by hand (`hello`: the ClientHello of Python's own
client, its SNI rewritten) or by pyOpenSSL (the ssl module cannot renegotiate).

Found and fixed with these probes:

* Bytes that are no TLS record and no HTTP request (binary garbage) got the
  plain-HTTP ``400`` page; they are closed now, as docs/tls.md said.
* An SNI name that is not ASCII made CPython's SNI callback print a traceback
  (an "unraisable" UnicodeDecodeError) to the worker's log for every such
  handshake: a hostile client could fill the log. It is one counted
  ``protocol_error`` now.
* A name no certificate was found for was counted twice: ``no_certificate``
  and ``protocol_error``.
* A TLS 1.2 backend could renegotiate (`HelloRequest`): the renegotiation hung
  the request until ``timeouts.backend_read`` (504). (A read that OpenSSL
  can make only after a write of its own, which such a renegotiation made
  possible, is tested in tests/test_inline_tls.py.) Refused since, it still
  did so when the backend ignored the refusal (waited on for a ClientHello).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL

from balancer.certificates import make_record
from balancer.stores.file import FileStore
from tests.support import Backend, Balancer, metric, request, wait_for
from tests.tlsca import TestCA

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

CA = TestCA()
HEADER_SECONDS = 1.0  # timeouts.client_header: the handshake's deadline
RECV_TIMEOUT = struct.pack("ll", 5, 0)  # SO_RCVTIMEO of pyOpenSSL's (blocking) sockets


# the listener's side ------------------------------------------------------------
def client_context(tmp: Path, alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(CA.write(tmp)))
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


def hello(tmp: Path, sni: bytes | None = b"app.test") -> bytes:
    """A ClientHello record of Python's client (TLS 1.2 and 1.3) with `sni` as
    its server name (None: no server_name extension), lengths mended."""
    obj = client_context(tmp).wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(),
                                      server_hostname="placeholder.test")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    record = outgoing.read()
    body = record[9:]  # past the record and handshake headers
    at = 2 + 32  # version, random
    at += 1 + body[at]  # session id
    at += 2 + struct.unpack_from("!H", body, at)[0]  # cipher suites
    at += 1 + body[at]  # compression methods
    extensions, rest = body[at + 2:], b""
    while extensions:
        kind, size = struct.unpack_from("!HH", extensions)
        if kind != 0:  # server_name
            rest += extensions[:4 + size]
        elif sni is not None:
            entry = b"\x00" + struct.pack("!H", len(sni)) + sni
            data = struct.pack("!H", len(entry)) + entry
            rest += struct.pack("!HH", 0, len(data)) + data
        extensions = extensions[4 + size:]
    body = body[:at] + struct.pack("!H", len(rest)) + rest
    handshake = b"\x01" + struct.pack("!I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake


def answer_to(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """What the listener sends back to `data` until it closes (a reset ends it too)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while more := sock.recv(65536):
                got += more
    return got


def alert(data: bytes) -> int | None:
    """The description of the fatal alert record `data` starts with, if it does."""
    if len(data) >= 7 and data[0] == 0x15 and data[5] == 2:
        return data[6]
    return None


def handshakes(bal: Balancer) -> dict[str, float]:
    """``balancer_tls_handshakes_total`` by outcome (summed over workers)."""
    return {dict(labels)["outcome"]: value for (name, labels), value in bal.metrics().items()
            if name == "balancer_tls_handshakes_total"}


def counted(bal: Balancer, before: dict[str, float], outcome: str, count: int = 1) -> None:
    """`count` more handshakes of `outcome` than `before`, and no other failure."""
    def moved() -> bool:
        now = handshakes(bal)
        return all(now.get(k, 0) - before.get(k, 0) == (count if k == outcome else 0)
                   for k in (set(now) | set(before) | {outcome}) - {"ok"} | {outcome})
    wait_for(moved, timeout=5, what=f"{count} more {outcome} handshake(s)")


def https_get(bal: Balancer, tmp: Path, alpn: list[str] | None = None,
              host: str = "app.test", path: str = "/") -> tuple[bytes, str | None]:
    """A request over a new TLS connection: the answer's status line and the
    protocol ALPN settled on."""
    with socket.create_connection(("127.0.0.1", bal.ports["tls"]), timeout=5) as raw, \
            client_context(tmp, alpn).wrap_socket(raw, server_hostname=host) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                     .encode())
        data = b""
        while more := sock.recv(65536):
            data += more
        return data.split(b"\r\n", 1)[0], sock.selected_alpn_protocol()


def whole_answer(sock: Any) -> bytes:
    """One answer with a Content-Length, read whole from `sock` (any socket-like)."""
    data = b""
    for _ in range(100):
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
        if length and len(body) >= int(length.group(1)):
            return data
        more = sock.recv(65536)
        assert more, data
        data += more
    raise AssertionError(f"no whole answer in 100 reads: {data[:200]!r}")


def serves(bal: Balancer, tmp: Path) -> None:
    """The worker serves on: over TLS and over plain HTTP."""
    assert https_get(bal, tmp)[0] == b"HTTP/1.1 200 OK"
    assert request(bal.port)[0] == 200


def open_connections(bal: Balancer) -> float:
    return metric(bal.metrics(), "balancer_open_connections")


# a TLS 1.2 backend that renegotiates ----------------------------------------------
class RenegotiatingBackend:
    """An HTTPS backend (pyOpenSSL, TLS 1.2 only) that reads a request, then asks
    for a renegotiation (HelloRequest) before it answers; it answers 200 if the
    connection survives, and notes what became of each. One that does not
    `honour` the refusal reads no TLS record after its HelloRequest (our alert
    goes unread): it waits for a ClientHello until the connection is closed."""

    def __init__(self, tmp: Path, name: str, honours: bool = True) -> None:
        self.honours = honours
        chain, key = CA.issue(name)
        pem = tmp / f"{name}.pem"
        pem.write_text(key + chain)
        self.context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self.context.set_max_proto_version(SSL.TLS1_2_VERSION)
        self.context.use_certificate_chain_file(str(pem))
        self.context.use_privatekey_file(str(pem))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.outcomes: list[str] = []
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                sock, _ = self.listener.accept()
                threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, RECV_TIMEOUT)  # blocking:
        conn = SSL.Connection(self.context, sock)  # pyOpenSSL does not wait
        conn.set_accept_state()
        try:
            conn.do_handshake()
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            conn.renegotiate()
            conn.do_handshake()  # sends the HelloRequest
            if not self.honours:  # waits on, the alert unread: closed by the balancer
                while sock.recv(65536):  # (each recv bounded by RECV_TIMEOUT)
                    pass
                self.outcomes.append("closed by the balancer")
                return
            conn.recv(65536)  # the client's answer: a new ClientHello, or an alert
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nrenegotiated")
            self.outcomes.append("answered")
        except (SSL.Error, OSError) as exc:
            self.outcomes.append(f"failed: {exc}")
        finally:
            sock.close()

    def stop(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Balancer, Path, Any]]:
    """``bal, tmp, (reneg, deaf)``: a balancer with a TLS listener (app.test's
    certificate, the handshake deadline `HEADER_SECONDS`) proxying app.test to
    an echo backend, reneg.test to a `RenegotiatingBackend` and deaf.test to
    one that does not honour the refusal."""
    tmp = tmp_path_factory.mktemp("probe-tls")
    echo = Backend("echo")
    reneg = RenegotiatingBackend(tmp, "reneg.test")
    deaf = RenegotiatingBackend(tmp, "deaf.test", honours=False)
    hosts = {"app.test": {"action": "proxy", "backends": [echo.address]},
             "reneg.test": {"action": "proxy", "backends": [f"https://{reneg.address}"],
                            "retries": 0},
             "deaf.test": {"action": "proxy", "backends": [f"https://{deaf.address}"],
                           "retries": 0}}
    routes = tmp / "routes.json"
    routes.write_text(json.dumps({"version": 1, "hosts": hosts}))
    chain, key = CA.issue("app.test", "reneg.test", "deaf.test")
    certs = FileStore(str(routes)).certs()
    for host in ("app.test", "reneg.test"):
        certs.put(host, make_record(host, chain, key))
    config = (f"[timeouts]\nclient_header = {HEADER_SECONDS}\nbackend_read = 5.0\n"
              f'[tls]\nbackend_ca_bundle = "{CA.write(tmp)}"\n')
    bal = Balancer(tmp, args=["--tls-listen", "127.0.0.1:0"], config=config)
    yield bal, tmp, (reneg, deaf)
    bal.stop()
    reneg.stop()
    deaf.stop()
    echo.stop()


# bytes that are no ClientHello ------------------------------------------------------
@pytest.mark.parametrize(("data", "alerted"), [
    (b"\x00\xff\xfe garbage \x01\x02" * 8, False),  # binary: no TLS, no HTTP
    (b"\x80\x2e\x01\x00\x02\x00\x15" + b"\x00" * 41, False),  # an SSLv2-style hello
    (b"\x16\x03\x03\x00\x10" + b"\xee" * 16, True),  # a handshake record, no ClientHello
], ids=["binary", "sslv2-hello", "bad-handshake-record"])
def test_bytes_that_are_no_client_hello_are_closed_and_counted(site: Any, data: bytes,
                                                               alerted: bool) -> None:
    """Closed (bug: the plain-HTTP 400 page went to any byte but a TLS
    record's first), or answered with an alert by OpenSSL."""
    bal, tmp, _ = site
    before = handshakes(bal)
    got = answer_to(bal.ports["tls"], data)
    assert (alert(got) is not None) if alerted else got == b"", got[:100]
    counted(bal, before, "protocol_error")
    serves(bal, tmp)


def test_a_client_hello_cut_in_half_is_closed_at_the_handshake_deadline(site: Any) -> None:
    bal, tmp, _ = site
    record = hello(tmp)
    before = handshakes(bal)
    with socket.create_connection(("127.0.0.1", bal.ports["tls"]), timeout=5) as sock:
        sock.sendall(record[:len(record) // 2])
        start = time.monotonic()
        assert sock.recv(100) == b""  # closed by the balancer, nothing sent
        assert HEADER_SECONDS - 0.2 < time.monotonic() - start < HEADER_SECONDS + 2
    counted(bal, before, "timeout")
    serves(bal, tmp)


def test_a_client_hello_cut_then_closed_is_counted(site: Any) -> None:
    bal, tmp, _ = site
    record = hello(tmp)
    before = handshakes(bal)
    with socket.create_connection(("127.0.0.1", bal.ports["tls"]), timeout=5) as sock:
        sock.sendall(record[:len(record) // 2])
        sock.shutdown(socket.SHUT_WR)  # a truncated record, then the end
        start = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(100) in (b"",) or alert(sock.recv(100)) is not None
        assert time.monotonic() - start < HEADER_SECONDS  # at once, not at the deadline
    counted(bal, before, "protocol_error")
    serves(bal, tmp)


# SNI --------------------------------------------------------------------------------
UNRECOGNIZED_NAME = 112
INTERNAL_ERROR = 80


@pytest.mark.parametrize(("sni", "outcome", "answer"), [
    (b"a" * 300, "protocol_error", UNRECOGNIZED_NAME),  # over 255 bytes: OpenSSL's refusal
    (b"x" * 60000, "protocol_error", UNRECOGNIZED_NAME),  # a ClientHello of 4 records
    # not ASCII: CPython's SNI callback cannot decode it and fails the handshake
    (b"app.test\xff\xfe", "protocol_error", INTERNAL_ERROR),
    (b"\xc3\xa9t\xc3\xa9.test", "protocol_error", INTERNAL_ERROR),  # UTF-8, no A-label
    (b"app.test\r\nX: y", "no_certificate", UNRECOGNIZED_NAME),  # control bytes
    (b"127.0.0.1", "no_certificate", UNRECOGNIZED_NAME),  # IP literals (never SNI: RFC 6066)
    (b"::1", "no_certificate", UNRECOGNIZED_NAME),
    (b"[::1]", "no_certificate", UNRECOGNIZED_NAME),
    (b"nobody.test", "no_certificate", UNRECOGNIZED_NAME),
    (b"*.test", "no_certificate", UNRECOGNIZED_NAME),
    (b".", "no_certificate", UNRECOGNIZED_NAME),
], ids=["300-bytes", "60000-bytes", "latin1", "utf8", "crlf", "ipv4", "ipv6", "ipv6-brackets",
        "unknown", "star", "dot"])
def test_odd_sni_names_fail_the_handshake_with_an_alert_counted_once(
        site: Any, sni: bytes, outcome: str, answer: int) -> None:
    """No certificate is found for any of them (app.test's is the only one,
    no default_host); each handshake is counted once, and logs nothing."""
    bal, tmp, _ = site
    before = handshakes(bal)
    log_size = len(bal.output())
    message = hello(tmp, sni)[5:]  # the handshake message, in records of 16 KiB at most
    record = b"".join(b"\x16\x03\x01" + struct.pack("!H", len(message[i:i + 16384]))
                      + message[i:i + 16384] for i in range(0, len(message), 16384))
    got = answer_to(bal.ports["tls"], record)
    assert alert(got) == answer, got[:20]
    counted(bal, before, outcome)
    assert bal.output()[log_size:] == ""  # nothing logged per handshake
    serves(bal, tmp)


def test_an_sni_name_in_capitals_with_a_final_dot_gets_its_certificate(site: Any) -> None:
    bal, tmp, _ = site
    before = handshakes(bal)
    with socket.create_connection(("127.0.0.1", bal.ports["tls"]), timeout=5) as sock:
        sock.sendall(hello(tmp, b"APP.Test."))
        reply = sock.recv(65536)
    assert reply[0] == 0x16, reply[:20]  # a ServerHello (the client then left)
    counted(bal, before, "protocol_error")  # the client left mid-handshake


# ALPN -------------------------------------------------------------------------------
@pytest.mark.parametrize("offer", [["h2"], ["spdy/3.1", "x-unknown"], ["acme-tls/1"],
                                   ["h2", "http/1.1"]])
def test_alpn_without_http_1_1_gets_no_answer_and_is_served(site: Any, offer: list[str]) -> None:
    bal, tmp, _ = site
    status, chosen = https_get(bal, tmp, alpn=offer)
    assert status == b"HTTP/1.1 200 OK"
    assert chosen == ("http/1.1" if "http/1.1" in offer else None)


# after the handshake ------------------------------------------------------------------
def test_a_client_that_renegotiates_gets_the_alert_and_the_worker_serves_on(site: Any) -> None:
    """A TLS 1.2 client's renegotiation (a new ClientHello after a request) is
    refused with the no_renegotiation alert; the connection is not served on
    by the client (OpenSSL gives up its renegotiation), nothing is left open."""
    bal, tmp, _ = site
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    context.load_verify_locations(str(CA.write(tmp)))
    context.set_verify(SSL.VERIFY_PEER, lambda *_: True)
    raw = socket.create_connection(("127.0.0.1", bal.ports["tls"]))  # blocking (pyOpenSSL
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, RECV_TIMEOUT)  # waits)
    conn = SSL.Connection(context, raw)
    conn.set_tlsext_host_name(b"app.test")
    conn.set_connect_state()
    conn.do_handshake()
    conn.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
    assert whole_answer(conn).startswith(b"HTTP/1.1 200 OK")  # (none of its records
    assert conn.renegotiate()  # may come during the renegotiation)
    try:
        with pytest.raises(SSL.Error, match="no renegotiation"):
            conn.do_handshake()
    finally:
        raw.close()
    wait_for(lambda: open_connections(bal) == 0, timeout=5, what="the connection closed")
    serves(bal, tmp)


def test_a_record_cut_short_then_the_end_closes_after_the_whole_requests(site: Any) -> None:
    """A request whole, then half of the next request's record and the TCP end:
    the first is answered, the half record is dropped and the connection closed."""
    bal, tmp, _ = site
    obj = client_context(tmp).wrap_bio(incoming := ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(),
                                       server_hostname="app.test")
    with socket.create_connection(("127.0.0.1", bal.ports["tls"]), timeout=5) as sock:
        for _ in range(10):
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        sock.sendall(outgoing.read())
        obj.write(b"GET /whole HTTP/1.1\r\nHost: app.test\r\n\r\n")
        whole = outgoing.read()
        obj.write(b"GET /cut HTTP/1.1\r\nHost: app.test\r\n\r\n")
        cut = outgoing.read()
        sock.sendall(whole + cut[:len(cut) // 2])
        sock.shutdown(socket.SHUT_WR)
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while more := sock.recv(65536):
                data += more
    incoming.write(data)
    answers = b""
    with contextlib.suppress(ssl.SSLError):  # the end: with or without close_notify
        while more := obj.read(65536):
            answers += more
    assert answers.count(b"HTTP/1.1 ") == 1 and b'"/whole"' in answers, answers[:300]
    wait_for(lambda: open_connections(bal) == 0, timeout=5, what="the connection closed")
    serves(bal, tmp)


def test_many_hanging_handshakes_do_not_starve_requests(site: Any) -> None:
    """80 connections each sending half a ClientHello, then nothing: requests on
    both listeners are answered meanwhile, and each hanging one is closed at
    the handshake deadline and counted."""
    bal, tmp, _ = site
    half = hello(tmp)[:100]
    before = handshakes(bal)
    hanging = []
    try:
        for _ in range(80):
            sock = socket.create_connection(("127.0.0.1", bal.ports["tls"]), timeout=5)
            sock.sendall(half)
            hanging.append(sock)
        start = time.monotonic()
        serves(bal, tmp)
        assert time.monotonic() - start < HEADER_SECONDS  # before their deadline (load: not /2)
        for sock in hanging:
            assert sock.recv(100) == b""  # closed by the balancer
        assert time.monotonic() - start < HEADER_SECONDS + 2
    finally:
        for sock in hanging:
            sock.close()
    counted(bal, before, "timeout", 80)
    serves(bal, tmp)


# the backend's side -------------------------------------------------------------------
@pytest.mark.parametrize("host", ["reneg.test", "deaf.test"])
def test_a_backend_that_renegotiates_is_refused_with_a_502(site: Any, host: str) -> None:
    """Its HelloRequest gets the no_renegotiation alert (as from nginx and
    HAProxy), and the request a 502 at once whose cause the operator log words,
    the connection closed, never pooled; the next request makes a new one.
    Whether the backend honours the refusal (an OpenSSL backend ends the
    connection with a fatal alert) or not: bug, one that ignored it (deaf.test:
    it waits for a ClientHello) held the request until `timeouts.backend_read`
    (5 s here), a 504."""
    bal, tmp, (reneg, deaf) = site
    backend = reneg if host == "reneg.test" else deaf
    worker = re.findall(r"worker (\d+) ready", bal.output())[-1]
    fds = len(os.listdir(f"/proc/{worker}/fd"))
    for n in (1, 2):
        start = time.monotonic()
        status, _, body = request(bal.port, host=host)
        assert status == 502, body[:200]
        assert time.monotonic() - start < 2.5  # not the backend_read timeout (5 s)
        wait_for(lambda n=n: len(backend.outcomes) == n, timeout=5, what="the backend's end")
        assert ("no renegotiation" if backend is reneg else "closed by the balancer") in (
            backend.outcomes[-1])
    cause = ("backend closed the connection (last: TLS: the backend asked for a "
             "renegotiation (renegotiation is refused))")
    wait_for(lambda: any(f"{host}: " in line and cause in line
                         for line in bal.output().splitlines()),
             timeout=5, what="the operator log's line with its cause")
    wait_for(lambda: open_connections(bal) == 0, timeout=5, what="the connections closed")
    wait_for(lambda: len(os.listdir(f"/proc/{worker}/fd")) <= fds, timeout=5,
             what="no more descriptors in the worker: none pooled, none left open")
    serves(bal, tmp)
