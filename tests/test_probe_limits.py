"""Hostile probes of per-rule limits and of `server.max_connections`, through
real sockets: forwarding fields that name another client, the addresses of
one IPv6 /64, connections that never send a byte, rates no bucket can keep
(NaN, infinities, 0, 5e-324), and a flood of silent connections against a
worker's connection cap.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from balancer.clients import client_key
from tests.support import Backend, Balancer, EchoHandler, constants_prefix, request, wait_for

HOST = "app.test"
ONE = {"action": "empty", "status": 204, "limits": {"rate": 0.01, "burst": 1}}


@pytest.fixture(scope="module")
def bal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    """One request per client per 100 s: a second one from the same client is a 429."""
    balancer = Balancer(tmp_path_factory.mktemp("limits"), {HOST: ONE}, internal=True)
    yield balancer
    balancer.stop()


def status(port: int, headers: dict[str, str]) -> int:
    return request(port, host=HOST, headers=headers)[0]


@pytest.mark.parametrize("fields", [
    {"X-Forwarded-For": "192.0.2.{n}"},
    {"X-Forwarded-For": "192.0.2.{n}, 198.51.100.{n}"},
    {"X-Real-IP": "192.0.2.{n}"},
    {"Forwarded": "for=192.0.2.{n}"},
    {"Forwarded": 'for="[2001:db8::{n}]"'},
    {"X-Forwarded-For": "2001:db8:{n}::1"},
], ids=["xff", "xff-list", "x-real-ip", "forwarded", "forwarded-v6", "xff-v6"])
def test_forwarding_fields_on_an_external_listener_dodge_no_limit(bal: Balancer,
                                                                   fields) -> None:
    """The peer is the client on an external listener, whatever it says it forwards:
    its first request of the test's round uses its bucket (the module's other
    cases may have used it already), every later one is refused."""
    first = {k: v.format(n=1) for k, v in fields.items()}
    assert status(bal.port, first) in (204, 429)
    for n in range(2, 6):
        assert status(bal.port, {k: v.format(n=n) for k, v in fields.items()}) == 429


@pytest.mark.parametrize(("first", "second", "same"), [
    ("2001:db8:a::1", "2001:db8:a::2", True),
    ("2001:db8:b::1", "2001:db8:b:0:ffff:ffff:ffff:ffff", True),
    ("2001:db8:c::1", "2001:db8:c:1::1", False),  # the next /64
    ("::ffff:192.0.2.77", "192.0.2.77", True),  # IPv4-mapped: its IPv4 address
    ("192.0.2.78", "192.0.2.79", False),
])
def test_one_ipv6_64_is_one_client(bal: Balancer, first: str, second: str,
                                   same: bool) -> None:
    """Bug: each address of a /64 had a bucket of its own, so one client (a /64 is
    one subscriber's, RFC 6177) dodged every per-client limit. The addresses come
    through the internal listener (a trusted front proxy's X-Forwarded-For): the
    loopback has one IPv6 address only."""
    port = bal.ports["internal"]
    assert status(port, {"X-Forwarded-For": first}) == 204
    assert status(port, {"X-Forwarded-For": second}) == (429 if same else 204)


NO_ADDRESS = [":80", "unknown", "a:80", "[]:80", "[::1", "fe80::1%eth0", "192.0.2.80, :80",
              # strict (bug: the first two were 2001:db8:f0::1 and 192.0.2.81): nothing but a port
              # of 1 to 65535 in digits after the address
              "[2001:db8:f0::1]junk", "192.0.2.81:abc", "[2001:db8:f1::1]:", "192.0.2.82:",
              "192.0.2.83:0", "192.0.2.84:65536", "192.0.2.85:+80", "[2001:db8:f2::1]:80x",
              "[2001:db8:f3::1]]", "[192.0.2.86]",
              "192.0.2.87:\xb2"]


@pytest.mark.parametrize("entry", NO_ADDRESS)
def test_a_forwarded_entry_that_is_no_address_names_the_peer(bal: Balancer, entry: str) -> None:
    """The last X-Forwarded-For entry, if it is no IP address (a port alone, a
    word, a zone id), names no client: the peer (the front proxy) is the one
    limited, as nginx's realip module and HAProxy's ``hdr_ip`` take it. Bug:
    ``:80`` was the peer but ``unknown`` and ``a:80`` each a client of their own."""
    port = bal.ports["internal"]
    assert status(port, {}) in (204, 429)  # the peer's bucket (the module's other cases')
    assert status(port, {"X-Forwarded-For": entry}) == 429
    address = f"192.0.2.{100 + NO_ADDRESS.index(entry)}:80"  # an address: its own client
    assert status(port, {"X-Forwarded-For": address}) == 204


@pytest.mark.parametrize("entry", ["[2001:db8:e0::1]:443", "[2001:db8:e1::1]",
                                   "192.0.2.90:65535", "192.0.2.91:080", "2001:db8:e2::1"])
def test_a_forwarded_address_with_or_without_a_port_is_a_client(bal: Balancer,
                                                                entry: str) -> None:
    """Each spelling nginx's realip takes (and ``[IPv6]`` alone) names a client of
    its own: its first request passes, though the peer's bucket is used up."""
    port = bal.ports["internal"]
    status(port, {})
    assert status(port, {}) == 429
    assert status(port, {"X-Forwarded-For": entry}) == 204


def test_client_keys() -> None:
    assert client_key("192.0.2.1") == "192.0.2.1"
    assert client_key("2001:db8::1") == client_key("2001:db8::abcd:1") == "2001:db8::/64"
    assert client_key("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert client_key("::1") == "::/64"
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_key("fe80::1%eth0") == "fe80::1%eth0"  # a zone: as it is
    assert client_key("unknown") == "unknown"


def test_silent_connections_take_no_place_of_max_connections_per_client(
        tmp_path: Path) -> None:
    """`max_connections_per_client` counts requests in progress: 20 connections
    that never send a byte leave the client its request, and a second request
    while one is in progress is refused."""
    backend = Backend()
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [backend.address],
                                     "limits": {"max_connections_per_client": 1}}})
    silent = [socket.create_connection(("127.0.0.1", bal.port), timeout=10) for _ in range(20)]
    try:
        wait_for(lambda: bal.api("GET", "/api/v1/stats")[1]["open_connections"] >= 20,
                 what="the silent connections accepted")
        assert request(bal.port, host=HOST)[0] == 200
        slow = threading.Thread(target=request, args=(bal.port,),
                                kwargs={"host": HOST, "path": "/slow?s=1"})
        slow.start()
        wait_for(lambda: bal.api("GET", "/api/v1/inflight")[1]["requests"], what="in progress")
        assert request(bal.port, host=HOST)[0] == 429
        slow.join(10)
        assert request(bal.port, host=HOST)[0] == 200
    finally:
        for sock in silent:
            sock.close()
        bal.stop()
        backend.stop()


