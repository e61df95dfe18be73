"""Idle pooled backend connections are closed by the worker, not kept until
the next request: those past `timeouts.backend_idle` by its sweep, and those
on which the backend wrote or closed at once (no CLOSE_WAIT left), long before
the next sweep. A raw-socket backend that counts its open connections, a real
balancer, real clients; and the sweep's bookkeeping (plain and TLS lists,
`IdleBudget.idle`) on real sockets."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from tests.rawpeer import serve_each
from tests.support import Balancer, acquire, in_threads, request, wait_for

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

BURST = 20  # concurrent requests: as many backend connections pooled at once
STRAY = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON"
CLOSE_WAIT = "08"  # the state column of /proc/net/tcp


class CountingBackend:
    """Answers keep-alive requests; `/burst` requests are answered only once
    BURST of them arrived (so each has its own connection). Counts the
    connections open (until the balancer closes them) and, once the test sets
    `answered` (every client had its response: the connection is pooled),
    optionally `after`s the idle connection: "close" (FIN) or "stray" (bytes)."""

    def __init__(self, after: str = "") -> None:
        self.after = after
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=BURST * 2)
        self.port = self.listener.getsockname()[1]
        self.barrier = threading.Barrier(BURST)
        self.answered = threading.Event()
        self.lock = threading.Lock()
        self.accepted = 0
        self.open = 0
        self.idle_for: list[float] = []  # last response to the balancer's close, seconds
        serve_each(self.listener, self.serve)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def serve(self, sock: socket.socket) -> None:
        with self.lock:
            self.accepted += 1
            self.open += 1
        sock.settimeout(20)
        answered = 0.0
        with sock, contextlib.suppress(OSError):
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:  # the balancer closed it
                    self.idle_for.append(time.monotonic() - answered)
                    break
                data += chunk
                if b"\r\n\r\n" not in data:
                    continue
                head, _, data = data.partition(b"\r\n\r\n")
                if head.split(b" ", 2)[1] == b"/burst":
                    with contextlib.suppress(threading.BrokenBarrierError):
                        self.barrier.wait(10)
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                answered = time.monotonic()
                if self.after:
                    assert self.answered.wait(20), "the test never set `answered`"
                    if self.after == "close":
                        break
                    sock.sendall(STRAY)
        with self.lock:
            self.open -= 1

    def close(self) -> None:
        self.listener.close()


def close_waits(port: int) -> int:
    """Loopback TCP connections to `port` in CLOSE_WAIT (the backend closed,
    its peer did not)."""
    count = 0
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == CLOSE_WAIT:
                count += 1
    return count


def burst(bal: Balancer) -> None:
    answers = [f.result(20) for f in in_threads(BURST, lambda: request(bal.port, path="/burst"))]
    assert [(status, body) for status, _, body in answers] == [(200, b"ok")] * BURST


def test_idle_connections_past_the_idle_timeout_are_closed(tmp_path) -> None:
    backend = CountingBackend()
    bal = Balancer(tmp_path, {"app.test": {"action": "proxy", "backends": [backend.address]}},
                   args=["--workers", "1"], config="[timeouts]\nbackend_idle = 1.0\n")
    try:
        burst(bal)
        assert backend.accepted == BURST
        wait_for(lambda: backend.open == 0, timeout=5,
                 what="the balancer to close its idle connections")
        assert len(backend.idle_for) == BURST
        assert min(backend.idle_for) >= 0.95, backend.idle_for  # kept for backend_idle
        status, _, body = request(bal.port, path="/after")  # still served, on a new one
        assert (status, body) == (200, b"ok")
        assert backend.accepted == BURST + 1
        assert "Traceback" not in bal.output()
    finally:
        bal.stop()
        backend.close()


@pytest.mark.parametrize("after", ["close", "stray"])
def test_idle_connections_the_backend_closed_or_wrote_on_are_closed_at_once(
        tmp_path, after: str) -> None:
    backend = CountingBackend(after)
    # backend_idle 30 s: the sweep runs every 5 s, so only what arrived can
    # have closed them within a second
    bal = Balancer(tmp_path, {"app.test": {"action": "proxy", "backends": [backend.address]}},
                   args=["--workers", "1"])
    try:
        burst(bal)
        start = time.monotonic()
        backend.answered.set()  # the backend acts now, on pooled connections
        wait_for(lambda: backend.open == 0 and close_waits(backend.port) == 0, timeout=5,
                 what="no connection left open or in CLOSE_WAIT")
        assert time.monotonic() - start < 1.2, time.monotonic() - start
        status, _, body = request(bal.port, path="/after")
        assert (status, body) == (200, b"ok")
        assert backend.accepted == BURST + 1  # none of the stirred ones was reused
        assert "Traceback" not in bal.output()
    finally:
        bal.stop()
        backend.close()


def test_the_sweep_keeps_the_idle_count_right_in_plain_and_tls_lists() -> None:
    from balancer.pool import BackendRegistry, IdleBudget, Upstream

    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    budget = IdleBudget()
    registry = BackendRegistry(connect_timeout=5, fail_timeout=10, idle_timeout=1.0,
                               budget=budget)
    backend = registry.get(f"127.0.0.1:{listener.getsockname()[1]}")
    try:
        plain = [backend.connect() for _ in range(3)]
        tls = [Upstream(backend.connect().stream, "app.test") for _ in range(2)]
        peers = {}
        for _ in range(5):
            sock, address = listener.accept()
            peers[address] = sock
        for upstream in plain + tls:
            backend.release(upstream)
        assert budget.idle == 5 and len(backend.idle_tls["app.test"]) == 2
        assert registry.sweep() == 0  # fresh and quiet: all kept
        plain[0].since -= 2.0  # past the idle timeout
        peers[plain[1].sock.getsockname()].close()  # EOF while idle
        peers[tls[0].sock.getsockname()].sendall(STRAY)  # bytes while idle
        tls[1].since -= 2.0
        swept = [0]

        def sweep() -> bool:
            swept[0] += registry.sweep()
            return swept[0] == 4
        wait_for(sweep, timeout=2, what="the sweep")
        assert budget.idle == 1 and backend.pooled() == [plain[2]]
        assert "app.test" not in backend.idle_tls  # an empty TLS list goes
        assert [u.sock.fileno() for u in (plain[0], plain[1], *tls)] == [-1] * 4
        upstream, reused = acquire(backend)
        assert reused and upstream is plain[2] and budget.idle == 0
        upstream.close()
    finally:
        listener.close()
        for sock in peers.values():
            sock.close()


def test_dropping_stirred_connections_keeps_the_idle_count_right() -> None:
    from balancer.pool import BackendRegistry, IdleBudget, Upstream

    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    budget = IdleBudget()
    registry = BackendRegistry(connect_timeout=5, fail_timeout=10, budget=budget)
    backend = registry.get(f"127.0.0.1:{listener.getsockname()[1]}")
    try:
        plain = [backend.connect() for _ in range(3)]
        tls = [Upstream(backend.connect().stream, "app.test")]
        peers = [listener.accept()[0] for _ in range(4)]
        for upstream in plain + tls:
            backend.release(upstream)
        by_port = {peer.getpeername()[1]: peer for peer in peers}
        for upstream in (plain[0], plain[2], tls[0]):  # the backend closes these (EOF)
            by_port[upstream.sock.getsockname()[1]].close()
        closed = (plain[0], plain[2], tls[0])
        wait_for(lambda: not any(u.stream.is_clean() for u in closed), timeout=2,
                 what="the EOFs")
        stirred = {plain[0], plain[1], plain[2], tls[0]}  # plain[1]: quiet, kept
        taken, _ = acquire(backend)  # the newest, plain[2], is closed on the way
        assert taken is plain[1] and plain[2].sock.fileno() == -1 and budget.idle == 2
        assert backend.drop(stirred) == 2  # plain[0] and tls[0]; plain[2] went already
        assert budget.idle == 0 and backend.pooled() == [] and "app.test" not in backend.idle_tls
        backend.release(taken)
        assert backend.drop(stirred) == 0 and backend.pooled() == [plain[1]]  # quiet: kept
        taken.close()
    finally:
        listener.close()
        for peer in peers:
            peer.close()


def test_idle_tls_connections_past_the_idle_timeout_are_closed(tmp_path) -> None:
    from tests.tlsbackend import TLSBackend
    from tests.tlsca import TestCA

    ca = TestCA()
    backend = TLSBackend(ca, tmp_path, "app.test", name="tls")
    config = (f'[tls]\nbackend_ca_bundle = "{ca.write(tmp_path)}"\n'
              "[timeouts]\nbackend_idle = 1.0\n")
    bal = Balancer(tmp_path, {"app.test": {"action": "proxy", "backends": [backend.url]}},
                   args=["--workers", "1"], config=config)
    try:
        answers = [f.result(20)
                   for f in in_threads(4, lambda: request(bal.port, path="/slow?s=0.3"))]
        assert [status for status, _, _ in answers] == [200] * 4
        assert backend.accepted >= 2 and backend.connections  # several, pooled
        wait_for(lambda: not backend.connections, timeout=5,
                 what="the balancer to close its idle TLS connections")
        accepted = backend.accepted
        assert request(bal.port)[0] == 200  # still served, on a new one
        assert backend.accepted == accepted + 1
    finally:
        bal.stop()
        backend.stop()


def test_an_idle_tls_connection_the_backend_wrote_on_is_closed_at_once(tmp_path) -> None:
    from tests.tlsbackend import TLSBackend
    from tests.tlsca import TestCA

    ca = TestCA()
    backend = TLSBackend(ca, tmp_path, "app.test", name="tls")
    config = f'[tls]\nbackend_ca_bundle = "{ca.write(tmp_path)}"\n'  # sweeps every 5 s
    bal = Balancer(tmp_path, {"app.test": {"action": "proxy", "backends": [backend.url]}},
                   args=["--workers", "1"], config=config)
    try:
        assert request(bal.port, path="/stray?after=0.2")[0] == 200
        assert len(backend.connections) == 1  # pooled
        wait_for(lambda: backend.strays == 1, timeout=5, what="the stray 408 while idle")
        start = time.monotonic()
        wait_for(lambda: not backend.connections, timeout=5,
                 what="the balancer to close the stirred TLS connection")
        assert time.monotonic() - start < 1.0, time.monotonic() - start
        assert request(bal.port)[0] == 200
        assert backend.accepted == 2  # the stirred one was not reused
    finally:
        bal.stop()
        backend.stop()
