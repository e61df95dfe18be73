"""Hostile stores, third outside round: what an operator's mistake or a damaged
store puts where the routing table lives, against a real balancer. Each case a
defect found and fixed (each test fails without its fix):

* A FIFO in place of the routes file blocked every process that opened it (the
  worker: no request answered; the management process: no API) until a writer
  came; a symlink to a device (/dev/zero) was read until memory ran out (8 GB
  per process in a minute). Now it is "not a regular file": reported, and the
  last good table keeps serving.
* A Redis version that is not a number ended the store watcher of every worker
  and of the management process for good: after a repair no change made
  elsewhere was ever applied. A version Redis cannot count past (10**22) was
  served and became every balancer's floor: no write could go above it.
* A host listed twice in a hand-edited routes file (or a key named twice in a
  rule, in the file or in a Redis field) was served as its last copy, silently:
  Python's json keeps the last of repeated keys. Now it is a corrupt store
  naming the key.
* A Redis key of the wrong type (``SET balancer:hosts x``) was reported for
  0.1 s: the watcher left, came back after its backoff, found the version it
  served and cleared the problem without reading the table; `store.problem` and
  `balancer_store_up` then said all was well while the damage stayed.
* An exception no branch of a store's watch expected (a bug) ended it for good,
  silently: the store was no longer followed. Now it is a store problem,
  logged once with its traceback, and the watch goes on after a pause.
* A Redis version repaired by hand to the version served stayed reported until
  the next write: the resync tick took it for a write told directly.
* A change whose whole read failed (the consumer's, when the change did not
  count as the store's) was taken as delivered: the table stayed stale until
  the next write. Now the next resync tick reads it again.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RedisServer
from tests.support import Balancer, constants_prefix, replace_file, request, wait_for

WAIT = 10.0
STATIC = {"action": "static", "status": 200, "body": "hi"}


def serves(bal: Balancer, host: str = "app.test", body: bytes = b"hi") -> bool:
    status, _, got = request(bal.port, host=host, timeout=5)
    return status == 200 and got == body


def test_a_routes_file_that_is_a_fifo_or_a_device_is_refused(tmp_path: Path) -> None:
    bal = Balancer(tmp_path, {"app.test": STATIC})
    try:
        os.unlink(bal.routes)
        os.mkfifo(bal.routes)
        wait_for(lambda: "not a regular file" in bal.store_problem(),
                 WAIT, what="the FIFO reported")
        assert serves(bal)
        os.unlink(bal.routes)
        os.symlink("/dev/zero", bal.routes)
        wait_for(lambda: "not a regular file" in bal.store_problem() and serves(bal), WAIT,
                 what="the device reported")
        status, answer = bal.api("PUT", "/api/v1/hosts/b.test", STATIC)
        assert status == 503 and "not a regular file" in answer["message"], answer
        os.unlink(bal.routes)
        bal.write_routes({"app.test": {**STATIC, "body": "back"}}, version=2)
        wait_for(lambda: bal.store_problem() == "" and serves(bal, body=b"back"), WAIT,
                 what="the regular file read again")
    finally:
        release_readers(bal.routes)
        bal.stop()


def release_readers(path: Path) -> None:
    """If `path` is a FIFO, open and close its writing end: a process blocked
    opening it to read goes on (and can stop) instead of waiting forever."""
    if path.is_fifo():
        with contextlib.suppress(OSError):  # ENXIO: nobody has it open to read
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def finishes(call: Callable[[], Any]) -> Any:
    """`call()` in a thread: its value, failing the test if it blocks past WAIT."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(_outcome(call)), daemon=True)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive(), "blocked opening a FIFO"
    return out[0]


