"""Redis store specifics: the key layout, pub/sub, resync, outages, sentinel URLs."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from balancer.server import Worker
from balancer.settings import load_settings
from balancer.stores import (
    CorruptStore,
    StoreUnavailable,
    StoreUrlError,
    TableData,
    open_store,
    redact_url,
    redis_messages,
    redis_reads,
    redis_watch,
)
from balancer.stores.records import Records
from balancer.stores.redis import RedisStore
from balancer.stores.urls import SentinelTarget, parse_sentinel_url
from loadtest.procs import HeldPort
from tests.conftest import RedisServer, wait_until
from tests.redis_hold import SubscriberHold
from tests.test_store_contract import GONE, WEB, Watcher
from tests.test_table_reads import WholeReads


def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def test_writes_use_the_documented_keys_and_publish_the_new_version(
        redis_server: RedisServer) -> None:
    ns = namespace()
    raw = redis_server.client()
    pubsub = raw.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(f"{ns}:changes", f"{ns}:changed-hosts")
    store = RedisStore(redis_server.url, ns)
    assert store.put_host("web.example.com", WEB) == 1
    assert store.put_host("b.example.com", GONE) == 2
    assert json.loads(raw.hget(f"{ns}:hosts", "web.example.com")) == WEB
    assert raw.get(f"{ns}:version") == "2"
    published = [wait_until(lambda: pubsub.get_message(timeout=0.1), message="a message")
                 for _ in range(4)]
    # SPEC §6: NS:changes carries the version alone (a reader may int() it); the
    # hosts a write changed are announced just before it on NS:changed-hosts
    assert [(m["channel"].split(":")[-1], m["data"]) for m in published] == [
        ("changed-hosts", "1 web.example.com"), ("changes", "1"),
        ("changed-hosts", "2 b.example.com"), ("changes", "2")]
    assert store.replace({}) == 3
    message = wait_until(lambda: pubsub.get_message(timeout=0.1))
    assert (message["channel"], message["data"]) == (f"{ns}:changes", "3")
    store.close()


def test_a_change_arrives_by_message_not_by_resync(redis_server: RedisServer) -> None:
    ns = namespace()
    writer = RedisStore(redis_server.url, ns)
    follower = RedisStore(redis_server.url, ns, resync_interval=60)
    with Watcher(follower) as watcher:
        watcher.wait_version(0)
        started = time.monotonic()
        writer.put_host("web.example.com", WEB)
        watcher.wait_version(1, timeout=0.5)
        assert time.monotonic() - started < 0.5


def test_a_strangers_announcement_hides_no_later_whole_table_write(
        redis_server: RedisServer) -> None:
    """Bug (review): a watcher skipped every version on NS:changes up to the highest
    NS:changed-hosts ever named, so `PUBLISH NS:changed-hosts "999 x"` from anyone
    left whole-table writes to the resync tick."""
    ns = namespace()
    writer = RedisStore(redis_server.url, ns)
    follower = RedisStore(redis_server.url, ns, resync_interval=60)
    with Watcher(follower) as watcher:
        watcher.wait_version(0)
        redis_server.client().publish(f"{ns}:changed-hosts", "999 stranger.example.com")
        assert writer.replace({"web.example.com": WEB}) == 1
        watcher.wait_version(1, timeout=2)
    writer.close()


def test_a_lost_message_is_caught_up_by_the_resync_tick(redis_server: RedisServer) -> None:
    ns = namespace()
    follower = RedisStore(redis_server.url, ns, resync_interval=0.3)
    raw = redis_server.client()
    with Watcher(follower) as watcher:
        watcher.wait_version(0)
        with raw.pipeline(transaction=True) as pipe:  # a write whose PUBLISH was lost
            pipe.hset(f"{ns}:hosts", "web.example.com", json.dumps(WEB))
            pipe.incr(f"{ns}:version")
            pipe.execute()
        assert watcher.wait_version(1, timeout=2).hosts == {"web.example.com": WEB}


def test_a_message_just_behind_the_resync_ticks_read_is_applied_not_a_whole_read(
        redis_server: RedisServer) -> None:
    """Bug: a resync tick whose ``GET`` found the version moved read the whole
    table at once, though the write's message, sent on the subscription before
    that ``GET`` was answered, was only on its way (the wait for messages had
    just ended): at 100,000 hosts 1-2 s of CPU in every worker, for a write it
    would have read one host of. Here the watcher reaches Redis through a relay
    that holds its messages back until the tick's ``GET`` passes: the message
    then comes first, and the watcher reads only the host it names."""
    ns = namespace()
    writer = RedisStore(redis_server.url, ns)
    writer.put_host("a.test", WEB)
    ticked = threading.Event()

    def release_at_the_tick(data: bytes) -> None:
        if relay.held and b"$3\r\nGET\r\n" in data and f"{ns}:version".encode() in data:
            # (a tick before the write: its GET waits here for the write's message)
            wait_until(lambda: relay.kept, timeout=10, message="the write's message held")
            relay.release()  # sent on to the subscription before the GET goes to Redis
            ticked.set()
    relay = SubscriberHold(redis_server.port, before=release_at_the_tick)
    follower = RedisStore(f"redis://127.0.0.1:{relay.port}/0", ns, resync_interval=0.3)
    try:
        with Watcher(follower) as watcher:
            watcher.wait_version(1, timeout=5)
            relay.hold()
            writer.put_host("b.test", GONE)
            assert watcher.wait_version(2, timeout=5).hosts == {"a.test": WEB, "b.test": GONE}
            assert ticked.is_set()
            assert [(c.version, c.hosts) for c in watcher.changes] == [(2, {"b.test": GONE})]
    finally:
        follower.close()
        writer.close()
        relay.close()


@pytest.mark.parametrize(("key", "make", "kind", "want"), [
    ("hosts", lambda raw, key: raw.set(key, "x"), "string", "hash"),
    ("hosts", lambda raw, key: raw.sadd(key, "x"), "set", "hash"),
    ("version", lambda raw, key: raw.lpush(key, "1"), "list", "string"),
    ("version", lambda raw, key: raw.hset(key, "v", "1"), "hash", "string"),
], ids=["hosts-string", "hosts-set", "version-list", "version-hash"])
def test_a_key_of_the_wrong_type_is_corrupt_not_unreachable(
        redis_server: RedisServer, key: str, make: Callable, kind: str, want: str) -> None:
    ns = namespace()
    store = RedisStore(redis_server.url, ns)
    store.put_host("web.example.com", WEB)
    raw = redis_server.client()
    raw.delete(f"{ns}:{key}")
    make(raw, f"{ns}:{key}")
    wrong = f"{ns}:{key} is a {kind}, not a {want}"
    for call in (store.load, lambda: store.put_host("b.example.com", WEB),
                 lambda: store.delete_host("web.example.com")):
        with pytest.raises(CorruptStore, match=wrong):
            call()
    assert raw.type(f"{ns}:version") != "string" or raw.get(f"{ns}:version") == "1"
    assert store.is_reachable()  # Redis answers: not an outage
    if key == "hosts":  # a whole-table write replaces the key
        assert store.replace({"web.example.com": WEB}) == 2
        assert store.load() == TableData(2, {"web.example.com": WEB})
    else:  # the version cannot be read: repaired by hand
        with pytest.raises(CorruptStore, match=wrong):
            store.replace({"web.example.com": WEB})


def test_corrupt_data_keeps_the_last_good_table(redis_server: RedisServer) -> None:
    ns = namespace()
    store = RedisStore(redis_server.url, ns)
    store.put_host("web.example.com", WEB)
    raw = redis_server.client()
    with Watcher(RedisStore(redis_server.url, ns, resync_interval=0.2)) as watcher:
        watcher.wait_version(1)
        raw.hset(f"{ns}:hosts", "bad.example.com", "{not json")
        raw.incr(f"{ns}:version")
        with pytest.raises(CorruptStore, match=r"hosts\[bad.example.com\] is not valid JSON"):
            store.load()
        raw.hset(f"{ns}:hosts", "bad.example.com", json.dumps({"action": "nope"}))
        with pytest.raises(CorruptStore, match="action: must be one of"):
            store.load()
        for hostile in ('{"action": "static", "status": %s}' % ("9" * 5000),  # ValueError
                        "[" * 100_000 + "]" * 100_000):  # RecursionError
            raw.hset(f"{ns}:hosts", "bad.example.com", hostile)
            with pytest.raises(CorruptStore, match=r"hosts\[bad.example.com\] is not valid"):
                store.load()
        # a hash field cannot repeat, but the JSON in it can name a key twice: json kept
        # the last one silently
        raw.hset(f"{ns}:hosts", "bad.example.com",
                 '{"action": "proxy", "backends": [{"address": "127.0.0.1:1", '
                 '"weight": 1, "weight": 9}]}')
        with pytest.raises(CorruptStore, match=r'hosts\[bad.example.com\] has the key '
                                               r'"weight" twice \(in "backends"\[0\]\)'):
            store.load()
        raw.set(f"{ns}:version", "9" * 5000)
        with pytest.raises(CorruptStore,
                           match=r"version is not an integer from 0 to \d+: '9{40}'\.\.\. "):
            store.load()
        raw.set(f"{ns}:version", "2")
        store.delete_host("bad.example.com")
        assert watcher.wait_version(3).hosts == {"web.example.com": WEB}
    assert [t.version for t in watcher.tables] == [1, 3]
    assert store.records().deploys() == []  # hostile deploy records read as absent
    raw.hset(f"{ns}:deploys", "d1", "[" * 100_000 + "]" * 100_000)
    raw.hset(f"{ns}:claims", "a.example.com", '{"id": %s}' % ("9" * 5000))
    assert store.records().deploys() == [] and store.records().claims() == {}
    assert store.records().deploy("d1") is None


def test_redis_down_keeps_the_table_and_a_restart_resyncs(
        redis_factory: Callable[[], RedisServer]) -> None:
    server = redis_factory()
    ns = namespace()
    writer = RedisStore(server.url, ns, timeout=1.0)
    writer.put_host("web.example.com", WEB)
    follower = RedisStore(server.url, ns, resync_interval=0.3, timeout=1.0)
    with Watcher(follower) as watcher:
        watcher.wait_version(1)
        server.stop()
        wait_until(lambda: not follower.is_reachable(), timeout=3, message="unreachable")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="cannot write"):
            writer.put_host("b.example.com", GONE)
        with pytest.raises(StoreUnavailable, match="cannot read"):
            writer.load()
        assert time.monotonic() - started < 3
        assert not writer.is_reachable()
        assert watcher.tables[-1] == TableData(1, {"web.example.com": WEB})
        server.start()
        assert writer.put_host("b.example.com", GONE) == 2  # made before the follower is back
        watcher.wait_version(2, timeout=8)
        assert follower.is_reachable()
        assert watcher.tables[-1].hosts == {"web.example.com": WEB, "b.example.com": GONE}
    assert [t.version for t in watcher.tables] == [1, 2]


def test_any_contact_after_an_outage_clears_it_while_the_watcher_backs_off(
        redis_factory: Callable[[], RedisServer], monkeypatch: pytest.MonkeyPatch) -> None:
    # /readyz (is_reachable) and balancer_store_up (last_error) must agree
    # once the store answers again, before the watcher's backoff runs out
    released = threading.Event()
    monkeypatch.setattr(redis_watch, "nap", lambda _seconds, stop: released.wait(10))
    server = redis_factory()
    ns = namespace()
    store = RedisStore(server.url, ns, resync_interval=0.3, timeout=1.0)
    store.put_host("web.example.com", WEB)
    with Watcher(store) as watcher:
        try:
            watcher.wait_version(1)
            server.stop()
            wait_until(lambda: store.last_error(), timeout=5, message="the outage noticed")
            assert not store.is_reachable()
            assert "unreachable" in store.last_error()
            server.start()
            assert store.load().version == 1  # a contact that is not the watcher's
            assert store.is_reachable()
            assert store.last_error() is None
        finally:
            released.set()  # the watcher reconnects and catches up
        store.put_host("b.example.com", GONE)
        watcher.wait_version(2, timeout=8)
    assert store.last_error() is None


def test_no_keys_or_scan_commands_are_used(redis_factory: Callable[[], RedisServer]) -> None:
    server = redis_factory()
    store = RedisStore(server.url, namespace(), resync_interval=0.1)
    with Watcher(store) as watcher:
        store.replace({"a.example.com": GONE, "b.example.com": WEB})
        store.put_host("c.example.com", GONE)
        store.delete_host("a.example.com")
        watcher.wait_version(3)
        store.load()
    stats = server.client().info("commandstats")
    used = {name.removeprefix("cmdstat_") for name in stats}
    assert {"multi", "exec", "incr", "publish", "hgetall"} <= used
    assert not used & {"keys", "scan", "hscan", "hkeys", "sscan"}


@pytest.mark.parametrize(("url", "expected"), [
    ("redis+sentinel://10.0.0.1:26379/mymaster/2",
     SentinelTarget(((("10.0.0.1", 26379)),), "mymaster", 2)),
    ("redis+sentinel://:s3cret@a:1,b:2,[::1]:3/svc/0",
     SentinelTarget((("a", 1), ("b", 2), ("::1", 3)), "svc", 0, None, "s3cret")),
    ("redis+sentinel://user:pw@a/svc",
     SentinelTarget((("a", 26379),), "svc", 0, "user", "pw")),
])
def test_sentinel_urls_parse(url: str, expected: SentinelTarget) -> None:
    assert parse_sentinel_url(url) == expected


@pytest.mark.parametrize(("url", "problem"), [
    ("redis+sentinel://a:1", "service name is missing"),
    ("redis+sentinel:///svc/0", "no sentinel host"),
    ("redis+sentinel://a:1/svc/x", "db must be a number"),
    ("redis+sentinel://a:1/svc/0/extra", "unexpected path"),
    ("redis+sentinel://a:notaport/svc/0", "sentinel 'a:notaport'"),
    ("redis+sentinel://:pw@a:1/svc/0?x=1", "the only options are replicas= and wait="),
])
def test_bad_sentinel_urls_name_the_problem(url: str, problem: str) -> None:
    with pytest.raises(StoreUrlError, match=problem) as caught:
        parse_sentinel_url(url)
    assert "pw" not in str(caught.value)


@pytest.mark.parametrize(("url", "problem"), [
    ("", "empty store URL"),
    ("ftp://x/y", "unsupported store URL"),
    ("routes.json", "expected file:PATH"),
    ("file:", "the file path is missing"),
    ("redis://:pw@127.0.0.1:notaport/0", "127.0.0.1"),
])
def test_open_store_rejects_bad_urls_clearly(url: str, problem: str) -> None:
    with pytest.raises(StoreUrlError, match=problem) as caught:
        open_store(url)
    assert ":pw@" not in str(caught.value)


def test_redact_url_hides_only_the_password() -> None:
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("rediss://user:pw@h:6380/1") == "rediss://user:***@h:6380/1"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_url("file:/a@b/routes.json") == "file:/a@b/routes.json"


def test_a_store_through_a_real_sentinel(redis_factory: Callable[[], RedisServer],
                                         tmp_path: Path) -> None:
    master = redis_factory()
    with HeldPort() as held:  # the sentinel listens beside it (SO_REUSEADDR)
        conf = tmp_path / "sentinel.conf"
        conf.write_text(f"port {held.port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                        f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n")
        sentinel = subprocess.Popen([master.binary, str(conf), "--sentinel"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            store = open_store(f"redis+sentinel://{held.address}/mymaster/0", namespace())
            version = wait_until(lambda: _try_write(store), timeout=10, message="sentinel")
            assert version == 1
            assert store.load().hosts == {"web.example.com": WEB}
            assert master.client().hlen(f"{store.namespace}:hosts") == 1
        finally:
            sentinel.terminate()
            sentinel.wait(10)


def _try_write(store: RedisStore) -> int | None:
    try:
        return store.put_host("web.example.com", WEB)
    except StoreUnavailable:
        return None


def test_validation_memory_never_hides_an_edit_or_a_duplicate(redis_server: RedisServer) -> None:
    ns = namespace()
    store = RedisStore(redis_server.url, ns)
    store.replace({f"h{i}.example.com": WEB for i in range(50)})
    assert len(store.load().hosts) == 50  # every rule is now remembered as valid
    raw = redis_server.client()
    raw.hset(f"{ns}:hosts", "h7.example.com", json.dumps({**WEB, "retries": -1}))
    with pytest.raises(CorruptStore, match="h7.example.com: retries"):
        store.load()
    raw.hset(f"{ns}:hosts", "h7.example.com", json.dumps(WEB))
    raw.hset(f"{ns}:hosts", "H7.example.com", json.dumps(WEB))
    with pytest.raises(CorruptStore, match="duplicates"):
        store.load()
    raw.hdel(f"{ns}:hosts", "H7.example.com")
    assert len(store.load().hosts) == 50


def test_a_change_read_after_a_later_write_is_not_labelled_with_the_earlier_version(
        redis_server: RedisServer) -> None:
    """Bug: the watcher read the hosts a message named (``HMGET`` + ``GET`` in one
    transaction) and labelled their rules with the version the message named even
    when the ``GET`` found the store past it: a write that landed between the
    message and the read put its rule in the table at the earlier version, and the
    management API answered ``GET /api/v1/hosts`` with version N and N+1's rule
    (two balancers' writers racing their readers, once under CI's load). Here the
    relay lets the next write land just before the watcher's read goes on to Redis."""
    ns = namespace()
    writer = RedisStore(redis_server.url, ns)
    writer.put_host("a.test", _static("v1"))
    landed = threading.Event()

    def write_before_the_read(data: bytes) -> None:
        if b"HMGET" in data.upper() and not landed.is_set():
            landed.set()
            writer.put_host("a.test", _static("v3"))
    relay = SubscriberHold(redis_server.port, before=write_before_the_read)
    follower = RedisStore(f"redis://127.0.0.1:{relay.port}/0", ns, resync_interval=60)
    try:
        with Watcher(follower) as watcher:
            watcher.wait_version(1, timeout=5)
            writer.put_host("a.test", _static("v2"))
            assert watcher.wait_version(3, timeout=5).hosts["a.test"]["body"] == "v3"
            assert landed.is_set()
            shown = {t.version: t.hosts["a.test"]["body"] for t in watcher.tables}
            assert shown.get(2, "v2") == "v2", shown  # the table at 2 holds 2's rule
            # both writes' host read again, not the whole table
            assert [(c.version, c.hosts) for c in watcher.changes] == [
                (3, {"a.test": _static("v3")})]
    finally:
        follower.close()
        writer.close()
        relay.close()


