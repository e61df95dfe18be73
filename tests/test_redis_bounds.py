"""A huge value another program wrote into Redis: refused unparsed, reported as a
corrupt store, the table served kept (`balancer.stores.redis_bounds`)."""

from __future__ import annotations

import json
import uuid

import pytest

from balancer.stores import CorruptStore
from balancer.stores.redis import RedisStore
from balancer.stores.redis_bounds import BoundedParser
from tests.conftest import RedisServer, wait_until
from tests.test_store_contract import WEB, Watcher

LIMIT = 200_000  # bytes: the bound of one answer in these tests (64 MiB in use)


@pytest.fixture
def small_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(BoundedParser, "limit", LIMIT)


def huge_rule() -> str:
    return json.dumps({**WEB, "note": "x" * (2 * LIMIT)})


@pytest.mark.usefixtures("small_bound")
def test_a_huge_rule_is_a_corrupt_store_and_the_next_read_works(
        redis_server: RedisServer) -> None:
    ns = f"t{uuid.uuid4().hex[:12]}"
    store = RedisStore(redis_server.url, ns)
    store.put_host("web.example.com", WEB)
    raw = redis_server.client()
    raw.hset(f"{ns}:hosts", "big.example.com", huge_rule())
    for read in (store.load, lambda: store.host_rule("big.example.com")):
        with pytest.raises(CorruptStore, match=f"more than {LIMIT:,} bytes"):
            read()
        assert store.is_reachable()
    raw.hdel(f"{ns}:hosts", "big.example.com")
    assert store.load().hosts == {"web.example.com": WEB}  # the dropped connection: a new one


@pytest.mark.usefixtures("small_bound")
def test_a_watcher_keeps_its_table_at_a_huge_rule_read_whole(
        redis_server: RedisServer) -> None:
    ns = f"t{uuid.uuid4().hex[:12]}"
    writer = RedisStore(redis_server.url, ns)
    writer.put_host("web.example.com", WEB)
    follower = RedisStore(redis_server.url, ns)
    with Watcher(follower) as watcher:
        wait_until(lambda: watcher.tables, message="the first table")
        raw = redis_server.client()  # another program's write: a bare version, read whole
        raw.hset(f"{ns}:hosts", "big.example.com", huge_rule())
        raw.publish(f"{ns}:changes", str(raw.incr(f"{ns}:version")))
        wait_until(lambda: "more than" in (follower.last_error() or ""),
                   message="the huge rule reported")
        assert watcher.tables[-1].hosts == {"web.example.com": WEB}
    writer.close()
    follower.close()
