"""A huge value another program wrote into Redis: refused unparsed, reported as a
corrupt store, the table served kept (`balancer.stores.redis_bounds`)."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from redis._parsers import hiredis as redis_hiredis

from balancer.stores import CorruptStore, StoreUrlError, open_store
from balancer.stores.redis import RedisStore
from balancer.stores.redis_bounds import AnswerTooBig, BoundedParser
from balancer.stores.redis_connect import Connector, options_problem
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


class SlowRedis:
    """A scripted peer between one client and Redis that hands Redis's answers on
    in pieces of `PIECE` bytes, `PAUSE` s apart (a Redis behind a slow link)."""

    PIECE, PAUSE = 64 * 1024, 0.02

    def __init__(self, port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.redis_port = port
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._serve, daemon=True)]
        self.threads[0].start()

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        upstream = socket.create_connection(("127.0.0.1", self.redis_port), timeout=5)
        for args in ((client, upstream, 1 << 16, 0.0), (upstream, client, self.PIECE,
                                                        self.PAUSE)):
            thread = threading.Thread(target=self._pump, args=args, daemon=True)
            thread.start()
            self.threads.append(thread)

    def _pump(self, source: socket.socket, sink: socket.socket, piece: int,
              pause: float) -> None:
        try:
            while not self.done.is_set():
                data = source.recv(piece)
                if not data:
                    break
                sink.sendall(data)
                self.done.wait(pause)
        except OSError:
            pass
        finally:
            for each in (source, sink):
                each.close()

    def close(self) -> None:
        self.done.set()
        self.listener.close()
        for thread in self.threads[1:]:
            thread.join(5)


@pytest.fixture
def slow_redis(redis_server: RedisServer) -> Iterator[SlowRedis]:
    peer = SlowRedis(redis_server.port)
    yield peer
    peer.close()


@pytest.mark.usefixtures("small_bound")
def test_a_huge_message_read_in_pieces_is_bounded(
        redis_server: RedisServer, slow_redis: SlowRedis) -> None:
    """A message looked for with a timeout (as the watcher does) that arrives in
    pieces is counted whole, not from 0 at each look (bug: it was read whole)."""
    channel = f"t{uuid.uuid4().hex[:12]}:changes"
    client = Connector(f"redis://127.0.0.1:{slow_redis.port}/0", 2.0)()
    pubsub = client.pubsub()
    pubsub.subscribe(channel)
    deadline = time.monotonic() + 5
    while pubsub.get_message(timeout=0.2) is None:  # the subscription's reply
        assert time.monotonic() < deadline
    redis_server.client().publish(channel, "x" * (3 * LIMIT))
    with pytest.raises(AnswerTooBig):
        while time.monotonic() < deadline:
            assert pubsub.get_message(timeout=0.005) is None, "read whole"
    with pytest.raises(AnswerTooBig):  # the connection is not read on
        pubsub.get_message(timeout=0.005)
    pubsub.close()
    client.close()


@pytest.mark.usefixtures("small_bound")
def test_answers_under_the_bound_pipelined_past_it_are_read(
        redis_server: RedisServer) -> None:
    """The bound is per answer: a pipeline's answers, each under it, together over
    it (in one socket read or several), are all read (a transaction's are one
    answer, ``EXEC``'s)."""
    key = f"t{uuid.uuid4().hex[:12]}"
    client = Connector(redis_server.url, 2.0)()
    value = "v" * (LIMIT // 3)
    with client.pipeline(transaction=False) as pipe:
        for index in range(8):
            pipe.set(f"{key}:{index}", value)
            pipe.get(f"{key}:{index}")
        assert pipe.execute()[1::2] == [value] * 8
    client.close()


def test_without_hiredis_no_store_is_made(monkeypatch: pytest.MonkeyPatch,
                                          redis_server: RedisServer) -> None:
    """redis-py's other parsers are not bounded: refused at start, named (bug: every
    read failed, the store shown unreachable: "Hiredis is not installed")."""
    monkeypatch.setattr(redis_hiredis, "HIREDIS_AVAILABLE", False)
    assert "needs the hiredis package" in (options_problem(redis_server.url) or "")
    with pytest.raises(StoreUrlError, match="needs the hiredis package"):
        open_store(redis_server.url, f"t{uuid.uuid4().hex[:12]}")
