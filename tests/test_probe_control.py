"""Outside probe of the control plane (2026-12-07, probe-control): what broke, pinned.

* A Redis (or whatever the ``redis://`` URL names) that answers a byte at a time
  and never ends its answer: redis-py bounds each recv, not an answer, so a
  worker's first read hung for good (the balancer never listened) and an API
  write never answered. Each answer is now read whole within the store's
  timeout (five times it), in the processes gevent patched.
* ``PUT /api/v1/hosts/HOST`` with ``If-None-Match: *`` (RFC 9110's "only if it
  does not exist", a client creating a host without clobbering one) wrote over
  the host there; any ``If-None-Match`` on a write was ignored. Now ``*`` on a
  host's PUT writes only an absent host (412 ``host_exists``, atomically with
  the write), and any other on a write is 400 ``invalid_header``.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from balancer.stores.file import FileStore
from management.app import create_app
from tests.rawpeer import serve_each
from tests.support import ROOT
from tests.test_management_app import assert_error, call

JSON = {"Content-Type": "application/json"}
OLD = {"action": "static", "body": "old"}
NEW = {"action": "static", "body": "new"}

READ_IN_A_PATCHED_PROCESS = """
from gevent import monkey; monkey.patch_all()
import gevent, sys, time
from balancer.stores import StoreUnavailable
from balancer.stores.redis import RedisStore
from balancer.stores.redis_connect import Connector
from redis import RedisError
def timed(call):
    began = time.monotonic()
    try:
        call()
    except (StoreUnavailable, RedisError) as exc:
        print(f"{time.monotonic() - began:.2f} {exc}")
def read(url):
    timed(RedisStore(url, timeout=0.1).load)
def twice(url):  # a GET whose answer is cut, then one more on the same client
    client = Connector(url, 0.1)()
    timed(lambda: client.get("k"))
    print("then", client.get("k"))
*reads, cut = sys.argv[1:]
gevent.joinall([gevent.spawn(read, url) for url in reads] + [gevent.spawn(twice, cut)])
"""


@pytest.fixture
def trickling_peer() -> Iterator[int]:
    """A port whose every connection is answered ``+`` (a status line begun) and then
    one more byte every 0.02 s, never a line's end (bounded: 8 s at most). (Each byte
    well within the store's 0.1 s timeout: review-control, a byte every 0.1 s raced
    that timeout, and the test passed without the whole-answer bound.)"""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(1)
            try:
                conn.recv(65536)
                for _ in range(400):
                    if stop.wait(0.02):
                        return
                    conn.sendall(b"+")
            except OSError:
                return

    serve_each(server, trickle)
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()


@pytest.fixture
def cutting_peer() -> Iterator[int]:
    """A port taking every command (``+OK``) but ``GET``: the first connection's is
    answered a 100-byte string's head and then a byte every 0.02 s (8 s at most),
    every later connection's ``hello``."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    connections = iter(range(1000))

    def serve(conn: socket.socket) -> None:
        first = next(connections) == 0
        with contextlib.suppress(OSError, ValueError), conn, conn.makefile("rb") as reader:
            conn.settimeout(10)
            while line := reader.readline():
                words = [reader.read(int(reader.readline()[1:]) + 2)[:-2]
                         for _ in range(int(line[1:]))]
                if words[0].upper() != b"GET":
                    conn.sendall(b"+OK\r\n")
                elif not first:
                    conn.sendall(b"$5\r\nhello\r\n")
                else:
                    conn.sendall(b"$100\r\n")
                    for _ in range(400):
                        if stop.wait(0.02):
                            return
                        conn.sendall(b"x")

    serve_each(server, serve)
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()


