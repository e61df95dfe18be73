"""Passive and active health through real sockets, and the checker's bookkeeping."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time

import pytest

from balancer.health import CheckConfig, Checker, HealthChecks, read_status, wanted_checks
from balancer.pool import Backend as PoolBackend
from balancer.pool import BackendRegistry
from tests.conftest import RedisServer
from tests.rawpeer import RawBackend, read_request, sending, serve_each
from tests.support import Backend, Balancer, EchoHandler, dead_address, request, wait_for
from tests.test_kept_counters import worker_pids

HOST = "app.test"
FAST_CHECKS = {"path": "/healthz", "interval": 0.1, "timeout": 0.5, "rise": 3, "fall": 2}


class ScriptedHealth(EchoHandler):
    """/healthz answers 500 while the backend's `sick` flag is set; counts checks."""

    def act_healthz(self, query: dict[str, str], head: bool) -> None:
        server = self.server.owner  # type: ignore[attr-defined]
        server.checks.append((time.monotonic(), server.sick))
        self.reply(500 if server.sick else 200, b"{}", head)


class PerWorkerHealth(EchoHandler):
    """/healthz answers each worker's check with its own status: 500 to the first
    of the backend's `pids`, 502 to the second (200 until they are set); the
    worker is the process holding the connection's other end (`peer_pid`)."""

    def act_healthz(self, query: dict[str, str], head: bool) -> None:
        pids = self.server.owner.pids  # type: ignore[attr-defined]
        codes = dict(zip(pids, (500, 502), strict=False))
        self.reply(codes.get(peer_pid(self.connection, pids), 200), b"{}", head)


def peer_pid(conn: socket.socket, pids: list[int]) -> int | None:
    """Which of `pids` holds the other end of the loopback TCP connection `conn`."""
    here, there = conn.getsockname()[1], conn.getpeername()[1]
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    ends = {f"socket:[{row[9]}]" for row in rows
            if (int(row[1].split(":")[1], 16), int(row[2].split(":")[1], 16)) == (there, here)}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in ends:
                        return pid
    return None


def scripted(name: str, port: int = 0) -> Backend:
    backend = Backend(name, handler=ScriptedHealth, port=port)
    backend.sick = False  # type: ignore[attr-defined]
    backend.checks = []  # type: ignore[attr-defined]
    return backend


def state_of(bal: Balancer, backend: Backend, host: str = HOST) -> str:
    return bal.host_stats(host).get("backends", {}).get(backend.address, {}).get("state", "")


def checks_since(backend: Backend, since: float) -> list[tuple[float, bool]]:
    return [c for c in backend.checks if c[0] >= since]  # type: ignore[attr-defined]


@pytest.fixture
def stop_after():
    started: list = []
    yield started.append
    for thing in reversed(started):
        thing.stop()


# active checks ----------------------------------------------------------------
def test_down_after_fall_failed_checks_and_up_after_rise(tmp_path, stop_after):
    app = scripted("app")
    stop_after(app)
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [app.address],
                                     "health": FAST_CHECKS}})
    stop_after(bal)
    request(bal.port, host=HOST)  # the host's statistics exist from here on
    wait_for(lambda: len(app.checks) >= 2, what="checks to arrive")
    assert state_of(bal, app) == "up"
    sick_since = time.monotonic()
    app.sick = True
    wait_for(lambda: state_of(bal, app) == "down", timeout=5, what="the backend marked down")
    assert len([c for c in checks_since(app, sick_since) if c[1]]) >= FAST_CHECKS["fall"]
    well_since = time.monotonic()
    app.sick = False
    wait_for(lambda: state_of(bal, app) == "up", timeout=5, what="the backend back up")
    assert len([c for c in checks_since(app, well_since) if not c[1]]) >= FAST_CHECKS["rise"]


def test_killed_backend_marked_down_and_back_when_restarted(tmp_path, stop_after, held_port):
    port = held_port.port
    app = scripted("app", port=port)
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [app.address],
                                     "health": FAST_CHECKS}})
    stop_after(bal)
    request(bal.port, host=HOST)
    app.kill()
    wait_for(lambda: state_of(bal, app) == "down", timeout=5, what="the killed backend down")
    again = scripted("again", port=port)
    stop_after(again)
    wait_for(lambda: state_of(bal, again) == "up", timeout=5, what="the restarted backend up")
    assert len(again.checks) >= FAST_CHECKS["rise"]


