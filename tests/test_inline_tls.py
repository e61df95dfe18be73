"""Keep-alive requests on TLS connections served in the hub (`balancer.inline`,
`_serve_tls`), and what hostile TLS clients do to that path.

The in-process gevent worker of tests/test_inline.py with a TLS listener (its
`ssl` gevent's, as after monkey-patching) in front of its scripted backend.
Clients are gevent's SSLSocket, or `BioClient`: an `ssl.SSLObject` over memory
BIOs and a plain socket, which sends exactly the TLS records it is told to
(half a record, garbage, close_notify)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gevent
import gevent.event
import gevent.socket as gsocket
import gevent.ssl as gssl
import gevent.subprocess as gsubprocess
import pytest

import balancer.hold
import balancer.inline
import balancer.table
import balancer.tls
from balancer import relay
from balancer.certificates import make_record
from balancer.netio import GeventIO
from balancer.pool import Upstream
from balancer.response_parser import ResponseParser
from balancer.server import Worker
from tests.support import InProcessWorkers, TableStore
from tests.test_inline import (
    Client as PlainClient,
)
from tests.test_inline import (
    ScriptedBackend,
    assert_released,
    client_of,
    fill_unread,
    fill_until_sending,
    get,
    in_hub,
    next_waits_for_hold,
    parked,
    response,
    until,
)
from tests.tlsca import TestCA

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

CA = TestCA()
CHAIN, KEY = CA.issue("app.test")


class TLSTableStore(TableStore):
    """app.test proxied to the scripted backend, and its certificate."""

    def certs(self) -> Any:
        store = self

        class Certs:
            records = {"app.test": make_record("app.test", CHAIN, KEY)}
            damaged: dict[str, str] = {}

            def all(self) -> dict[str, Any]:
                return self.records

            def signature(self) -> int:
                return store.version

        return Certs()


@pytest.fixture
def backend() -> Iterator[ScriptedBackend]:
    b = ScriptedBackend()
    yield b
    b.close()


@pytest.fixture
def tls_worker(backend: ScriptedBackend, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Start a gevent worker with a TLS listener proxying app.test to `backend`."""
    monkeypatch.setattr(balancer.tls, "ssl", gssl)  # cooperative handshakes and I/O
    workers = InProcessWorkers()

    def start(spin: float = 0.0, **flags: Any) -> Worker:
        """`spin`: spin.test holds requests that long too (app.test's certificate)."""
        hosts: dict[str, Any] = {"app.test": {"action": "proxy", "backends": [backend.address]}}
        if spin:
            hosts["spin.test"] = {"action": "spin", "timeout": spin}
        return workers.start(TLSTableStore(hosts), flags, "tls")

    start.stop_watchdog = workers.stop_watchdog  # type: ignore[attr-defined]
    yield start
    workers.close()


def context(tmp: Path, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = gssl.SSLContext(gssl.PROTOCOL_TLS_CLIENT)  # gevent's: cooperative
    ctx.load_verify_locations(str(CA.write(tmp)))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def connect(w: Worker, tmp: Path, alpn: list[str] | None = None, rcvbuf: int = 0) -> PlainClient:
    raw = gsocket.socket()
    if rcvbuf:
        raw.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_RCVBUF, rcvbuf)
    raw.settimeout(5)
    raw.connect(w.servers[0].address)
    return PlainClient(context(tmp, alpn).wrap_socket(raw, server_hostname="app.test"))


