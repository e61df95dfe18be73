"""Outside probe of the Redis store's loss guard (2026-12-07): a data loss the
watcher does not see as a version change.

* Redis flushed (``FLUSHALL`` by an operator, a restart without persistence
  that the pub/sub connection happens to survive through a proxy) under a
  balancer A serving version N, then a balancer that knew no version (started
  after the loss, its snapshot off or on another machine) writes hosts one at
  a time from version 1. A ignored the messages up to N (versions it serves
  already) and applied N+1's host on its own table: it served its lost hosts
  plus that one, at the version the store holds with another table, and no
  problem reported, until a whole read (none came: the version matched). Now a
  change read from the store carries the store's host count (``HLEN``, read in
  the same transaction) and a consumer whose table would count otherwise reads
  the whole table. A watcher that hears an announcement of a version at or below
  one it heard reads the whole table at each write until the store passes the
  version it had heard (the loss is reported meanwhile, as at a resync); one that
  missed the going back (its connection cut meanwhile, found again at the version
  it serves) has the host count to go by.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RedisServer
from tests.support import Balancer, request, wait_for

SLOW_RESYNC = {"BALANCER_STORE_RESYNC_INTERVAL": "60"}  # only messages, no safety net


def static(body: str) -> dict[str, Any]:
    return {"action": "static", "body": body}


def body_of(balancer: Balancer, host: str) -> bytes:
    return request(balancer.port, host=host, timeout=5)[2]


@pytest.fixture
def balancers(tmp_path: Path) -> Iterator[Callable[..., Balancer]]:
    started: list[Balancer] = []

    def start(name: str, store: str, env: dict[str, str] | None = None) -> Balancer:
        directory = tmp_path / name
        directory.mkdir()
        started.append(Balancer(directory, args=["--workers", "2"], store=store,
                                env={**SLOW_RESYNC, **(env or {})}))
        return started[-1]
    yield start
    for balancer in started:
        balancer.stop()


def family(pid: int) -> list[int]:
    """`pid` and its descendants."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(p for child in children for p in family(int(child)))]


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        os.kill(pid, sig)


@pytest.mark.parametrize("whole, unheard", [(0, False), (3, False), (3, True)],
                         ids=["same-count", "other-count", "other-count-unheard"])
def test_a_flushed_redis_then_another_balancers_writes_are_not_mixed_into_the_table(
        redis_factory: Callable[[], RedisServer], balancers: Callable[..., Balancer],
        whole: int, unheard: bool) -> None:
    """Balancer a at version 3 (with 3 hosts, or 6: a whole table of 4 first), Redis
    flushed, then a new balancer writes 4 hosts one at a time (versions 1 to 4);
    `unheard`: a's processes stopped and their subscriptions cut meanwhile, they
    come back to the store at version 3."""
    redis = redis_factory()
    a = balancers("a", redis.url)
    if whole:
        table = {f"w{n}.test": static(f"old w{n}") for n in range(whole + 1)}
        assert a.api("PUT", "/api/v1/hosts", {"hosts": table})[0] == 200
    for name in ("a", "b", "c")[1 if whole else 0:]:
        status, answer = a.api("PUT", f"/api/v1/hosts/{name}.test", static(f"old {name}"))
        assert status == 200, answer
    assert answer["version"] == 3
    def subscribed() -> int:
        return int(redis.client().pubsub_numsub("balancer:changes")[0][1])
    alone = subscribed()  # a's processes
    stopped = family(a.proc.pid) if unheard else []
    signal_all(stopped, signal.SIGSTOP)
    try:
        if unheard:
            redis.client().client_kill_filter(_type="pubsub")
        redis.client().flushall()
        # a balancer started after the loss knows no version: its writes count from 1
        b = balancers("b", redis.url, {"BALANCER_STORE_SNAPSHOT": "off"})
        for n in range(1, 4):
            status, answer = b.api("PUT", f"/api/v1/hosts/x{n}.test", static(f"new {n}"))
            assert (status, answer["version"]) == (200, n), answer
    finally:
        signal_all(stopped, signal.SIGCONT)
    if unheard:  # every subscription of a's back, at the version it serves
        wait_for(lambda: subscribed() == 2 * alone, what="a's and b's subscriptions")
    status, answer = b.api("PUT", "/api/v1/hosts/x4.test", static("new 4"))
    assert (status, answer["version"]) == (200, 4), answer
    wait_for(lambda: a.version() >= 4, what="a at the store's version")
    # a serves what a read of the store gives, never a mix
    stored = {f"x{n}.test" for n in range(1, 5)}

    def follows() -> bool:
        return set(a.api("GET", "/api/v1/hosts")[1]["hosts"]) == stored
    try:
        wait_for(follows, what="a serving the store's table")
    except AssertionError:
        raise AssertionError(f"a lists {sorted(a.api('GET', '/api/v1/hosts')[1]['hosts'])}"
                             f", the store holds {sorted(stored)}") from None
    for _ in range(4):  # every worker serves it
        assert body_of(a, "x1.test") == b"new 1"
        assert b"old" not in body_of(a, "b.test")
