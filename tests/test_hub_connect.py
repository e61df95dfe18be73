"""The hub opens a new backend connection itself when the pool has none idle
(`balancer.inline._connect`): a non-blocking connect awaited in the loop, the
request sent on it from there. Every way a connect or a fresh connection
fails ends exactly as on the greenlet path: the same status, backend
counters, health and access-log record.

The greenlet path to compare with is the same request sent in two pieces:
the hub reads a partial head and hands the connection over, and the greenlet
serves the whole request (connect included) with the normal code. The same
in-process worker and scripted backend as tests/test_inline.py;
`greenlet.settrace` counts the switches into the worker's connection
greenlets (tests/test_parked_start.py). The deadlines around a connect:
tests/test_hub_connect_deadlines.py."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import balancer.inline
from balancer.server import Worker
from tests import test_inline, test_parked_start
from tests.hubconnect import ON, make_to, never_accepting, outcome
from tests.rawpeer import serve_each
from tests.support import InProcessWorkers, TableStore, dead_address
from tests.test_inline import (
    COMPILED,
    ScriptedBackend,
    assert_released,
    connect,
    get,
    parked,
    response,
    until,
)
from tests.test_parked_start import all_closed

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)
backend = test_inline.backend  # the fixtures: a scripted backend, a worker in front of it
make = test_inline.make
switches = test_parked_start.switches
__all__ = ["make_to"]  # the fixture


def compare(make_to: Callable[..., Worker], tmp_path: Path, address: str,
            switches: Callable[[Any], list[int]],
            pinch: Callable[[], Any] = contextlib.nullcontext,
            requests: int = 1) -> dict[str, Any]:
    """The outcome of `requests` failed GETs (each on a new connection) on a fresh
    worker for `address`, connected by the hub (one greenlet switch each: the
    hand-off of the failure) and by a greenlet (its head sent in two pieces:
    the hub hands the partial head over, the greenlet does the rest): the
    same; the hub's is returned. `pinch` is entered around the last bytes."""
    seen = {}
    for on in ON:
        w = make_to(address, on)
        ran = switches(w)
        statuses = []
        for _ in range(requests):
            sock = connect(w)
            assert until(lambda w=w: len(w.io.connections) == 1)  # accepted
            rest = get("/try")
            if on == "greenlet":
                sock.sendall(rest[:20])
                rest = rest[20:]
                assert until(lambda w=w: any(c.task is not None for c in w.io.connections))
            with pinch():
                sock.sendall(rest)
                statuses.append(response(sock)[0])
            sock.close()
            assert until(lambda w=w: all_closed(w))
        seen[on] = outcome(w, statuses, tmp_path, on)
        # the hub connected: one switch per request, into the greenlet the failure is
        # handed to (it writes the 502); the greenlet path's connect is its own
        assert (ran == [requests]) if on == "hub" else ran[0] > requests
    assert seen["hub"] == seen["greenlet"]
    return seen["hub"]


# served in the hub ---------------------------------------------------------------
def test_a_cold_pool_is_connected_and_served_in_the_hub(
        make: Callable[..., Worker], backend: ScriptedBackend,
        switches: Callable[[Any], list[int]]) -> None:
    w = make()
    ran = switches(w)
    socks = [connect(w) for _ in range(3)]
    backend.release.clear()
    for sock in socks:  # three at once: three connections opened
        sock.sendall(get("/hold"))
    assert until(lambda: len(backend.requests) == 3)
    assert all(c.task is None and c.exchange is not None for c in w.io.connections)
    backend.release.set()
    for sock in socks:
        assert response(sock)[0] == 200
    assert backend.connections == 3
    socks[0].sendall(get("/again"))  # a pooled one now
    assert response(socks[0])[2].startswith(b"conn ")
    assert backend.connections == 3
    for sock in socks:
        sock.close()
    assert until(lambda: all_closed(w))
    assert ran == [0]
    assert_released(w, completed=4)
    route = w.contexts[0].holder.table.lookup(b"app.test")
    assert len(route.action.backends[0].pooled()) == 3


def test_a_new_connection_has_nagle_off_like_the_greenlet_s(
        make: Callable[..., Worker], backend: ScriptedBackend) -> None:
    w = make()
    sock = connect(w)
    sock.sendall(get("/one"))
    assert response(sock)[0] == 200
    route = w.contexts[0].holder.table.lookup(b"app.test")
    (upstream,) = route.action.backends[0].pooled()
    assert upstream.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert upstream.sock.gettimeout() == 0.0
    sock.close()