class BioClient:
    """A TLS client whose records are made in memory and sent as told."""

    def __init__(self, w: Worker, tmp: Path) -> None:
        self.sock = gsocket.create_connection(w.servers[0].address, timeout=5)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context(tmp).wrap_bio(self.incoming, self.outgoing,
                                         server_hostname="app.test")
        self.unread = b""
        for _ in range(20):
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                data = self.sock.recv(65536)
                assert data, "closed during the handshake"
                self.incoming.write(data)
        self.flush()

    def flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def records(self, data: bytes) -> bytes:
        """The TLS record(s) carrying `data`, not sent."""
        self.obj.write(data)
        return self.outgoing.read()

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(self.records(data))

    def recv(self, size: int) -> bytes:
        if self.unread:
            data, self.unread = self.unread, b""
            return data
        for _ in range(1000):
            try:
                return self.obj.read(size)
            except ssl.SSLWantReadError:
                more = self.sock.recv(65536)
                if not more:
                    return b""
                self.incoming.write(more)
            except ssl.SSLZeroReturnError:
                return b""
        raise AssertionError("no data in 1000 records")

    def close_notify(self) -> None:
        """Send close_notify (and keep the TCP connection open)."""
        with contextlib.suppress(ssl.SSLWantReadError):  # the server's is not awaited
            self.obj.unwrap()
        self.flush()

    def close(self) -> None:
        self.sock.close()


def warm(w: Worker, sock: Any) -> None:
    """A first request (a greenlet's, after the handshake), then parked."""
    sock.sendall(get("/first"))
    assert response(sock)[0] == 200
    assert until(lambda: parked(w))


def served_in_hub(w: Worker, backend: ScriptedBackend, sock: Any, path: str = "/hold") -> None:
    """`path` (the backend holds it) is in flight in the hub, then answered."""
    backend.release.clear()
    sent = len(backend.requests)
    sock.sendall(get(path))
    assert until(lambda: len(backend.requests) == sent + 1)
    assert in_hub(w)  # waiting for the backend with no greenlet
    backend.release.set()
    assert response(sock)[0] == 200
    assert until(lambda: parked(w))


def gone(w: Worker) -> bool:
    return w.slots.open == 0 and w.stats.open_connections == 0 and not w.io.connections


# the common case -------------------------------------------------------------
def test_a_parked_tls_connection_s_requests_are_served_in_the_hub(
        tls_worker: Any, backend: ScriptedBackend, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    w = tls_worker(**{"log.access_log": str(log), "log.access_format": "json"})
    w.access_log.start()
    sock = connect(w, tmp_path)
    warm(w, sock)
    handshakes = dict(w.stats.tls_handshakes)
    for _ in range(3):
        served_in_hub(w, backend, sock)
        assert backend.requests[-1][1].count(b"X-Forwarded-Proto: https") == 1
    sock.sendall(get("/plain"))  # answered at once: read, relayed and parked in the hub
    assert response(sock)[2] == b"conn 1 /plain"
    assert until(lambda: parked(w))
    assert backend.connections == 1 and w.stats.tls_handshakes == handshakes
    assert_released(w, completed=5)
    sock.close()
    assert until(lambda: gone(w))
    w.access_log.close()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["target"] for r in records] == ["/first", "/hold", "/hold", "/hold", "/plain"]
    assert all(r["status"] == 200 and r["request_id"] for r in records)


def test_a_tls_client_s_request_with_no_pooled_connection_is_connected_in_the_hub(
        tls_worker: Any, backend: ScriptedBackend, tmp_path: Path) -> None:
    """The pool emptied: the hub opens the backend connection itself
    (`inline._connect`, tests/test_hub_connect.py) for a TLS client's request
    too, and waits for the answer with no greenlet."""
    w = tls_worker()
    sock = connect(w, tmp_path)
    warm(w, sock)
    route = w.contexts[0].holder.table.lookup(b"app.test")
    assert route.action.backends[0].close_idle() == 1  # no idle connection left
    served_in_hub(w, backend, sock)
    assert backend.connections == 2 and backend.requests[-1][0] == 2  # a new one
    assert_released(w, completed=2)
    sock.close()
    assert until(lambda: gone(w))


def test_a_client_offering_only_h2_gets_no_alpn_and_is_served_in_the_hub(
        tls_worker: Any, backend: ScriptedBackend, tmp_path: Path) -> None:
    w = tls_worker()
    sock = connect(w, tmp_path, alpn=["h2"])
    assert sock.sock.selected_alpn_protocol() is None  # refused as before: HTTP/1.1
    warm(w, sock)
    served_in_hub(w, backend, sock)
    sock.close()


