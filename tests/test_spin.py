"""Holding requests through real sockets: `spin`, its timeout and cap, and
`spin_when_down` across a backend restart.

Rule changes go through the file store (`Balancer.write_routes`), which every
worker sees within 0.25 s.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time

import pytest

from tests.support import (
    Backend,
    Balancer,
    dead_address,
    in_threads,
    raw_exchange,
    request,
    split_responses,
    wait_for,
)

HOST = "app.test"
SPIN = {"action": "spin", "timeout": 60}


@pytest.fixture
def stop_after():
    """Balancers to stop after the test (also when it fails)."""
    started: list[Balancer] = []
    yield started.append
    for bal in started:
        bal.stop()


def proxy(*backends: Backend | str, **extra) -> dict:
    addresses = [b if isinstance(b, str) else b.address for b in backends]
    return {"action": "proxy", "backends": addresses, **extra}


@pytest.fixture
def hold_raw(stop_after):
    """Opens connections with one request sent and nothing read yet; closes them
    after the test, before the balancers stop (so none is left held)."""
    opened: list[socket.socket] = []

    def hold(port: int, host: str = HOST) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET /held HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
        opened.append(sock)
        return sock

    yield hold
    for sock in opened:
        sock.close()


def test_flip_to_proxy_releases_every_held_request(tmp_path, backend, stop_after):
    bal = Balancer(tmp_path, {HOST: SPIN})
    stop_after(bal)
    held = in_threads(20, lambda: request(bal.port, host=HOST, path="/held", timeout=20))
    wait_for(lambda: bal.spinning(HOST) == 20, what="20 held requests")
    assert not any(f.done() for f in held) and backend.count == 0
    flipped = time.monotonic()
    bal.write_routes({HOST: proxy(backend)})
    answers = [f.result(timeout=10) for f in held]
    assert time.monotonic() - flipped < 3  # store notices within 0.25 s; the rest is slack
    assert [status for status, _, _ in answers] == [200] * 20
    assert {json.loads(body)["path"] for _, _, body in answers} == {"/held"}
    assert backend.count == 20
    wait_for(lambda: bal.spinning(HOST) == 0, what="no request held any more")


def test_held_requests_get_whatever_rule_comes_next(tmp_path, stop_after):
    hosts = {"go.test": SPIN, "page.test": SPIN, "still.test": SPIN}
    bal = Balancer(tmp_path, hosts)
    stop_after(bal)
    go = in_threads(1, lambda: request(bal.port, host="go.test", path="/a?b=1"))[0]
    page = in_threads(1, lambda: request(bal.port, host="page.test"))[0]
    still = in_threads(1, lambda: request(bal.port, host="still.test", timeout=20))[0]
    wait_for(lambda: sum(bal.spinning(h) for h in hosts) == 3, what="3 held requests")
    bal.write_routes({"go.test": {"action": "redirect", "to": "https://new.example",
                                  "keep_path": True},
                      "page.test": {"action": "static", "page": "maintenance"},
                      "still.test": {"action": "spin", "timeout": 90}})
    status, headers, _ = go.result(timeout=10)
    assert status == 302 and headers["location"] == "https://new.example/a?b=1"
    assert page.result(timeout=10)[0] == 503
    # a rule that is still `spin` keeps its requests held
    assert bal.spinning("still.test") == 1 and not still.done()
    bal.write_routes({"still.test": {"action": "static", "body": "done"}})
    assert still.result(timeout=10)[2] == b"done"


def test_spin_timeout_is_504_with_retry_after(tmp_path, stop_after):
    bal = Balancer(tmp_path, {HOST: {"action": "spin", "timeout": 0.5}})
    stop_after(bal)
    started = time.monotonic()
    status, headers, body = request(bal.port, host=HOST)
    elapsed = time.monotonic() - started
    assert status == 504 and headers["retry-after"] == "1"
    assert int(headers["content-length"]) == len(body) and b"<html" in body
    assert 0.5 <= elapsed < 3
    assert bal.spinning(HOST) == 0


def test_cap_gives_503_and_is_per_worker(tmp_path, backend, stop_after, hold_raw):
    hosts = {HOST: SPIN, "down.test": proxy(dead_address(), spin_when_down=60)}
    bal = Balancer(tmp_path, hosts, internal=True,
                   env={"BALANCER_LIMITS_SPIN_MAX_WAITING": "3"})
    stop_after(bal)
    # one held per listener plus one held while its backend is down: the cap of 3
    held = [hold_raw(bal.port), hold_raw(bal.ports["internal"]), hold_raw(bal.port, "down.test")]
    wait_for(lambda: bal.spinning(HOST) == 2 and bal.spinning("down.test") == 1,
             what="3 held requests")
    for port in (bal.port, bal.ports["internal"]):
        status, headers, body = request(port, host=HOST)
        assert status == 503 and headers["retry-after"] == "5" and b"<html" in body
    bal.write_routes({HOST: proxy(backend), "down.test": proxy(backend)})
    for sock in held:
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")


def test_disconnecting_held_client_frees_its_slot(tmp_path, stop_after, hold_raw):
    bal = Balancer(tmp_path, {HOST: SPIN}, env={"BALANCER_LIMITS_SPIN_MAX_WAITING": "2"})
    stop_after(bal)
    first, second = hold_raw(bal.port), hold_raw(bal.port)
    wait_for(lambda: bal.spinning(HOST) == 2, what="2 held requests")
    assert request(bal.port, host=HOST)[0] == 503
    first.close()
    wait_for(lambda: bal.spinning(HOST) == 1, timeout=3, what="the closed client's slot")
    third = hold_raw(bal.port)
    wait_for(lambda: bal.spinning(HOST) == 2, what="the freed slot to be taken")
    assert bal.host_stats(HOST)["responses"]["4xx"] == 1  # the hang-up counts as 499
    second.close()
    third.close()
    wait_for(lambda: bal.spinning(HOST) == 0, timeout=3, what="every slot freed")


# spin_when_down -------------------------------------------------------------------
def test_hold_while_down_across_a_backend_restart(tmp_path, stop_after, held_port):
    """Requests keep flowing while the only backend restarts in place: none fails."""
    port = held_port.port
    old = Backend("old", port=port)
    bal = Balancer(tmp_path, {HOST: proxy(old, spin_when_down=20)})
    stop_after(bal)
    results: list = []
    stop = threading.Event()

    def client_loop() -> None:
        while not stop.is_set():
            try:
                results.append(request(bal.port, host=HOST, timeout=30)[0])
            except OSError as exc:
                results.append(exc)

    clients = [threading.Thread(target=client_loop) for _ in range(4)]
    for thread in clients:
        thread.start()
    new = None
    try:
        wait_for(lambda: len(results) >= 40, what="traffic before the restart")
        old.kill()
        wait_for(lambda: bal.spinning(HOST) == 4, what="every client held while down")
        new = Backend("new", port=port)  # the app is back on the same address
        restarted = time.monotonic()
        wait_for(lambda: new.count >= 4, timeout=5, what="held requests released")
        released_after = time.monotonic() - restarted
        count = len(results)
        wait_for(lambda: len(results) >= count + 40, what="traffic after the restart")
    finally:
        stop.set()
        for thread in clients:
            thread.join(30)
        if new is not None:
            new.stop()
    failures = [r for r in results if r != 200]
    assert failures == [] and len(results) >= 80
    assert released_after < 2  # backoff is at most 0.5 s; a success wakes all


def test_hold_while_down_times_out_with_504(tmp_path, stop_after):
    bal = Balancer(tmp_path, {HOST: proxy(dead_address(), spin_when_down=0.6)})
    stop_after(bal)
    started = time.monotonic()
    status, headers, _ = request(bal.port, host=HOST)
    assert status == 504 and headers["retry-after"] == "1"
    assert 0.6 <= time.monotonic() - started < 3


def test_held_while_down_then_handed_to_the_new_rule_with_its_body(tmp_path, backend,
                                                                      stop_after):
    bal = Balancer(tmp_path, {HOST: proxy(dead_address(), spin_when_down=30)})
    stop_after(bal)
    payload = b"0123456789" * 500  # over TAIL_MIN: a span of its head's read, resent
    post = in_threads(1, lambda: request(bal.port, "POST", "/upload", host=HOST, body=payload,
                                         timeout=20))[0]
    wait_for(lambda: bal.spinning(HOST) == 1, what="the POST to be held")
    bal.write_routes({HOST: proxy(backend)})
    status, _, body = post.result(timeout=10)
    echoed = json.loads(body)
    assert status == 200 and echoed["method"] == "POST" and echoed["body_len"] == len(payload)
    assert echoed["body_sha"] == hashlib.sha256(payload).hexdigest()


def test_a_held_chunked_body_is_handed_to_the_new_rule_whole(tmp_path, backend, stop_after):
    """A chunked body that came with its head is kept as its framing (a span of the
    read, its extension's size line rewritten) while held, and sent whole after."""
    bal = Balancer(tmp_path, {HOST: proxy(dead_address(), spin_when_down=30)})
    stop_after(bal)
    payload = b"0123456789" * 500
    framed = b"7d0;x=y\r\n" + payload[:2000] + b"\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        len(payload) - 2000, payload[2000:])
    post = in_threads(1, lambda: raw_exchange(
        bal.port, b"POST /upload HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%s" % (HOST.encode(), framed), timeout=20))[0]
    wait_for(lambda: bal.spinning(HOST) == 1, what="the POST to be held")
    bal.write_routes({HOST: proxy(backend)})
    [(status, _, body)] = split_responses(post.result(timeout=20))
    echoed = json.loads(body)
    assert status == 200 and echoed["method"] == "POST" and echoed["body_len"] == len(payload)
    assert echoed["body_sha"] == hashlib.sha256(payload).hexdigest()


def test_without_spin_when_down_a_dead_host_is_502_at_once(tmp_path, stop_after):
    bal = Balancer(tmp_path, {HOST: proxy(dead_address(), dead_address())})
    stop_after(bal)
    started = time.monotonic()
    assert request(bal.port, host=HOST)[0] == 502
    assert time.monotonic() - started < 1