def _outcome(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - the outcome is what the test looks at
        return exc


def test_the_files_beside_the_routes_file_refuse_a_fifo(tmp_path: Path) -> None:
    from balancer.stores.base import StoreUnavailable
    from balancer.stores.file import FileStore
    from balancer.stores.snapshot import Snapshot

    store = FileStore(str(tmp_path / "routes.json"))
    for suffix in (".certs.json", ".deploys.json", ".acme.json"):
        os.mkfifo(store.path + suffix)
    os.mkfifo(tmp_path / "snapshot.json")
    got = finishes(lambda: store.certs().all())
    assert isinstance(got, StoreUnavailable) and "not a regular file" in str(got), got
    assert finishes(lambda: store.records().deploys()) == []  # unreadable: none
    got = finishes(lambda: store.acme().account())
    assert isinstance(got, StoreUnavailable) and "not a regular file" in str(got), got
    assert finishes(Snapshot(str(tmp_path / "snapshot.json"), store.identity()).load) is None


@pytest.fixture
def redis_site(redis_factory: Callable[[], RedisServer], tmp_path: Path):
    """``bal, raw``: a balancer on a private Redis serving app.test; raw: a client."""
    redis = redis_factory()
    bal = Balancer(tmp_path, None, store=redis.url)
    assert bal.api("PUT", "/api/v1/hosts", {"hosts": {"app.test": STATIC}})[0] == 200
    yield bal, redis.client()
    bal.stop()


def publish_change(raw: Any, host: str, body: str) -> None:
    """A write made elsewhere (another balancer's), as the Redis store makes it."""
    version = raw.incr("balancer:version")
    raw.hset("balancer:hosts", host, json.dumps({**STATIC, "body": body}))
    raw.publish("balancer:changes", f"{version} {host}")


@pytest.mark.parametrize("bad", ["abc", str(10**22), "-5"])
def test_a_redis_version_that_is_no_count_is_reported_and_followed_after(
        redis_site: tuple[Balancer, Any], bad: str) -> None:
    bal, raw = redis_site
    good = raw.get("balancer:version")
    raw.set("balancer:version", bad)
    raw.publish("balancer:changes", bad)
    wait_for(lambda: "is not an integer from 0 to" in bal.store_problem(), WAIT,
             what="the version reported")
    assert serves(bal)
    assert bal.version() == int(good)
    raw.set("balancer:version", good)  # repaired by hand
    publish_change(raw, "new.test", "new")  # then changed elsewhere: followed
    wait_for(lambda: serves(bal, "new.test", b"new"), WAIT, what="the change applied")
    wait_for(lambda: bal.store_problem() == "", WAIT, what="the problem cleared")
    version = int(good) + 2  # above the change, never above the bad version
    assert bal.api("PUT", "/api/v1/hosts/b.test", STATIC) == (200, {"version": version})


def test_a_redis_version_repaired_by_hand_to_the_version_served_clears_the_problem(
        redis_factory: Callable[[], RedisServer], tmp_path: Path) -> None:
    """Bug: the resync tick that found ``NS:version`` back at the version served took it
    as a write told directly and skipped the read: the problem stayed reported
    (``store.problem``, ``balancer_store_up`` 0) until the next write, a reload too."""
    redis = redis_factory()
    bal = Balancer(tmp_path, None, store=redis.url,
                   env={"BALANCER_STORE_RESYNC_INTERVAL": "0.2"})
    try:
        assert bal.api("PUT", "/api/v1/hosts", {"hosts": {"app.test": STATIC}})[0] == 200
        raw = redis.client()
        good = raw.get("balancer:version")
        raw.set("balancer:version", "abc")  # no message: the resync tick finds it
        wait_for(lambda: "is not an integer from 0 to" in bal.store_problem(), WAIT,
                 what="the version reported")
        wait_for(lambda: bal.store_up() == 0, WAIT, what="balancer_store_up 0")
        raw.set("balancer:version", good)  # repaired by hand, no write after
        wait_for(lambda: bal.store_problem() == "" and bal.store_up() == 1, WAIT,
                 what="the repair seen")
        assert serves(bal) and bal.version() == int(good)
    finally:
        bal.stop()


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_an_unexpected_exception_in_the_store_watcher_is_reported_and_followed_after(
        kind: str, redis_factory: Callable[[], RedisServer], tmp_path: Path) -> None:
    """Bug: an exception no branch of the watch expects (a bug of ours) ended it: the
    store was no longer followed, and nothing said so (``store.problem`` null,
    ``balancer_store_up`` 1). The failure is scripted at the edge: the file's stat, or
    the read of Redis's messages, raises while the flag file exists."""
    flag = tmp_path / "fail"
    edge = {"file": "balancer.stores.file:FileStore._signature",
            "redis": "balancer.stores.redis_messages:Inbox.within"}[kind]
    prefix = constants_prefix({"balancer.restarts.RESTART_CAP": 1.0}, fail=([edge], flag))
    redis = redis_factory() if kind == "redis" else None
    bal = Balancer(tmp_path, {"app.test": STATIC} if redis is None else None,
                   store=redis.url if redis else None, prefix=prefix)
    try:
        if redis is not None:
            assert bal.api("PUT", "/api/v1/hosts", {"hosts": {"app.test": STATIC}})[0] == 200
        flag.touch()
        failed = "the store's watcher failed unexpectedly (RuntimeError: scripted failure)"
        wait_for(lambda: failed in bal.store_problem(), WAIT, what="the failure reported")
        wait_for(lambda: bal.store_up() == 0, WAIT, what="balancer_store_up 0")
        assert serves(bal)  # the last table rides it out
        wait_for(lambda: bal.output().count("(RuntimeError: scripted failure)") >= 1, WAIT,
                 what="the failure logged")
        wait_for(lambda: "Traceback" in bal.output(), WAIT, what="its traceback")
        time.sleep(1.5)  # several restarts meanwhile (each 1 s at most): not logged again
        assert bal.output().count("(RuntimeError: scripted failure)") == 1  # management's
        flag.unlink()
        if redis is None:
            bal.write_routes({"app.test": STATIC, "new.test": {**STATIC, "body": "new"}})
        else:
            publish_change(redis.client(), "new.test", "new")
        wait_for(lambda: serves(bal, "new.test", b"new"), WAIT, what="the store followed")
        wait_for(lambda: bal.store_problem() == "" and bal.store_up() == 1, WAIT,
                 what="the problem cleared")
    finally:
        flag.unlink(missing_ok=True)
        bal.stop()


def test_a_redis_key_of_the_wrong_type_is_a_corrupt_store(
        redis_site: tuple[Balancer, Any]) -> None:
    """Bug: WRONGTYPE was reported as "unreachable"; a one-host write onto a hosts key
    that was no hash raised the version and announced it (Redis does not roll back the
    INCR and PUBLISH of an EXEC whose HSET failed); a certs key was never reported."""
    bal, raw = redis_site
    good = raw.get("balancer:version")
    raw.delete("balancer:hosts")
    raw.set("balancer:hosts", "x")
    raw.publish("balancer:changes", good)  # look again now
    wrong = "balancer:hosts is a string, not a hash"
    wait_for(lambda: wrong in bal.store_problem(), WAIT, what="the hosts key reported")
    assert "unreachable" not in bal.store_problem()
    assert serves(bal)  # the last good table rides it out
    wait_for(lambda: bal.store_up() == 0, WAIT, what="balancer_store_up 0")
    status, answer = bal.api("PUT", "/api/v1/hosts/b.test", STATIC)
    assert (status, answer["error"]) == (503, "store_corrupt") and wrong in answer["message"]
    assert raw.get("balancer:version") == good  # the failed write announced nothing
    assert bal.output().count(wrong) == 1  # logged once, by the management process
    # a whole-table write replaces the key: repaired
    assert bal.api("PUT", "/api/v1/hosts", {"hosts": {"app.test": STATIC}})[0] == 200
    wait_for(lambda: bal.store_problem() == "" and bal.store_up() == 1, WAIT,
             what="the repair seen")
    version = raw.get("balancer:version")
    raw.delete("balancer:version")
    raw.lpush("balancer:version", version)
    raw.publish("balancer:changes", version)
    wait_for(lambda: "balancer:version is a list, not a string" in bal.store_problem(), WAIT,
             what="the version key reported")
    status, answer = bal.api("PUT", "/api/v1/hosts", {"hosts": {"app.test": STATIC}})
    assert (status, answer["error"]) == (503, "store_corrupt"), answer
    assert serves(bal)
    raw.delete("balancer:version")  # repaired by hand
    raw.set("balancer:version", version)
    publish_change(raw, "new.test", "new")
    wait_for(lambda: serves(bal, "new.test", b"new") and bal.store_problem() == "", WAIT,
             what="the change after the repair")
    raw.set("balancer:certs", "x")
    certs_problem = "balancer:certs is a string, not a hash"
    wait_for(lambda: certs_problem in (bal.api("GET", "/api/v1/info")[1]["store"]
                                       ["certs_problem"] or ""), WAIT, what="the certs key")
    status, answer = bal.api("DELETE", "/api/v1/certs/app.test")
    assert (status, answer["error"]) == (503, "certs_corrupt") and certs_problem in \
        answer["message"], answer
    assert serves(bal) and bal.store_problem() == ""


def test_a_redis_key_of_the_wrong_type_stays_reported_across_a_reconnect(
        redis_factory: Callable[[], RedisServer]) -> None:
    """Bug: the watcher that found the hosts key of the wrong type came back (after its
    backoff, or a cut connection), found the version it served and cleared the problem
    without reading the table: `store.problem` and `balancer_store_up` 0 lasted 0.1 s."""
    from balancer.stores.redis import RedisStore

    server = redis_factory()  # its own: the command counts are this watcher's only
    raw = server.client()
    RedisStore(server.url, "probe").put_host("app.test", STATIC)
    watcher = RedisStore(server.url, "probe", resync_interval=60)
    seen: list[Any] = []
    stop = threading.Event()
    thread = threading.Thread(target=watcher.watch, args=(
        seen.append, stop.is_set, lambda: seen[-1].version if seen else -1))
    thread.start()
    wrong = "probe:hosts is a string, not a hash"
    try:
        wait_for(lambda: seen, WAIT, what="the table read")
        raw.delete("probe:hosts")
        raw.set("probe:hosts", "x")
        raw.publish("probe:changes", "1")
        wait_for(lambda: wrong in (watcher.last_error() or ""), WAIT, what="the key reported")
        for _ in range(2):
            wait_for(lambda: raw.pubsub_numsub("probe:changes")[0][1] == 1, WAIT,
                     what="the watcher subscribed")
            looks = type_calls(raw)  # each read that meets the wrong type names the key
            assert raw.client_kill_filter(_type="pubsub") == 1
            wait_for(lambda n=looks: type_calls(raw) > n, WAIT,
                     what="the table read again after the reconnect")
            assert wrong in (watcher.last_error() or "")
        assert seen[-1].version == 1 and len(seen) == 1  # the last good table kept
    finally:
        stop.set()
        thread.join(WAIT)


def type_calls(raw: Any) -> int:
    return int(raw.info("commandstats").get("cmdstat_type", {}).get("calls", 0))


def test_a_host_listed_twice_by_hand_is_a_corrupt_file(tmp_path: Path) -> None:
    """Bug: Python's json kept the last of a host listed twice in a hand-edited routes
    file, and the balancer served it without a word. Now it is a corrupt file: named,
    reported, the last good table serving; at start-up too (from the snapshot)."""
    first = Balancer(tmp_path, {"app.test": STATIC})
    twice = ('{"version": 5, "hosts": {\n"app.test": {"action": "static", "body": "one"},\n'
             '"app.test": {"action": "static", "body": "two"}}}\n')
    named = 'the host "app.test" is listed twice in "hosts"'
    try:
        wait_for(lambda: serves(first), WAIT, what="the first table")
        snapshot = Path(f"{first.routes}.last-good")
        wait_for(snapshot.exists, WAIT, what="the snapshot")
        replace_file(first.routes, twice)
        wait_for(lambda: named in first.store_problem(), WAIT, what="the host named")
        assert serves(first) and first.version() == 1
        assert first.store_up() == 0
        status, answer = first.api("PUT", "/api/v1/hosts/b.test", STATIC)
        assert status == 503 and answer["error"] == "store_corrupt", answer
        assert named in answer["message"]
    finally:
        first.stop()
    again = Balancer(tmp_path, None)  # started on the same file: the snapshot serves
    try:
        wait_for(lambda: named in again.store_problem(), WAIT, what="the host named at start")
        assert serves(again) and again.version() == 1
        assert named in again.output()
        replace_file(first.routes, twice.replace('"two"', '"hi"').replace(
            '"app.test": {"action": "static", "body": "one"},\n', ""))
        wait_for(lambda: again.store_problem() == "" and again.version() == 5, WAIT,
                 what="the repaired file served")
        assert serves(again)
    finally:
        again.stop()


def test_a_redis_rule_naming_a_key_twice_is_a_corrupt_store(
        redis_site: tuple[Balancer, Any]) -> None:
    """A hash field cannot repeat, but the JSON in it can: json kept the last key."""
    bal, raw = redis_site
    version = raw.incr("balancer:version")
    raw.hset("balancer:hosts", "app.test",
             '{"action": "static", "body": "one", "body": "two"}')
    raw.publish("balancer:changes", f"{version} app.test")
    named = 'balancer:hosts[app.test] has the key "body" twice'
    wait_for(lambda: named in bal.store_problem(), WAIT, what="the key named")
    assert serves(bal) and bal.version() == version - 1
    publish_change(raw, "app.test", "fixed")  # rewritten by another balancer: followed
    wait_for(lambda: serves(bal, body=b"fixed") and bal.store_problem() == "", WAIT,
             what="the repaired rule served")


@pytest.mark.parametrize("raises", ["builtins:RuntimeError",
                                    "balancer.stores.base:StoreUnavailable"])
def test_a_change_whose_whole_read_failed_is_read_again_by_the_resync_tick(
        redis_factory: Callable[[], RedisServer], tmp_path: Path, raises: str) -> None:
    """A change the worker and the management process cannot apply on their table
    (its host count differs: a host set by hand, no write) has them read the whole
    table; when that read fails (scripted at the edge: `load` raises while the flag
    exists), the next resync tick reads it again. Bug (review): the watcher took the
    change as delivered, its tick found the version read and did nothing: the
    table stayed stale until the next write."""
    flag = tmp_path / "fail"
    prefix = constants_prefix({}, fail=(["balancer.stores.redis:RedisStore.load"], flag))
    redis = redis_factory()
    bal = Balancer(tmp_path, None, store=redis.url, prefix=prefix,
                   env={"BALANCER_STORE_RESYNC_INTERVAL": "0.5", "FAIL_RAISES": raises})
    try:
        assert bal.api("PUT", "/api/v1/hosts", {"hosts": {"app.test": STATIC}})[0] == 200
        raw = redis.client()
        raw.hset("balancer:hosts", "hand.test", json.dumps({**STATIC, "body": "hand"}))
        flag.touch()
        version = raw.incr("balancer:version")  # a one-host write, as another balancer's
        raw.hset("balancer:hosts", "new.test", json.dumps({**STATIC, "body": "new"}))
        raw.publish("balancer:changed-hosts", f"{version} new.test")
        raw.publish("balancer:changes", str(version))
        wait_for(lambda: "scripted failure" in bal.output(), WAIT, what="the read failed")
        flag.unlink()
        wait_for(lambda: all(serves(bal, "new.test", b"new") for _ in range(4)), WAIT,
                 what="the change served")
        assert all(serves(bal, "hand.test", b"hand") for _ in range(4))
        # (its API reads the store while its table is behind: its own log tells)
        wait_for(lambda: f"routing table version 1 -> {version}: 2 added" in bal.output(),
                 WAIT, what="the management process's table")
    finally:
        flag.unlink(missing_ok=True)
        bal.stop()
