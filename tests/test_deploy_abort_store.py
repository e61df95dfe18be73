"""An abort against a store that fails it (docs/deploys.md "Aborting a deploy"):
real balancers, real backends, real Redis or routes file, the store's failures
scripted (`constants_prefix`). A hiccup's problem goes once the store answers;
an abort's hour of retries counts from when it was asked, whichever process
resumes it; a balancer cut from the store longer than a claim's staleness hands
its abort over instead of carrying it out beside the one that resumed it; an
abort that gives up answers with its cause's error code.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from balancer.stores import open_store
from tests.support import Backend, constants_prefix, wait_for
from tests.test_deploy_abort import (
    abort,
    aborted_in_drain,
    aborting_in_flight,
    in_warmup,
    on_redis,
    record_of,
    rule_of_store,
)
from tests.test_deploys import HOST, finished, in_background, proxy, step

UNAVAILABLE = "FAIL_RAISES=balancer.stores.base:StoreUnavailable"


def failing(calls: list[str], flag: Path, raises: str = UNAVAILABLE,
            values: dict[str, float] | None = None) -> list[str]:
    """A `Balancer` prefix: `calls` raise `raises` (``FAIL_RAISES=...``) while `flag`
    exists, module constants set to `values`."""
    prefix = constants_prefix(values or {}, fail=(calls, flag))
    prefix.insert(1, raises)
    return prefix


def test_a_store_hiccup_during_the_aborts_drain_leaves_no_problem_once_it_answers(
        tmp_path: Path, redis_factory: Any, a: Backend, b: Backend) -> None:
    """The in-flight counts cannot be read for a moment while the abort waits for a
    request on the new backend: ``abort.problem`` says so, and is cleared at the
    next read that succeeds, the request still in flight. Bug: it stayed until the
    whole drain returned, and the abort answered 503 for a hiccup long over."""
    redis, flag = redis_factory(), tmp_path / "inflight-fails"
    lb = on_redis(tmp_path, redis, a, prefix=failing(
        ["balancer.stores.redis_records:RedisRecords.inflight"], flag))
    try:
        _, (on_b, _), record = aborting_in_flight(lb, b, 2, 2.5)
        flag.touch()
        wait_for(lambda: "in-flight" in (record_of(lb, record["id"])["abort"]["problem"]
                                         or ""), what="the hiccup noted")
        flag.unlink()

        def cleared() -> bool:
            now = record_of(lb, record["id"])
            return now["abort"]["problem"] is None and step(now, "abort")["ended"] is None
        wait_for(cleared, timeout=1.5, what="the problem cleared, the abort still draining")
        stored = finished(lb, record["id"])
        on_b.join(10)
    finally:
        flag.unlink(missing_ok=True)
        lb.stop()
    assert stored["state"] == "aborted" and stored["abort"]["problem"] is None, stored
    assert step(stored, "abort")["outcome"] == "drained", stored


def test_an_abort_resumed_past_its_patience_gives_up_at_once_naming_the_loss(
        tmp_path: Path) -> None:
    """A management process resumes an abort asked more than `ABORT_PATIENCE` (an
    hour) ago whose write back the store refuses (it lost its table): the deploy
    fails at once, its cause's code kept (``store_lost``). Bug: each management
    process that resumed it started a fresh hour of retries."""
    from management.app import create_app

    store = open_store(f"file:{tmp_path / 'routes.json'}")
    app = create_app(store=store)
    before = {"action": "proxy", "backends": ["127.0.0.1:9001"]}
    store.put_host(HOST, before)  # (version 1: below the 5 the deploy started from)
    asked = time.time() - 3700
    record = aborted_in_drain(before, asked - 2, asked, 5)
    store.records().begin(record, time.time() - 60, 5.0)  # (its process long quiet)
    assert store.records().claim(HOST, "d1", app.deployer.owner, time.time(), 5.0) is None
    running, _ = in_background(lambda: app.deployer.run(record, resumed=True))
    running.join(5)
    app.deployer.stop()
    assert not running.is_alive()
    stored = store.records().deploy("d1")
    assert stored["state"] == "failed", stored
    assert stored["error"].startswith("the abort gave up after 3600s: cannot go back: "), stored
    assert stored["abort"]["code"] == "store_lost", stored


def test_an_abort_given_up_for_a_table_that_kept_changing_answers_412(
        tmp_path: Path, redis_factory: Any, a: Backend, b: Backend) -> None:
    """Every write back meets a newer table (scripted): the abort gives up after
    `ABORT_PATIENCE` (made 0.5 s), and its answer names that cause, 412
    `version_conflict`. Bug: 503 `store_unavailable`, whatever the cause."""
    redis, flag = redis_factory(), tmp_path / "conflicts"
    lb = on_redis(tmp_path, redis, a, prefix=failing(
        ["balancer.stores.redis:RedisStore.put_host"], flag,
        "FAIL_RAISES=balancer.stores.base:VersionConflict",
        {"management.deploy_abort.ABORT_PATIENCE": 0.5,
         "management.deploy_abort.ABORT_RETRY": 0.1}))
    try:
        record = in_warmup(lb, b)
        flag.touch()
        status, answer = abort(lb)
        stored = finished(lb, record["id"])
    finally:
        flag.unlink(missing_ok=True)
        lb.stop()
    assert (status, answer["error"]) == (412, "version_conflict"), answer
    assert "the table kept changing" in answer["message"], answer
    assert stored["state"] == "failed" and stored["abort"]["code"] == "version_conflict"


def test_a_balancer_cut_from_the_store_hands_its_abort_over_to_the_one_that_resumed_it(
        tmp_path: Path, redis_factory: Any, a: Backend, b: Backend) -> None:
    """The balancer running the deploy is cut from Redis (its claims and writes
    fail, scripted) when the abort arrives, longer than `STALE_AFTER` (made 1 s):
    the other balancer resumes the deploy and carries the abort out; once back, the
    first hands over and acts no more. Bug: it carried the abort out too, once its
    writes went through: a second `abort` step ("nothing was switched"), and each
    balancer's record written over the other's."""
    redis, flag = redis_factory(), tmp_path / "cut"
    clock = {"management.deploy_claims.STALE_AFTER": 1.0,
             "management.deploy_claims.BEAT_EVERY": 0.2}
    cut = [f"balancer.stores.redis_records:RedisRecords.{name}"
           for name in ("claim", "renew", "claims", "save_claimed")]
    first = on_redis(tmp_path, redis, a, prefix=failing(
        [*cut, "balancer.stores.redis:RedisStore.put_host"], flag, values=clock))
    second = on_redis(tmp_path, redis, a, "two", prefix=constants_prefix(clock))
    try:
        record = in_warmup(first, b)
        version = second.version()
        flag.touch()
        status, answer = abort(second)
        wait_for(lambda: "resuming at step warmup" in second.output(),
                 what="the second balancer resuming the deploy")
        stored = finished(second, record["id"])
        flag.unlink()
        wait_for(lambda: "handed over (another process resumed it)" in first.output(),
                 what="the first balancer handing the deploy over")
        after = record_of(second, record["id"])
        versions = second.version()
    finally:
        flag.unlink(missing_ok=True)
        first.stop()
        second.stop()
    assert status == 200 and answer["deploy"]["state"] == "aborted", answer
    assert after == stored  # never written over by the first
    assert [s["outcome"] for s in after["steps"] if s["name"] == "abort"] == ["drained"]
    assert versions == version + 2  # the write back and the removal of `draining`: once
    assert f"{record['id']} of {HOST} aborted" not in first.output()
    assert rule_of_store(redis) == proxy(a)


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_a_read_hiccup_keeps_the_aborts_known_problem(
        tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
        kind: str) -> None:
    """The abort's write back is refused (the store lost its table: ``abort.code``
    store_lost), and one read of the rule fails meanwhile (a hiccup): the record
    keeps saying store_lost. Bug: the hiccup's problem replaced it (503
    store_unavailable), then was cleared at the next read (no problem: the abort
    answered 202), before the next try noted store_lost again."""
    from balancer.stores import StoreUnavailable
    from management import deploy_abort
    from management.app import create_app

    monkeypatch.setattr(deploy_abort, "ABORT_RETRY", 0.02)
    url = f"file:{tmp_path / 'routes.json'}" if kind == "file" else \
        request.getfixturevalue("redis_server").url
    store = open_store(url, f"test-{uuid.uuid4().hex}")
    app = create_app(store=store)
    before = {"action": "proxy", "backends": ["127.0.0.1:9001"]}
    store.put_host(HOST, before)  # (version 1: below the 5 the deploy started from)
    record = aborted_in_drain(before, time.time() - 2, time.time(), 5)
    store.records().begin(record, time.time() - 60, 5.0)  # (its process long quiet)
    assert store.records().claim(HOST, "d1", app.deployer.owner, time.time(), 5.0) is None
    reads, host_rule = [0], store.host_rule

    def hiccup(host: str) -> Any:
        reads[0] += 1
        if reads[0] == 2:
            raise StoreUnavailable("a hiccup")
        return host_rule(host)
    store.host_rule = hiccup  # type: ignore[method-assign]
    codes, save = [], app.deployer.records.save_claimed

    def saved(record: dict[str, Any], *args: Any) -> Any:
        codes.append(record["abort"]["code"])
        return save(record, *args)
    app.deployer.records.save_claimed = saved
    running, _ = in_background(lambda: app.deployer.run(record, resumed=True))
    try:
        wait_for(lambda: reads[0] >= 4, what="reads after the hiccup")
    finally:
        app.deployer.stop()
        running.join(5)
        store.close()
    assert codes and set(codes) == {"store_lost"}, codes
