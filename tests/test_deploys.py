"""Deploys as one operation (SPEC §10): real balancers, real backends, real Redis."""

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

from loadtest.procs import HeldPort
from management import ctl
from tests.deploy_fixtures import HOST
from tests.support import Backend, Balancer, dead_address, request, revive_port, wait_for


def proxy(*backends: Backend) -> dict[str, Any]:
    return {"action": "proxy", "backends": [b.address for b in backends]}


def served_by(port: int, path: str = "/") -> str:
    status, _, body = request(port, path=path)
    assert status == 200, body
    return json.loads(body)["backend"]


def deploy(lb: Balancer, body: dict[str, Any], host: str = HOST,
           what: str = "deploy") -> dict[str, Any]:
    status, answer = lb.api("POST", f"/api/v1/hosts/{host}/{what}", body)
    assert status == 202, answer
    return answer["deploy"]


def finished(lb: Balancer, deploy_id: str, timeout: float = 30.0) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        record = lb.api("GET", f"/api/v1/deploys/{deploy_id}")[1]["deploy"]
        return record if record["state"] != "running" else None
    return wait_for(ended, timeout, interval=0.05, what=f"deploy {deploy_id} to end")


def step(record: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in record["steps"] if s["name"] == name)


def in_background(call: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["result"] = call()
        except Exception as exc:  # noqa: BLE001 - the test reads it
            out["error"] = exc
        out["done_at"] = time.time()
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


class Load:
    """Clients sending requests back to back until stopped (half keep-alive):
    every failed request or socket error is kept."""

    def __init__(self, port: int, clients: int = 4) -> None:
        self.port = port
        self.stopped = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.backends: list[str] = []
        self.threads = [threading.Thread(target=self.client_loop, args=(n % 2 == 0,),
                                         daemon=True) for n in range(clients)]

    def client_loop(self, keep_alive: bool) -> None:
        conn = None
        while not self.stopped.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                close = {} if keep_alive else {"Connection": "close"}
                conn.request("GET", "/", headers={"Host": HOST, **close})
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    self.failures.append(f"{response.status} {body[:80]!r}")
                else:
                    self.ok += 1
                    self.backends.append(json.loads(body)["backend"])
                if not keep_alive:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                conn = None

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        wait_for(lambda: self.ok >= 20, what="the load to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(15)


@pytest.fixture
def a_and_b() -> Iterator[tuple[Backend, Backend]]:
    """A (on a held port: the rollback test starts A' there) and B."""
    with HeldPort() as held:
        a, b = Backend("a", port=held.port), Backend("b")
        yield a, b
        for backend in (a, b):
            backend.stop()


@pytest.fixture
def lb(tmp_path: Path, a_and_b: tuple[Backend, Backend]) -> Iterator[Balancer]:
    balancer = Balancer(tmp_path, {HOST: proxy(a_and_b[0])})
    yield balancer
    balancer.stop()


class NotReady:
    """A backend that is not ready yet: every request (a deploy's probe) answered
    503 and counted, on the held `port` the real backend takes over after `stop`."""

    def __init__(self, port: HeldPort) -> None:
        self.listener = socket.create_server(("127.0.0.1", port.port))  # SO_REUSEADDR
        self.port = port.port
        self.probes = 0
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # stopped
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
                    self.probes += 1

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self.listener.close()
        self.thread.join(5)


def test_a_deploy_under_load_fails_no_request_and_lets_a_finish_what_it_started(
        tmp_path: Path, lb: Balancer, a_and_b: tuple[Backend, Backend],
        held_port: HeldPort) -> None:
    a, _ = a_and_b
    not_ready = NotReady(held_port)  # B's port: B answers 503 until it is ready
    b_port = not_ready.port
    slow, slow_out = in_background(lambda: request(lb.port, path="/slow?s=2"))
    wait_for(lambda: lb.host_stats(HOST).get("open_requests"), what="the slow request")
    with Load(lb.port) as load:
        record = deploy(lb, {"backends": [f"127.0.0.1:{b_port}"], "warmup": 0.5,
                             "drain_timeout": 20})
        # B is not ready yet: the deploy probes it (0.25 s apart) and must wait for it
        wait_for(lambda: not_ready.probes >= 3, what="three probes of B answered 503")
        assert lb.api("GET", f"/api/v1/hosts/{HOST}")[1]["rule"] == proxy(a)
        not_ready.stop()
        b = Backend("b", port=b_port)
        try:
            record = finished(lb, record["id"])
            a.stop()  # the deploy says A is drained: stopping it must fail nothing
            wait_for(lambda: load.ok > 50 and load.backends[-5:] == ["b"] * 5,
                     what="requests to reach B after A stopped")
        finally:
            load.__exit__()
            b.stop()
    slow.join(10)
    assert load.failures == []
    assert record["state"] == "done", record
    assert [s["name"] for s in record["steps"]] == ["ready", "switch", "warmup", "drain"]
    assert step(record, "ready")["ended"] - step(record, "ready")["started"] >= 0.5
    assert step(record, "drain")["outcome"] == "drained"
    assert slow_out["result"][0] == 200
    assert json.loads(slow_out["result"][2])["backend"] == "a"  # in flight at the switch
    assert step(record, "drain")["ended"] >= slow_out["done_at"] - 0.05  # it waited for it
    assert lb.api("GET", f"/api/v1/hosts/{HOST}")[1]["rule"] == {
        "action": "proxy", "backends": [f"127.0.0.1:{b_port}"]}
    listed = lb.api("GET", "/api/v1/deploys")[1]["deploys"]
    assert listed[0]["id"] == record["id"] and listed[0]["from"] == [a.address]


def test_the_old_way_fails_the_request_in_flight(lb: Balancer,
                                                   a_and_b: tuple[Backend, Backend]) -> None:
    """Set proxy to B and kill A at once: what a deploy exists to avoid."""
    a, b = a_and_b
    slow, out = in_background(lambda: request(lb.port, path="/slow?s=1"))
    wait_for(lambda: lb.host_stats(HOST).get("open_requests"), what="the slow request")
    assert lb.api("PUT", f"/api/v1/hosts/{HOST}", proxy(b))[0] == 200
    a.kill()
    slow.join(10)
    assert "error" in out or out["result"][0] >= 500


def test_a_backend_that_never_gets_ready_changes_nothing(
        lb: Balancer, a_and_b: tuple[Backend, Backend]) -> None:
    a, _ = a_and_b
    sick = Backend("sick")
    try:
        record = deploy(lb, {"backends": [sick.address], "ready_timeout": 0.6, "warmup": 0})
        # the echo backend answers /status/503 for that path only: use a health path
        record = finished(lb, record["id"])
        assert record["state"] == "done"  # GET / < 500: ready at once
        lb.api("PUT", f"/api/v1/hosts/{HOST}", {**proxy(a), "health": {"path": "/status/503"}})
        version = lb.version()
        record = finished(lb, deploy(lb, {"backends": [sick.address], "ready_timeout": 0.6,
                                          "warmup": 0})["id"])
    finally:
        sick.stop()
    assert record["state"] == "failed"
    assert "not ready after 0.6s" in record["error"] and "answered 503" in record["error"]
    assert "nothing was switched" in record["error"]
    assert step(record, "ready")["outcome"] == "failed"
    assert lb.version() == version
    assert lb.api("GET", f"/api/v1/hosts/{HOST}")[1]["rule"]["backends"] == [a.address]
    assert served_by(lb.port) == "a"


def test_one_deploy_per_host_and_bad_requests_start_nothing(
        lb: Balancer, a_and_b: tuple[Backend, Backend]) -> None:
    _, b = a_and_b
    held, _ = in_background(lambda: request(lb.port, path="/slow?s=1.5"))
    wait_for(lambda: lb.host_stats(HOST).get("open_requests"), what="the slow request")
    first = deploy(lb, {"backends": [b.address], "warmup": 0})
    status, answer = lb.api("POST", f"/api/v1/hosts/{HOST}/deploy", {"backends": [b.address]})
    assert status == 409 and answer["error"] == "deploy_in_progress"
    assert first["id"] in answer["message"]
    for body, problem in (({"backends": []}, "backends"),
                          ({"backends": ["nope"]}, "backends[0]"),
                          ({"backends": [b.address], "warmup": -1}, "warmup"),
                          ({"backends": [b.address], "drain_timeout": "x"}, "drain_timeout"),
                          ({"backends": [b.address], "colour": 1}, "colour: unknown field")):
        status, answer = lb.api("POST", f"/api/v1/hosts/{HOST}/deploy", body)
        assert status == 400 and answer["error"] == "invalid_deploy", answer
        assert any(problem in d for d in answer["details"]), answer
    status, answer = lb.api("POST", "/api/v1/hosts/nobody.test/deploy", {"backends": [b.address]})
    assert status == 404
    held.join(10)
    assert finished(lb, first["id"])["state"] == "done"
    assert len(lb.api("GET", "/api/v1/deploys")[1]["deploys"]) == 1


def test_rollback_moves_back_to_the_previous_backends_the_same_way(
        lb: Balancer, a_and_b: tuple[Backend, Backend]) -> None:
    a, b = a_and_b
    status, answer = lb.api("POST", f"/api/v1/hosts/{HOST}/rollback")
    assert status == 409 and answer["error"] == "nothing_to_roll_back"
    assert finished(lb, deploy(lb, {"backends": [b.address], "warmup": 0})["id"])["state"] == \
        "done"
    a.stop()
    a_again = Backend("a2", port=a.port)  # A' on A's address
    try:
        slow, out = in_background(lambda: request(lb.port, path="/slow?s=1"))
        wait_for(lambda: lb.host_stats(HOST).get("open_requests"), what="the slow request")
        record = deploy(lb, {"warmup": 0.2}, what="rollback")
        assert record["kind"] == "rollback" and record["to"] == [a.address]
        record = finished(lb, record["id"])
        slow.join(10)
        assert record["state"] == "done", record
        assert json.loads(out["result"][2])["backend"] == "b"
        assert served_by(lb.port) == "a2"
    finally:
        a_again.stop()


def test_balancerctl_deploy_shows_each_step_and_fails_with_the_reason(
        lb: Balancer, a_and_b: tuple[Backend, Backend],
        capsys: pytest.CaptureFixture[str]) -> None:
    _, b = a_and_b
    url = f"http://127.0.0.1:{lb.mport}"
    assert ctl.main(["--url", url, "deploy", HOST, "--backend", b.address,
                     "--warmup", "0.2", "--drain-timeout", "5"]) == 0
    out = capsys.readouterr().out
    for line in ("ready   ...", "ready   ok", "switch  ok", "warmup  ok", "drain   drained",
                 f"of {HOST} done"):
        assert line in out, out
    assert ctl.main(["--url", url, "deploys"]) == 0
    assert f"{HOST}" in capsys.readouterr().out
    code = ctl.main(["--url", url, "deploy", HOST, "--backend", "127.0.0.1:1",
                     "--ready-timeout", "0.3"])
    err = capsys.readouterr().err
    assert code == 1 and "failed at step ready" in err and "nothing was switched" in err
    assert ctl.main(["--url", url, "--json", "rollback", HOST, "--no-wait", "--warmup", "0"]) == 0
    started = json.loads(capsys.readouterr().out)["deploy"]
    assert started["kind"] == "rollback"
    assert finished(lb, started["id"])["state"] == "done"


def test_a_deploy_survives_a_reload_of_the_management_process(
        lb: Balancer, a_and_b: tuple[Backend, Backend]) -> None:
    a, b = a_and_b
    slow, out = in_background(lambda: request(lb.port, path="/slow?s=4"))
    wait_for(lambda: lb.host_stats(HOST).get("open_requests"), what="the slow request")
    record = deploy(lb, {"backends": [b.address], "warmup": 0, "drain_timeout": 30})
    wait_for(lambda: lb.api("GET", f"/api/v1/deploys/{record['id']}")[1]["deploy"]["step"]
             == "drain", what="the drain")
    lb.proc.send_signal(signal.SIGHUP)  # a new management process takes over
    wait_for(lambda: "resuming at step drain" in lb.output(), timeout=15,
             what="the new management process to resume the deploy")
    record = finished(lb, record["id"])
    slow.join(10)
    assert record["state"] == "done", record
    assert step(record, "drain")["outcome"] == "drained"
    assert out["result"][0] == 200 and json.loads(out["result"][2])["backend"] == "a"
    assert lb.api("GET", f"/api/v1/hosts/{HOST}")[1]["rule"] == proxy(b)


def test_the_drain_waits_for_every_balancer_sharing_redis(
        tmp_path: Path, redis_server: Any, a_and_b: tuple[Backend, Backend]) -> None:
    a, b = a_and_b
    store = ["--store", redis_server.url, "--config", str(tmp_path / "ns.toml")]
    (tmp_path / "ns.toml").write_text(f'[store]\nnamespace = "deploy-{time.time_ns()}"\n')
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = Balancer(tmp_path / "one", args=store)
    second = Balancer(tmp_path / "two", args=store)
    try:
        assert first.api("PUT", f"/api/v1/hosts/{HOST}", proxy(a))[0] == 200
        wait_for(lambda: served_by(second.port) == "a", what="the second balancer")
        slow, out = in_background(lambda: request(second.port, path="/slow?s=2.5"))
        wait_for(lambda: second.host_stats(HOST).get("open_requests"), what="the slow request")
        record = deploy(first, {"backends": [b.address], "warmup": 0, "drain_timeout": 20})
        record = finished(first, record["id"])
        slow.join(10)
        assert record["state"] == "done"
        assert step(record, "drain")["outcome"] == "drained"
        # the first balancer had nothing in flight on A: only the second's count held it
        assert step(record, "drain")["ended"] - step(record, "switch")["ended"] >= 1.5
        assert json.loads(out["result"][2])["backend"] == "a"
        assert served_by(second.port) == "b"
        seen = second.api("GET", "/api/v1/deploys")[1]["deploys"]
        assert seen[0]["id"] == record["id"] and seen[0]["state"] == "done"
    finally:
        first.stop()
        second.stop()


def test_slow_start_ramps_the_new_backends_share_up() -> None:
    from balancer.balancing import FIRST_SHARE, IpHash, RoundRobin, SlowStart
    from balancer.pool import Backend as PoolBackend

    def backend(port: int) -> PoolBackend:
        from balancer.addr import parse_backend_addr
        return PoolBackend(parse_backend_addr(f"127.0.0.1:{port}"), connect_timeout=1.0,
                           fail_timeout=1.0)
    new, old = backend(1), backend(2)
    started = time.time()
    ramp = SlowStart(RoundRobin([new], [1]), RoundRobin([old], [1]), started, 2.0)
    picks = [ramp.pick("c", ()) for _ in range(2000)]
    assert 0.02 < picks.count(new) / 2000 < 0.15  # about FIRST_SHARE at first
    assert ramp.share == pytest.approx(FIRST_SHARE, abs=0.05)
    late = SlowStart(RoundRobin([new], [1]), RoundRobin([old], [1]), started - 1.0, 2.0)
    share = [late.pick("c", ()) for _ in range(2000)].count(new) / 2000
    assert 0.4 < share < 0.65  # half-way through
    done = SlowStart(RoundRobin([new], [1]), RoundRobin([old], [1]), started - 3.0, 2.0)
    assert {done.pick("c", ()) for _ in range(200)} == {new}
    assert done.pick("c", (new,)) is None  # the old backends get no request, not even a retry
    assert late.pick("c", (new,)) is old  # while warming up they take a retry
    sticky = SlowStart(IpHash([new], [1]), IpHash([old], [1]), started - 1.0, 2.0)
    for client in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"):
        assert len({sticky.pick(client, ()) for _ in range(50)}) == 1  # ip_hash stays sticky
    sides = {sticky.pick(f"10.0.1.{n}", ()) for n in range(200)}
    assert sides == {new, old}


def test_a_websocket_tunnel_that_outlives_the_drain_timeout_is_counted_and_listed(
        tmp_path: Path) -> None:
    import websocket

    from tests.test_websocket import WsEcho

    old, new = WsEcho(), Backend("new")
    lb = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [old.address]}})
    try:
        ws = websocket.create_connection(f"ws://127.0.0.1:{lb.port}/chat", host=HOST, timeout=5)
        try:
            wait_for(lambda: lb.host_stats(HOST)["backends"][old.address]["tunnels"] == 1,
                     what="the tunnel counted")
            record = finished(lb, deploy(lb, {"backends": [new.address], "warmup": 0,
                                              "drain_timeout": 1})["id"])
            ws.send("still here")
            assert ws.recv() == "still here"  # the tunnel outlived the drain, untouched
        finally:
            ws.close()
    finally:
        lb.stop()
        new.stop()
        old.stop()
    assert record["state"] == "done"  # the switch stands
    drain = step(record, "drain")
    assert drain["outcome"] == "timeout"
    assert f"{old.address}: 1 in flight (1 WebSocket tunnels)" in record["warning"]
    assert record["remaining"] == {old.address: {"in_flight": 1, "tunnels": 1}}