# failures: as the greenlet path ends them -----------------------------------------
def test_a_refused_connect_is_a_502_counted_once(
        make_to: Callable[..., Worker], tmp_path: Path,
        switches: Callable[[Any], list[int]]) -> None:
    address = dead_address()
    seen = compare(make_to, tmp_path, address, switches)
    assert seen["status"] == 502 and seen["state"] == "up" and seen["fails"] == 1
    assert seen["failures"] == 1 and seen["outcomes"]["connect_error"] == 1
    assert seen["in_flight"] == (0, 0) and seen["open"] == 0 and seen["completed"] == 1
    assert seen["log"] == [{"status": 502, "backend": address, "target": "/try",
                            "method": "GET"}]


def test_refused_connects_mark_the_backend_down_after_fall_failures(
        make_to: Callable[..., Worker], tmp_path: Path,
        switches: Callable[[Any], list[int]]) -> None:
    """`fall` (3) connect failures in a row mark the backend down, as the greenlet
    path does; the fourth request finds no backend to try (502, no connect)."""
    address = dead_address()
    seen = compare(make_to, tmp_path, address, switches, requests=3)
    assert seen["status"] == [502] * 3 and seen["state"] == "down" and seen["fails"] == 3
    assert seen["failures"] == 3 and seen["outcomes"]["connect_error"] == 3
    assert seen["in_flight"] == (0, 0) and seen["completed"] == 3


def test_a_connect_that_times_out_is_a_502_after_the_connect_timeout(
        make_to: Callable[..., Worker], tmp_path: Path,
        switches: Callable[[Any], list[int]]) -> None:
    """A listener whose accept queue is full drops the SYN: the connect hangs
    until `timeouts.backend_connect`."""
    with never_accepting() as port:
        address = f"127.0.0.1:{port}"
        seen = compare(make_to, tmp_path, address, switches)
    assert seen["status"] == 502 and seen["state"] == "up" and seen["fails"] == 1
    assert seen["failures"] == 1 and seen["outcomes"]["connect_error"] == 1
    assert seen["in_flight"] == (0, 0) and seen["completed"] == 1


def closing_backend(linger: bool) -> tuple[socket.socket, str]:
    """A backend that accepts and closes at once, or (`linger`) resets once the
    request came (a reset at once races the connect's end: the connect fails,
    ECONNRESET, or the request does, on either path)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(sock: socket.socket) -> None:
        if linger:
            sock.settimeout(5)
            with contextlib.suppress(OSError):
                sock.recv(65536)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    serve_each(listener, serve)
    return listener, f"127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize("linger", [False, True], ids=["closes", "resets"])
def test_a_backend_that_closes_or_resets_at_once_is_a_502_counted_once(
        make_to: Callable[..., Worker], tmp_path: Path, linger: bool,
        switches: Callable[[Any], list[int]]) -> None:
    listener, address = closing_backend(linger)
    try:
        seen = compare(make_to, tmp_path, address, switches)
    finally:
        listener.close()
    assert seen["status"] == 502 and seen["state"] == "up" and seen["fails"] == 1
    assert seen["failures"] == 1 and seen["outcomes"]["error"] == 1
    assert seen["outcomes"]["connect_error"] == 0
    assert seen["in_flight"] == (0, 0) and seen["completed"] == 1 and seen["idle"] == 0


def test_no_descriptor_left_for_the_connection_is_a_502_counted_once(
        make_to: Callable[..., Worker], tmp_path: Path,
        switches: Callable[[Any], list[int]]) -> None:
    """The process's descriptor limit reached (EMFILE): the backend connection's
    socket cannot be made; a ConnectError, as the greenlet's connect raises it."""
    address = dead_address()

    @contextlib.contextmanager
    def no_descriptors() -> Iterator[None]:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        probe = os.open(os.devnull, os.O_RDONLY)  # the lowest free descriptor
        os.close(probe)
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    seen = compare(make_to, tmp_path, address, switches, no_descriptors)
    assert seen["status"] == 502 and seen["state"] == "up" and seen["fails"] == 1
    assert seen["failures"] == 1 and seen["outcomes"]["connect_error"] == 1
    assert seen["in_flight"] == (0, 0) and seen["completed"] == 1