HELD: dict[str, threading.Event] = {}  # client number: its held request answers when set


class HoldingHandler(EchoHandler):
    """`/held?c=N` answers once ``HELD[N]`` is set (at most 20 s)."""

    def act_held(self, query: dict[str, str], head: bool) -> None:
        HELD[query["c"]].wait(20)
        self.reply(200, b"held", head)


def from_client(n: int, port: int, path: str) -> tuple[http.client.HTTPConnection, int | None]:
    """A request from the loopback address 127.0.0.`n`: its connection, and its
    status (None for a request that is held)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20,
                                      source_address=(f"127.0.0.{n}", 0))
    conn.request("GET", path, headers={"Host": HOST})
    if path.startswith("/held"):
        return conn, None
    answer = conn.getresponse()
    answer.read()
    conn.close()
    return conn, answer.status


def test_a_full_table_never_moves_a_count_of_requests_in_progress(tmp_path: Path) -> None:
    """The table shrunk to 8 slots, 8 clients each with a request in progress
    (at `max_connections_per_client` 1), a 9th client comes: it finds no place,
    and goes uncounted (fails open). Bug: it took the slot of one of the 8, whose
    second request was then let through (its count gone), and whose release
    lowered the newcomer's count. Here each of the 8 is refused a second request,
    before and after the 9th's request ends; once theirs end, each goes again."""
    for n in range(2, 11):
        HELD[str(n)] = threading.Event()
    backend = Backend(handler=HoldingHandler)
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [backend.address],
                                     "limits": {"max_connections_per_client": 1}}},
                   prefix=constants_prefix({"balancer.limits.TABLE_SLOTS": 8}))
    held = []
    try:
        for n in range(2, 11):
            held.append(from_client(n, bal.port, f"/held?c={n}")[0])
            wait_for(lambda n=n: backend.count == n - 1, what=f"client {n} held")
        assert [from_client(n, bal.port, "/")[1] for n in range(2, 10)] == [429] * 8
        assert from_client(10, bal.port, "/")[1] == 200  # uncounted: it goes
        HELD["10"].set()
        assert held[-1].getresponse().status == 200
        assert [from_client(n, bal.port, "/")[1] for n in range(2, 10)] == [429] * 8
        for n, conn in enumerate(held[:-1], start=2):
            HELD[str(n)].set()
            assert conn.getresponse().status == 200
        assert [from_client(n, bal.port, "/")[1] for n in range(2, 11)] == [200] * 9
    finally:
        for event in HELD.values():
            event.set()
        for conn in held:
            conn.close()
        bal.stop()
        backend.stop()


