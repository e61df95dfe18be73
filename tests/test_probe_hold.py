"""Hostile probes of held requests (`spin`), through real sockets.

Thousands held at once, the cap's page, clients that leave while held (also
after sending more, which stops the client watch), a held POST released to a
backend that closes mid-body, a host deleted or pointed at a dead backend
while requests are held, pipelined requests behind a held one. Each case ends
with nothing held (the `spinning` statistic, `/api/v1/inflight`), the worker's
descriptors back where they were, and the worker serving.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rawpeer import read_through, serve_each
from tests.support import Backend, Balancer, dead_address, split_responses, wait_for

HOST = "app.test"
SPIN = {"action": "spin", "timeout": 60}


START = {HOST: SPIN, "gone.test": SPIN, "other.test": SPIN}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    balancer = Balancer(tmp_path_factory.mktemp("hold"), START,
                        env={"BALANCER_LIMITS_SPIN_MAX_WAITING": "1000"})
    yield balancer
    balancer.stop()


@pytest.fixture
def bal(shared: Balancer) -> Balancer:
    """The module's balancer, its routes back to `START` and serving them."""
    shared.write_routes(START)
    shared.wait_version(json.loads(shared.routes.read_text())["version"])
    assert shared.proc.poll() is None
    return shared


def worker_fds(bal: Balancer) -> int:
    """The descriptors the (one) worker has open."""
    pid = bal.api("GET", "/api/v1/info")[1]["processes"][0]["pid"]
    return len(os.listdir(f"/proc/{pid}/fd"))