def test_all_backends_checked_down_are_still_tried(tmp_path, stop_after):
    apps = [scripted("a"), scripted("b")]
    for app in apps:
        app.sick = True  # health says no, but the app serves requests fine
        stop_after(app)
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [a.address for a in apps],
                                     "health": FAST_CHECKS}})
    stop_after(bal)
    request(bal.port, host=HOST)
    wait_for(lambda: all(state_of(bal, a) == "down" for a in apps), timeout=5,
             what="both backends checked down")
    assert [request(bal.port, host=HOST)[0] for _ in range(4)] == [200] * 4


def test_a_checked_down_backend_gets_no_traffic_while_another_is_up(tmp_path, stop_after):
    sick, well = scripted("sick"), scripted("well")
    sick.sick = True
    stop_after(sick)
    stop_after(well)
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [sick.address, well.address],
                                     "health": FAST_CHECKS}})
    stop_after(bal)
    request(bal.port, host=HOST)
    wait_for(lambda: state_of(bal, sick) == "down", timeout=5, what="the sick backend down")
    served_before = sick.count - len(sick.checks)
    assert [request(bal.port, host=HOST)[0] for _ in range(6)] == [200] * 6
    assert sick.count - len(sick.checks) == served_before


def test_one_checker_per_address_and_stopped_with_its_rule(tmp_path, stop_after):
    app = scripted("app")
    stop_after(app)
    checks = {**FAST_CHECKS, "interval": 0.2}
    hosts = {name: {"action": "proxy", "backends": [app.address], "health": checks}
             for name in ("one.test", "two.test", "three.test")}
    bal = Balancer(tmp_path, hosts)
    stop_after(bal)
    wait_for(lambda: len(app.checks) >= 2, what="checks to arrive")
    start, count = time.monotonic(), len(app.checks)
    wait_for(lambda: time.monotonic() - start >= 2.0, timeout=3, interval=0.1,
             what="a two-second window")
    per_second = (len(app.checks) - count) / (time.monotonic() - start)
    assert 2 <= per_second <= 8  # one checker every 0.2 s (5/s), not three (15/s)
    bal.write_routes({name: {"action": "proxy", "backends": [app.address]} for name in hosts})
    wait_for(lambda: bal.version() == 2, what="the rules without health")
    settled = len(app.checks)
    wait_for(lambda: time.monotonic() - start >= 3.0, timeout=3, interval=0.1,
             what="another second")
    assert len(app.checks) <= settled + 1  # at most one check was already under way


# a careless or hostile operator -------------------------------------------------
BACK_TO_BACK = {**FAST_CHECKS, "interval": 1e-9}


def check_rate(backend: Backend, seconds: float) -> float:
    """Checks per second the backend gets over the next `seconds`."""
    start, count = time.monotonic(), len(backend.checks)  # type: ignore[attr-defined]
    wait_for(lambda: time.monotonic() - start >= seconds, timeout=seconds + 1, interval=0.05,
             what="the window")
    return (len(backend.checks) - count) / (time.monotonic() - start)  # type: ignore[attr-defined]


OLD_CHECKS = {**FAST_CHECKS, "interval": 0.5, "timeout": 0.005}  # a timeout under the floor


def raised_values(bal: Balancer) -> list[tuple[str, str, float, float]]:
    raised = bal.api("GET", "/api/v1/info")[1]["store"]["raised"]
    return sorted((r["host"], r["field"], r["stored"], r["used"]) for r in raised)


def floor_lines(bal: Balancer, version: int) -> int:
    """How many log lines said which values version `version` holds raised."""
    return sum(1 for line in bal.output().splitlines()
               if f"routing table version {version}: " in line and "below the floor" in line)


