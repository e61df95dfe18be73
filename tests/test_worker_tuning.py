"""How a worker admits connections and keeps sockets: eager greenlet starts,
accept batches, pool sizes, read watchers, and the garbage-collector setting."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from types import SimpleNamespace

import gevent
import pytest

from balancer.addr import parse_backend_addr
from balancer.errors import ConnectError
from balancer.netio import IO, GeventIO
from balancer.pool import Backend, Upstream
from balancer.response_parser import ResponseParser
from balancer.server import SHARED_ACCEPT_BATCH, EagerPool, Worker
from balancer.settings import load_settings

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


# accepted connections start at once ------------------------------------------------
def test_a_greenlet_spawned_from_the_hub_runs_before_spawn_returns() -> None:
    pool, order = EagerPool(10), []

    def accept() -> None:  # runs in the hub, as StreamServer's accept callback does
        pool.spawn(order.append, "served")
        order.append("spawn returned")

    gevent.get_hub().loop.run_callback(accept)
    gevent.sleep(0)
    pool.join(timeout=5)
    assert order == ["served", "spawn returned"]


def test_a_greenlet_spawned_elsewhere_starts_from_the_loop_as_usual() -> None:
    pool, order = EagerPool(10), []
    pool.spawn(order.append, "served")
    order.append("spawn returned")
    pool.join(timeout=5)
    assert order == ["spawn returned", "served"]


def test_the_eager_pool_still_counts_against_its_size() -> None:
    pool = EagerPool(2)
    blockers = [pool.spawn(gevent.sleep, 0.2) for _ in range(2)]
    assert pool.full()
    gevent.joinall(blockers, timeout=5)
    assert not pool.full() and len(pool) == 0


# accept batches and pool sizes ---------------------------------------------------
def test_one_worker_takes_every_waiting_connection_per_wake_up() -> None:
    one = worker(**{"server.workers": 1, "server.max_connections": 1234})
    assert one.accept_batch() == 1234


def test_workers_sharing_a_listener_take_a_few_each() -> None:
    assert worker(**{"server.workers": 2}).accept_batch() == SHARED_ACCEPT_BATCH


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
    back, reused = pool.acquire()
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
            pool.acquire()  # the expired one is dropped, then nothing listens on :9
    assert watcher.closed and parser.closed and a.fileno() == -1 and pool.idle == []
    b.close()


@pytest.mark.parametrize("evented", [False, True])
def test_a_new_connection_has_a_watcher_only_under_gevent(evented: bool) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        pool = Backend(parse_backend_addr(f"127.0.0.1:{port}"), connect_timeout=5,
                       fail_timeout=1, io=GeventIO() if evented else IO())
        upstream, reused = pool.acquire()
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
