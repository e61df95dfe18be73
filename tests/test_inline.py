"""Keep-alive requests served in the hub (`balancer.inline`), and every point where
the hub hands a connection to a greenlet, which goes on from that state.

An in-process gevent worker on loopback (its hub is the test's), a scripted
backend in threads, gevent clients. A connection's first request is served
by a greenlet; after it the connection parks, and its next ones come to the
hub. While a backend holds an answer, a request the hub serves is in flight
with no task and no busy greenlet; one handed over has a task."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.socket as gsocket
import pytest

import balancer.inline
import balancer.tls
from balancer.connection import ClientConnection
from balancer.pool import Backend as PoolBackend
from balancer.server import Worker
from tests.rawpeer import read_request, serve_each
from tests.support import Balancer, InProcessWorkers, TableStore, wait_for

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

BIG = 200_000  # bytes of /big's body: more than the outbox holds (HOLD_LIMIT)


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class ScriptedBackend:
    """Answers by path: /hold waits for `release`; /silent never answers; /close
    closes a reused connection unanswered (answers on a fresh one); /hold-close
    waits for `release`, then answers and closes in one segment; /chunked,
    /big, /extra (an answer, then 0.1 s later another unasked), /split (head,
    then the body 0.2 s later), /interim (a 100 first),
    /sized-SIZE-N (SIZE bytes), /upgrade (101, then echoes); anything else
    200 "conn N PATH"."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.release = threading.Event()
        self.extra_sent = threading.Event()
        self.lock = threading.Lock()
        self.connections = 0
        self.ended = 0  # connections the balancer closed (or this backend did)
        self.requests: list[tuple[int, bytes]] = []  # (connection number, raw request)
        self.socks: list[socket.socket] = []
        serve_each(self.listener, self.serve)

    def serve(self, sock: socket.socket) -> None:
        with self.lock:
            self.connections += 1
            number = self.connections
            self.socks.append(sock)
        sock.settimeout(10)
        answered = 0
        try:
            with sock, contextlib.suppress(OSError):
                while request := read_request(sock):
                    self.requests.append((number, request))
                    if not self.answer(sock, number, request, answered):
                        return
                    answered += 1
        finally:
            with self.lock:
                self.ended += 1

    def answer(self, sock: socket.socket, number: int, request: bytes, answered: int) -> bool:
        path = request.split(b" ", 2)[1]
        if path == b"/hold":
            self.release.wait(10)
        elif path == b"/silent":
            sock.recv(1)  # until the balancer closes it
            return False
        elif path == b"/close" and answered:
            return False
        elif path == b"/hold-close":  # held, then answered with the end of stream (corked)
            self.release.wait(10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            sock.sendall(ok(b"conn %d %s" % (number, path)))
            sock.shutdown(socket.SHUT_WR)
            return False
        elif path == b"/extra":  # bytes after a whole answer, once it is pooled
            sock.sendall(ok(b"extra"))
            time.sleep(0.1)
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\njunk")
            self.extra_sent.set()
            return True
        elif path == b"/chunked":
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nhello\r\n0\r\n\r\n")
            return True
        elif path == b"/big":
            sock.sendall(ok(b"x" * BIG))
            return True
        elif path == b"/split":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
            time.sleep(0.2)
            sock.sendall(b"split")
            return True
        elif path == b"/interim":
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"final"))
            return True
        elif path.startswith(b"/sized-"):  # /sized-SIZE-ANYTHING: SIZE bytes
            sock.sendall(ok(b"z" * int(path.split(b"-")[1])))
            return True
        elif path == b"/upgrade":
            sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                         b"Upgrade: echo\r\n\r\n")
            while data := sock.recv(65536):
                sock.sendall(data)
            return False
        sock.sendall(ok(b"conn %d %s" % (number, path)))
        return True

    def paths(self) -> list[bytes]:
        return [request.split(b" ", 2)[1] for _, request in self.requests]

    def close(self) -> None:
        self.release.set()
        self.listener.close()
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def backend() -> Iterator[ScriptedBackend]:
    b = ScriptedBackend()
    yield b
    b.close()


Make = Callable[..., Worker]