def store_old_table(redis: RedisServer | None, bal_dir, hosts: dict, version: int) -> None:
    """Write `hosts` into the store as an earlier version did, bypassing the API."""
    if redis is None:
        (bal_dir / "routes.json").write_text(json.dumps({"version": version, "hosts": hosts}))
        return
    raw = redis.client()
    with raw.pipeline(transaction=True) as pipe:
        for host, rule in hosts.items():
            pipe.hset("balancer:hosts", host, json.dumps(rule))
        pipe.set("balancer:version", version)
        pipe.publish("balancer:changes", f"{version} {' '.join(hosts)}")
        pipe.execute()


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_a_stored_check_value_below_the_floor_is_used_raised_and_the_api_refuses_it(
        tmp_path, stop_after, redis_factory, kind):
    """Bug: health.interval 1e-9 was accepted and every worker ran its checks back to
    back; then, with the floors, a table an earlier version stored with such values
    was refused whole as a corrupt store (a balancer upgraded on it served only
    no-hosts). It is loaded with the values raised to the floor, said once per table
    loaded (log, /api/v1/info); the API still refuses them."""
    app = scripted("app")
    stop_after(app)
    redis: RedisServer | None = redis_factory() if kind == "redis" else None
    good = {"action": "proxy", "backends": [app.address], "health": FAST_CHECKS}
    fast = {**good, "health": BACK_TO_BACK}
    store_old_table(redis, tmp_path, {HOST: fast, "old.test": {**good, "health": OLD_CHECKS}}, 1)
    bal = Balancer(tmp_path, None, store=redis.url if redis else None)
    stop_after(bal)
    assert request(bal.port, host=HOST)[0] == 200  # not the no-hosts page
    raised = [(HOST, "health.interval", 1e-9, 0.1), ("old.test", "health.timeout", 0.005, 0.01)]
    wait_for(lambda: raised_values(bal) == raised,  # the management process loads it apart
             what="the raised values in /api/v1/info")
    assert bal.api("GET", "/api/v1/info")[1]["store"]["problem"] is None
    assert check_rate(app, 1.0) <= 15  # every 0.1 s (10/s) for app.test, never back to back
    wait_for(lambda: floor_lines(bal, 1), what="the raised values logged")
    line = next(x for x in bal.output().splitlines() if "routing table version 1: 2 " in x)
    assert "app.test health.interval 1e-09 -> 0.1" in line
    assert "old.test health.timeout 0.005 -> 0.01" in line
    status, answer = bal.api("PUT", f"/api/v1/hosts/{HOST}", fast)
    assert status == 400 and answer["error"] == "invalid_rule", answer
    assert answer["details"] == ["health.interval: must be a finite number from 0.1 to 3600 "
                                 "seconds, got 1e-09"]
    assert bal.api("PUT", f"/api/v1/hosts/{HOST}", good)[0] == 200  # version 2
    wait_for(lambda: [r[0] for r in raised_values(bal)] in (["old.test"], []),
             what="the rule written again out of the raised list")
    # one written into the store by hand later, as an earlier balancer of a cluster would
    store_old_table(redis, tmp_path, {HOST: fast, "old.test": {**good, "health": OLD_CHECKS}},
                    3)
    bal.wait_version(3)
    wait_for(lambda: floor_lines(bal, 3), what="the raised values of version 3 logged")
    wait_for(lambda: raised_values(bal) == raised, what="version 3's raised values")
    assert request(bal.port, host=HOST)[0] == 200
    assert check_rate(app, 1.0) <= 15
    assert floor_lines(bal, 1) == 1 and floor_lines(bal, 3) == 1  # once per table loaded
    assert bal.proc.poll() is None


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_a_stored_check_value_that_is_no_number_above_0_is_still_a_corrupt_store(
        tmp_path, stop_after, redis_factory, kind):
    """Only a positive number below a floor is raised (earlier versions took those):
    0 or a string in the store is reported as before, the last good table serving."""
    app = scripted("app")
    stop_after(app)
    redis: RedisServer | None = redis_factory() if kind == "redis" else None
    bal = Balancer(tmp_path, None, store=redis.url if redis else None)
    stop_after(bal)
    good = {"action": "proxy", "backends": [app.address], "health": FAST_CHECKS}
    assert bal.api("PUT", f"/api/v1/hosts/{HOST}", good)[0] == 200
    store_old_table(redis, tmp_path, {HOST: {**good, "health": {**FAST_CHECKS, "interval": 0}}},
                    5)
    wait_for(lambda: "health.interval: must be a finite number from 0.1" in bal.store_problem(),
             what="the stored rule reported")
    assert request(bal.port, host=HOST)[0] == 200  # the last good table still serves
    assert raised_values(bal) == []


