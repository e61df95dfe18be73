"""Routing state you can trust (issue 14): real balancer processes over a real file
store and a real Redis that is killed and restarted empty, flushed, deleted under
them; the loss guard, monotonic versions, restore, the local snapshot and
read-your-writes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from balancer.stores.base import TableData
from tests.conftest import RedisServer
from tests.support import ROOT, Balancer, request, wait_for

FAST_RESYNC = {"BALANCER_STORE_RESYNC_INTERVAL": "0.5"}
HOSTS = {f"h{n}.test": {"action": "static", "body": f"site {n}"} for n in range(5)}


def static(body: str) -> dict[str, Any]:
    return {"action": "static", "body": body}


def body_of(balancer: Balancer, host: str) -> bytes:
    return request(balancer.port, host=host, timeout=5)[2]


def serves_all(balancer: Balancer, hosts: dict[str, Any] = HOSTS) -> bool:
    return all(body_of(balancer, h) == rule["body"].encode() for h, rule in hosts.items())


def store_info(balancer: Balancer) -> dict[str, Any]:
    return balancer.api("GET", "/api/v1/info")[1]["store"]


def worker_pids(balancer: Balancer) -> list[int]:
    return [p["pid"] for p in balancer.api("GET", "/api/v1/info")[1]["processes"]]


def ctl(balancer: Balancer, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALANCER_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "management.ctl", "--url",
                           f"http://127.0.0.1:{balancer.mport}", *args],
                          capture_output=True, text=True, env=env, timeout=30)


@pytest.fixture
def balancers(tmp_path: Path) -> Iterator[Callable[..., Balancer]]:
    started: list[Balancer] = []

    def start(name: str, args: list[str], hosts: dict | None = None,
              env: dict[str, str] | None = None) -> Balancer:
        directory = tmp_path / name
        directory.mkdir(exist_ok=True)
        balancer = Balancer(directory, hosts, args=["--workers", "2", *args],
                            env={**FAST_RESYNC, **(env or {})})
        started.append(balancer)
        return balancer
    yield start
    for balancer in started:
        balancer.stop()


def assert_lost_then_restored(balancers: list[Balancer], version: int, problem: str) -> None:
    """Every balancer keeps serving and reports the loss; a one-host write is refused;
    a restore through the first puts the table back above every version served."""
    first = balancers[0]
    for balancer in balancers:
        wait_for(lambda b=balancer: problem in (store_info(b)["problem"] or ""),
                 what=f"store.problem {problem!r}")
        wait_for(lambda b=balancer: all(problem in (p["store_problem"] or "")
                                        for p in b.api("GET", "/api/v1/info")[1]["processes"]),
                 what=f"every worker's store_problem {problem!r}")
        assert serves_all(balancer)
        assert balancer.store_up() == 0
    status, answer = first.api("PUT", "/api/v1/hosts/new.test", static("new"))
    assert status == 409 and answer["error"] == "store_lost", answer
    assert "balancerctl restore" in answer["message"]
    listed = ctl(first, "list")
    assert listed.returncode == 0 and "h0.test" in listed.stdout
    assert "warning" in listed.stderr
    restored = ctl(first, "restore")
    assert restored.returncode == 0, restored.stderr
    assert f"as version {version + 1}" in restored.stdout
    for balancer in balancers:
        wait_for(lambda b=balancer: store_info(b)["problem"] is None and b.store_up() == 1,
                 what="the store repaired")
        wait_for(lambda b=balancer: all(p["store_problem"] is None for p in
                                        b.api("GET", "/api/v1/info")[1]["processes"]),
                 what="every worker's store_problem cleared")
        assert serves_all(balancer)
    status, answer = first.api("PUT", "/api/v1/hosts/new.test", static("new"))
    assert (status, answer) == (200, {"version": version + 2})
    for balancer in balancers:
        wait_for(lambda b=balancer: body_of(b, "new.test") == b"new", what="the new host")
        assert serves_all(balancer)
    assert first.output().count(problem) == 1  # reported once, not per worker


def load_table(balancer: Balancer) -> int:
    status, answer = balancer.api("PUT", "/api/v1/hosts", {"hosts": HOSTS})
    assert status == 200, answer
    return answer["version"]


@pytest.mark.parametrize("how", ["restart-empty", "flushdb"])
def test_an_emptied_redis_never_wipes_two_balancers(
        redis_factory: Callable[[], RedisServer], balancers: Callable[..., Balancer],
        how: str) -> None:
    """Issue 14.1: Redis restarted without its data, or FLUSHDB, under two balancers."""
    redis = redis_factory()
    a = balancers("a", ["--store", redis.url])
    b = balancers("b", ["--store", redis.url])
    version = load_table(a)
    for _ in range(3):
        version = a.api("PUT", "/api/v1/hosts/h0.test", HOSTS["h0.test"])[1]["version"]
    wait_for(lambda: serves_all(b), what="b serving the table")
    if how == "flushdb":
        redis.client().flushdb()
    else:
        redis.stop()
        shutil.rmtree(redis.directory)
        redis.start()
    assert_lost_then_restored([a, b], version, "lost its table")


def test_a_read_just_after_a_flush_shows_the_served_table_and_the_loss(
        redis_factory: Callable[[], RedisServer], tmp_path: Path) -> None:
    """Bug: until the watcher's next resync found the flush (`store.resync_interval`),
    the API's reads answered the emptied store as the table: 404 for a host every
    worker serves, an empty list at version 0, no problem."""
    redis = redis_factory()
    bal = Balancer(tmp_path, None, args=["--store", redis.url],
                   env={"BALANCER_STORE_RESYNC_INTERVAL": "60"})
    try:
        version = load_table(bal)
        redis.client().flushall()
        status, answer = bal.api("GET", "/api/v1/hosts/h0.test")
        assert status == 200 and answer["rule"] == HOSTS["h0.test"], answer
        assert "lost its table" in answer["store_problem"]
        listed = bal.api("GET", "/api/v1/hosts")[1]
        assert (listed["version"], listed["hosts"]) == (version, HOSTS)
        assert "lost its table" in listed["store_problem"]
        assert serves_all(bal)
    finally:
        bal.stop()


def test_a_restored_older_redis_copy_does_not_roll_the_table_back(
        redis_factory: Callable[[], RedisServer], balancers: Callable[..., Balancer]) -> None:
    redis = redis_factory()
    a = balancers("a", ["--store", redis.url])
    load_table(a)
    raw = redis.client()
    old = {"hosts": raw.hgetall("balancer:hosts"), "version": raw.get("balancer:version")}
    version = 0
    for n in range(4):
        version = a.api("PUT", "/api/v1/hosts/h1.test", static(f"v{n}"))[1]["version"]
    HOSTS_NOW = {**HOSTS, "h1.test": static("v3")}
    with raw.pipeline() as pipe:  # the older copy comes back, announced as a change
        pipe.delete("balancer:hosts").hset("balancer:hosts", mapping=old["hosts"])
        pipe.set("balancer:version", old["version"]).publish("balancer:changes", old["version"])
        pipe.execute()
    wait_for(lambda: store_info(a)["problem"], what="store.problem")
    assert f"at version {old['version']}" in store_info(a)["problem"]
    assert serves_all(a, HOSTS_NOW)
    status, answer = a.api("PUT", "/api/v1/hosts", {"hosts": HOSTS})  # a whole table repairs
    assert (status, answer) == (200, {"version": version + 1})
    assert serves_all(a)
    wait_for(lambda: store_info(a)["problem"] is None, what="the repair")


def test_a_routes_file_deleted_under_a_running_balancer(
        balancers: Callable[..., Balancer]) -> None:
    """Issue 14.2: a deleted file plus one write used to leave a one-host table."""
    bal = balancers("file", [], HOSTS)
    version = 0
    for _ in range(4):
        version = bal.api("PUT", "/api/v1/hosts/h2.test", HOSTS["h2.test"])[1]["version"]
    os.unlink(bal.routes)
    assert_lost_then_restored([bal], version, "cannot read the routing table file (deleted?)")
    assert json.loads(bal.routes.read_text())["version"] == version + 2


def test_versions_only_grow_across_corruption_and_repair(
        balancers: Callable[..., Balancer]) -> None:
    """Issue 14.3: version 50, file corrupted, whole-table PUT: 51, never 1."""
    bal = balancers("file", [], None)
    bal.write_routes(HOSTS, version=50)
    bal.wait_version(50)
    bal.routes.write_text("{not json")
    wait_for(lambda: "not valid JSON" in (store_info(bal)["problem"] or ""),
             what="the corrupt file reported")
    assert bal.store_up() == 0
    status, answer = bal.api("PUT", "/api/v1/hosts/x.test", static("x"))
    assert status == 503 and answer["error"] == "store_corrupt"
    assert bal.api("PUT", "/api/v1/hosts", {"hosts": HOSTS}) == (200, {"version": 51})
    assert bal.api("DELETE", "/api/v1/hosts/h4.test") == (200, {"version": 52})
    wait_for(lambda: store_info(bal)["problem"] is None, what="the repaired file")
    assert bal.version() == 52


def test_a_balancer_started_while_redis_is_down_serves_its_last_table(
        redis_factory: Callable[[], RedisServer], balancers: Callable[..., Balancer]) -> None:
    redis = redis_factory()
    first = balancers("a", ["--store", redis.url])
    version = load_table(first)
    snapshot = first.tmp / "balancer-balancer.last-good.json"
    wait_for(lambda: snapshot.exists() and json.loads(snapshot.read_text())["version"]
             == version, what="the snapshot")
    first.stop()
    redis.stop()
    again = balancers("a", ["--store", redis.url])
    assert serves_all(again)
    assert again.version() == version
    assert "unreachable" in (store_info(again)["problem"] or "")
    listed = ctl(again, "list")
    assert listed.returncode == 0 and "h3.test" in listed.stdout, listed.stderr
    assert "warning" in listed.stderr
    redis.start()  # back with its data (AOF): nothing to repair
    wait_for(lambda: store_info(again)["problem"] is None, timeout=15, what="redis back")
    assert again.api("PUT", "/api/v1/hosts/h0.test", static("after"))[1] == \
        {"version": version + 1}


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_a_request_sent_after_the_answer_sees_the_write(
        redis_factory: Callable[[], RedisServer], balancers: Callable[..., Balancer],
        kind: str) -> None:
    """Issue 14.4 (read-your-writes): every worker serves a write when the API answers."""
    args = ["--store", redis_factory().url] if kind == "redis" else []
    bal = balancers(kind, args, {} if kind == "file" else None)
    assert len(worker_pids(bal)) == 2
    for n in range(40):
        host = f"new{n % 4}.test"
        status, answer = bal.api("PUT", f"/api/v1/hosts/{host}", static(f"write {n}"))
        assert status == 200, answer
        assert body_of(bal, host) == f"write {n}".encode(), f"write {n}"
    assert bal.api("DELETE", "/api/v1/hosts/new0.test")[0] == 200
    assert request(bal.port, host="new0.test")[0] == 404
    status, _ = bal.api("PUT", "/api/v1/hosts", {"hosts": HOSTS})
    assert status == 200 and serves_all(bal)


def test_a_stalled_worker_makes_the_write_answer_202(
        balancers: Callable[..., Balancer]) -> None:
    bal = balancers("file", [], HOSTS, env={"BALANCER_MANAGEMENT_APPLY_TIMEOUT": "0.5"})
    stalled = worker_pids(bal)[0]
    os.kill(stalled, signal.SIGSTOP)
    try:
        status, answer = bal.api("PUT", "/api/v1/hosts/h0.test", static("later"))
    finally:
        os.kill(stalled, signal.SIGCONT)
    assert status == 202, answer
    assert answer["applied"] is False and answer["version"] == 2
    assert [w["pid"] for w in answer["lagging"]] == [stalled]
    assert "no answer" in answer["lagging"][0]["reason"]
    wait_for(lambda: bal.version() == 2 and all(
        body_of(bal, "h0.test") == b"later" for _ in range(4)), what="the worker catching up")


HOSTILE = {  # what a hand edit can hold that the JSON decoder refuses with other errors
    "huge": '{"action": "static", "body": "x", "status": ' + "9" * 5000 + "}",  # ValueError
    "deep": "[" * 100_000 + "]" * 100_000,  # RecursionError
}


@pytest.mark.parametrize("value", sorted(HOSTILE))
@pytest.mark.parametrize("kind", ["file", "redis"])
def test_a_hand_edited_huge_number_or_deep_nesting_is_a_corrupt_store(
        redis_factory: Callable[[], RedisServer], balancers: Callable[..., Balancer],
        kind: str, value: str) -> None:
    """A 5,000-digit number or 100,000 nested lists in a hand-edited routes file or
    Redis value: reported as a corrupt store, the last good table keeps serving,
    listing shows the served table with the problem, a one-host write is refused
    (file: 503 `store_corrupt`) or not applied (Redis: 202 naming the problem),
    never a 500, and a whole-table PUT repairs it."""
    rule = HOSTILE[value]
    if kind == "file":
        bal = balancers("file", [], None)
        version = load_table(bal)
        bal.routes.write_text(f'{{"version": {version + 1}, "hosts": {{"h0.test": {rule}}}}}')
    else:
        redis = redis_factory()
        bal = balancers("redis", ["--store", redis.url])
        version = load_table(bal)
        raw = redis.client()
        raw.hset("balancer:hosts", "h0.test", rule)
        raw.incr("balancer:version")
        raw.publish("balancer:changes", f"{version + 1} h0.test")  # the change path too
    wait_for(lambda: "not valid JSON" in (store_info(bal)["problem"] or ""),
             what="the corrupt store reported")
    assert serves_all(bal)
    assert bal.version() == version
    assert bal.store_up() == 0
    status, listed = bal.api("GET", "/api/v1/hosts")  # the served table, with the problem
    assert status == 200 and listed["version"] == version
    assert "not valid JSON" in listed["store_problem"]
    status, answer = bal.api("PUT", "/api/v1/hosts/x.test", static("x"))
    if kind == "file":  # the write reads the whole file: refused
        assert status == 503 and answer["error"] == "store_corrupt", (status, answer)
        assert "not valid JSON" in answer["message"]
        repaired = version + 1  # above the highest version served, not the unreadable one
    else:  # Redis writes one field; the workers cannot read the table and say why
        assert status == 202 and answer["applied"] is False, (status, answer)
        assert all("not valid JSON" in lag["reason"] for lag in answer["lagging"])
        repaired = version + 3
    assert bal.api("PUT", "/api/v1/hosts", {"hosts": HOSTS}) == (200, {"version": repaired})
    wait_for(lambda: store_info(bal)["problem"] is None, what="the repaired store")
    assert serves_all(bal)


class QuietStore:
    """A store that never changes (only the edge the mirror's watcher needs)."""

    display_url = "quiet:"

    def watch(self, on_change: Callable[[Any], None], stop: Callable[[], bool],
              served: Callable[[], int]) -> None:
        import gevent

        while not stop():
            gevent.sleep(0.01)

    def raise_floor(self, version: int) -> None:
        pass


def test_a_stopping_mirror_saves_its_last_table_at_once(tmp_path: Path) -> None:
    """The snapshot loop pauses `SAVE_EVERY` between saves; a stop ends the pause
    (a balancer's stop used to wait it out) and still saves the last table."""
    from balancer.stores.snapshot import Snapshot
    from management.mirror import SAVE_EVERY, Mirror
    from tests.support import loop_until

    snapshot = Snapshot(str(tmp_path / "last-good.json"), "quiet:")
    mirror = Mirror(QuietStore(), snapshot)  # type: ignore[arg-type]
    mirror.start()
    mirror.note_write(1, None, HOSTS)
    assert loop_until(lambda: snapshot.load() is not None), "the first save"
    mirror.note_write(2, {"h0.test": None})  # during the pause after the first save
    started = time.monotonic()
    mirror.stop()
    assert time.monotonic() - started < SAVE_EVERY * 0.9
    assert snapshot.load() == TableData(2, {h: r for h, r in HOSTS.items() if h != "h0.test"})
