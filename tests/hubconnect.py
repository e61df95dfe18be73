"""What the tests of the hub's own backend connects share (tests/test_hub_connect.py,
tests/test_hub_connect_deadlines.py, tests/test_connect_deadline.py): an
in-process worker proxying to given backends (`make_to`, a fixture: import it
by name), what its failed requests ended in (`outcome`), backends that never
accept (`never_accepting`), the connects in progress (`sockets_to`), a client
connection the worker accepted (`accepted`), a request sent whole (the hub's)
or in two pieces (a greenlet's: `send_in`), and one waiting for its connect
(`connecting`)."""

from __future__ import annotations

import contextlib
import json
import select
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from balancer.server import Worker
from tests.support import InProcessWorkers, TableStore
from tests.test_inline import connect, get, until
from tests.test_parked_start import all_closed

CONNECT_TIMEOUT = 0.3
ON = ["hub", "greenlet"]  # who connects: the hub, or a greenlet (the head sent in two pieces)


@pytest.fixture
def make_to(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start a gevent worker proxying app.test to `address` (or to each of a list,
    round robin; passive health only), its access log in JSON at
    `tmp_path`/`name`; `flags`: more settings."""
    workers = InProcessWorkers()

    def start(address: str | list[str], name: str, connect_timeout: float = CONNECT_TIMEOUT,
              **flags: Any) -> Worker:
        settings = {"timeouts.client_header": 2.0, "timeouts.backend_connect": connect_timeout,
                    "log.access_log": str(tmp_path / name), "log.access_format": "json",
                    **flags}
        backends = address if isinstance(address, list) else [address]
        rule = {"action": "proxy", "backends": backends}
        return workers.start(TableStore({"app.test": rule}), settings)

    yield start
    workers.close()


def outcome(w: Worker, statuses: list[int], tmp_path: Path, name: str,
            address: str = "") -> dict[str, Any]:
    """What failed requests ended in: their statuses, the backend's counters and
    health (the rule's one backend, or the one at `address`), their access-log
    records (times and ids left out)."""
    assert until(lambda: all_closed(w))
    stats = w.stats.snapshot()["hosts"]["app.test"]
    route = w.contexts[0].holder.table.lookup(b"app.test")
    if address:
        bstats = stats["backends"][address]
        (b,) = [b for b in route.action.backends if b.key == address]
    else:
        (bstats,) = stats["backends"].values()
        (b,) = route.action.backends
    w.access_log.close()
    records = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
    return {"status": statuses[0] if len(statuses) == 1 else statuses,
            "state": bstats["state"], "failures": bstats["failures"],
            "outcomes": bstats["outcomes"], "in_flight": (bstats["in_flight"], b.in_flight),
            "open": stats["open_requests"], "completed": stats["completed_requests"],
            "fails": b.fails, "idle": len(b.pooled()),
            "log": [{k: r[k] for k in ("status", "backend", "target", "method")}
                    for r in records]}


@contextlib.contextmanager
def never_accepting() -> Iterator[int]:
    """The port of a listener whose accept queue is full: it drops every SYN, so
    a connect to it hangs until its timeout (as tests/test_backend_connect.py)."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    queued = socket.create_connection(full.getsockname())
    try:
        # the queue is full only once the listener took the handshake's last ACK
        assert select.select([full], [], [], 5)[0], "the first connection never queued"
        yield full.getsockname()[1]
    finally:
        queued.close()
        full.close()


def sockets_to(port: int, state: str) -> int:
    """How many TCP sockets of this host are in `state` (/proc/net/tcp's hex code:
    "02" SYN_SENT, a connect in progress; "01" ESTABLISHED) toward loopback
    `port` (the backend side's own sockets have it as their local port)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines
               if line.split()[3] == state and int(line.split()[2].split(":")[1], 16) == port)


def accepted(w: Worker) -> tuple[Any, Any]:
    """A client connection to `w` (its reads time out after 15 s) once the worker
    accepted it: (the client's socket, the worker's connection)."""
    sock = connect(w)
    sock.sock.settimeout(15)
    assert until(lambda: len(w.io.connections) == 1)
    (conn,) = w.io.connections
    return sock, conn


def connecting(w: Worker, port: int, on: str, path: str = "/try") -> tuple[Any, Any]:
    """A client connection whose request (`path`) waits for a connect to `port`
    (which never accepts), on path `on`: (its socket, the connection)."""
    sock, conn = accepted(w)
    send_in(sock, conn, on, get(path))
    assert until(lambda: sockets_to(port, "02") == 1)  # connecting
    return sock, conn


def send_in(sock: Any, conn: Any, on: str, request: bytes) -> None:
    """Send `request` on `sock` whole (the hub takes it), or (`on` "greenlet") in
    two pieces: the hub hands the partial head to a greenlet, which reads the rest."""
    if on == "greenlet":
        sock.sendall(request[:20])
        request = request[20:]
        assert until(lambda: conn.task is not None)
    sock.sendall(request)


NOTHING_COUNTED: dict[str, Any] = {
    "state": "up", "fails": 0, "failures": 0, "in_flight": (0, 0), "open": 0, "idle": 0,
    "outcomes": {"success": 0, "connect_error": 0, "tls_error": 0, "timeout": 0, "error": 0}}