def test_a_change_read_while_the_worker_was_told_a_write_of_it_is_applied_on_it(
        redis_server: RedisServer) -> None:
    """Bug: a worker's watcher heard this balancer's write 2 (serving 1) and read its
    host; meanwhile the management process told the worker 2 directly, and another
    balancer wrote 3: the watcher, finding the store at 3, read both writes' hosts
    and delivered 3 on 1, which the worker (serving 2) took for a change that does
    not follow: it read the whole table (two balancers racing one-host writes,
    test_one_host_reads, about 1 run in 8). Here the relay tells the worker and
    lets the other write land just before the watcher's read goes on to Redis."""
    ns = namespace()
    mine, theirs = RedisStore(redis_server.url, ns), RedisStore(redis_server.url, ns)
    mine.put_host("a.test", _static("v1"))
    reads = WholeReads(redis_server.port, ns)
    raced = threading.Event()

    def race_the_read(data: bytes) -> None:
        if b"HMGET" in data.upper() and not raced.is_set():
            raced.set()
            assert worker.tables.catch_up(2, {"b.test": _static("v2")}) == 2
            assert theirs.put_host("a.test", _static("v3")) == 3
    relay = SubscriberHold(redis_server.port, before=race_the_read)
    store = RedisStore(f"redis://127.0.0.1:{relay.port}/0", ns, resync_interval=60)
    worker = Worker(load_settings(env={"BALANCER_STORE_SNAPSHOT": "off"}), store)
    worker.tables.start_table()
    watcher = threading.Thread(target=worker.watch_loop)
    watcher.start()
    try:
        # subscribed, then found the version served (read nothing): in its loop
        wait_until(lambda: f'"get" "{ns}:version"'.encode()
                   in reads.seen.lower().partition(b'"subscribe"')[2], timeout=5,
                   message="the watcher's check at its start")
        before = reads.count()
        assert mine.put_host("b.test", _static("v2")) == 2  # told directly from the hook
        wait_until(lambda: worker.holder.table.version == 3, timeout=5,
                   message="the worker at version 3")
        assert raced.is_set()
        assert {k: r.rule["body"] for k, r in worker.holder.table.routes.items()} == {
            "a.test": "v3", "b.test": "v2"}
        assert reads.count() == before, reads.lines()[before:]
    finally:
        worker.stopping = True
        watcher.join(5)
        for opened in (store, mine, theirs):
            opened.close()
        relay.close()
        reads.close()