@pytest.mark.parametrize("rate", ["NaN", "Infinity", "-Infinity", "0", "-1", "5e-324",
                                  "1e-309", "1e-308", "1e-4", "0.0009", "1e400", "1000001",
                                  "true", '"10"'])
def test_a_rate_no_bucket_can_keep_is_refused_by_the_api(bal: Balancer, rate: str) -> None:
    """Bug: 5e-324 passed (> 0) and made 1 / rate infinite, the bucket's
    tolerance NaN, and the limit let everything through."""
    body = b'{"action": "empty", "status": 204, "limits": {"rate": ' + rate.encode() + b"}}"
    conn = http.client.HTTPConnection("127.0.0.1", bal.mport, timeout=10)
    conn.request("PUT", "/api/v1/hosts/bad.test", body=body,
                 headers={"Content-Type": "application/json"})
    answer = conn.getresponse()
    data = json.loads(answer.read())
    conn.close()
    assert answer.status == 400, data
    assert any(d.startswith("limits.rate: must be a finite number from 0.001 to 1e+06")
               for d in data.get("details", [])) or data["error"] == "invalid_json", data
    assert bal.api("GET", "/api/v1/hosts/bad.test")[0] == 404


def test_the_floor_rate_is_taken_and_holds(bal: Balancer) -> None:
    """0.001/s itself is a rule the API takes: one request per 1,000 s, the next
    ones refused with the whole wait in Retry-After."""
    status, answer = bal.api("PUT", "/api/v1/hosts/floor.test", {
        "action": "empty", "status": 204, "limits": {"rate": 0.001}})
    assert status == 200, answer
    try:
        bal.wait_version(answer["version"])
        answers = [request(bal.port, host="floor.test") for _ in range(3)]
        assert [a[0] for a in answers] == [204, 429, 429]
        assert answers[1][1]["retry-after"] == "1000"
    finally:
        assert bal.api("DELETE", "/api/v1/hosts/floor.test")[0] == 200



def test_a_raised_rate_lets_a_refused_client_through_at_once(bal: Balancer) -> None:
    """A client refused under 0.001/s (its next request 1,000 s away), the rule then
    raised to 100/s: it gets through within the new rule's interval (10 ms), as a
    client that used its whole burst just now under 100/s would. The same when the
    limits are removed and given again. Bug: the bucket kept the old rule's wait, so
    raising a limit changed nothing for that client for up to 1,000 s."""
    strict = {"action": "empty", "status": 204, "limits": {"rate": 0.001}}
    lenient = {**strict, "limits": {"rate": 100}}

    def serve(rule: dict[str, Any]) -> None:
        status, answer = bal.api("PUT", "/api/v1/hosts/raised.test", rule)
        assert status == 200, answer
        bal.wait_version(answer["version"])

    def statuses(count: int) -> list[int]:
        return [request(bal.port, host="raised.test")[0] for _ in range(count)]

    try:
        for lifted in (lenient, {"action": "empty", "status": 204}):
            serve(strict)
            # at most one through: the first may still wait out the rule before's
            # 10 ms (a 429), and the second then goes (bug in this test: [429, 204]
            # was taken for a failure, once under -n 4)
            assert statuses(2) in ([204, 429], [429, 429], [429, 204])
            serve(lifted)
            if lifted is not lenient:
                assert statuses(1) == [204]
                serve(lenient)
            wait_for(lambda: statuses(1) == [204], timeout=2, what="the raised rate")
    finally:
        assert bal.api("DELETE", "/api/v1/hosts/raised.test")[0] == 200


