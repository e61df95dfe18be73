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
import itertools
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.rawpeer import serve_each
from tests.support import (
    Backend,
    Balancer,
    constants_prefix,
    in_threads,
    replace_file,
    request,
    wait_for,
)
from tests.test_deploys import HOST, deploy, finished, in_background, proxy, step

ANSWERS = {
    "ok": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    "503": b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
}
SLOW_HOST = "slow.test"  # a second host, deployed beside HOST
KEPT = 5  # deploy records kept (`MAX_DEPLOYS`, 50) in the test of their removal


class Scripted:
    """A backend that answers its connections by a script, one entry per
    connection (the last one repeats): ``ok`` (200), ``503``, ``hang`` (reads
    the request, never answers, holds the connection until stopped), ``close``
    (closes without a byte), ``slow:S`` (a 200 after S seconds), ``slow503:S``
    (a 503 after S seconds) or ``at503:S`` (a 503 S seconds after the first
    connection was accepted)."""

    def __init__(self, *script: str) -> None:
        self.script = list(script)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.seen = 0  # connections accepted
        self.first = 0.0  # when the first was (`time.monotonic`)
        self.turns = itertools.count()
        self.stopped = threading.Event()
        serve_each(self.listener, self.answer)

    def answer(self, conn: socket.socket) -> None:
        self.seen = turn = next(self.turns) + 1
        self.first = self.first or time.monotonic()
        what = self.script[min(turn, len(self.script)) - 1]
        with contextlib.suppress(OSError):
            conn.settimeout(10)
            conn.recv(65536)
            if what == "hang":
                self.stopped.wait(30)
            elif what.startswith("at503:"):
                self.stopped.wait(max(0.0, self.first + float(what[6:]) - time.monotonic()))
                conn.sendall(ANSWERS["503"])
            elif what.startswith("slow"):
                kind, _, seconds = what.partition(":")
                self.stopped.wait(float(seconds))
                conn.sendall(ANSWERS[kind[4:] or "ok"])
            elif what != "close":
                conn.sendall(ANSWERS[what])
        conn.close()

    def stop(self) -> None:
        self.stopped.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


def draining(lb: Balancer, b: Backend, seconds: int, drain_timeout: int
             ) -> tuple[tuple[threading.Thread, dict[str, Any]], dict[str, Any]]:
    """A request to the old backend taking `seconds`, in flight (its thread and
    output), and a deploy to `b` begun and waiting in its drain for it (its record)."""
    slow = in_background(lambda: request(lb.port, path=f"/slow?s={seconds}"))
    wait_for(lambda: lb.host_stats(HOST).get("open_requests"), what="the slow request")
    record = deploy(lb, {"backends": [b.address], "warmup": 0, "drain_timeout": drain_timeout})
    wait_for(lambda: lb.api("GET", f"/api/v1/deploys/{record['id']}")[1]["deploy"]["step"]
             == "drain", what="the drain")
    return slow, record


@pytest.fixture
def lb(shared_lb: Balancer) -> Balancer:
    """One balancer for the module's tests that kill no process and damage no
    deploy record (`tests.deploy_fixtures.shared_lb`); the others ask for
    `fresh_lb`."""
    return shared_lb


def rule_of(lb: Balancer, host: str = HOST) -> dict[str, Any]:
    return lb.api("GET", f"/api/v1/hosts/{host}")[1]["rule"]


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


def test_a_check_the_ready_step_has_no_time_left_for_is_not_begun(
        lb: Balancer, a: Backend) -> None:
    """Bug: a round of checks begun 0.8 ms before the ready step's end failed "no
    answer within 0.0008s", and that replaced the backend's real answer (a 503)
    in the deploy's error. Here the second check answers 503 0.7 s after the first
    began, which is after the step's deadline was set: a third would be begun with
    at most 0.05 s left (none, if this machine is slow): it is not begun, and the
    error keeps the 503. (A 503 0.45 s after the second check began came after the
    step's end when a loaded machine began the first 0.3 s late.)"""
    sick = Scripted("503", "at503:0.7", "hang")
    health = {"path": "/", "timeout": 30, "rise": 1}  # checks every 0.25 s
    assert lb.api("PUT", f"/api/v1/hosts/{HOST}", {**proxy(a), "health": health})[0] == 200
    before = rule_of(lb)
    try:
        record = finished(lb, deploy(lb, {"backends": [sick.address],
                                          "ready_timeout": 1})["id"], timeout=10)
    finally:
        sick.stop()
    assert record["state"] == "failed", record
    assert f"{sick.address}: GET / answered 503" in record["error"], record["error"]
    assert "no answer" not in record["error"], record["error"]
    assert sick.seen == 2  # the third check was never begun
    assert rule_of(lb) == before


