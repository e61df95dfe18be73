"""Descriptor exhaustion (issue 15.6): the limit raised, the connection cap fitted
under it, and an accept that runs out pausing with one log line, never a traceback.

Hostile conditions: a balancer started with a low RLIMIT_NOFILE (`prlimit`)
facing more concurrent clients than it has descriptors for, and a bare
`balancer.accepting.Listener` in a child whose descriptors are all taken.
"""

from __future__ import annotations

import os
import select
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from balancer.descriptors import ACCEPT_PAUSE, RESERVED, connection_cap
from tests.conftest import required_tool
from tests.support import ROOT, Backend, Balancer, acquire, wait_for

CLIENTS = 300


def require_prlimit() -> str:
    return required_tool("prlimit", "util-linux")


def many_requests(port: int, count: int, path: str, timeout: float = 30.0,
                  host: str = "app.test") -> list[bytes]:
    """`count` concurrent requests (Connection: close), each on its own socket; the
    raw answers, b"" for a connection closed without one."""
    selector = selectors.DefaultSelector()
    answers: dict[int, bytes] = {}
    for index in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                     .encode())
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, index)
        answers[index] = b""
    deadline = time.monotonic() + timeout
    while selector.get_map() and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            try:
                chunk = key.fileobj.recv(65536)  # type: ignore[union-attr]
            except ConnectionResetError:
                chunk = b""
            answers[key.data] += chunk
            if not chunk:
                selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    return [answers[i] for i in range(count)]


def test_low_descriptor_limit_is_raised_and_caps_connections(tmp_path: Path) -> None:
    prlimit = require_prlimit()
    backend = Backend()
    bal = Balancer(tmp_path, {"app.test": {"action": "proxy", "backends": [backend.address]}},
                   prefix=[prlimit, "--nofile=128:256"])
    try:
        cap = connection_cap(10000, 256)
        assert cap == (256 - RESERVED) // 2
        lowered = f"server.max_connections lowered from 10000 to {cap} per worker"
        wait_for(lambda: lowered in bal.output(), what="the start-up lines on the limit")
        assert "file descriptor limit raised from 128 to 256" in bal.output()
        answers = many_requests(bal.port, CLIENTS, "/slow?s=0.3")
        statuses = [answer[:12] for answer in answers]
        assert statuses == [b"HTTP/1.1 200"] * CLIENTS, sorted(set(statuses))
        assert "Traceback" not in bal.output()
        assert "Too many open files" not in bal.output()
    finally:
        bal.stop()
        backend.stop()


def test_idle_pooled_connections_yield_their_descriptors_to_clients(
        tmp_path: Path, start_backend) -> None:
    """Waves of clients to one backend after another: each wave leaves up to a cap's
    worth of idle pooled connections, which must not starve the next wave's clients
    and their new backend connections of descriptors (bug: 502s, "Too many open
    files" on connect)."""
    prlimit = require_prlimit()
    backends = [start_backend(name) for name in ("a", "b", "c")]
    hosts = {f"{b.name}.test": {"action": "proxy", "backends": [b.address]} for b in backends}
    bal = Balancer(tmp_path, hosts, prefix=[prlimit, "--nofile=256:256"])
    try:
        cap = connection_cap(10000, 256)
        for backend in backends:  # each wave holds `cap` clients and backend connections
            answers = many_requests(bal.port, cap, "/slow?s=0.3", host=f"{backend.name}.test")
            statuses = [answer[:12] for answer in answers]
            assert statuses == [b"HTTP/1.1 200"] * cap, sorted(set(statuses))
        assert "Too many open files" not in bal.output()
        assert "Traceback" not in bal.output()
    finally:
        bal.stop()