def _static(body: str) -> dict[str, object]:
    return {"action": "static", "status": 200, "body": body}


BIG = 6000  # hosts: read in slices (`redis_reads.SCAN_ABOVE`), a few of them


def _big_table(server: RedisServer, ns: str) -> None:
    """`BIG` hosts at version 1 under `ns`, as the Redis store keeps them."""
    raw = server.client()
    raw.hset(f"{ns}:hosts", mapping={f"h{n}.test": json.dumps(_static(f"h{n}"))
                                     for n in range(BIG)})
    raw.set(f"{ns}:version", 1)


def _during_the_scan(monkeypatch: pytest.MonkeyPatch, acts: list[Callable[[], object]]
                     ) -> list[int]:
    """Run `acts` one per turn of the loop between two slices of the watcher's first
    whole read (`redis_reads.turn`, in this thread); the turns taken."""
    turns: list[int] = []

    def act() -> None:
        if len(turns) < len(acts):
            acts[len(turns)]()
        turns.append(1)
    monkeypatch.setattr(redis_reads, "turn", act)
    return turns


class Killed(BaseException):
    """What a greenlet killed between two slices gets (as `GreenletExit`)."""


@pytest.mark.parametrize("midway", ["wrong type", "killed", "connection cut"])
def test_a_big_read_that_fails_midway_leaves_no_watch_on_a_pooled_connection(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, midway: str) -> None:
    """A read in slices ``WATCH``es its keys on a connection of the client's pool.
    Whatever ends it between two slices (``WRONGTYPE``: a corrupt store; the
    greenlet killed; its connection cut), that connection goes back to the pool
    watching nothing (``UNWATCH``, or closed): a later transaction on it, after a
    write, is not refused (redis-py raises `WatchError` for an ``EXEC`` a stale
    ``WATCH`` aborts)."""
    ns = namespace()
    _big_table(redis_server, ns)
    raw = redis_server.client()
    store = RedisStore(redis_server.url, ns)
    raises: dict[str, type[BaseException]] = {
        "wrong type": CorruptStore, "killed": Killed, "connection cut": StoreUnavailable}

    def kill() -> None:
        raise Killed
    acts: dict[str, Callable[[], object]] = {
        "wrong type": lambda: (raw.delete(f"{ns}:hosts"), raw.set(f"{ns}:hosts", "x")),
        "killed": kill,
        "connection cut": lambda: raw.client_kill_filter(_type="normal", skipme=True)}
    try:
        store.current_shape()  # a connection in the pool
        _during_the_scan(monkeypatch, [lambda: None, acts[midway]])
        with pytest.raises(raises[midway]):
            store.load()
        monkeypatch.setattr(redis_reads, "turn", lambda: None)
        raw.delete(f"{ns}:hosts")
        _big_table(redis_server, ns)
        raw.incr(f"{ns}:version")  # a write to the keys the read watched
        assert store.current_shape() == (2, BIG)  # (GET + HLEN in MULTI/EXEC)
        assert len(store.load().hosts) == BIG
    finally:
        store.close()


