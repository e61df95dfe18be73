"""Hostile probes of upgraded tunnels (101), through real sockets: both sides
silent, one side half-closed and the other silent, a backend writing at full
speed to a client that reads nothing, a 101 with bytes after its head, a 101
to an HTTP/1.0 request. Each tunnel ends by `tunnel_idle` at the latest, the
worker's memory stays bounded, its descriptors and its `tunnels` count come
back, and it keeps serving.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.rawpeer import read_through, serve_each
from tests.support import Balancer, wait_for

HOST = "ws.test"
IDLE = 1.0  # timeouts.tunnel_idle
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"


class Scripted:
    """A backend answering every request 101 (whatever it asked), then by path:
    /silent says nothing, /half waits for the client's EOF and then says
    nothing, /flood writes as fast as it can, /body sends bytes after the head."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.seen: dict[str, object] = {}
        self.ended = threading.Event()
        serve_each(self.listener, self.serve)

    def serve(self, conn: socket.socket) -> None:
        conn.settimeout(20)
        with conn:
            head = read_through(conn) or b""
            path = head.split(b" ")[1].decode() if head else ""
            conn.sendall(SWITCH + (b"Content-Length: 5\r\n\r\nhello, after" if path == "/body"
                                   else b"\r\n"))
            self.seen[path] = getattr(self, "on_" + path.strip("/"), self.on_silent)(conn)
        self.ended.set()

    def on_silent(self, conn: socket.socket) -> object:
        return conn.recv(1)  # b"": the balancer closed it (at tunnel_idle)

    def on_half(self, conn: socket.socket) -> object:
        self.seen["half-eof"] = conn.recv(1)  # the client's half-close, forwarded
        time.sleep(IDLE + 3)  # silent meanwhile, its side open
        return None

    def on_flood(self, conn: socket.socket) -> object:
        sent = 0
        try:
            while True:
                sent += conn.send(b"z" * 65536)
        except OSError as exc:
            return sent, type(exc).__name__

    def stop(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Balancer, Scripted]]:
    backend = Scripted()
    bal = Balancer(tmp_path_factory.mktemp("tunnel"),
                   {HOST: {"action": "proxy", "backends": [backend.address]}},
                   env={"BALANCER_TIMEOUTS_TUNNEL_IDLE": str(IDLE)})
    yield bal, backend
    bal.stop()
    backend.stop()


def worker(bal: Balancer) -> int:
    return bal.api("GET", "/api/v1/info")[1]["processes"][0]["pid"]


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    status = open(f"/proc/{pid}/status").read()  # noqa: SIM115 - one read
    return int(status.split("VmRSS:")[1].split()[0])


def upgrade(bal: Balancer, path: str, version: bytes = b"1.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", bal.port), timeout=10)
    sock.sendall(b"GET %s HTTP/%s\r\nHost: ws.test\r\nConnection: Upgrade\r\n"
                 b"Upgrade: websocket\r\n\r\n" % (path.encode(), version))
    return sock


def until_closed(sock: socket.socket, limit: float = 10.0) -> tuple[bytes, float]:
    """Everything `sock` receives until the balancer closes it, and how long that took."""
    started = time.monotonic()
    data = b""
    sock.settimeout(limit)
    while more := sock.recv(65536):
        data += more
    return data, time.monotonic() - started


def tunnels(bal: Balancer, backend: Scripted) -> int:
    backends = bal.host_stats(HOST).get("backends", {})
    return backends.get(backend.address, {}).get("tunnels", 0)


def all_back(bal: Balancer, backend: Scripted, before: int) -> None:
    wait_for(lambda: tunnels(bal, backend) == 0, what="no tunnel open")
    wait_for(lambda: fds(worker(bal)) <= before, what=f"the worker back to {before} fds")
    sock = upgrade(bal, "/silent")  # still tunnelling
    assert sock.recv(12) == b"HTTP/1.1 101"
    sock.close()


def test_both_sides_silent_ends_at_tunnel_idle(site) -> None:
    bal, backend = site
    before = fds(worker(bal))
    sock = upgrade(bal, "/silent")
    data, took = until_closed(sock)
    sock.close()
    assert data.startswith(b"HTTP/1.1 101 ") and data.endswith(b"\r\n\r\n")
    assert IDLE <= took < IDLE + 2
    wait_for(lambda: backend.seen.get("/silent") == b"", what="the backend's side closed")
    all_back(bal, backend, before)


def test_a_half_close_then_silence_ends_at_tunnel_idle(site) -> None:
    bal, backend = site
    before = fds(worker(bal))
    sock = upgrade(bal, "/half")
    assert read_through(sock) is not None
    sock.shutdown(socket.SHUT_WR)
    rest, took = until_closed(sock)
    sock.close()
    assert rest == b"" and IDLE * 0.9 <= took < IDLE + 2  # the backend still silent, open
    all_back(bal, backend, before)
    assert backend.seen["half-eof"] == b""  # the client's EOF was forwarded


def test_a_flood_to_a_client_reading_nothing_keeps_memory_bounded(site) -> None:
    """The tunnel relays 64 KiB at a time: what the backend writes beyond the
    sockets' buffers waits in the backend's; nothing piles up in the worker.
    The client never reads, so the tunnel sees no byte move for tunnel_idle
    and ends."""
    bal, backend = site
    pid = worker(bal)
    before, rss = fds(pid), rss_kib(pid)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", bal.port))
    sock.sendall(b"GET /flood HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\n"
                 b"Upgrade: websocket\r\n\r\n")
    try:
        wait_for(lambda: "/flood" in backend.seen, timeout=IDLE + 5, what="the tunnel's end")
        sent, ended = backend.seen["/flood"]  # type: ignore[misc]
        assert ended in ("BrokenPipeError", "ConnectionResetError")
        assert sent < 16 << 20  # socket buffers' worth, not a stream into memory
        assert rss_kib(pid) - rss < 8 << 10
    finally:
        sock.close()
    all_back(bal, backend, before)


def test_a_101_with_bytes_after_its_head_passes_them_on(site) -> None:
    bal, backend = site
    sock = upgrade(bal, "/body")
    data, _ = until_closed(sock)
    sock.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ") and b"Content-Length" not in head
    assert rest == b"hello, after"  # tunnel bytes: no body of the 101's


def test_a_101_to_an_http_1_0_request_is_a_bad_gateway(site) -> None:
    """The Upgrade of an HTTP/1.0 request is not forwarded (RFC 9110 §7.8), so a
    101 answers a request that asked for none; no 101 may reach a 1.0 client."""
    bal, backend = site
    before = fds(worker(bal))
    sock = upgrade(bal, "/silent", b"1.0")
    data, _ = until_closed(sock)
    sock.close()
    assert data.startswith(b"HTTP/1.1 502 ") and b" 101 " not in data
    all_back(bal, backend, before)


def test_a_tunnel_open_at_sigterm_ends_with_the_drain_cleanly(tmp_path) -> None:
    """Bug: the worker closes the connections still open when its drain ends,
    a tunnel's under its pumps; a pump then died with "negative file
    descriptor" and a traceback in the log."""
    backend = Scripted()
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [backend.address]}},
                   env={"BALANCER_TIMEOUTS_GRACEFUL": "1"})
    try:
        sock = upgrade(bal, "/silent")
        assert read_through(sock) is not None
        bal.proc.send_signal(signal.SIGTERM)
        rest, took = until_closed(sock)
        sock.close()
        assert rest == b"" and took < 5
        assert bal.proc.wait(10) == 0
        assert "Traceback" not in bal.output() and "Error" not in bal.output()
    finally:
        bal.stop()
        backend.stop()
