"""Conditional reads of the table: ``ETag``/``If-None-Match`` and 304 (RFC 9110
§13.1.2) on ``GET /api/v1/hosts`` and ``GET /api/v1/hosts/HOST``, the table read
from the store once per version, through real sockets (the app on a WSGI server,
a real `balancer serve` for the hardened listener, a real Redis)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from balancer.stores import open_store
from balancer.stores.file import FileStore
from management.app import create_app
from tests.conftest import RedisServer
from tests.support import Balancer, wait_for
from tests.test_management_app import Reply, assert_error, call

WEB = {"action": "proxy", "backends": ["127.0.0.1:9001"]}
GONE = {"action": "empty", "status": 410}


@pytest.fixture
def base(tmp_path: Path, serve_wsgi: Callable[[Any], str]) -> str:
    store = FileStore(str(tmp_path / "routes.json"))
    store.replace({"app.example.com": WEB})
    return serve_wsgi(create_app(store=store))


def get(base: str, path: str, none_match: str | None = None) -> Reply:
    return call(base, "GET", path, headers={} if none_match is None
                else {"If-None-Match": none_match})


def assert_not_modified(reply: Reply, version: int) -> None:
    assert reply.status == 304, reply.body
    assert reply.body == b""
    assert reply.headers["ETag"] == f'"{version}"'
    assert reply.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("path", ["/api/v1/hosts", "/api/v1/hosts/APP.example.com"])
def test_an_unchanged_table_answers_304_without_a_body(base: str, path: str) -> None:
    first = get(base, path)
    assert first.status == 200 and first.headers["ETag"] == '"1"'
    for header in ['"1"', 'W/"1"', ' "7", W/"1" ', '"x,y", "1"', ',,"1",', "*"]:
        assert_not_modified(get(base, path, header), 1)
    for header in ['"2"', '"01"', 'W/"10"', '"abc"', '"7", "8"', ""]:
        reply = get(base, path, header)
        assert reply.status == 200 and reply.json["version"] == 1, header
    call(base, "PUT", "/api/v1/hosts/app.example.com", GONE,
         headers={"Content-Type": "application/json"})
    changed = get(base, path, '"1"')
    assert changed.status == 200 and changed.headers["ETag"] == '"2"'
    assert changed.json["version"] == 2
    rule = changed.json["hosts"]["app.example.com"] if "hosts" in changed.json \
        else changed.json["rule"]
    assert rule == GONE
    assert_not_modified(get(base, path, '"2"'), 2)


def test_a_host_absent_is_404_whatever_the_condition(base: str) -> None:
    for header in ['"1"', "*"]:
        assert_error(get(base, "/api/v1/hosts/nope.example.com", header), 404, "not_found")


@pytest.mark.parametrize("header", ['1', '"1', 'W/ "1"', 'w/"1"', '"1" "2"', '"1";', '"a"b', '"1 "',
                                    '* , "1"', '"\x7f"', " " * 5000 + "x"])
def test_a_malformed_if_none_match_is_400(base: str, header: str) -> None:
    body = assert_error(get(base, "/api/v1/hosts", header), 400, "invalid_header")
    assert "If-None-Match" in body["message"] and len(body["message"]) < 300
    assert get(base, "/api/v1/hosts").status == 200


def test_a_tag_of_another_store_is_not_this_table(tmp_path: Path,
                                                  serve_wsgi: Callable[[Any], str]) -> None:
    """A tag read from another balancer's store (ahead, behind, or not ours) is a
    full answer; versions only grow, so only this table's version is a 304."""
    store = FileStore(str(tmp_path / "routes.json"))
    for n in range(3):
        store.put_host(f"h{n}.example.com", WEB)
    base = serve_wsgi(create_app(store=store))
    for header in ['"2"', '"4"', '"999999999999999999999999"', '"3-other"', 'W/"abc"']:
        reply = get(base, "/api/v1/hosts", header)
        assert reply.status == 200 and len(reply.json["hosts"]) == 3, header


# the hardened management listener of `balancer serve` ---------------------------------
@pytest.fixture(scope="module")
def bal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    balancer = Balancer(tmp_path_factory.mktemp("conditional"), {"app.test": WEB})
    yield balancer
    balancer.stop()