def test_each_workers_problem_with_a_backend_is_shown(tmp_path, stop_after):
    """Two workers find one backend down for two reasons (its checks answer each
    worker with its own status): /api/v1/stats names both problems. Bug: the
    first worker's problem hid the other's."""
    app = Backend("app", handler=PerWorkerHealth)
    app.pids = []  # type: ignore[attr-defined]
    stop_after(app)
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [app.address],
                                     "health": FAST_CHECKS}}, args=["--workers", "2"])
    stop_after(bal)
    app.pids = worker_pids(bal)  # type: ignore[attr-defined]
    assert len(app.pids) == 2  # type: ignore[attr-defined]

    def problem() -> str:
        return bal.host_stats(HOST).get("backends", {}).get(app.address, {}).get("problem", "")

    wait_for(lambda: "answered 500" in problem() and "answered 502" in problem(),
             what="both workers' problems")
    assert problem().count(" | ") == 1 and "more)" not in problem()


# passive health ----------------------------------------------------------------
def test_passive_marks_down_after_fall_and_probes_after_fail_timeout(tmp_path, stop_after):
    good = Backend("good")
    stop_after(good)
    dead = dead_address()
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [dead, good.address]}},
                   env={"BALANCER_TIMEOUTS_FAIL_TIMEOUT": "1"})
    stop_after(bal)

    def connect_errors() -> int:
        return bal.host_stats(HOST)["backends"][dead]["outcomes"]["connect_error"]

    for _ in range(10):
        assert request(bal.port, host=HOST)[0] == 200
    assert connect_errors() == 3  # fall (3) failures, then no more tries while down
    assert bal.host_stats(HOST)["backends"][dead]["state"] == "down"
    expired = time.monotonic() + 1.2
    wait_for(lambda: time.monotonic() > expired, timeout=3, what="the down mark to expire")
    # the mark expired, but nothing succeeded since: never reported up
    assert bal.host_stats(HOST)["backends"][dead]["state"] == "down"
    for _ in range(10):
        assert request(bal.port, host=HOST)[0] == 200
    assert connect_errors() == 4  # exactly one probe, which failed: down again
    assert bal.host_stats(HOST)["backends"][dead]["state"] == "down"


# the checker without a balancer --------------------------------------------------
def pool_backend(address: str) -> PoolBackend:
    return BackendRegistry(connect_timeout=1.0, fail_timeout=10.0).get(address)


def test_checker_counts_rise_and_fall():
    backend = pool_backend("127.0.0.1:1")
    checker = Checker(backend, CheckConfig(rise=2, fall=3))
    for healthy, down in [(False, False), (False, False), (True, False), (False, False),
                          (False, False), (False, True), (True, True), (True, False)]:
        checker.record(healthy)
        assert backend.checked_down is down
    woken = backend.recovered_event()
    checker.record(False), checker.record(False), checker.record(False)
    checker.record(True), checker.record(True)
    assert woken.is_set() and not backend.checked_down


def test_check_once_against_real_sockets():
    app = scripted("app")
    try:
        checker = Checker(pool_backend(app.address), CheckConfig(path="/healthz", timeout=1))
        assert checker.check_once()
        app.sick = True
        assert not checker.check_once()
    finally:
        app.stop()
    assert not Checker(pool_backend(dead_address()), CheckConfig(timeout=1)).check_once()


def test_check_times_out_on_a_silent_backend():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        assert not Checker(pool_backend(address), CheckConfig(timeout=0.3)).check_once()
        assert time.monotonic() - started < 2
    finally:
        listener.close()


def test_read_status_rejects_garbage():
    left, right = socket.socketpair()
    try:
        left.sendall(b"SSH-2.0-OpenSSH\r\n\r\n")
        with pytest.raises(Exception) as caught:
            read_status(right, time.monotonic() + 1)
        assert "invalid response" in str(caught.value)
    finally:
        left.close()
        right.close()


class FakeTable:
    def __init__(self, hosts: dict) -> None:
        self.routes = {k: type("R", (), {"rule": r})() for k, r in hosts.items()}


def test_wanted_checks_one_per_address_shortest_interval_wins():
    table = FakeTable({
        "a.test": {"action": "proxy", "backends": ["10.0.0.1:80", "10.0.0.2:80"],
                   "health": {"interval": 5, "path": "/a"}},
        "b.test": {"action": "proxy", "backends": ["10.0.0.2:80"],
                   "health": {"interval": 1, "path": "/b"}},
        "c.test": {"action": "proxy", "backends": ["10.0.0.3:80"]},
        "d.test": {"action": "spin"},
    })
    wanted = wanted_checks(table)
    assert sorted(wanted) == ["10.0.0.1:80", "10.0.0.2:80"]
    assert wanted["10.0.0.1:80"].path == "/a" and wanted["10.0.0.2:80"].path == "/b"


