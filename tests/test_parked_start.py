"""A new plain connection starts parked: its first request is served in the hub
(`balancer.connection.Context.start`, `balancer.inline.serve_new`), and every
hostile or uncommon first packet ends exactly as a greenlet's start ended it.

The same in-process worker and scripted backend as tests/test_inline.py;
`greenlet.settrace` counts the switches into the worker's connection greenlets
(`switches`)."""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.socket as gsocket
import pytest
from greenlet import greenlet

from balancer.server import DRAIN_IDLE
from tests import test_inline
from tests.test_inline import (
    Client,
    Make,
    ScriptedBackend,
    assert_released,
    connect,
    get,
    in_hub,
    parked,
    response,
    until,
)

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)
backend = test_inline.backend  # the fixtures: a scripted backend, a worker in front of it
make = test_inline.make


@pytest.fixture
def switches() -> Iterator[Callable[[Any], list[int]]]:
    """Count the switches into the worker's connection greenlets (those its `Slots`
    run: a greenlet's start, a hand-off, a close that needs one) from now on:
    zero means the hub did it all, with no greenlet."""
    previous = greenlet.gettrace()

    def start(w: Any) -> list[int]:
        count = [0]
        busy = w.slots.busy  # a greenlet is in it while it serves a connection

        def trace(event: str, args: Any) -> None:
            if event in ("switch", "throw") and args[1] in busy:
                count[0] += 1

        greenlet.settrace(trace)
        return count

    yield start
    greenlet.settrace(previous)


def pooled(w: Any) -> None:
    """One backend connection in the pool (its first request needed a greenlet to
    connect it), and no client connection open."""
    sock = connect(w)
    sock.sendall(get("/pool", "Connection: close\r\n"))
    assert response(sock)[0] == 200
    sock.close()
    assert until(lambda: w.slots.open == 0 and not w.slots.busy)


def pooled_many(w: Any, backend: ScriptedBackend, count: int) -> None:
    """`count` backend connections in the pool: as many requests at once."""
    backend.release.clear()
    socks = [connect(w) for _ in range(count)]
    for sock in socks:
        sock.sendall(get("/pool", "Connection: close\r\n"))
    assert until(lambda: len(backend.requests) == count)
    backend.release.set()
    for sock in socks:
        assert response(sock)[0] == 200
        sock.close()
    assert until(lambda: w.slots.open == 0 and not w.slots.busy)
    assert backend.connections == count


def closed_by_worker(sock: Client) -> bytes:
    """What the worker still sent, up to its close (EOF)."""
    data = b""
    while more := sock.recv(65536):
        data += more
    return data


def all_closed(w: Any) -> bool:
    return w.slots.open == 0 and w.stats.open_connections == 0 and not w.io.connections


# served in the hub -----------------------------------------------------------------
def test_a_new_connection_s_first_request_is_served_in_the_hub(
        make: Make, backend: ScriptedBackend, tmp_path: Path,
        switches: Callable[[Any], list[int]]) -> None:
    log = tmp_path / "access.log"
    w = make(**{"log.access_log": str(log), "log.access_format": "json"})
    w.access_log.start()
    pooled(w)
    ran = switches(w)
    sock = connect(w)
    assert until(lambda: parked(w))  # accepted: parked before its request came
    conn = next(iter(w.io.connections))
    assert conn.idle and w.slots.open == 1 and w.stats.open_connections == 1
    backend.release.clear()
    sock.sendall(get("/hold"))
    assert until(lambda: len(backend.requests) == 2)
    assert in_hub(w)  # waiting for the backend: no greenlet
    backend.release.set()
    status, fields, body = response(sock)
    assert (status, body) == (200, b"conn 1 /hold")  # on the pooled connection
    assert until(lambda: parked(w))
    sock.sendall(get("/next"))
    assert response(sock)[2] == b"conn 1 /next"
    sock.close()
    assert until(lambda: all_closed(w))  # its EOF closed it in the hub too
    assert ran == [0]
    assert_released(w, completed=3)
    w.access_log.close()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["target"] for r in records] == ["/pool", "/hold", "/next"]
    assert records[1]["request_id"] == fields["x-request-id"]
    assert len({r["request_id"] for r in records}) == 3
    assert all(r["status"] == 200 and r["backend"] == backend.address for r in records)


