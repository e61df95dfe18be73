"""The store contract (SPEC §6), run against the file store and the Redis store alike."""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from balancer.stores import Store, TableChange, TableData, VersionConflict, open_store
from balancer.stores.certs import CertsCorrupt, CertsLost, RedisCerts
from balancer.stores.file import FileStore
from balancer.stores.records import ENDED, Claimed, HandedOver
from tests.conftest import RedisServer, wait_until

WEB = {"action": "proxy", "backends": ["127.0.0.1:9001", {"address": "[::1]:9002", "weight": 3}]}
GONE = {"action": "empty", "status": 410}


@pytest.fixture(params=["file", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """A factory of store instances that all share one table (like several processes)."""
    if request.param == "file":
        url = f"file:{tmp_path / 'routes.json'}"
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        url = server.url
    namespace = f"test-{uuid.uuid4().hex}"
    opened: list[Store] = []

    def make() -> Store:
        store = open_store(url, namespace, resync_interval=0.5)
        opened.append(store)
        return store
    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: Callable[[], Store]) -> Store:
    return make_store()


class Watcher:
    """Runs `store.watch` in a thread and records every table it delivers (a
    `TableChange` is applied on the table before it, as a worker does)."""

    def __init__(self, store: Store, served: Callable[[], int] | None = None) -> None:
        self.tables: list[TableData] = []
        self.changes: list[TableChange] = []
        self.stopped = False
        self.thread = threading.Thread(target=store.watch,
                                       args=(self.deliver, lambda: self.stopped, served))

    def deliver(self, item: TableData | TableChange) -> None:
        if isinstance(item, TableData):
            self.tables.append(item)
            return
        self.changes.append(item)
        base = self.tables[-1]
        assert item.base == base.version, f"a change on {item.base} after {base.version}"
        hosts = {**base.hosts, **{h: r for h, r in item.hosts.items() if r is not None}}
        for host in [h for h, r in item.hosts.items() if r is None]:
            hosts.pop(host, None)
        self.tables.append(TableData(item.version, hosts))

    def __enter__(self) -> Watcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped = True
        self.thread.join(5)
        assert not self.thread.is_alive(), "watch did not return after stop()"

    def latest(self) -> TableData | None:
        return self.tables[-1] if self.tables else None

    def wait_version(self, version: int, timeout: float = 1.0) -> TableData:
        return wait_until(lambda: self.latest() if self.latest() and
                          self.latest().version == version else None,
                          timeout=timeout, message=f"the watcher to see version {version}")


def test_a_new_store_is_empty_at_version_zero(store: Store) -> None:
    assert store.load() == TableData(0, {})
    assert store.is_reachable()


def test_every_write_moves_the_version_up_by_one(store: Store) -> None:
    assert store.put_host("web.example.com", WEB) == 1
    assert store.put_host("old.example.com", GONE) == 2
    assert store.delete_host("old.example.com") == 3
    assert store.replace({"a.example.com": GONE, "*": WEB}) == 4
    assert store.load() == TableData(4, {"a.example.com": GONE, "*": WEB})


def test_put_overwrites_and_load_returns_the_rules_as_written(store: Store) -> None:
    store.put_host("web.example.com", GONE)
    store.put_host("web.example.com", WEB)
    assert store.load().hosts == {"web.example.com": WEB}


def test_deleting_an_absent_host_is_a_key_error_and_changes_nothing(store: Store) -> None:
    store.put_host("web.example.com", WEB)
    with pytest.raises(KeyError):
        store.delete_host("nobody.example.com")
    assert store.load() == TableData(1, {"web.example.com": WEB})


def test_replace_with_an_empty_table_clears_it(store: Store) -> None:
    store.replace({"a.example.com": GONE, "b.example.com": GONE})
    assert store.replace({}) == 2
    assert store.load() == TableData(2, {})


@pytest.mark.parametrize("write", ["put", "delete", "replace"])
def test_if_version_mismatch_is_a_conflict_and_changes_nothing(store: Store, write: str) -> None:
    store.put_host("web.example.com", WEB)
    store.put_host("web.example.com", GONE)
    calls = {"put": lambda v: store.put_host("x.example.com", WEB, if_version=v),
             "delete": lambda v: store.delete_host("web.example.com", if_version=v),
             "replace": lambda v: store.replace({}, if_version=v)}
    with pytest.raises(VersionConflict) as caught:
        calls[write](1)
    assert caught.value.current == 2
    assert store.load() == TableData(2, {"web.example.com": GONE})
    assert calls[write](2) == 3


def test_a_second_instance_sees_the_same_table(make_store: Callable[[], Store]) -> None:
    first, second = make_store(), make_store()
    first.put_host("web.example.com", WEB)
    assert second.load() == TableData(1, {"web.example.com": WEB})
    assert second.put_host("b.example.com", GONE) == 2
    assert first.load().version == 2


def test_watch_delivers_the_first_table_then_every_change_within_a_second(
        make_store: Callable[[], Store]) -> None:
    writer, follower = make_store(), make_store()
    writer.put_host("web.example.com", WEB)
    with Watcher(follower) as watcher:
        assert watcher.wait_version(1).hosts == {"web.example.com": WEB}
        writer.put_host("b.example.com", GONE)
        assert watcher.wait_version(2).hosts == {"web.example.com": WEB, "b.example.com": GONE}
        writer.delete_host("web.example.com")
        assert watcher.wait_version(3).hosts == {"b.example.com": GONE}


def put_back(store: Store, copy: bytes | dict[str, Any]) -> None:
    """Put an older copy of the table back, as an operator restoring a backup does
    (the Redis store's announced on its channel, as `balancerctl` never would)."""
    if isinstance(store, FileStore):
        staged = Path(store.path).with_suffix(".restored")
        staged.write_bytes(copy)
        os.replace(staged, store.path)
        return
    with store.client.pipeline(transaction=True) as pipe:
        pipe.delete(store.hosts_key).hset(store.hosts_key, mapping=copy["hosts"])
        pipe.set(store.version_key, copy["version"])
        pipe.publish(store.channel, copy["version"]).execute()


def copy_of(store: Store) -> bytes | dict[str, Any]:
    if isinstance(store, FileStore):
        return Path(store.path).read_bytes()
    return {"hosts": store.client.hgetall(store.hosts_key),
            "version": store.client.get(store.version_key)}


def test_an_older_copy_put_back_reaches_a_consumer_told_of_the_newer_writes(
        make_store: Callable[[], Store]) -> None:
    """A balancer's workers and management process are told of its own writes
    directly, before the store's message: a copy of the table the watcher had
    delivered before those writes, put back, is still delivered (and judged a
    loss by the consumer), not taken for the table it already has."""
    writer, follower = make_store(), make_store()
    served = [-1]  # the version the consumer serves (-1: none yet)
    with Watcher(follower, lambda: served[0]) as watcher:
        served[0] = watcher.wait_version(0).version
        writer.replace({"web.example.com": WEB})
        served[0] = watcher.wait_version(1).version  # the watcher delivered this table
        old = copy_of(writer)
        for version in (2, 3):
            served[0] = version  # told directly, as the management process tells workers
            assert writer.put_host("b.example.com", {**GONE, "status": 400 + version}) \
                == version
        delivered = len(watcher.tables)
        put_back(writer, old)
        wait_until(lambda: len(watcher.tables) > delivered, timeout=3,
                   message="the older copy delivered")
        assert watcher.tables[-1] == TableData(1, {"web.example.com": WEB})


def damage(store: Store, host: str) -> None:
    """Write `host`'s rule as no JSON, as a hand edit or a broken tool would, and move
    the version (Redis: with the message a write sends)."""
    if isinstance(store, FileStore):
        path = Path(store.path)
        doc = json.loads(path.read_text())
        doc["version"] += 1
        path.write_text(json.dumps(doc).replace(json.dumps(doc["hosts"][host]), '"{not json'))
        return
    client: Any = store.client  # type: ignore[attr-defined]
    client.hset(store.hosts_key, host, "{not json")  # type: ignore[attr-defined]
    client.publish(store.channel, client.incr(store.version_key))  # type: ignore[attr-defined]


def test_a_reload_leaves_damage_the_watch_found_during_its_read(
        make_store: Callable[[], Store], monkeypatch: pytest.MonkeyPatch) -> None:
    """``POST /api/v1/reload`` ends a problem its whole read disproves. Here the
    reload's read finds the table good, and the watch, reading just after it (its
    message came meanwhile), finds the damage before the reload ends: the damage
    stays reported (bug: the reload ended it, the store damaged and nothing said)."""
    store = make_store()
    store.put_host("web.example.com", WEB)
    load = store.load

    def read_then_damaged() -> TableData:
        data = load()
        if threading.current_thread() is threading.main_thread():  # (the reload's read)
            damage(make_store(), "web.example.com")
            wait_until(lambda: "JSON" in (store.last_error() or ""), timeout=5.0,
                       message="the watch finding the damage")
        return data

    with Watcher(store) as watcher:
        watcher.wait_version(1)
        monkeypatch.setattr(store, "load", read_then_damaged)
        assert store.reload().version == 1
        assert "JSON" in (store.last_error() or ""), "the damage ended unseen"


def test_watch_returns_promptly_when_stopped(store: Store) -> None:
    with Watcher(store) as watcher:
        watcher.wait_version(0)
    # __exit__ asserts the thread ended within its bounded join


def test_concurrent_writers_never_lose_an_update(make_store: Callable[[], Store]) -> None:
    stores = [make_store() for _ in range(3)]
    errors: list[BaseException] = []

    def write(n: int, store: Store) -> None:
        try:
            for i in range(15):
                store.put_host(f"h{n}-{i}.example.com", GONE)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)
    threads = [threading.Thread(target=write, args=(n, s)) for n, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    data = stores[0].load()
    assert data.version == 45
    assert len(data.hosts) == 45


# deploy records (SPEC §10) ---------------------------------------------------
def test_deploy_records_are_shared_newest_first_and_leave_the_table_alone(
        make_store: Callable[[], Store]) -> None:
    from balancer.stores.records import MAX_DEPLOYS

    one, other = make_store(), make_store()
    one.put_host("web.test", WEB)
    version = one.load().version
    for n in range(MAX_DEPLOYS + 3):
        one.records().withdraw({"id": f"d{n}", "host": "web.test", "started": 1000.0 + n})
    d60 = {"id": "d60", "host": "web.test", "started": 1060.0, "state": "running"}
    assert one.records().begin({**d60, "owner": "o"}, 1060.0, 5.0) is None
    one.records().save_claimed({**d60, "state": "done"}, "o", 1061.0, 5.0)
    one.records().release("web.test", "d60")
    seen = other.records().deploys()
    assert [r["id"] for r in seen[:3]] == ["d60", f"d{MAX_DEPLOYS + 2}", f"d{MAX_DEPLOYS + 1}"]
    assert len(seen) == MAX_DEPLOYS
    assert other.records().deploy("d60")["state"] == "done"
    assert other.records().deploy("d0") is None  # the oldest went
    assert one.load().version == version



def test_a_claimed_deploys_record_stays_and_the_last_ended_are_kept(
        make_store: Callable[[], Store]) -> None:
    """Bug: only the 50 started last were kept, so a running deploy (its host
    claimed) 50 others had started after lost its record at each save, and one
    that had just ended went at the next write."""
    from balancer.stores.records import MAX_DEPLOYS

    one, other = make_store().records(), make_store().records()
    long = {"id": "long", "host": "web.test", "started": 900.0, "state": "running",
            "owner": "owner-a"}
    assert one.begin(long, now=900.0, stale_after=5.0) is None
    for n in range(MAX_DEPLOYS + 3):
        one.withdraw({"id": f"d{n}", "host": f"h{n}.test", "started": 1000.0 + n,
                      "ended": 1000.5 + n, "state": "done"})  # (ended, unclaimed)
    assert one.save_claimed(long, "owner-a", 1999.0, 5.0) is None  # its next step
    assert other.deploy("long") is not None
    one.save_claimed({**long, "ended": 2000.0, "state": "done"}, "owner-a", 2000.0, 5.0)
    one.release("web.test", "long")
    assert one.begin({"id": "next", "host": "h0.test", "started": 2001.0, "state": "running",
                      "owner": "owner-b"}, 2001.0, 5.0) is None
    kept = [r["id"] for r in other.deploys()]
    assert "long" in kept and "next" in kept and len(kept) == MAX_DEPLOYS, kept

def test_a_deploy_whose_record_went_is_still_known_as_ended(
        make_store: Callable[[], Store]) -> None:
    """A deploy another process resumed and ended, its record then pushed out by
    50 newer ones: its first process, back from a partition, finds it ended (its
    renewal answers `ENDED`, nothing written), and `gone` says how it ended. Bug:
    an absent record read as a store that lost its records, and the renewal
    claimed the host again for the ended deploy."""
    from balancer.stores.records import ENDED, MAX_DEPLOYS

    one, other = make_store().records(), make_store().records()
    d1 = {"id": "d1", "host": "web.test", "started": 900.0, "state": "running",
          "owner": "owner-a"}
    assert one.begin(d1, now=900.0, stale_after=5.0) is None
    assert other.claim("web.test", "d1", "owner-b", now=910.0, stale_after=5.0) is None
    other.save_claimed({**d1, "state": "done", "ended": 911.0}, "owner-b", 911.0, 5.0)
    other.release("web.test", "d1")
    for n in range(MAX_DEPLOYS - 1):
        other.withdraw({"id": f"d{n + 2}", "host": f"h{n}.test", "started": 1000.0 + n,
                        "ended": 1000.5 + n, "state": "done"})
    assert other.begin({"id": "last", "host": "h0.test", "started": 2000.0,
                        "state": "running", "owner": "owner-b"}, 2000.0, 5.0) is None
    assert one.deploy("d1") is None
    assert one.gone("d1") == {"host": "web.test", "kind": None, "state": "done",
                              "started": 900.0, "ended": 911.0}
    assert one.gone("d2") is None and one.gone("nothing") is None
    assert one.renew("web.test", "d1", "owner-a", 920.0, 5.0) == ENDED
    assert one.save_claimed(d1, "owner-a", 920.0, 5.0) == ENDED
    assert "web.test" not in one.claims() and one.deploy("d1") is None


def test_the_deploys_known_gone_are_the_last_that_went(
        make_store: Callable[[], Store], monkeypatch: pytest.MonkeyPatch) -> None:
    """`gone` keeps the `MAX_GONE` deploys that ended last of those whose records
    went (here 2): a bounded list on both stores."""
    from balancer.stores import records as module
    from balancer.stores import redis_records
    from balancer.stores.records import MAX_DEPLOYS

    monkeypatch.setattr(module, "MAX_GONE", 2)
    monkeypatch.setattr(redis_records, "MAX_GONE", 2)
    one, other = make_store().records(), make_store().records()
    for n in range(MAX_DEPLOYS + 4):
        one.withdraw({"id": f"d{n}", "host": f"h{n}.test", "started": 1000.0 + n,
                      "ended": 1000.5 + n, "state": "done"})
    assert one.begin({"id": "next", "host": "x.test", "started": 3000.0,
                      "state": "running", "owner": "o"}, 3000.0, 5.0) is None
    kept = {r["id"] for r in other.deploys()}
    assert kept == {"next"} | {f"d{n}" for n in range(5, MAX_DEPLOYS + 4)}, kept
    assert {f"d{n}" for n in range(5) if other.gone(f"d{n}")} == {"d3", "d4"}
    assert (other.gone("d4") or {}).get("ended") == 1004.5


def test_one_claim_per_host_taken_over_only_when_its_owner_went_quiet(
        make_store: Callable[[], Store]) -> None:
    a, b = make_store().records(), make_store().records()
    assert a.claim("web.test", "d1", "owner-a", now=100.0, stale_after=5.0) is None
    assert b.claim("web.test", "d2", "owner-b", now=101.0, stale_after=5.0) == "d1"
    assert b.claim("web.test", "d1", "owner-b", now=101.0, stale_after=5.0) == "d1"  # fresh
    assert a.claim("web.test", "d1", "owner-a", now=103.0, stale_after=5.0) is None  # beat
    assert b.claim("web.test", "d1", "owner-b", now=108.1, stale_after=5.0) is None  # resumed
    assert a.claims()["web.test"]["owner"] == "owner-b"
    a.release("web.test", "d2")  # not the holder: nothing happens
    assert "web.test" in b.claims()
    a.release("web.test", "d1")
    assert b.claims() == {}
    assert b.claim("web.test", "d2", "owner-b", now=109.0, stale_after=5.0) is None


def test_a_renewal_hands_over_a_deploy_resumed_or_ended_by_another(
        make_store: Callable[[], Store]) -> None:
    a, b = make_store().records(), make_store().records()
    record = {"id": "d1", "host": "web.test", "started": 100.0, "state": "running"}
    assert a.begin(dict(record, owner="owner-a"), 100.0, 5.0) is None
    assert a.renew("web.test", "d1", "owner-a", 101.0, 5.0) is None  # its own: renewed
    assert b.renew("web.test", "d1", "owner-b", 106.1, 5.0) is None  # quiet: resumed
    assert a.renew("web.test", "d1", "owner-a", 106.2, 5.0) == "d1"  # taken: hands over
    assert b.save_claimed(dict(record, state="aborted"), "owner-b", 106.5, 5.0) is None
    b.release("web.test", "d1")
    assert a.renew("web.test", "d1", "owner-a", 107.0, 5.0) == ENDED
    assert a.claims() == {}  # never claimed again for an ended deploy
    b.withdraw(dict(record, id="d2"))  # a running record, unclaimed (or none: the store lost it)
    assert a.renew("web.test", "d2", "owner-a", 108.0, 5.0) is None  # claimed again
    assert b.renew("web.test", "d3", "owner-b", 108.0, 5.0) == "d2"


def test_a_running_deploys_record_is_saved_with_its_claim_renewed_never_after_a_takeover(
        make_store: Callable[[], Store]) -> None:
    a, b = make_store().records(), make_store().records()
    record = {"id": "d1", "host": "web.test", "started": 100.0, "state": "running",
              "step": "ready", "owner": "owner-a"}
    assert a.begin(record, 100.0, 5.0) is None
    assert a.save_claimed(dict(record, step="switch"), "owner-a", 104.0, 5.0) is None
    assert b.claims()["web.test"]["beat"] == 104.0  # renewed in the same write
    assert b.renew("web.test", "d1", "owner-b", 108.0, 5.0) == "d1"  # so not stale yet
    assert b.save_claimed(dict(record, step="abort"), "owner-b", 109.1, 5.0) is None
    assert a.save_claimed(dict(record, step="warmup"), "owner-a", 109.2, 5.0) == "d1"
    assert b.deploy("d1")["step"] == "abort"  # the takeover's record stands
    assert b.save_claimed(dict(record, state="aborted"), "owner-b", 109.3, 5.0) is None
    b.release("web.test", "d1")
    assert a.save_claimed(dict(record, step="drain"), "owner-a", 110.0, 5.0) == ENDED
    assert (b.deploy("d1")["state"], b.claims()) == ("aborted", {})
    assert b.begin(dict(record, id="d2", owner="owner-b"), 111.0, 5.0) is None
    # a running deploy whose claim went (damaged records) to another: saved, unclaimed
    assert a.save_claimed(dict(record, id="d3"), "owner-a", 111.0, 5.0) == "d2"
    assert (b.deploy("d3")["id"], b.claims()["web.test"]["id"]) == ("d3", "d2")


def test_a_deploys_rule_write_renews_its_claim_in_the_same_step_or_writes_nothing(
        make_store: Callable[[], Store]) -> None:
    """`Store.put_host` with `Claimed`: the claim renewed with the write; a write the
    version check refuses leaves the claim as it was; one of a deploy another process
    took over, or ended, is `HandedOver` with nothing written; another deploy's claim
    (damaged records) is left alone, the write made."""
    one, other = make_store(), make_store()
    a, b = one.records(), other.records()
    record = {"id": "d1", "host": "web.test", "started": 100.0, "state": "running",
              "owner": "owner-a"}
    version = one.put_host("web.test", GONE)
    assert a.begin(record, 100.0, 5.0) is None
    with pytest.raises(VersionConflict):
        one.put_host("web.test", WEB, version + 1, Claimed("d1", "owner-a", 103.0, 5.0))
    assert b.claims()["web.test"]["beat"] == 100.0  # not renewed by a refused write
    version = one.put_host("web.test", WEB, version, Claimed("d1", "owner-a", 104.0, 5.0))
    assert b.claims()["web.test"] == {"id": "d1", "owner": "owner-a", "beat": 104.0}
    assert b.claim("web.test", "d1", "owner-b", 109.1, 5.0) is None  # quiet: resumed
    for holder in ("d1", ENDED):  # taken over, then ended and released by the other
        with pytest.raises(HandedOver) as refused:
            one.put_host("web.test", GONE, version, Claimed("d1", "owner-a", 109.5, 5.0))
        assert refused.value.holder == holder
        assert (other.load().version, other.host_rule("web.test").rule) == (version, WEB)
        if holder == "d1":
            assert b.save_claimed(dict(record, state="done"), "owner-b", 109.2, 5.0) is None
            b.release("web.test", "d1")
    assert b.claims() == {}  # never claimed again for an ended deploy
    assert b.begin(dict(record, id="d2", owner="owner-b"), 110.0, 5.0) is None
    one.put_host("web.test", GONE, version, Claimed("d3", "owner-a", 111.0, 5.0))
    assert b.claims()["web.test"] == {"id": "d2", "owner": "owner-b", "beat": 110.0}
    assert other.host_rule("web.test").rule == GONE


def test_a_renewal_racing_the_takeovers_end_never_claims_the_ended_deploy_again(
        make_store: Callable[[], Store]) -> None:
    """The process that resumed the deploy ends it and releases its claim just as
    the first process, back from a partition, renews. Bug: the renewal read the
    claims (held by the other), then claimed apart from that read: the claim made
    again for the ended deploy, which the first process carried on."""
    a, b = make_store().records(), make_store().records()
    record = {"id": "d1", "host": "web.test", "started": 100.0, "state": "running",
              "owner": "owner-b"}
    assert b.begin(record, 100.0, 5.0) is None
    ended: list[bool] = []

    def end() -> None:  # the other process, at the worst moment it can
        if not ended:
            ended.append(True)
            assert b.save_claimed(dict(record, state="done"), "owner-b", 100.5, 5.0) is None
            b.release("web.test", "d1")

    reads = {name: getattr(a, name) for name in ("claims", "deploys", "deploy")}
    for name, read in reads.items():
        setattr(a, name, lambda *args, read=read: (read(*args), end())[0])
    renewed = a.renew("web.test", "d1", "owner-a", 101.0, 5.0)
    end()
    assert renewed in ("d1", ENDED)
    assert b.claims() == {}


def test_an_abort_is_stored_only_for_the_deploy_holding_the_host_and_goes_with_it(
        make_store: Callable[[], Store]) -> None:
    a, b = make_store().records(), make_store().records()
    assert a.request_abort("web.test", {"at": 1.0, "by": "one"}) is None  # nothing runs
    assert a.claim("web.test", "d1", "owner-a", now=100.0, stale_after=5.0) is None
    assert b.abort_request("d1") is None
    assert b.request_abort("web.test", {"at": 2.0, "by": "two"}) == "d1"
    assert a.request_abort("web.test", {"at": 3.0, "by": "three"}) == "d1"
    assert a.abort_request("d1") == {"at": 2.0, "by": "two"}  # the first request stays
    assert a.claim("web.test", "d1", "owner-a", now=101.0, stale_after=5.0) is None  # a beat
    assert b.abort_request("d1") == {"at": 2.0, "by": "two"}
    b.release("web.test", "d1")
    assert a.abort_request("d1") is None and a.claims() == {}
    assert a.request_abort("web.test", {"at": 4.0, "by": "four"}) is None


def test_a_withdrawn_start_takes_its_abort_request_with_it(
        make_store: Callable[[], Store]) -> None:
    """A start that did not stand (`withdraw`) drops an abort asked meanwhile with
    its claim, as `release` does (bug: Redis kept it in ``NS:deploy-aborts``)."""
    a, b = make_store().records(), make_store().records()
    record = {"id": "d1", "host": "web.test", "owner": "owner-a", "state": "running",
              "started": 100.0}
    assert a.begin(record, now=100.0, stale_after=5.0) is None
    assert b.request_abort("web.test", {"at": 2.0, "by": "two"}) == "d1"
    a.withdraw({**record, "state": "failed"})
    assert b.claims() == {} and b.abort_request("d1") is None


def test_racing_claims_for_one_host_have_one_winner(make_store: Callable[[], Store]) -> None:
    stores = [make_store() for _ in range(6)]
    results: list[str | None] = [None] * 6
    done = [False] * 6

    def race(n: int) -> None:
        results[n] = stores[n].records().claim("web.test", f"d{n}", f"o{n}", 1.0, 5.0)
        done[n] = True
    threads = [threading.Thread(target=race, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert all(done)
    winners = [n for n, r in enumerate(results) if r is None]
    assert len(winners) == 1
    assert all(r == f"d{winners[0]}" for r in results if r is not None)


def test_inflight_reports_are_published_and_withdrawn(make_store: Callable[[], Store]) -> None:
    a, b = make_store().records(), make_store().records()
    a.report_inflight("lb1", {"at": 1.0, "backends": {"127.0.0.1:9001": 2}})
    b.report_inflight("lb2", {"at": 2.0, "backends": {}})
    assert a.inflight() == {"lb1": {"at": 1.0, "backends": {"127.0.0.1:9001": 2}},
                            "lb2": {"at": 2.0, "backends": {}}}
    a.report_inflight("lb1", None)
    assert set(b.inflight()) == {"lb2"}


CERT = {"chain": "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
        "key": "-----BEGIN PRIVATE KEY-----\ny\n-----END PRIVATE KEY-----\n",
        "not_after": 1900000000.0, "source": "upload"}


def test_certificates_are_shared_versioned_and_leave_the_table_alone(
        make_store: Callable[[], Store]) -> None:
    writer, reader = make_store(), make_store()
    writer.put_host("web.test", WEB)
    before = reader.certs().signature()
    assert reader.certs().all() == {}
    writer.certs().put("web.test", CERT)
    writer.certs().put("*.wild.test", {**CERT, "source": "acme"})
    assert reader.certs().all() == {"web.test": CERT, "*.wild.test": {**CERT, "source": "acme"}}
    changed = reader.certs().signature()
    assert changed != before
    assert reader.certs().delete("web.test") is True
    assert reader.certs().delete("web.test") is False
    assert writer.certs().signature() not in (before, changed)
    assert list(writer.certs().all()) == ["*.wild.test"]
    assert reader.load() == TableData(1, {"web.test": WEB})


def _lose_certs(store: Store) -> None:
    """What an accident does: the certs file deleted, or Redis flushed of them."""
    if isinstance(store, FileStore):
        os.unlink(store.path + ".certs.json")
    else:
        certs = store.certs()
        assert isinstance(certs, RedisCerts)
        store.client.delete(certs.key, certs.version_key)  # type: ignore[attr-defined]


def _damage_record(store: Store, host: str) -> None:
    if isinstance(store, FileStore):
        path = Path(store.path + ".certs.json")
        doc = json.loads(path.read_text())
        doc["certs"][host] = {"chain": 1}
        path.write_text(json.dumps(doc))
    else:
        certs = store.certs()
        assert isinstance(certs, RedisCerts)
        store.client.hset(certs.key, host, "{not json")  # type: ignore[attr-defined]
        store.client.incr(certs.version_key)  # type: ignore[attr-defined]


def test_lost_certificates_are_never_read_as_none_and_refuse_writes(
        make_store: Callable[[], Store]) -> None:
    writer, reader = make_store(), make_store()
    writer.certs().keep = True
    writer.certs().put("a.test", CERT)
    writer.certs().put("b.test", CERT)
    assert sorted(reader.certs().all()) == ["a.test", "b.test"]
    assert sorted(writer.certs().all()) == ["a.test", "b.test"]
    _lose_certs(writer)
    with pytest.raises(CertsLost) as caught:
        reader.certs().all()
    assert "`balancerctl cert restore` (POST /api/v1/certs/restore)" in str(caught.value)
    with pytest.raises(CertsLost):
        writer.certs().put("c.test", CERT)  # would leave one certificate
    with pytest.raises(CertsLost):
        writer.certs().delete("a.test")
    assert make_store().certs().all() == {}  # nothing was written
    writer.certs().restore(dict(writer.certs().last_good or {}))
    assert sorted(reader.certs().all()) == ["a.test", "b.test"]
    reader.certs().put("c.test", CERT)
    assert sorted(writer.certs().all()) == ["a.test", "b.test", "c.test"]


def test_one_damaged_record_is_left_out_and_named(make_store: Callable[[], Store]) -> None:
    writer, reader = make_store(), make_store()
    writer.certs().put("a.test", CERT)
    writer.certs().put("b.test", CERT)
    _damage_record(writer, "b.test")
    assert list(reader.certs().all()) == ["a.test"]
    assert reader.certs().damaged["b.test"].startswith("the stored record")
    reader.certs().put("c.test", CERT)  # writes go on and keep the damaged record
    assert sorted(reader.certs().all()) == ["a.test", "c.test"]
    assert list(reader.certs().damaged) == ["b.test"]


@pytest.mark.parametrize("text", [b"", b'{"certs": {"a.test": ', b"\xff\xfe", b"[]",
                                  b'{"certs": []}', b'{"certs": {}, "x": 1}', b"[" * 100000])
def test_a_damaged_certs_file_is_corrupt_never_empty(tmp_path: Path, text: bytes) -> None:
    store = open_store(f"file:{tmp_path / 'routes.json'}", "ns")
    store.certs().put("a.test", CERT)
    path = tmp_path / "routes.json.certs.json"
    path.write_bytes(text)
    with pytest.raises(CertsCorrupt) as caught:
        open_store(f"file:{tmp_path / 'routes.json'}", "ns").certs().all()
    assert "PRIVATE" not in str(caught.value)
    # the certificates' own restore, not the routing table's `balancerctl restore`
    assert "`balancerctl cert restore` (POST /api/v1/certs/restore)" in str(caught.value)
    with pytest.raises(CertsCorrupt):
        store.certs().put("b.test", CERT)
    assert path.read_bytes() == text


def test_the_file_store_keeps_certificates_private(tmp_path: Path) -> None:
    store = open_store(f"file:{tmp_path / 'routes.json'}", "ns")
    store.certs().put("web.test", CERT)
    path = tmp_path / "routes.json.certs.json"
    assert path.stat().st_mode & 0o777 == 0o600
    store.certs().put("web.test", {**CERT, "source": "x"})
    assert path.stat().st_mode & 0o777 == 0o600


# ACME (balancer/stores/acme.py) ---------------------------------------------------
def test_the_acme_account_is_made_once_and_shared(make_store: Callable[[], Store]) -> None:
    first, second = make_store().acme(), make_store().acme()
    assert first.account() is None
    kept = first.keep_account({"key": "K1", "uri": ""})
    assert kept == {"key": "K1", "uri": ""}
    assert second.keep_account({"key": "K2", "uri": ""}) == kept  # the first one stays
    second.set_account_uri("https://ca.test/acct/1")
    assert first.account() == {"key": "K1", "uri": "https://ca.test/acct/1"}


def test_one_issuer_holds_the_lock_until_it_lapses(make_store: Callable[[], Store]) -> None:
    a, b = make_store().acme(), make_store().acme()
    assert a.holder() is None
    assert a.lock("issuer-a", 0.5) is True
    assert b.lock("issuer-b", 0.5) is False
    assert a.lock("issuer-a", 0.5) is True  # extended by its owner
    held = b.holder()
    assert held is not None and held["owner"] == "issuer-a"
    b.unlock("issuer-b")  # not the owner: nothing happens
    assert b.lock("issuer-b", 0.5) is False
    wait_until(lambda: b.lock("issuer-b", 5.0), timeout=3, message="the lock to lapse")
    assert a.lock("issuer-a", 5.0) is False  # lapsed: the old owner lost it
    assert a.holder()["owner"] == "issuer-b"
    b.unlock("issuer-b")
    assert a.holder() is None
    assert a.lock("issuer-a", 5.0) is True


def test_racing_issuers_have_one_winner(make_store: Callable[[], Store]) -> None:
    stores = [make_store().acme() for _ in range(6)]
    won: list[str] = []
    barrier = threading.Barrier(len(stores))

    def race(n: int) -> None:
        barrier.wait()
        if stores[n].lock(f"issuer-{n}", 30):
            won.append(f"issuer-{n}")
    threads = [threading.Thread(target=race, args=(n,)) for n in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(won) == 1
    assert stores[0].holder()["owner"] == won[0]


def test_challenges_and_states_are_shared_and_leave_the_table_alone(
        make_store: Callable[[], Store]) -> None:
    writer, reader = make_store(), make_store()
    writer.put_host("web.test", WEB)
    before = reader.acme().challenges_signature()
    record = {"type": "http-01", "host": "web.test", "token": "tok",
              "key_authorization": "tok.thumb", "expires": 1900000000.0}
    writer.acme().put_challenge("http-01:tok", record)
    assert reader.acme().challenges() == {"http-01:tok": record}
    changed = reader.acme().challenges_signature()
    assert changed != before
    writer.acme().put_state("web.test", {"state": "pending"})
    assert reader.acme().challenges_signature() == changed  # state is not a challenge
    assert reader.acme().states() == {"web.test": {"state": "pending"}}
    writer.acme().delete_challenge("http-01:tok")
    writer.acme().delete_challenge("http-01:absent")
    assert reader.acme().challenges() == {}
    assert reader.acme().challenges_signature() not in (before, changed)
    reader.acme().delete_state("web.test")
    assert writer.acme().states() == {}
    assert reader.load() == TableData(1, {"web.test": WEB})
    assert reader.certs().all() == {}


def test_acknowledgements_are_shared_and_leave_the_challenges_alone(
        make_store: Callable[[], Store]) -> None:
    a, b = make_store().acme(), make_store().acme()
    signature = a.challenges_signature()
    a.acknowledge("lb-a", {"signature": "7", "at": 100.0})
    b.acknowledge("lb-b", {"signature": "6", "at": 99.0})
    assert b.acknowledgements() == {"lb-a": {"signature": "7", "at": 100.0},
                                    "lb-b": {"signature": "6", "at": 99.0}}
    b.acknowledge("lb-b", {"signature": "7", "at": 101.0})
    a.acknowledge("lb-a", None)
    assert a.acknowledgements() == {"lb-b": {"signature": "7", "at": 101.0}}
    a.acknowledge("absent", None)
    assert a.challenges_signature() == signature  # workers do not re-read for an ack


def test_the_file_store_keeps_acme_state_private(tmp_path: Path) -> None:
    acme = open_store(f"file:{tmp_path / 'routes.json'}", "ns").acme()
    acme.keep_account({"key": "secret", "uri": ""})
    acme.put_challenge("tls-alpn-01:web.test", {"type": "tls-alpn-01"})
    for name in ("routes.json.acme.json", "routes.json.challenges.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600


def test_unreadable_acme_records_read_as_absent(tmp_path: Path) -> None:
    acme = open_store(f"file:{tmp_path / 'routes.json'}", "ns").acme()
    (tmp_path / "routes.json.acme.json").write_text("{not json")
    (tmp_path / "routes.json.challenges.json").write_text('{"challenges": {"a": 1, "b": "x"}}')
    assert acme.account() is None and acme.holder() is None and acme.states() == {}
    assert acme.challenges() == {}
    assert acme.lock("issuer", 5) is True  # and the file is whole again
    assert acme.holder()["owner"] == "issuer"