def test_flapping_dying_and_slow_backends_never_count_as_ready(lb: Balancer, a: Backend) -> None:
    """With `health.rise` 2, a backend must answer well twice in a row: one that
    flaps (200, 503, ...), answers 200 then closes every later connection, or
    answers just over the check's timeout is never ready; one just under is.
    The slow one is deployed to another host at the same time: a round of checks
    waits for every backend's, so beside it a round took the whole check timeout,
    and a loaded machine fitted 2 rounds in the ready timeout, not the 3 the
    flapping one needs to show that its 200 after a 503 starts the count again."""
    flapping, dying = Scripted("ok", "503", "ok", "503", "ok", "503"), Scripted("ok", "close")
    over, under = Scripted("slow:0.7"), Scripted("slow:0.1")
    health = {"path": "/", "timeout": 0.4, "interval": 0.1, "rise": 2}
    for host in (HOST, SLOW_HOST):
        assert lb.api("PUT", f"/api/v1/hosts/{host}", {**proxy(a), "health": health})[0] == 200
    before, slow_before = rule_of(lb), rule_of(lb, SLOW_HOST)
    try:
        slow = deploy(lb, {"backends": [over.address], "ready_timeout": 1.2}, SLOW_HOST)
        record = finished(lb, deploy(lb, {"backends": [flapping.address, dying.address],
                                          "ready_timeout": 1.2})["id"])
        assert record["state"] == "failed", record
        error = record["error"]
        assert f"{flapping.address}: GET / answered 503" in error
        assert f"{dying.address}: invalid response: backend closed the connection" in error
        assert rule_of(lb) == before and flapping.seen >= 3 and dying.seen >= 2
        slow = finished(lb, slow["id"])
        assert slow["state"] == "failed", slow
        assert f"{over.address}: no answer within " in slow["error"]
        assert rule_of(lb, SLOW_HOST) == slow_before
        record = finished(lb, deploy(lb, {"backends": [under.address], "warmup": 0,
                                          "ready_timeout": 5})["id"])
        assert record["state"] == "done", record
        assert rule_of(lb)["backends"] == [under.address]
    finally:
        for peer in (flapping, dying, over, under):
            peer.stop()


# 2. operators racing, and the management process dying ----------------------------
def post_deploy(lb: Balancer, body: dict[str, Any]) -> tuple[int, Any]:
    """(status, answer) of a deploy of HOST asked of `lb`, whatever the answer."""
    return lb.api("POST", f"/api/v1/hosts/{HOST}/deploy", body)


def management_pids(lb: Balancer) -> list[int]:
    import re
    return [int(p) for p in re.findall(r"management (\d+) ready", lb.output())]


def test_operators_racing_on_two_balancers_sharing_redis_start_one_deploy(
        tmp_path: Path, redis_server: Any) -> None:
    a, b = Backend("a"), Scripted("503")  # B never ready: the winner's deploy stays running
    config = f'[store]\nnamespace = "race-{time.time_ns()}"\n'
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    store = ["--store", redis_server.url]
    first = Balancer(tmp_path / "one", args=store, config=config)
    second = Balancer(tmp_path / "two", args=store, config=config)
    try:
        assert first.api("PUT", f"/api/v1/hosts/{HOST}", proxy(a))[0] == 200
        body = {"backends": [b.address], "ready_timeout": 1.5}
        lbs = [first, second] * 8
        turn = itertools.count()
        answers = [f.result() for f in in_threads(len(lbs), lambda: post_deploy(
            lbs[next(turn) % len(lbs)], body))]
        started = [answer["deploy"] for status, answer in answers if status == 202]
        refused = [answer for status, answer in answers if status == 409]
        assert len(started) == 1 and len(refused) == len(lbs) - 1, answers
        assert {r["error"] for r in refused} == {"deploy_in_progress"}
        assert all(started[0]["id"] in r["message"] for r in refused)
        record = finished(second, started[0]["id"])
        assert record["state"] == "failed" and "nothing was switched" in record["error"]
        assert second.api("GET", f"/api/v1/hosts/{HOST}")[1]["rule"] == proxy(a)
        assert len(first.api("GET", "/api/v1/deploys")[1]["deploys"]) == 1
    finally:
        first.stop()
        second.stop()
        a.stop()
        b.stop()


