"""How a worker admits connections and keeps sockets: eager greenlet starts,
accept batches, pool sizes, read watchers, and the garbage-collector setting."""

from __future__ import annotations

import json
import platform
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import gevent
import gevent.socket as gsocket
import greenlet
import pytest

from balancer.accepting import bind
from balancer.addr import parse_addr, parse_backend_addr
from balancer.errors import ConnectError
from balancer.netio import CROWDED, IO, PARK_AFTER, GeventIO
from balancer.pool import Backend, Upstream
from balancer.response_parser import ResponseParser
from balancer.server import SHARED_ACCEPT_BATCH, Worker
from balancer.serving import Slots
from balancer.settings import load_settings
from tests.rawpeer import read_until
from tests.support import acquire

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)


class NoStore:
    """The part of the store interface a Worker touches before it starts."""

    display_url = "none"

    def load(self) -> SimpleNamespace:
        return SimpleNamespace(version=1, hosts={})

    def identity(self) -> str:
        return self.display_url

    def close(self) -> None:
        pass


def worker(**flags: object) -> Worker:
    return Worker(load_settings(flags=flags, env={}), NoStore())


# accepted connections start at once, in greenlets kept for the next one -----------
def test_a_connection_started_from_the_hub_runs_before_start_returns() -> None:
    slots, order = Slots(10), []

    def accept() -> None:  # runs in the hub, as StreamServer's accept callback does
        slots.start(order.append, ("served",))
        order.append("start returned")

    gevent.get_hub().loop.run_callback(accept)
    gevent.sleep(0)
    assert slots.join(timeout=5)
    assert order == ["served", "start returned"]


def test_a_connection_started_elsewhere_starts_from_the_loop() -> None:
    slots, order = Slots(10), []
    slots.start(order.append, ("served",))
    order.append("start returned")
    assert slots.join(timeout=5)
    assert order == ["start returned", "served"]


def test_slots_count_against_their_size_and_are_reused() -> None:
    slots, seen = Slots(2), []

    def serve(seconds: float) -> None:
        seen.append(greenlet.getcurrent())
        gevent.sleep(seconds)

    for _ in range(2):
        slots.start(serve, (0.05,))
    gevent.sleep(0)
    assert slots.is_full() and len(slots) == 2
    assert slots.join(timeout=5)
    assert not slots.is_full() and len(slots) == 0 and len(slots.idle) == 2
    slots.start(serve, (0,))
    assert slots.join(timeout=5)
    assert seen[2] in seen[:2]  # a parked greenlet served the third connection
    assert len(slots.idle) == 2


def test_a_failing_handler_frees_its_slot_and_its_greenlet_serves_again() -> None:
    slots, served = Slots(1), []

    def boom() -> None:
        raise ValueError("a bug in a handler")

    gevent.get_hub().handle_error = lambda *args: served.append("reported")  # type: ignore
    try:
        slots.start(boom, ())
        assert slots.join(timeout=5)
        slots.start(served.append, ("next",))
        assert slots.join(timeout=5)
    finally:
        del gevent.get_hub().handle_error
    assert served == ["reported", "next"] and not slots.is_full()


def test_shrink_ends_the_longest_parked_greenlets_and_the_rest_serve_on() -> None:
    """After a burst (`Worker.quiet_loop`): the parked greenlets beyond `keep` end,
    the oldest first; the kept ones serve the next connections."""
    slots, served = Slots(10), []
    for _ in range(6):
        slots.start(gevent.sleep, (0.01,))
    assert slots.join(timeout=5) and len(slots.idle) == 6
    parked = list(slots.idle)
    assert slots.shrink(2) == 4 and slots.idle == parked[4:]
    assert slots.shrink(2) == 0
    gevent.sleep(0)  # they end from the loop
    assert all(task.dead for task in parked[:4]) and not any(t.dead for t in parked[4:])
    slots.start(lambda: served.append(greenlet.getcurrent()), ())
    assert slots.join(timeout=5)
    assert served[0] in parked[4:] and len(slots.idle) == 2 and len(slots) == 0


def test_the_heap_is_given_back_where_the_c_library_can() -> None:
    from balancer import heap

    assert heap.release() == (heap._TRIM is not None)
    if platform.libc_ver()[0] == "glibc":
        assert heap._TRIM is not None  # glibc has malloc_trim