def test_a_request_waiting_for_a_silent_backend_times_out_in_a_greenlet(
        tls_worker: Any, backend: ScriptedBackend, tmp_path: Path) -> None:
    w = tls_worker(**{"timeouts.backend_read": 0.5})
    sock = connect(w, tmp_path)
    warm(w, sock)
    sock.sendall(get("/silent"))
    assert until(lambda: len(backend.requests) == 2) and in_hub(w)
    assert response(sock)[0] == 504  # the watchdog's deadline, through a greenlet
    assert until(lambda: parked(w))
    sock.sendall(get("/after"))
    assert response(sock)[0] == 200
    assert_released(w, completed=3)
    sock.close()


# records: pipelined, split, partial ----------------------------------------------
def test_pipelined_requests_in_one_record_are_handed_over_and_answered_in_order(
        tls_worker: Any, backend: ScriptedBackend, tmp_path: Path) -> None:
    w = tls_worker()
    sock = BioClient(w, tmp_path)
    warm(w, sock)
    record = sock.records(get("/p1") + get("/p2") + get("/p3"))
    assert len(record) < 16384 + 256  # one record (TLS 1.3: at most 16 KiB of data)
    sock.sock.sendall(record)
    assert [response(sock)[2] for _ in range(3)] == [b"conn 1 /p1", b"conn 1 /p2",
                                                     b"conn 1 /p3"]
    assert until(lambda: parked(w))
    served_in_hub(w, backend, sock)
    assert_released(w, completed=5)
    sock.close()
    assert until(lambda: gone(w))


# `RECV_SIZE` is read as a module global by interpreted code only (mypyc inlines the
# Final): this runs in the suite's interpreted pass (scripts/test.sh, `-m data_plane`).
COMPILED = not balancer.inline.__file__.endswith(".py")


