"""Interoperability probes with what users run (2026-12-07): a client that hangs
up while its request waits on its backend (a long poll, a quiet event stream:
a tab closed) frees its backend connection within about a second, as nginx
does, not after `timeouts.backend_read` (HAProxy 2.6 keeps it until its server
timeout); the request is a 499 and not the backend's failure. A tunnel's
half-close and a quick answer to a half-closed client are unchanged, and so
are a request pipelined behind one that waits and an upload whose client
half-closed after its body while the backend still read it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.rawpeer import RawBackend, read_through, serve_each
from tests.support import Balancer, wait_for
from tests.test_tls import client_context, put_cert, tls_connect

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

WAIT = 5.0  # seconds any step may take before the test fails
# the watchdog watches a client after its request waited 1 s (HANG_UP_AFTER) and
# polls every 0.25 s; the backend's read timeout is 60 s
GONE_WITHIN = 2.5


class Abandoned:
    """A backend that takes a request, sends `first` (maybe nothing) and then
    waits for the balancer to end the connection: when it did, in `ended`."""

    def __init__(self, first: bytes = b"") -> None:
        self.first = first
        self.got = threading.Event()
        self.closed = threading.Event()
        self.ended = 0.0
        self.backend = RawBackend(self.script, timeout=WAIT)

    def script(self, conn: socket.socket, request: bytes) -> bool:
        if self.first:
            conn.sendall(self.first)
        self.got.set()
        conn.settimeout(WAIT)
        try:
            if conn.recv(1) == b"":
                self.ended = time.monotonic()
                self.closed.set()
        except OSError:  # (a reset is an end too)
            self.ended = time.monotonic()
            self.closed.set()
        return False


PEERS = {"poll.test": b"",
         "stream.test": b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n7\r\ndata: 1\r\n",
         "tls.test": b""}


# how long `Slow` takes up nothing of a request past its head: longer than the
# watchdog takes to watch a waiting request (HANG_UP_AFTER, 1 s, and a tick)
SLOW = 1.4


class Slow:
    """A backend that reads a request's head, then nothing for SLOW seconds (an
    upload's body waits in the buffers), then the body, and answers it 0.4 s
    later (past a watchdog's tick) with how many body bytes came; then again
    for each request on the connection (a request for /quick at once)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        serve_each(self.listener, self.serve)

    def serve(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        with conn:
            data = b""
            while True:
                got = read_through(conn, b"\r\n\r\n")
                if got is None:
                    return
                data += got
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(head.lower().partition(b"content-length:")[2].split(b"\r")[0] or 0)
                quick = b" /quick " in head.partition(b"\r\n")[0]
                time.sleep(0 if quick else SLOW)
                while len(body) < length:
                    more = conn.recv(1 << 20)
                    if not more:
                        return
                    body += more
                time.sleep(0 if quick else 0.4)
                answer = b"got %d" % length
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(answer), answer))
                data = body[length:]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Balancer, Path, dict]]:
    """One balancer (plain and TLS listeners) in front of an `Abandoned` per host,
    and of a `Slow` for slow.test."""
    tmp = tmp_path_factory.mktemp("probe-interop")
    peers = {host: Abandoned(first) for host, first in PEERS.items()}
    slow = Slow()
    hosts = {host: {"action": "proxy", "backends": [peer.backend.address]}
             for host, peer in peers.items()}
    hosts["slow.test"] = {"action": "proxy", "backends": [slow.address]}
    routes = tmp / "routes.json"
    routes.write_text(json.dumps({"version": 1, "hosts": hosts}))
    put_cert(routes, "tls.test")
    bal = Balancer(tmp, args=["--tls-listen", "127.0.0.1:0"])
    yield bal, tmp, peers
    bal.stop()
    slow.listener.close()
    for peer in peers.values():
        peer.backend.stop()


def read_all(client: socket.socket) -> bytes:
    """What `client` receives until its peer closes."""
    data = b""
    while more := client.recv(65536):
        data += more
    return data