def test_a_late_timeout_for_an_ended_connection_is_dropped_while_parked() -> None:
    slots, served = Slots(4), []
    slots.start(served.append, ("first",))
    assert slots.join(timeout=5)
    parked = slots.idle[0]
    gevent.get_hub().loop.run_callback(parked.throw, TimeoutError("deadline passed"))
    gevent.sleep(0)
    slots.start(served.append, ("second",))
    assert slots.join(timeout=5)
    assert served == ["first", "second"] and slots.idle == [parked]


def test_kill_ends_served_and_parked_greenlets() -> None:
    slots, ended = Slots(4), []

    def serve() -> None:
        try:
            gevent.sleep(30)
        finally:
            ended.append("cleaned up")

    slots.start(ended.append, ("served",))
    assert slots.join(timeout=5)
    parked = slots.idle[0]
    slots.start(serve, ())
    slots.start(serve, ())
    gevent.sleep(0)
    slots.kill(timeout=5)
    assert ended == ["served", "cleaned up", "cleaned up"] and len(slots) == 0
    assert parked.dead and not slots.idle


def test_a_worker_keeps_at_most_keep_parked_greenlets() -> None:
    slots = Slots(10, keep=1)
    for _ in range(3):
        slots.start(gevent.sleep, (0.01,))
    assert slots.join(timeout=5)
    assert len(slots.idle) == 1


# accept batches and pool sizes ---------------------------------------------------
def test_one_worker_takes_every_waiting_connection_per_wake_up() -> None:
    one = worker(**{"server.workers": 1, "server.max_connections": 1234})
    assert one.accept_batch() == 1234


def test_workers_sharing_a_listener_take_a_few_each() -> None:
    assert worker(**{"server.workers": 2}).accept_batch() == SHARED_ACCEPT_BATCH
    shared = bind(parse_addr("127.0.0.1:0"))
    assert worker(**{"server.workers": 2}).accept_batch(shared) == SHARED_ACCEPT_BATCH
    shared.close()


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT")
def test_a_worker_with_its_own_socket_takes_every_waiting_connection() -> None:
    own = bind(parse_addr("127.0.0.1:0"), reuseport=True)
    two = worker(**{"server.workers": 2, "server.max_connections": 1234})
    assert two.accept_batch(own) == 1234
    own.close()


def test_backend_pools_keep_as_many_idle_connections_as_the_worker_has_clients() -> None:
    w = worker(**{"server.max_connections": 4321})
    assert w.registry.get("127.0.0.1:9").max_idle == 4321


# read watchers (and response parsers) travel with pooled sockets ---------------
def backend(**kwargs: object) -> Backend:
    return Backend(parse_backend_addr("127.0.0.1:9"), connect_timeout=1, fail_timeout=1,
                   **kwargs)


def test_a_released_connection_comes_back_with_its_watcher_and_parser() -> None:
    pool, (a, b) = backend(), socket.socketpair()
    upstream = Upstream(stream := GeventIO().stream(a))
    upstream.parser = parser = ResponseParser()
    pool.release(upstream)
    back, reused = acquire(pool)
    assert reused and back is upstream
    assert (back.sock, back.stream, back.parser) == (a, stream, parser)
    a.close()
    b.close()


@pytest.mark.parametrize("how", ["close_idle", "expired", "over max_idle"])
def test_closing_a_pooled_connection_closes_its_watcher(how: str) -> None:
    pool = backend(max_idle=0 if how == "over max_idle" else 4,
                   idle_timeout=0.0 if how == "expired" else 30.0)
    a, b = socket.socketpair()
    upstream = Upstream(stream := GeventIO().stream(a))
    watcher = stream.watcher
    upstream.parser = parser = ResponseParser()
    pool.release(upstream)
    if how == "close_idle":
        assert pool.close_idle() == 1
    elif how == "expired":
        with pytest.raises(ConnectError, match="127.0.0.1:9"):
            acquire(pool)  # the expired one is dropped, then nothing listens on :9
    assert watcher.closed and parser._hp is None and a.fileno() == -1 and pool.pooled() == []
    b.close()


@pytest.mark.parametrize("evented", [False, True])
def test_a_new_connection_has_a_watcher_only_under_gevent(evented: bool) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        pool = Backend(parse_backend_addr(f"127.0.0.1:{port}"), connect_timeout=5,
                       fail_timeout=1, io=GeventIO() if evented else IO())
        upstream, reused = acquire(pool)
        assert not reused and hasattr(upstream.stream, "watcher") is evented
        assert upstream.parser is None  # made by the relay on first use
        upstream.close()
        assert upstream.sock.fileno() == -1