def test_a_big_read_that_one_host_writes_race_is_finished_and_read_once(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: a watcher whose read of a big table in slices (``HSCAN``) a one-host
    write interrupted read the whole table again (at 100,000 hosts 1-2 s of CPU in
    every worker and management process, per write). Now the read is finished and
    the hosts the writes' messages name read again at the version after them: the
    table one read at that version gives, after one whole read."""
    ns = namespace()
    _big_table(redis_server, ns)
    writer = RedisStore(redis_server.url, ns)
    reads = WholeReads(redis_server.port, ns)
    _during_the_scan(monkeypatch, [
        lambda: writer.put_host("h1.test", _static("changed")),   # read already
        lambda: writer.delete_host(f"h{BIG - 1}.test"),           # maybe not yet
        lambda: writer.put_host("new.test", _static("new")),
        lambda: writer.put_host(f"h{BIG - 2}.test", _static("changed too"))])
    follower = RedisStore(redis_server.url, ns, resync_interval=60)
    try:
        with Watcher(follower) as watcher:
            first = watcher.wait_version(5, timeout=30)
            assert reads.count() == 1, reads.lines()
            assert first == writer.load() and len(watcher.tables) == 1  # (a whole read)
            assert first.hosts["h1.test"]["body"] == "changed" and len(first.hosts) == BIG
            # the messages the read looked at are not applied again; later ones are
            writer.put_host("later.test", WEB)
            watcher.wait_version(6, timeout=5)
            assert [(c.base, c.version) for c in watcher.changes] == [(5, 6)]
            assert reads.count() == 2, reads.lines()
            assert watcher.latest() == writer.load()
    finally:
        reads.close()
        follower.close()
        writer.close()


@pytest.mark.parametrize("hostile", ["flushdb", "version back", "whole-table write",
                                     "stranger", "flushdb to the same version",
                                     "rewritten in place"])
def test_a_big_read_raced_by_what_no_message_explains_is_read_again(
        redis_factory: Callable[[], RedisServer], monkeypatch: pytest.MonkeyPatch,
        hostile: str) -> None:
    """What the messages cannot account for is read again in slices, never patched
    on the slices read: a ``FLUSHDB`` mid-read, then one-host writes up to the next
    version (their messages follow on the read's version), a version set back, a
    whole-table write, a stranger's announcement of another version. The table
    delivered is the one a single read gives. Bug: a ``FLUSHDB`` mid-read, then a
    write that brought ``NS:version`` back to the read's (a balancer that knew no
    version), was kept: the slices read before it with the one host after; as was a
    hash rewritten without moving the version (the same hosts, the same count)."""
    server = redis_factory()
    ns = namespace()
    _big_table(server, ns)
    raw = server.client()
    writer = RedisStore(server.url, ns)
    writer.raise_floor(1)
    fresh = RedisStore(server.url, ns)
    acts: dict[str, list[Callable[[], object]]] = {
        # then a balancer that knew no version writes two hosts: versions 1 and 2
        "flushdb": [lambda: (raw.flushdb(), fresh.put_host("a.test", WEB),
                             fresh.put_host("b.test", WEB))],
        "version back": [lambda: raw.set(f"{ns}:version", 0)],
        "whole-table write": [lambda: writer.put_host("h1.test", GONE),
                              lambda: writer.replace({"only.test": WEB})],
        "stranger": [lambda: raw.publish(f"{ns}:changed-hosts", "7 h1.test"),
                     lambda: writer.put_host("h2.test", GONE)],
        # then one write of a balancer that knew no version: version 1 again
        "flushdb to the same version": [lambda: (raw.flushdb(),
                                                 fresh.put_host("a.test", WEB))],
        # every rule changed by hand, NS:version kept: out of the contract, but seen
        "rewritten in place": [lambda: raw.hset(f"{ns}:hosts", mapping={
            f"h{n}.test": json.dumps(_static(f"new {n}")) for n in range(BIG)})],
    }
    turns = _during_the_scan(monkeypatch, acts[hostile])
    reads = WholeReads(server.port, ns)
    follower = RedisStore(server.url, ns, resync_interval=60)
    try:
        with Watcher(follower) as watcher:
            wait_until(lambda: watcher.tables, timeout=30, message="the read")
            assert len(turns) >= len(acts[hostile])  # (all done during the first read)
            assert reads.count() == 2, reads.lines()  # read again, once
            expected = writer.load()
            assert watcher.tables == [expected], (len(watcher.tables), expected.version)
    finally:
        reads.close()
        follower.close()
        writer.close()
        fresh.close()


def test_a_whole_table_write_whose_message_comes_after_the_read_is_read_once(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second of two whole-table writes lands before the read the first one's
    message asked for, and its message reaches the watcher only after that read (a
    relay holds it until the read is done: it comes on another connection than the
    read's answer). The read holds the write: nothing more is read. Bug: its
    message, a version read but never heard, was taken for one published again by
    hand and read the table a second time. A version heard before and published
    again is still read again."""
    ns = namespace()
    writer = RedisStore(redis_server.url, ns)
    writer.replace({"a.test": WEB})
    second: list[int] = []

    def second_write_first(data: bytes) -> None:
        if b"HGETALL" in data.upper() and armed.is_set() and not second:
            relay.hold()
            second.append(writer.replace({"b.test": GONE}))
    armed = threading.Event()
    relay = SubscriberHold(redis_server.port, before=second_write_first)
    read_at = redis_messages.Inbox.read_at

    def then_the_message(inbox: redis_messages.Inbox, *args: float) -> None:
        read_at(inbox, *args)  # (the version read, the lag)
        relay.release()
    monkeypatch.setattr(redis_messages.Inbox, "read_at", then_the_message)
    follower = RedisStore(f"redis://127.0.0.1:{relay.port}/0", ns, resync_interval=60)
    reads = WholeReads(redis_server.port, ns)
    try:
        with Watcher(follower) as watcher:
            watcher.wait_version(1, timeout=5)
            before = reads.count()
            armed.set()
            writer.replace({"c.test": WEB})
            assert watcher.wait_version(3, timeout=5).hosts == {"b.test": GONE}
            assert second == [3] and not relay.kept
            writer.put_host("later.test", WEB)  # what follows is applied
            watcher.wait_version(4, timeout=5)
            assert reads.count() - before == 1, reads.lines()
            redis_server.client().publish(f"{ns}:changes", "3")  # heard: look again
            wait_until(lambda: reads.count() - before == 2, timeout=5,
                       message="the read a version published again asks for")
    finally:
        reads.close()
        follower.close()
        writer.close()
        relay.close()


def test_two_whole_table_writes_in_a_row_are_read_whole_once(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second whole-table write lands before the read the first one's message
    asked for: that read holds it, and its message, queued meanwhile, reads
    nothing. Bug: it read the whole table a second time."""
    ns = namespace()
    writer = RedisStore(redis_server.url, ns)
    writer.replace({"a.test": WEB})
    follower = RedisStore(redis_server.url, ns, resync_interval=60)
    reads = WholeReads(redis_server.port, ns)
    shape = follower._raw_shape
    second: list[int] = []

    def second_write_first() -> tuple[str | None, int]:
        if not second and follower._problem is None and follower.whole_load_since():
            second.append(writer.replace({"b.test": GONE}))
        return shape()
    try:
        with Watcher(follower) as watcher:
            watcher.wait_version(1, timeout=5)
            before = reads.count()
            monkeypatch.setattr(follower, "_raw_shape", second_write_first)
            writer.replace({"c.test": WEB})
            assert watcher.wait_version(3, timeout=5).hosts == {"b.test": GONE}
            assert second == [3]
            writer.put_host("later.test", WEB)  # what follows is applied
            watcher.wait_version(4, timeout=5)
            assert reads.count() - before == 1, reads.lines()
    finally:
        reads.close()
        follower.close()
        writer.close()


@contextmanager
def followed_at_version_1(redis_server: RedisServer
                          ) -> Iterator[tuple[str, RedisStore, RedisStore, Watcher, WholeReads]]:
    """A namespace holding a.test at version 1: its writer, a follower (resync
    every 60 s) whose watcher serves version 1, and a count of whole reads."""
    ns = namespace()
    writer = RedisStore(redis_server.url, ns)
    writer.put_host("a.test", WEB)
    follower = RedisStore(redis_server.url, ns, resync_interval=60)
    reads = WholeReads(redis_server.port, ns)
    try:
        with Watcher(follower, lambda: watcher.tables[-1].version if watcher.tables
                     else -1) as watcher:
            watcher.wait_version(1, timeout=5)
            yield ns, writer, follower, watcher, reads
    finally:
        reads.close()
        follower.close()
        writer.close()


@pytest.mark.parametrize("channel, data", [("changes", "9" * 5000),
                                           ("changed-hosts", "9" * 5000 + " x.test")],
                         ids=["changes", "changed-hosts"])
def test_a_strangers_message_of_too_many_digits_is_no_watcher_failure(
        redis_server: RedisServer, channel: str, data: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """Bug (review): a message of digits past Python's int() limit (4,300 digits), on
    either channel, from anyone, raised ValueError in the watcher: taken for a bug of
    ours, every process reported the store down (``balancer_store_up`` 0, a
    traceback asking to report it) and read the whole table, at each such message."""
    with followed_at_version_1(redis_server) as (ns, writer, follower, watcher, reads):
        before = reads.count()
        redis_server.client().publish(f"{ns}:{channel}", data)
        # taken as a stranger's (one GET) before the write: alone in its batch
        wait_until(lambda: "that is not a version" in caplog.text, timeout=5,
                   message="the stranger's message read")
        writer.put_host("b.test", WEB)  # applied from its message, nothing else read
        assert watcher.wait_version(2, timeout=5).hosts == {"a.test": WEB, "b.test": WEB}
        assert follower.last_error() is None
        assert reads.count() == before, reads.lines()


def test_a_strangers_high_version_does_not_make_every_later_write_a_whole_read(
        redis_server: RedisServer) -> None:
    """Bug (review): ``PUBLISH NS:changes 999`` from anyone, then each one-host write
    announced below it was taken for a store gone back, and read the whole table,
    in every process, until the store's version passed 999 (for good with 19
    digits). Now the watch reads whole until past the version it serves: the
    stranger's message costs its one whole read (a bare version asks for one), the
    next write another, and the writes after it are read by their hosts."""
    with followed_at_version_1(redis_server) as (ns, writer, _, watcher, reads):
        before = reads.count()
        redis_server.client().publish(f"{ns}:changes", "999")
        for n in range(2, 7):
            writer.put_host(f"h{n}.test", WEB)
            assert f"h{n}.test" in watcher.wait_version(n, timeout=5).hosts
        assert reads.count() - before <= 2, reads.lines()


@pytest.fixture
def loading_redis() -> Iterator[str]:
    """The URL of a scripted Redis that takes every command but answers each read
    ``-LOADING`` (a Redis restarting, reading its data back from disk)."""
    import contextlib
    import socket

    from tests.rawpeer import serve_each

    def serve(conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ValueError), conn.makefile("rb") as reader:
            conn.settimeout(10)
            while line := reader.readline():
                words = [reader.read(int(reader.readline()[1:]) + 2)[:-2]
                         for _ in range(int(line[1:]))]
                name = words[0].upper()
                conn.sendall(b"%1\r\n$5\r\nproto\r\n:3\r\n" if name == b"HELLO" else
                             b"-LOADING Redis is loading the dataset in memory\r\n"
                             if name in (b"HGET", b"HGETALL", b"GET") else b"+OK\r\n")
        conn.close()

    listener = socket.create_server(("127.0.0.1", 0))
    serve_each(listener, serve)
    try:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    finally:
        listener.close()


@pytest.mark.parametrize("write", ["request_abort", "claim", "release"])
def test_a_connection_lost_while_a_deploy_claim_is_watched_is_an_outage(
        loading_redis: str, write: str) -> None:
    """Redis answers ``LOADING`` (it restarts) to the read made while the claims are
    watched: redis-py raises `WatchError` for that, as for a race. Bug: it went up
    as such, and the API answered an abort 500 "internal error" while Redis
    restarted; it is `StoreUnavailable` (503 store_unavailable), nothing written."""
    calls: dict[str, Callable[[Records], object]] = {
        "request_abort": lambda r: r.request_abort("a.test", {"at": 1.0, "by": "me"}),
        "claim": lambda r: r.claim("a.test", "d1", "me", time.time(), 5.0),
        "release": lambda r: r.release("a.test", "d1")}
    store = RedisStore(loading_redis)
    try:
        with pytest.raises(StoreUnavailable, match="loading the dataset"):
            calls[write](store.records())
    finally:
        store.close()


def test_a_deploy_ending_while_old_records_are_removed_is_kept_as_ended(
        redis_server: RedisServer) -> None:
    """The record removal after a write (`_trim`) reads the records, then the claims:
    a long deploy ends between the two reads (its record saved `done`, its claim
    released). Its fresh record stays (it ended last) and it is never known as
    running. Bug: the removal went by the records read first, so it deleted the
    `done` record and kept a `gone` entry saying `running`, and the deploy's first
    process, back from a partition, claimed the host again and carried it on."""
    from balancer.stores.records import ENDED, MAX_DEPLOYS

    ns = namespace()
    one, other = (RedisStore(redis_server.url, ns) for _ in range(2))
    try:
        a, b = one.records(), other.records()
        long = {"id": "long", "host": "web.test", "started": 900.0, "state": "running",
                "owner": "owner-a"}
        assert a.begin(long, now=900.0, stale_after=5.0) is None
        for n in range(MAX_DEPLOYS + 1):
            a.withdraw({"id": f"d{n}", "host": f"h{n}.test", "started": 1000.0 + n,
                        "ended": 1000.5 + n, "state": "done"})  # (withdraw trims nothing)
        read, ends = b.deploys, []

        def then_it_ends() -> list[dict[str, Any]]:  # (another process, between the reads)
            found = read()
            if not ends:
                ends.append(a.save_claimed({**long, "state": "done", "ended": 2000.0},
                                           "owner-a", 2000.0, 5.0))
                a.release("web.test", "long")
            return found
        b.deploys = then_it_ends  # type: ignore[method-assign]
        assert b.begin({"id": "next", "host": "h0.test", "started": 2001.0,
                        "state": "running", "owner": "owner-b"}, 2001.0, 5.0) is None
        assert ends == [None]
        assert (a.deploy("long") or {}).get("state") == "done", a.gone("long")
        assert a.gone("long") is None and a.gone("d0") is not None
        assert a.renew("web.test", "long", "owner-a", 2010.0, 5.0) == ENDED
        assert "web.test" not in a.claims()
    finally:
        one.close()
        other.close()
