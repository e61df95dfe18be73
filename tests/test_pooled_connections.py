"""A backend that writes on an idle pooled connection (a stray response, a
`408` before closing, or just EOF): those bytes belong to no request, so the
balancer drops that connection and the next request, from another client,
gets its own response over a fresh one. Raw-socket scripted backend, a real
balancer, real clients."""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest

from tests.rawpeer import serve_each
from tests.support import Balancer, request

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

POISON = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON"
TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
               b"Content-Length: 15\r\n\r\nRequest Timeout")

class StrayBackend:
    """Answers each request with its path and connection number; after the first
    connection's first response, once the test sets `pooled` (its client has the
    response, so the balancer has parked the connection in its pool), it does
    `stray` ("poison", "408" or "eof") on that idle connection."""

    def __init__(self, stray: str) -> None:
        self.stray = stray
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
        return f"127.0.0.1:{self.port}"

    def serve(self, sock: socket.socket) -> None:
        sock.settimeout(10)
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


@pytest.mark.parametrize("stray", ["poison", "408", "eof"])
def test_bytes_on_an_idle_pooled_connection_never_reach_the_next_client(tmp_path,
                                                                        stray: str) -> None:
    backend = StrayBackend(stray)
    bal = Balancer(tmp_path, {"app.test": {"action": "proxy", "backends": [backend.address]}},
                   args=["--workers", "1"])
    try:
        status, _, body = request(bal.port, path="/a")
        assert (status, body) == (200, b"conn 1 /a")
        # The balancer read the whole response before the client got it, and parks the
        # connection in the pool before it next waits: what the backend sends from now
        # on arrives on an idle pooled connection.
        backend.pooled.set()
        assert backend.strayed.wait(10)
        status, headers, body = request(bal.port, path="/b")  # another client
        assert (status, body) == (200, b"conn 2 /b"), body
        assert headers["x-request-id"]
        if stray == "poison":  # the backend kept it open: the balancer closed it
            assert backend.closed_by_peer.wait(10)
        assert backend.served == [(1, b"/a"), (2, b"/b")]
        status, _, body = request(bal.port, path="/c")  # the fresh one is pooled as usual
        assert (status, body) == (200, b"conn 2 /c")
        stats = bal.host_stats("app.test")
        assert stats["completed_requests"] == stats["responses"]["2xx"] == 3
    finally:
        bal.stop()
        backend.close()
