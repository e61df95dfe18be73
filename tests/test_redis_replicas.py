"""Writes that wait for replicas (``?replicas=N&wait=MS`` on a Redis store URL,
docs/stores.md "Replicas"), against a real redis-server master and replica (and
a sentinel), through a real balancer.

Redis replicates asynchronously: without the option a write was answered 200 as
soon as the master applied it. With the replica lagging (``CLIENT PAUSE ...
WRITE`` on it stops it applying the replication stream) the answer came before
the replica had the write, and a failover then lost a write the API had
answered: during ``SENTINEL FAILOVER``, those answered in the 1-2 s before the
sentinels named the new master. Now a write is answered 2xx only once N
replicas acknowledged it (``WAIT``), and ``503 store_not_replicated`` (applied
by the master, may still be lost) when they did not within ``wait``. Each test
fails without the option's code: the first ones because a 200 came first, the
failover's because answered writes were missing from the new master.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from balancer.stores import StoreNotReplicated, StoreUrlError
from balancer.stores.redis import RedisStore
from balancer.stores.urls import Replication, split_replication
from tests.conftest import RedisServer, failover_during_a_burst, wait_until
from tests.support import Balancer, request
from tests.test_tls import CA

WAIT = 10.0
STATIC = {"action": "static", "status": 200, "body": "hi"}


@pytest.mark.parametrize(("url", "bare", "replication"), [
    ("redis://h:6379/0?replicas=1", "redis://h:6379/0", Replication(1, 1000)),
    ("redis://:pw@h/2?wait=250&replicas=2", "redis://:pw@h/2", Replication(2, 250)),
    ("unix:///run/r.sock?db=3&replicas=1&wait=10000", "unix:///run/r.sock?db=3",
     Replication(1, 10000)),
    ("redis+sentinel://a:1,b:2/mm/0?replicas=100&wait=1", "redis+sentinel://a:1,b:2/mm/0",
     Replication(100, 1)),
    ("rediss://h/0?ssl_cert_reqs=none", "rediss://h/0?ssl_cert_reqs=none", None),
])
def test_replication_options_are_taken_off_the_url(url: str, bare: str,
                                                   replication: Replication | None) -> None:
    assert split_replication(url) == (bare, replication)


def test_the_options_change_how_a_store_is_written_not_which_it_is() -> None:
    plain, waiting = RedisStore("redis://h/0"), RedisStore("redis://h/0?replicas=1")
    assert plain.identity() == waiting.identity()  # its snapshot stays its own
    assert waiting.display_url == "redis://h/0?replicas=1"


@pytest.mark.parametrize(("query", "problem"), [
    ("replicas=nan", "replicas must be a whole number from 1 to 100, got 'nan'"),
    ("replicas=-1", "got '-1'"),
    ("replicas=1.5", "got '1.5'"),
    ("replicas=0", "got '0'"),
    ("replicas=101", "got '101'"),
    ("replicas=", "got ''"),
    ("replicas=1&wait=0", "wait must be a whole number from 1 to 10000 milliseconds, got '0'"),
    ("replicas=1&wait=1e3", "got '1e3'"),
    ("replicas=1&wait=inf", "got 'inf'"),
    ("replicas=1&wait=" + "9" * 5000, "got '999"),
    ("replicas=1&wait=0.5", "got '0.5'"),
    ("replicas=1&replicas=2", "replicas is given twice"),
    ("wait=100", "wait needs replicas=N"),
])
def test_bad_replication_options_are_refused_clearly(query: str, problem: str) -> None:
    for base in ("redis://:pw@h:6379/0", "redis+sentinel://:pw@a:1/mm/0"):
        with pytest.raises(StoreUrlError, match=problem) as caught:
            RedisStore(f"{base}?{query}")
        assert "pw" not in str(caught.value)



def test_an_option_redis_py_does_not_take_is_refused_at_once() -> None:
    """Bug: ``?replica=1`` (a typo of ``replicas``) made a store whose every command
    raised a TypeError (the workers died at their first read)."""
    for query, problem in [("replica=1", "unknown option replica "),
                           ("replicas=1&Wait=5", "unknown option Wait "),
                           ("socket_timeout=soon", "Invalid value for 'socket_timeout'")]:
        with pytest.raises(StoreUrlError, match=problem) as caught:
            RedisStore(f"redis://:pw@127.0.0.1:1/0?{query}")
        assert "pw" not in str(caught.value)

# every write path of the store, with the replica not applying writes -------------------
def _paths(store: RedisStore) -> dict[str, Callable[[], object]]:
    """Each write the management process makes, by name (a deploy's, ACME's...)."""
    records, acme, certs = store.records(), store.acme(), store.certs()
    return {
        "one-host write": lambda: store.put_host("a.test", STATIC),
        "one-host delete": lambda: store.delete_host("a.test"),
        "whole-table write": lambda: store.replace({"b.test": STATIC}),
        "certificate": lambda: certs.put("b.test", {"chain": "c", "key": "k"}),
        "certificate delete": lambda: certs.delete("b.test"),
        "certificates restore": lambda: certs.restore({"b.test": {"chain": "c"}}),
        "deploy record": lambda: records.save_deploy({"id": "d1", "host": "b.test"}),
        "deploy claim": lambda: records.claim("b.test", "d1", "me", time.time(), 5),
        "deploy release": lambda: records.release("b.test", "d1"),
        "ACME account": lambda: acme.keep_account({"key": "{}", "uri": ""}),
        "ACME lock": lambda: acme.lock("me", 30),
        "ACME challenge": lambda: acme.put_challenge("t", {"type": "http-01"}),
        "ACME challenge delete": lambda: acme.delete_challenge("t"),
        "ACME state": lambda: acme.put_state("b.test", {"state": "pending"}),
        "ACME unlock": lambda: acme.unlock("me"),
    }


def test_every_write_path_waits_for_the_replicas(
        replica_pair: tuple[RedisServer, RedisServer]) -> None:
    master, replica = replica_pair
    patient = RedisStore(f"{master.url}?replicas=1&wait=1000", "w")
    hasty = RedisStore(f"{master.url}?replicas=1&wait=50", "w")
    lagging = replica.client()
    try:
        for name, write in _paths(patient).items():
            lagging.execute_command("CLIENT", "PAUSE", 100, "WRITE")
            write()  # answered once the replica applied it, after the pause
            assert _same_data(master, replica, "w"), name  # at once, not polled
        lagging.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
        for name, write in _paths(hasty).items():
            started = time.monotonic()
            with pytest.raises(StoreNotReplicated, match="applied by the Redis master"):
                write()
            assert 0.045 < time.monotonic() - started < 2, name
        # the heartbeats rewritten every tick do not wait (module docs)
        hasty.records().report_inflight("me", {"b.test": {}})
        hasty.acme().acknowledge("me", {"signature": "1", "at": 1})
    finally:
        lagging.execute_command("CLIENT", "UNPAUSE")
        patient.close()
        hasty.close()


@pytest.mark.slow
def test_a_wait_after_the_master_changed_never_vouches_for_the_old_masters_writes(
        sentinel_pair: tuple[RedisServer, RedisServer, Any, str],
        redis_factory: Callable[[], RedisServer]) -> None:
    """``WAIT`` counts the writes of its own connection. A failover's sentinels
    ``CLIENT KILL`` the old master's clients, redis-py reconnects silently (to the
    master the sentinels now name), and a ``WAIT`` there, on a master that never
    had the write, was answered by its own replicas. Bug: a write the new master
    lacks was answered done. The master change is made at once here: the
    sentinel is pointed at another synced master and replica."""
    master, replica, sentinel, url = sentinel_pair
    other = redis_factory()
    other.client().config_set("repl-diskless-sync-delay", 0)
    other_replica = redis_factory()
    other_replica.stop()
    other_replica.start("--replicaof", "127.0.0.1", str(other.port))
    probe = other.client()  # a replica just synced acknowledges once it sent its first ACK
    wait_until(lambda: probe.set("probe", 1) and probe.execute_command("WAIT", 1, 100) == 1,
               timeout=WAIT, message="the other replica acknowledging writes")
    store = RedisStore(f"{url}?replicas=1&wait=300", "w")
    lagging = replica.client()
    try:
        lagging.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
        with pytest.raises(StoreNotReplicated, match="connection .* was lost"), \
                store._writing() as writing:
            writing.client.set("w:x", "1")
            sentinel.execute_command("SENTINEL", "REMOVE", "mm")
            sentinel.execute_command("SENTINEL", "MONITOR", "mm", "127.0.0.1", other.port, 1)
            master.client().execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        assert other.client().get("w:x") is None  # the master now lacks it
        with store._writing() as writing:  # the next block writes there, and waits
            writing.client.set("w:y", "1")
        assert other_replica.client().get("w:y") == "1"
    finally:
        lagging.execute_command("CLIENT", "UNPAUSE")
        store.close()


def _same_data(master: RedisServer, replica: RedisServer, namespace: str) -> bool:
    """The replica holds the master's keys under `namespace` with the same values."""
    source, copy = master.client(), replica.client()
    keys = sorted(source.keys(f"{namespace}:*"))
    return keys == sorted(copy.keys(f"{namespace}:*")) and \
        [source.dump(k) for k in keys] == [copy.dump(k) for k in keys]