@pytest.fixture
def make(backend: ScriptedBackend) -> Iterator[Make]:
    """Start a gevent worker proxying app.test to `backend` (its watchdog running)."""
    workers = InProcessWorkers()

    def start(**flags: Any) -> Worker:
        rule = {"action": "proxy", "backends": [backend.address]}
        return workers.start(TableStore({"app.test": rule}), flags)

    yield start
    workers.close()


def until(predicate: Callable[[], Any], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.005)
    return True


class Client:
    """A client socket that keeps what it read past a response (`unread`)."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.unread = b""

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, size: int) -> bytes:
        if self.unread:
            data, self.unread = self.unread, b""
            return data
        return self.sock.recv(size)

    def close(self) -> None:
        self.sock.close()


def connect(w: Worker, rcvbuf: int = 0) -> Client:
    sock = gsocket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect(w.servers[0].address)
    return Client(sock)


def get(path: str, extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: app.test\r\n{extra}\r\n".encode()


def response(sock: Client) -> tuple[int, dict[str, str], bytes]:
    """One response (Content-Length or chunked framing, or to EOF)."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        assert more, f"closed after {data!r}"
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {name.lower(): value.strip()
              for name, _, value in (line.partition(":") for line in lines[1:])}
    if status < 200:  # interim: no body
        sock.unread = rest
        return status, fields, b""
    if "content-length" in fields:
        size = int(fields["content-length"])
        while len(rest) < size:
            more = sock.recv(65536)
            assert more
            rest += more
        sock.unread = rest[size:]
        return status, fields, rest[:size]
    if fields.get("transfer-encoding") == "chunked":
        while b"0\r\n\r\n" not in rest:
            more = sock.recv(65536)
            assert more
            rest += more
        end = rest.index(b"0\r\n\r\n") + 5
        sock.unread = rest[end:]
        return status, fields, rest[:end]
    while more := sock.recv(65536):
        rest += more
    return status, fields, rest


def client_of(w: Worker) -> ClientConnection:
    (conn,) = w.io.connections
    return conn


def parked(w: Worker) -> bool:
    """The one connection waits for its next request with no greenlet."""
    conns = list(w.io.connections)
    return len(conns) == 1 and conns[0].task is None and conns[0].exchange is None \
        and not w.slots.busy


def in_hub(w: Worker) -> bool:
    """The one connection's request is in flight with no task: served in the hub."""
    conns = list(w.io.connections)
    return len(conns) == 1 and conns[0].exchange is not None and conns[0].task is None \
        and not w.slots.busy


def handed_over(w: Worker) -> bool:
    """The one connection's request is in flight in a greenlet."""
    conns = list(w.io.connections)
    return len(conns) == 1 and conns[0].exchange is not None and conns[0].task is not None


def assert_released(w: Worker, completed: int) -> None:
    """Every request counted once and nothing left in flight (host, backend, pool)."""
    stats = w.stats.snapshot()["hosts"]["app.test"]
    assert stats["open_requests"] == 0 and stats["completed_requests"] == completed
    (bstats,) = stats["backends"].values()
    assert bstats["in_flight"] == 0
    route = w.contexts[0].holder.table.lookup(b"app.test")
    assert [b.in_flight for b in route.action.backends] == [0]


def warm(w: Worker, sock: Client) -> None:
    """A first request (a greenlet's), after which the connection is parked."""
    sock.sendall(get("/first"))
    assert response(sock)[0] == 200
    assert until(lambda: parked(w))


# the common case ---------------------------------------------------------------
def test_a_parked_connection_s_requests_are_served_in_the_hub(make: Make,
                                                              backend: ScriptedBackend,
                                                              tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    w = make(**{"log.access_log": str(log), "log.access_format": "json"})
    w.access_log.start()
    sock = connect(w)
    warm(w, sock)
    for n in range(2, 5):
        backend.release.clear()
        sock.sendall(get("/hold"))
        assert until(lambda count=n: len(backend.requests) == count)
        assert in_hub(w)  # waiting for the backend: no greenlet
        backend.release.set()
        status, fields, body = response(sock)
        assert (status, body) == (200, b"conn 1 /hold")  # the pooled connection, reused
        assert fields["x-request-id"]
        assert until(lambda: parked(w))
        forwarded = backend.requests[-1][1]
        assert b"X-Request-Id: " + fields["x-request-id"].encode() in forwarded
        assert b"X-Forwarded-For: 127.0.0.1" in forwarded
    assert backend.connections == 1
    stats = w.stats.snapshot()["hosts"]["app.test"]
    assert stats["completed_requests"] == 4 and stats["open_requests"] == 0
    assert stats["responses"]["2xx"] == 4
    (bstats,) = stats["backends"].values()
    assert bstats["in_flight"] == 0
    sock.close()
    assert until(lambda: w.slots.open == 0 and w.stats.open_connections == 0)
    w.access_log.close()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["target"] for r in records] == ["/first", "/hold", "/hold", "/hold"]
    assert all(r["status"] == 200 and r["backend"] == backend.address and r["request_id"]
               and r["backend_ms"] is not None for r in records)