def test_a_redis_that_trickles_its_answer_fails_the_read_in_the_timeout(
        trickling_peer: int, cutting_peer: int) -> None:
    # a Redis, and a sentinel (review-control: its clients were not bounded, and
    # each master lookup waited for the sentinel's whole answer for good); and an
    # answer cut by the bound drops its connection: the next command is not
    # answered the rest of the cut one
    done = subprocess.run([sys.executable, "-c", READ_IN_A_PATCHED_PROCESS,
                           f"redis://127.0.0.1:{trickling_peer}/0",
                           f"redis+sentinel://127.0.0.1:{trickling_peer}/mymaster/0",
                           f"redis://127.0.0.1:{cutting_peer}/0?protocol=2"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 4 and "then hello" in lines, done.stdout
    lines.remove("then hello")
    for line in lines:
        took, _, problem = line.partition(" ")
        # (five times the 0.1 s timeout, and a connect; before, the peer's 8 s)
        assert float(took) < 3, done.stdout
        assert "Timeout reading from 127.0.0.1" in problem, done.stdout


@pytest.fixture
def api(tmp_path: Path, serve_wsgi: Callable[[Any], str]) -> str:
    store = FileStore(str(tmp_path / "routes.json"))
    store.replace({"app.test": OLD, "web.test": {"action": "proxy",
                                                 "backends": ["127.0.0.1:9001"]}})
    return serve_wsgi(create_app(store=store))


def test_if_none_match_star_writes_a_host_only_where_it_is_absent(api: str) -> None:
    star = {**JSON, "If-None-Match": "*"}
    body = assert_error(call(api, "PUT", "/api/v1/hosts/APP.test", NEW, headers=star),
                        412, "host_exists")
    assert "app.test" in body["message"]
    assert call(api, "GET", "/api/v1/hosts/app.test").json["rule"] == OLD  # kept
    made = call(api, "PUT", "/api/v1/hosts/new.test", NEW, headers=star)
    assert made.status == 200 and made.json["version"] == 2, made.body
    assert call(api, "GET", "/api/v1/hosts/new.test").json["rule"] == NEW
    # with If-Match too: both must hold
    assert_error(call(api, "PUT", "/api/v1/hosts/other.test", NEW,
                      headers={**star, "If-Match": '"1"'}), 412, "version_conflict")
    assert call(api, "GET", "/api/v1/hosts").json["version"] == 2


@pytest.mark.parametrize(("method", "path", "body", "value"), [
    ("PUT", "/api/v1/hosts/app.test", NEW, '"1"'),
    ("PUT", "/api/v1/hosts/app.test", NEW, "garbage"),
    ("PUT", "/api/v1/hosts", {"hosts": {}}, "*"),
    ("DELETE", "/api/v1/hosts/app.test", None, "*"),
    ("POST", "/api/v1/hosts/web.test/backends", {"address": "127.0.0.1:9002"}, "*"),
    ("DELETE", "/api/v1/hosts/web.test/backends/127.0.0.1:9001", None, '"1"'),
    # review-control: the certificates' writes and a restore ignored it (a PUT of a
    # certificate with If-None-Match: * replaced the one there)
    ("PUT", "/api/v1/certs/app.test", {"chain": "x", "key": "y"}, "*"),
    ("DELETE", "/api/v1/certs/app.test", None, "*"),
    ("POST", "/api/v1/certs/restore", None, "*"),
    ("POST", "/api/v1/restore", None, "*"),
])
def test_an_if_none_match_a_write_cannot_honour_is_refused_and_writes_nothing(
        api: str, method: str, path: str, body: Any, value: str) -> None:
    reply = call(api, method, path, body, headers={**JSON, "If-None-Match": value})
    assert "If-None-Match on a write" in assert_error(reply, 400, "invalid_header")["message"]
    assert call(api, "GET", "/api/v1/hosts").json["version"] == 1


CREATORS = 6  # at once, for each host, spread over `APPS` management apps
APPS = 3


@pytest.fixture(params=["file", "redis"])
def racing_apis(request: pytest.FixtureRequest, tmp_path: Path,
                serve_wsgi: Callable[[Any], str]) -> Iterator[list[str]]:
    """`APPS` management apps, each on a store of its own over one table (as the
    management processes of balancers sharing a store), each served by a thread."""
    if request.param == "file":
        stores: list[Any] = [FileStore(str(tmp_path / "routes.json")) for _ in range(APPS)]
    else:
        from balancer.stores.redis import RedisStore

        url = request.getfixturevalue("redis_server").url
        stores = [RedisStore(url, f"race-{tmp_path.name}") for _ in range(APPS)]
    try:
        yield [serve_wsgi(create_app(store=store)) for store in stores]
    finally:
        for store in stores:
            store.close()


def test_racing_creators_of_a_host_one_writes_it_the_others_are_refused(
        racing_apis: list[str]) -> None:
    # review-control: the check (the host absent) and the write are one step on both
    # stores, however the creators interleave: never two 200s, never a host replaced
    star = {**JSON, "If-None-Match": "*"}
    for turn in range(4):
        host = f"race{turn}.test"
        together = threading.Barrier(CREATORS)

        def create(creator: int, host: str = host, together: threading.Barrier = together
                   ) -> tuple[int, int]:
            together.wait(10)
            reply = call(racing_apis[creator % APPS], "PUT", f"/api/v1/hosts/{host}",
                         {"action": "static", "body": str(creator)}, headers=star)
            return creator, reply.status
        with ThreadPoolExecutor(CREATORS) as pool:
            answers = list(pool.map(create, range(CREATORS), timeout=30))
        made = [creator for creator, status in answers if status == 200]
        assert len(made) == 1 and sorted(status for _, status in answers) == \
            [200] + [412] * (CREATORS - 1), answers
        kept = call(racing_apis[0], "GET", f"/api/v1/hosts/{host}").json["rule"]
        assert kept == {"action": "static", "body": str(made[0])}, (answers, kept)