def test_a_deploy_from_a_spin_rule_releases_the_held_requests_to_the_new_backends(
        lb: Balancer, a_and_b: tuple[Backend, Backend]) -> None:
    _, b = a_and_b
    assert lb.api("PUT", f"/api/v1/hosts/{HOST}", {"action": "spin", "timeout": 30})[0] == 200
    held, out = in_background(lambda: request(lb.port))
    wait_for(lambda: lb.spinning(HOST) == 1, what="the request held")
    record = finished(lb, deploy(lb, {"backends": [b.address], "warmup": 0})["id"])
    held.join(10)
    assert record["state"] == "done" and record["from"] == []
    assert [s["name"] for s in record["steps"]] == ["ready", "switch"]
    assert json.loads(out["result"][2])["backend"] == "b"
    assert lb.api("GET", f"/api/v1/hosts/{HOST}")[1]["rule"] == proxy(b)


def test_a_rule_changed_by_someone_else_during_the_deploy_is_not_overwritten(
        lb: Balancer, a_and_b: tuple[Backend, Backend]) -> None:
    a, b = a_and_b
    late = dead_address()  # not listening yet: the deploy waits in its ready step
    record = deploy(lb, {"backends": [late], "ready_timeout": 30})
    operator = {**proxy(a, b), "retries": 1}
    assert lb.api("PUT", f"/api/v1/hosts/{HOST}", operator)[0] == 200
    started = Backend("late", port=revive_port(late))
    try:
        record = finished(lb, record["id"])
    finally:
        started.stop()
    assert record["state"] == "failed"
    assert "changed during the deploy; nothing was switched" in record["error"]
    assert lb.api("GET", f"/api/v1/hosts/{HOST}")[1]["rule"] == operator
    assert lb.api("GET", "/api/v1/hosts")[1]["hosts"] == {HOST: operator}