# the descriptor budget ------------------------------------------------------------
@pytest.mark.parametrize("on", ON)
def test_a_new_connection_makes_room_among_the_idle_ones_first(
        backend: ScriptedBackend, switches: Callable[[Any], list[int]], on: str) -> None:
    """The worker's idle connections exceed what its open clients leave them
    (`IdleBudget`): a new connection, to another backend, closes the oldest
    idle one first (`make_room`), in the hub as in a greenlet."""
    other = ScriptedBackend()
    rules = {"app.test": {"action": "proxy", "backends": [backend.address]},
             "other.test": {"action": "proxy", "backends": [other.address]}}
    workers = InProcessWorkers()
    w = workers.start(TableStore(rules), {"timeouts.client_header": 2.0})
    try:
        sock = connect(w)
        sock.sendall(get("/one"))  # app.test's backend: one idle connection
        assert response(sock)[0] == 200
        assert until(lambda: w.budget.idle == 1 and parked(w))
        # one client open: room for no idle connection but its own
        w.budget.descriptors = 2 * w.slots.open
        ran = switches(w)
        rest = get("/two").replace(b"app.test", b"other.test")
        if on == "greenlet":
            sock.sendall(rest[:20])
            rest = rest[20:]
            assert until(lambda: any(c.task is not None for c in w.io.connections))
        sock.sendall(rest)
        assert response(sock)[2] == b"conn 1 /two"
        assert until(lambda: backend.ended == backend.connections == 1)  # closed first
        assert (ran == [0]) if on == "hub" else ran[0] > 0
        sock.close()
        assert until(lambda: all_closed(w))
    finally:
        workers.close()
        other.close()


# a bug in the hub's connect --------------------------------------------------------
# Injected by replacing functions in `balancer.inline`'s namespace, which compiled
# code does not look up: these run in the suite's interpreted pass (as
# tests/test_inline.py's faults).
@pytest.mark.skipif(COMPILED, reason="patches module globals: runs in the interpreted pass")
def test_a_fault_while_the_hub_connects_hands_the_connect_to_a_greenlet(
        make: Callable[..., Worker], backend: ScriptedBackend,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug raised once the hub began a connect (`_fault` with `Flight.connecting`):
    its wait stops, a greenlet waits for the rest of that same connect and sends
    the request on it, once; nothing stays in flight, the next request is the
    hub's on the pooled connection."""
    w = make()
    real = balancer.inline._connect
    faults: list[bool] = []

    def once(ex: Any, flight: Any) -> bool:
        waits = real(ex, flight)
        if not faults:
            faults.append(flight.connecting is not None)
            raise RuntimeError("a bug")
        return waits

    monkeypatch.setattr(balancer.inline, "_connect", once)
    sock = connect(w)
    sock.sendall(get("/faulty"))
    assert response(sock)[2] == b"conn 1 /faulty"
    assert faults == [True]  # the connect was in progress, awaited in the loop
    assert backend.connections == 1 and backend.paths() == [b"/faulty"]  # sent once
    assert until(lambda: parked(w))
    assert_released(w, completed=1)
    (bstats,) = w.stats.snapshot()["hosts"]["app.test"]["backends"].values()
    assert bstats["failures"] == 0
    sock.sendall(get("/after"))
    assert response(sock)[2] == b"conn 1 /after"
    sock.close()
    assert until(lambda: all_closed(w))
    assert_released(w, completed=2)


@pytest.mark.skipif(COMPILED, reason="patches module globals: runs in the interpreted pass")
def test_a_fault_sending_on_the_new_connection_is_a_502_not_the_backend_s(
        make: Callable[..., Worker], backend: ScriptedBackend,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug raised once the connect ended (`connect_ready`) and the new connection
    was taken: the try fails (HubFault, 502) in a greenlet, the connection is
    closed, never sent the request, and the backend is not blamed."""
    w = make()
    real = balancer.inline.dispatch
    faults: list[str] = []

    def once(*args: Any) -> Any:
        if not faults:
            faults.append("dispatch")
            raise RuntimeError("a bug")
        return real(*args)

    monkeypatch.setattr(balancer.inline, "dispatch", once)
    sock = connect(w)
    sock.sendall(get("/faulty"))
    assert response(sock)[0] == 502
    assert faults == ["dispatch"] and backend.paths() == []
    assert until(lambda: backend.ended == backend.connections == 1)  # closed
    assert until(lambda: parked(w))
    assert_released(w, completed=1)
    (bstats,) = w.stats.snapshot()["hosts"]["app.test"]["backends"].values()
    assert bstats["failures"] == 0
    sock.sendall(get("/after"))  # a new connection, in the hub again
    assert response(sock)[2] == b"conn 2 /after"
    sock.close()
    assert until(lambda: all_closed(w))
    assert_released(w, completed=2)