def test_idle_connections_get_what_the_clients_leave() -> None:
    from balancer.pool import BackendRegistry, IdleBudget
    from balancer.serving import Slots

    listeners = [socket.create_server(("127.0.0.1", 0), backlog=64) for _ in range(2)]
    budget = IdleBudget(descriptors=10)
    budget.slots = Slots(100)
    budget.slots.open = 2  # two clients open
    registry = BackendRegistry(connect_timeout=5, fail_timeout=10, budget=budget)
    a, b = (registry.get(f"127.0.0.1:{lst.getsockname()[1]}") for lst in listeners)
    try:
        made = [a.connect() for _ in range(6)]
        for upstream in made:
            a.release(upstream)
        # 10 descriptors, 2 clients and room for one more: 2 * 3 taken, 4 left to idle
        assert budget.idle == len(a.pooled()) == 4
        assert [u.sock.fileno() for u in made[4:]] == [-1, -1]  # closed, not kept
        budget.slots.open = 4  # two more clients: only 2 idle may stay
        fresh = b.connect()  # needs a descriptor: the oldest idle ones go first
        assert budget.idle == len(a.pooled()) == 2 and a.pooled() == made[2:4]
        assert made[0].sock.fileno() == made[1].sock.fileno() == -1
        upstream, reused = acquire(a)
        assert reused and budget.idle == 1
        for u in (upstream, fresh):
            u.close()
        assert a.close_idle() == 1 and budget.idle == 0
    finally:
        for lst in listeners:
            lst.close()


CHILD = """
import logging, os, sys, time
from gevent import monkey; monkey.patch_all()
import gevent
from balancer.accepting import Listener, bind
from balancer.serving import Slots
from balancer.addr import Address

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

def answer(sock, address):
    sock.sendall(b"served\\n")
    sock.close()

plain = sys.argv[1] == "plain"  # OS sockets through Slots.accept, or gevent's accept
server = Listener(bind(Address("127.0.0.1", 0)), answer, Slots(100), plain=plain)
resume = server.resume

def resume_and_say():  # each end of a pause (a try follows), for the test to count
    print("resumed", time.monotonic(), flush=True)
    resume()

server.resume = resume_and_say
server.start()
hogs = []
try:
    while True:
        hogs.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
print(server.address[1], flush=True)
hub = gevent.get_hub()
hub.wait(hub.loop.io(0, 1))  # the test writes a line: free them
os.read(0, 100)
for fd in hogs:
    os.close(fd)
hub.wait(hub.loop.io(0, 1))  # until the test closes stdin
"""


@pytest.mark.parametrize("kind", ["plain", "gevent"])
def test_exhausted_accept_pauses_with_one_line_and_recovers(kind: str) -> None:
    """Plain listeners accept in `Slots.accept` (OS sockets), TLS ones through
    gevent's accept (`Listener.do_read`): both pause and recover."""
    require_prlimit()
    child = subprocess.Popen([sys.executable, "-c", CHILD, kind], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={"PYTHONPATH": str(ROOT)},
                             preexec_fn=_low_limit)
    try:
        port = int(child.stdout.readline())  # type: ignore[union-attr]
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
        first = _line_within(child, 10.0)
        assert "accept on" in first and "Too many open files" in first, first
        # three pauses end, ACCEPT_PAUSE apart (not a retry loop): the two tries
        # between them failed too, logging nothing more
        pauses = _lines_within(child.stdout.fileno(), 3, 3 * ACCEPT_PAUSE + 10.0)  # type: ignore[union-attr]
        ends = [float(line.split()[1]) for line in pauses[:3]]
        assert ends[1] - ends[0] >= 0.9 * ACCEPT_PAUSE <= ends[2] - ends[1], pauses[:10]
        child.stdin.write("free\n")  # type: ignore[union-attr]
        child.stdin.flush()  # type: ignore[union-attr]
        for sock in clients:
            assert sock.recv(100) == b"served\n"
            sock.close()
        _, err = child.communicate(timeout=10)
    finally:
        child.kill()
        child.wait()
    assert "Traceback" not in err, err
    assert "accept on" not in err, err  # one line per episode: the first one


def _line_within(child: subprocess.Popen, timeout: float) -> str:
    """The child's next stderr line, failing after `timeout` seconds."""
    ready, _, _ = select.select([child.stderr], [], [], timeout)
    assert ready, f"no log line within {timeout} s"
    return child.stderr.readline()  # type: ignore[union-attr]


def _lines_within(fd: int, count: int, timeout: float) -> list[str]:
    """At least `count` lines read from `fd` (nothing buffered it before), failing
    after `timeout` seconds."""
    data, deadline = b"", time.monotonic() + timeout
    while data.count(b"\n") < count:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], f"{data!r} after {timeout} s"
        chunk = os.read(fd, 4096)
        assert chunk, f"the child closed its output after {data!r}"
        data += chunk
    return data.decode().splitlines()


def _low_limit() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