def held(bal: Balancer, request: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", bal.port), timeout=10)
    sock.sendall(request)
    return sock


def get(path: str, host: str = HOST, extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (path.encode(), host.encode(), extra)


def nothing_held(bal: Balancer, fds: int) -> None:
    """Nothing held, nothing in flight, the worker's descriptors back to `fds`."""
    wait_for(lambda: sum(bal.spinning(h) for h in (HOST, "gone.test", "other.test")) == 0,
             timeout=5, what="no request held")
    assert bal.api("GET", "/api/v1/inflight?min_age=0")[1]["requests"] == []
    wait_for(lambda: worker_fds(bal) <= fds, timeout=5, what=f"the worker back to {fds} fds")


def read_answers(sock: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """`count` whole Content-Length framed answers from `sock`."""
    data = b""
    while True:
        try:
            answers = split_responses(data)
        except (ValueError, IndexError):
            answers = []
        if len(answers) >= count and all(len(b) == int(h.get("content-length", 0))
                                         for _, h, b in answers):
            return answers
        more = sock.recv(65536)
        assert more, f"closed after {data!r}"
        data += more


def test_a_thousand_held_the_cap_page_and_every_slot_back(bal: Balancer) -> None:
    fds = worker_fds(bal)
    socks = [held(bal, get(f"/h{i}")) for i in range(1200)]
    try:
        wait_for(lambda: bal.spinning(HOST) == 1000, timeout=20, what="1000 held")
        # beyond the cap (whichever 200 came last): the busy page at once, kept open
        answered = wait_for(lambda: len(readable(socks)) >= 200 and readable(socks),
                            what="200 answers")
        assert len(answered) == 200
        for sock in answered:
            status, headers, body = read_answers(sock, 1)[0]
            assert status == 503 and headers["retry-after"] == "5" and b"<html" in body
        inflight = bal.api("GET", "/api/v1/inflight?min_age=0")[1]
        assert len(inflight["requests"]) + inflight["left_out"] == 1000
        assert bal.spinning(HOST) == 1000 and not readable(socks)  # nothing more came
    finally:
        for sock in socks:
            sock.close()
    nothing_held(bal, fds)
    bal.write_routes({HOST: {"action": "static", "body": "up"}})
    wait_for(lambda: read_answers(held(bal, get("/")), 1)[0][2] == b"up", what="serving")


def readable(socks: list[socket.socket]) -> list[socket.socket]:
    """The sockets with something to read now."""
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        return [key.fileobj for key, _ in selector.select(0)]  # type: ignore[misc]


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize(("first", "more", "leave"), [
    (get("/a"), b"", socket.socket.close),
    (get("/a"), get("/b"), socket.socket.close),  # pipelined: the watch stops
    (b"POST /a HTTP/1.1\r\nHost: app.test\r\nContent-Length: 9\r\n\r\n", b"body" * 2, _reset),
    (b"POST /a HTTP/1.1\r\nHost: app.test\r\nContent-Length: 9\r\n\r\n", b"body" * 2,
     socket.socket.close),
], ids=["close", "pipelined-close", "body-reset", "body-close"])
def test_a_client_leaving_while_held_frees_its_slot_within_a_second(
        bal: Balancer, first: bytes, more: bytes, leave) -> None:
    """Bug: a client that sent more while held (a body, a pipelined request)
    was no longer watched, and its hang-up kept its slot and socket until the
    spin's own timeout (60 s here; 120 s by default)."""
    fds = worker_fds(bal)
    sock = held(bal, first)
    wait_for(lambda: bal.spinning(HOST) == 1, what="held")
    if more:
        sock.sendall(more)
        wait_for(lambda: bal.api("GET", "/api/v1/inflight?min_age=0.3")[1]["requests"],
                 what="the bytes to reach the worker")
    leave(sock)
    wait_for(lambda: bal.spinning(HOST) == 0, timeout=2.5, what="the slot freed")
    nothing_held(bal, fds)


def test_held_requests_follow_a_deleted_host_and_a_dead_backend(bal: Balancer) -> None:
    fds = worker_fds(bal)
    gone = held(bal, get("/g", "gone.test"))
    dead = held(bal, get("/d", "other.test"))
    wait_for(lambda: bal.spinning("gone.test") + bal.spinning("other.test") == 2, what="held")
    bal.write_routes({HOST: SPIN, "other.test": {"action": "proxy", "backends": [dead_address()]}})
    assert read_answers(gone, 1)[0][0] == 404  # the host is unknown now
    assert read_answers(dead, 1)[0][0] == 502  # released to a backend that refuses
    for sock, host, status in ((gone, "gone.test", 404), (dead, "other.test", 502)):
        sock.sendall(get("/again", host))  # each connection still serves
        assert read_answers(sock, 1)[0][0] == status
        sock.close()
    nothing_held(bal, fds)


def test_pipelined_requests_behind_a_held_one_are_answered_in_order(bal: Balancer) -> None:
    backend = Backend()
    try:
        sock = held(bal, get("/1") + get("/2") + get("/3", extra=b"Connection: close\r\n"))
        wait_for(lambda: bal.spinning(HOST) == 1, what="the first held")
        bal.write_routes({HOST: {"action": "proxy", "backends": [backend.address]}})
        answers = read_answers(sock, 3)
        assert [json.loads(body)["path"] for _, _, body in answers] == ["/1", "/2", "/3"]
        assert sock.recv(100) == b""  # then closed, as the third asked
        sock.close()
    finally:
        backend.stop()


def _closes_mid_body(listener: socket.socket, got: list[bytes]) -> None:
    """A backend that reads the head and a little of a POST's body, then closes;
    anything else it answers 200, closing."""
    def serve(conn: socket.socket) -> None:
        with conn:
            data = read_through(conn) or b""
            got.append(data)
            if not data.startswith(b"POST"):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n"
                             b"\r\nnext")
    serve_each(listener, serve)


@pytest.mark.parametrize("size", [1 << 10, 1 << 20])
def test_a_held_post_released_to_a_backend_closing_mid_body_is_a_502(
        bal: Balancer, size: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []
    _closes_mid_body(listener, got)
    fds = worker_fds(bal)
    try:
        sock = held(bal, b"POST /up HTTP/1.1\r\nHost: app.test\r\nContent-Length: %d\r\n\r\n"
                    % size)
        sender = threading.Thread(target=sock.sendall, args=(b"x" * size,), daemon=True)
        sender.start()
        wait_for(lambda: bal.spinning(HOST) == 1, what="held")
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        bal.write_routes({HOST: {"action": "proxy", "backends": [address]}})
        assert read_answers(sock, 1)[0][0] == 502  # a POST is not retried
        sender.join(10)
        assert got and got[0].startswith(b"POST /up ")
        sock.sendall(get("/after"))  # the rest of the body was read: the connection serves
        assert read_answers(sock, 1)[0][2] == b"next"
        sock.close()
    finally:
        listener.close()
    nothing_held(bal, fds)


@pytest.mark.parametrize(("method", "host"), [(b"GET", HOST), (b"POST", "other.test")])
def test_requests_released_from_a_hold_meet_the_new_rules_limits(bal: Balancer, method: bytes,
                                                                  host: str) -> None:
    """Bug: a held request was handed to the next rule's action past its
    `limits`, so what a client sent during a deploy went through whatever its
    rate. Three held from one client, released to one request per 100 s: one
    goes through, two get 429 (a POST is resumed with its body: the same)."""
    body = b"x" * 10 if method == b"POST" else b""
    request = (b"%s /r HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n%s"
               % (method, host.encode(), len(body), body))
    socks = [held(bal, request) for _ in range(3)]
    wait_for(lambda: bal.spinning(host) == 3, what="3 held")
    bal.write_routes({host: {"action": "empty", "status": 204,
                             "limits": {"rate": 0.01, "burst": 1}}})
    statuses = sorted(read_answers(sock, 1)[0][0] for sock in socks)
    assert statuses == [204, 429, 429]
    for sock in socks:
        sock.close()


def test_a_tls_client_leaving_after_sending_more_while_held_frees_its_slot(
        tmp_path: Path) -> None:
    """Under TLS the bytes sent while held are read through OpenSSL and kept for
    the next rule (the watch stops); the hang-up after them is noticed from the
    TCP state, as a plain client's."""
    from tests.test_tls import client_context, put_cert, tls_connect

    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps({"version": 1, "hosts": {HOST: SPIN}}))
    put_cert(routes, HOST)
    bal = Balancer(tmp_path, args=["--tls-listen", "127.0.0.1:0"])
    try:
        tls = tls_connect(bal.ports["tls"], HOST, client_context(tmp_path))
        tls.sendall(b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 8\r\n\r\n")
        wait_for(lambda: bal.spinning(HOST) == 1, what="held")
        tls.sendall(b"bodybody")
        wait_for(lambda: bal.api("GET", "/api/v1/inflight?min_age=0.3")[1]["requests"],
                 what="the bytes to reach the worker")
        tls.close()
        wait_for(lambda: bal.spinning(HOST) == 0, timeout=2.5, what="the slot freed")
    finally:
        bal.stop()