def test_a_first_request_already_there_at_accept_is_served_from_the_accept(
        make: Make, backend: ScriptedBackend,
        switches: Callable[[Any], list[int]]) -> None:
    w = make()
    pooled_many(w, backend, 3)
    ran = switches(w)
    listener = w.servers[0]
    listener.stop_accepting()
    socks = [connect(w) for _ in range(3)]
    for n, sock in enumerate(socks):
        sock.sendall(get(f"/at-accept-{n}"))
    listener.start_accepting()  # one wake-up accepts the three, each read at once
    for sock in socks:
        assert response(sock)[2].startswith(b"conn ")
        sock.close()
    assert until(lambda: all_closed(w))
    assert ran == [0]
    assert sorted(backend.paths()[3:]) == [b"/at-accept-0", b"/at-accept-1", b"/at-accept-2"]


@pytest.mark.parametrize(("extra", "version"), [("Connection: close\r\n", "1.1"), ("", "1.0")])
def test_a_request_closing_its_new_connection_is_served_and_closed_in_the_hub(
        make: Make, backend: ScriptedBackend, extra: str, version: str,
        switches: Callable[[Any], list[int]]) -> None:
    w = make()
    pooled(w)
    ran = switches(w)
    for n in range(3):
        sock = connect(w)
        sock.sendall(get(f"/close-{n}", extra, version))
        status, fields, body = response(sock)
        assert (status, body, fields["connection"]) == (200, b"conn 1 /close-%d" % n, "close")
        assert closed_by_worker(sock) == b""
        sock.close()
    assert until(lambda: all_closed(w))
    assert ran == [0] and backend.connections == 1
    assert_released(w, completed=4)


def test_a_closing_answer_the_socket_cannot_take_at_once_is_finished_by_a_greenlet(
        make: Make, backend: ScriptedBackend,
        switches: Callable[[Any], list[int]]) -> None:
    """Held whole (within HOLD_LIMIT) but more than the client's buffers take:
    the hub's one send leaves the rest to a greenlet, which sends it, then closes."""
    w = make()
    pooled(w)
    ran = switches(w)
    sock = connect(w, rcvbuf=4096)
    assert until(lambda: parked(w))
    conn = next(iter(w.io.connections))
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.sendall(get("/sized-60000-slow", "Connection: close\r\n"))
    assert until(lambda: ran[0] > 0)  # the close waits in a greenlet
    assert w.slots.open == 1
    gevent.sleep(0.05)  # (the reader is slow: nothing is read yet)
    status, fields, body = response(sock)
    assert (status, body, fields["connection"]) == (200, b"z" * 60000, "close")
    assert closed_by_worker(sock) == b""
    assert until(lambda: all_closed(w))
    assert_released(w, completed=2)


def test_without_a_pooled_connection_the_hub_connects_for_the_first_request(
        make: Make, backend: ScriptedBackend,
        switches: Callable[[Any], list[int]]) -> None:
    """No idle pooled connection: the hub opens one (`inline._connect`,
    tests/test_hub_connect.py), no greenlet."""
    w = make()
    ran = switches(w)
    sock = connect(w)
    sock.sendall(get("/first"))
    assert response(sock)[2] == b"conn 1 /first"  # it connected to the backend
    assert until(lambda: parked(w))
    sock.sendall(get("/second"))
    assert response(sock)[2] == b"conn 1 /second"  # the pooled connection's
    sock.close()
    assert until(lambda: all_closed(w))
    assert ran == [0] and backend.connections == 1


# hostile first packets: as a greenlet's start ended them --------------------------
def test_a_client_that_sends_nothing_is_closed_at_client_idle(make: Make,
        switches: Callable[[Any], list[int]]) -> None:
    w = make(**{"timeouts.client_idle": 1.0})
    ran = switches(w)
    sock = connect(w)
    started = time.monotonic()
    assert until(lambda: parked(w))
    sock.sock.settimeout(5)
    assert closed_by_worker(sock) == b""  # no answer: closed
    # (deadlines are armed against the watchdog's last tick: up to a tick early)
    assert 0.7 < time.monotonic() - started < 3.0
    assert until(lambda: all_closed(w))
    assert ran[0] > 0  # the watchdog's close, in a greenlet as before