@pytest.mark.slow  # the claim of a killed process goes stale after STALE_AFTER (5 s)
def test_a_management_process_killed_mid_drain_is_replaced_and_the_deploy_finishes(
        fresh_lb: Balancer, a: Backend) -> None:
    lb = fresh_lb
    b = Backend("b")
    try:
        (slow, out), record = draining(lb, b, 6, 30)
        killed = management_pids(lb)[-1]
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: len(management_pids(lb)) == 2, timeout=15,
                 what="the arbiter to start a new management process")
        status, answer = post_deploy(lb, {"backends": [a.address]})
        assert status == 409 and record["id"] in answer["message"], answer  # still claimed
        wait_for(lambda: "resuming at step drain" in lb.output(), timeout=15,
                 what="the new management process to resume the deploy")
        record = finished(lb, record["id"])
        slow.join(10)
    finally:
        b.stop()
    assert record["state"] == "done", record
    assert step(record, "drain")["outcome"] == "drained"
    assert step(record, "drain")["ended"] >= out["done_at"] - 0.05
    assert out["result"][0] == 200 and json.loads(out["result"][2])["backend"] == "a"
    assert rule_of(lb) == proxy(b)
    assert lb.proc.poll() is None


@pytest.mark.slow  # the claim of a killed process goes stale after STALE_AFTER (5 s)
def test_a_management_process_killed_in_the_ready_step_is_resumed_there(
        fresh_lb: Balancer, a: Backend) -> None:
    """Killed while the new backend is not ready yet: the new management process
    checks it again for what is left of ready_timeout, and switches once it is up."""
    lb = fresh_lb
    late = Scripted("503")
    try:
        record = deploy(lb, {"backends": [late.address], "ready_timeout": 30, "warmup": 0})
        wait_for(lambda: late.seen >= 2, what="the new backend probed")
        os.kill(management_pids(lb)[-1], signal.SIGKILL)
        wait_for(lambda: len(management_pids(lb)) == 2, timeout=15,
                 what="the arbiter to start a new management process")
        assert rule_of(lb) == proxy(a)
        late.script = ["ok"]  # the new version is up now
        wait_for(lambda: "resuming at step ready" in lb.output(), timeout=15,
                 what="the new management process to resume the deploy")
        record = finished(lb, record["id"], timeout=20)
    finally:
        late.stop()
    assert record["state"] == "done", record
    assert [s["name"] for s in record["steps"]] == ["ready", "switch", "drain"]
    assert rule_of(lb) == {"action": "proxy", "backends": [late.address]}


# 3. the store going away -------------------------------------------------------------
def test_redis_going_away_during_the_drain_delays_the_deploy_and_it_finishes(
        tmp_path: Path, redis_factory: Any) -> None:
    redis = redis_factory()
    a, b = Backend("a"), Backend("b")
    lb = Balancer(tmp_path, args=["--store", redis.url])
    try:
        assert lb.api("PUT", f"/api/v1/hosts/{HOST}", proxy(a))[0] == 200
        (slow, out), record = draining(lb, b, 3, 30)
        redis.stop()
        status, answer = post_deploy(lb, {"backends": [a.address]})
        assert status == 503 and answer["error"] == "store_unavailable", answer
        assert json.loads(request(lb.port)[2])["backend"] == "b"  # the data plane serves on
        wait_for(lambda: "cannot read the in-flight counts" in lb.output(),
                 what="the deploy to meet the outage")
        redis.start()
        record = finished(lb, record["id"], timeout=20)
        slow.join(10)
    finally:
        lb.stop()
        a.stop()
        b.stop()
    assert record["state"] == "done", record
    assert step(record, "drain")["outcome"] == "drained"
    assert out["result"][0] == 200


