"""A plain backend pool's slot (`balancer.pool.Backend.last`): the connection
released last waits there, the others in the list before it. Handed out
newest first, counted against `max_idle` and the worker's descriptors, and
checked as any idle connection (its age, what arrived on it) before it is
handed out. Real sockets: a listening backend, gevent's loop and streams."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from balancer.netio import GeventIO
from balancer.pool import Backend, BackendRegistry, IdleBudget, Upstream
from balancer.serving import Slots
from tests.support import acquire, loop_until

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)


class Peer:
    """A listening backend and the server side of each connection made to it."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.ends: dict[tuple[str, int], socket.socket] = {}

    def connect(self, backend: Backend, count: int) -> list[Upstream]:
        made = [backend.connect() for _ in range(count)]
        for _ in made:
            sock, address = self.listener.accept()
            self.ends[address] = sock
        return made

    def end_of(self, upstream: Upstream) -> socket.socket:
        return self.ends[upstream.sock.getsockname()]

    def close(self) -> None:
        self.listener.close()
        for sock in self.ends.values():
            sock.close()


@pytest.fixture
def peer() -> Iterator[Peer]:
    made = Peer()
    yield made
    made.close()


def registry(**kwargs: object) -> BackendRegistry:
    return BackendRegistry(connect_timeout=5, fail_timeout=10, io=GeventIO(), **kwargs)


def test_the_connection_released_last_is_handed_out_first(peer: Peer) -> None:
    budget = IdleBudget()
    backend = registry(budget=budget).get(peer.address)
    made = peer.connect(backend, 3)
    for upstream in made:
        backend.release(upstream)
    assert backend.last is made[2] and backend.idle == made[:2] and budget.idle == 3
    assert backend.pooled() == made
    taken = [acquire(backend) for _ in range(3)]
    assert taken == [(made[2], True), (made[1], True), (made[0], True)]
    assert backend.pooled() == [] and budget.idle == 0
    backend.release(made[0])
    backend.release(made[1])  # the slot's connection goes to the list, before it
    assert backend.idle == [made[0]] and backend.last is made[1]
    for upstream in made:
        upstream.close()


def test_a_slotted_connection_the_backend_closed_is_never_handed_out(peer: Peer) -> None:
    budget = IdleBudget()
    backend = registry(budget=budget).get(peer.address)
    (alone,) = peer.connect(backend, 1)
    backend.release(alone)
    assert backend.last is alone
    peer.end_of(alone).close()  # EOF while idle
    assert loop_until(lambda: not alone.stream.is_clean())
    assert backend.acquire_idle() is None  # closed on the way, nothing else idle
    assert alone.sock.fileno() == -1 and backend.last is None and budget.idle == 0


def test_a_stale_slotted_connection_is_closed_and_the_list_s_newest_handed_out(
        peer: Peer) -> None:
    budget = IdleBudget()
    backend = registry(budget=budget, idle_timeout=30.0).get(peer.address)
    older, newer, newest = peer.connect(backend, 3)
    for upstream in (older, newer, newest):
        backend.release(upstream)
    newest.since -= 60.0  # past the idle timeout (only it: the test's doing)
    assert backend.acquire_idle() is newer and newest.sock.fileno() == -1
    peer.end_of(older).sendall(b"HTTP/1.1 200 OK\r\n")  # bytes while idle
    backend.release(newer)  # in the slot again, `older` alone in the list
    assert loop_until(lambda: not older.stream.is_clean())
    assert backend.acquire_idle() is newer and budget.idle == 1
    assert backend.acquire_idle() is None and older.sock.fileno() == -1
    assert budget.idle == 0
    newer.close()


def test_max_idle_counts_the_slot(peer: Peer) -> None:
    budget = IdleBudget()
    backend = registry(budget=budget, max_idle=2).get(peer.address)
    made = peer.connect(backend, 3)
    for upstream in made:
        backend.release(upstream)
    assert backend.pooled() == made[:2] and budget.idle == 2
    assert made[2].sock.fileno() == -1  # over max_idle: closed, not kept
    for upstream in made[:2]:
        upstream.close()


def test_the_slot_is_a_backend_s_oldest_when_its_list_is_empty(peer: Peer) -> None:
    """The worker's descriptors: a new connection closes the oldest idle ones the
    clients need, the slot's included (`IdleBudget.make_room`)."""
    budget = IdleBudget(descriptors=11)
    budget.slots = Slots(100)
    budget.slots.open = 1
    backends = registry(budget=budget)
    a = backends.get(peer.address)
    other = Peer()
    try:
        b = backends.get(other.address)
        (alone,) = peer.connect(a, 1)
        kept = other.connect(b, 3)
        a.release(alone)  # older than any of b's
        for upstream in kept:
            b.release(upstream)
        assert budget.idle == 4 and a.last is alone and b.last is kept[2]
        budget.slots.open = 4  # three more clients: 11 - 2 * 4 = 3 may stay
        fresh = other.connect(b, 1)[0]  # needs a descriptor: the oldest idle one goes
        assert alone.sock.fileno() == -1 and a.last is None and a.pooled() == []
        assert budget.idle == 3 and b.pooled() == kept
        for upstream in (*kept, fresh):
            upstream.close()
    finally:
        other.close()


def test_the_sweep_and_a_stirred_drop_close_the_slot_s_connection(peer: Peer) -> None:
    budget = IdleBudget()
    backends = registry(budget=budget, idle_timeout=30.0)
    backend = backends.get(peer.address)
    older, newest = peer.connect(backend, 2)
    for upstream in (older, newest):
        backend.release(upstream)
    newest.since -= 60.0  # past the idle timeout
    assert backends.sweep() == 1 and backend.last is None and backend.idle == [older]
    assert newest.sock.fileno() == -1 and budget.idle == 1
    taken = backend.acquire_idle()
    assert taken is older
    backend.release(older)  # alone: in the slot
    peer.end_of(older).close()  # EOF while idle
    assert loop_until(lambda: not older.stream.is_clean())
    assert backend.drop({older}) == 1 and backend.pooled() == [] and budget.idle == 0


def test_a_clock_reading_given_is_the_idle_start_and_the_age_check_s_now(peer: Peer) -> None:
    """The hub reads the clock once for several steps and hands the reading to
    `release` (the idle time's start) and `acquire_idle` (the age check)."""
    budget = IdleBudget()
    backend = registry(budget=budget, idle_timeout=30.0).get(peer.address)
    older, newer = peer.connect(backend, 2)
    now = time.monotonic()
    backend.release(older, now - 20.0)
    backend.release(newer, now)
    assert (older.since, newer.since) == (now - 20.0, now)
    assert backend.acquire_idle(now + 29.0) is newer  # idle 29 s by that reading
    backend.release(newer, now)
    # by a reading 31 s on, `newer` is past the idle timeout, and `older` (51 s)
    assert backend.acquire_idle(now + 31.0) is None
    assert newer.sock.fileno() == -1 and older.sock.fileno() == -1 and budget.idle == 0