def test_health_checks_start_retune_and_stop():
    registry = BackendRegistry(connect_timeout=1.0, fail_timeout=10.0)
    spawned: list = []

    class Task:
        killed = False

        def kill(self, block: bool = False) -> None:
            self.killed = True

    def spawn(body):
        spawned.append(Task())
        return spawned[-1]

    checks = HealthChecks(registry, spawn=spawn)
    checks.update({"10.0.0.1:80": CheckConfig(), "10.0.0.2:80": CheckConfig()})
    assert len(spawned) == 2
    registry.get("10.0.0.1:80").checked_down = True
    checks.update({"10.0.0.1:80": CheckConfig(interval=9.0)})  # retuned in place
    assert len(spawned) == 2 and checks.checkers["10.0.0.1:80"].config.interval == 9.0
    assert spawned[1].killed and not spawned[0].killed
    checks.stop()
    assert spawned[0].killed and not registry.get("10.0.0.1:80").checked_down


# hostile and broken backends against one check ------------------------------------
def _reset(conn: socket.socket, _request: bytes) -> bool:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return False  # closed with SO_LINGER 0: an RST


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


@pytest.mark.parametrize(("script", "healthy", "problem"), [
    (sending(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n", OK), True, ""),
    (sending(b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 204 No Content\r\n\r\n"), True, ""),
    (sending(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Busy\r\n\r\n"), False, "answered 503"),
    (sending(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"), False, "Upgrade"),
    (sending(OK, pause=0.2), True, ""),  # slow, within the timeout
    (sending(OK, pause=1.5), False, "timed out"),
    (sending(b"HTTP/1.1 2", b"0", b"0", b" OK\r\n", OK[17:], pause=0.35), False, "timed out"),
    (sending(b"\x00\xff garbage\r\n\r\n"), False, "invalid response"),
    (sending(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000), False, "invalid response"),
    (sending(b"HTTP/1.1 200 OK\r\nContent-Le"), False, "invalid response"),  # then EOF
    (_reset, False, "reset"),
], ids=["103-then-200", "100-then-204", "100-then-503", "101", "slow-200", "too-slow-200",
        "trickled-status", "garbage", "endless-head", "cut-head", "reset"])
def test_a_check_judges_each_answer_within_its_timeout(script, healthy, problem):
    """Bug: a 103 Early Hints (or 100) before the 200 failed every check."""
    app = RawBackend(script)
    try:
        checker = Checker(pool_backend(app.address), CheckConfig(path="/healthz", timeout=1.0))
        started = time.monotonic()
        assert checker.check_once() is healthy, checker.problem
        assert time.monotonic() - started < 1.5  # never past its timeout (and some slack)
        assert problem in checker.problem
        assert app.requests and app.requests[0].startswith(b"GET /healthz HTTP/1.1\r\n")
    finally:
        app.stop()


def test_a_named_backend_is_resolved_again_for_each_check(monkeypatch):
    """A backend named by DNS follows its name: each check (as each new
    connection of a request) resolves it again, so a name moved to another
    address is checked there from the next check on. Two loopback addresses
    stand for the old and the new machine, on one port; the resolver is the
    edge that is scripted."""
    new = socket.create_server(("127.0.0.2", 0))
    port = new.getsockname()[1]
    checked: list[bytes] = []

    def serve(conn: socket.socket) -> None:
        with conn:
            checked.append(read_request(conn))
            conn.sendall(OK)

    serve_each(new, serve)
    where = ["127.0.0.3"]  # nothing listens there on that port: refused
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        return real(where[0] if host == "app.internal" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    try:
        checker = Checker(pool_backend(f"app.internal:{port}"),
                          CheckConfig(path="/healthz", timeout=1.0, fall=1, rise=1))
        checker.record(checker.check_once())
        assert checker.backend.checked_down and "connect" in checker.problem
        assert not checked
        where[0] = "127.0.0.2"  # the name moved
        checker.record(checker.check_once())
        assert not checker.backend.checked_down
        assert checked[0].startswith(b"GET /healthz HTTP/1.1\r\nHost: app.internal:")
    finally:
        new.close()
