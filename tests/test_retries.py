"""Retries through real sockets: which requests are replayed, where, and for how long.

With uniform weights, round robin's first pick of a fresh rule is its first
backend, and a request that failed over took two picks, so the next request
starts on the first backend again; the tests below rely on that order.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time

import pytest

from balancer.actions.proxy import BUFFERED_BODY
from balancer.relay import TAIL_MIN
from tests.support import (
    Backend,
    Balancer,
    EchoHandler,
    dead_address,
    raw_exchange,
    request,
    split_responses,
)

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)


class DropHandler(EchoHandler):
    """Reads the whole request, then closes without answering (a crashing app)."""

    def dispatch(self, head: bool = False) -> None:
        server: Backend = self.server.owner  # type: ignore[attr-defined]
        server.count += 1
        self.read_body()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


class SlowDropHandler(DropHandler):
    def dispatch(self, head: bool = False) -> None:
        time.sleep(0.6)
        super().dispatch(head)


@pytest.fixture
def dropper(start_backend):
    return start_backend("dropper", handler=DropHandler)


@pytest.fixture
def good(start_backend):
    return start_backend("good")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One balancer for the module (its table each test's own: `routed`)."""
    started = Balancer(tmp_path_factory.mktemp("retries"), {})
    yield started
    started.stop()


@pytest.fixture
def routed(shared):
    """``bal = routed(hosts)``: the module's balancer with `hosts` as its whole
    table, taken by its worker. Each test's backends are new, so each rule is
    too: round robin and the backends' health begin afresh (a start saved a
    test, ~0.6 CPU-s)."""
    def route(hosts):
        shared.write_routes(hosts)
        shared.wait_version(json.loads(shared.routes.read_text())["version"])
        return shared
    return route


@pytest.fixture
def bal(routed, dropper, good):
    return routed({f"{name}.test": {"action": "proxy", "backends": [dropper.address,
                                                                    good.address]}
                   for name in ("get", "post", "put", "streamed")})


def test_get_is_retried_on_another_backend(bal, dropper, good):
    answers = [request(bal.port, path=f"/{i}", host="get.test") for i in range(4)]
    assert [status for status, _, _ in answers] == [200] * 4
    assert {json.loads(body)["backend"] for _, _, body in answers} == {"good"}
    # each tried the dropper first, until its `fall` (3) failures marked it down
    assert dropper.count == 3 and good.count == 4


def test_post_with_a_body_is_not_replayed(bal, dropper, good):
    statuses = [request(bal.port, "POST", "/p", host="post.test", body=b"x" * 100)[0]
                for _ in range(4)]
    assert statuses == [502, 200, 502, 200]
    assert dropper.count == 2 and good.count == 2  # each POST reached one backend only


def test_put_with_a_buffered_body_is_replayed(bal, dropper, good):
    statuses = [request(bal.port, "PUT", "/p", host="put.test", body=b"x" * 100)[0]
                for _ in range(2)]
    assert statuses == [200, 200] and dropper.count == 2 and good.count == 2


def test_a_body_that_came_with_its_head_is_replayed_byte_for_byte(bal, dropper, good):
    """A body of `TAIL_MIN` bytes or more in its head's read is kept as a span of
    that read and sent beside the head (`balancer.relay.send_request`): the
    retry sends the very same bytes again, once the first try sent them."""
    body = bytes(range(256)) * 16 + b"\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    assert len(body) >= TAIL_MIN
    status, _, answer = request(bal.port, "PUT", "/p", host="put.test", body=body)
    assert status == 200 and dropper.count == 1 and good.count == 1
    echoed = json.loads(answer)
    assert (echoed["path"], echoed["body_len"], echoed["body_sha"]) == (
        "/p", len(body), hashlib.sha256(body).hexdigest())


