"""Aborting a deploy (docs/deploys.md "Aborting a deploy"): real balancers, real
backends, real Redis. Before the switch an abort changes nothing; after it the
host goes back to its previous backends and the new ones are drained. Hostile
cases: an abort twice, racing the switch, of a finished deploy, while the store
is down, sent to another balancer than the one running the deploy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from management import ctl
from tests import test_dashboard
from tests.support import (
    Backend,
    Balancer,
    calls,
    constants_prefix,
    in_threads,
    request,
    wait_for,
)
from tests.test_deploys import HOST, Load, deploy, finished, in_background, proxy, step
from tests.test_probe_deploy import Scripted, rule_of

# the dashboard tests' headless Chromium (module-scoped) and a fresh window per test
chromium, browser = test_dashboard.chromium, test_dashboard.browser


@pytest.fixture
def lb(shared_lb: Balancer) -> Balancer:
    """One balancer for the module (`tests.deploy_fixtures.shared_lb`): no test
    here needs a fresh process (each looks its own deploy up by id)."""
    return shared_lb


def abort(lb: Balancer, host: str = HOST) -> tuple[int, Any]:
    return lb.api("DELETE", f"/api/v1/hosts/{host}/deploy")


def record_of(lb: Balancer, deploy_id: str) -> dict[str, Any]:
    return lb.api("GET", f"/api/v1/deploys/{deploy_id}")[1]["deploy"]


def started(lb: Balancer, body: dict[str, Any]) -> dict[str, Any] | None:
    """The deploy started, or None while the last one's claim is not released yet
    (its record ends a moment before)."""
    status, answer = lb.api("POST", f"/api/v1/hosts/{HOST}/deploy", body)
    assert status in (202, 409), answer
    return answer["deploy"] if status == 202 else None


def at_step(lb: Balancer, deploy_id: str, name: str) -> None:
    wait_for(lambda: record_of(lb, deploy_id)["step"] == name, what=f"the step {name}")


def test_an_abort_in_the_ready_step_changes_nothing_and_frees_the_host_at_once(
        lb: Balancer, a: Backend, b: Backend) -> None:
    never = Scripted("503")
    try:
        record = deploy(lb, {"backends": [never.address], "ready_timeout": 60})
        wait_for(lambda: never.seen >= 2, what="the new backend probed")
        version = lb.version()
        began = time.monotonic()
        status, answer = abort(lb)
        took = time.monotonic() - began
    finally:
        never.stop()
    assert status == 200, answer
    record = answer["deploy"]
    assert record["state"] == "aborted" and record["step"] == "ready", record
    assert record["error"] is None and record["abort"]["since"] is None
    assert {k: v for k, v in record["abort"].items() if k not in ("requested", "by")} == {
        "since": None, "version": None, "problem": None, "code": None}  # (docs/deploys.md)
    assert [s["name"] for s in record["steps"]] == ["ready"]
    assert step(record, "ready")["outcome"] == "aborted"
    assert took < 3  # its next round, not the 60 s ready_timeout
    assert lb.version() == version and rule_of(lb) == proxy(a)
    again = deploy(lb, {"backends": [b.address], "warmup": 0})  # the host is free at once
    assert finished(lb, again["id"])["state"] == "done"
    status, answer = abort(lb)  # nothing runs any more
    assert status == 409 and answer["error"] == "nothing_to_abort", answer
    assert set(answer) == {"error", "message", "details"}
    status, answer = abort(lb, "nobody.test")
    assert status == 404 and answer["error"] == "not_found", answer


def test_an_abort_in_the_warmup_goes_back_and_waits_for_the_new_backends_requests(
        lb: Balancer, a: Backend, b: Backend) -> None:
    """Under load: traffic goes back to A at once, a request in flight on B
    finishes there, the abort waits for it, and no request fails."""
    with Load(lb.port) as load:
        record = deploy(lb, {"backends": [b.address], "warmup": 30, "drain_timeout": 20})
        at_step(lb, record["id"], "warmup")
        slow: list[Any] = []

        def b_busy() -> bool:  # a slow request sent until one lands on B
            slow.append(in_background(lambda: request(lb.port, path="/slow?s=2")))
            return any(path.startswith("/slow") for _, path, _ in list(b.requests))
        wait_for(b_busy, timeout=20, interval=0.2, what="a slow request on B")
        status, answer = abort(lb)
        record = answer["deploy"]
        switched_back = len(load.backends)
        wait_for(lambda: len(load.backends) > switched_back + 50, what="requests after it")
        after = load.backends[switched_back + 10:]
    for thread, _ in slow:
        thread.join(10)
    outs = [out for _, out in slow]
    assert load.failures == []
    assert status == 200 and record["state"] == "aborted", record
    assert record["step"] == "warmup" and step(record, "warmup")["outcome"] == "aborted"
    done = step(record, "abort")
    assert done["outcome"] == "drained", done
    assert done["detail"] == f"back to {a.address}; {b.address}: no request in flight"
    on_b = [o for o in outs if json.loads(o["result"][2])["backend"] == "b"]
    assert on_b and all(o["result"][0] == 200 for o in outs)
    assert done["ended"] >= max(o["done_at"] for o in on_b) - 0.05  # it waited for them
    assert set(after) == {"a"}  # B got no new request once the abort answered
    assert rule_of(lb) == proxy(a)  # `draining` removed
    assert record["abort"]["version"] is not None


def test_balancerctl_aborts_a_deploy_in_its_drain_and_the_deploy_command_says_so(
        lb: Balancer, a: Backend, b: Backend, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{lb.mport}"
    slow, out = in_background(lambda: request(lb.port, path="/slow?s=3"))
    wait_for(lambda: lb.host_stats(HOST).get("open_requests"), what="the slow request")
    follower, followed = in_background(lambda: ctl.main(
        ["--url", url, "deploy", HOST, "--backend", b.address, "--warmup", "0",
         "--drain-timeout", "30"]))
    wait_for(lambda: any(r["step"] == "drain" and r["state"] == "running" for r in
                         lb.api("GET", "/api/v1/deploys")[1]["deploys"]), what="the drain")
    assert ctl.main(["--url", url, "deploy", HOST, "--abort"]) == 0
    follower.join(15)
    slow.join(10)
    printed = capsys.readouterr()
    assert "aborted at step drain" in printed.out and f"back to {a.address}" in printed.out
    assert followed["result"] == 1  # the deploy it followed did not end done
    assert "aborted at step drain (asked by " in printed.err, printed.err
    assert out["result"][0] == 200 and json.loads(out["result"][2])["backend"] == "a"
    assert rule_of(lb) == proxy(a)
    assert ctl.main(["--url", url, "deploy", HOST, "--abort"]) == 1
    assert "nothing_to_abort" in capsys.readouterr().err
    assert ctl.main(["--url", url, "deploy", HOST, "--abort", "--warmup", "1"]) == 2
    assert "--abort takes no timings (--warmup)" in capsys.readouterr().err


def test_two_aborts_at_once_stop_the_deploy_once(lb: Balancer, a: Backend) -> None:
    never = Scripted("503")
    try:
        record = deploy(lb, {"backends": [never.address], "ready_timeout": 60})
        answers = [f.result() for f in in_threads(2, lambda: abort(lb))]
    finally:
        never.stop()
    assert [status for status, _ in answers] == [200, 200], answers
    assert {answer["deploy"]["id"] for _, answer in answers} == {record["id"]}
    stored = record_of(lb, record["id"])
    assert stored["state"] == "aborted" and len(stored["steps"]) == 1
    assert rule_of(lb) == proxy(a)


def test_an_abort_racing_the_switch_always_leaves_the_previous_backends_serving(
        lb: Balancer, a: Backend, b: Backend) -> None:
    """Aborts sent from 0 to 40 ms after the deploy's start (its new backend is
    ready at once: the switch comes within milliseconds). Whenever the abort is
    answered it stopped the deploy, and A serves alone; no request fails."""
    outcomes = []
    body = {"backends": [b.address], "warmup": 0.5, "drain_timeout": 10}
    with Load(lb.port) as load:
        for n in range(8):
            record = wait_for(lambda: started(lb, body), what="the host free")
            time.sleep(n * 0.005)  # the race's offset, not a synchronisation
            status, answer = abort(lb)
            record = finished(lb, record["id"])
            outcomes.append((status, record["state"], record["step"]))
            if status == 200:
                assert record["state"] == "aborted", record
                assert rule_of(lb) == proxy(a), record
            else:  # it ended before the abort reached it
                assert status == 409 and answer["error"] == "nothing_to_abort", answer
                assert record["state"] == "done", record
                assert lb.api("PUT", f"/api/v1/hosts/{HOST}", proxy(a))[0] == 200
    assert load.failures == []
    assert any(status == 200 for status, _, _ in outcomes), outcomes
    assert rule_of(lb) == proxy(a)


def test_an_abort_sent_to_another_balancer_stops_the_deploy_and_a_store_outage_is_503(
        tmp_path: Path, redis_factory: Any, a: Backend) -> None:
    redis = redis_factory()
    never = Scripted("503")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = Balancer(tmp_path / "one", args=["--store", redis.url])
    second = Balancer(tmp_path / "two", args=["--store", redis.url])
    try:
        assert first.api("PUT", f"/api/v1/hosts/{HOST}", proxy(a))[0] == 200
        record = deploy(first, {"backends": [never.address], "ready_timeout": 60})
        wait_for(lambda: never.seen >= 1, what="the new backend probed")
        redis.stop()
        status, answer = abort(second)
        assert status == 503 and answer["error"] == "store_unavailable", answer
        redis.start()
        wait_for(lambda: abort(second)[0] != 503, what="the store back")
        stored = finished(second, record["id"])
        second_owner = second.api("GET", "/api/v1/deploys")[1]["deploys"][0]["abort"]["by"]
    finally:
        never.stop()
        first.stop()
        second.stop()
    assert stored["state"] == "aborted" and stored["step"] == "ready", stored
    assert stored["owner"] != second_owner  # run by the first, aborted through the second
    assert f"{stored['id']} of {HOST} aborted" in first.output()


def aborted_in_drain(before: dict[str, Any], since: float, asked: float,
                     from_version: int) -> dict[str, Any]:
    """The record of a deploy of HOST from `before` to 127.0.0.1:9002, switched at
    `since` (version `from_version` + 1), aborted in its drain at `asked`, its
    abort not begun."""
    return {"id": "d1", "host": HOST, "kind": "deploy", "from": before["backends"],
            "to": ["127.0.0.1:9002"], "from_version": from_version,
            "settings": {"ready_timeout": 5.0, "drain_timeout": 5.0, "warmup": 0.0},
            "state": "running", "step": "drain", "started": since - 2, "ended": None,
            "error": None, "warning": None, "before": before, "since": since,
            "version": from_version + 1, "owner": "gone",
            "abort": {"requested": asked, "by": "elsewhere", "since": None, "version": None,
                      "problem": None},
            "steps": [{"name": "drain", "started": since, "ended": asked,
                       "outcome": "aborted", "detail": ""}]}


def test_a_deploy_resumed_mid_abort_finishes_the_abort(tmp_path: Path) -> None:
    """The management process stopped after the abort's write: the one resuming
    it recognises the write (its `since`), waits for the new backends, and ends
    it aborted with the rule clean."""
    from balancer.stores import open_store
    from management.app import create_app
    from management.deploy_steps import reverted_rule

    store = open_store(f"file:{tmp_path / 'routes.json'}")
    app = create_app(store=store)
    before = {"action": "proxy", "backends": ["127.0.0.1:9001"]}
    since = time.time() - 2
    store.put_host(HOST, reverted_rule(before, ["127.0.0.1:9002"], since))
    record = aborted_in_drain(before, since - 1, since, 1)
    record["abort"]["since"] = since
    record["steps"].append({"name": "abort", "started": since, "ended": None,
                            "outcome": None, "detail": "back to 127.0.0.1:9001"})
    store.records().begin(record, time.time() - 60, 5.0)  # (its process long quiet)
    app.runtime.reload()  # the (data-plane-less) balancer serves the abort's write
    assert store.records().claim(HOST, "d1", app.deployer.owner, time.time(), 5.0) is None
    app.deployer.start_watching()  # publishes this (data-plane-less) balancer's counts
    try:
        app.deployer.run(record, resumed=True)
    finally:
        app.deployer.stop()
    stored = store.records().deploy("d1")
    assert stored["state"] == "aborted" and stored["step"] == "drain", stored
    assert step(stored, "abort")["outcome"] == "drained"
    assert store.load().hosts[HOST] == before


# the abort's own writes: refused, a lost table, replicas, races, flaps, a kill ----------


def on_redis(tmp_path: Path, redis: Any, a: Backend, name: str = "one", **options: Any
             ) -> Balancer:
    """A balancer on `redis` (its own directory `name`), HOST routed to `a`."""
    (tmp_path / name).mkdir()
    lb = Balancer(tmp_path / name, args=["--store", redis.url], **options)
    if name == "one":
        assert lb.api("PUT", f"/api/v1/hosts/{HOST}", proxy(a))[0] == 200
    return lb


# the abort's answer waits `ABORT_WAIT` (5 s) before it says why the abort is not carried
# out yet: 2 s where that is the answer (its reason is noted within a warmup round, 0.25 s)
ANSWER_SOONER = {"management.deploys_api.ABORT_WAIT": 2.0}


def in_warmup(lb: Balancer, b: Backend) -> dict[str, Any]:
    """A deploy of HOST to `b`, switched and in a long warmup (its record)."""
    record = deploy(lb, {"backends": [b.address], "warmup": 60, "drain_timeout": 20})
    at_step(lb, record["id"], "warmup")
    return record_of(lb, record["id"])


def test_an_abort_whose_write_back_is_refused_answers_503_and_goes_on_once_it_is_taken(
        tmp_path: Path, redis_factory: Any, a: Backend, b: Backend) -> None:
    """Redis refuses the writes of the table (an ACL: the deploy's records stay
    writable), so the abort's write back cannot be made: the answer says so (503),
    the deploy runs on with the reason in its record, and goes back once Redis
    takes writes again. Bug: the deploy ended failed (after 30 s of retries, or at
    once for a refusal that is not an outage) and the abort answered 200 with the
    new backends serving on."""
    redis = redis_factory()
    lb = on_redis(tmp_path, redis, a, prefix=constants_prefix(ANSWER_SOONER))
    try:
        record = in_warmup(lb, b)
        redis.client().execute_command("ACL", "SETUSER", "default", "resetkeys", "%R~*",
                                       "~*deploy*")
        status, answer = abort(lb)
        assert (status, answer["error"]) == (503, "store_unavailable"), answer
        assert answer["message"].startswith(
            f"host '{HOST}': the abort of deploy {record['id']} is asked, but not carried out "
            f"yet: cannot write the rule: "), answer
        assert "tried again (every 1 s at most) until the store takes them" in answer["message"]
        assert answer["details"][0] == f"deploy: {record['id']}"
        running = record_of(lb, record["id"])
        assert running["state"] == "running" and running["abort"]["problem"], running
        redis.client().execute_command("ACL", "SETUSER", "default", "allkeys")
        stored = finished(lb, record["id"])
        status, again = abort(lb)
    finally:
        lb.stop()
    assert stored["state"] == "aborted" and stored["abort"]["problem"] is None, stored
    assert step(stored, "abort")["outcome"] == "drained", stored
    assert (status, again["error"]) == (409, "nothing_to_abort")


def test_an_abort_after_the_store_lost_its_table_names_the_loss_and_goes_on_after_restore(
        tmp_path: Path, redis_factory: Any, a: Backend, b: Backend) -> None:
    """Redis flushed mid-warmup: the abort cannot go back (a one-host write would
    leave a one-host table), and says the store lost its table; `restore` puts the
    served table back (the switched rule), and the abort goes on. Bug: the rule
    missing read as "the host's rule was changed meanwhile: left as it is", the
    deploy ended aborted (200) and the new backends served on."""
    redis = redis_factory()
    lb = on_redis(tmp_path, redis, a, env={"BALANCER_STORE_RESYNC_INTERVAL": "0.5"},
                  prefix=constants_prefix(ANSWER_SOONER))
    try:
        record = in_warmup(lb, b)
        client = redis.client()
        client.flushall()
        wait_for(lambda: client.hget("balancer:deploy-claims", HOST), what="the claim back")
        status, answer = abort(lb)
        assert (status, answer["error"]) == (409, "store_lost"), answer  # (bug: 503)
        assert "cannot go back: " in answer["message"], answer
        assert "the store lost its table" in answer["message"], answer
        assert "changed meanwhile" not in answer["message"]
        assert json.loads(request(lb.port, path="/x")[2])["backend"] in ("a", "b")
        assert lb.api("POST", "/api/v1/restore")[0] == 200
        stored = finished(lb, record["id"])
    finally:
        lb.stop()
    assert stored["state"] == "aborted" and stored["abort"]["problem"] is None, stored
    assert [s["outcome"] for s in stored["steps"] if s["name"] == "abort"] == ["drained"]
    assert stored["abort"]["version"] > record["version"]


def test_an_abort_the_replicas_acknowledge_late_is_answered_by_its_outcome(
        tmp_path: Path, replica_pair: Any, a: Backend) -> None:
    """The replica does not acknowledge the abort request in the store's `wait`
    (600 ms), but the master has it and the deploy carries it out: the answer is
    the abort's outcome, 200 once it ended (its end acknowledged by then), not a
    503 saying nothing happened; while it cannot be acknowledged at all, 503
    store_not_replicated saying the abort is asked and carried out. Bug: 503
    store_not_replicated at once ("read it back before writing again, a retry
    with If-Match is safe"), while the deploy was aborted."""
    master, replica = replica_pair
    never = Scripted("503")
    (tmp_path / "one").mkdir()
    lb = Balancer(tmp_path / "one", args=["--store", f"{master.url}?replicas=1&wait=600"])
    lagging = replica.client()
    try:
        assert lb.api("PUT", f"/api/v1/hosts/{HOST}", proxy(a))[0] == 200
        record = deploy(lb, {"backends": [never.address], "ready_timeout": 60})
        lagging.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
        status, answer = abort(lb)
        assert status == 200, answer
        assert answer["deploy"]["state"] == "aborted", answer
        kept = json.loads(replica.client().hget("balancer:deploys", record["id"]))
        assert kept["state"] == "aborted"  # on the replica: no failover loses it

        second = deploy(lb, {"backends": [never.address], "ready_timeout": 60})
        lagging.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
        try:
            status, answer = abort(lb)
        finally:
            lagging.execute_command("CLIENT", "UNPAUSE")
        assert status == 503 and answer["error"] in ("store_not_replicated",
                                                     "store_unavailable"), answer
        assert f"the abort of deploy {second['id']}" in answer["message"], answer
        assert "is asked" in answer["message"] or "was asked" in answer["message"]
        assert finished(lb, second["id"])["state"] == "aborted"
    finally:
        never.stop()
        lb.stop()
    assert rule_of_store(master) == proxy(a)


def rule_of_store(redis: Any) -> Any:
    return json.loads(redis.client().hget("balancer:hosts", HOST))


def test_two_aborts_on_two_balancers_racing_the_write_back_make_it_once(
        tmp_path: Path, redis_factory: Any, a: Backend, b: Backend) -> None:
    redis = redis_factory()
    first = on_redis(tmp_path, redis, a)
    second = on_redis(tmp_path, redis, a, "two")
    try:
        record = in_warmup(first, b)
        version = first.version()
        lbs = [first, second]
        answers = [f.result() for f in in_threads(2, lambda: abort(lbs.pop()))]
        stored = finished(first, record["id"])
        after = second.version()
    finally:
        first.stop()
        second.stop()
    assert [status for status, _ in answers] == [200, 200], answers
    assert {answer["deploy"]["id"] for _, answer in answers} == {record["id"]}
    assert stored["state"] == "aborted" and stored["abort"]["version"] == version + 1
    assert after == version + 2  # the write back and the removal of `draining`: once each
    assert rule_of_store(redis) == proxy(a)


@pytest.mark.slow(10)
def test_an_abort_while_the_store_flaps_is_carried_out_and_never_answered_untrue(
        tmp_path: Path, redis_factory: Any, a: Backend, b: Backend) -> None:
    """Redis stopped and started again three times while aborts are sent: each
    answer is 200 aborted, 202 running, or 503 store_unavailable; the deploy ends
    aborted, the rule back, and no request fails."""
    redis = redis_factory()
    lb = on_redis(tmp_path, redis, a)
    answers: list[tuple[int, Any]] = []
    try:
        with Load(lb.port) as load:
            record = in_warmup(lb, b)

            def flap() -> None:
                for _ in range(3):
                    redis.stop()
                    time.sleep(0.7)  # (the outage's length, not a synchronisation)
                    redis.start()
                    time.sleep(0.3)
            flapping, _ = in_background(flap)
            while flapping.is_alive() or not answers:
                answers.append(abort(lb))
            flapping.join(30)
            stored = finished(lb, record["id"])
    finally:
        lb.stop()
    assert load.failures == []
    for status, answer in answers:
        if status == 200:
            assert answer["deploy"]["state"] == "aborted", answer
        elif status == 202:
            assert answer["deploy"]["state"] == "running", answer
        else:
            assert (status, answer["error"]) in ((503, "store_unavailable"),
                                                 (409, "nothing_to_abort")), answer
    assert stored["state"] == "aborted", stored
    assert rule_of_store(redis) == proxy(a)


def test_a_management_process_killed_mid_abort_is_replaced_and_finishes_the_abort(
        tmp_path: Path, a: Backend, b: Backend) -> None:
    """Killed while the abort waits for a request in flight on the new backend:
    the new management process recognises the write back (its `since`), waits for
    that request, and ends the deploy aborted with the rule clean. (The claim of
    the killed process goes stale after `STALE_AFTER`, made 1 s.)"""
    lb = Balancer(tmp_path, {HOST: proxy(a)}, prefix=constants_prefix(
        {"management.deploy_claims.STALE_AFTER": 1.0, "management.deploy_claims.BEAT_EVERY": 0.2}))
    try:
        killed_mid_abort(lb, a, b)
    finally:
        lb.stop()


def aborting_in_flight(lb: Balancer, b: Backend, on_a: int, on_b: float
                       ) -> tuple[Any, Any, dict[str, Any]]:
    """A deploy of HOST to `b` draining a request of `on_a` seconds, aborted with a
    request of `on_b` seconds on `b` in flight, its write back made: the two
    requests (each thread and output) and the deploy's record."""
    from tests.test_probe_deploy import draining

    slow_a, record = draining(lb, b, on_a, 30)
    slow_b = in_background(lambda: request(lb.port, path=f"/slow?s={on_b}"))
    wait_for(lambda: any(p.startswith("/slow") for _, p, _ in list(b.requests)),
             what="a slow request on B")
    in_background(lambda: abort(lb))
    wait_for(lambda: (record_of(lb, record["id"])["abort"] or {}).get("since"),
             what="the abort's write back")
    return slow_a, slow_b, record


def killed_mid_abort(lb: Balancer, a: Backend, b: Backend) -> None:
    """The body of the test above, on `lb` (HOST routed to `a`)."""
    import os
    import signal

    from tests.test_probe_deploy import management_pids

    (slow_a, _), (on_b, out), record = aborting_in_flight(lb, b, 3, 3)
    os.kill(management_pids(lb)[-1], signal.SIGKILL)
    wait_for(lambda: "resuming at step drain" in lb.output(), timeout=20,
             what="the new management process to resume the deploy")
    stored = finished(lb, record["id"], timeout=20)
    on_b.join(10)
    slow_a.join(10)
    assert stored["state"] == "aborted", stored
    assert [s["outcome"] for s in stored["steps"] if s["name"] == "abort"] == ["drained"]
    assert step(stored, "abort")["ended"] >= out["done_at"] - 0.05  # it waited for B's
    assert out["result"][0] == 200 and json.loads(out["result"][2])["backend"] == "b"
    assert rule_of(lb) == proxy(a)


@pytest.mark.parametrize("state", ["done", "failed"])
def test_an_abort_arriving_as_the_deploy_ends_is_409_saying_what_stands(
        tmp_path: Path, serve_wsgi: Any, state: str) -> None:
    """The abort is stored while the deploy's claim still holds the host, but its
    record already ended (the drain's last moment: the record ends, then the claim
    is released): nothing is undone, 409 nothing_to_abort, saying what serves and,
    for a deploy done, how to go back (a deploy done said the old backends could
    stop: going back to them unasked could send traffic to stopped servers)."""
    import http.client

    from balancer.stores import open_store
    from management.app import create_app

    store = open_store(f"file:{tmp_path / 'routes.json'}")
    store.put_host(HOST, {"action": "proxy", "backends": ["127.0.0.1:9002"]})
    records = store.records()
    now = time.time()
    error = None if state == "done" else "cannot write the rule: ...; nothing was switched"
    assert records.begin({"id": "d1", "host": HOST, "kind": "deploy", "state": state,
                          "step": "drain", "started": now - 9, "ended": now, "error": error,
                          "abort": None, "steps": [], "from": [], "to": [],
                          "owner": "elsewhere"}, now, 5.0) is None
    url = serve_wsgi(create_app(store=store))

    def released() -> bool:  # the deploy's last act, once the abort is stored
        if records.abort_request("d1") is None:
            return False
        records.release(HOST, "d1")
        return True
    releasing, _ = in_background(lambda: wait_for(released, what="the abort request"))
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
    conn.request("DELETE", f"/api/v1/hosts/{HOST}/deploy")
    response = conn.getresponse()
    answer = json.loads(response.read())
    releasing.join(10)
    assert response.status == 409 and answer["error"] == "nothing_to_abort", answer
    assert answer["message"].startswith(
        f"host '{HOST}': deploy d1 ended {state} before the abort reached it, so the abort "
        f"changed nothing: "), answer
    if state == "done":
        assert "the new backends serve and the old ones were drained" in answer["message"]
        assert f"balancerctl rollback {HOST}" in answer["message"]
    else:
        assert answer["message"].endswith(f": {error}")
    assert answer["details"] == ["deploy: d1"]
    assert store.load().hosts[HOST] == {"action": "proxy", "backends": ["127.0.0.1:9002"]}


# the dashboard's Abort button ---------------------------------------------------------
def management_call(lb: Balancer, method: str, path: str, headers: dict[str, str]
                    ) -> tuple[int, str, dict[str, str]]:
    """(status, body, headers) of one request to `lb`'s management address."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", lb.mport, timeout=15)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode(), dict(response.getheaders())
    finally:
        conn.close()


def test_the_dashboards_abort_button_and_the_write_it_makes(lb: Balancer, a: Backend) -> None:
    """The page ships the button and the write; the write, as a browser on the page
    sends it (its origin, JSON), aborts the deploy; the same write from a page on
    another origin, or as a form or no-cors fetch can send it, is refused and
    stops nothing."""
    never = Scripted("503")
    origin = f"http://127.0.0.1:{lb.mport}"
    as_the_page = {"Host": f"127.0.0.1:{lb.mport}", "Origin": origin, "Accept":
                   "application/json", "Content-Type": "application/json",
                   "Sec-Fetch-Site": "same-origin"}
    try:
        status, page, headers = management_call(lb, "GET", "/", {})
        assert status == 200 and 'id="action-note"' in page
        assert "form-action 'none'" in headers["Content-Security-Policy"]
        script = management_call(lb, "GET", "/static/deploys.js", {})[1]
        assert '"data-deploy": record.id, disabled: aborting' in script
        script = management_call(lb, "GET", "/static/dashboard.js", {})[1]
        assert ('write("DELETE", `api/v1/deploys/${encodeURIComponent(button.dataset.deploy)}`)'
                in script)
        assert '"Content-Type": "application/json"' in script
        record = deploy(lb, {"backends": [never.address], "ready_timeout": 60})
        path = f"/api/v1/deploys/{record['id']}"
        for refused, code in (({"Origin": "http://evil.example"}, "cross_origin"),
                              ({"Sec-Fetch-Site": "cross-site"}, "cross_origin"),
                              ({"Content-Type": "text/plain"}, "unsupported_media_type")):
            status, body, _ = management_call(lb, "DELETE", path, {**as_the_page, **refused})
            assert (status, json.loads(body)["error"]) in ((403, code), (415, code)), body
        assert record_of(lb, record["id"])["state"] == "running"
        assert record_of(lb, record["id"])["abort"] is None
        status, body, _ = management_call(lb, "DELETE", path, as_the_page)
    finally:
        never.stop()
    assert status == 200, body
    assert json.loads(body)["deploy"]["state"] == "aborted"
    assert rule_of(lb) == proxy(a)


def test_the_abort_button_in_chromium_aborts_the_running_deploy(
        lb: Balancer, a: Backend, browser: Any) -> None:
    never = Scripted("503")
    try:
        record = deploy(lb, {"backends": [never.address], "ready_timeout": 60})
        browser.get(f"http://127.0.0.1:{lb.mport}/")
        note, logs = abort_by_click(browser)
        stored = record_of(lb, record["id"])
    finally:
        never.stop()
    assert note == f"Deploy of {HOST} aborted: nothing was switched", note
    assert stored["state"] == "aborted" and stored["abort"]["by"], stored
    assert rule_of(lb) == proxy(a)
    assert logs == []


def test_the_abort_button_sends_the_token_the_page_was_given(
        tmp_path: Path, a: Backend, browser: Any) -> None:
    """With `management.token` set, the page asks for the token, and its Abort
    sends it: the deploy is aborted (a DELETE without it is 401 and stops nothing)."""
    from tests.test_dashboard import severe_logs
    from tests.test_dashboard import wait_for as wait_in

    token = "abort-token-7"
    bearer = {"Authorization": f"Bearer {token}"}
    never = Scripted("503")
    lb = Balancer(tmp_path, {HOST: proxy(a)}, env={"BALANCER_MANAGEMENT_TOKEN": token})
    try:
        status, answer = lb.api("POST", f"/api/v1/hosts/{HOST}/deploy",
                                {"backends": [never.address], "ready_timeout": 60}, bearer)
        assert status == 202, answer
        assert abort(lb)[0] == 401
        browser.get(f"http://127.0.0.1:{lb.mport}/")
        wait_in(browser, lambda d: d.find_element("id", "token").is_displayed(),
                "the token form")
        browser.find_element("id", "token-input").send_keys(token)
        browser.find_element("css selector", "#token-form button[type=submit]").click()
        wait_in(browser, lambda d: not d.find_element("id", "token").is_displayed(),
                "the token taken")
        severe_logs(browser)  # (read and dropped: the page's 401s before it had the token)
        note, logs = abort_by_click(browser)
        stored = lb.api("GET", f"/api/v1/deploys/{answer['deploy']['id']}", None, bearer)[1]
    finally:
        never.stop()
        lb.stop()
    assert note == f"Deploy of {HOST} aborted: nothing was switched", note
    assert stored["deploy"]["state"] == "aborted", stored
    assert logs == []


def abort_by_click(browser: Any) -> tuple[str, list[Any]]:
    """Click the Abort button of HOST's running deploy on the page `browser` shows,
    confirm, and wait for the button to go: the note the page showed, and the
    page's severe console messages."""
    from tests.test_dashboard import host_card, severe_logs, text_of
    from tests.test_dashboard import wait_for as wait_in

    button = host_card(HOST) + " button.deploy-abort"
    wait_in(browser, lambda d: d.find_elements("css selector", button), "the Abort button")
    assert text_of(browser, button) == "Abort"
    browser.find_element("css selector", button).click()
    alert = wait_in(browser, lambda d: d.switch_to.alert, "the confirmation")
    assert f"Abort the deploy of {HOST}?" in alert.text
    alert.accept()
    note = wait_in(browser, lambda d: text_of(d, "#action-note"), "the abort's answer")
    wait_in(browser, lambda d: not d.find_elements("css selector", button),
            "the button gone with the deploy")
    return note, severe_logs(browser)


@pytest.mark.slow(8)
def test_an_abort_refused_past_its_patience_fails_the_deploy_saying_the_switch_stands(
        tmp_path: Path, redis_factory: Any, a: Backend, b: Backend) -> None:
    """The abort's write back refused until `ABORT_PATIENCE` (made 1 s) runs out:
    the deploy ends failed, saying the switch stands, the new backends serving."""
    redis = redis_factory()
    prefix = constants_prefix({"management.deploy_abort.ABORT_PATIENCE": 1.0,
                               "management.deploy_claims.STORE_PATIENCE": 0.5})
    lb = on_redis(tmp_path, redis, a, prefix=prefix)
    try:
        record = in_warmup(lb, b)
        redis.client().execute_command("ACL", "SETUSER", "default", "resetkeys", "%R~*",
                                       "~*deploy*")
        status, answer = abort(lb)
        stored = finished(lb, record["id"])
        after = abort(lb)
    finally:
        redis.client().execute_command("ACL", "SETUSER", "default", "allkeys")
        lb.stop()
    assert stored["state"] == "failed", stored
    assert stored["error"].startswith("the abort gave up after 1s: cannot write the rule: "), stored
    assert "; the switch stands" in stored["error"], stored
    assert step(stored, "abort")["outcome"] == "failed", stored
    assert (status, answer["error"]) == (503, "store_unavailable"), answer
    assert "the abort gave up after 1s" in answer["message"], answer
    assert (after[0], after[1]["error"]) == (409, "nothing_to_abort"), after


@pytest.mark.slow(7)
def test_an_abort_that_went_back_while_its_record_cannot_be_saved_ends_aborted(
        tmp_path: Path, redis_factory: Any, a: Backend, b: Backend) -> None:
    """The write back is made, then the deploy's record cannot be saved for longer
    than `STORE_PATIENCE` (made 0.5 s): the abort keeps trying, and ends aborted once
    the record is taken. Bug: the save that cleared ``abort.problem`` was outside the
    retried call, so its failure ended the deploy failed (its end unrecorded: the
    record stayed running, the problem stale) after the rule had gone back."""
    redis = redis_factory()
    flag, saves = tmp_path / "saves-fail", tmp_path / "saves"
    saving = ["balancer.stores.redis_records:RedisRecords.save_claimed"]
    prefix = constants_prefix({"management.deploy_claims.STORE_PATIENCE": 0.5, **ANSWER_SOONER},
                              fail=(saving, flag), count=(saving, saves))
    prefix.insert(1, "FAIL_RAISES=balancer.stores.base:StoreUnavailable")
    lb = on_redis(tmp_path, redis, a, prefix=prefix)
    try:
        record = in_warmup(lb, b)
        redis.client().execute_command("ACL", "SETUSER", "default", "resetkeys", "%R~*",
                                       "~*deploy*")
        assert abort(lb)[0] == 503
        flag.touch()
        redis.client().execute_command("ACL", "SETUSER", "default", "allkeys")
        wait_for(lambda: rule_of_store(redis)["backends"] == [a.address], what="the rule back")
        before = sum(calls(saves).values())
        wait_for(lambda: sum(calls(saves).values()) >= before + 8
                 or "could not be recorded" in lb.output(), timeout=15, what="saves refused")
        flag.unlink()
        stored = finished(lb, record["id"], timeout=10)
    finally:
        redis.client().execute_command("ACL", "SETUSER", "default", "allkeys")
        lb.stop()
    assert stored["state"] == "aborted", stored
    assert stored["abort"]["problem"] is None, stored