def test_a_stored_rate_below_the_floor_is_served_raised(tmp_path: Path) -> None:
    """A table an earlier version stored with such a rate is served with the rate
    raised to 0.001/s (one request per 1,000 s: the second is refused), and
    said in /api/v1/info, not refused whole as a corrupt store."""
    bal = Balancer(tmp_path, {HOST: {"action": "empty", "status": 204,
                                     "limits": {"rate": 5e-324}}})
    try:
        assert [request(bal.port, host=HOST)[0] for _ in range(2)] == [204, 429]
        store = bal.api("GET", "/api/v1/info")[1]["store"]
        assert store["problem"] is None
        assert store["raised"] == [{"host": HOST, "field": "limits.rate", "stored": 5e-324,
                                    "used": 0.001}]
    finally:
        bal.stop()


def test_a_flood_of_silent_connections_pauses_accept_and_it_resumes(tmp_path: Path) -> None:
    """`server.max_connections` 20, 60 connections that never send a byte: the
    worker holds 20 at a time (the others wait in the listen queue), closes
    each at `client_idle`, takes the next; a request behind them is served, and
    every descriptor comes back."""
    bal = Balancer(tmp_path, {HOST: {"action": "empty", "status": 204}},
                   env={"BALANCER_SERVER_MAX_CONNECTIONS": "20",
                        "BALANCER_TIMEOUTS_CLIENT_IDLE": "1"})
    try:
        flood(bal)
    finally:
        bal.stop()


def flood(bal: Balancer) -> None:
    pid = bal.api("GET", "/api/v1/info")[1]["processes"][0]["pid"]
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    peaks: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peaks.append(bal.api("GET", "/api/v1/stats")[1]["open_connections"])
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    silent = [socket.create_connection(("127.0.0.1", bal.port), timeout=10) for _ in range(60)]
    try:
        started = time.monotonic()
        assert request(bal.port, host=HOST, timeout=15)[0] == 204
        waited = time.monotonic() - started
        assert 1 <= waited < 10  # three rounds of 20 closed at client_idle went first
        closed = sum(1 for sock in silent if sock.recv(1) == b"")
        assert closed == 60
    finally:
        done.set()
        sampler.join(10)
        for sock in silent:
            sock.close()
    assert max(peaks) <= 20 and max(peaks) >= 15
    wait_for(lambda: len(os.listdir(f"/proc/{pid}/fd")) <= fds, what=f"back to {fds} fds")
    assert request(bal.port, host=HOST)[0] == 204


def test_a_killed_workers_requests_in_progress_are_given_back(tmp_path: Path) -> None:
    """Bug: a worker killed with requests in progress (a crash, the OOM killer)
    left them counted in the shared table for good: a client at its
    `max_connections_per_client` got 429 for every request after, from every
    worker. The arbiter gives back what the dead worker's journal held."""
    backend = Backend()
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [backend.address],
                                     "limits": {"max_connections_per_client": 1}}})
    slow = socket.create_connection(("127.0.0.1", bal.port), timeout=10)
    try:
        slow.sendall(b"GET /slow?s=30 HTTP/1.1\r\nHost: app.test\r\n\r\n")
        wait_for(lambda: bal.api("GET", "/api/v1/inflight")[1]["requests"], what="in progress")
        assert request(bal.port, host=HOST)[0] == 429
        (old,) = [p["pid"] for p in bal.api("GET", "/api/v1/info")[1]["processes"]]
        os.kill(old, signal.SIGKILL)
        assert slow.recv(100) == b""  # its connection died with it
        wait_for(lambda: [p["pid"] for p in bal.api("GET", "/api/v1/info")[1]["processes"]]
                 not in ([], [old]), timeout=15, what="a new worker")
        assert [request(bal.port, host=HOST)[0] for _ in range(3)] == [200] * 3
        wait_for(lambda: "1 request(s) in progress under a max_connections_per_client "
                         "limit: given back" in bal.output(), what="the log line")
        assert not [name for name in os.listdir(run_dir(bal)) if name.endswith(f".{old}")]
    finally:
        slow.close()
        bal.stop()
        backend.stop()


def run_dir(bal: Balancer) -> str:
    """The balancer's run directory (where the workers' control sockets are)."""
    (worker,) = bal.api("GET", "/api/v1/info")[1]["processes"]
    for fd in os.listdir(f"/proc/{worker['pid']}/fd"):
        target = os.readlink(f"/proc/{worker['pid']}/fd/{fd}")
        if target.endswith("/limits.shm"):
            return os.path.dirname(target)
    raise AssertionError("no limits.shm open in the worker")
