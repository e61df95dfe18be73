"""Reads of the table answered from the table the management process holds
(`management.table_reads`), through real balancers on a real Redis and a file:
no whole read of the store after the API's own writes or another balancer's,
one for all the reads waiting on one, and read-your-writes kept while readers
on two balancers race writers on both."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import RedisServer
from tests.redis_hold import SubscriberHold
from tests.support import Balancer, constants_prefix, in_threads, wait_for

STATIC = {"action": "static", "status": 200, "body": "ok"}
HOSTS = {f"h{n}.test": {**STATIC, "body": f"h{n}"} for n in range(50)}
READERS = 8  # concurrent reads right after a change
ONE_WORKER = ["--workers", "1"]
CATCH_UP = "management.table_reads.CATCH_UP"  # 60 s in `pair`'s first balancer
BIG = 6000  # hosts: read in slices (`balancer.stores.redis_reads.SCAN_ABOVE`)
# A write is answered 200 once the worker serves it, 202 after `apply_timeout` (2 s
# by default): what these tests count is the whole reads, not how soon a worker
# answers, and a worker reading and compiling the BIG table on a machine at load 16
# took longer than 2 s
PATIENT = "[management]\napply_timeout = 60\n"
class WholeReads:
    """The whole reads of the table (``HGETALL NS:hosts``, or the first ``HSCAN`` of
    a big one) any client of a Redis made, seen through ``MONITOR`` (``INFO
    commandstats`` counts the certificates' reads too)."""

    def __init__(self, port: int, namespace: str = "balancer") -> None:
        key = f'"{namespace}:hosts"'.encode()
        self.whole = (b'"hgetall" ' + key, b'"hscan" ' + key + b' "0"')
        self.client = redis.Redis(port=port)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.sendall(b"MONITOR\r\n")
        self.seen = b""
        self.marks = 0
        self.reader = threading.Thread(target=self._read_loop, daemon=True)
        self.reader.start()

    def _read_loop(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.seen += data

    def count(self) -> int:
        """The whole reads so far: all those sent before this call."""
        self.marks += 1
        mark = f"whole-reads-mark-{self.marks}".encode()
        self.client.echo(mark)
        wait_for(lambda: mark in self.seen, 10, what="the monitor's mark")
        return len(self.lines())

    def settled(self, quiet: float = 0.5, timeout: float = 15.0) -> int:
        """`count` once no whole read came for `quiet` seconds: the processes of both
        balancers done with their start-up reads (under CI's load, some came after
        the first test's `count`)."""
        deadline = time.monotonic() + timeout
        last = self.count()
        while time.monotonic() < deadline:
            time.sleep(quiet)  # the quiet period measured, not a synchronisation
            now = self.count()
            if now == last:
                return now
            last = now
        raise AssertionError(f"whole reads never stopped: {self.lines()}")

    def lines(self) -> list[bytes]:
        """The monitor's lines of whole reads (with the client's address and time)."""
        return [line for line in self.seen.split(b"\n")
                if any(read in line.lower() for read in self.whole)]

    def close(self) -> None:
        self.sock.close()
        self.client.close()


def fill(url: str) -> None:
    """`HOSTS` at version 1, written as the Redis store keeps them (docs/stores.md)."""
    client = redis.Redis.from_url(url)
    client.hset("balancer:hosts", mapping={h: json.dumps(r) for h, r in HOSTS.items()})
    client.set("balancer:version", 1)
    client.close()


def served(bal: Balancer, version: int) -> bool:
    return [(p["loaded"], p["version"]) for p in
            bal.api("GET", "/api/v1/info")[1]["processes"]] == [(True, version)]


def settled(one: Balancer, two: Balancer) -> None:
    """Wait until the workers and the management processes hold version 1 (each read
    the whole table once at start), then until a one-host write through `one` is
    served by both: a whole read left over from the start is counted by then."""
    for bal in (one, two):
        wait_for(lambda b=bal: served(b, 1), 10, what="the worker's table")
        wait_for(lambda b=bal: "routing table version none -> 1:" in b.output(), 10,
                 what="the management process's table")
    status, answer = one.api("PUT", "/api/v1/hosts/warm.test", STATIC)
    assert status == 200 and answer["version"] == 2, answer
    for bal in (one, two):
        wait_for(lambda b=bal: served(b, 2) and "-> 2:" in b.output(), 10,
                 what="the first write followed")


# one Redis and two balancers on it for the module's Redis tests, on one xdist worker
pytestmark = pytest.mark.xdist_group("table_reads")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[Balancer, Balancer, WholeReads]]:
    """Two balancers on one private Redis serving `HOSTS`, and its whole reads."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    fill(server.url)
    reads = WholeReads(server.port)
    one = Balancer(tmp_path_factory.mktemp("a"), None, store=server.url, args=ONE_WORKER,
                   config=PATIENT, prefix=constants_prefix({CATCH_UP: 60.0}))
    two = Balancer(tmp_path_factory.mktemp("b"), None, store=server.url, args=ONE_WORKER,
                   config=PATIENT)
    try:
        settled(one, two)
        yield one, two, reads
    finally:
        reads.close()
        one.stop()
        two.stop()
        server.close()


def read_at_once(bal: Balancer, path: str = "/api/v1/hosts") -> list[tuple[int, Any]]:
    return [f.result(timeout=30) for f in in_threads(READERS, lambda: bal.api("GET", path))]


def test_reads_after_the_apis_write_read_no_whole_table(
        pair: tuple[Balancer, Balancer, WholeReads]) -> None:
    """Bug: the first read of each new version read the whole hash (1 s at
    100,000 hosts), and concurrent reads each read it."""
    one, _, reads = pair
    before = reads.settled()
    status, answer = one.api("PUT", "/api/v1/hosts/new.test", {**STATIC, "body": "new"})
    assert status == 200
    version = answer["version"]
    for status, body in [one.api("GET", "/api/v1/hosts"), *read_at_once(one)]:
        assert status == 200 and body["version"] >= version
        assert body["hosts"]["new.test"]["body"] == "new" and len(body["hosts"]) == 52
    status, body = one.api("GET", "/api/v1/hosts/new.test")
    assert status == 200 and body["rule"]["body"] == "new" and body["version"] >= version
    assert reads.count() == before, reads.lines()


def test_reads_after_another_balancers_write_share_at_most_one_whole_read(
        pair: tuple[Balancer, Balancer, WholeReads]) -> None:
    one, two, reads = pair
    for round_ in range(3):
        before = reads.count()
        status, answer = one.api("PUT", "/api/v1/hosts/h1.test", {**STATIC, "body": f"r{round_}"})
        assert status == 200
        for status, body in read_at_once(two):  # at once: no time for two to follow
            assert status == 200 and body["version"] >= answer["version"]
            assert body["hosts"]["h1.test"]["body"] == f"r{round_}"
        assert reads.count() - before <= 1, reads.lines()


def rewrite_whole(bal: Balancer, body: str, hosts: dict[str, Any] | None = None) -> int:
    """The table `bal` serves (or `hosts`) written back whole with h1.test's body
    changed (as many hosts: the other tests count them); the version written."""
    if hosts is None:
        hosts = bal.api("GET", "/api/v1/hosts")[1]["hosts"]
    status, answer = bal.api("PUT", "/api/v1/hosts",
                             {"hosts": {**hosts, "h1.test": {**STATIC, "body": body}}})
    assert status == 200, answer
    return answer["version"]


def test_a_whole_table_write_is_read_whole_once_by_its_balancer(
        pair: tuple[Balancer, Balancer, WholeReads]) -> None:
    """Bug: the management process that wrote a whole table read it again at the
    write's message (its watcher, the table told to it directly already), beside
    its worker's one read. Per write: one whole read in the writing balancer (its
    worker), two in the other (its worker and its management process)."""
    one, two, reads = pair
    for round_ in range(3):
        before = reads.settled()
        version = rewrite_whole(one, f"whole {round_}")
        for bal in (one, two):
            wait_for(lambda b=bal, v=version: served(b, v) and f"-> {v}:" in b.output(),
                     10, what="the whole-table write followed")
        assert reads.settled() - before == 3, reads.lines()


def test_a_whole_table_write_told_before_its_message_is_read_whole_once(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """The worker hears of its balancer's whole-table write (of a table read in
    slices) from the management process before its watcher hears the write's
    message, which a relay holds back until the worker reads the table (its read
    let through once another began, or 2 s passed), or 0.5 s: the worker waits for
    its watcher (`following.FOLLOW_WAIT`), and the one whole read is the
    watcher's. Bug: the worker read it at once, and its watcher, whose
    message came during that read, read it a second time."""
    namespace = f"told{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_server.url)
    client.hset(f"{namespace}:hosts", mapping={f"h{n}.test": json.dumps(STATIC)
                                               for n in range(BIG)})
    client.set(f"{namespace}:version", 1)
    client.close()

    second = threading.Event()  # another whole read began

    def release_at_a_read(data: bytes) -> None:
        if b"HSCAN" not in data.upper():
            return
        if relay.held:  # the worker's own read: the message now, the read once the
            relay.release()  # watcher read too (it would, the bug), or after 2 s
            second.wait(2)
        else:
            second.set()
    relay = SubscriberHold(redis_server.port, before=release_at_a_read)
    reads = WholeReads(redis_server.port, namespace)
    bal = Balancer(tmp_path, None, store=f"redis://127.0.0.1:{relay.port}/0",
                   args=ONE_WORKER, env={"BALANCER_STORE_NAMESPACE": namespace},
                   config=PATIENT)
    timer = threading.Timer(0.5, relay.release)
    try:
        wait_for(lambda: served(bal, 1) and "-> 1:" in bal.output(), 30,
                 what="the first table")
        before = reads.settled()
        hosts = bal.api("GET", "/api/v1/hosts")[1]["hosts"]
        relay.hold()
        timer.start()
        version = rewrite_whole(bal, "told first", hosts)
        assert served(bal, version)
        wait_for(lambda: f"-> {version}:" in bal.output(), 10, what="the management's table")
        assert reads.settled() - before == 1, reads.lines()
    finally:
        timer.cancel()
        bal.stop()
        reads.close()
        relay.close()


@pytest.fixture(params=["file", "redis"])
def writers(request: pytest.FixtureRequest, tmp_path: Path
            ) -> Iterator[tuple[Balancer, Balancer]]:
    """Two balancers on one store: a routes file both name, or the Redis of `pair`."""
    if request.param == "redis":
        one, two, _ = request.getfixturevalue("pair")
        yield one, two
        return
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = Balancer(tmp_path / "a", HOSTS, args=ONE_WORKER)
    two = Balancer(tmp_path / "b", None, store=f"file:{one.routes}", args=ONE_WORKER)
    yield one, two
    one.stop()
    two.stop()


def test_a_read_shows_every_write_answered_before_it(
        writers: tuple[Balancer, Balancer]) -> None:
    """Writers on both balancers, a reader on each: a read sent after a write was
    answered is at its version or later, and shows the rule of the version read."""
    balancers = writers
    written: dict[int, str] = {}  # version -> body of race.test written at it
    answered = [0]  # the highest version a write was answered with
    done = threading.Event()
    problems: list[str] = []

    def read_loop(bal: Balancer) -> int:
        reads = 0
        while not done.is_set() and reads < 500:
            floor = answered[0]
            status, body = bal.api("GET", "/api/v1/hosts")
            reads += 1
            if status != 200 or body["version"] < floor:
                problems.append(f"after version {floor}: {status} {body.get('version')}")
                continue
            if body["version"] > answered[0]:
                continue  # its write not answered yet: what it holds is not known here
            shown = body["hosts"].get("race.test", {}).get("body")
            versions = [v for v in list(written) if v <= body["version"]]
            if versions and shown != written[max(versions)]:
                problems.append(f"version {body['version']}: {shown!r}, not "
                                f"{written[max(versions)]!r}")
        return reads

    readers = [threading.Thread(target=read_loop, args=(bal,)) for bal in balancers]
    for reader in readers:
        reader.start()
    try:
        for n in range(24):
            text = f"w{n}"
            status, answer = balancers[n % 2].api("PUT", "/api/v1/hosts/race.test",
                                                  {**STATIC, "body": text})
            assert status == 200, answer
            written[answer["version"]] = text
            answered[0] = max(answered[0], answer["version"])
    finally:
        done.set()
        for reader in readers:
            reader.join(timeout=60)
    assert problems == []


def test_a_read_of_a_corrupt_store_does_not_wait_for_the_mirror(
        pair: tuple[Balancer, Balancer, WholeReads]) -> None:
    """The watcher keeps the last good table while the store's newest is corrupt: a
    read answers the served table and the problem at once (it waited `CATCH_UP`, 1 s,
    for a table the watcher would never deliver). Last in the module: it repairs the
    store, but the other tests count the whole reads that repair makes."""
    one, _, reads = pair
    client = reads.client
    served = one.api("GET", "/api/v1/hosts")[1]["version"]
    version = int(client.get("balancer:version")) + 1
    with client.pipeline(transaction=True) as pipe:
        pipe.hset("balancer:hosts", "bad.test", "{not json")
        pipe.set("balancer:version", version)
        pipe.publish("balancer:changes", f"{version} bad.test")
        pipe.execute()
    try:
        wait_for(lambda: "not valid JSON" in (one.api("GET", "/api/v1/info")[1]["store"]
                                              ["problem"] or ""), 10, what="the problem")
        for _ in range(3):  # `one` waits 60 s for its mirror (`CATCH_UP`): the bug's
            # reads each waited that long, past the API client's 10 s (a bound the
            # product sets, not how fast a loaded machine answers: bug, `< 0.9 s`)
            status, body = one.api("GET", "/api/v1/hosts")
            assert status == 200 and body["version"] == served
            assert "not valid JSON" in body["store_problem"]
    finally:
        with client.pipeline(transaction=True) as pipe:
            pipe.hdel("balancer:hosts", "bad.test")
            pipe.set("balancer:version", version + 1)
            pipe.publish("balancer:changes", str(version + 1))
            pipe.execute()
    wait_for(lambda: one.api("GET", "/api/v1/info")[1]["store"]["problem"] is None, 10,
             what="the repair")