# resuming (in process: a management process that stopped mid-deploy) --------------
def resumable(tmp_path: Path, rule: dict[str, Any], step_name: str, since: float | None,
              to: list[str]) -> tuple[Any, dict[str, Any]]:
    from balancer.stores import open_store
    from management.app import create_app

    store = open_store(f"file:{tmp_path / 'routes.json'}")
    app = create_app(store=store)
    before = {"action": "proxy", "backends": ["127.0.0.1:9001"]}
    store.put_host(HOST, rule)
    record = {"id": "d1", "host": HOST, "kind": "deploy", "from": before["backends"], "to": to,
              "settings": {"ready_timeout": 5.0, "drain_timeout": 5.0, "warmup": 0.0},
              "state": "running", "step": step_name, "started": time.time(), "ended": None,
              "error": None, "warning": None, "before": before, "since": since,
              "version": None, "owner": "gone",
              "steps": [{"name": step_name, "started": time.time(), "ended": None,
                         "outcome": None, "detail": ""}]}
    store.records().begin(record, time.time() - 60, 5.0)  # (its process long quiet)
    return app, record


def test_resumed_in_the_ready_step_after_its_timeout_fails_cleanly(tmp_path: Path) -> None:
    before = {"action": "proxy", "backends": ["127.0.0.1:9001"]}
    app, record = resumable(tmp_path, before, "ready", None, ["127.0.0.1:9002"])
    record["started"] = time.time() - 6  # its ready_timeout (5 s) ran out meanwhile
    app.deployer.run(record, resumed=True)
    stored = app.store.records().deploy("d1")
    assert stored["state"] == "failed" and "nothing was switched" in stored["error"]
    assert "restarted during the ready step" in stored["error"]
    assert app.store.load().hosts[HOST] == before