@pytest.mark.parametrize("then", ["drip", "stop"])
def test_a_head_sent_slowly_gets_408_after_client_header(make: Make, backend: ScriptedBackend,
                                                          then: str) -> None:
    """client_header (0.6 s) counts from the head's first byte, whatever comes after
    it (a byte every 0.1 s: slowloris), not client_idle (5 s)."""
    w = make()
    sock = connect(w)
    assert until(lambda: parked(w))
    started = time.monotonic()
    sock.sendall(b"G")
    if then == "drip":
        for byte in b"ET /drip HTTP/1.1\r\nHost: app.test\r\nX-Slow: 1":
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break  # answered and closed
            gevent.sleep(0.1)
            if time.monotonic() - started > 3:
                break
    status, fields, _ = response(sock)
    assert status == 408 and fields["connection"] == "close"
    assert 0.2 < time.monotonic() - started < 3.0  # (armed against the last tick, which
    # lags the clock by up to a tick, more on a loaded machine)
    assert closed_by_worker(sock) == b""
    assert until(lambda: all_closed(w))
    assert backend.paths() == []


def test_a_whole_head_sent_a_byte_at_a_time_is_answered(make: Make,
                                                        backend: ScriptedBackend) -> None:
    w = make()
    pooled(w)
    sock = connect(w)
    for byte in get("/bytes"):
        sock.sendall(bytes([byte]))
        gevent.sleep(0.001)
    assert response(sock)[2] == b"conn 1 /bytes"
    assert until(lambda: parked(w))
    sock.close()
    assert until(lambda: all_closed(w))


def test_half_a_head_then_a_close_is_closed_unanswered(make: Make,
                                                       backend: ScriptedBackend) -> None:
    w = make()
    sock = connect(w)
    sock.sendall(b"GET /half HTTP/1.1\r\nHost: app")
    sock.sock.shutdown(socket.SHUT_WR)
    assert closed_by_worker(sock) == b""
    assert until(lambda: all_closed(w))
    assert backend.paths() == []
    assert w.stats.snapshot()["hosts"].get("app.test", {}).get("completed_requests", 0) == 0


@pytest.mark.parametrize("garbage", [b"HELLO\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc",
                                     b"GET / HTTP/1.1\r\nHost app.test\r\n\r\n"])
def test_garbage_gets_400_and_a_close(make: Make, backend: ScriptedBackend,
                                      garbage: bytes) -> None:
    w = make()
    sock = connect(w)
    sock.sendall(garbage)
    status, fields, _ = response(sock)
    assert status == 400 and fields["connection"] == "close" and fields["x-request-id"]
    assert closed_by_worker(sock) == b""  # half-closed: it lingers while we may send
    sock.close()
    assert until(lambda: all_closed(w))
    assert backend.paths() == []


@pytest.mark.parametrize("send", [b"", b"GET /reset HTTP/1.1\r\nHo"])
def test_a_client_that_resets_at_once_leaves_nothing_open(make: Make, backend: ScriptedBackend,
                                                          send: bytes) -> None:
    w = make()
    pooled(w)
    for _ in range(3):
        sock = connect(w)
        if send:
            sock.sendall(send)
        sock.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset
    assert until(lambda: all_closed(w))
    sock = connect(w)  # the worker goes on
    sock.sendall(get("/after"))
    assert response(sock)[2] == b"conn 1 /after"
    sock.close()
    assert backend.paths() == [b"/pool", b"/after"]


def test_a_client_that_connects_and_closes_is_closed_in_the_hub(make: Make,
        switches: Callable[[Any], list[int]]) -> None:
    w = make()
    ran = switches(w)
    for _ in range(3):
        sock = connect(w)
        assert until(lambda: parked(w))
        sock.close()
        assert until(lambda: all_closed(w))
    assert ran == [0]


def test_two_requests_in_the_first_packet_are_answered_in_order(
        make: Make, backend: ScriptedBackend) -> None:
    w = make()
    pooled(w)
    sock = connect(w)
    sock.sendall(get("/p1") + get("/p2"))
    assert response(sock)[2] == b"conn 1 /p1"
    assert response(sock)[2] == b"conn 1 /p2"
    assert until(lambda: parked(w))
    sock.close()
    assert until(lambda: all_closed(w))
    assert_released(w, completed=3)


