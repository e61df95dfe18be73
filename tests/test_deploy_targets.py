"""Which deploy an abort or a look stops or shows (docs/deploys.md "Aborting a
deploy", docs/api.md): real balancers on a routes file and on Redis, real
backends; the deploy records of other deploys scripted into the store. An abort
names one deploy (by id, or the one running when it arrived) and never stops a
later one; a deploy that ended is known as ended after 50 newer records pushed
its record out; an abort request Redis lost before the deploy saw it is asked
again while the answer waits.
"""

from __future__ import annotations

import http.client
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from balancer.stores import Store, open_store
from balancer.stores.records import MAX_DEPLOYS
from tests.support import Backend, Balancer, wait_for
from tests.test_deploys import HOST, deploy, proxy
from tests.test_probe_deploy import Scripted, rule_of


@pytest.fixture(params=["file", "redis"])
def lb(request: pytest.FixtureRequest, tmp_path: Path, a: Backend) -> Iterator[Balancer]:
    """A balancer routing HOST to `a`, on a routes file or on the session's Redis
    (a namespace of its own)."""
    if request.param == "file":
        balancer = Balancer(tmp_path, {HOST: proxy(a)})
        STORES[balancer.mport] = (f"file:{balancer.routes}", "balancer")
    else:
        url, namespace = request.getfixturevalue("redis_server").url, f"t{uuid.uuid4().hex}"
        balancer = Balancer(tmp_path, args=["--store", url],
                            env={"BALANCER_STORE_NAMESPACE": namespace})
        STORES[balancer.mport] = (url, namespace)
        assert balancer.api("PUT", f"/api/v1/hosts/{HOST}", proxy(a))[0] == 200
    yield balancer
    balancer.stop()
    STORES.pop(balancer.mport)


STORES: dict[int, tuple[str, str]] = {}  # a balancer's management port -> its store


def store_of(lb: Balancer) -> Store:
    """The balancer's store, opened by the test (its deploy records scripted)."""
    return open_store(*STORES[lb.mport])


def ended(deploy_id: str, at: float, host: str = HOST) -> dict[str, Any]:
    return {"id": deploy_id, "host": host, "kind": "deploy", "state": "done", "step": "drain",
            "started": at - 5, "ended": at, "error": None, "abort": None, "steps": [],
            "from": [], "to": [], "owner": "elsewhere"}


def push_out(store: Store, since: float) -> None:
    """Record `MAX_DEPLOYS` deploys of other hosts ended after `since`: every record
    that ended before is pushed out."""
    records = store.records()
    for n in range(MAX_DEPLOYS):
        records.withdraw(ended(f"other-{n}", since + 1 + n, f"h{n}.test"))
    last = {**ended("last", since + 100, "h0.test"), "owner": "o"}
    assert records.begin(last, time.time(), 5.0) is None  # (Redis trims at a begin)
    records.release("h0.test", "last")


def test_an_abort_of_an_ended_deploy_never_stops_the_next_one(lb: Balancer) -> None:
    """Deploy d1 ended; d2 of the host runs. An abort naming d1 (the dashboard's,
    sent as d1 was shown running) is 409 nothing_to_abort saying how d1 ended, and
    d2 runs on, not asked to stop, also once d1's record was pushed out by 50
    newer ones (its look then 410 deploy_gone). Bug: the abort named the host only,
    and stopped d2, its answer naming d2."""
    never = Scripted("503")
    store = store_of(lb)
    try:
        d1 = ended("d1", time.time() - 60)
        store.records().withdraw(d1)
        d2 = deploy(lb, {"backends": [never.address], "ready_timeout": 60})
        status, answer = lb.api("DELETE", "/api/v1/deploys/d1")
        assert (status, answer["error"]) == (409, "nothing_to_abort"), answer
        assert answer["message"].startswith(f"host '{HOST}': deploy d1 ended done before "
                                            f"the abort reached it"), answer
        assert answer["details"] == ["deploy: d1"]
        push_out(store, d1["ended"])
        status, answer = lb.api("GET", "/api/v1/deploys/d1")
        assert (status, answer["error"]) == (410, "deploy_gone"), answer
        assert answer["message"].startswith(f"deploy d1 of '{HOST}' ended done at "), answer
        status, answer = lb.api("DELETE", "/api/v1/deploys/d1")
        assert (status, answer["error"]) == (409, "nothing_to_abort"), answer
        assert "(its record is no longer kept)" in answer["message"], answer
        status, answer = lb.api("DELETE", "/api/v1/deploys/never-was")
        assert (status, answer["error"]) == (404, "not_found"), answer
        assert "so it is not running" in answer["message"], answer
        running = lb.api("GET", f"/api/v1/deploys/{d2['id']}")[1]["deploy"]
        assert running["state"] == "running" and running["abort"] is None, running
        assert store.records().abort_request(d2["id"]) is None
        status, answer = lb.api("DELETE", f"/api/v1/deploys/{d2['id']}")
    finally:
        never.stop()
        store.close()
    assert status == 200 and answer["deploy"]["id"] == d2["id"], answer
    assert answer["deploy"]["state"] == "aborted", answer