def test_resumed_after_the_switch_write_carries_on_to_the_end(tmp_path: Path) -> None:
    from management.deploy_steps import switched_rule

    since = time.time() - 1
    before = {"action": "proxy", "backends": ["127.0.0.1:9001"]}
    switched = switched_rule(before, ["127.0.0.1:9002"], since, 0.0)
    assert switched["draining"]["backends"] == ["127.0.0.1:9001"]
    app, record = resumable(tmp_path, switched, "switch", since, ["127.0.0.1:9002"])
    assert app.store.records().claim(HOST, "d1", app.deployer.owner, time.time(), 5.0) is None
    app.deployer.start_watching()  # publishes this (data-plane-less) balancer's counts
    try:
        app.deployer.run(record, resumed=True)
    finally:
        app.deployer.stop()
    stored = app.store.records().deploy("d1")
    assert stored["state"] == "done", stored
    assert step(stored, "switch")["detail"] == "switched (before the restart)"
    assert step(stored, "drain")["outcome"] == "drained"
    assert app.store.load().hosts[HOST] == {"action": "proxy", "backends": ["127.0.0.1:9002"]}
    assert app.store.records().claims() == {}


def test_one_server_under_two_spellings_is_one_backend(
        lb: Balancer, a_and_b: tuple[Backend, Backend]) -> None:
    """A on 127.0.0.1:P, named [::ffff:127.0.0.1]:P by the deploy beside B: it
    keeps serving and is not drained (nor reported safe to stop); named
    localhost:P, which may or may not be it without resolving, the deploy is
    refused. Bug: the old spelling was drained while the server served on."""
    a, b = a_and_b
    status, answer = lb.api("POST", f"/api/v1/hosts/{HOST}/deploy",
                            {"backends": [f"localhost:{a.port}"]})
    assert status == 400 and answer["error"] == "invalid_deploy", answer
    assert answer["details"][0].startswith(
        f"backends[0]: localhost:{a.port} may be the old backend {a.address}")
    assert lb.api("GET", "/api/v1/deploys")[1]["deploys"] == []
    mapped = f"[::ffff:127.0.0.1]:{a.port}"
    with Load(lb.port) as load:
        record = finished(lb, deploy(lb, {"backends": [mapped, b.address], "warmup": 5,
                                          "drain_timeout": 5})["id"])
        wait_for(lambda: {"a", "b"} <= set(load.backends[-50:]), what="both serving")
    assert load.failures == []
    assert record["state"] == "done", record
    assert [s["name"] for s in record["steps"]] == ["ready", "switch"]  # nothing leaves
    assert lb.api("GET", f"/api/v1/hosts/{HOST}")[1]["rule"] == {
        "action": "proxy", "backends": [mapped, b.address]}