def test_a_hub_served_answer_s_times_are_one_reading_of_the_clock_after_it(
        make: Make, backend: ScriptedBackend, tmp_path: Path) -> None:
    """`_land` reads the clock once for the try's end, the pooled connection's idle
    start and the request's end (`balancer.netio.CLOCK`, time.monotonic): all of
    them after the answer came, on the clock the pool and the sweep compare with."""
    log = tmp_path / "access.log"
    w = make(**{"log.access_log": str(log), "log.access_format": "json"})
    w.access_log.start()
    sock = connect(w)
    warm(w, sock)
    backend.release.clear()
    sock.sendall(get("/hold"))
    assert until(lambda: len(backend.requests) == 2) and in_hub(w)
    sent = time.monotonic()  # the try began before this
    answered = time.monotonic()
    backend.release.set()  # the answer comes after this
    assert response(sock)[0] == 200
    got = time.monotonic()
    assert until(lambda: parked(w))
    (pool,) = w.contexts[0].holder.table.lookup(b"app.test").action.backends
    assert pool.last is not None and answered <= pool.last.since <= got
    sock.close()
    assert until(lambda: w.slots.open == 0)
    w.access_log.close()
    record = json.loads(log.read_text().splitlines()[-1])
    assert record["target"] == "/hold"
    assert record["duration_ms"] >= record["backend_ms"] >= (answered - sent) * 1000


def test_an_idle_parked_connection_forgets_its_repeated_head(make: Make) -> None:
    w = make()
    sock = connect(w)
    warm(w, sock)
    for _ in range(2):  # the second is remembered
        sock.sendall(get("/again"))
        assert response(sock)[0] == 200
    conn = client_of(w)
    assert until(lambda: parked(w)) and conn.remembers()
    w.io.expire(conn.deadline - 5.0 + 1.01)  # idle for PARK_AFTER (the watchdog's step)
    assert not conn.remembers()
    sock.sendall(get("/again"))  # parsed whole again
    assert response(sock)[:1] == (200,)
    sock.close()


# hand-offs: the client's side ----------------------------------------------------
def test_a_head_split_across_reads_is_handed_over_with_its_deadline(
        make: Make, backend: ScriptedBackend) -> None:
    w = make()
    sock = connect(w)
    warm(w, sock)
    sock.sendall(b"GET /split-head HTTP/1.1\r\nHo")
    assert until(lambda: client_of(w).task is not None)  # a greenlet reads the rest
    sock.sendall(b"st: app.test\r\n\r\n")
    assert response(sock)[2] == b"conn 1 /split-head"
    assert until(lambda: parked(w))
    started = time.monotonic()
    sock.sendall(b"GET /never-whole HTTP/1.1\r\nHo")  # client_header (0.6 s), not client_idle
    status, fields, _ = response(sock)
    assert status == 408 and fields["connection"] == "close"
    assert time.monotonic() - started < 3
    assert sock.recv(10) == b""
    assert backend.paths() == [b"/first", b"/split-head"]


def test_a_malformed_head_is_answered_400_and_closed(make: Make) -> None:
    w = make()
    sock = connect(w)
    warm(w, sock)
    sock.sendall(b"GET / HTTP/1.1\r\nHost app.test\r\n\r\n")
    status, fields, _ = response(sock)
    assert status == 400 and fields["connection"] == "close"
    assert sock.recv(10) == b""  # half-closed (it lingers while we may still send)
    sock.close()
    assert until(lambda: w.slots.open == 0 and w.stats.open_connections == 0)