def test_if_match_makes_a_deploy_conditional_and_an_abort_refuses_it(
        lb: Balancer, a: Backend, b: Backend) -> None:
    """A deploy with ``If-Match`` starts only from the table version named (412
    otherwise); an abort takes none (400: it names its deploy by its path), nor
    does either take ``If-None-Match`` (400, as every write). Bug: both ignored
    them, the deploy starting from a rule the client had not read."""
    version = lb.version()
    body = {"backends": [b.address], "ready_timeout": 60}
    stale = {"If-Match": f'"{version - 1}"'}
    status, answer = lb.api("POST", f"/api/v1/hosts/{HOST}/deploy", body, stale)
    assert (status, answer["error"]) == (412, "version_conflict"), answer
    status, answer = lb.api("POST", f"/api/v1/hosts/{HOST}/rollback", None, stale)
    assert (status, answer["error"]) == (412, "version_conflict"), answer
    assert lb.api("GET", "/api/v1/deploys")[1]["deploys"] == []
    never = Scripted("503")
    try:
        status, answer = lb.api("POST", f"/api/v1/hosts/{HOST}/deploy",
                                {"backends": [never.address], "ready_timeout": 60},
                                {"If-Match": f'"{version}"'})
        assert status == 202, answer
        for path in (f"/api/v1/hosts/{HOST}/deploy", f"/api/v1/deploys/{answer['deploy']['id']}"):
            for header in ({"If-Match": f'"{version}"'}, {"If-None-Match": "*"}):
                status, refused = lb.api("DELETE", path, None, header)
                assert (status, refused["error"]) == (400, "invalid_header"), refused
        status, refused = lb.api("POST", f"/api/v1/hosts/{HOST}/deploy", body,
                                 {"If-None-Match": "*"})
        assert (status, refused["error"]) == (400, "invalid_header"), refused
        running = lb.api("GET", f"/api/v1/deploys/{answer['deploy']['id']}")[1]["deploy"]
        assert running["abort"] is None
        assert lb.api("DELETE", f"/api/v1/hosts/{HOST}/deploy")[0] == 200
    finally:
        never.stop()
    assert rule_of(lb) == proxy(a)