def test_a_chunked_body_that_came_with_its_head_is_replayed_byte_for_byte(bal, dropper, good):
    """A chunked body whole in its head's read goes on as its framing
    (`balancer.chunks`: its extension's size line rewritten, the rest spans of
    that read): the retry sends the same bytes again, and the body decoded is
    the client's."""
    data = bytes(range(256)) * 16 + b"\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    framed = (b"400;ext=1\r\n" + data[:1024] + b"\r\n%x\r\n" % (len(data) - 1024)
              + data[1024:] + b"\r\n0\r\n\r\n")
    answer = raw_exchange(bal.port, b"PUT /p HTTP/1.1\r\nHost: put.test\r\nConnection: close"
                          b"\r\nTransfer-Encoding: chunked\r\n\r\n" + framed, timeout=10)
    [(status, _, body)] = split_responses(answer)
    assert status == 200 and dropper.count == 1 and good.count == 1
    echoed = json.loads(body)
    assert (echoed["path"], echoed["body_len"], echoed["body_sha"]) == (
        "/p", len(data), hashlib.sha256(data).hexdigest())


def put_with_a_late_body(port: int, host: str, body: bytes) -> bytes:
    """A PUT whose body follows its head a moment later (a separate read for the
    balancer, as from a client that writes them apart); returns the answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(b"PUT /late HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n" % (host.encode(), len(body)))
        time.sleep(0.2)  # the scenario itself (the head alone first), not a wait for state
        sock.sendall(body)
        return b"".join(iter(lambda: sock.recv(65536), b""))
    finally:
        sock.close()


def test_a_small_body_that_follows_its_head_is_waited_for_and_replayed(bal, dropper, good):
    answer = put_with_a_late_body(bal.port, "put.test", b"x" * 1000)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert dropper.count == 1 and good.count == 1
    assert good.requests[-1][0:2] == ("PUT", "/late")


def test_a_body_over_the_buffer_streams_and_is_not_replayed(bal, dropper, good):
    answer = put_with_a_late_body(bal.port, "put.test", b"x" * (BUFFERED_BODY + 1))
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert dropper.count == 1 and good.count == 0


def test_put_with_a_streamed_body_is_not_replayed(bal, dropper, good):
    """With Expect: 100-continue the body is sent only after the balancer asks for
    it, so it streams to the backend and cannot be replayed."""
    sock = socket.create_connection(("127.0.0.1", bal.port), timeout=10)
    try:
        sock.sendall(b"PUT /s HTTP/1.1\r\nHost: streamed.test\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(b"hello")
        answer = sock.recv(65536)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert dropper.count == 1 and good.count == 0


def test_connect_failures_are_retried_for_any_method(routed, good):
    bal = routed({"app.test": {"action": "proxy", "backends": [dead_address(), good.address]}})
    statuses = [request(bal.port, "POST", host="app.test", body=b"data")[0] for _ in range(6)]
    assert statuses == [200] * 6 and good.count == 6


def test_each_retry_goes_to_a_different_backend(routed, good):
    droppers = [Backend(f"d{i}", handler=DropHandler) for i in range(2)]
    backends = [d.address for d in droppers] + [good.address]
    try:
        bal = routed({"app.test": {"action": "proxy", "backends": backends}})
        status, _, body = request(bal.port, host="app.test")
    finally:
        for dropper in droppers:
            dropper.stop()
    assert status == 200 and json.loads(body)["backend"] == "good"
    assert [d.count for d in droppers] == [1, 1]


def test_retries_zero_means_one_try(routed, dropper, good):
    bal = routed({"app.test": {"action": "proxy", "backends": [dropper.address, good.address],
                               "retries": 0}})
    assert request(bal.port, host="app.test")[0] == 502
    assert dropper.count == 1 and good.count == 0


def test_retry_timeout_caps_the_total_time(routed, good):
    slow = Backend("slow", handler=SlowDropHandler)
    hosts = {"capped.test": {"action": "proxy", "backends": [slow.address, good.address],
                             "retry_timeout": 0.3},
             "uncapped.test": {"action": "proxy", "backends": [slow.address, good.address]}}
    try:
        bal = routed(hosts)
        capped = request(bal.port, host="capped.test")[0]
        uncapped = request(bal.port, host="uncapped.test")[0]
    finally:
        slow.stop()
    assert (capped, uncapped) == (502, 200)
    assert slow.count == 2 and good.count == 1