@pytest.mark.parametrize("case", ["body", "pipelined", "close", "http10", "http10-keep-alive",
                                  "challenge"])
def test_other_requests_are_handed_over_and_answered(make: Make, backend: ScriptedBackend,
                                                     case: str) -> None:
    w = make()
    sock = connect(w)
    warm(w, sock)
    keeps = True
    if case == "body":
        sock.sendall(b"POST /post HTTP/1.1\r\nHost: app.test\r\nContent-Length: 4\r\n\r\nbody")
        assert response(sock)[2] == b"conn 1 /post"
        assert backend.requests[-1][1].endswith(b"\r\n\r\nbody")
    elif case == "pipelined":
        sock.sendall(get("/p1") + get("/p2"))
        assert response(sock)[2] == b"conn 1 /p1"
        assert response(sock)[2] == b"conn 1 /p2"
    elif case == "challenge":  # an ACME HTTP-01 validation: answered by the worker
        w.challenges.update({"http-01:token": {
            "type": "http-01", "host": "app.test", "token": "token",
            "key_authorization": "token.key", "expires": time.time() + 600}})
        sock.sendall(get("/.well-known/acme-challenge/token"))
        assert response(sock)[:3:2] == (200, b"token.key")
        assert backend.paths() == [b"/first"]
    else:
        extra, version = {"close": ("Connection: close\r\n", "1.1"), "http10": ("", "1.0"),
                          "http10-keep-alive": ("Connection: keep-alive\r\n", "1.0")}[case]
        sock.sendall(get("/last", extra, version))
        status, fields, body = response(sock)
        assert (status, body) == (200, b"conn 1 /last")
        keeps = case == "http10-keep-alive"
        assert fields["connection"] == ("keep-alive" if keeps else "close")
    if keeps:
        sock.sendall(get("/after"))
        assert response(sock)[2] == b"conn 1 /after"
        assert until(lambda: parked(w))
    else:
        assert sock.recv(10) == b""
    sock.close()
    assert until(lambda: w.slots.open == 0 and w.stats.open_connections == 0)
    # begun in the hub, finished by a greenlet: counted once
    assert_released(w, completed=1 + (2 if case == "pipelined" else 1) + keeps)


def test_a_client_gone_before_its_answer_leaves_nothing_behind(make: Make,
                                                               backend: ScriptedBackend) -> None:
    w = make()
    sock = connect(w)
    warm(w, sock)
    backend.release.clear()
    sock.sendall(get("/hold"))
    assert until(lambda: len(backend.requests) == 2) and in_hub(w)
    sock.close()  # the answer's held write fails; the next readiness finds EOF
    backend.release.set()
    assert until(lambda: w.slots.open == 0 and w.stats.open_connections == 0)
    stats = w.stats.snapshot()["hosts"]["app.test"]
    assert stats["open_requests"] == 0 and stats["completed_requests"] == 2
    other = connect(w)  # the backend connection went back to its pool
    other.sendall(get("/next"))
    assert response(other)[2] == b"conn 1 /next"
    other.close()


def fill_unread(w: Worker, sock: Any, backend: ScriptedBackend) -> None:
    """Ask for 60,000-byte answers (`sock` reads none: a small receive buffer)
    until they fill its socket, the rest of one left to a greenlet or the
    writer; then one more while that is sent; read them all, in order, whole;
    the connection parks again."""
    writer = client_of(w).stream.writer
    sent = 0
    while not (w.slots.busy or writer.rest is not None):  # until the socket is full
        assert sent < 300
        sock.sendall(get(f"/sized-60000-{sent}"))  # each held whole, then sent
        sent += 1
        assert until(lambda count=sent: len(backend.requests) == count + 1)
        gevent.sleep(0.01)
    sock.sendall(get("/sized-60000-after"))  # comes while the rest is still sent
    for _ in range(sent + 1):
        assert response(sock)[2] == b"z" * 60000
    assert until(lambda: parked(w))