def test_an_abort_request_redis_lost_before_the_deploy_saw_it_is_asked_again(
        redis_factory: Any, serve_wsgi: Any, b: Backend, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    """Redis restarts empty (scripted: ``FLUSHALL``) just after the abort request was
    stored, before the deploy looked for it: the answer, while it waits, asks it
    again once the deploy's beat claimed the host again, and the deploy stops,
    saying the store lost its table (409 store_lost). Bug: answered 202 (or 404)
    and nothing aborted."""
    from management import deploy_claims, deploys_api
    from management.app import create_app

    monkeypatch.setattr(deploys_api, "ABORT_WAIT", 1.0)
    monkeypatch.setattr(deploy_claims, "BEAT_EVERY", 0.05)
    redis = redis_factory()
    store = open_store(redis.url, f"t{uuid.uuid4().hex}")
    app: Any = create_app(store=store)
    store.put_host(HOST, {"action": "proxy", "backends": ["127.0.0.1:9"]})
    records, lock, flushed = app.deployer.records, threading.Lock(), []
    request_abort, abort_request = records.request_abort, records.abort_request

    def then_flushed(*args: Any) -> Any:  # the store's loss right after the request
        with lock:
            asked = request_abort(*args)
            if not flushed:
                flushed.append(redis.client().flushall())
            return asked

    def after_it(deploy_id: str) -> Any:  # (the deploy's looks: never in between)
        with lock:
            return abort_request(deploy_id)
    records.request_abort, records.abort_request = then_flushed, after_it
    try:
        record = app.deployer.start(HOST, store.host_rule(HOST), [b.address],
                                    {"ready_timeout": 5.0, "drain_timeout": 5.0,
                                     "warmup": 60.0})
        wait_for(lambda: (records.deploy(record["id"]) or {}).get("step") == "warmup",
                 what="the warmup")
        conn = http.client.HTTPConnection(serve_wsgi(app).removeprefix("http://"), timeout=10)
        conn.request("DELETE", f"/api/v1/hosts/{HOST}/deploy")
        response = conn.getresponse()
        answer = response.read().decode()
        stored = records.deploy(record["id"]) or {}
    finally:
        app.deployer.stop()
        store.close()
    assert flushed
    assert response.status == 409 and '"store_lost"' in answer, answer
    assert "the store lost its table" in answer, answer
    assert stored["abort"]["code"] == "store_lost", stored


def test_a_rule_put_back_during_the_drain_fails_the_deploy_naming_the_backends(
        fresh_lb: Balancer, a: Backend, b: Backend) -> None:
    """An operator sets the host's rule back to A by hand while the deploy drains A
    (a request on A in flight): once A's requests are done the deploy fails, saying
    the rule routes to A again and that A was not drained. Bug: it ended done,
    "drained: A: no request in flight", and a script went on to stop A, which the
    host's rule named."""
    from tests.support import request
    from tests.test_deploys import finished, in_background

    lb = fresh_lb
    # (held until the rule is put back: a request that merely took a second ended
    # before the drain under load, and the test found the deploy done)
    slow, _ = in_background(lambda: request(lb.port, host=HOST, path="/hold?s=20"))
    wait_for(lambda: lb.host_stats(HOST).get("open_requests"), what="the slow request")
    record = deploy(lb, {"backends": [b.address], "warmup": 0, "drain_timeout": 10})
    wait_for(lambda: lb.api("GET", f"/api/v1/deploys/{record['id']}")[1]["deploy"]["step"]
             == "drain", what="the drain")
    assert lb.api("PUT", f"/api/v1/hosts/{HOST}", proxy(a))[0] == 200
    a.released.set()
    stored = finished(lb, record["id"])
    slow.join(10)
    assert stored["state"] == "failed", stored
    assert stored["error"] == (
        f"the host's rule was changed during the drain and routes to {a.address} again: "
        f"not drained, do not stop it (the rule set meanwhile serves)"), stored
    assert stored["steps"][-1]["outcome"] == "failed"
    assert rule_of(lb) == proxy(a)


def test_an_abort_whose_deploy_ended_but_kept_its_claim_is_answered_200_and_frees_the_host(
        tmp_path: Path, serve_wsgi: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deploy (its process scripted) ends aborted, but cannot release its claim
    (the store away a moment): the abort's answer, once its wait is over, is 200
    with the aborted record, and the host is free. Bug: 202 with a record that had
    ended, the host claimed until the claim went stale."""
    from management import deploys_api
    from management.app import create_app
    from tests.test_deploys import in_background

    monkeypatch.setattr(deploys_api, "ABORT_WAIT", 0.3)
    store = open_store(f"file:{tmp_path / 'routes.json'}")
    store.put_host(HOST, {"action": "proxy", "backends": ["127.0.0.1:9002"]})
    records = store.records()
    running = {**ended("d1", 0.0), "state": "running", "ended": None,
               "started": time.time()}
    assert records.begin(running, time.time(), 5.0) is None

    def aborted() -> bool:  # the deploy's process: ends it, its release lost
        asked = records.abort_request("d1")
        if asked is None:
            return False
        records.save_claimed({**running, "state": "aborted", "ended": time.time(),
                              "abort": {"requested": asked["at"], "by": asked["by"],
                                        "since": None, "version": None, "problem": None,
                                        "code": None}}, "elsewhere", time.time(), 5.0)
        return True
    deploying, _ = in_background(lambda: wait_for(aborted, what="the abort request"))
    conn = http.client.HTTPConnection(serve_wsgi(create_app(store=store))
                                      .removeprefix("http://"), timeout=10)
    conn.request("DELETE", "/api/v1/deploys/d1")
    response = conn.getresponse()
    answer = response.read().decode()
    deploying.join(5)
    assert response.status == 200 and '"state":"aborted"' in answer.replace(" ", ""), answer
    assert HOST not in records.claims()