# through a balancer --------------------------------------------------------------------
@pytest.fixture
def replicated(replica_pair: tuple[RedisServer, RedisServer], tmp_path: Path
               ) -> Iterator[tuple[Balancer, RedisServer, RedisServer]]:
    master, replica = replica_pair
    bal = Balancer(tmp_path, None, store=f"{master.url}?replicas=1&wait=600")
    try:
        yield bal, master, replica
    finally:
        bal.stop()


def test_a_write_answered_200_is_on_the_replica_and_one_it_lacks_answers_503(
        replicated: tuple[Balancer, RedisServer, RedisServer]) -> None:
    bal, master, replica = replicated
    replica.client().execute_command("CLIENT", "PAUSE", 400, "WRITE")
    status, answer = bal.api("PUT", "/api/v1/hosts/a.test", STATIC)
    assert status == 200, answer
    assert replica.client().hget("balancer:hosts", "a.test") is not None  # at once
    chain, key = CA.issue("a.test")
    replica.client().execute_command("CLIENT", "PAUSE", 400, "WRITE")
    assert bal.api("PUT", "/api/v1/certs/a.test", {"chain": chain, "key": key})[0] == 200
    assert replica.client().hget("balancer:certs", "a.test") is not None

    replica.stop()
    started = time.monotonic()
    status, answer = bal.api("PUT", "/api/v1/hosts/b.test", STATIC)
    assert (status, answer["error"]) == (503, "store_not_replicated"), answer
    assert 0.55 < time.monotonic() - started < 3
    assert "(version 2) was applied by the Redis master" in answer["message"]
    assert "0 of them did within 600 ms" in answer["message"]
    assert "may still be lost" in answer["message"]
    assert master.client().hget("balancer:hosts", "b.test") is not None  # as it says
    assert request(bal.port, host="b.test")[0] == 200  # served
    status, answer = bal.api("PUT", "/api/v1/hosts/b.test", STATIC, {"If-Match": '"1"'})
    assert (status, answer["error"]) == (412, "version_conflict")  # the safe retry
    status, answer = bal.api("PUT", "/api/v1/certs/a.test", {"chain": chain, "key": key})
    assert (status, answer["error"]) == (503, "store_not_replicated"), answer
    assert "the certificate of a.test was applied" in answer["message"]

    replica.start("--replicaof", "127.0.0.1", str(master.port))
    wait_until(lambda: bal.api("PUT", "/api/v1/hosts/c.test", STATIC)[0] == 200,
               timeout=WAIT, message="writes answered 200 once the replica is back")


# a failover during a burst of writes ---------------------------------------------------
@pytest.mark.slow
def test_a_sentinel_failover_during_a_burst_loses_no_write_answered_200(
        sentinel_pair: tuple[RedisServer, RedisServer, Any, str], tmp_path: Path) -> None:
    master, replica, sentinel, url = sentinel_pair
    bal = Balancer(tmp_path, None, store=f"{url}?replicas=1&wait=300",
                   env={"BALANCER_STORE_RESYNC_INTERVAL": "0.5"})
    try:
        answered, refused = failover_during_a_burst(bal, sentinel, replica)
        # before any restore: the new master holds every write answered 200
        assert set(answered) <= set(replica.client().hkeys("balancer:hosts"))
        assert "store_not_replicated" in {answer["error"] for _, answer in refused}, refused
    finally:
        bal.stop()