def fill_until_sending(w: Worker, sock: Any, backend: ScriptedBackend) -> int:
    """Ask for 60,000-byte answers (`sock` reads none: a small receive buffer),
    each held whole, until one fills its socket and a greenlet sends its rest;
    how many were asked for."""
    writer = client_of(w).stream.writer
    sent = 0
    while writer.rest is None:
        assert sent < 300
        sock.sendall(get(f"/sized-60000-{sent}"))
        sent += 1
        assert until(lambda count=sent: len(backend.requests) == count + 1)
        gevent.sleep(0.01)
    return sent


def test_a_client_that_stops_reading_is_closed_at_its_idle_deadline(
        make: Make, backend: ScriptedBackend) -> None:
    """Answers fill the socket of a client that never reads again: at its idle
    deadline the connection closes, the send in progress given up (bug: the
    closing greenlet waited for that send, the watchdog asked it to park, and
    its ParkNow left the connection open for ever)."""
    w = make(**{"timeouts.client_idle": 0.5})
    sock = connect(w, rcvbuf=4096)
    warm(w, sock)
    fill_until_sending(w, sock, backend)
    assert until(lambda: w.slots.open == 0 and w.stats.open_connections == 0
                 and not w.io.connections)
    sock.close()


def test_a_slow_reader_s_answers_are_sent_in_order_by_greenlets(make: Make,
                                                                backend: ScriptedBackend) -> None:
    """Answers the client does not read fill its socket: the outbox's flush
    leaves the rest to a greenlet, and the hub hands over while that runs.
    ScriptedBackend: /sized-SIZE-N answers SIZE bytes."""
    w = make()
    sock = connect(w, rcvbuf=4096)
    warm(w, sock)
    fill_unread(w, sock, backend)
    sock.close()


# hand-offs: the backend's side ---------------------------------------------------
@pytest.mark.parametrize("path", ["/chunked", "/big", "/split", "/interim"])
def test_other_answers_are_handed_over_and_relayed(make: Make, backend: ScriptedBackend,
                                                   path: str) -> None:
    w = make()
    sock = connect(w)
    warm(w, sock)
    sock.sendall(get(path))
    if path == "/interim":
        status, _, body = response(sock)
        assert status == 100
        status, _, body = response(sock)
        assert body == b"final"
    else:
        status, _, body = response(sock)
        expected = {"/chunked": b"5\r\nhello\r\n0\r\n\r\n", "/big": b"x" * BIG,
                    "/split": b"split"}[path]
        assert (status, body) == (200, expected)
    sock.sendall(get("/after"))  # pooled again, however late its last readiness came
    assert response(sock)[2] == b"conn 1 /after"
    assert until(lambda: parked(w))
    assert_released(w, completed=3)
    sock.close()


@pytest.mark.parametrize("size", [70_000, 140_000, 200_000, 1_000_000])
def test_a_large_answer_s_pooled_connection_is_reused(make: Make, backend: ScriptedBackend,
                                                     size: int) -> None:
    """An answer read in several recvs, the loop polling between two (the last
    one's readiness then comes after the connection went back to its pool):
    the connection is reused, whether the requests come on one keep-alive
    connection (parked: the hub takes them) or each on a new one (a greenlet's)."""
    w = make()
    sock = connect(w)
    for n in range(4):
        sock.sendall(get(f"/sized-{size}-{n}"))
        status, _, body = response(sock)
        assert (status, len(body)) == (200, size)
        assert until(lambda: parked(w))
    sock.close()
    for n in range(3):
        sock = connect(w)
        sock.sendall(get(f"/sized-{size}-new{n}"))
        assert response(sock)[:1] == (200,)
        sock.close()
    assert backend.connections == 1
    (pooled,) = w.registry.backends[backend.address].pooled()
    assert pooled.stream.is_clean() and pooled.stream.watcher.io.active  # watched afresh


def test_a_reused_connection_closed_before_the_answer_is_retried_on_a_fresh_one(
        make: Make, backend: ScriptedBackend) -> None:
    w = make()
    sock = connect(w)
    warm(w, sock)
    sock.sendall(get("/close"))  # conn 1 closes unanswered: the normal retry
    status, _, body = response(sock)
    assert (status, body) == (200, b"conn 2 /close")
    assert backend.requests[-2][0] == 1 and backend.requests[-1][0] == 2
    assert backend.paths() == [b"/first", b"/close", b"/close"]
    assert until(lambda: parked(w))
    assert_released(w, completed=2)
    sock.close()


