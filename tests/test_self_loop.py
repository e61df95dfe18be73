"""A rule whose backend is the balancer's own listener (`balancer.selves`).

The bug (an outside probe): such a rule forwarded each request to the
balancer again, and one client request took every descriptor of the worker
(about 10,000) while other hosts went unanswered. Now a new backend
connection that reaches one of the worker's listeners is closed before
anything is sent and the request gets the `bad-gateway` page (502) with the
cause "backend is this balancer (loop)", promptly; its backend is not marked
down. Without the check these requests get no answer within the client's
5 s (the nested requests pile up), so each case fails cleanly.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from balancer.addr import parse_backend_addr
from balancer.errors import SelfLoop
from balancer.netio import IO, GeventIO
from balancer.pool import Backend
from balancer.selves import OwnListeners
from tests.support import Backend as EchoBackend
from tests.support import Balancer, request, wait_for

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

CLIENT_TIMEOUT = 5.0  # a looping request never answers: the wait is bounded
PROMPT = 2.0  # seconds a refused request takes at most (milliseconds in fact)
FD_GROWTH = 50  # descriptors the worker may gain over the cases (the bug: ~10,000)


# the check itself, on real sockets -------------------------------------------
@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


def backend_to(address: str, own: OwnListeners, kind: str = "gevent") -> Backend:
    return Backend(parse_backend_addr(address), connect_timeout=1.0, fail_timeout=1.0,
                   io=GeventIO() if kind == "gevent" else IO(), listeners=own)


@pytest.mark.parametrize("kind", ["blocking", "gevent"])
def test_a_connection_to_an_own_listener_is_refused(kind: str,
                                                    listener: socket.socket) -> None:
    own = OwnListeners()
    own.add(listener)
    backend = backend_to(f"127.0.0.1:{listener.getsockname()[1]}", own, kind)
    with pytest.raises(SelfLoop):
        backend.connect()
    assert backend.state == "up" and backend.fails == 0


def test_a_wildcard_listeners_port_on_a_local_address_is_refused(
        listener: socket.socket) -> None:
    """A listener on 0.0.0.0 (the harness binds no wildcard: traffic stays on
    loopback) reached through 127.0.0.1, the socket's own local address."""
    port = listener.getsockname()[1]
    own = OwnListeners()
    own.ports.add(port)
    own.wildcard.add((socket.AF_INET, port))
    with pytest.raises(SelfLoop):
        backend_to(f"127.0.0.1:{port}", own).connect()


def test_another_address_on_a_listening_port_is_connected(listener: socket.socket) -> None:
    """127.0.0.2 on the port the balancer listens on at 127.0.0.1: someone else."""
    port = listener.getsockname()[1]
    other = socket.create_server(("127.0.0.2", port))  # (all of 127.0.0.0/8 is loopback)
    own = OwnListeners()
    own.add(listener)
    try:
        upstream = backend_to(f"127.0.0.2:{port}", own).connect()
        upstream.close()
    finally:
        other.close()


# through a real balancer ---------------------------------------------------------
def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def worker_pid(bal: Balancer) -> int:
    (process,) = bal.api("GET", "/api/v1/info")[1]["processes"]
    return process["pid"]


def refused_promptly(port: int, method: str, host: str) -> None:
    began = time.monotonic()
    status, _, body = request(port, method, host=host, timeout=CLIENT_TIMEOUT,
                              body=b"x" * 10 if method == "POST" else None)
    assert status == 502, (status, body[:200])
    assert time.monotonic() - began < PROMPT


def test_a_rule_forwarding_to_the_balancer_itself_is_answered_at_once(
        tmp_path: Path) -> None:
    echo = EchoBackend("app")
    bal = Balancer(tmp_path, {"app.test": {"action": "proxy", "backends": [echo.address]}})
    try:
        me = f"127.0.0.1:{bal.port}"
        bal.write_routes({
            "app.test": {"action": "proxy", "backends": [echo.address]},
            "loop.test": {"action": "proxy", "backends": [me]},
            # a name resolves in a greenlet: the connect's other path
            "named.test": {"action": "proxy", "backends": [f"localhost:{bal.port}"]},
        })
        bal.wait_version(2)
        pid = worker_pid(bal)
        assert request(bal.port)[0] == 200
        before = fd_count(pid)
        for _ in range(3):
            refused_promptly(bal.port, "GET", "loop.test")  # the hub's connect
            refused_promptly(bal.port, "POST", "loop.test")  # a greenlet's
            refused_promptly(bal.port, "GET", "named.test")
        assert request(bal.port)[0] == 200  # the other host is served all along
        assert fd_count(pid) - before < FD_GROWTH
        wait_for(lambda: "backend is this balancer (loop)" in bal.output(), 5.0,
                 what="the operator log's cause")
        assert "Traceback" not in bal.output()  # the hub takes it as a failed connect
        for host in ("loop.test", "named.test"):  # neither down nor failed
            (stats,) = bal.host_stats(host)["backends"].values()
            assert stats["state"] == "up" and stats["failures"] == 0, (host, stats)
    finally:
        bal.stop()
        echo.stop()