def test_a_first_request_with_a_body_is_answered(make: Make, backend: ScriptedBackend) -> None:
    w = make()
    pooled(w)
    sock = connect(w)
    sock.sendall(b"POST /post HTTP/1.1\r\nHost: app.test\r\nContent-Length: 4\r\n\r\nbody")
    assert response(sock)[2] == b"conn 1 /post"
    assert backend.requests[-1][1].endswith(b"\r\n\r\nbody")
    sock.close()
    assert until(lambda: all_closed(w))
    assert_released(w, completed=2)


# the worker's side -------------------------------------------------------------------
def test_max_connections_counts_parked_new_connections(make: Make,
                                                       backend: ScriptedBackend) -> None:
    w = make(**{"server.max_connections": 2})
    pooled(w)
    first, second = connect(w), connect(w)
    assert until(lambda: w.slots.open == 2 and w.slots.is_full())
    third = connect(w)  # in the kernel's queue: not accepted while full
    third.sendall(get("/third"))
    third.sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        third.sock.recv(10)
    assert w.slots.open == 2 and len(w.io.connections) == 2
    first.close()  # a slot frees: the listener resumes and takes the third
    third.sock.settimeout(5)
    assert response(third)[2] == b"conn 1 /third"
    second.sendall(get("/second"))
    assert response(second)[2] == b"conn 1 /second"
    for sock in (second, third):
        sock.close()
    assert until(lambda: all_closed(w))


def test_a_draining_worker_closes_fresh_connections(make: Make,
                                                    backend: ScriptedBackend) -> None:
    """Idle (never sent a byte): closed within DRAIN_IDLE; one whose first request
    comes meanwhile: answered with Connection: close, then closed."""
    w = make()
    pooled(w)
    idle, asking = connect(w), connect(w)
    assert until(lambda: len(w.io.connections) == 2)
    started = time.monotonic()
    stopper = gevent.spawn(w.stop, 10.0)
    assert until(lambda: w.draining)
    asking.sendall(get("/draining"))
    status, fields, body = response(asking)
    assert (status, body, fields["connection"]) == (200, b"conn 1 /draining", "close")
    assert closed_by_worker(asking) == b""
    assert closed_by_worker(idle) == b""
    assert time.monotonic() - started < DRAIN_IDLE + 1.5
    stopper.join(timeout=10)
    assert stopper.dead and w.slots.open == 0 and w.stats.open_connections == 0
    with pytest.raises(OSError):  # no longer listening
        gsocket.create_connection(w.servers[0].address, timeout=1).recv(1)


@pytest.mark.parametrize("when", ["first", "after-a-request"])
def test_a_head_with_a_broken_chunked_body_in_its_read_is_refused(
        make: Make, backend: ScriptedBackend, when: str) -> None:
    """The read's bad chunk framing raises before any complete request: 400 and a
    close, the head it broke never forwarded (bug: the hub's hand-off left that
    head in the parser's events, and the greenlet served it, waiting for a body)."""
    w = make()
    pooled(w)
    sock = connect(w)
    if when == "after-a-request":
        sock.sendall(get("/before"))
        assert response(sock)[2] == b"conn 1 /before"
        assert until(lambda: parked(w))
    sock.sendall(b"POST /broken HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n"
                 b"\r\nzz\r\n" + get("/next"))
    status, fields, _ = response(sock)
    assert status == 400 and fields["connection"] == "close"
    assert closed_by_worker(sock) == b""
    assert b"/broken" not in backend.paths() and b"/next" not in backend.paths()
    sock.close()
    assert until(lambda: all_closed(w))


@pytest.mark.parametrize("extra", ["", "Connection: close\r\n"])
def test_a_request_then_a_half_close_is_answered_then_closed(
        make: Make, backend: ScriptedBackend, extra: str,
        switches: Callable[[Any], list[int]]) -> None:
    w = make()
    pooled(w)
    ran = switches(w)
    sock = connect(w)
    sock.sendall(get("/half-closed", extra))
    sock.sock.shutdown(socket.SHUT_WR)  # its FIN right behind the request
    assert response(sock)[2] == b"conn 1 /half-closed"
    assert closed_by_worker(sock) == b""
    assert until(lambda: all_closed(w))
    assert ran == [0]
    assert_released(w, completed=2)