def test_a_slow_backend_gets_the_timeout_page_from_a_greenlet(make: Make,
                                                              backend: ScriptedBackend) -> None:
    w = make(**{"timeouts.backend_read": 0.5})
    sock = connect(w)
    warm(w, sock)
    # deadlines count from the watchdog's last tick (`GeventIO.arm`), up to a tick
    # (0.125 s here, later under load) before the request came: the bound is the
    # worker's clock as of sending, not the test's (bug: 504 "early" at 0.376 s)
    ticked = w.io.now
    sock.sendall(get("/silent"))
    assert until(lambda: len(backend.requests) == 2) and in_hub(w)
    status, _, _ = response(sock)  # the watchdog's TimeoutError, in a greenlet
    assert status == 504
    assert 0.5 < time.monotonic() - ticked < 4
    sock.sendall(get("/after"))  # a new backend connection: the silent one was closed
    assert response(sock)[2] == b"conn 2 /after"
    stats = w.stats.snapshot()["hosts"]["app.test"]
    assert stats["responses"]["5xx"] == 1 and stats["open_requests"] == 0
    sock.close()


def test_a_real_balancer_serves_keep_alive_then_held_and_upgraded_requests(
        tmp_path: Path, backend: ScriptedBackend) -> None:
    """`balancer serve` (a subprocess, its sockets monkey-patched): requests after
    the first come to the hub; a request held (`spin`) and an Upgrade on the
    parked connection are handed over, the one released, the other tunnels."""
    rule = {"app.test": {"action": "proxy", "backends": [backend.address]}}
    bal = Balancer(tmp_path, rule, args=["--workers", "1"])
    try:
        sock = Client(socket.create_connection(("127.0.0.1", bal.port), timeout=5))
        for n in range(5):
            sock.sendall(get(f"/ka-{n}"))
            status, fields, body = response(sock)
            assert (status, body) == (200, f"conn 1 /ka-{n}".encode())
            assert fields["x-request-id"]
        bal.write_routes({"app.test": {"action": "spin", "timeout": 30}})
        bal.wait_version(2)
        sock.sendall(get("/held"))  # held: the hub hands it over
        assert wait_for(lambda: bal.spinning("app.test") == 1, timeout=10)
        bal.write_routes(rule)
        assert response(sock)[2].endswith(b" /held")  # (the spin rule closed the pool)
        sock.sendall(get("/upgrade", "Connection: upgrade\r\nUpgrade: echo\r\n"))
        status, fields, _ = response(sock)
        assert status == 101 and fields["upgrade"] == "echo"
        sock.sendall(b"ping")
        assert sock.recv(10) == b"ping"
        sock.close()
        assert wait_for(lambda: bal.host_stats("app.test")["completed_requests"] == 7)
        assert [number for number, _ in backend.requests[:5]] == [1] * 5  # one, pooled
    finally:
        bal.stop()


# the worker's side ---------------------------------------------------------------
def test_a_draining_worker_closes_a_parked_connection_after_its_next_answer(
        make: Make, backend: ScriptedBackend) -> None:
    w = make()
    sock = connect(w)
    warm(w, sock)
    backend.release.clear()
    sock.sendall(get("/hold"))
    assert until(lambda: len(backend.requests) == 2) and in_hub(w)
    stopper = gevent.spawn(w.stop, 10.0)  # a request in flight in the hub: answered
    assert until(lambda: w.draining)
    backend.release.set()
    assert response(sock)[2] == b"conn 1 /hold"
    sock.sendall(get("/last"))  # began while draining: answered, then closed
    status, fields, body = response(sock)
    assert (status, body, fields["connection"]) == (200, b"conn 1 /last", "close")
    assert sock.recv(10) == b""
    stopper.join(timeout=10)
    assert stopper.dead and w.slots.open == 0


# a bug in the hub's steps ---------------------------------------------------------
# The faults are injected by replacing functions in `balancer.inline`'s namespace,
# which compiled code does not look up (mypyc calls them directly): this runs in the
# suite's interpreted pass (scripts/test.sh, `-m data_plane`), not the compiled one.
COMPILED = not balancer.inline.__file__.endswith(".py")