@pytest.mark.parametrize("short", ["127.1", "127.0.1", "0x7f.1", "2130706433", "0177.0.0.1"])
def test_an_ipv4_address_in_a_short_form_is_refused_where_rules_are_written(
        lb: Balancer, a_and_b: tuple[Backend, Backend], short: str) -> None:
    """The system resolver the data plane connects through reads `short` as
    127.0.0.1, never as a name: a rule or a deploy naming it is refused with the
    address it means (bug: ``0x7f.1`` passed as a name, so a deploy from
    ``127.0.0.1:P`` to ``0x7f.1:P`` drained, and reported safe to stop, the server
    that served on; ``127.1`` was refused as "not a valid host name or IP")."""
    a, _ = a_and_b
    assert socket.getaddrinfo(short, a.port, type=socket.SOCK_STREAM)[0][4][0] == "127.0.0.1"
    version = lb.version()
    problem = (f"backends[0]: invalid address '{short}:{a.port}': '{short}' is another "
               f"spelling of the IPv4 address 127.0.0.1 (the system resolver reads it so, "
               f"and connects to 127.0.0.1); write 127.0.0.1")
    status, answer = lb.api("POST", f"/api/v1/hosts/{HOST}/deploy",
                            {"backends": [f"{short}:{a.port}"]})
    assert status == 400 and answer["error"] == "invalid_deploy", answer
    assert answer["details"] == [problem]
    status, answer = lb.api("PUT", f"/api/v1/hosts/{HOST}",
                            {"action": "proxy", "backends": [f"{short}:{a.port}"]})
    assert status == 400 and answer["error"] == "invalid_rule", answer
    assert answer["details"] == [problem]
    assert lb.api("GET", "/api/v1/deploys")[1]["deploys"] == []
    assert lb.version() == version


def test_a_backends_spellings_compare_as_literals_and_names_are_not_resolved() -> None:
    from management.deploy_steps import canonical, leaving, spelling_problems

    assert canonical("[::FFFF:127.0.0.1]:80") == canonical("127.0.0.1:80") == "127.0.0.1:80"
    assert canonical("[0:0::1]:80") == "[::1]:80"
    assert canonical("LocalHost.:80") == "localhost:80"
    assert canonical("https://Example.COM") == "https://example.com:443"
    assert canonical("https://10.0.0.1:80") != canonical("10.0.0.1:80")
    assert leaving(["127.0.0.1:80", {"address": "[::1]:81", "weight": 2}],
                   ["[::ffff:7f00:1]:80", "[::1]:82"]) == [{"address": "[::1]:81", "weight": 2}]
    assert leaving(["app.internal:80"], ["10.0.0.5:80"]) == ["app.internal:80"]  # unresolved
    assert spelling_problems(["[::1]:80"], ["localhost:80"])
    assert spelling_problems(["localhost:80"], ["127.0.0.1:80"])
    assert not spelling_problems(["localhost:80"], ["127.0.0.1:81", "LOCALHOST:80"])
    assert not spelling_problems(["127.0.0.1:80"], ["https://localhost:80"])