def read_response(sock: socket.socket, buffered: bytes) -> tuple[bytes, bytes, bytes]:
    """(head, body, what follows) of one response with a Content-Length (or none)."""
    deadline = time.monotonic() + 10
    data = buffered
    while b"\r\n\r\n" not in data and time.monotonic() < deadline:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length and time.monotonic() < deadline:
        rest += sock.recv(65536)
    return head, rest[:length], rest[length:]


def test_304_on_a_kept_alive_connection_has_no_body(bal: Balancer) -> None:
    with socket.create_connection(("127.0.0.1", bal.mport), timeout=10) as sock:
        ask = (b"GET /api/v1/hosts HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b'If-None-Match: "1"\r\n\r\n')
        sock.sendall(ask + b"GET /api/v1/hosts HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head, body, rest = read_response(sock, b"")
        assert head.startswith(b"HTTP/1.1 304 "), head
        assert b'\r\nETag: "1"' in head and body == b""
        assert b"transfer-encoding" not in head.lower()
        head, body, rest = read_response(sock, rest)  # the next answer follows at once
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert json.loads(body)["hosts"] == {"app.test": WEB} and rest == b""


def test_a_huge_list_is_read_in_one_pass(bal: Balancer) -> None:
    tags = ", ".join(f'"{n}"' for n in range(2, 6000))  # 48 KiB of other versions
    started = time.monotonic()
    status, _ = bal.api("GET", "/api/v1/hosts", headers={"If-None-Match": tags})
    assert status == 200
    status, body = bal.api("GET", "/api/v1/hosts", headers={"If-None-Match": tags + ', "1"'})
    assert status == 304 and body == b""
    status, body = bal.api("GET", "/api/v1/hosts",
                           headers={"If-None-Match": " " * 40000 + '"1" x'})
    assert status == 400 and body["error"] == "invalid_header"
    assert time.monotonic() - started < 5


def test_while_the_store_is_damaged_the_answer_is_whole(bal: Balancer) -> None:
    """The served table with `store_problem` differs from the table at its version:
    never a 304 for it, so a poller learns of the problem."""
    saved = bal.routes.read_bytes()
    try:
        bal.routes.write_text('{"version": 1, "hosts": {"app.test": ')
        wait_for(lambda: bal.store_problem() != "", 10, what="the damage reported")
        status, body = bal.api("GET", "/api/v1/hosts", headers={"If-None-Match": '"1"'})
        assert status == 200 and body["store_problem"] and body["hosts"] == {"app.test": WEB}
    finally:
        tmp = bal.routes.with_suffix(".tmp")
        tmp.write_bytes(saved)
        os.replace(tmp, bal.routes)
    wait_for(lambda: bal.store_problem() == "", 10, what="the store read again")
    status, body = bal.api("GET", "/api/v1/hosts", headers={"If-None-Match": '"1"'})
    assert status == 304, body


# Redis: an unchanged table costs a GET of its version, not the whole hash -----------
def hgetall_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats").get("cmdstat_hgetall", {})
    return int(stats.get("calls", 0))


def test_redis_table_is_read_whole_once_per_version(redis_server: RedisServer,
                                                    serve_wsgi: Callable[[Any], str]) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    namespace = f"cond{os.getpid()}{time.monotonic_ns()}"
    store = open_store(url, namespace)
    other = open_store(url, namespace)  # another balancer's writes
    store.replace({"app.test": WEB})
    base = serve_wsgi(create_app(store=store))
    client = redis.Redis(port=redis_server.port)
    first = get(base, "/api/v1/hosts")
    before = hgetall_calls(client)
    for _ in range(5):
        assert get(base, "/api/v1/hosts").body == first.body
        assert_not_modified(get(base, "/api/v1/hosts", '"1"'), 1)
        assert get(base, "/api/v1/hosts/app.test").json["rule"] == WEB
    assert hgetall_calls(client) == before
    version = other.put_host("new.test", GONE)
    reply = get(base, "/api/v1/hosts", '"1"')
    assert reply.status == 200 and reply.json["version"] == version
    assert reply.json["hosts"]["new.test"] == GONE
    assert hgetall_calls(client) == before + 1
    client.close()