@pytest.mark.skipif(COMPILED, reason="patches module globals: runs in the interpreted pass")
@pytest.mark.parametrize(("name", "status"), [("dispatch", 502), ("take_ready", 502),
                                              ("deliver", 502), ("serves", 200)])
def test_a_fault_in_the_hub_releases_what_the_request_holds(
        make: Make, backend: ScriptedBackend, monkeypatch: pytest.MonkeyPatch,
        name: str, status: int) -> None:
    """Once: a try on a taken backend connection fails with a 502 from a greenlet
    (the connection closed); a request not yet tried is served by the greenlet.
    Its counters come back to zero, once, and the next request is the hub's."""
    w = make()
    sock = connect(w)
    warm(w, sock)
    real = getattr(balancer.inline, name)
    faults: list[str] = []

    def once(*args: Any) -> Any:
        if not faults:
            faults.append(name)
            raise RuntimeError("a bug")
        return real(*args)

    monkeypatch.setattr(balancer.inline, name, once)
    sock.sendall(get("/faulty"))
    got, _, body = response(sock)
    assert faults == [name] and got == status
    assert backend.paths().count(b"/faulty") == (0 if name == "dispatch" else 1)  # never twice
    assert until(lambda: parked(w))
    assert_released(w, completed=2)
    (bstats,) = w.stats.snapshot()["hosts"]["app.test"]["backends"].values()
    assert bstats["failures"] == 0  # not the backend's
    sock.sendall(get("/after"))  # (a new backend connection after a 502: it was closed)
    assert response(sock)[0] == 200
    assert until(lambda: parked(w))
    backend.release.clear()
    sent = len(backend.requests)
    sock.sendall(get("/hold"))  # served in the hub again
    assert until(lambda: len(backend.requests) == sent + 1) and in_hub(w)
    backend.release.set()
    assert response(sock)[0] == 200
    assert until(lambda: parked(w))
    stats = w.stats.snapshot()["hosts"]["app.test"]
    assert stats["open_requests"] == 0 and stats["completed_requests"] == 4
    sock.close()
    assert until(lambda: w.slots.open == 0 and w.stats.open_connections == 0)


@pytest.mark.skipif(COMPILED, reason="patches a class's methods: runs in the interpreted pass")
@pytest.mark.parametrize("path", ["hub", "greenlet"])
@pytest.mark.parametrize("step", ["release", "record_success"])
def test_a_fault_after_the_answer_releases_what_the_try_holds_once(
        make: Make, backend: ScriptedBackend, monkeypatch: pytest.MonkeyPatch,
        path: str, step: str) -> None:
    """Bug: a step of `land` raising in the hub (the pool's `release`) skipped
    `landed`: the rule's in-flight count of the backend stayed up for good (a
    deploy's drain then waits its whole timeout), and the backend connection was
    left open out of its pool. Whatever raises after the answer went out (in
    `land`: `release`; in `landed`: `record_success`), on either path: the client
    has its answer and the connection closes (a bug ends it), the try's counts
    come back to zero once, the backend connection is pooled or closed."""
    w = make()
    sock = connect(w)
    if path == "hub":
        warm(w, sock)  # the connection's next request is the hub's
    real = getattr(PoolBackend, step)
    faults: list[str] = []

    def once(self: PoolBackend, *args: Any) -> Any:
        if not faults:
            faults.append(step)
            raise RuntimeError("a bug")
        return real(self, *args)

    monkeypatch.setattr(PoolBackend, step, once)
    sock.sendall(get("/faulty"))
    status, _, body = response(sock)
    assert faults == [step] and (status, body) == (200, b"conn 1 /faulty")
    assert sock.recv(1) == b""  # closed after its answer
    assert until(lambda: w.slots.open == 0 and w.stats.open_connections == 0)
    assert_released(w, completed=2 if path == "hub" else 1)
    if step == "release":  # closed, not left open out of the pool
        assert until(lambda: backend.ended == backend.connections == 1)
    else:  # pooled (its answer was whole), and used by the next request
        assert backend.ended == 0
        sock = connect(w)
        sock.sendall(get("/next"))
        assert response(sock)[2] == b"conn 1 /next"
        sock.close()
        assert until(lambda: w.slots.open == 0)
        assert_released(w, completed=3 if path == "hub" else 2)