# garbage collection in a serving worker -----------------------------------------
def test_a_serving_worker_collects_less_often() -> None:
    code = ("import gc, json; from balancer.workers import GC_THRESHOLDS, tune_gc; "
            "tune_gc(); print(json.dumps([gc.get_threshold(), GC_THRESHOLDS, "
            "gc.get_freeze_count()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    threshold, wanted, frozen = json.loads(out)
    assert threshold == wanted and threshold[0] > 700
    assert frozen > 1000  # start-up objects moved out of every collection


# TCP_NODELAY: set once on the listener, inherited by every accepted socket -------
def test_listening_sets_nodelay_once_and_accepted_sockets_inherit_it() -> None:
    w = worker()
    listener = socket.create_server(("127.0.0.1", 0))  # made without TCP_NODELAY
    assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    listener.setblocking(False)
    w.listen([(listener, False)])
    try:
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        probe = socket.create_server(("127.0.0.1", 0))
        probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with socket.create_connection(probe.getsockname(), timeout=5):
            accepted, _ = probe.accept()  # what the handler no longer sets itself
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            accepted.close()
        probe.close()
    finally:
        for server in w.servers:
            server.close()


# idle keep-alive connections wait parked, with no greenlet -----------------------
class StaticStore(NoStore):
    def raise_floor(self, version: int) -> None:
        pass

    def load(self) -> SimpleNamespace:
        return SimpleNamespace(version=1, hosts={
            "*": {"action": "static", "status": 200, "body": "ok"}})


GET = b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n"


CLIENT_IDLE = 0.6  # the test workers' client_idle (and client_header)
PARKS_AFTER = min(PARK_AFTER, CLIENT_IDLE / 2)  # idle in its greenlet before it parks


@pytest.fixture
def unwatched() -> Iterator[Worker]:
    """A gevent worker answering 200 "ok" on a loopback listener, with no
    watchdog: nothing times out or parks for being idle unless the test calls
    `IO.expire` itself, so a slow machine cannot change what it sees."""
    w = Worker(load_settings(flags={"timeouts.client_idle": CLIENT_IDLE,
                                    "timeouts.client_header": CLIENT_IDLE},
                             env={"BALANCER_STORE_SNAPSHOT": "off"}), StaticStore())
    assert w.apply(w.store.load())
    w.listen([(bind(parse_addr("127.0.0.1:0")), False)])
    yield w
    w.stopping = True
    for server in w.servers:
        server.close()


@pytest.fixture
def served(unwatched: Worker) -> Iterator[Worker]:
    """The same worker with its watchdog running."""
    watchdog = gevent.spawn(unwatched.watchdog_loop)
    yield unwatched
    unwatched.stopping = True
    watchdog.join(timeout=5)


def connect(w: Worker) -> gsocket.socket:
    conn = gsocket.create_connection(w.servers[0].address, timeout=5)
    conn.settimeout(5)
    return conn


def read_response(conn: gsocket.socket) -> bytes:
    return read_until(conn, b"\r\n\r\nok")


def accept_queue(listener: socket.socket) -> int:
    """Connections waiting in a listening socket's accept queue (Linux: TCP_INFO's
    tcpi_unacked is the listener's backlog)."""
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("I", info, 24)[0]


def until(predicate: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.01)
    return True


def test_an_idle_keep_alive_connection_holds_no_greenlet_and_serves_its_next_request(
        unwatched: Worker) -> None:
    slots = unwatched.slots
    conn = connect(unwatched)
    for _ in range(3):
        conn.sendall(GET)
        assert read_response(conn).startswith(b"HTTP/1.1 200")
        (client,) = unwatched.io.connections
        assert until(lambda c=client: c.idle)
        unwatched.io.expire(client.deadline - CLIENT_IDLE + PARKS_AFTER + 0.01)  # idle a while
        assert until(lambda: not slots.busy)
        assert slots.open == 1 and unwatched.stats.open_connections == 1
        assert client.task is None and client.idle
    assert len(slots.idle) == 1  # one greenlet served all three requests
    conn.close()
    assert until(lambda: slots.open == 0 and unwatched.stats.open_connections == 0)


def test_a_busy_connection_keeps_its_greenlet_until_idle_for_park_after(
        unwatched: Worker) -> None:
    """Below CROWDED connections, a keep-alive connection waits in its greenlet
    (no park and wake per request) and is parked only once idle a while: the
    watchdog's steps are taken by hand, at the clock readings that decide."""
    conn = connect(unwatched)
    conn.sendall(GET)
    assert read_response(conn).startswith(b"HTTP/1.1 200")
    (client,) = unwatched.io.connections
    assert until(lambda: client.idle)
    assert client.task is not None  # after the answer: still in its greenlet
    began = client.deadline - CLIENT_IDLE  # when its idle wait began (watchdog clock)
    unwatched.io.expire(began + PARKS_AFTER - 0.01)  # not idle long enough yet
    gevent.sleep(0)
    assert client.task is not None and unwatched.slots.busy
    unwatched.io.expire(began + PARKS_AFTER + 0.01)
    assert until(lambda: client.task is None and not unwatched.slots.busy)  # then parked
    conn.sendall(GET)
    assert read_response(conn).startswith(b"HTTP/1.1 200")
    conn.close()


def test_a_crowded_worker_parks_every_connection_as_soon_as_it_answered(
        unwatched: Worker) -> None:
    """With no watchdog nothing parks for being idle (nor times out while the
    connections are made): a connection that parks did so as it answered."""
    clients = [connect(unwatched) for _ in range(CROWDED + 20)]
    try:
        assert until(lambda: len(unwatched.io.connections) == len(clients), 30)
        for conn in clients:
            conn.sendall(GET)
        for conn in clients:
            assert read_response(conn).startswith(b"HTTP/1.1 200")
        last = clients[-1]
        last.sendall(GET)
        assert read_response(last).startswith(b"HTTP/1.1 200")
        assert until(lambda: not unwatched.slots.busy)
        assert all(c.task is None for c in unwatched.io.connections)
    finally:
        for conn in clients:
            conn.close()


def test_a_parked_connection_is_closed_when_client_idle_passes(served: Worker) -> None:
    before = served.io.now  # the watchdog's clock, which deadlines count from
    conn = connect(served)
    conn.sendall(GET)
    read_response(conn)
    (client,) = served.io.connections
    assert until(lambda: client.idle)
    deadline = client.deadline
    assert deadline >= before + CLIENT_IDLE  # client_idle from after the request came
    assert conn.recv(100) == b""  # closed by the balancer, not by our timeout (5 s)
    assert time.monotonic() > deadline  # not before client_idle passed
    assert until(lambda: served.slots.open == 0 and not served.io.connections)


def test_a_parked_connection_that_sends_half_a_head_gets_408(served: Worker) -> None:
    conn = connect(served)
    conn.sendall(GET)
    read_response(conn)
    conn.sendall(b"GET / HTTP/1.1\r\nHost: app")
    data = b""
    while more := conn.recv(65536):
        data += more
    assert data.startswith(b"HTTP/1.1 408")
    assert until(lambda: served.slots.open == 0)


def test_pipelined_requests_are_answered_before_the_connection_parks(served: Worker) -> None:
    conn = connect(served)
    conn.sendall(GET * 3)
    data = b""
    while data.count(b"\r\n\r\nok") < 3:
        more = conn.recv(65536)
        assert more
        data += more
    assert data.count(b"HTTP/1.1 200") == 3
    assert until(lambda: not served.slots.busy and served.slots.open == 1)


def test_a_full_worker_counts_parked_connections_and_resumes_accepting(tmp_path: Any) -> None:
    w = Worker(load_settings(flags={"server.max_connections": 1, "timeouts.client_idle": 1.0},
                             env={"BALANCER_STORE_SNAPSHOT": "off"}), StaticStore())
    assert w.apply(w.store.load())
    w.listen([(bind(parse_addr("127.0.0.1:0")), False)])
    watchdog = gevent.spawn(w.watchdog_loop)  # parks the idle connection
    try:
        first = connect(w)
        first.sendall(GET)
        read_response(first)
        assert until(lambda: not w.slots.busy) and w.slots.is_full()
        second = connect(w)  # queued by the kernel, not accepted while the first is open
        second.sendall(GET)
        listener = w.servers[0].socket
        assert until(lambda: accept_queue(listener) == 1)
        gevent.idle()  # the loop polled: an accepting listener would have taken it
        assert w.slots.open == 1 and accept_queue(listener) == 1
        first.close()
        assert read_response(second).startswith(b"HTTP/1.1 200")
        second.close()
    finally:
        w.stopping = True
        watchdog.join(timeout=5)
        for server in w.servers:
            server.close()