def test_a_routes_file_damaged_during_the_drain_is_waited_out(lb: Balancer, a: Backend) -> None:
    """The routes file made invalid JSON (a hand edit half saved) while the drain
    waits, and repaired: the deploy waits for it as for an outage and ends with
    its rule clean. Bug: the damaged read went up as "internal error", a traceback
    in the log, the old backend left under `draining`."""
    mark = len(lb.output())
    b = Backend("b")
    try:
        (slow, _), record = draining(lb, b, 3, 20)
        good = lb.routes.read_bytes()
        lb.routes.write_bytes(good[:len(good) // 2])
        wait_for(lambda: "cannot read the rule" in lb.output()[mark:],
                 what="the drain's end to meet it")
        replace_file(lb.routes, good)
        record = finished(lb, record["id"])
        slow.join(10)
    finally:
        b.stop()
    assert record["state"] == "done" and step(record, "drain")["outcome"] == "drained", record
    assert rule_of(lb) == proxy(b)
    assert "Traceback" not in lb.output()[mark:]


def test_the_in_flight_report_of_a_balancer_gone_for_good_is_forgotten(
        tmp_path: Path, a: Backend) -> None:
    """A management process killed outright (SIGKILL, the OOM killer) never
    withdraws its in-flight report. Bug: each such report stayed in the store for
    good; now the reports not renewed for a minute are dropped once no deploy runs."""
    records = tmp_path / "routes.json.deploys.json"
    gone = {"at": time.time() - 3600, "version": 1, "hosts": {}}
    records.write_text(json.dumps({"deploys": {}, "claims": {},
                                   "inflight": {"web9:4242:0d324a": gone}}))
    lb = Balancer(tmp_path, {HOST: proxy(a)})
    b = Backend("b")
    try:
        record = deploy(lb, {"backends": [b.address], "warmup": 0, "drain_timeout": 1})
        assert finished(lb, record["id"])["state"] == "done"
        wait_for(lambda: json.loads(records.read_text())["inflight"] == {},
                 what="the reports withdrawn")
    finally:
        b.stop()
        lb.stop()


# 4. malformed bodies and the host changing under the deploy -----------------------------
def post_raw(lb: Balancer, what: str, data: bytes) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", lb.mport, timeout=10)
    conn.request("POST", f"/api/v1/hosts/{HOST}/{what}", body=data,
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    answer = json.loads(response.read())
    conn.close()
    return response.status, answer


def test_malformed_deploy_bodies_are_refused_with_the_reason_and_start_nothing(
        lb: Balancer, a: Backend) -> None:
    good = json.dumps(a.address)
    deploys = lb.api("GET", "/api/v1/deploys")[1]["deploys"]  # (earlier tests' on `lb`)
    cases = [
        (b'{"backends": [%s], "ready_timeout": NaN}', "invalid_json", "NaN is not a number"),
        (b'{"backends": [%s], "warmup": 1e309}', "invalid_json", "too large"),
        (b'{"backends": [%s], "warmup": 1' + b"0" * 5000 + b"}", "invalid_json",
         "an integer of 5001 digits is too large"),
        (b'{"backends": [%s], "drain_timeout": -5}', "invalid_deploy", "drain_timeout"),
        (b'{"backends": [%s], "ready_timeout": 0}', "invalid_deploy", "ready_timeout"),
        (b'{"backends": [%s], "warmup": 86401}', "invalid_deploy", "at most 86400"),
        (b'{"backends": [%s], "warmup": true}', "invalid_deploy", "warmup"),
        (b'{"backends": [%s], "warmup": "10"}', "invalid_deploy", "warmup"),
        (b'{"backends": [%s], "ready_timeout": null}', "invalid_deploy", "ready_timeout"),
        (b'{"backends": [%s], "health": {}}', "invalid_deploy", "health: unknown field"),
        (b'{"backends": [%s], "backends": []}', "invalid_json", "twice"),
        (b'{"backends": %s}', "invalid_deploy", "backends"),
        (b'{"backends": [{"address": %s, "weight": 1e400}]}', "invalid_json", "too large"),
        (b'{"backends": [{"address": %s, "weight": 0}]}', "invalid_deploy", "weight"),
        (b'{"backends": [%s, %s]}', "invalid_deploy", "duplicate"),
        (b'[%s]', "invalid_deploy", "body: must be"),
    ]
    for template, error, reason in cases:
        data = template.replace(b"%s", good.encode())
        status, answer = post_raw(lb, "deploy", data)
        assert status == 400 and answer["error"] == error, (data[:80], answer)
        assert reason in answer["message"] + " ".join(answer["details"]), (data[:80], answer)
    status, answer = post_raw(lb, "rollback", b'{"backends": [], "warmup": -1}')
    assert status == 400 and len(answer["details"]) == 2, answer
    assert lb.api("GET", "/api/v1/deploys")[1]["deploys"] == deploys
    assert rule_of(lb) == proxy(a) and lb.proc.poll() is None


def test_a_host_deleted_during_the_ready_step_is_not_brought_back(lb: Balancer) -> None:
    late = Scripted("503", "503", "ok")
    try:
        record = deploy(lb, {"backends": [late.address], "ready_timeout": 10})
        wait_for(lambda: late.seen >= 1, what="the first probe")
        assert lb.api("DELETE", f"/api/v1/hosts/{HOST}")[0] == 200
        record = finished(lb, record["id"])
    finally:
        late.stop()
    assert record["state"] == "failed" and "changed during the deploy" in record["error"]
    assert lb.api("GET", f"/api/v1/hosts/{HOST}")[0] == 404
    assert lb.api("GET", "/api/v1/hosts")[1]["hosts"] == {}



@pytest.mark.parametrize("loss", ["older routes file", "flushed redis"])
def test_a_store_that_lost_its_table_mid_deploy_fails_it_with_the_reason(
        tmp_path: Path, a: Backend, redis_factory: Any, loss: str) -> None:
    """The routes file put back from an older copy, or Redis flushed, while the new
    backend gets ready: the deploy fails saying the store lost its table (as a
    one-host write through the API is refused), nothing switched. Bugs: the
    switch's refused write went up as "internal error: ...", with a traceback in
    the log; a flushed Redis read as no rule: "the host's rule changed" (by the
    switch too, when it read the flush before the next resync, here in 60 s, found
    it: then the host's GET answered 404 as well)."""
    redis = redis_factory() if loss == "flushed redis" else None
    lb = Balancer(tmp_path, None if redis else {HOST: proxy(a)},
                  args=["--store", redis.url] if redis else [],
                  env={"BALANCER_STORE_RESYNC_INTERVAL": "60" if redis else "0.5"})
    late = Scripted("503")
    try:
        if redis:
            assert lb.api("PUT", f"/api/v1/hosts/{HOST}", proxy(a))[0] == 200
        before = rule_of(lb)
        record = deploy(lb, {"backends": [late.address], "ready_timeout": 20, "warmup": 0})
        wait_for(lambda: late.seen >= 1, what="the first probe")
        if redis:
            redis.client().flushall()
        else:
            lb.write_routes({HOST: before}, version=0)  # a backup of before the first write
            wait_for(lb.store_problem, what="the store's loss reported")
        late.script = ["ok"]
        record = finished(lb, record["id"])  # (a flushed record reads 404 until saved again)
        assert rule_of(lb) == before
        assert "lost its table" in lb.store_problem()
        assert json.loads(request(lb.port)[2])["backend"] == "a"
    finally:
        late.stop()
        lb.stop()
    assert_failed_for_the_loss(record)
    assert "Traceback" not in lb.output()


def assert_failed_for_the_loss(record: dict[str, Any]) -> None:
    """`record` failed naming the store's loss of its table, nothing switched."""
    assert record["state"] == "failed", record
    assert "the store lost its table" in record["error"], record["error"]
    assert record["error"].endswith("; nothing was switched"), record["error"]


def test_a_deploy_resumed_just_after_a_flush_names_the_loss_not_a_rule_change(
        redis_factory: Any) -> None:
    """A management process resumes a deploy in its ready step, and its first look
    at the rule comes just after Redis was flushed, before its copy of the table
    judged the store: the rule is gone at a version below the one the deploy
    started from, which is a loss, not an operator's change; once judged, the
    deploy fails naming the loss. Bug: the ready step's version floor started at
    0, and the deploy failed at once "the host's rule changed"."""
    from balancer.stores import open_store
    from management.app import create_app

    redis = redis_factory()
    store = open_store(redis.url, f"resume-{time.time_ns()}")
    app = create_app(store=store)
    late = Scripted("503")
    try:
        for port in (9001, 9002, 9001):  # the table at version 3
            store.put_host(HOST, {"action": "proxy", "backends": [f"127.0.0.1:{port}"]})
        app.mirror.on_table(store.load())  # this process's copy of the table served
        record = app.deployer.new_record("d1", HOST, store.host_rule(HOST), [late.address],
                                         {"ready_timeout": 20.0, "drain_timeout": 5.0,
                                          "warmup": 0.0}, "deploy")
        assert record["from_version"] == 3
        redis.client().flushall()
        run, _ = in_background(lambda: app.deployer.run(record, resumed=True))
        wait_for(lambda: late.seen >= 2, what="its first looks, and the backend probed")
        app.mirror.on_table(store.load())  # the copy judges the flushed store
        late.script = ["ok"]
        run.join(20)
        stored = store.records().deploy("d1")
    finally:
        late.stop()
        store.close()
    assert_failed_for_the_loss(stored)


def test_balancerctl_that_stops_waiting_says_the_deploy_still_runs(
        lb: Balancer, a: Backend, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`balancerctl deploy` waits the deploy's timeouts plus a margin (60 s; 0 here),
    then stops: the deploy may run on (a store outage waited out, or the drain
    that starts 1.5 s in). Bug: it said "failed at step drain: None"."""
    from management import ctl, ctl_deploy

    monkeypatch.setattr(ctl_deploy, "WAIT_MARGIN", 0.0)
    b = Backend("b")
    try:
        slow, _ = in_background(lambda: request(lb.port, path="/slow?s=3"))
        wait_for(lambda: lb.host_stats(HOST).get("open_requests"), what="the slow request")
        code = ctl.main(["--url", f"http://127.0.0.1:{lb.mport}", "deploy", HOST,
                         "--backend", b.address, "--warmup", "0", "--ready-timeout", "0.5",
                         "--drain-timeout", "0.5"])
        err = capsys.readouterr().err
        assert code == 1 and " still running at step " in err, err
        assert "balancerctl deploys" in err and "None" not in err, err
        deploy_id = err.split("deploy ", 1)[1].split()[0]
        assert finished(lb, deploy_id)["state"] == "done"
        slow.join(10)
    finally:
        b.stop()


# 5. the drain against long requests and other operators ------------------------------------
def test_a_request_longer_than_the_drain_timeout_is_listed_and_finishes_untouched(
        lb: Balancer, a: Backend) -> None:
    b = Backend("b")
    try:
        slow, out = in_background(lambda: request(lb.port, path="/slow?s=4"))
        wait_for(lambda: lb.host_stats(HOST).get("open_requests"), what="the slow request")
        record = finished(lb, deploy(lb, {"backends": [b.address], "warmup": 0,
                                          "drain_timeout": 0.5})["id"])
        assert record["state"] == "done", record
        assert step(record, "drain")["outcome"] == "timeout"
        assert f"{a.address}: 1 in flight (0 WebSocket tunnels)" in record["warning"]
        assert "done_at" not in out  # still running at the deploy's end
        slow.join(10)
    finally:
        b.stop()
    assert out["result"][0] == 200 and json.loads(out["result"][2])["backend"] == "a"
    assert rule_of(lb) == proxy(b)  # `draining` removed: the old backend gets nothing



@pytest.mark.slow
def test_a_worker_that_does_not_answer_keeps_the_drain_waiting(tmp_path: Path,
                                                                a: Backend) -> None:
    """Two workers; the one with a request in flight on the old backend stops
    answering (SIGSTOP: a starved or stuck process). Bug: the management API left
    it out of the merged counts, so the drain found 0 in flight and the deploy was
    done ("drained") 2 s later, while that request ran on (and that worker had not
    even served the switch): stopping the old backend then would have failed it."""
    b = Backend("b")
    lb = Balancer(tmp_path, {HOST: proxy(a)}, args=["--workers", "2"])
    try:
        begun = time.time()  # the slow request's answer cannot end before begun + 5
        slow, out = in_background(lambda: request(lb.port, path="/slow?s=5", timeout=20))
        requests = wait_for(lambda: lb.api("GET", "/api/v1/inflight")[1]["requests"],
                            what="the slow request")
        pid = requests[0]["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            record = deploy(lb, {"backends": [b.address], "warmup": 0, "drain_timeout": 20})
            stopped = time.monotonic()
            wait_for(lambda: "answer" in json.dumps(lb.api("GET", "/api/v1/info")[1].get(
                "lagging", [])), what="the worker found not answering")
            while time.monotonic() < stopped + 3.0:  # the bug ended it within 2.5 s
                record = lb.api("GET", f"/api/v1/deploys/{record['id']}")[1]["deploy"]
                assert record["state"] == "running", record
                time.sleep(0.1)
        finally:
            os.kill(pid, signal.SIGCONT)
        record = finished(lb, record["id"])
        slow.join(10)
    finally:
        lb.stop()
        b.stop()
    assert out["result"][0] == 200 and json.loads(out["result"][2])["backend"] == "a"
    assert record["state"] == "done" and step(record, "drain")["outcome"] == "drained", record
    assert record["ended"] >= begun + 5, (record["ended"], begun)

def test_a_rule_replaced_by_another_operator_during_the_drain_is_kept(
        lb: Balancer, a: Backend) -> None:
    b, c = Backend("b"), Backend("c")
    try:
        (slow, _), record = draining(lb, b, 2, 20)
        operator = {**proxy(c), "retries": 1}
        assert lb.api("PUT", f"/api/v1/hosts/{HOST}", operator)[0] == 200
        record = finished(lb, record["id"])
        slow.join(10)
        assert rule_of(lb) == operator  # the end of the drain wrote nothing over it
        assert json.loads(request(lb.port)[2])["backend"] == "c"
    finally:
        b.stop()
        c.stop()
    assert record["state"] == "done", record



@pytest.mark.slow
def test_a_long_deploy_keeps_its_record_while_others_come_and_go(
        tmp_path: Path, a: Backend) -> None:
    """The records keep the 50 most recent deploys (5 here). Bug: "recent" was by
    start, so a deploy still running when 50 others had started since (a long
    drain while other hosts were deployed) lost its record at each of its saves:
    its progress read 404, its end was never kept (no rollback), a crash could
    not be resumed. Now a running deploy's record stays, and recency is by end."""
    others = [f"h{i}.test" for i in range(KEPT)]
    lb = Balancer(tmp_path, {HOST: proxy(a), **{host: proxy(a) for host in others}},
                  prefix=constants_prefix({"balancer.stores.records.MAX_DEPLOYS": KEPT}))
    late, b = Scripted("503"), Backend("b")
    try:
        long = deploy(lb, {"backends": [late.address], "ready_timeout": 60, "warmup": 0,
                           "drain_timeout": 1})
        quick = [deploy(lb, {"backends": [b.address], "warmup": 0, "drain_timeout": 1},
                        host=host) for host in others]
        for record in quick:
            assert finished(lb, record["id"])["state"] == "done"
        status, answer = lb.api("GET", f"/api/v1/deploys/{long['id']}")
        assert (status, answer["deploy"]["state"]) == (200, "running"), answer
        late.script = ["ok"]
        assert finished(lb, long["id"])["state"] == "done"
        finished(lb, deploy(lb, {"backends": [a.address], "warmup": 0, "drain_timeout": 1},
                            host=others[0])["id"])  # one more record written
        listed = [r["id"] for r in lb.api("GET", "/api/v1/deploys")[1]["deploys"]]
        assert long["id"] in listed and len(listed) == KEPT, listed
        assert lb.api("POST", f"/api/v1/hosts/{HOST}/rollback", {"warmup": 0})[0] == 202
    finally:
        late.stop()
        b.stop()
        lb.stop()

def test_damaged_deploy_records_are_reported_and_never_let_a_second_deploy_of_the_host_start(
        tmp_path: Path, fresh_lb: Balancer) -> None:
    lb = fresh_lb
    not_ready = Scripted("503")
    try:
        first = deploy(lb, {"backends": [not_ready.address], "ready_timeout": 2})
        records = tmp_path / "routes.json.deploys.json"
        assert records.is_file()
        for _ in range(5):  # (the first deploy's next beat, within 1 s, writes its claim back)
            records.write_text("{damaged")  # a hand edit, a full disk, a bad restore
            status, answer = post_deploy(lb, {"backends": [not_ready.address]})
            assert status == 409 and first["id"] in answer["message"], answer
        record = finished(lb, first["id"])
    finally:
        not_ready.stop()
    assert record["state"] == "failed" and "nothing was switched" in record["error"]
    assert "cannot be read" in lb.output() and "starting them over" in lb.output()
    assert [d["id"] for d in lb.api("GET", "/api/v1/deploys")[1]["deploys"]] == [first["id"]]