# hostile peers ------------------------------------------------------------------
def test_a_request_sent_while_the_previous_waits_in_the_hub_is_answered_after_it(
        make: Make, backend: ScriptedBackend) -> None:
    w = make()
    sock = connect(w)
    warm(w, sock)
    next_waits_for_hold(w, sock, backend)
    sock.close()


def next_waits_for_hold(w: Worker, sock: Any, backend: ScriptedBackend) -> None:
    """On a warmed connection: /next, sent while /hold waits in the hub, is not
    read until /hold is answered, then answered after it, and the connection parks."""
    backend.release.clear()
    sock.sendall(get("/hold"))
    assert until(lambda: len(backend.requests) == 2) and in_hub(w)
    sock.sendall(get("/next"))  # not read until /hold is answered
    assert in_hub(w) and len(backend.requests) == 2
    backend.release.set()
    assert response(sock)[2] == b"conn 1 /hold"
    assert response(sock)[2] == b"conn 1 /next"
    assert until(lambda: parked(w))
    assert backend.paths() == [b"/first", b"/hold", b"/next"]


def test_a_post_peeks_at_a_pooled_connection_that_closed_this_loop_iteration(
        make: Make, backend: ScriptedBackend) -> None:
    """A bodyless POST, which is never sent twice (`relay.IDEMPOTENT`), takes a
    pooled connection whose end of stream came after the loop last polled it:
    /hold-close's answer and close come after the POST, in one loop iteration
    (readiness handled last come first: the answer is relayed and its
    connection pooled, then the POST is read), so nothing has said the
    connection closed. The hub peeks at it first, as `relay._take` does, and
    sends the POST on a new connection (bug: it was sent on the closed one,
    not replayed: a 502)."""
    w = make()
    first, second = connect(w), connect(w)
    for sock in (first, second):
        sock.sendall(get("/first"))
        assert response(sock)[0] == 200
    assert until(lambda: all(c.task is None and c.exchange is None for c in w.io.connections))
    backend.release.clear()
    first.sendall(get("/hold-close"))
    assert until(lambda: len(backend.requests) == 3 and not w.slots.busy)
    (held,) = [c for c in w.io.connections if c.exchange is not None]
    upstream = held.exchange.flight.upstream.sock
    second.sendall(b"POST /p HTTP/1.1\r\nHost: app.test\r\nContent-Length: 0\r\n\r\n")
    backend.release.set()  # no wait that yields to the hub until its close came
    deadline = time.monotonic() + 5
    while upstream.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1) != struct.pack(
            "B", 8):  # TCP_CLOSE_WAIT: the backend's end of stream came
        assert time.monotonic() < deadline
    assert response(first)[2] == b"conn 1 /hold-close"
    assert response(second)[:3:2] == (200, b"conn 2 /p")
    assert backend.paths().count(b"/p") == 1
    first.close()
    second.close()


def test_a_backend_writing_after_its_answer_loses_its_pooled_connection(
        make: Make, backend: ScriptedBackend) -> None:
    """ScriptedBackend: /extra sends a second, unasked answer after the first."""
    w = make()
    sock = connect(w)
    warm(w, sock)
    sock.sendall(get("/extra"))
    assert response(sock)[2] == b"extra"
    assert until(lambda: parked(w) and backend.extra_sent.is_set())
    for n in range(2):
        sock.sendall(get(f"/after-{n}"))  # never the unasked answer
        assert response(sock)[2] == f"conn 2 /after-{n}".encode()
        assert until(lambda: parked(w))
    stats = w.stats.snapshot()["hosts"]["app.test"]
    assert stats["open_requests"] == 0 and stats["responses"]["2xx"] == 4
    sock.close()


def test_a_client_gone_while_its_backend_is_silent_is_released_at_the_deadline(
        make: Make, backend: ScriptedBackend) -> None:
    w = make(**{"timeouts.backend_read": 0.5})
    sock = connect(w)
    warm(w, sock)
    sock.sendall(get("/silent"))
    assert until(lambda: len(backend.requests) == 2) and in_hub(w)
    sock.close()  # nothing reads the client while it waits: the deadline ends it
    assert until(lambda: w.slots.open == 0 and w.stats.open_connections == 0)
    assert_released(w, completed=2)