@pytest.mark.skipif(COMPILED, reason="patches a module global: runs in the interpreted pass")
def test_bytes_left_decrypted_in_openssl_are_read_by_a_greenlet(
        tls_worker: Any, backend: ScriptedBackend, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A read that leaves decrypted bytes in OpenSSL (here: a read the size of
    one head, two heads in the record) is no request for the hub: no readiness
    would announce the rest. The greenlet takes both, in order."""
    w = tls_worker()
    sock = BioClient(w, tmp_path)
    warm(w, sock)
    monkeypatch.setattr(balancer.inline, "RECV_SIZE", len(get("/hold")))
    backend.release.clear()
    sock.sendall(get("/hold") + get("/next"))  # one record
    assert until(lambda: len(backend.requests) == 2)
    assert client_of(w).task is not None  # not the hub's
    backend.release.set()
    assert response(sock)[2] == b"conn 1 /hold"
    assert response(sock)[2] == b"conn 1 /next"
    assert until(lambda: parked(w))
    monkeypatch.undo()
    served_in_hub(w, backend, sock)
    assert_released(w, completed=4)
    sock.close()


def test_a_request_sent_while_the_previous_waits_in_the_hub_is_answered_after_it(
        tls_worker: Any, backend: ScriptedBackend, tmp_path: Path) -> None:
    """Its record stays in the socket (nothing reads it through OpenSSL) until
    the first answer is out and the connection parks again."""
    w = tls_worker()
    sock = connect(w, tmp_path)
    warm(w, sock)
    next_waits_for_hold(w, sock, backend)
    sock.close()


def test_a_request_split_across_records_is_handed_over(
        tls_worker: Any, backend: ScriptedBackend, tmp_path: Path) -> None:
    w = tls_worker()
    sock = connect(w, tmp_path)
    warm(w, sock)
    sock.sendall(b"GET /split-head HTTP/1.1\r\nHo")  # one record
    assert until(lambda: client_of(w).task is not None)  # a greenlet reads the rest
    sock.sendall(b"st: app.test\r\n\r\n")  # another
    assert response(sock)[2] == b"conn 1 /split-head"
    assert until(lambda: parked(w))
    served_in_hub(w, backend, sock)
    sock.close()


def test_half_a_record_leaves_the_connection_parked(
        tls_worker: Any, backend: ScriptedBackend, tmp_path: Path) -> None:
    """A readiness that brings no decrypted byte (OpenSSL wants the rest of the
    record) keeps the connection parked, with no greenlet; the rest is served
    in the hub."""
    w = tls_worker()
    sock = BioClient(w, tmp_path)
    warm(w, sock)
    backend.release.clear()
    record = sock.records(get("/hold"))
    conn = client_of(w)
    wakes = []
    real = conn.stream.obj.read

    class Counting:  # the SSL object, counting the reads the hub makes
        def __getattr__(self, name: str) -> Any:
            return getattr(real.__self__, name)

        def read(self, *args: Any) -> Any:
            wakes.append(1)
            return real(*args)

    conn.stream.obj = Counting()
    for piece in (record[:3], record[3:20]):  # half a header, then half the record
        before = len(wakes)
        sock.sock.sendall(piece)
        assert until(lambda n=before: len(wakes) > n)  # read, nothing decrypted
        assert parked(w) and conn.head_due == 0.0
    sock.sock.sendall(record[20:])
    assert until(lambda: len(backend.requests) == 2) and in_hub(w)
    backend.release.set()
    assert response(sock)[2] == b"conn 1 /hold"
    assert until(lambda: parked(w))
    sock.close()



def test_records_with_no_data_past_the_deadline_close_the_connection(
        tls_worker: Any, backend: ScriptedBackend, tmp_path: Path) -> None:
    """The watchdog leaves a parked connection whose deadline passed to its
    readiness while bytes wait on its socket (`netio.has_come`); a TLS client
    sending all along bytes that decrypt to nothing (half a record here) would
    stay open for ever if that readiness parked it again. With the watchdog
    stopped, only the readiness can close it."""
    w = tls_worker()
    sock = BioClient(w, tmp_path)
    warm(w, sock)
    conn = client_of(w)
    tls_worker.stop_watchdog(w)
    assert parked(w)
    conn.deadline = time.monotonic() - 1  # client_idle passed
    sock.sock.sendall(sock.records(get("/late"))[:3])  # half a record header
    assert until(lambda: gone(w))
    assert sock.sock.recv(100) == b""
    assert backend.paths() == [b"/first"]
    sock.close()


# clients that leave, or break the stream -----------------------------------------
@pytest.mark.parametrize("notify", [True, False])
def test_a_client_leaving_mid_request_is_closed(tls_worker: Any, backend: ScriptedBackend,
                                                tmp_path: Path, notify: bool) -> None:
    w = tls_worker()
    sock = BioClient(w, tmp_path)
    warm(w, sock)
    sock.sendall(b"GET /never-whole HTTP/1.1\r\nHo")
    assert until(lambda: client_of(w).task is not None)
    if notify:
        sock.close_notify()  # then nothing: the TCP connection stays open
        assert sock.sock.recv(100) == b""  # the balancer closed it
    else:
        sock.close()  # a TCP end without close_notify
    assert until(lambda: gone(w))
    assert backend.paths() == [b"/first"]
    assert_released(w, completed=1)


@pytest.mark.parametrize("notify", [True, False])
def test_a_parked_client_leaving_is_closed(tls_worker: Any, backend: ScriptedBackend,
                                           tmp_path: Path, notify: bool) -> None:
    w = tls_worker()
    sock = BioClient(w, tmp_path)
    warm(w, sock)
    if notify:
        sock.close_notify()
        assert sock.sock.recv(100) == b""
    else:
        sock.sock.shutdown(gsocket.SHUT_WR)
        assert sock.sock.recv(100) == b""
    assert until(lambda: gone(w))
    sock.close()


def test_a_client_leaving_while_the_hub_waits_for_its_answer(
        tls_worker: Any, backend: ScriptedBackend, tmp_path: Path) -> None:
    w = tls_worker()
    sock = BioClient(w, tmp_path)
    warm(w, sock)
    backend.release.clear()
    sock.sendall(get("/hold"))
    assert until(lambda: len(backend.requests) == 2) and in_hub(w)
    sock.close_notify()
    sock.close()
    backend.release.set()  # the answer's held write fails; its next read finds the end
    assert until(lambda: gone(w))
    assert_released(w, completed=2)
    other = connect(w, tmp_path)  # the backend connection went back to its pool
    other.sendall(get("/next"))
    assert response(other)[2] == b"conn 1 /next"
    other.close()


@pytest.mark.parametrize("garbage", [
    b"\x17\x03\x03\x00\x20" + b"\x00" * 32,  # application data that does not decrypt
    b"\x15\x03\x03\x00\x02\x02\x28",  # a plaintext alert after the handshake
    b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n",  # not a record at all
], ids=["undecryptable", "plaintext-alert", "not-a-record"])
def test_garbage_records_close_a_parked_connection(tls_worker: Any, backend: ScriptedBackend,
                                                   tmp_path: Path, garbage: bytes) -> None:
    w = tls_worker()
    sock = BioClient(w, tmp_path)
    warm(w, sock)
    sock.sock.sendall(garbage)
    assert until(lambda: gone(w))  # closed from the hub, as the greenlet's read would
    for _ in range(10):  # an alert perhaps, then the end
        try:
            if not sock.sock.recv(100):
                break
        except OSError:
            break
    else:
        raise AssertionError("not closed")
    sock.close()
    assert backend.paths() == [b"/first"]
    assert_released(w, completed=1)
    other = connect(w, tmp_path)  # the worker serves on
    warm(w, other)
    other.close()


# writes ------------------------------------------------------------------------
def test_a_slow_reader_s_answers_arrive_whole_and_in_order(tls_worker: Any,
                                                           backend: ScriptedBackend,
                                                           tmp_path: Path) -> None:
    """Answers held in the hub and encrypted by the outbox's flush fill the
    client's socket: an SSL_write that cannot finish is retried by a greenlet
    with the same bytes (any other retry breaks the record stream: the client's
    reads would fail), and the hub hands over meanwhile."""
    w = tls_worker()
    sock = connect(w, tmp_path, rcvbuf=4096)
    warm(w, sock)
    fill_unread(w, sock, backend)
    sock.sendall(get("/big"))  # larger than the outbox holds: handed over
    assert len(response(sock)[2]) == 200_000
    assert until(lambda: parked(w))
    served_in_hub(w, backend, sock)
    sock.close()


# OpenSSL's want-errors the other way round ----------------------------------------
class Wanting:
    """The connection's SSL object as OpenSSL is while a handshake message is in
    progress (a TLS 1.2 peer's renegotiation; no client of the ssl module can
    start one): its `method` ("write" or "read") raises `error` while OpenSSL
    could not go on (SSLWantRead: no byte came since it asked; SSLWantWrite: the
    socket cannot take a byte), then everything is the real object's. Installed
    where the stream, its writer and gevent's socket hold the real one."""

    def __init__(self, stream: Any, method: str, error: type[ssl.SSLError]) -> None:
        self.real = stream.obj
        self.fd = stream.sock.fileno()
        self.method = method
        self.error = error
        self.raised = 0  # the times it raised
        self.armed = True
        stream.obj = stream.writer.raw = stream.sock._sslobj = self

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def read(self, *args: Any) -> Any:
        if self.method == "read":
            self.want()
        elif self.raised:  # the bytes OpenSSL waited for came (this read takes them)
            self.armed = False
        return self.real.read(*args)

    def write(self, data: Any) -> Any:
        if self.method == "write":
            self.want()
        return self.real.write(data)

    def want(self) -> None:
        if not self.armed:
            return
        poller = select.poll()
        poller.register(self.fd, select.POLLIN if self.error is ssl.SSLWantReadError
                        else select.POLLOUT)
        if poller.poll(0):
            self.armed = False
            return
        self.raised += 1
        raise self.error("The operation did not complete")


@pytest.mark.parametrize("path", ["/held", "/big"], ids=["held-by-the-outbox", "direct"])
def test_an_answer_openssl_can_write_only_after_a_read_goes_out_whole_once_readable(
        tls_worker: Any, backend: ScriptedBackend, tmp_path: Path, path: str) -> None:
    """SSL_write raising SSLWantRead (OpenSSL must read before it writes): the
    same bytes are written again once the socket is readable, neither dropped
    (the outbox's flush dropped a held answer) nor failing the connection (a
    direct write did); the client's next request, which makes it readable, is
    answered after it."""
    w = tls_worker()
    sock = connect(w, tmp_path)
    warm(w, sock)
    obj = Wanting(client_of(w).stream, "write", ssl.SSLWantReadError)
    sock.sendall(get(path))
    assert until(lambda: obj.raised > 0)  # the answer waits for a byte from the client
    sock.sendall(get("/next"))
    status, _, body = response(sock)
    assert (status, body) == (200, b"x" * 200_000 if path == "/big" else b"conn 1 /held")
    assert response(sock)[2] == b"conn 1 /next"
    assert until(lambda: parked(w))
    served_in_hub(w, backend, sock)
    sock.close()
    assert until(lambda: gone(w))
    assert_released(w, completed=4)


def test_an_answer_waiting_for_bytes_that_never_come_ends_with_the_connection_s_deadline(
        tls_worker: Any, backend: ScriptedBackend, tmp_path: Path) -> None:
    """A client that never sends what OpenSSL waits for before it can write: the
    connection is closed at its idle deadline, the send given up with it."""
    w = tls_worker(**{"timeouts.client_idle": 0.5})
    sock = connect(w, tmp_path)
    warm(w, sock)
    obj = Wanting(client_of(w).stream, "write", ssl.SSLWantReadError)
    sock.sendall(get("/held"))
    assert until(lambda: obj.raised > 0)
    assert until(lambda: gone(w))
    with contextlib.suppress(ssl.SSLError):  # an end without close_notify
        assert sock.recv(100) == b""
    sock.close()
    assert_released(w, completed=2)


def test_a_client_that_stops_reading_is_closed_at_its_idle_deadline(
        tls_worker: Any, backend: ScriptedBackend, tmp_path: Path) -> None:
    """As over plain HTTP (tests/test_inline.py): a TLS client whose answers
    fill its socket and that never reads again is closed at its idle deadline."""
    w = tls_worker(**{"timeouts.client_idle": 0.5})
    sock = connect(w, tmp_path, rcvbuf=4096)
    warm(w, sock)
    fill_until_sending(w, sock, backend)
    assert until(lambda: gone(w))
    sock.close()


def test_a_read_openssl_can_make_only_after_a_write_waits_until_the_socket_is_writable(
        tls_worker: Any, backend: ScriptedBackend, tmp_path: Path) -> None:
    """SSL_read raising SSLWantWrite (OpenSSL must first write what the full
    socket cannot take): the greenlet waits for the socket to be writable, not
    readable, and reads again (the connection closed). A client that reads none
    of its answers fills the socket, a greenlet finishing the last held one;
    its next request comes meanwhile."""
    w = tls_worker()
    sock = connect(w, tmp_path, rcvbuf=4096)
    warm(w, sock)
    conn = client_of(w)
    sent = fill_until_sending(w, sock, backend)  # the socket is full
    obj = Wanting(conn.stream, "read", ssl.SSLWantWriteError)
    sock.sendall(get("/after"))
    assert until(lambda: obj.raised > 0)
    assert until(lambda: conn.stream.writer.watcher is not None
                 and conn.stream.writer.watcher.active)  # waits for writability
    assert len(backend.requests) == sent + 1  # not read yet
    for _ in range(sent):
        assert response(sock)[2] == b"z" * 60000
    assert response(sock)[2] == b"conn 1 /after"
    assert obj.raised == 1  # read again only once the socket was writable
    assert until(lambda: parked(w))
    served_in_hub(w, backend, sock)
    sock.close()
    assert until(lambda: gone(w))
    assert_released(w, completed=sent + 3)


@pytest.mark.skipif(COMPILED, reason="patches module globals: runs in the interpreted pass")
def test_a_held_client_s_read_that_must_write_first_keeps_it_held(
        tls_worker: Any, backend: ScriptedBackend, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SSL_read raising SSLWantWrite while a request is held (`has_sent_more`,
    the held client's socket full of answers it has not read): the client is
    not taken as gone (bug: the hold ended as a 499, its answer never sent),
    it is watched no more (as after pipelining) and its next request, read
    after the hold, is answered after the held one. (The worker's holds wait
    on gevent's events, as in a monkey-patched worker.)"""
    for module in (balancer.table, balancer.hold):
        monkeypatch.setattr(module, "threading", SimpleNamespace(Event=gevent.event.Event))
    w = tls_worker(spin=1.0)
    sock = connect(w, tmp_path, rcvbuf=4096)
    warm(w, sock)
    conn = client_of(w)
    sent = fill_until_sending(w, sock, backend)  # the socket is full
    spin = w.stats.host("spin.test")
    sock.sendall(get("/held").replace(b"app.test", b"spin.test"))
    assert until(lambda: spin.spinning == 1)
    obj = Wanting(conn.stream, "read", ssl.SSLWantWriteError)
    sock.sendall(get("/after"))  # the held client's socket stirs
    assert until(lambda: obj.raised > 0)
    # a 499 would end the hold within the loop's next turns: it stays
    assert not until(lambda: spin.spinning != 1 or 499 in spin.codes, seconds=0.1)
    for _ in range(sent):
        assert response(sock)[2] == b"z" * 60000
    status, _, _ = response(sock)
    assert status == 504  # the hold ran its time (1 s)
    assert response(sock)[2] == b"conn 1 /after"
    assert until(lambda: parked(w))
    sock.close()
    assert until(lambda: gone(w))


def test_a_backend_read_that_must_write_first_waits_until_the_socket_is_writable(
        tmp_path: Path) -> None:
    """The relay's reads of an https:// backend's answer raising SSLWantWrite (the
    socket toward the backend full of a request it has not read yet) are not
    the backend gone (bug: BackendClosed, a 502): the hub's `take_ready` hands
    the try to a greenlet (True, nothing parsed), the request body's watch
    stops reading (False), and the greenlet's read waits until the socket is
    writable, then reads the answer."""
    pem = tmp_path / "backend.pem"
    pem.write_text(KEY + CHAIN)
    server_context = gssl.SSLContext(gssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(str(pem))
    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepting = gevent.spawn(lambda: server_context.wrap_socket(listener.accept()[0],
                                                                server_side=True))
    tls = context(tmp_path).wrap_socket(gsocket.create_connection(listener.getsockname()),
                                        server_hostname="app.test")
    server = accepting.get(timeout=5)
    stream = GeventIO().tls_stream(tls)
    upstream = Upstream(stream, "app.test")
    upstream.parser = parser = ResponseParser()
    try:
        for _ in range(2000):  # a request the backend reads none of fills the socket
            try:
                stream.obj.write(b"x" * 65536)
            except ssl.SSLWantWriteError:
                break
        else:
            raise AssertionError("the socket never filled")
        server.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        poller = select.poll()
        poller.register(tls.fileno(), select.POLLIN)
        assert until(lambda: poller.poll(0))
        obj = Wanting(stream, "read", ssl.SSLWantWriteError)
        assert relay.take_ready(upstream) is True and not parser.events  # the hub's
        assert relay._judge_answer(upstream)() is False  # the body's watch
        reader = gevent.spawn(relay._read_after_write, upstream)  # a greenlet's
        assert until(lambda: stream.writer.watcher is not None and stream.writer.watcher.active)
        assert not reader.ready() and obj.raised == 2

        def drain() -> None:  # the backend reads the request at last
            for _ in range(2000):
                server.recv(65536)

        draining = gevent.spawn(drain)
        assert reader.get(timeout=5) == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        assert obj.raised == 2  # read again only once the socket was writable
        draining.kill()
    finally:
        upstream.close()
        server.close()
        listener.close()


# renegotiation and key updates (openssl s_client: the ssl module has neither) -----
OPENSSL = shutil.which("openssl")


@pytest.mark.skipif(OPENSSL is None and os.environ.get("CI") != "true",
                    reason="needs the openssl command")
@pytest.mark.parametrize(("version", "command"), [("-tls1_2", b"R"), ("-tls1_3", b"K"),
                                                  ("-tls1_3", b"k")])
def test_renegotiation_is_refused_and_key_updates_are_served(
        tls_worker: Any, backend: ScriptedBackend, tmp_path: Path, version: str,
        command: bytes) -> None:
    """s_client's R (a TLS 1.2 renegotiation: refused, the connection is served
    on), K and k (TLS 1.3 key updates, read in the hub; K asks the balancer to
    update its own keys too, which OpenSSL 3.0 does with its next write, not
    from the SSL_read that took the request)."""
    w = tls_worker()
    host, port = w.servers[0].address[:2]
    proc = gsubprocess.Popen(
        [OPENSSL or "openssl", "s_client", version, "-connect", f"{host}:{port}",
         "-servername", "app.test", "-CAfile", str(CA.write(tmp_path)), "-crlf"],
        stdin=gsubprocess.PIPE, stdout=gsubprocess.PIPE, stderr=gsubprocess.STDOUT)
    out = b""

    def read_until(marker: bytes, count: int) -> None:
        nonlocal out
        deadline = time.monotonic() + 10
        while out.count(marker) < count:
            assert time.monotonic() < deadline, out[-2000:]
            more = proc.stdout.read1(65536)
            assert more, out[-2000:]
            out += more

    try:
        proc.stdin.write(b"GET /a HTTP/1.1\nHost: app.test\n\n")
        proc.stdin.flush()
        read_until(b"conn 1 /a", 1)
        assert until(lambda: parked(w))
        proc.stdin.write(command + b"\n")
        proc.stdin.flush()
        if command == b"R":  # refused: the alert ends s_client's renegotiation and it
            read_until(b"no renegotiation", 1)  # leaves; the balancer closes its end
            assert proc.wait(timeout=10) is not None
        else:
            read_until(b"KEYUPDATE", 1)
            for n in range(3):  # the next requests are the hub's again
                proc.stdin.write(b"GET /b HTTP/1.1\nHost: app.test\n\n")
                proc.stdin.flush()
                read_until(b"conn 1 /b", n + 1)
                assert until(lambda: parked(w))
    finally:
        proc.stdin.close()
        proc.kill()
        proc.wait()
    assert until(lambda: gone(w))
    assert_released(w, completed=1 if command == b"R" else 4)


# closing after an answer the hub relayed ------------------------------------------
@pytest.mark.parametrize("case", ["connection-close", "draining"])
def test_an_answer_that_closes_the_connection_is_sent_whole_then_closed(
        tls_worker: Any, backend: ScriptedBackend, tmp_path: Path, case: str) -> None:
    """`Connection: close`, or a draining worker: the answer (held, encrypted by
    the outbox or by the greenlet that closes the connection) arrives whole,
    then the end of the stream; counted once."""
    w = tls_worker()
    sock = connect(w, tmp_path)
    warm(w, sock)
    stopper = None
    if case == "draining":
        backend.release.clear()
        sock.sendall(get("/hold"))
        assert until(lambda: len(backend.requests) == 2) and in_hub(w)
        stopper = gevent.spawn(w.stop, 10.0)  # a request in flight in the hub: answered
        assert until(lambda: w.draining)
        backend.release.set()
        assert response(sock)[2] == b"conn 1 /hold"
        sock.sendall(get("/last"))  # began while draining: answered, then closed
    else:
        sock.sendall(get("/last", "Connection: close\r\n"))
    status, fields, body = response(sock)
    assert (status, body, fields["connection"]) == (200, b"conn 1 /last", "close")
    assert sock.recv(10) == b""
    if stopper is not None:
        stopper.join(timeout=10)
        assert stopper.dead
    assert until(lambda: gone(w))
    assert_released(w, completed=3 if case == "draining" else 2)
