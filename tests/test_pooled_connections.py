"""A backend that writes on an idle pooled connection (a stray response, a
`408` before closing, or just EOF): those bytes belong to no request, so the
balancer drops that connection and the next request, from another client,
gets its own response over a fresh one. Raw-socket scripted backend, a real
balancer, real clients."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.rawpeer import read_through, serve_each
from tests.support import Balancer, request
from tests.tlsbackend import server_context
from tests.tlsca import TestCA

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

POISON = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON"
TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
               b"Content-Length: 15\r\n\r\nRequest Timeout")

class StrayBackend:
    """Answers each request with its path and connection number; after the first
    connection's first response, once the test sets `pooled` (its client has the
    response, so the balancer has parked the connection in its pool), it does
    `stray` ("poison", "408" or "eof") on that idle connection."""

    def __init__(self, stray: str, tls: ssl.SSLContext | None = None) -> None:
        self.stray = stray
        self.tls = tls  # a TLS backend (its handshake in the connection's thread)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.served: list[tuple[int, bytes]] = []  # (connection, path)
        self.pooled = threading.Event()  # set by the test: the first connection is idle
        self.strayed = threading.Event()  # the stray write was made
        self.closed_by_peer = threading.Event()  # the balancer closed the stray connection
        self.lock = threading.Lock()
        serve_each(self.listener, self.serve)

    @property
    def address(self) -> str:
        return f"{'https://' if self.tls else ''}127.0.0.1:{self.port}"

    def serve(self, sock: socket.socket) -> None:
        sock.settimeout(10)
        if self.tls is not None:
            with contextlib.suppress(OSError):
                sock = self.tls.wrap_socket(sock, server_side=True)
        numbered: list[int] = []  # the connection's number, once its first request came
        with sock:
            with contextlib.suppress(OSError):  # a reset: closed with POISON unread
                self.answer(sock, numbered)
            if numbered == [1] and self.strayed.is_set():
                self.closed_by_peer.set()

    def number(self) -> int:
        with self.lock:
            self.connections += 1
            return self.connections

    def answer(self, sock: socket.socket, numbered: list[int]) -> None:
        """Answer requests until EOF (or the stray, unless it leaves the connection
        open). The connection is numbered at its first request, not at accept: one
        with no request is no balancer's (under `pytest -n 4`, another test's probe
        of a port it had picked and left free, which this backend then bound)."""
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, data = data.partition(b"\r\n\r\n")
            if not numbered:
                numbered.append(self.number())
            number = numbered[0]
            path = head.split(b" ", 2)[1]
            self.served.append((number, path))
            body = b"conn %d %s" % (number, path)
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            if number == 1 and len(self.served) == 1:
                self.misbehave(sock)

    def misbehave(self, sock: socket.socket) -> None:
        assert self.pooled.wait(10), "the test never set `pooled`"
        if self.stray == "poison":
            sock.sendall(POISON)
        elif self.stray == "408":
            sock.sendall(TIMEOUT_408)
            sock.shutdown(socket.SHUT_WR)
        else:
            sock.shutdown(socket.SHUT_WR)
        self.strayed.set()

    def close(self) -> None:
        self.listener.close()


STRAYS = ("poison", "408", "eof")


CA = TestCA()


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, StrayBackend]]:
    """A `StrayBackend` per stray, and one for the stray after the loop's last look
    (plain, and over TLS: "late-tls")."""
    peers = {stray: StrayBackend(stray) for stray in (*STRAYS, "late")}
    tls = server_context(CA, tmp_path_factory.mktemp("stray-tls"), "late-tls.test")
    peers["late-tls"] = StrayBackend("poison", tls)
    yield peers
    for peer in peers.values():
        peer.close()


@pytest.fixture(scope="module")
def bal(tmp_path_factory: pytest.TempPathFactory,
        backends: dict[str, StrayBackend]) -> Iterator[Balancer]:
    """One worker; `STRAY.test` proxies to the backend of STRAY, `static.test`
    answers in the balancer."""
    hosts: dict[str, Any] = {f"{stray}.test": {"action": "proxy", "backends": [peer.address]}
                             for stray, peer in backends.items()}
    hosts["static.test"] = {"action": "static", "body": "filler"}
    tmp = tmp_path_factory.mktemp("pooled")
    balancer = Balancer(tmp, hosts, args=["--workers", "1"],
                        config=f'[tls]\nbackend_ca_bundle = "{CA.write(tmp)}"\n')
    yield balancer
    balancer.stop()


@pytest.mark.parametrize("stray", STRAYS)
def test_bytes_on_an_idle_pooled_connection_never_reach_the_next_client(
        bal: Balancer, backends: dict[str, StrayBackend], stray: str) -> None:
    backend, host = backends[stray], f"{stray}.test"
    status, _, body = request(bal.port, path="/a", host=host)
    assert (status, body) == (200, b"conn 1 /a")
    # The balancer read the whole response before the client got it, and parks the
    # connection in the pool before it next waits: what the backend sends from now
    # on arrives on an idle pooled connection.
    backend.pooled.set()
    assert backend.strayed.wait(10)
    status, headers, body = request(bal.port, path="/b", host=host)  # another client
    assert (status, body) == (200, b"conn 2 /b"), body
    assert headers["x-request-id"]
    if stray == "poison":  # the backend kept it open: the balancer closed it
        assert backend.closed_by_peer.wait(10)
    assert backend.served == [(1, b"/a"), (2, b"/b")]
    status, _, body = request(bal.port, path="/c", host=host)  # the fresh one is pooled
    assert (status, body) == (200, b"conn 2 /c")
    stats = bal.host_stats(host)
    assert stats["completed_requests"] == stats["responses"]["2xx"] == 3


FILLERS = 80  # client connections made ready between the request's and the stray's


def one_answer(sock: socket.socket) -> bytes:
    """The body of the next Content-Length response read from `sock`."""
    data = read_through(sock)
    assert data is not None, "closed before an answer"
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().partition(b"content-length:")[2].split(b"\r\n")[0])
    while len(body) < length:
        more = sock.recv(65536)
        assert more, "closed mid-answer"
        body += more
    return body


@pytest.mark.parametrize("name", ["late", "late-tls"])
def test_a_stray_answer_after_the_loops_last_look_never_reaches_the_next_get(
        bal: Balancer, backends: dict[str, StrayBackend], name: str) -> None:
    """The backend writes a whole spare response on its idle pooled connection
    after the worker last polled it, in the same loop iteration as the next GET
    is served: the worker is stopped while the GET, then 80 other clients' ends,
    then the stray arrive, so that its next `epoll_wait` (libev asks for 64
    events at first) returns the GET and not the stray. The pool's readiness
    watch cannot see that stray: the pooled connection is peeked at before any
    request goes on it (before 2026-12-07 a GET's was not, and the GET got
    `POISON` as its answer). Over TLS ("late-tls") the TCP socket under
    OpenSSL is peeked at: OpenSSL reads one record at a time, so a stray
    record (or a `close_notify`) waits there, not in OpenSSL. (That case
    fails if the pool hands the connection out without a look; a look by
    the readiness watch alone passes it too: the watch had seen the stray.)"""
    backend = backends[name]
    fillers: list[socket.socket] = []
    [worker] = [p["pid"] for p in bal.api("GET", "/api/v1/info")[1]["processes"]]
    try:
        client = socket.create_connection(("127.0.0.1", bal.port), timeout=10)
        fillers.append(client)
        client.sendall(b"GET /a HTTP/1.1\r\nHost: %s.test\r\n\r\n" % name.encode())
        assert one_answer(client) == b"conn 1 /a"
        for _ in range(FILLERS):  # accepted and served, then idle (parked)
            sock = socket.create_connection(("127.0.0.1", bal.port), timeout=10)
            fillers.append(sock)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: static.test\r\n\r\n")
            assert read_through(sock, b"filler") is not None
        os.kill(worker, signal.SIGSTOP)
        try:
            client.sendall(b"GET /b HTTP/1.1\r\nHost: %s.test\r\n\r\n" % name.encode())
            for sock in fillers[1:]:
                sock.close()
            backend.pooled.set()  # the stray goes now, last
            assert backend.strayed.wait(10)
        finally:
            os.kill(worker, signal.SIGCONT)
        assert one_answer(client) == b"conn 2 /b"  # (not POISON)
        assert backend.served == [(1, b"/a"), (2, b"/b")]
    finally:
        for sock in fillers:
            sock.close()
