"""Interoperability probes with what users run (2026-12-07): a client that hangs
up while its request waits on its backend (a long poll, a quiet event stream:
a tab closed) frees its backend connection within about a second, as nginx
does, not after `timeouts.backend_read` (HAProxy 2.6 keeps it until its server
timeout); the request is a 499 and not the backend's failure. A tunnel's
half-close and a quick answer to a half-closed client are unchanged.
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

from tests.rawpeer import RawBackend
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


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Balancer, Path, dict]]:
    """One balancer (plain and TLS listeners) in front of an `Abandoned` per host."""
    tmp = tmp_path_factory.mktemp("probe-interop")
    peers = {host: Abandoned(first) for host, first in PEERS.items()}
    routes = tmp / "routes.json"
    routes.write_text(json.dumps({"version": 1, "hosts": {
        host: {"action": "proxy", "backends": [peer.backend.address]}
        for host, peer in peers.items()}}))
    put_cert(routes, "tls.test")
    bal = Balancer(tmp, args=["--tls-listen", "127.0.0.1:0"])
    yield bal, tmp, peers
    bal.stop()
    for peer in peers.values():
        peer.backend.stop()


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
