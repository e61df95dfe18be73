"""`balancer.evgil` in real workers: each worker's gevent loop runs its batches
of pending callbacks in one hold of the GIL (the control socket's ``loop``),
under concurrent keep-alive load, through signals that arrive while the loop
runs (SIGHUP, SIGCHLD, then the SIGTERM of a stop under load), and with the
thread pool opening the access log's FIFO while the loop waits in epoll.
In-process cases: tests/test_evgil.py.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from balancer import evgil, native
from balancer.control import ask
from tests.support import Balancer, control_socket, request, wait_for

CONNECTIONS = 40  # keep-alive clients, one request in flight on each
ROUNDS = 10
REQUEST = b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n"
TIMEOUT = 20.0


def worker_pids(bal: Balancer) -> list[int]:
    return sorted(p["pid"] for p in bal.api("GET", "/api/v1/info")[1]["processes"])


def loop_of(pid: int) -> dict[str, Any]:
    reply = ask(control_socket(pid), "loop")
    assert reply is not None and "error" not in reply, reply
    return reply


def compiled_or_skip() -> None:
    if not native.compiled():
        pytest.skip("interpreted: the workers' callbacks take the GIL one by one, as gevent's own")


def read_answer(sock: socket.socket) -> int:
    """One whole response's status from a keep-alive connection."""
    answer = http.client.HTTPResponse(sock)
    answer.begin()
    answer.read()
    return answer.status


def load(port: int, rounds: int = ROUNDS, stop: Callable[[], bool] = lambda: False,
         got: list[Any] | None = None) -> list[Any]:
    """`rounds` of one request on each of CONNECTIONS keep-alive connections,
    all sent, then every answer read, until `stop()`; the statuses, or the error
    that ended a connection's answers (a stop under load: its last answer closes
    it), appended to `got` as they come."""
    got = [] if got is None else got
    conns = [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
             for _ in range(CONNECTIONS)]
    try:
        for _ in range(rounds):
            if stop():
                break
            live = []
            for conn in conns:
                try:
                    conn.sendall(REQUEST)
                    live.append(conn)
                except OSError as exc:
                    got.append(exc)
            for conn in live:
                try:
                    got.append(read_answer(conn))
                except (OSError, http.client.HTTPException) as exc:
                    got.append(exc)
            conns = [conn for conn in live if not isinstance(got[-1], Exception)]
    finally:
        for conn in conns:
            conn.close()
    return got


def test_a_worker_runs_batches_of_callbacks_in_one_hold_of_the_gil(
        backend: Any, proxy_to: Callable[..., Balancer]) -> None:
    compiled_or_skip()
    bal = proxy_to(backend, args=["--workers", "2"])
    pids = wait_for(lambda: len(worker_pids(bal)) == 2 and worker_pids(bal), what="2 workers")
    assert request(bal.port)[0] == 200
    before = {pid: loop_of(pid) for pid in pids}
    assert all(reply["holds_gil"] for reply in before.values()), before  # set up in each
    statuses = load(bal.port)
    assert statuses == [200] * (CONNECTIONS * ROUNDS)
    after = {pid: loop_of(pid) for pid in pids}
    holds = sum(after[pid]["holds"] - before[pid]["holds"] for pid in pids)
    held = sum(after[pid]["held"] - before[pid]["held"] for pid in pids)
    # 40 readinesses at once: a client's and a backend's per request, many per poll
    assert holds and held >= 2 * holds and held >= CONNECTIONS * ROUNDS // 2, (before, after)


@pytest.mark.data_plane  # the interpreted pass
def test_an_interpreted_worker_holds_the_gil_exactly_when_the_extension_loads(
        backend: Any, proxy_to: Callable[..., Balancer]) -> None:
    """The interpreted data plane with or without `balancer._evgil`: a
    `BALANCER_PURE=1` install has none, and its worker runs gevent's loop as it
    is (all counts 0); scripts/test.sh's interpreted pass copies the sources
    without their extensions, but the editable install's finder still finds
    the C extensions (not the interpreted modules' compiled twins), and the
    worker must then batch as a compiled one does."""
    if native.compiled():
        pytest.skip("compiled: balancer._evgil is built (the test above)")
    loads = evgil._EVGIL is not None  # the worker imports as this process does
    bal = proxy_to(backend)
    [pid] = wait_for(lambda: worker_pids(bal), what="the worker")
    assert load(bal.port, rounds=2) == [200] * (CONNECTIONS * 2)
    loop = loop_of(pid)
    assert loop["holds_gil"] is loads, (loads, loop)
    if loads:
        assert loop["holds"] and loop["held"] >= 2 * loop["holds"], loop
    else:
        assert loop == {"pid": pid, "holds_gil": False, "holds": 0, "held": 0, "alone": 0}


def test_signals_while_the_loop_runs_under_load(backend: Any,
                                                 proxy_to: Callable[..., Balancer]) -> None:
    """SIGHUP (the worker binds its control socket again) and SIGCHLD (libev's
    own child watcher) while batches run; then a stop under the same load: the
    worker drains and exits, the arbiter with 0."""
    bal = proxy_to(backend)
    [pid] = wait_for(lambda: worker_pids(bal), what="the worker")
    sent: list[int] = []
    ended = threading.Event()

    def signals() -> None:
        for n in range(60):
            if ended.is_set():
                return
            os.kill(pid, signal.SIGHUP if n % 4 == 0 else signal.SIGCHLD)
            sent.append(n)
            time.sleep(0.005)  # (a pace, not a synchronisation)

    thread = threading.Thread(target=signals, daemon=True)
    thread.start()
    try:
        statuses = load(bal.port, rounds=ROUNDS * 3, stop=lambda: len(sent) >= 60)
    finally:
        ended.set()
        thread.join(TIMEOUT)
    assert sent and statuses and set(statuses) == {200}, statuses[-5:]
    assert loop_of(pid)["pid"] == pid  # the same worker, answering
    stopping, answers = threading.Event(), []
    under_load = threading.Thread(target=load, args=(bal.port, 1000, stopping.is_set, answers),
                                  daemon=True)
    under_load.start()
    try:
        wait_for(lambda: len(answers) >= CONNECTIONS, timeout=TIMEOUT, what="a round answered")
        assert bal.stop() == 0, bal.output()[-2000:]
    finally:
        stopping.set()
        under_load.join(TIMEOUT)
    assert not under_load.is_alive() and answers[:CONNECTIONS] == [200] * CONNECTIONS
    assert "Traceback" not in bal.output(), bal.output()[-3000:]


def test_the_thread_pool_opens_the_access_log_fifo_while_the_loop_waits(
        backend: Any, proxy_to: Callable[..., Balancer], tmp_path: Path) -> None:
    """The writer opens a FIFO in gevent's thread pool (the open blocks until a
    reader comes); the thread then needs the GIL while the idle worker's loop
    waits in epoll_wait, and must get it: the record arrives."""
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    bal = proxy_to(backend, args=["--access-log", str(fifo)])
    assert request(bal.port, path="/through-the-fifo")[0] == 200
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        seen = bytearray()

        def arrived() -> bool:
            with contextlib.suppress(BlockingIOError):
                seen.extend(os.read(reader, 65536))
            return b"/through-the-fifo" in seen

        wait_for(arrived, timeout=TIMEOUT, what="the access record through the FIFO")
    finally:
        os.close(reader)