def hang_up_after(client: socket.socket, host: str, peer: Abandoned, marker: bytes = b"") -> float:
    """Send a request on `client`, read until `marker`, hang up; when it hung up."""
    client.sendall(b"GET /events HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
    assert peer.got.wait(WAIT), "the request never reached the backend"
    data = b""
    while marker not in data:
        chunk = client.recv(65536)
        assert chunk, data
        data += chunk
    client.close()
    return time.monotonic()


def assert_freed(bal: Balancer, host: str, peer: Abandoned, hung_up: float) -> dict[str, Any]:
    """The backend connection ended soon after the client's; the request counted,
    not as the backend's failure; the host's stats."""
    assert peer.closed.wait(GONE_WITHIN + 1.0), \
        "the backend connection outlived its client (held until backend_read)"
    assert peer.ended - hung_up < GONE_WITHIN, peer.ended - hung_up
    stats: dict[str, Any] = {}

    def counted() -> bool:
        stats.update(bal.host_stats(host))
        return stats.get("completed_requests") == 1
    wait_for(counted, WAIT, what="the request counted")
    backend = stats["backends"][peer.backend.address]
    assert backend["failures"] == 0 and backend["state"] == "up", backend
    return stats


def test_a_long_poll_whose_client_hangs_up_frees_its_backend(stack) -> None:
    bal, _tmp, peers = stack
    client = socket.create_connection(("127.0.0.1", bal.port), timeout=WAIT)
    stats = assert_freed(bal, "poll.test", peers["poll.test"],
                         hang_up_after(client, "poll.test", peers["poll.test"]))
    assert stats["responses"]["4xx"] == 1  # a 499


def test_a_quiet_event_stream_whose_client_hangs_up_frees_its_backend(stack) -> None:
    bal, _tmp, peers = stack
    client = socket.create_connection(("127.0.0.1", bal.port), timeout=WAIT)
    peer = peers["stream.test"]
    assert_freed(bal, "stream.test", peer, hang_up_after(client, "stream.test", peer, b"data: 1"))


def test_a_tls_client_that_hangs_up_frees_its_backend(stack) -> None:
    """The TLS path (a greenlet's, not the hub's) is watched the same way."""
    bal, tmp, peers = stack
    client = tls_connect(bal.ports["tls"], "tls.test", client_context(tmp))
    assert_freed(bal, "tls.test", peers["tls.test"],
                 hang_up_after(client, "tls.test", peers["tls.test"]))


def test_an_upload_half_closed_after_its_body_is_answered(stack) -> None:
    """A client that sends its whole body and half-closes (`nc -N`, an HTTP/1.0
    tool) while the backend has not read it yet is still sending as far as the
    balancer knows: not watched until the body is read, then given its second
    like any request. Before: cut (499) 1 s after the request's start, the body
    half sent."""
    bal, _tmp, _peers = stack
    # past what the buffers to the backend hold (the balancer's send buffer grows
    # to 4 MB): the balancer reads the end of the body, and the client's end with
    # it, only once the backend reads (else it waits on the backend with the
    # whole request, its client's end there: taken as gone after its second)
    size = 8_000_000
    client = socket.create_connection(("127.0.0.1", bal.port), timeout=WAIT)
    client.sendall(b"PUT /up HTTP/1.1\r\nHost: slow.test\r\nConnection: close\r\n"
                   b"Content-Length: %d\r\n\r\n" % size)
    client.sendall(b"x" * size)
    client.shutdown(socket.SHUT_WR)
    answer = read_all(client)
    client.close()
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"got %d" % size), answer


def test_a_request_pipelined_behind_a_waiting_one_is_no_hang_up(stack) -> None:
    """Bytes the client sent after its request (its next one) are no end of it:
    both answered, in order."""
    bal, _tmp, _peers = stack
    client = socket.create_connection(("127.0.0.1", bal.port), timeout=WAIT)
    client.sendall(b"GET /1 HTTP/1.1\r\nHost: slow.test\r\n\r\n"
                   b"GET /quick HTTP/1.1\r\nHost: slow.test\r\nConnection: close\r\n\r\n")
    answer = read_all(client)
    client.close()
    assert answer.count(b"HTTP/1.1 200 OK") == 2, answer
