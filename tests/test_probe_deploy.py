"""Hostile probes of deploys (SPEC §10): scripted backends that flap, hang or die
during the ready step, operators racing and changing the host under a deploy,
the management process killed mid-deploy, the store going away, malformed
bodies. Real balancers, real sockets, real Redis.

Every case ends with the balancer still running and the host's rule either the
one it had (the deploy changed nothing) or the deploy's (it finished).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Backend, Balancer, in_threads, request, wait_for
from tests.test_deploys import HOST, deploy, finished, in_background, proxy, step

ANSWERS = {
    "ok": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    "503": b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
}


class Scripted:
    """A backend that answers its connections by a script, one entry per
    connection (the last one repeats): ``ok`` (200), ``503``, ``hang`` (reads
    the request, never answers, holds the connection until stopped), ``close``
    (closes without a byte) or ``slow:S`` (a 200 after S seconds)."""

    def __init__(self, *script: str) -> None:
        self.script = list(script)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.seen = 0
        self.stopped = threading.Event()
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self.accept_loop, daemon=True)
        self.thread.start()

    def accept_loop(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            what = self.script[min(self.seen, len(self.script) - 1)]
            self.seen += 1
            threading.Thread(target=self.answer, args=(conn, what), daemon=True).start()

    def answer(self, conn: socket.socket, what: str) -> None:
        with contextlib.suppress(OSError):
            conn.settimeout(10)
            conn.recv(65536)
            if what == "hang":
                self.held.append(conn)
                self.stopped.wait(30)
            elif what.startswith("slow:"):
                self.stopped.wait(float(what[5:]))
                conn.sendall(ANSWERS["ok"])
            elif what != "close":
                conn.sendall(ANSWERS[what])
        conn.close()

    def stop(self) -> None:
        self.stopped.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def a() -> Iterator[Backend]:
    backend = Backend("a")
    yield backend
    backend.stop()


@pytest.fixture
def lb(tmp_path: Path, a: Backend) -> Iterator[Balancer]:
    balancer = Balancer(tmp_path, {HOST: proxy(a)})
    yield balancer
    balancer.stop()


def rule_of(lb: Balancer) -> dict[str, Any]:
    return lb.api("GET", f"/api/v1/hosts/{HOST}")[1]["rule"]


# 1. the ready step against hostile backends --------------------------------------
def test_backends_that_accept_and_never_answer_fail_the_deploy_at_its_ready_timeout(
        lb: Balancer, a: Backend) -> None:
    """A hung backend must not stretch the ready step past `ready_timeout` by the
    health check's own (longer) timeout, once per backend."""
    hung = [Scripted("hang"), Scripted("hang"), Scripted("hang")]
    assert lb.api("PUT", f"/api/v1/hosts/{HOST}",
                  {**proxy(a), "health": {"path": "/", "timeout": 30, "rise": 1}})[0] == 200
    before = rule_of(lb)
    try:
        started = time.monotonic()
        record = deploy(lb, {"backends": [h.address for h in hung], "ready_timeout": 1})
        record = finished(lb, record["id"], timeout=10)
        took = time.monotonic() - started
    finally:
        for peer in hung:
            peer.stop()
    assert record["state"] == "failed", record
    assert "not ready after 1s" in record["error"] and "no answer within" in record["error"]
    assert all(h.address in record["error"] for h in hung)
    assert took < 3.5, f"the ready step took {took:.1f}s for a ready_timeout of 1s"
    assert rule_of(lb) == before
    assert json.loads(request(lb.port)[2])["backend"] == "a"


def test_flapping_dying_and_slow_backends_never_count_as_ready(lb: Balancer, a: Backend) -> None:
    """With `health.rise` 2, a backend must answer well twice in a row: one that
    flaps (200, 503, ...), answers 200 then closes every later connection, or
    answers just over the check's timeout is never ready; one just under is."""
    flapping, dying = Scripted("ok", "503", "ok", "503", "ok", "503"), Scripted("ok", "close")
    over, under = Scripted("slow:0.7"), Scripted("slow:0.1")
    health = {"path": "/", "timeout": 0.4, "interval": 0.1, "rise": 2}
    assert lb.api("PUT", f"/api/v1/hosts/{HOST}", {**proxy(a), "health": health})[0] == 200
    before = rule_of(lb)
    try:
        record = finished(lb, deploy(lb, {"backends": [flapping.address, dying.address,
                                                       over.address], "ready_timeout": 1.2})["id"])
        assert record["state"] == "failed", record
        error = record["error"]
        assert f"{flapping.address}: GET / answered 503" in error
        assert f"{dying.address}: invalid response: backend closed the connection" in error
        assert f"{over.address}: no answer within " in error
        assert rule_of(lb) == before and flapping.seen >= 3 and dying.seen >= 2
        record = finished(lb, deploy(lb, {"backends": [under.address], "warmup": 0,
                                          "ready_timeout": 5})["id"])
        assert record["state"] == "done", record
        assert rule_of(lb)["backends"] == [under.address]
    finally:
        for peer in (flapping, dying, over, under):
            peer.stop()
